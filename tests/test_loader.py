import collections
import io
import math
import tarfile

import numpy as np
import pytest
import torch

from data_pipelines.base import BuildOptions, get_source
from data_pipelines.build import build_shards
from mmmat.data import loader as L
from mmmat.data.batch import ByteTokenizer, Collator
from mmmat.data.graph import radius_graph_pbc


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    src = get_source("builtin")(None, limit=48)
    build_shards(src, out, workers=2, shard_size=6, progress=False, options=BuildOptions(describe=False))
    return out


def _keys(loader):
    return [mid for b in loader for mid in b.material_ids]


def test_collate_builds_a_multimodal_batch(shard_dir):
    recs = L.load_records(L.split_shards(shard_dir, "train"))[:8]
    recs[1].xrd = None
    recs[2].image = None
    coll = Collator(property_names=["density", "missing_col"], cutoff=4.0, include_generated_text=True)
    b = coll(recs)
    assert len(b) == 8
    n = sum(r.num_atoms for r in recs)
    assert b.crystal.z.shape == (n,) and b.crystal.lattice.shape == (8, 3, 3)
    assert b.crystal.num_graphs == 8
    xrd = b.inputs["xrd"]["profile"]
    assert xrd.shape == (8, 1701) and b.image.shape == (8, 1, 64, 64) and b.image.dtype == torch.uint8
    assert b.present["xrd"].tolist() == [True, False] + [True] * 6
    assert b.present["image"].tolist() == [True, True, False] + [True] * 5
    assert float(xrd[1].abs().sum()) == 0.0 and int(b.image[2].sum()) == 0
    assert b.present["processing_text"].sum() == 0 and b.present["literature_text"].all()
    text = b.inputs["literature_text"]
    assert text["ids"].shape[0] == 8 and (text["mask"].sum(1) > 2).all()
    assert torch.isnan(b.properties[:, 1]).all()
    assert torch.allclose(b.properties[:, 0], torch.tensor([r.properties["density"] for r in recs]))
    # graph = radius_graph_pbc on the same crystals; distances follow from the offsets
    ei, off, d = radius_graph_pbc(b.crystal.pos, b.crystal.lattice, b.crystal.batch, 4.0)
    assert torch.equal(ei, b.crystal.edge_index) and torch.allclose(d, b.crystal.edge_dist)
    j, i = b.crystal.edge_index
    vec = b.crystal.pos[j] + torch.einsum("ek,ekl->el", off.float(), b.crystal.lattice[b.crystal.batch[j]]) \
        - b.crystal.pos[i]
    assert torch.allclose(vec.norm(dim=1), b.crystal.edge_dist, atol=1e-4)
    assert (b.crystal.edge_dist < 4.0).all() and (b.crystal.edge_dist > 0).all()
    # generated texts are not literature unless asked
    b2 = Collator(property_names=[], include_generated_text=False)(recs)
    assert not b2.present["literature_text"].any()
    # batches move to a device as one object
    b3 = b.to("cpu")
    assert b3.crystal.edge_index.shape == b.crystal.edge_index.shape


def test_byte_tokenizer_clips_huge_text():
    out = ByteTokenizer()(["x" * 100_000, "ab"], max_length=64)
    assert out["input_ids"].shape == (2, 64)
    assert out["attention_mask"][1].sum() == 4


def test_stream_loader_equal_batches_per_worker_and_covers_data(shard_dir):
    urls = L.split_shards(shard_dir, "train")
    n = sum(1 for _ in L.load_records(urls))
    coll = Collator(property_names=["density"], cutoff=4.0)
    loader = L.shard_loader(urls, coll, batch_size=4, num_samples=n, num_workers=2, seed=1)
    ids = _keys(loader)
    assert len(ids) == loader.num_batches * 4 and loader.num_batches % 2 == 0
    assert len(set(ids)) >= 0.75 * n  # one epoch sees (nearly) everything, without repeats beyond the wrap
    # deterministic for the same epoch, different for another epoch
    again = L.shard_loader(urls, coll, batch_size=4, num_samples=n, num_workers=2, seed=1)
    assert _keys(again) == ids
    again.epoch.set_value(1)
    assert _keys(again) != ids


