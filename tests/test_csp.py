"""CSP pipeline (templates, refinement, ranking), template context of the flow, Wyckoff-constrained sampling."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from pymatgen.core import Lattice, Structure

from mmmat.generative.csp import CSPPipeline, TemplateRanker, best, candidate_features, parse_cell
from mmmat.generative.flow import CrystalFlow, pack_templates
from mmmat.generative.symmetry import (
    SymmetryError,
    operations_with_permutations,
    project,
    random_symmetric,
    space_group_number,
)
from mmmat.generative.templates import TemplateLibrary

ROOT = Path(__file__).resolve().parents[1]
GENERATE_TINY = str(ROOT / "configs" / "generate" / "tiny.yaml")


def _library() -> TemplateLibrary:
    rock = Structure.from_spacegroup(225, Lattice.cubic(5.6), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    kbr = Structure.from_spacegroup(225, Lattice.cubic(6.6), ["K", "Br"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    zns = Structure.from_spacegroup(216, Lattice.cubic(5.4), ["Zn", "S"], [[0, 0, 0], [0.25, 0.25, 0.25]])
    cscl = Structure(Lattice.cubic(4.1), ["Cs", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    return TemplateLibrary([rock, kbr, zns, cscl], ["rock", "kbr", "zns", "cscl"], [0.0, 0.0, 0.1, 0.0])


def _flow(template_k: int = 0) -> CrystalFlow:
    torch.manual_seed(0)
    return CrystalFlow(hidden=16, layers=2, fourier=2, max_atoms=8, template_k=template_k).eval()


def test_template_method_substitutes_the_cheapest_template():
    pipe = CSPPipeline(_library(), k=3)
    (li,), (rb,), none = pipe.predict(["Li4F4", "Rb1I1", "Na1Cl2"], method="template")
    assert li.source == "template" and li.template_id in {"rock", "kbr", "zns"} and li.rank == 0
    assert li.structure.composition.reduced_formula == "LiF" and len(li.structure) == 8
    assert rb.template_id == "cscl" and rb.structure.composition.reduced_formula == "RbI"
    assert none == []  # no AB2 template and no generator: nothing, not an error
    costs = [c.cost for c in pipe.templates("Li4F4")]
    assert li.cost == min(costs) and costs == sorted(costs)
    # leave-one-out
    assert pipe.predict(["Rb1I1"], method="template", exclude=[("cscl",)]) == [[]]
    # template retrieval in worker processes gives the same candidates
    many = ["Li4F4", "Rb1I1", "K4Cl4", "Cs1Br1", "Na1Cl2"]
    one = [[(c.template_id, c.cost) for c in p] for p in pipe.predict(many, method="template")]
    two = CSPPipeline(_library(), k=3, workers=2).predict(many, method="template")
    assert [[(c.template_id, c.cost) for c in p] for p in two] == one


def test_pipeline_refines_ranks_by_a_pluggable_energy_and_falls_back_to_the_flow():
    calls = []

    def volume_energy(structures):  # any callable structures -> eV/atom ranks
        calls.append(len(structures))
        return [s.volume / len(s) for s in structures]

    pipe = CSPPipeline(_library(), _flow(), k=3, steps=10, energy=volume_energy)
    ranked = pipe.predict(["Li4F4", "Na1Cl2"], method="pipeline", seed=1)
    li, nacl2 = ranked
    sources = sorted(c.source for c in li)
    assert sources.count("template") == sources.count("refined") == 3
    e = [c.energy for c in li]
    assert e == sorted(e) and all(np.isfinite(e))
    assert calls == [6]  # one energy call for all candidates of a composition
    assert [c.source for c in nacl2] == ["flow"]  # no template: the generator's sample
    assert nacl2[0].structure.composition.reduced_formula == "NaCl2"
    assert all(s.composition.reduced_formula in ("LiF", "NaCl2") for s in best(ranked))
    # without an energy the candidates stay in template-consensus order (tau 0: cost order)
    plain = CSPPipeline(_library(), _flow(), k=3, steps=10).predict(["Li4F4"])[0]
    assert [c.cost for c in plain] == sorted(c.cost for c in plain)
    with pytest.raises(ValueError, match="is not one of"):
        pipe.predict(["Li4F4"], method="diffusion")
    with pytest.raises(ValueError, match="needs a template library"):
        CSPPipeline(None, _flow()).predict(["Li4F4"], method="template")
    with pytest.raises(ValueError, match="whole positive"):
        parse_cell("Na0.5Cl")


def test_learned_ranker_scores_candidates_from_features():
    rng = np.random.default_rng(0)
    feats, labels = [], []
    for _ in range(60):
        cost = np.sort(rng.random(4))
        energy = rng.normal(size=4)
        f = candidate_features(cost, [0, 1, 1, 2], [0.0] * 4, energy, 10)
        feats.append(f)
        labels.append((energy == energy.min()).tolist())  # the lowest energy is the right one
    ranker = TemplateRanker(seed=0, max_iter=40).fit(feats, labels)
    hits = [int(np.argmax(ranker.score(f))) == int(np.argmax(y)) for f, y in zip(feats, labels)]
    assert np.mean(hits) > 0.9
    with pytest.raises(ValueError, match="both matching and non-matching"):
        TemplateRanker().fit(feats[:2], [[False] * 4, [False] * 4])


# ---------------------------------------------------------------------- template context (RAG)
def test_template_context_shapes_and_effect():
    lib = _library()
    flow = _flow(template_k=2)
    a = lib.candidates("Li4F4", 2)
    b = lib.candidates("Rb1I1", 2)
    packed = pack_templates([[t.structure for t in a], [], [t.structure for t in b]], k=2)
    assert packed["lattice"].shape == (3, 3, 3) and packed["counts"].tolist() == [8, 8, 2]
    assert packed["owner"].tolist() == [0, 0, 2] and packed["rank"].tolist() == [0, 1, 0]
    assert packed["frac"].shape == (18, 3) and packed["z"].shape == (18,) and packed["template"].shape == (18,)
    ctx = flow.encode_context(packed)
    assert ctx["y"].shape == (3, 6)
    tokens, mask = flow.net.template_tokens(ctx, 3)
    assert tokens.shape == (3, 16, 16) and mask.sum(1).tolist() == [16, 0, 2]

    counts = torch.tensor([8, 2, 2])
    z = torch.tensor([3] * 4 + [9] * 4 + [11, 17] + [37, 53])
    batch = torch.repeat_interleave(torch.arange(3), counts)
    y, f, s = torch.randn(3, 6), torch.rand(12, 3), flow.one_hot(z)
    t = torch.full((3,), 0.5)
    with torch.no_grad():
        with_ctx = flow.net(y, f, s, t, torch.ones(3), batch, counts, None, ctx)
        without = flow.net(y, f, s, t, torch.ones(3), batch, counts, None, None)
    assert [x.shape for x in with_ctx] == [(3, 6), (12, 3), (12, 100)]
    # the crystal without templates sees only the null token either way; the others see their templates
    assert torch.allclose(with_ctx[1][8:10], without[1][8:10], atol=1e-6)
    assert not torch.allclose(with_ctx[1][:8], without[1][:8])
    loss = flow.loss(torch.eye(3).repeat(3, 1, 1) * 5, f, z, batch, counts, torch.ones(3, dtype=torch.bool),
                     context=packed)
    loss["loss"].backward()
    assert flow.net.tpl_attn[0].attn.in_proj_weight.grad.abs().sum() > 0
    assert CrystalFlow(hidden=16, layers=1, fourier=2).encode_context(packed) is None  # plain model ignores it
    # the cross-attention is permutation equivariant over the atoms, whatever their order in the batch
    attn = flow.net.tpl_attn[0]
    h = torch.randn(12, 16)
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = attn(h, batch, tokens, mask)
        b = attn(h[perm], batch[perm], tokens, mask)
    assert torch.allclose(a[perm], b, atol=1e-5)


def test_rag_pipeline_refines_with_templates_as_context(tmp_path):
    flow = _flow(template_k=2)
    flow.save_pretrained(tmp_path / "rag")
    back = CrystalFlow.from_pretrained(tmp_path / "rag")
    assert back.template_k == 2 and "template_k" not in back.extra
    out = CSPPipeline(_library(), back, k=2, steps=5).predict(["Li4F4"])[0]
    assert sum(c.source == "refined" for c in out) == 2


# ---------------------------------------------------------------------- symmetry
@pytest.mark.parametrize("group,cell", [(225, {"Na": 4, "Cl": 4}), (221, {"Sr": 1, "Ti": 1, "O": 3}),
                                         (194, {"Zn": 2, "O": 2})])
def test_wyckoff_sampling_keeps_the_requested_space_group(group, cell):
    start = random_symmetric(cell, group, seed=3)
    assert space_group_number(start) == group
    formula = "".join(f"{e}{n}" for e, n in cell.items())
    for flow in (None, _flow()):
        pipe = CSPPipeline(None, flow, steps=10, t_start=0.7)
        out = best(pipe.predict([formula, formula], method="flow", seed=2, space_group=group))
        for s in out:
            assert space_group_number(s, symprec=0.01) == group
            assert parse_cell(s) == cell


def test_pipeline_keeps_only_templates_of_the_requested_group():
    pipe = CSPPipeline(_library(), _flow(), k=3, steps=6)
    out = pipe.predict(["Li4F4"], space_group=225)[0]
    assert {c.template_id for c in out} == {"rock", "kbr"}  # zinc blende (216) is left out
    assert all(space_group_number(c.structure) == 225 for c in out)
    assert {c.template_id for c in pipe.predict(["Li4F4"], space_group=216)[0]} == {"zns"}


def test_projection_restores_a_perturbed_crystal_and_bad_groups_are_refused():
    s = random_symmetric({"Na": 4, "Cl": 4}, 225, seed=0)
    ops = operations_with_permutations(s)
    rng = np.random.default_rng(0)
    noisy = Structure(Lattice.from_parameters(5.5, 5.7, 5.6, 89, 91, 90), s.species,
                      s.frac_coords + rng.normal(0, 0.02, (len(s), 3)))
    assert space_group_number(noisy, symprec=0.01) != 225
    fixed = project(noisy, ops)
    assert space_group_number(fixed, symprec=0.01) == 225
    with pytest.raises(SymmetryError, match="cannot hold"):
        random_symmetric({"Ca": 4, "Ti": 4, "O": 12}, 225)
    with pytest.raises(SymmetryError, match="1 to 230"):
        random_symmetric({"Na": 1}, 231)


# ---------------------------------------------------------------------- CLI and config switch
@pytest.fixture(scope="module")
def rag_generator(tmp_path_factory):
    import train
    from data_pipelines.base import get_source
    from data_pipelines.build import build_shards

    tmp = tmp_path_factory.mktemp("rag")
    shards = tmp / "shards"
    build_shards(get_source("builtin")(None, limit=40), shards, progress=False)
    cli = train.main(
        [
            "fit",
            "--config",
            GENERATE_TINY,
            f"--data.shards={shards}",
            "--data.tokenizer=null",
            "--data.build_graph=false",
            f"--trainer.default_root_dir={tmp}",
            f"--trainer.logger.init_args.save_dir={tmp}",
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=2",
            "--model.init_args.pretrained=null",
            "--model.init_args.xrd_augment=null",
            "--model.init_args.template_k=2",
            f"--model.init_args.save_dir={tmp}/gen",
        ]
    )
    return tmp, shards, cli


def test_template_k_is_a_training_switch(rag_generator):
    tmp, _, cli = rag_generator
    cfg = json.loads((tmp / "gen" / "config.json").read_text())
    assert cfg["template_k"] == 2
    module = cli.model
    assert module._template_cache  # templates were looked up for the crystals trained on
    assert any(module._template_cache.values())
    for templates in module._template_cache.values():
        assert len(templates) <= 2
        assert all(t.composition.reduced_formula for t in templates)
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
    assert math.isfinite(metrics["train/loss"])


def test_generate_cli_method_switch(rag_generator, tmp_path):
    from typer.testing import CliRunner

    from mmmat.cli import app
    from mmmat.data.loader import load_records, split_shards

    tmp, shards, _ = rag_generator
    train = load_records(split_shards(shards, "train"))
    lib = TemplateLibrary.from_records(train)
    formula = next(r.to_structure().composition.formula.replace(" ", "") for r in train
                   if lib.count(r.to_structure()) >= 2)
    base = ["generate", "--composition", formula, "--templates", str(shards), "--steps", "4"]
    runs = {}
    for method, extra in (("template", []), ("pipeline", ["--model", str(tmp / "gen"), "--rank", "consensus"]),
                          ("flow", ["--model", str(tmp / "gen")])):
        out = tmp_path / method
        r = CliRunner().invoke(app, [*base, "--method", method, "-n", "2", "--out", str(out), *extra])
        assert r.exit_code == 0, r.output
        runs[method] = json.loads((out / "manifest.json").read_text())
        assert runs[method]["method"] == method and len(list(out.glob("sample_*.cif"))) >= 1
    assert {c["source"] for c in runs["template"]["candidates"]} == {"template"}
    assert runs["flow"]["mode"] == "csp" and len(runs["flow"]["samples"]) == 2
    assert {c["source"] for c in runs["pipeline"]["candidates"]} <= {"template", "refined"}
    r = CliRunner().invoke(app, ["generate", "--composition", "Na4Cl4", "--method", "flow", "--space-group", "225",
                                 "--model", str(tmp / "gen"), "-n", "2", "--steps", "4", "--out", str(tmp_path / "sg")])
    assert r.exit_code == 0, r.output
    for f in (tmp_path / "sg").glob("sample_*.cif"):
        assert space_group_number(Structure.from_file(f), symprec=0.01) == 225
    for bad, msg in ((["--composition", "Na4Cl4", "--method", "diffusion"], "must be pipeline"),
                     (["--composition", "Na4Cl4", "--method", "template"], "needs --templates"),
                     (["--composition", "Na4Cl4", "--method", "pipeline", "--space-group", "225"], "needs --model"),
                     (["--space-group", "225"], "needs --composition")):
        r = CliRunner().invoke(app, ["generate", "-n", "1", "--out", str(tmp_path / "x"), *bad])
        assert r.exit_code == 2 and msg in r.output, (bad, r.output)


def test_generate_benchmark_reports_the_pipeline_and_rag_keys(rag_generator, tmp_path, monkeypatch):
    import runpy
    import sys

    tmp, shards, _ = rag_generator
    out = tmp_path / "generate.json"
    monkeypatch.setattr(sys, "argv", [
        "generate.py", "--model", str(tmp / "gen"), "--shards", str(shards), "--n", "4", "--k", "2", "--steps", "2",
        "--rank", "consensus", "--workers", "1", "--device", "cpu", "--skip", "xrd", "property", "denovo",
        "--result", str(out)])
    runpy.run_path(str(ROOT / "benchmarks" / "generate.py"), run_name="__main__")
    m = json.loads(out.read_text())["metrics"]
    for key in ("csp_match_rate", "csp_match_rate_generator", "csp_match_rate_on_template_failures",
                "template_match_rate", "template_refined_match_rate", "pipeline_consensus_match_rate",
                "rag_from_noise_match_rate", "rag_refined_match_rate", "template_refined_no_context_match_rate"):
        assert key in m, key
    for key in ("csp_match_rate", "csp_match_rate_generator", "rag_refined_match_rate"):
        assert 0.0 <= m[key] <= 1.0
    assert m["n_materials"] == 4 and sum(m["pipeline_chosen_source"].values()) <= 4
