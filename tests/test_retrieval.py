import math

import pytest
import torch
import torch.nn.functional as F

from mmmat.evaluation.retrieval import cross_modal_retrieval, rank_of_true, retrieval_metrics


def _unit(*angles_deg):
    """Unit vectors in the plane at the given angles (degrees)."""
    a = torch.tensor(angles_deg, dtype=torch.float64) * math.pi / 180
    return torch.stack([a.cos(), a.sin()], dim=1).float()


def test_known_ranks():
    # gallery directions 0°, 10°, 40°, 90°, 180°; each query's similarity order is known by angle
    gallery = _unit(0, 10, 40, 90, 180)
    query = _unit(0, 0, 45, 170, 100)
    true = torch.tensor([0, 2, 2, 3, 1])
    ranks = rank_of_true(query, gallery, true)
    # q0 -> 0° first; q1 (0°): 40° is third; q2 (45°): 40° nearest; q3 (170°): order 180,90,40,10,0 -> 90 2nd;
    # q4 (100°): order 90,40|180(60°/80°)... 90(10°),40(60°),180(80°),10(90°) -> 10° is 4th
    assert ranks.tolist() == [1, 3, 1, 2, 4]
    m = retrieval_metrics(query, gallery, true, ks=(1, 2, 5))
    assert m["R@1"] == pytest.approx(2 / 5)
    assert m["R@2"] == pytest.approx(3 / 5)
    assert m["R@5"] == pytest.approx(1.0)
    assert m["median_rank"] == pytest.approx(2.0)
    assert m["mrr"] == pytest.approx((1 + 1 / 3 + 1 + 1 / 2 + 1 / 4) / 5)
    assert m["n_queries"] == 5 and m["n_gallery"] == 5


def test_non_finite_embeddings_are_refused():
    # a NaN similarity compares false with everything: unguarded, every query would rank its match first
    gallery = _unit(0, 10, 40)
    query = _unit(0, 45)
    query[1, 0] = float("nan")
    with pytest.raises(ValueError, match="1 of 2 query embeddings are not finite"):
        rank_of_true(query, gallery, torch.tensor([0, 2]))
    gallery[2, 1] = float("inf")
    with pytest.raises(ValueError, match="gallery embeddings are not finite"):
        rank_of_true(_unit(0, 45), gallery, torch.tensor([0, 2]))


def test_even_count_median_and_scale_invariance():
    gallery = _unit(0, 30, 60)
    query = _unit(0, 0)
    true = torch.tensor([0, 2])  # ranks 1 and 3
    m = retrieval_metrics(query * 7.0, gallery * 0.1, true)
    assert m["median_rank"] == pytest.approx(2.0)
    # without normalisation the dot product favours the long gallery vector
    ranks = rank_of_true(query, gallery * torch.tensor([[1.0], [1.0], [10.0]]), true, normalize=False)
    assert ranks.tolist() == [2, 1]


def test_ties_are_pessimistic():
    gallery = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    query = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    ranks = rank_of_true(query, gallery, torch.tensor([1, 3]))
    assert ranks.tolist() == [3, 1]  # tied with two others: counted behind both
    # a constant embedding scores the worst possible rank everywhere
    const = torch.ones(6, 4)
    assert rank_of_true(const, const, torch.arange(6)).tolist() == [6] * 6
    assert retrieval_metrics(const, const, torch.arange(6))["R@5"] == 0.0


def test_chunk_boundaries_do_not_matter():
    torch.manual_seed(0)
    n, d = 50, 8
    gallery = torch.randn(n, d)
    true = torch.randperm(n)
    query = gallery[true] + 0.8 * torch.randn(n, d)
    ranks_small = rank_of_true(query, gallery, true, chunk=3)
    ranks_big = rank_of_true(query, gallery, true, chunk=10000)
    assert torch.equal(ranks_small, ranks_big)
    assert ranks_big.min() >= 1 and ranks_big.max() <= n
    # against a direct full-matrix computation
    sims = F.normalize(query, dim=-1) @ F.normalize(gallery, dim=-1).T
    ref = (sims >= sims[torch.arange(n), true][:, None]).sum(1)
    assert torch.equal(ranks_big, ref)
    assert retrieval_metrics(query, gallery, true, chunk=3) == retrieval_metrics(
        query, gallery, true, chunk=10000
    )


