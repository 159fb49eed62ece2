import pytest
import torch

from data_pipelines.base import BuildOptions, get_source
from data_pipelines.build import build_shards
from mmmat.data import loader as L
from mmmat.data.batch import Collator
from mmmat.data.resident import ResidentData, ResidentLoader
from mmmat.data.schema import TextItem


def _records(tmp_path, n=20):
    src = get_source("builtin")(None, limit=n)
    build_shards(src, tmp_path, progress=False, options=BuildOptions(describe=False))
    recs = L.load_records(L.split_shards(tmp_path, "train"))
    recs[0].processing_texts = [TextItem("heat at 900 C", "t"), TextItem("ball mill 2 h", "t")]
    recs[1].xrd = None
    recs[2].image = None
    return recs


def test_resident_batch_equals_collator(tmp_path):
    recs = _records(tmp_path)
    props = ["density", "num_atoms"]
    data = ResidentData(recs, props, cutoff=4.0, include_generated_text=True)
    idx = torch.tensor([3, 0, 1, 2, 7])
    rb = data.batch(idx)
    cb = Collator(property_names=props, cutoff=4.0, include_generated_text=True)([recs[i] for i in idx.tolist()])
    assert rb.material_ids == cb.material_ids
    for name in ("z", "pos", "frac_coords", "lattice", "batch", "ptr", "edge_index", "cell_offset"):
        assert torch.equal(getattr(rb.crystal, name), getattr(cb.crystal, name)), name
    assert torch.allclose(rb.crystal.edge_dist, cb.crystal.edge_dist)
    assert torch.allclose(rb.xrd["profile"], cb.xrd["profile"], atol=1e-3)
    assert torch.equal(rb.image, cb.image)
    assert torch.equal(rb.xrd["peak_mask"].sum(1), cb.xrd["peak_mask"].sum(1))
    assert torch.allclose(rb.properties, cb.properties, equal_nan=True)
    for k in rb.present:
        assert torch.equal(rb.present[k], cb.present[k]), k
    # first text when not random: same tokens as the collator (up to padding width)
    w = cb.processing_text["ids"].shape[1]
    assert torch.equal(rb.processing_text["ids"][:, :w], cb.processing_text["ids"])
    assert rb.present["processing_text"].tolist() == [False, True, False, False, False]


def test_resident_random_text_choice_and_loader(tmp_path):
    recs = _records(tmp_path)
    data = ResidentData(recs, [], cutoff=4.0)
    g = torch.Generator().manual_seed(0)
    seen = {tuple(data.batch(torch.tensor([0]), generator=g).processing_text["ids"][0].tolist()) for _ in range(20)}
    assert len(seen) == 2
    n = len(data)
    ranks = [ResidentLoader(data, 3, shuffle=True, seed=1, rank=r, world_size=2) for r in (0, 1)]
    ids = [[m for b in ld for m in b.material_ids] for ld in ranks]
    assert len(ranks[0]) == len(ranks[1]) == (n // 2) // 3
    assert not set(ids[0]) & set(ids[1])
    again = [m for b in ResidentLoader(data, 3, shuffle=True, seed=1, rank=0, world_size=2) for m in b.material_ids]
    assert again == ids[0]
    ranks[0].set_epoch(1)
    assert [m for b in ranks[0] for m in b.material_ids] != ids[0]
    ev = ResidentLoader(data, 4, shuffle=False, drop_last=False, rank=0, world_size=1)
    assert [m for b in ev for m in b.material_ids] == data.material_ids


def test_every_registered_modality_is_resident_as_it_collates(tmp_path):
    """Each spec's resident input has the collate's structure and values (up to padding width) and presence."""
    from mmmat.data.batch import map_tensors
    from mmmat.modalities import ModalitySpec, specs

    recs = _records(tmp_path, n=12)
    data = ResidentData(recs, [], cutoff=4.0, include_generated_text=True)
    idx = torch.tensor([2, 0, 1, 5])
    rb = data.batch(idx)
    cb = Collator(cutoff=4.0, include_generated_text=True)([recs[i] for i in idx.tolist()])
    assert set(rb.present) == set(cb.present) == {s.name for s in specs()}
    assert set(rb.inputs) == set(cb.inputs)
    assert set(rb.rows) == {s.name for s in specs() if s.present_rows_only}
    for name in rb.present:
        assert torch.equal(rb.present[name], cb.present[name]), name
        assert torch.equal(data.present_host[name][idx], rb.present[name]), name
    for name in rb.rows:
        assert rb.rows[name].tolist() == (cb.present[name].nonzero().squeeze(1).tolist() or [0]), name
    for name in rb.inputs:
        if name == "crystal":
            continue  # compared field by field above
        a, b = [], []
        map_tensors(rb.inputs[name], a.append)
        map_tensors(cb.inputs[name], b.append)
        assert len(a) == len(b) > 0, name
        for x, y in zip(a, b):
            assert x.shape[0] == y.shape[0] == len(idx), name
            crop = tuple(slice(0, n) for n in y.shape)  # resident tensors are padded to the split's widest
            assert torch.allclose(x[crop].float(), y.float(), atol=1e-3), name
            beyond = x.clone()
            beyond[crop] = 0
            assert not beyond.any(), name  # what lies beyond the collate's width is zero padding

    class Stored(ModalitySpec):
        name = "stored_without_resident"
        record_fields = ("xrd",)

    with pytest.raises(NotImplementedError, match="stored_without_resident"):
        Stored().pack_resident(recs, torch.device("cpu"))