def test_split_by_node_gives_disjoint_equal_streams(shard_dir, monkeypatch):
    urls = L.split_shards(shard_dir, "train")
    n = sum(1 for _ in L.load_records(urls))
    coll = Collator(property_names=[], cutoff=4.0)
    seen = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        pipe = L.shard_pipeline(urls, coll, batch_size=3, num_samples=n, num_workers=0, shuffle=False)
        seen.append([mid for b in pipe for mid in b.material_ids])
    assert len(seen[0]) == len(seen[1]) == math.floor(n / 6) * 3
    assert not set(seen[0][: 6]) & set(seen[1][: 6])  # first pass: different shards per rank


def test_too_few_shards_for_workers_is_a_clear_error(shard_dir):
    urls = L.split_shards(shard_dir, "val")[:1]
    with pytest.raises(ValueError, match="shards < .* workers"):
        L.shard_pipeline(urls, Collator(), batch_size=2, num_samples=10, num_workers=4)
    with pytest.raises(ValueError, match="1 shards < 2 ranks"):  # evaluation: every rank reads a shard
        L.shard_pipeline(urls, Collator(), batch_size=2, num_samples=10, world_size=2, repeat=False)


def test_truncated_shard_and_corrupt_sample_are_skipped_and_counted(shard_dir, tmp_path):
    urls = L.split_shards(shard_dir, "train")
    good = L.load_records(urls[:2])
    # a truncated copy of shard 0, and a copy of shard 1 with one corrupt meta.json
    data = open(urls[0], "rb").read()
    trunc = tmp_path / "trunc.tar"
    trunc.write_bytes(data[: int(len(data) * 0.6)])
    corrupt = tmp_path / "corrupt.tar"
    with tarfile.open(urls[1]) as src, tarfile.open(corrupt, "w") as dst:
        first = True
        for m in src.getmembers():
            payload = src.extractfile(m).read()
            if first and m.name.endswith("meta.json"):
                payload, first = b"{not json", False
                m.size = len(payload)
            dst.addfile(m, io.BytesIO(payload))
    before = L.skipped_count()
    recs = L.load_records([str(trunc), str(corrupt)])
    assert L.skipped_count() - before >= 2
    n1 = sum(1 for r in good if r.material_id in {x.material_id for x in L.load_records([urls[1]])})
    got = {r.material_id for r in recs}
    assert len([r for r in recs if r.material_id in {x.material_id for x in L.load_records([urls[1]])}]) == n1 - 1
    assert 0 < len(got) < len(good)
    # streaming does not throw either
    coll = Collator(property_names=[], cutoff=4.0)
    pipe = L.shard_pipeline([str(trunc), str(corrupt)], coll, batch_size=2, num_samples=6, num_workers=0,
                            repeat=False)
    batches = list(pipe)
    assert sum(len(b) for b in batches) == len(recs)
    assert batches[-1].skipped >= 2


