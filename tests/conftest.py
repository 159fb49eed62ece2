import os
import warnings
from pathlib import Path

import numpy as np
import pytest

warnings.filterwarnings("ignore")

SHARED_DATA = Path(
    os.environ.get("MMMAT_SHARED_DATA") or Path(__file__).resolve().parents[1].parent / "shared" / "data"
)


def shared_data(sub: str = "") -> Path:
    """Path under ../shared/data, or skip the test with a clear message."""
    p = SHARED_DATA / sub
    if not p.exists():
        pytest.skip(f"../shared/data not present ({p}): integration test skipped")
    return p


@pytest.fixture
def nacl():
    from pymatgen.core import Lattice, Structure

    return Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])


@pytest.fixture
def gan():
    from pymatgen.core import Lattice, Structure

    return Structure.from_spacegroup(
        "P6_3mc", Lattice.hexagonal(3.19, 5.19), ["Ga", "N"], [[1 / 3, 2 / 3, 0], [1 / 3, 2 / 3, 0.375]]
    )


@pytest.fixture
def triclinic():
    from pymatgen.core import Lattice, Structure

    rng = np.random.default_rng(0)
    lat = Lattice.from_parameters(4.1, 5.3, 6.2, 81, 97, 104)
    frac = rng.random((5, 3))
    return Structure(lat, ["Li", "Fe", "P", "O", "O"], frac)


def csv_rows(structures: dict, props: dict | None = None) -> str:
    """A CSV text with material_id, cif and property columns."""
    import csv
    import io

    from pymatgen.io.cif import CifWriter

    buf = io.StringIO()
    props = props or {}
    names = sorted({k for p in props.values() for k in p})
    w = csv.writer(buf)
    w.writerow(["material_id", "cif", *names])
    for mid, s in structures.items():
        cif = s if isinstance(s, str) else str(CifWriter(s))
        w.writerow([mid, cif, *[props.get(mid, {}).get(n, "") for n in names]])
    return buf.getvalue()


@pytest.fixture(scope="module")
def one_torch_thread():
    """Torch on one thread for a module: small tensors gain nothing from threads, and on a busy machine two
    threads contending for cores make them many times slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def web_env(tmp_path_factory):
    """Builtin shards, a tiny model, its index, a generator and a design run, built once per session."""
    from web_fixtures import build_env

    return build_env(tmp_path_factory.mktemp("web_env"))


def rocksalt_and_wurtzite():
    """NaCl (rock salt, 4.0 Å) and GaN (wurtzite): two small pymatgen structures for generator tests."""
    from pymatgen.core import Lattice, Structure

    nacl = Structure(Lattice.cubic(4.0), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    gan = Structure.from_spacegroup(
        "P6_3mc", Lattice.hexagonal(3.19, 5.19), ["Ga", "N"], [[1 / 3, 2 / 3, 0], [1 / 3, 2 / 3, 0.375]]
    )
    return [nacl, gan]


def flat_crystal_tensors(structs):
    """``(lattice (B, 3, 3), frac (N, 3), z (N,), counts (B,), batch (N,))`` of pymatgen structures, as torch."""
    import torch

    lat = torch.tensor(np.stack([s.lattice.matrix for s in structs]), dtype=torch.float32)
    frac = torch.tensor(np.concatenate([s.frac_coords for s in structs]), dtype=torch.float32)
    z = torch.tensor(np.concatenate([s.atomic_numbers for s in structs]))
    counts = torch.tensor([len(s) for s in structs])
    batch = torch.repeat_interleave(torch.arange(len(structs)), counts)
    return lat, frac, z, counts, batch
