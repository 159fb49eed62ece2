import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from typer.testing import CliRunner

from data_pipelines.base import BuildOptions, get_source
from data_pipelines.build import build_shards
from mmmat.cli import app
from mmmat.data.loader import load_records, split_shards
from mmmat.data.xrd import TWO_THETA
from mmmat.latent.model import MultimodalModel
from mmmat.retrieval import (
    DuplicateIdError,
    EmbeddingIndex,
    RetrievalError,
    default_nlist,
    embed_query,
    load_image,
    load_model,
    model_fingerprint,
    search,
)

faiss = pytest.importorskip("faiss")

TINY = Path(__file__).resolve().parents[1] / "configs" / "pretrain" / "tiny.yaml"


def _tiny_model(seed):
    torch.manual_seed(seed)
    enc = yaml.safe_load(TINY.read_text())["model"]["init_args"]["encoders"]
    return MultimodalModel(enc, embed_dim=32)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Builtin shards (20 per split), a random tiny model, another one, and a CLI-built index."""
    root = tmp_path_factory.mktemp("retrieval")
    shards = root / "shards"
    build_shards(get_source("builtin")(None, limit=20), shards, progress=False, options=BuildOptions(describe=True))
    model_dir = _tiny_model(0).save_pretrained(root / "model")
    other_dir = _tiny_model(1).save_pretrained(root / "other_model")
    index_dir = root / "index"
    r = CliRunner().invoke(app, ["index", "build", "--model", str(model_dir), "--shards", str(shards),
                                 "--out", str(index_dir)])
    assert r.exit_code == 0, r.output
    assert "60 crystals indexed (exact" in r.output
    records = {rec.material_id: rec for s in ("train", "val", "test") for rec in load_records(split_shards(shards, s))}
    return {"root": root, "shards": shards, "model": model_dir, "other": other_dir, "index": index_dir,
            "records": records}


def _unit(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _clustered(rng, n, d, centres, noise):
    c = _unit(rng, centres, d)
    x = c[rng.integers(0, centres, n)] + noise * rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _ids(n, start=0):
    return [f"m-{i}" for i in range(start, start + n)]


# ---------------------------------------------------------------------- EmbeddingIndex
def test_exact_search_returns_each_indexed_vector_first():
    rng = np.random.default_rng(0)
    x = _unit(rng, 500, 32)
    idx = EmbeddingIndex.build(x * 3.0, _ids(500))  # any length: normalised inside
    assert idx.kind == "exact" and len(idx) == 500 and idx.dim == 32 and idx.nprobe is None
    scores, rows = idx.search_batch(x, k=5)
    assert scores.shape == rows.shape == (500, 5)
    np.testing.assert_array_equal(rows[:, 0], np.arange(500))
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)
    assert (np.diff(scores, axis=1) <= 1e-6).all()  # best first
    hits = idx.search(x[7], k=3)
    assert [h.rank for h in hits] == [1, 2, 3] and hits[0].material_id == "m-7"
    assert hits[0].score == pytest.approx(1.0, abs=1e-5)
    frame = idx.search_frame(x[:2], k=2)
    assert list(frame["material_id"][frame["rank"] == 1]) == ["m-0", "m-1"]
    # k larger than the index: only what exists comes back
    assert len(idx.search(x[0], k=600)) == 500


def test_ivf_recall_against_exact_on_clustered_data():
    rng = np.random.default_rng(1)
    x = _clustered(rng, 20_000, 64, centres=400, noise=0.08)
    q = x[rng.choice(20_000, 300, replace=False)] + 0.02 * rng.standard_normal((300, 64)).astype(np.float32)
    exact = EmbeddingIndex.build(x, _ids(20_000), kind="exact")
    ivf = EmbeddingIndex.build(x, _ids(20_000), approx_threshold=10_000, nprobe=8)  # auto -> ivf
    assert ivf.kind == "ivf" and ivf.nlist == default_nlist(20_000) == 512 and ivf.nprobe == 8
    assert ivf.info["build"]["train_size"] == 20_000  # 40 per list > N: the whole set
    _, truth = exact.search_batch(q, 10)
    _, got = ivf.search_batch(q, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(truth, got, strict=True)])
    assert recall >= 0.95, recall
    ivf.nprobe = 1
    _, got1 = ivf.search_batch(q, 10)
    recall1 = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(truth, got1, strict=True)])
    assert recall1 <= recall  # fewer probes, no better


def test_default_nlist():
    assert default_nlist(1_000_000) == 4096
    assert default_nlist(200_000) == 2048
    assert default_nlist(1000) == 25  # capped at n / 39
    assert default_nlist(10) == 1


def test_add_without_rebuild_and_duplicates():
    rng = np.random.default_rng(2)
    x = _clustered(rng, 6000, 32, centres=100, noise=0.1)
    idx = EmbeddingIndex.build(x[:4000], _ids(4000), kind="ivf", nlist=32, nprobe=32)
    ivf = faiss.extract_index_ivf(idx.index)
    centroids = ivf.quantizer.reconstruct_n(0, ivf.nlist).copy()
    meta = pd.DataFrame({"material_id": _ids(2000, 4000), "formula": ["NaCl"] * 2000,
                         "spacegroup_number": [225] * 2000, "band_gap": 1.5})
    assert idx.add(x[4000:], meta) == 2000
    assert len(idx) == 6000 and "m-5999" in idx
    np.testing.assert_array_equal(ivf.quantizer.reconstruct_n(0, ivf.nlist), centroids)  # same lists
    scores, rows = idx.search_batch(x[4000:4100], 1)
    np.testing.assert_array_equal(rows[:, 0], np.arange(4000, 4100))
    hit = idx.search(x[4500], 1)[0]
    assert (hit.material_id, hit.formula, hit.spacegroup) == ("m-4500", "NaCl", "Fm-3m (225)")
    assert np.isnan(idx.meta["band_gap"][0]) and idx.meta["band_gap"][4500] == 1.5
    # duplicates: refused with their ids, or skipped and counted
    with pytest.raises(DuplicateIdError, match="'m-10'"):
        idx.add(x[10:12], ["m-10", "m-new"])
    assert len(idx) == 6000
    new = np.concatenate([x[10:11], _unit(rng, 1, 32)])
    assert idx.add(new, ["m-10", "m-new"], skip_duplicates=True) == 1
    assert len(idx) == 6001 and idx.search(new[1], 1)[0].material_id == "m-new"
    with pytest.raises(DuplicateIdError):
        EmbeddingIndex.build(x[:3], ["a", "b", "a"])
    with pytest.raises(RetrievalError, match="dimension"):
        idx.add(np.ones((1, 8)), ["z"])
    with pytest.raises(RetrievalError, match="all zeros"):
        idx.add(np.zeros((1, 32)), ["z"])
    # an exact index grows the same way
    flat = EmbeddingIndex.build(x[:10], _ids(10))
    assert flat.add(x[10:20], _ids(10, 10)) == 10
    assert flat.search(x[15], 1)[0].material_id == "m-15"


def test_save_load_round_trip(tmp_path):
    rng = np.random.default_rng(3)
    x = _clustered(rng, 3000, 16, centres=50, noise=0.1)
    meta = pd.DataFrame({"material_id": _ids(3000), "formula": "Si", "spacegroup_number": 227, "split": "test",
                         "energy": np.arange(3000.0)})
    idx = EmbeddingIndex.build(x, meta, kind="ivf", nlist=16, nprobe=4, info={"modality": "crystal"})
    before = idx.search_batch(x[:50], 5)
    idx.save(tmp_path / "idx")
    assert {p.name for p in (tmp_path / "idx").iterdir()} == {"index.faiss", "meta.parquet", "index.json"}
    doc = json.loads((tmp_path / "idx" / "index.json").read_text())
    assert (doc["kind"], doc["dim"], doc["count"], doc["nlist"], doc["nprobe"]) == ("ivf", 16, 3000, 16, 4)
    assert doc["modality"] == "crystal"
    back = EmbeddingIndex.load(tmp_path / "idx")
    assert back.kind == "ivf" and back.nprobe == 4 and back.info["modality"] == "crystal"
    after = back.search_batch(x[:50], 5)
    np.testing.assert_array_equal(before[1], after[1])
    np.testing.assert_allclose(before[0], after[0], rtol=1e-6)
    pd.testing.assert_frame_equal(back.meta, idx.meta)
    assert back.search(x[0], 1)[0].spacegroup == "Fd-3m (227)"
    assert EmbeddingIndex.load(tmp_path / "idx", nprobe=16).nprobe == 16
    # added rows survive a second round trip
    back.add(x[:1] * -1, ["extra"])
    back.save(tmp_path / "idx")
    assert len(EmbeddingIndex.load(tmp_path / "idx")) == 3001
    with pytest.raises(FileNotFoundError, match="not found"):
        EmbeddingIndex.load(tmp_path / "nothing")
    (tmp_path / "idx" / "meta.parquet").unlink()
    with pytest.raises(FileNotFoundError, match="meta.parquet"):
        EmbeddingIndex.load(tmp_path / "idx")


# ---------------------------------------------------------------------- the model side
def _distinct_material(env):
    """An indexed material whose embedding is clearly apart from every other one (random model)."""
    idx = EmbeddingIndex.load(env["index"])
    vecs = np.stack([idx.index.reconstruct(i) for i in range(len(idx))])
    scores, _ = idx.search_batch(vecs, 2)
    best = int(np.argmax(scores[:, 0] - scores[:, 1]))
    assert scores[best, 0] - scores[best, 1] > 1e-3
    return idx.meta["material_id"][best]


def test_index_records_model_and_table(env):
    idx = EmbeddingIndex.load(env["index"])
    assert len(idx) == 60 and idx.kind == "exact" and idx.dim == 32
    assert idx.info["model_fingerprint"] == model_fingerprint(env["model"])
    assert idx.info["model_path"] == str(Path(env["model"]).resolve()) and idx.info["modality"] == "crystal"
    assert set(idx.meta["split"]) == {"train", "val", "test"}
    row = idx.meta.set_index("material_id").loc["aflow-AB2_tI6_139_a_e"]
    assert (row["formula"], row["spacegroup_number"], row["spacegroup_symbol"]) == ("Si2Mo", 139, "I4/mmm")
    assert "density" in idx.meta.columns


def test_cli_search_cif_finds_the_material_itself(env, tmp_path):
    mid = _distinct_material(env)
    cif = tmp_path / "query.cif"
    cif.write_text(env["records"][mid].to_cif())
    out = tmp_path / "hits.csv"
    # no --model: the index's recorded model is used
    r = CliRunner().invoke(app, ["search", "--index", str(env["index"]), "--cif", str(cif), "-k", "5",
                                 "--csv", str(out)])
    assert r.exit_code == 0, r.output
    assert mid in r.output and "space group" in r.output
    hits = pd.read_csv(out)
    assert len(hits) == 5 and hits["material_id"][0] == mid and list(hits["rank"]) == [1, 2, 3, 4, 5]
    assert hits["score"][0] == pytest.approx(1.0, abs=1e-4) and hits["score"].is_monotonic_decreasing
    # the Python API agrees
    api_hits = search(env["index"], env["model"], cif=cif, k=5)
    assert [h.material_id for h in api_hits] == list(hits["material_id"])


def test_cli_search_xrd_two_column_file(env, tmp_path):
    rec = next(r for r in env["records"].values() if r.xrd is not None)
    path = tmp_path / "pattern.xy"
    rows = "\n".join(f"{t:.3f} {100 + 5000 * y:.2f}" for t, y in zip(TWO_THETA[::2], rec.xrd[::2], strict=True))
    path.write_text("# 2theta intensity\n" + rows + "\n")
    r = CliRunner().invoke(app, ["search", "--index", str(env["index"]), "--model", str(env["model"]),
                                 "--xrd", str(path), "-k", "3", "--csv", str(tmp_path / "x.csv")])
    assert r.exit_code == 0, r.output
    hits = pd.read_csv(tmp_path / "x.csv")
    assert len(hits) == 3 and set(hits["material_id"]) <= set(env["records"])
    assert (hits["score"].abs() <= 1.0 + 1e-5).all()
    # the profile put on the grid is the record's own (up to interpolation of every other point)
    model = load_model(env["model"])
    _, q = embed_query(model, xrd=path)
    _, q_ref = embed_query(model, xrd=path, wavelength=1.54184)
    np.testing.assert_allclose(q, q_ref, atol=1e-6)
    assert q.shape == (32,) and np.linalg.norm(q) == pytest.approx(1.0, abs=1e-5)


def test_image_and_text_queries(env, tmp_path):
    from PIL import Image

    rec = next(r for r in env["records"].values() if r.image is not None)
    png = tmp_path / "img.png"
    Image.fromarray(rec.image).save(png)
    hits = search(env["index"], cif=None, image=png, k=4)
    assert len(hits) == 4
    # a 16-bit TIFF at another size becomes the same-sized 8-bit image
    big = np.kron(rec.image.astype(np.uint16) * 200, np.ones((2, 2), np.uint16))
    tif = tmp_path / "img.tif"
    Image.fromarray(big).save(tif)
    arr = load_image(tif, 64)
    assert arr.shape == (64, 64) and arr.dtype == np.uint8 and arr.max() > 200
    assert np.corrcoef(arr.ravel(), rec.image.ravel())[0, 1] > 0.99
    np.save(tmp_path / "img.npy", np.stack([rec.image] * 3, axis=-1))  # colour, channels last
    np.testing.assert_array_equal(load_image(tmp_path / "img.npy", 64), rec.image)
    assert len(search(env["index"], image=tif, k=2)) == 2
    r = CliRunner().invoke(app, ["search", "--index", str(env["index"]), "--text", "a cubic perovskite oxide",
                                 "-k", "3"])
    assert r.exit_code == 0, r.output
    assert "rank" in r.output and "score" in r.output


def test_cli_embed_and_index_add(env, tmp_path):
    out = tmp_path / "emb.parquet"
    r = CliRunner().invoke(app, ["embed", "--model", str(env["model"]), "--shards", str(env["shards"]),
                                 "--out", str(out), "--modality", "xrd", "--split", "test"])
    assert r.exit_code == 0, r.output
    table = pd.read_parquet(out)
    assert len(table) == 20 and set(table["split"]) == {"test"} and len(table["embedding"][0]) == 32
    assert np.linalg.norm(np.asarray(table["embedding"][0])) == pytest.approx(1.0, abs=1e-5)

    idx_dir = tmp_path / "idx"
    r = CliRunner().invoke(app, ["index", "build", "--model", str(env["model"]), "--shards", str(env["shards"]),
                                 "--out", str(idx_dir), "--split", "train", "--approx"])
    assert r.exit_code == 0, r.output
    idx = EmbeddingIndex.load(idx_dir)
    assert len(idx) == 20 and idx.kind == "ivf"
    add = ["index", "add", "--index", str(idx_dir), "--model", str(env["model"]), "--shards", str(env["shards"])]
    r = CliRunner().invoke(app, [*add, "--split", "val,test"])
    assert r.exit_code == 0, r.output
    assert "40 crystals added" in r.output
    idx2 = EmbeddingIndex.load(idx_dir)
    assert len(idx2) == 60 and set(idx2.meta["split"]) == {"train", "val", "test"}
    # the trained lists are kept
    c1 = faiss.extract_index_ivf(idx.index).quantizer.reconstruct_n(0, idx.nlist)
    np.testing.assert_array_equal(c1, faiss.extract_index_ivf(idx2.index).quantizer.reconstruct_n(0, idx2.nlist))
    r = CliRunner().invoke(app, [*add, "--split", "test"])
    assert r.exit_code == 2 and "already in the index" in r.output
    r = CliRunner().invoke(app, [*add, "--split", "test", "--skip-duplicates"])
    assert r.exit_code == 0 and "0 crystals added, 20 already indexed" in r.output
    # a user's CIF: embedded with the index's model, and a peak table beside those of the shards' crystals
    from pymatgen.core import Lattice, Structure

    cif = tmp_path / "user_nacl.cif"
    cif.write_text(Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.64), ["Na", "Cl"],
                                             [[0, 0, 0], [0.5, 0.5, 0.5]]).to(fmt="cif"))
    r = CliRunner().invoke(app, ["index", "add", "--index", str(idx_dir), "--cif", str(cif)])
    assert r.exit_code == 0, r.output
    assert "1 crystals embedded" in r.output and "1 crystals added" in r.output
    from mmmat.xrd.phases import PhaseTable

    assert len(EmbeddingIndex.load(idx_dir)) == 61 and len(PhaseTable.load(idx_dir)) == 61


def _bad(args, *needles):
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 2, r.output
    for n in needles:
        assert n in r.output, r.output
    return r


def test_bad_inputs_give_clear_errors(env, tmp_path):
    base = ["search", "--index", str(env["index"]), "--model", str(env["model"])]
    bad_cif = tmp_path / "bad.cif"
    bad_cif.write_text("data_x\n_cell_length_a 3\nloop_\n_atom_site_label\nthis is not a structure\n")
    _bad([*base, "--cif", str(bad_cif)], "malformed CIF", "bad.cif")
    one_col = tmp_path / "one.xy"
    one_col.write_text("\n".join(str(10 + 0.1 * i) for i in range(50)))
    _bad([*base, "--xrd", str(one_col)], "two numeric columns", "one.xy")
    _bad([*base, "--text", "   "], "empty text")
    _bad([*base, "--text", "a recipe", "--text-modality", "processing_text"], "no 'processing_text' encoder")
    _bad(["search", "--index", str(env["index"]), "--model", str(tmp_path / "nomodel"), "--text", "x"],
         "model directory", "not found")
    _bad(["search", "--index", str(env["index"]), "--model", str(env["other"]), "--text", "x"],
         "built with another model")
    _bad(["search", "--index", str(tmp_path / "noindex"), "--text", "x"], "index directory", "not found")
    _bad([*base], "exactly one query")
    _bad([*base, "--text", "x", "--cif", str(bad_cif)], "exactly one query")
    _bad([*base, "--cif", str(tmp_path / "missing.cif")], "CIF file", "not found")
    _bad(["index", "build", "--model", str(env["model"]), "--shards", str(tmp_path / "noshards"),
          "--out", str(tmp_path / "i")], "shard directory", "not found")
    _bad(["index", "add", "--index", str(env["index"]), "--model", str(env["other"]),
          "--shards", str(env["shards"])], "built with another model")
    _bad(["embed", "--model", str(env["model"]), "--shards", str(env["shards"]), "--out", str(tmp_path / "e"),
          "--modality", "processing_text"], "no 'processing_text' encoder")
    # the Python API raises the same errors
    with pytest.raises(RetrievalError, match="empty text"):
        search(env["index"], env["model"], text="")
