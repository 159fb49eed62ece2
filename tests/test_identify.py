"""Phase identification on a tiny index built in the test: synthetic mixtures, the CLI, bad inputs."""

from __future__ import annotations

import json
import tarfile

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from mmmat.cli import app
from mmmat.io import InputError
from mmmat.xrd.identify import identify, load_table
from mmmat.xrd.instrument import InstrumentParams, uniform_grid
from mmmat.xrd.mixtures import as_pattern, render_mixtures
from mmmat.xrd.phases import PhaseTable
from tests.conftest import shared_data


def _structures():
    from pymatgen.core import Lattice, Structure

    sg = Structure.from_spacegroup
    return {
        "nacl": sg("Fm-3m", Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]]),
        "kcl": sg("Fm-3m", Lattice.cubic(6.29), ["K", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]]),
        "si": sg("Fd-3m", Lattice.cubic(5.431), ["Si"], [[0, 0, 0]]),
        "zno": sg("P6_3mc", Lattice.hexagonal(3.25, 5.21), ["Zn", "O"], [[1 / 3, 2 / 3, 0], [1 / 3, 2 / 3, 0.382]]),
        "rutile": sg("P4_2/mnm", Lattice.tetragonal(4.594, 2.959), ["Ti", "O"], [[0, 0, 0], [0.305, 0.305, 0]]),
        "mgo": sg("Fm-3m", Lattice.cubic(4.21), ["Mg", "O"], [[0, 0, 0], [0.5, 0.5, 0.5]]),
        "cu": sg("Fm-3m", Lattice.cubic(3.615), ["Cu"], [[0, 0, 0]]),
        "gan": sg("P6_3mc", Lattice.hexagonal(3.19, 5.19), ["Ga", "N"], [[1 / 3, 2 / 3, 0], [1 / 3, 2 / 3, 0.375]]),
    }


@pytest.fixture(scope="module")
def tiny_index(tmp_path_factory):
    root = tmp_path_factory.mktemp("idx")
    cifs = root / "cifs"
    cifs.mkdir()
    for name, s in _structures().items():
        (cifs / f"{name}.cif").write_text(s.to(fmt="cif"))
    (cifs / "broken.cif").write_text("data_x\n_cell_length_a 3\n")
    r = CliRunner().invoke(app, ["index", "add", "--index", str(root / "index"), "--cif", str(cifs)])
    assert r.exit_code == 0, r.output
    assert "8 crystals added" in r.output and "1 unreadable" in r.output
    return root / "index"


def _cif_index(tmp_path, structures, names):
    """An index of ``names`` from ``structures``, added through ``mmmat index add`` from a folder of CIFs."""
    cifs = tmp_path / "cifs"
    cifs.mkdir()
    for name in names:
        (cifs / f"{name}.cif").write_text(structures[name].to(fmt="cif"))
    index = tmp_path / "index"
    r = CliRunner().invoke(app, ["index", "add", "--index", str(index), "--cif", str(cifs)])
    assert r.exit_code == 0, r.output
    return index


def _scan(table: PhaseTable, names, fractions, scales, seed=0, **inst):
    rows = [int(np.flatnonzero(table.material_id == n)[0]) for n in names]
    values = dict(ka2_ratio=0.5, U=0.004, V=-0.002, W=0.003, size_nm=100.0, asymmetry=0.05, zero_shift=0.02,
                  background=[[0.05, -0.02, 0.01]], hump_height=0.03, counts=2e4)
    values.update(inst)
    p = InstrumentParams.fixed(1, dtype=torch.float64, **values)
    grid = uniform_grid(10.0, 100.0, 0.02, dtype=torch.float64)
    y = render_mixtures(table, [(rows, fractions, scales)], p, grid, torch.Generator().manual_seed(seed))
    return as_pattern(grid, y, p, 0, "synthetic")