def test_memory_loader(shard_dir):
    recs = L.load_records(L.split_shards(shard_dir, "train"))
    loader = L.memory_loader(recs, Collator(property_names=["density"], cutoff=4.0), batch_size=5, num_workers=0)
    ids = _keys(loader)
    assert len(ids) == (len(recs) // 5) * 5 and len(set(ids)) == len(ids)


def test_expand_shards(shard_dir, tmp_path):
    all_ = L.expand_shards(shard_dir)
    assert len(all_) == len(L.split_shards(shard_dir, "train")) + len(L.split_shards(shard_dir, "val")) + len(
        L.split_shards(shard_dir, "test"))
    pat = str(shard_dir / "train" / "shard-{000000..000001}.tar")
    assert len(L.expand_shards(pat)) == 2
    with pytest.raises(FileNotFoundError):
        L.expand_shards(str(tmp_path / "nothing*.tar"))


def test_datamodule(shard_dir):
    from mmmat.tasks.datamodule import MultimodalDataModule

    dm = MultimodalDataModule(str(shard_dir), batch_size=4, num_workers=0, mode="memory", cutoff=4.0)
    b = next(iter(dm.train_dataloader()))
    assert b.properties.shape == (4, 3)
    dm2 = MultimodalDataModule(str(shard_dir), batch_size=4, num_workers=0, mode="stream", cutoff=4.0)
    n_val = sum(len(b) for b in dm2.val_dataloader())
    assert n_val == dm2.num_samples("val")
    with pytest.raises(ValueError, match="not in .*manifest"):
        MultimodalDataModule(str(shard_dir), properties=["nope"])
    assert np.isfinite(b.inputs["xrd"]["profile"].numpy()).all()


def test_batch_pickles_compactly_and_exactly(shard_dir):
    import pickle

    recs = L.load_records(L.split_shards(shard_dir, "train"))[:6]
    b = Collator(property_names=["density", "nope"], cutoff=4.0, include_generated_text=True)(recs)
    back = pickle.loads(pickle.dumps(b))
    assert back.material_ids == b.material_ids and back.crystal.num_graphs == 6
    for name in ("z", "pos", "lattice", "batch", "ptr", "edge_index", "cell_offset", "edge_dist"):
        x, y = getattr(b.crystal, name), getattr(back.crystal, name)
        assert x.dtype == y.dtype and torch.equal(x, y), name
    for name, key in (("xrd", "profile"), ("xrd", "peaks"), ("xrd", "peak_mask"), ("image", None),
                      ("literature_text", "ids"), ("literature_text", "mask")):
        x, y = b.inputs[name], back.inputs[name]
        x, y = (x, y) if key is None else (x[key], y[key])
        assert x.dtype == y.dtype and torch.equal(x, y), (name, key)
    assert set(back.inputs) == set(b.inputs)
    assert torch.allclose(b.properties, back.properties, equal_nan=True)
    assert all(torch.equal(b.present[k], back.present[k]) for k in b.present)


_Pair = collections.namedtuple("_Pair", "a b")


def test_batch_handles_any_input_nesting_without_naming_modalities():
    """to / pickling walk dicts, lists, named tuples and graph batches of any input; batch.<name> reads inputs."""
    import pickle

    from mmmat.data.batch import MultimodalBatch, crystal_batch, map_tensors

    pair = _Pair
    crystal = crystal_batch(torch.tensor([11, 17]), torch.rand(2, 3), torch.eye(3)[None] * 4.0,
                            torch.tensor([2]), cutoff=3.0)
    other = {"x": torch.arange(6, dtype=torch.int64).reshape(2, 3) * 1000, "parts": [torch.ones(2, 1), pair(
        torch.zeros(2, dtype=torch.bool), torch.full((2, 2), 0.5, dtype=torch.float16))], "note": "kept"}
    b = MultimodalBatch(["a", "b"], torch.zeros(2, 0), [], present={"other": torch.tensor([True, False])},
                        inputs={"crystal": crystal, "other": other})
    assert b.other is other and b.crystal is crystal
    with pytest.raises(AttributeError, match="assign batch.inputs"):
        b.other = {}
    with pytest.raises(AttributeError, match="no attribute or input 'image'"):
        _ = b.image
    assert getattr(b, "image", None) is None
    moved = b.to("cpu")
    assert moved.inputs["other"]["parts"][1].b.dtype == torch.float16 and moved.inputs["other"]["note"] == "kept"
    back = pickle.loads(pickle.dumps(b))
    flat = []
    map_tensors(b.inputs, flat.append)
    flat_back = []
    map_tensors(back.inputs, flat_back.append)
    assert len(flat) == len(flat_back) > 8  # the graph's tensors and every nested one
    for x, y in zip(flat, flat_back):
        assert x.dtype == y.dtype and torch.equal(x, y)
    assert isinstance(back.inputs["other"]["parts"][1], pair) and back.crystal.num_graphs == 1
    assert back.inputs["other"]["note"] == "kept" and torch.equal(back.present["other"], b.present["other"])


def test_resampled_stream_draws_shards_with_replacement(shard_dir):
    urls = L.split_shards(shard_dir, "train")
    n = sum(1 for _ in L.load_records(urls))
    coll = Collator(property_names=[], cutoff=4.0)
    pipe = L.shard_pipeline(urls, coll, batch_size=4, num_samples=n, num_workers=4, resampled=True, seed=3)
    # resampling lifts the shards >= workers x ranks rule and still yields the planned batch count
    ids = [m for b in pipe for m in b.material_ids]
    assert len(ids) == pipe.batches_per_worker * 4
    known = {r.material_id for r in L.load_records(urls)}
    assert set(ids) <= known


def test_datamodule_reduces_cells_on_request(shard_dir):
    from mmmat.tasks.datamodule import MultimodalDataModule

    plain = MultimodalDataModule(str(shard_dir), batch_size=4, num_workers=0, mode="memory", cutoff=4.0)
    red = MultimodalDataModule(str(shard_dir), batch_size=4, num_workers=0, mode="memory", cutoff=4.0,
                               reduce_cells=True)
    a, b = plain.records("train"), red.records("train")
    assert [r.material_id for r in a] == [r.material_id for r in b]
    for x, y in zip(a, b):
        assert abs(x.volume - y.volume) < 1e-6 * x.volume and list(x.numbers) == list(y.numbers)
        reduced = x.to_structure().get_reduced_structure()
        np.testing.assert_allclose(y.lattice, reduced.lattice.matrix, atol=1e-8)
    with pytest.raises(ValueError, match="reduce_cells"):
        MultimodalDataModule(str(shard_dir), mode="stream", reduce_cells=True)


def test_pipe_urls_brace_patterns_and_sizes_files(shard_dir, tmp_path):
    """Shards read through ``pipe:cat`` URLs (as from an object store), counted from a sizes file."""
    import json

    local = L.split_shards(shard_dir, "train")
    k = len(local)
    pattern = f"pipe:cat {shard_dir}/train/shard-{{000000..{k - 1:06d}}}.tar"
    urls = L.expand_shards(pattern)
    assert urls == [f"pipe:cat {u}" for u in local]
    sizes = L.read_sizes(shard_dir / "manifest.json")
    n = L.count_samples(urls, sizes)
    assert n == sum(1 for _ in L.load_records(local)) == L.count_samples(local, sizes)
    assert L.shard_name("pipe:aws s3 cp s3://b/mp/train/shard-000003.tar -") == ("train/shard-000003.tar",
                                                                                "shard-000003.tar")
    # open_clip-style sizes.json keyed by file name
    (tmp_path / "sizes.json").write_text(json.dumps({u.rsplit("/", 1)[1]: 6 for u in local}))
    assert L.count_samples(urls, L.read_sizes(tmp_path / "sizes.json")) == 6 * k
    with pytest.raises(KeyError, match="shard-999999.tar"):
        L.count_samples(["pipe:cat /x/train/shard-999999.tar"], sizes)
    # the same records through pipe: as through local paths; a brace-pattern string is expanded by the loader
    assert sorted(r.material_id for r in L.load_records(urls)) == sorted(r.material_id for r in L.load_records(local))
    coll = Collator(property_names=[], cutoff=4.0)
    pipe = L.shard_pipeline(pattern, coll, batch_size=4, num_samples=n, num_workers=0, shuffle=False)
    assert sum(len(b) for b in pipe) == pipe.batches_per_epoch * 4 == math.floor(n / 4) * 4


def test_datamodule_reads_urls_per_split(shard_dir, tmp_path):
    from mmmat.tasks.datamodule import MultimodalDataModule

    k = len(L.split_shards(shard_dir, "val"))
    urls = {"val": f"pipe:cat {shard_dir}/val/shard-{{000000..{k - 1:06d}}}.tar"}
    dm = MultimodalDataModule(str(shard_dir), batch_size=4, num_workers=0, mode="stream", cutoff=4.0, urls=urls)
    assert dm.shard_urls("val")[0].startswith("pipe:cat ") and dm.num_samples("val") == dm.manifest["splits"]["val"][
        "samples"]
    assert sum(len(b) for b in dm.val_dataloader()) == dm.num_samples("val")
    assert dm.shard_urls("train") == L.split_shards(shard_dir, "train")  # splits not named stay local
    # only the manifest is needed beside the config when every split is named by URL
    (tmp_path / "manifest.json").write_text((shard_dir / "manifest.json").read_text())
    dm2 = MultimodalDataModule(str(tmp_path), batch_size=4, num_workers=0, mode="memory", cutoff=4.0, urls=urls)
    assert len(dm2.records("val")) == dm.num_samples("val")
    with pytest.raises(ValueError, match="unknown splits"):
        MultimodalDataModule(str(shard_dir), urls={"trian": "x.tar"})