def test_empty_and_bad_inputs():
    m = retrieval_metrics(torch.zeros(0, 3), torch.randn(4, 3), torch.zeros(0, dtype=torch.long))
    assert m["n_queries"] == 0 and math.isnan(m["R@1"]) and math.isnan(m["mrr"])
    with pytest.raises(ValueError):
        rank_of_true(torch.randn(2, 3), torch.randn(4, 3), torch.tensor([0, 4]))
    with pytest.raises(ValueError):
        rank_of_true(torch.randn(2, 3), torch.randn(4, 2), torch.tensor([0, 1]))
    with pytest.raises(ValueError):
        rank_of_true(torch.randn(2, 3), torch.randn(4, 3), torch.tensor([0]))


def test_cross_modal_with_missing_modalities():
    # 5 materials; crystal and xrd identical directions except where absent
    crystal = _unit(0, 20, 40, 60, 80)
    xrd = _unit(0, 20, 40, 60, 80)
    xrd[1] = torch.tensor(
        [1.0, 0.0]
    )  # material 1 lacks xrd: garbage that must be ignored (equal to crystal 0)
    present = {"xrd": torch.tensor([True, False, True, True, True])}
    out = cross_modal_retrieval({"crystal": crystal, "xrd": xrd}, present, ks=(1,))
    # xrd -> crystal: 4 queries (material 1 has no xrd), gallery all 5 crystals, every match exact
    assert out["xrd_to_crystal_n_queries"] == 4 and out["xrd_to_crystal_n_gallery"] == 5
    assert out["xrd_to_crystal_R@1"] == 1.0 and out["xrd_to_crystal_median_rank"] == 1.0
    # crystal -> xrd: material 1 has no match so it is not a query; the garbage row is not in the gallery
    assert out["crystal_to_xrd_n_queries"] == 4 and out["crystal_to_xrd_n_gallery"] == 4
    assert out["crystal_to_xrd_R@1"] == 1.0
    metrics = ("R@1", "median_rank", "mrr", "n_queries", "n_gallery")
    assert set(out) == {f"{p}_{k}" for p in ("crystal_to_xrd", "xrd_to_crystal") for k in metrics}


def test_cross_modal_true_index_maps_into_gallery():
    # the target gallery skips absent rows: the true index must follow
    torch.manual_seed(1)
    n = 12
    crystal = torch.randn(n, 6)
    image = crystal + 0.05 * torch.randn(n, 6)
    present = {
        "image": torch.tensor([i % 3 != 0 for i in range(n)]),
        "crystal": torch.ones(n, dtype=torch.bool),
    }
    out = cross_modal_retrieval({"crystal": crystal, "image": image}, present, pairs=[("crystal", "image")])
    assert set(k.split("_R@")[0] for k in out if "_R@" in k) == {"crystal_to_image"}
    assert out["crystal_to_image_R@1"] == 1.0
    assert out["crystal_to_image_n_gallery"] == 8
    # a modality absent everywhere: no queries, no keys, no NaN
    none = {"image": torch.zeros(n, dtype=torch.bool)}
    assert cross_modal_retrieval({"crystal": crystal, "image": image}, none) == {}
    with pytest.raises(KeyError):
        cross_modal_retrieval({"crystal": crystal}, {}, pairs=[("crystal", "xrd")])


def test_large_pool_chunked_runs():
    torch.manual_seed(2)
    n, d = 3000, 32
    g = F.normalize(torch.randn(n, d), dim=-1)
    m = retrieval_metrics(g + 0.01 * torch.randn(n, d), g, torch.arange(n), chunk=512)
    assert m["R@1"] > 0.99 and m["median_rank"] == 1.0