def test_two_phase_mixture(tiny_index):
    table = load_table(tiny_index)
    pat = _scan(table, ["zno", "rutile"], [0.7, 0.3], [1.004, 0.996])
    threads = torch.get_num_threads()
    res = identify(pat, tiny_index, elements=["Zn", "Ti", "O", "Mg"])
    assert torch.get_num_threads() == threads  # the fit's one thread is given back
    found = {p.material_id: p for p in res.phases}
    assert set(found) == {"zno", "rutile"}
    assert set(res.alternatives) == {"zno", "rutile"}
    assert not set(found) & {m for alts in res.alternatives.values() for m in alts}
    assert found["zno"].weight_fraction == pytest.approx(0.7, abs=0.05)
    assert found["zno"].lattice_scale == pytest.approx(1.004, abs=0.001)
    assert found["rutile"].lattice_scale == pytest.approx(0.996, abs=0.001)
    assert res.rwp < 15 and res.ranking()[:2] == [p.material_id for p in res.phases]
    frame = res.to_frame()
    assert list(frame["material_id"]) == [p.material_id for p in res.phases]
    doc = res.to_dict()
    assert len(doc["two_theta"]) == len(doc["fitted"]) == len(doc["contributions"]["zno"])
    # without the element list the same two come out of all eight crystals
    res2 = identify(pat, tiny_index)
    assert {p.material_id for p in res2.phases} == {"zno", "rutile"}


def test_single_phase_and_bad_inputs(tiny_index, tmp_path):
    table = load_table(tiny_index)
    pat = _scan(table, ["si"], [1.0], [1.0], counts=5e3)
    res = identify(pat, tiny_index, max_phases=3)
    assert [p.material_id for p in res.phases] == ["si"] and res.phases[0].weight_fraction == pytest.approx(1.0)
    with pytest.raises(InputError, match="no crystal in .* is made only of Xe"):
        identify(pat, tiny_index, elements=["Xe"])
    with pytest.raises(InputError, match="unknown element symbol 'Qq'"):
        identify(pat, tiny_index, elements=["Qq"])
    xy = tmp_path / "scan.xy"
    xy.write_text("\n".join(f"{a} {b}" for a, b in zip(pat.two_theta, pat.intensity)))
    with pytest.raises(InputError, match=r"scan\.xy: the file gives no wavelength"):
        identify(xy, tiny_index)
    assert [p.material_id for p in identify(xy, tiny_index, wavelength=1.5406).phases][:1] == ["si"]
    with pytest.raises(InputError, match="index folder not found"):
        identify(pat, tmp_path / "nothing")


def test_cli_identify(tiny_index, tmp_path):
    table = load_table(tiny_index)
    pat = _scan(table, ["nacl", "mgo"], [0.5, 0.5], [1.0, 1.0])
    xy = tmp_path / "mix.xy"
    xy.write_text("\n".join(f"{a:.3f} {b:.1f}" for a, b in zip(pat.two_theta, pat.intensity)))
    out = tmp_path / "res.json"
    png = tmp_path / "res.png"
    r = CliRunner().invoke(app, ["identify", str(xy), "--index", str(tiny_index), "--elements", "Na,Cl,Mg,O",
                                 "--wavelength", "1.5406", "--json", str(out), "--png", str(png)])
    assert r.exit_code == 0, r.output
    doc = json.loads(out.read_text())
    assert {p["material_id"] for p in doc["phases"]} == {"nacl", "mgo"} and png.stat().st_size > 10_000
    r = CliRunner().invoke(app, ["identify", str(xy), "--index", str(tiny_index), "--elements", "Au"])
    assert r.exit_code == 2 and "wavelength" in r.output
    r = CliRunner().invoke(app, ["identify", str(xy), "--index", str(tiny_index), "--elements", "Au",
                                 "--wavelength", "1.54"])
    assert r.exit_code == 2 and "made only of Au" in r.output


