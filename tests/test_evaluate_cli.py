import json
import math

import numpy as np
import pytest
from pymatgen.core import Lattice, Structure
from typer.testing import CliRunner

from data_pipelines.base import BuildOptions, Joins, RawRow, SourceData
from data_pipelines.build import build_shards
from mmmat.cli import app
from mmmat.evaluation.generation_stability import HullReference
from mmmat.evaluation.report import EvaluationInputError, evaluate_folder, read_generated

MALFORMED_CIF = "data_broken\n_cell_length_a 4.0\nloop_\n_atom_site_label\n_atom_site_fract_x\nNa1 0.0 0.0\n"


def rocksalt(a: str, b: str, lat: float) -> Structure:
    return Structure.from_spacegroup("Fm-3m", Lattice.cubic(lat), [a, b], [[0, 0, 0], [0.5, 0.5, 0.5]])


REFERENCE = {
    "train": {
        "ref-nacl": lambda: rocksalt("Na", "Cl", 5.64),
        "ref-mgo": lambda: rocksalt("Mg", "O", 4.21),
        "ref-kbr": lambda: rocksalt("K", "Br", 6.6),
        "ref-si": lambda: Structure.from_spacegroup("Fd-3m", Lattice.cubic(5.47), ["Si"], [[0, 0, 0]]),
    },
    "test": {
        "ref-cscl": lambda: Structure(Lattice.cubic(4.12), ["Cs", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]]),
        "ref-lif": lambda: rocksalt("Li", "F", 4.03),
    },
    "val": {
        "ref-zns": lambda: Structure.from_spacegroup(
            "F-43m", Lattice.cubic(5.41), ["Zn", "S"], [[0, 0, 0], [0.25, 0.25, 0.25]]
        ),
    },
}


def ref_structure(mid: str) -> Structure:
    return next(split[mid]() for split in REFERENCE.values() if mid in split)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "shards"
    splits = {
        name: [RawRow(mid, structure=make().as_dict()) for mid, make in rows.items()]
        for name, rows in REFERENCE.items()
    }
    opts = BuildOptions(xrd=False, image=False, describe=False)
    build_shards(SourceData("tiny", splits, Joins(), []), out, workers=1, shard_size=8, options=opts, progress=False)
    return out


def write_samples(folder, structures, manifest=None, malformed_at=None):
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i, s in enumerate(structures):
        name = f"sample_{i:05d}.cif"
        if i == malformed_at:
            (folder / name).write_text(MALFORMED_CIF)
        else:
            s.to(filename=str(folder / name))
        names.append(name)
    if manifest is not None:
        (folder / "manifest.json").write_text(json.dumps(manifest))
    return names


@pytest.fixture
def de_novo(tmp_path):
    """0 copy of a reference crystal, 1 CaO, 2 the same CaO shifted (duplicate), 3 two atoms 0.3 Å apart,
    4 charge-imbalanced NaCl2, 5 a malformed CIF."""
    cao = rocksalt("Ca", "O", 4.81)
    dup = cao.get_primitive_structure()
    dup.translate_sites(list(range(len(dup))), [0.1, 0.2, 0.3])
    close = Structure(Lattice.cubic(5.0), ["Na", "Cl"], [[0, 0, 0], [0.06, 0, 0]])
    nacl2 = Structure(Lattice.cubic(5.0), ["Na", "Cl", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0]])
    folder = tmp_path / "gen"
    write_samples(folder, [ref_structure("ref-nacl"), cao, dup, close, nacl2, None], malformed_at=5)
    return folder


def strict_json(path):
    def no_constant(name):
        raise AssertionError(f"non-standard JSON constant {name}")

    return json.loads(path.read_text(), parse_constant=no_constant)


# ------------------------------------------------------------------------------------------ reading
def test_read_generated_without_manifest(de_novo):
    structures, manifest = read_generated(de_novo)
    assert len(structures) == 6 and manifest["n"] == 6 and manifest["mode"] == "de_novo"
    assert [s is None for s in structures] == [False] * 5 + [True]
    assert manifest["read_failures"][0]["file"] == "sample_00005.cif"
    assert "malformed CIF" in manifest["read_failures"][0]["reason"]
    assert [e["file"] for e in manifest["samples"]][:2] == ["sample_00000.cif", "sample_00001.cif"]
    assert len(structures[0]) == 8 and structures[0].composition.reduced_formula == "NaCl"


