"""Integration tests over ../shared/data (skipped when it is not present)."""

import pytest
from conftest import shared_data

from data_pipelines.base import BuildOptions, get_source
from data_pipelines.build import build_shards
from mmmat.data.loader import load_records


def test_mp20p_split_counts():
    src = get_source("mp20")(shared_data("mp_20"), joins=False)
    assert {k: len(v) for k, v in src.splits.items()} == {"train": 8927, "val": 990, "test": 7342}
    ids = [r.material_id for v in src.splits.values() for r in v]
    assert len(set(ids)) == 17259
    assert src.property_columns[:3] == ["formation_energy_per_atom", "band_gap", "e_above_hull"]


@pytest.mark.parametrize("name,folder,prop", [("perov5", "perov_5", "heat_ref"), ("carbon24", "carbon_24",
                                                                                   "energy_per_atom")])
def test_cdvae_sources_build(tmp_path, name, folder, prop):
    src = get_source(name)(shared_data(folder), limit=5)
    assert set(src.splits) == {"val", "test"}
    m = build_shards(src, tmp_path / name, progress=False, options=BuildOptions(describe=False))
    assert m["total_samples"] == 10 and m["total_failures"] == 0
    recs = load_records(sorted(str(p) for p in (tmp_path / name).rglob("*.tar")))
    assert all(prop in r.properties for r in recs)


def test_mp20_with_joins_small(tmp_path):
    src = get_source("mp20")(shared_data("mp_20"), limit=30)
    m = build_shards(src, tmp_path / "mp", workers=2, shard_size=16, progress=False)
    assert m["total_samples"] == 90 and m["total_failures"] == 0
    assert m["source_info"]["recipes"]["reactions_read"] > 30000
    recs = load_records(sorted(str(p) for p in (tmp_path / "mp").rglob("*.tar")))
    assert all(r.xrd is not None and r.image is not None for r in recs)
    assert all(r.literature_texts for r in recs)  # literature, or a generated description labelled as such