def test_real_xrdml_scan_runs(tiny_index, tmp_path):
    tar = shared_data("xrd_measured/alab_binary_reactions/binary_reactions_xrdml.tar.xz")
    with tarfile.open(tar) as t:
        t.extractall(tmp_path, filter="data")
    scan = next(tmp_path.rglob("CoO-ZnO_1100C_60min.xrdml"))
    res = identify(scan, tiny_index, elements=["Zn", "O", "Mg", "Ti"])
    assert "zno" in [p.material_id for p in res.phases]
    assert np.isfinite(res.rwp) and res.rwp < 50


def test_benchmark_learned_route(tmp_path):
    """The benchmark's learned route on a tiny model (tiny pretraining config, random weights) and its index."""
    import importlib.util
    import sys
    from pathlib import Path

    import yaml

    from data_pipelines.base import BuildOptions, get_source
    from data_pipelines.build import build_shards
    from mmmat.latent.model import MultimodalModel
    from mmmat.retrieval.api import shard_records
    from mmmat.xrd.phases import add_crystals, crystal_from_record

    pytest.importorskip("faiss")
    root = Path(__file__).resolve().parents[1]
    shards = tmp_path / "shards"
    build_shards(get_source("builtin")(None, limit=6), shards, progress=False, options=BuildOptions())
    torch.manual_seed(0)
    enc = yaml.safe_load((root / "configs/pretrain/tiny.yaml").read_text())["model"]["init_args"]["encoders"]
    model = MultimodalModel(enc, embed_dim=32).save_pretrained(tmp_path / "model")
    index = tmp_path / "index"
    add_crystals(index, [crystal_from_record(r) for r in shard_records(shards)])
    spec = importlib.util.spec_from_file_location("identify_bench", root / "benchmarks" / "identify.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules["identify_bench"] = bench
    spec.loader.exec_module(bench)
    bench.ensure_embeddings(index, model, shards, tmp_path / "no_data")
    assert (index / "index.json").is_file()
    threads = torch.get_num_threads()
    bench._init(str(index), str(model))
    bench._STATE["test"] = np.arange(len(bench._STATE["table"]))  # every crystal may be drawn
    try:
        case = bench.synthetic_case(3)
    finally:
        torch.set_num_threads(threads)
    for tag in ("elements", "none"):
        assert case[tag]["top5_learned"] in (True, False)
        assert len(case[tag]["top5"]) >= 2
    assert case["elements"]["top5"][0] in set(bench._STATE["table"].material_id.tolist())


def test_molecular_solids_flagged():
    """Molecular solids (O2, H3O2, CO2 ...) are flagged; oxides, carbonates and carbon itself are not."""
    from mmmat.xrd.identify import molecular_rows
    from mmmat.xrd.phases import empty_table

    t = empty_table()
    t.elements = np.array(["O", "H O", "Zn O", "N", "C O", "Cl Na", "C", "C Ca O"])
    t.material_id = np.array([f"m{i}" for i in range(8)])
    assert molecular_rows(t).tolist() == [True, True, False, True, True, False, False, False]


def test_ranking_interleaves_alternatives_and_runners_up():
    """Phases first; then, round by round, each phase's next alternative (weakest phase first) and a runner-up."""
    from mmmat.xrd.identify import IdentifyResult, PhaseHit

    z = np.zeros(3)
    res = IdentifyResult(
        phases=[PhaseHit("a", "A", 1, 0.6, 1.0, 50.0), PhaseHit("b", "B", 1, 0.4, 1.0, 12.0)], rwp=10.0,
        two_theta=z, measured=z, fitted=z, residual=z, background=z, contributions={},
        candidates=[{"material_id": "c9"}, {"material_id": "a"}], runners_up=["r1", "r2", "b1"],
        alternatives={"a": ["a1", "a2"], "b": ["b1"]})
    assert res.ranking() == ["a", "b", "b1", "a1", "r1", "a2", "r2", "c9"]


def test_ranking_interleaves_coverage_alternatives_and_runners_up_after_the_phases():
    from mmmat.xrd.identify import IdentifyResult, PhaseHit

    z = np.zeros(3)
    res = IdentifyResult(
        phases=[PhaseHit("a", "A", 1, 1.0, 1.0, 50.0)], rwp=10.0, two_theta=z, measured=z, fitted=z, residual=z,
        background=z, contributions={}, candidates=[], runners_up=["r1"], alternatives={"a": ["a1"]},
        coverage=["c1", "a", "c2"])
    assert res.ranking() == ["a", "c1", "a1", "r1", "c2"]
    assert res.to_dict()["coverage"] == ["c1", "a", "c2"]


def test_elements_no_phase_explains_bring_their_crystals_forward(tiny_index):
    """Stopped after one phase, the crystal that carries the listed element no phase holds comes right after it."""
    table = load_table(tiny_index)
    pat = _scan(table, ["zno", "mgo"], [0.7, 0.3], [1.0, 1.0])
    res = identify(pat, tiny_index, elements=["Zn", "O", "Mg"], max_phases=1)
    assert [p.material_id for p in res.phases] == ["zno"]
    assert res.coverage == ["mgo"] and res.ranking()[:2] == ["zno", "mgo"]
    # every listed element explained: nothing to bring forward
    res = identify(pat, tiny_index, elements=["Zn", "O", "Mg"])
    assert {p.material_id for p in res.phases} == {"zno", "mgo"} and res.coverage == []


def test_element_list_swaps_a_phase_for_the_isostructural_crystal_that_explains_more(tmp_path, monkeypatch):
    """Cu and an ordered Cu3Ni of the same cell give nearly the same pattern (Cu and Ni scatter alike): with Ni in
    the element list, the swap check prefers the crystal that explains it, and keeps Cu as its alternative.

    A broad-peaked, noisy scan (20 nm crystallites, 3,000 counts), where such crystals are hard to tell apart; two
    phases at most, so that the search does not add the look-alike as a third phase that the backward check then
    removes."""
    from pymatgen.core import Lattice, Structure

    import mmmat.xrd.identify as ident

    s = _structures()
    s["cu3ni"] = Structure(Lattice.cubic(3.615), ["Ni", "Cu", "Cu", "Cu"],
                           [[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]])
    index = _cif_index(tmp_path, s, ("cu", "cu3ni", "mgo", "zno", "nacl"))
    table = load_table(index)
    pat = _scan(table, ["cu", "mgo"], [0.6, 0.4], [1.0, 1.0], size_nm=20.0, counts=3e3)
    elements = ["Cu", "Ni", "Mg", "O"]
    res = identify(pat, index, elements=elements, max_phases=2)
    assert {p.material_id for p in res.phases} == {"cu3ni", "mgo"}
    assert res.alternatives["cu3ni"][0] == "cu"
    monkeypatch.setattr(ident, "ELEMENT_SWAP", False)
    res = identify(pat, index, elements=elements, max_phases=2)
    assert {p.material_id for p in res.phases} == {"cu", "mgo"}
    monkeypatch.setattr(ident, "ELEMENT_SWAP", True)
    res = identify(pat, index, max_phases=2)  # without the list nothing says which: the pattern's own choice stands
    assert {p.material_id for p in res.phases} == {"cu", "mgo"}


def test_a_phase_must_explain_its_share_of_the_misfit(tiny_index, monkeypatch):
    """MIN_RSS_DROP(_ELEMENTS): a phase that lowers the BIC but explains less of the misfit left without it goes."""
    import mmmat.xrd.identify as ident

    table = load_table(tiny_index)
    pat = _scan(table, ["zno", "rutile"], [0.95, 0.05], [1.0, 1.0])
    res = identify(pat, tiny_index, elements=["Zn", "Ti", "O"])
    assert {p.material_id for p in res.phases} == {"zno", "rutile"}
    fit = res.fitted - res.contributions["rutile"]  # the minor phase's share of the misfit, roughly
    w = 1.0 / np.maximum(res.measured, 1.0)
    share = 1.0 - float((w * (res.measured - res.fitted) ** 2).sum()) / float((w * (res.measured - fit) ** 2).sum())
    assert 0.0 < share < 1.0
    monkeypatch.setattr(ident, "MIN_RSS_DROP_ELEMENTS", min(0.999, share + 0.2))
    strict = identify(pat, tiny_index, elements=["Zn", "Ti", "O"])
    assert [p.material_id for p in strict.phases] == ["zno"]
    monkeypatch.setattr(ident, "MIN_RSS_DROP", min(0.999, share + 0.2))  # the same rule without an element list
    assert [p.material_id for p in identify(pat, tiny_index).phases] == ["zno"]


def test_benchmark_flags_modulated_structures(tmp_path):
    """An incommensurately modulated CIF (superspace group) is flagged and counted apart from periodic ones."""
    import importlib.util
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("identify_bench_mod", root / "benchmarks" / "identify.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules["identify_bench_mod"] = bench
    spec.loader.exec_module(bench)
    periodic = tmp_path / "a.cif"
    periodic.write_text("data_a\n_cell_length_a 4.0\n_symmetry_space_group_name_H-M 'P m -3 m'\n")
    mod = tmp_path / "b.cif"
    mod.write_text("data_b\n_cell_length_a\n3.9183(2)\n_space_group_ssg_name\n'X2/m(\\a0\\g)0s'\n"
                   "_cell_modulation_dimension\n1\n")
    zero = tmp_path / "c.cif"
    zero.write_text("data_c\n_cell_modulation_dimension 0\n")
    assert [bench.modulated(f) for f in (periodic, mod, zero)] == [False, True, False]

    def row(rank, modulated):
        ranks = {"rank_identify": rank, "rank_classical": 1, "rank_learned": None}
        return {"modulated": modulated, "elements": dict(ranks), "none": dict(ranks)}

    m = bench.iucr_metrics([row(1, False), row(3, True), row(1, False)], learned=False)
    assert (m["iucr_readable"], m["iucr_rank1_identify"], m["iucr_modulated"]) == (3, 2, 1)
    assert (m["iucr_rank1_identify_periodic"], m["iucr_rank1_classical_periodic"]) == (2, 2)


def test_structure_type_keys(tmp_path):
    """Isostructural substitutes share a key (space group, sorted element counts); other structures do not."""
    from pymatgen.core import Lattice, Structure

    from mmmat.xrd.identify import prototypes
    from mmmat.xrd.phases import add_crystals, crystal_from_structure

    s = _structures()
    s["ni"] = Structure.from_spacegroup("Fm-3m", Lattice.cubic(3.524), ["Ni"], [[0, 0, 0]])
    names = ["nacl", "kcl", "cu", "ni", "zno", "gan", "rutile"]
    add_crystals(tmp_path / "index", [crystal_from_structure(s[n], n) for n in names])
    key = dict(zip(load_table(tmp_path / "index").material_id.tolist(), prototypes(load_table(tmp_path / "index"))))
    assert key["nacl"] == key["kcl"] == (225, (1.0, 1.0))
    assert key["cu"] == key["ni"] == (225, (1.0,))
    assert key["zno"] == key["gan"] != key["nacl"]
    assert key["rutile"] == (136, (1.0, 2.0))


def test_element_list_swaps_a_look_alike_for_its_isostructural_substitute(tmp_path, monkeypatch):
    """Ni and Cu share a structure type, scatter alike and differ by 2.5 % in cell: on a broad, noisy scan of Ni +
    MgO the fit first explains Ni's peaks with Cu's cell shrunk to fit. With Ni in the element list and no phase
    explaining it, the swap check tries the isostructural crystals that carry it (refined first: the residual
    screen does not list them, their peaks are already fitted) and keeps Ni."""
    from pymatgen.core import Lattice, Structure

    import mmmat.xrd.identify as ident

    s = _structures()
    s["ni"] = Structure.from_spacegroup("Fm-3m", Lattice.cubic(3.524), ["Ni"], [[0, 0, 0]])
    index = _cif_index(tmp_path, s, ("cu", "ni", "mgo", "zno", "nacl"))
    table = load_table(index)
    pat = _scan(table, ["ni", "mgo"], [0.6, 0.4], [1.0, 1.0], size_nm=20.0, counts=3e3)
    elements = ["Cu", "Ni", "Mg", "O"]
    res = identify(pat, index, elements=elements, max_phases=2)
    assert {p.material_id for p in res.phases} == {"ni", "mgo"}
    monkeypatch.setattr(ident, "SUBSTITUTE_SWAP", False)
    res = identify(pat, index, elements=elements, max_phases=2)
    assert {p.material_id for p in res.phases} == {"cu", "mgo"}


def test_weighted_screen_ranks_the_phases_present_above_look_alikes(tmp_path):
    """ZnO + rutile: GaN (ZnO's structure, lines 1-2 % away) shares much of the scan's energy, so the uniform
    screen ranks it above rutile; weighted by the counts, GaN's lines that fall beside the peaks cost it, and the
    two phases present come first."""
    from mmmat.xrd.identify import _background, _fwhm_estimate, _net, _smooth, screen
    from mmmat.xrd.phases import add_crystals, crystal_from_structure

    add_crystals(tmp_path / "index", [crystal_from_structure(v, k) for k, v in _structures().items()])
    table = load_table(tmp_path / "index")
    pat = _scan(table, ["zno", "rutile"], [0.6, 0.4], [1.0, 1.0], counts=2e3, size_nm=20.0)
    tt, y = np.asarray(pat.two_theta, dtype=float), np.asarray(pat.intensity, dtype=float)
    fwhm = _fwhm_estimate(tt, _net(tt, y))
    smooth = _smooth(tt, y, fwhm)
    signal = np.clip(smooth - _background(tt, smooth), 0.0, None)
    rows = np.arange(len(table))
    top = {}
    for tag, variance in (("uniform", None), ("weighted", smooth)):
        score, scale = screen(table, rows, tt, signal, pat.wavelength, fwhm, variance=variance)
        assert score.shape == scale.shape == rows.shape and (score >= 0).all()
        top[tag] = [str(table.material_id[i]) for i in np.argsort(-score)[:2]]
    assert top["uniform"] == ["zno", "gan"]
    assert top["weighted"] == ["zno", "rutile"]


def test_other_first_phases_undo_a_superstructure_taken_first(tmp_path, monkeypatch):
    """Rock-salt NaCl at twice the edge of a simple-cubic crystal holds all its lines, and more: for a scan of the
    simple-cubic crystal and rutile without an element list, the greedy search takes NaCl first and never takes
    it back; grown from the other first phases too (FIRST_PHASE_STARTS), the lower BIC finds the simple cubic."""
    from pymatgen.core import Lattice, Structure

    import mmmat.xrd.identify as ident

    s = _structures()
    s["po"] = Structure(Lattice.cubic(2.82), ["Po"], [[0, 0, 0]])
    index = _cif_index(tmp_path, s, tuple(s))
    pat = _scan(load_table(index), ["rutile", "po"], [0.5, 0.5], [1.0, 1.0], counts=2e3, size_nm=20.0)
    monkeypatch.setattr(ident, "FIRST_PHASE_STARTS", 1)
    assert "nacl" in {p.material_id for p in identify(pat, index).phases}
    monkeypatch.setattr(ident, "FIRST_PHASE_STARTS", 4)
    found = {p.material_id for p in identify(pat, index).phases}
    assert "po" in found and "nacl" not in found