def test_read_generated_extxyz_and_manifest_fallback(tmp_path):
    from ase.io import write
    from pymatgen.io.ase import AseAtomsAdaptor

    folder = tmp_path / "xyz"
    folder.mkdir()
    frames = [AseAtomsAdaptor.get_atoms(rocksalt(a, b, x)) for a, b, x in (("Mg", "O", 4.21), ("Li", "F", 4.03))]
    write(str(folder / "samples.extxyz"), frames, format="extxyz")
    structures, manifest = read_generated(folder)
    assert [s.composition.reduced_formula for s in structures] == ["MgO", "LiF"]
    # a manifest entry whose CIF is absent falls back to its frame of samples.extxyz; a bad index is a failure
    samples = [{"file": "sample_00000.cif", "index": 1, "target_id": "x"}, {"file": None, "index": 7}]
    (folder / "manifest.json").write_text(json.dumps({"mode": "csp", "n": 2, "samples": samples}))
    structures, manifest = read_generated(folder)
    assert structures[0].composition.reduced_formula == "LiF" and structures[1] is None
    assert manifest["mode"] == "csp" and manifest["samples"][0]["target_id"] == "x"
    assert "no frame 7" in manifest["read_failures"][0]["reason"]


def test_read_generated_errors(tmp_path):
    with pytest.raises(EvaluationInputError, match="not found"):
        read_generated(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(EvaluationInputError, match="no samples"):
        read_generated(tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "manifest.json").write_text("{not json")
    with pytest.raises(EvaluationInputError, match="JSON"):
        read_generated(tmp_path / "bad")


# ------------------------------------------------------------------------------------------ evaluation
def test_evaluate_folder_filters(de_novo, shards, tmp_path):
    out = tmp_path / "eval" / "report.json"
    order = ["validity", "coverage", "distribution", "uniqueness", "novelty"]
    rep = evaluate_folder(de_novo, shards, out, stages=order)
    st = {s["stage"]: s for s in rep["stages"]}
    assert [s["stage"] for s in rep["stages"]] == order
    assert (st["validity"]["n_in"], st["validity"]["n_out"]) == (6, 3)
    ps = rep["per_sample"]
    assert ps["struct_valid"] == [True, True, True, False, True, False]  # 0.3 Å pair, unreadable file
    assert ps["comp_valid"] == [True, True, True, True, False, False]  # NaCl2 is charge imbalanced
    assert rep["metrics"]["valid"] == pytest.approx(0.5)
    assert (st["uniqueness"]["n_in"], st["uniqueness"]["n_out"]) == (3, 2) and ps["unique"][2] is False
    assert (st["novelty"]["n_in"], st["novelty"]["n_out"]) == (2, 1) and ps["novel"][0] is False
    assert rep["metrics"]["unique_rate"] == pytest.approx(2 / 3) and rep["metrics"]["novel_rate"] == 0.5
    assert rep["survivors"] == [1]
    assert 0 <= rep["metrics"]["cov_recall"] <= 1 and math.isfinite(rep["metrics"]["wdist_density"])
    assert rep["settings"]["reference_split"] == "train" and rep["settings"]["n_reference"] == 4
    assert rep["settings"]["coverage_reference_split"] == "test" and rep["settings"]["n_coverage_reference"] == 2
    assert rep["settings"]["csp_tolerances"] == {"ltol": 0.3, "stol": 0.5, "angle_tol": 10.0}
    assert rep["read_failures"] == [
        {"index": 5, "file": "sample_00005.cif", "reason": rep["read_failures"][0]["reason"]}
    ]
    assert rep["csp"] is None and "csp_match_rate" not in rep["metrics"]
    # files: strict JSON without structures, markdown with the tables and linked plots
    on_disk = strict_json(out)
    assert "structures" not in on_disk and on_disk["per_sample"]["file"][5] == "sample_00005.cif"
    assert on_disk["stages"][0]["n_out"] == 3
    md = out.with_suffix(".md").read_text()
    assert "| validity | 6 | 3 |" in md and "| novel_rate | 0.5 |" in md and "sample_00005.cif" in md
    assert "angle_tol" in md
    assert set(rep["plots"]) == {"funnel", "density", "num_elements"}  # no stability stage: no e_hull plot
    for name in rep["plots"].values():
        assert (out.parent / name).stat().st_size > 1000 and f"]({name})" in md
        assert (out.parent / name).read_bytes()[:4] == b"\x89PNG"


def test_evaluate_folder_csp_manifest(shards, tmp_path):
    mgo = ref_structure("ref-mgo")
    mgo.perturb(0.05, min_distance=0.02)
    cscl_type_nacl = Structure(Lattice.cubic(3.3), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    gen = [
        ref_structure("ref-nacl"), mgo, cscl_type_nacl, ref_structure("ref-cscl"), rocksalt("Ca", "O", 4.8),
        ref_structure("ref-zns"),
    ]
    targets = ["ref-nacl", "ref-mgo", "ref-nacl", "ref-cscl", "not-in-shards", "ref-zns"]
    folder = tmp_path / "csp"
    names = write_samples(folder, gen)
    manifest = {
        "mode": "csp",
        "n": len(gen),
        "samples": [
            {"file": f, "index": i, "target_id": t, "composition": s.composition.reduced_formula, "condition": {}}
            for i, (f, t, s) in enumerate(zip(names, targets, gen))
        ],
        "generation": {"wall_s": 10.0, "gpu_s": 5.0, "device": "cuda:0", "structures_per_s": 0.5},
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    out = tmp_path / "csp_eval" / "r.json"
    rep = evaluate_folder(folder, shards, out, stages=["validity", "uniqueness"])
    m = rep["metrics"]
    assert rep["mode"] == "csp"
    assert m["csp_n"] == 5 and m["csp_match_rate"] == pytest.approx(0.8)  # test- and val-split targets too
    rms = rep["per_sample"]["csp_rms"]
    assert rms[0] == pytest.approx(0.0, abs=1e-6)  # the copy matches exactly
    assert 0 < rms[1] < 0.1 and rms[2] is None and rms[3] == pytest.approx(0.0, abs=1e-6) and rms[4] is None
    assert rms[5] == pytest.approx(0.0, abs=1e-6)
    assert m["csp_rmse"] == pytest.approx(np.mean([rms[0], rms[1], rms[3], rms[5]]))
    assert rep["csp"]["csp_targets_missing"] == ["not-in-shards"]
    # two samples name ref-nacl: the per-target (best of k) rate is reported as well
    assert rep["csp"]["csp_targets"] == 4 and rep["csp"]["csp_match_rate_per_target"] == 1.0
    gen_row = next(r for r in rep["cost"] if r["step"] == "generation")
    assert gen_row["s_per_sample"] == pytest.approx(10 / 6) and gen_row["gpu_s_per_sample"] == pytest.approx(5 / 6)
    assert gen_row["device"] == "cuda:0" and rep["generation"]["structures_per_s"] == 0.5
    md = out.with_suffix(".md").read_text()
    assert "| generation | - | 6 | 10 |" in md and "Crystal structure prediction" in md
    assert (out.parent / "r_funnel.png").exists()


# ------------------------------------------------------------------------------------------ CLI
def test_cli_evaluate(de_novo, shards, tmp_path):
    out = tmp_path / "cli" / "report.json"
    res = CliRunner().invoke(
        app,
        ["evaluate", "--generated", str(de_novo), "--reference", str(shards), "--out", str(out),
         "--stages", "validity,uniqueness,novelty", "--workers", "1"],
    )
    assert res.exit_code == 0, res.output
    assert "validity" in res.output and "novel_rate 0.5" in res.output
    rep = strict_json(out)
    assert [(s["stage"], s["n_in"], s["n_out"]) for s in rep["stages"]] == [
        ("validity", 6, 3), ("uniqueness", 3, 2), ("novelty", 2, 1)
    ]
    assert out.with_suffix(".md").exists() and (out.parent / "report_funnel.png").exists()


def test_cli_evaluate_errors(de_novo, shards, tmp_path):
    runner = CliRunner()

    def run(generated, reference, *extra):
        args = ["evaluate", "--generated", str(generated), "--reference", str(reference),
                "--out", str(tmp_path / "x" / "report.json"), *extra]
        return runner.invoke(app, args)

    res = run(tmp_path / "missing", shards)
    assert res.exit_code == 2 and "generated folder" in res.output and "not found" in res.output
    (tmp_path / "empty").mkdir()
    res = run(tmp_path / "empty", shards)
    assert res.exit_code == 2 and "no samples" in res.output
    res = run(de_novo, tmp_path / "no-shards")
    assert res.exit_code == 2 and "reference shard folder" in res.output
    (tmp_path / "not-shards").mkdir()
    res = run(de_novo, tmp_path / "not-shards")
    assert res.exit_code == 2 and "holds no shards" in res.output
    res = run(de_novo, shards, "--stages", "validity,bogus")
    assert res.exit_code == 2 and "unknown stages bogus" in res.output
    res = run(de_novo, shards, "--stages", "stability", "--hull", str(tmp_path / "nohull.json"))
    assert res.exit_code == 2 and "hull file" in res.output
    assert not (tmp_path / "x" / "report.json").exists()


def test_cli_evaluate_stability_small(shards, tmp_path):
    """CHGNet on one 8-atom NaCl cell, 3 relaxation steps, against a hull read from a file."""
    folder = tmp_path / "gen"
    close = Structure(Lattice.cubic(5.0), ["Na", "Cl"], [[0, 0, 0], [0.06, 0, 0]])
    write_samples(folder, [ref_structure("ref-nacl"), close])
    hull = HullReference(["Na", "Cl"], np.array([-1.3, -1.8]), ["na", "cl"]).save(tmp_path / "hull.json")
    out = tmp_path / "st" / "report.json"
    res = CliRunner().invoke(
        app,
        ["evaluate", "--generated", str(folder), "--reference", str(shards), "--out", str(out),
         "--stages", "validity,stability", "--hull", str(hull), "--relax-steps", "3", "--device", "cpu"],
    )
    assert res.exit_code == 0, res.output
    rep = strict_json(out)
    st = rep["stages"][1]
    assert st["stage"] == "stability" and st["n_in"] == 1 and st["device"] == "cpu"
    eh = rep["per_sample"]["e_above_hull"]
    assert eh[1] is None and eh[0] < 0  # NaCl lies far below Na + Cl at these end-point energies
    assert rep["metrics"]["stable_rate"] == 1.0 and rep["settings"]["relax_steps"] == 3
    assert "e_hull" in rep["plots"] and (out.parent / rep["plots"]["e_hull"]).exists()
    assert any(r["step"] == "hull reference" for r in rep["cost"])


def test_a_sample_without_structure_stays_a_failure(tmp_path):
    from pymatgen.core import Lattice, Structure

    from mmmat.evaluation.report import read_generated
    from mmmat.generative.api import write_samples

    nacl = Structure(Lattice.cubic(5.6), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    cu = Structure(Lattice.cubic(3.6), ["Cu"], [[0, 0, 0]])
    kbr = Structure(Lattice.cubic(6.6), ["K", "Br"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    d = write_samples([nacl, None, cu, kbr], tmp_path / "g", {"mode": "de_novo"})
    for cif in d.glob("*.cif"):  # force the extxyz path
        cif.unlink()
    structs, manifest = read_generated(d)
    assert [None if s is None else s.composition.reduced_formula for s in structs] == ["NaCl", None, "Cu", "KBr"]
    assert [f["index"] for f in manifest["read_failures"]] == [1]


def test_cli_prepare_then_evaluate_reuses_the_cache(de_novo, shards, tmp_path):
    """`mmmat evaluate prepare` caches the coverage fingerprints under a hash of their inputs; evaluate reuses it."""
    cache = tmp_path / "cache"
    res = CliRunner().invoke(app, ["evaluate", "prepare", "--reference", str(shards), "--out", str(cache),
                                   "--no-hull", "--workers", "1"])
    assert res.exit_code == 0, res.output
    (fp,) = cache.glob("coverage_fps_test_*.npz")
    with np.load(fp) as z:
        assert sorted(z["ids"]) == ["ref-cscl", "ref-lif"] and z["struct"].shape == (2, 61)
    mtime = fp.stat().st_mtime_ns
    out = tmp_path / "ev" / "report.json"
    res = CliRunner().invoke(app, ["evaluate", "--generated", str(de_novo), "--reference", str(shards), "--out",
                                   str(out), "--stages", "validity,coverage,novelty", "--cache-dir", str(cache),
                                   "--novelty-reference", "train+val", "--workers", "1"])
    assert res.exit_code == 0, res.output
    rep = strict_json(out)
    assert fp.stat().st_mtime_ns == mtime  # read, not recomputed
    st = rep["settings"]
    assert st["novelty_reference"] == "train+val" and st["novelty_reference_splits"] == ["train", "val"]
    assert st["n_reference"] == 5 and "CDVAE" in st["coverage_convention"]
    assert rep["metrics"]["n_fingerprinted"] == 5  # every readable sample, the invalid ones included
    res = CliRunner().invoke(app, ["evaluate", "--generated", str(de_novo), "--reference", str(shards), "--out",
                                   str(out), "--novelty-reference", "bogus"])
    assert res.exit_code == 2 and "novelty-reference" in res.output
    res = CliRunner().invoke(app, ["evaluate", "--reference", str(shards)])
    assert res.exit_code == 2 and "--generated" in res.output
