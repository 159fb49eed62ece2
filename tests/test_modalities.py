"""The modality registry: every spec round-trips records, batches and raw inputs; old shards still load."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mmmat.data.batch import Collator
from mmmat.data.loader import load_records, split_shards
from mmmat.data.schema import MaterialRecord, TextItem
from mmmat.modalities import ModalitySpec, get_modality, modality_names, specs

OLD_SHARDS = Path(__file__).resolve().parent / "fixtures" / "old_shards"


def _record(structure, name="r0"):
    from mmmat.data.image import simulate_zcontrast
    from mmmat.data.xrd import compute_peaks, render_profile

    rec = MaterialRecord.from_structure(structure, name, properties={"band_gap": 1.5}, split="train")
    rec.xrd_peaks = compute_peaks(structure)
    rec.xrd = render_profile(rec.xrd_peaks)
    rec.image, rec.image_meta = simulate_zcontrast(rec.lattice, rec.frac_coords, rec.numbers, size=32)
    rec.processing_texts = [TextItem("ground and fired at 900 C", "synthetic/recipe")]
    rec.literature_texts = [TextItem("a rock-salt halide", "synthetic/lit")]
    return rec


def test_registry_lists_every_modality_once_in_order():
    names = modality_names()
    assert names[:5] == ("crystal", "xrd", "image", "processing_text", "literature_text")
    assert len(set(names)) == len(names)
    for s in specs():
        assert isinstance(s, ModalitySpec) and get_modality(s.name) is s
        assert s.default_encoder.get("name"), s.name
        assert s.query_units, s.name
        for alias in s.query_aliases:
            assert get_modality(alias) is s
    assert get_modality("structure").name == "crystal"
    with pytest.raises(KeyError, match="unknown modality 'nope'"):
        get_modality("nope")


@pytest.mark.parametrize("name", modality_names())
def test_spec_round_trip(name, nacl):
    """Record -> shard members -> record, and record -> batch (inputs[name]) with its presence."""
    spec = get_modality(name)
    rec = _record(nacl)
    sample = rec.to_sample()
    for member in spec.members:
        assert member in sample, (name, member)
    meta = json.loads(sample["meta.json"])
    back = MaterialRecord.from_sample(sample)
    decoded = spec.decode_sample(sample, meta)
    for field in spec.record_fields:
        a, b = getattr(rec, field), getattr(back, field)
        if isinstance(a, np.ndarray):
            np.testing.assert_allclose(np.asarray(b, dtype=np.float64), np.asarray(a, dtype=np.float64), atol=1e-3)
        else:
            assert a == b, field
        assert field in decoded
    # the batch: two records, the second without this modality where it can lack it
    bare = MaterialRecord.from_structure(nacl, "bare")
    batch = Collator()([rec, bare])
    assert set(batch.present) == set(modality_names())
    present = batch.present[name].tolist()
    assert present[0] is True
    assert present[1] is (name == "crystal" or spec.lazy)  # computed from the crystal: always there
    if spec.lazy:
        x = spec.batch_input(batch)
        assert name in batch.inputs and x.shape[0] == 2
        np.testing.assert_allclose(x[0].numpy(), spec.render(nacl), atol=1e-4)
    value = spec.record_input(rec)
    assert value is not None
    if name != "crystal" and spec.record_input(bare) is not None:
        assert spec.lazy


def test_raw_inputs_of_every_modality_embed(nacl):
    """Each spec's raw-input path through MultimodalModel.embed (a small model with every modality)."""
    from mmmat.latent.model import MultimodalModel

    small = {
        "crystal/schnet": {"hidden": 16, "num_interactions": 1, "cutoff": 4.0, "num_rbf": 8},
        "xrd/cnn": {"out_dim": 16, "num_bins": 128, "widths": [4, 8], "depths": [1, 1], "hidden_dim": 16},
        "image/timm": {"model_name": "resnet10t", "out_dim": 16},
        "text/transformer": {"vocab_size": 259, "hidden": 16, "layers": 1, "heads": 2, "intermediate": 32,
                             "out_dim": 16, "max_position": 64},
    }
    # every registered modality except one of the two text ones (they share the path)
    enc = {s.name: {"name": s.default_encoder["name"], **small[s.default_encoder["name"]]}
           for s in specs() if s.name != "literature_text"}
    torch.manual_seed(0)
    model = MultimodalModel(enc, embed_dim=8, max_text_tokens=64).eval()
    rec = _record(nacl)
    batch = Collator(cutoff=4.0, max_text_tokens=64)([rec])
    for name in enc:
        spec = get_modality(name)
        raw = spec.record_input(rec)
        inputs = raw[None] if isinstance(raw, np.ndarray) else [raw]
        e_raw = model.embed(name, inputs)
        e_batch = model.embed(name, batch)
        assert e_raw.shape == (1, 8) and torch.isfinite(e_raw).all()
        if name != "image":  # the image path pads/resizes differently from the raw one
            torch.testing.assert_close(e_raw, e_batch, atol=1e-4, rtol=1e-4)


def test_old_shards_load_with_the_registry():
    """Shards written by the code before the registry (tests/fixtures/old_shards/make.py) load unchanged."""
    expected = json.loads((OLD_SHARDS / "expected.json").read_text())
    records = load_records(split_shards(OLD_SHARDS, "test"))
    assert sorted(r.material_id for r in records) == sorted(k.replace("_", "-") for k in expected)
    by_id = {r.material_id: r for r in records}
    nacl, cscl, si = by_id["syn-nacl"], by_id["syn-cscl"], by_id["syn-si"]
    assert nacl.formula == "NaCl" and nacl.num_atoms == 8 and si.num_atoms == 8 and cscl.num_atoms == 2
    assert nacl.xrd is not None and nacl.xrd.shape == (1701,) and nacl.xrd_peaks.shape[1] == 2
    assert cscl.xrd is None and si.xrd is not None
    assert nacl.image is not None and nacl.image.shape == (32, 32) and si.image is None
    assert nacl.processing_texts[0].text.startswith("NaCl was ground")
    assert [t.generated for t in cscl.literature_texts] == [False, True]
    assert nacl.properties["band_gap"] == 1.0 and np.isnan(nacl.properties["e_hull"])
    # written again by the registry, every member is byte for byte the one the old code wrote
    for r in records:
        sample = r.to_sample()
        got = {k: hashlib.sha256(v).hexdigest() for k, v in sample.items() if k != "__key__"}
        assert got == expected[sample["__key__"]], r.material_id
    batch = Collator(include_generated_text=False)(records)
    order = [r.material_id for r in records]
    pres = {m: dict(zip(order, batch.present[m].tolist(), strict=True)) for m in batch.present}
    assert pres["xrd"] == {"syn-nacl": True, "syn-cscl": False, "syn-si": True}
    assert pres["image"]["syn-nacl"] and not pres["image"]["syn-si"]
    assert pres["literature_text"]["syn-cscl"] and not pres["literature_text"]["syn-nacl"]
    for s in specs():
        if s.lazy:  # computed from the crystal: present for every old record
            assert all(pres[s.name].values()), s.name
