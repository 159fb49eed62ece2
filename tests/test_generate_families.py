"""The second generator family (all-atom transformer) and exact resume of generator training."""

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import flat_crystal_tensors, rocksalt_and_wurtzite

from mmmat.generative.api import Generator, generate, load_generator, sample_structures
from mmmat.generative.flow import CrystalDenoiser, CrystalFlow, wrap
from mmmat.generative.transformer import AtomTransformerDenoiser, pad_atoms, translation_error

ROOT = Path(__file__).resolve().parents[1]
GENERATE_TINY = str(ROOT / "configs" / "generate" / "tiny.yaml")


def _state(counts=(3, 4), seed=0):
    g = torch.Generator().manual_seed(seed)
    counts = torch.tensor(counts)
    batch = torch.repeat_interleave(torch.arange(len(counts)), counts)
    n = int(counts.sum())
    y = torch.randn(len(counts), 6, generator=g)
    f = torch.rand(n, 3, generator=g)
    s = torch.randn(n, 100, generator=g)
    t = torch.rand(len(counts), generator=g)
    return y, f, s, t, t.clone(), batch, counts


def _transformer(seed=0):
    torch.manual_seed(seed)
    net = AtomTransformerDenoiser(hidden=32, layers=2, fourier=3, heads=4).eval()
    for block in net.blocks:  # adaLN-Zero starts every block as the identity: give them weights
        torch.nn.init.normal_(block.mod.weight, std=0.2)
    return net


def test_pad_atoms_round_trips():
    counts = torch.tensor([2, 0, 3])
    batch = torch.repeat_interleave(torch.arange(3), counts)
    x = torch.arange(5.0).unsqueeze(-1)
    padded, pad, slot = pad_atoms(x, batch, counts)
    assert padded.shape == (3, 3, 1)
    assert pad.tolist() == [[False, False, True], [True, True, True], [False, False, False]]
    assert torch.equal(padded[batch, slot], x)


def test_transformer_symmetries_that_hold_exactly():
    net = _transformer()
    y, f, s, t, ts, batch, counts = _state()
    vy, vf, vs = net(y, f, s, t, ts, batch, counts)
    # permuting the atoms of each crystal permutes the outputs, the lattice velocity is unchanged
    perm = torch.tensor([2, 0, 1, 6, 4, 3, 5])
    vy2, vf2, vs2 = net(y, f[perm], s[perm], t, ts, batch, counts)
    assert torch.allclose(vy, vy2, atol=1e-5)
    assert torch.allclose(vf[perm], vf2, atol=1e-5) and torch.allclose(vs[perm], vs2, atol=1e-5)
    # periodic: any atom moved by whole lattice vectors changes nothing
    f3 = f.clone()
    f3[0] += torch.tensor([1.0, -2.0, 3.0])
    f3[5] -= 1.0
    assert torch.allclose(net(y, f3, s, t, ts, batch, counts)[1], vf, atol=1e-4)
    # padding: a crystal's velocities do not depend on the other crystals of the batch (nor on its padding)
    alone = net(y[:1], f[:3], s[:3], t[:1], ts[:1], batch[:3], counts[:1])
    assert torch.allclose(alone[0], vy[:1], atol=1e-5) and torch.allclose(alone[1], vf[:3], atol=1e-5)


def test_translation_invariance_is_exact_for_the_gnn_and_not_built_into_the_transformer():
    torch.manual_seed(0)
    gnn = CrystalDenoiser(hidden=32, layers=2, fourier=3).eval()
    y, f, s, t, _, batch, counts = _state()
    assert translation_error(gnn, y, f, s, t, batch, counts) < 1e-9
    assert translation_error(_transformer(), y, f, s, t, batch, counts) > 1e-3


def _overfit(translate_augment: bool, steps: int = 250):
    """A small transformer-family flow trained to memorise two crystals; its translation error after training."""
    torch.manual_seed(0)
    structs = rocksalt_and_wurtzite()
    flow = CrystalFlow(hidden=32, layers=2, fourier=4, max_atoms=8, family="transformer", heads=4,
                       translate_augment=translate_augment)
    lat, frac, z, counts, _ = flat_crystal_tensors(structs)
    flow.fit_statistics(lat, counts, z)
    rep = 16
    lat_r, frac_r, z_r, counts_r, batch_r = flat_crystal_tensors(structs * rep)
    opt = torch.optim.Adam(flow.parameters(), lr=3e-3)
    losses = []
    for _ in range(steps):
        csp = torch.arange(2 * rep) % 4 != 0
        out = flow.loss(lat_r, frac_r, z_r, batch_r, counts_r, csp)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(float(out["loss"].detach()))
    # probe states on the flow paths of the training crystals, t in [0.5, 1)
    g = torch.Generator().manual_seed(5)
    t = 0.5 + 0.5 * torch.rand(2 * rep, generator=g)
    f0 = torch.rand(frac_r.shape, generator=g)
    ft = (f0 + t[batch_r, None] * wrap(frac_r - f0)) % 1.0
    probe = (flow.encode_lattice(lat_r, counts_r), ft, flow.one_hot(z_r), t, batch_r, counts_r)
    err = translation_error(flow.net, *probe, generator=torch.Generator().manual_seed(1))
    return flow.eval(), structs, losses, err


@pytest.fixture(scope="module")
def overfit_transformer():
    """The transformer family trained with translation augmentation (and the translation error without it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    flow, structs, losses, err = _overfit(True)
    err_plain = _overfit(False)[3]
    yield flow, structs, losses, (err, err_plain)
    torch.set_num_threads(threads)


def test_transformer_family_trains_and_samples_a_memorised_crystal(overfit_transformer):
    from pymatgen.analysis.structure_matcher import StructureMatcher

    flow, structs, losses, _ = overfit_transformer
    assert np.mean(losses[-50:]) < 0.7 * np.mean(losses[:20])
    out = sample_structures(flow, [2] * 8, [11, 17] * 8, steps=40, seed=0)
    m = StructureMatcher(stol=0.5, angle_tol=10, ltol=0.3)
    matched = sum(s is not None and m.fit(s, structs[0]) for s in out)
    assert matched >= 5, matched


def test_translation_augmentation_teaches_the_invariance(overfit_transformer):
    _, _, _, (err_aug, err_plain) = overfit_transformer
    assert err_aug < 0.6 * err_plain, (err_aug, err_plain)


def test_transformer_family_saves_loads_and_generates(overfit_transformer, tmp_path):
    flow, _, _, _ = overfit_transformer
    flow.save_pretrained(tmp_path / "gen", extra={"condition_modalities": [], "condition_model": None})
    cfg = json.loads((tmp_path / "gen" / "config.json").read_text())
    assert cfg["family"] == "transformer" and cfg["heads"] == 4
    gen = load_generator(tmp_path / "gen", device="cpu")
    assert isinstance(gen.flow.net, AtomTransformerDenoiser)
    a = sample_structures(flow, [2, 4], steps=5, seed=3)
    b = sample_structures(gen.flow, [2, 4], steps=5, seed=3)
    assert all(np.allclose(x.frac_coords, y.frac_coords, atol=1e-5) for x, y in zip(a, b))
    structures, info = generate(gen, 4, seed=0, steps=5)
    assert info["mode"] == "de_novo" and len(structures) == 4
    structures, info = generate(Generator(flow, None, Path("."), "cpu", []), 2, composition="Ga2N2", steps=5)
    assert all(s.composition.reduced_formula == "GaN" for s in structures)


def test_folders_without_a_family_load_as_the_gnn_and_unknown_families_are_refused(tmp_path):
    flow = CrystalFlow(hidden=16, layers=1, fourier=2, max_atoms=4)
    flow.save_pretrained(tmp_path / "old")
    cfg = json.loads((tmp_path / "old" / "config.json").read_text())
    for k in ("family", "heads", "translate_augment"):
        cfg.pop(k)
    (tmp_path / "old" / "config.json").write_text(json.dumps(cfg))
    assert isinstance(CrystalFlow.from_pretrained(tmp_path / "old").net, CrystalDenoiser)
    with pytest.raises(ValueError, match="unknown generator family 'diffusion'"):
        CrystalFlow(family="diffusion")
    with pytest.raises(ValueError, match="multiple of heads"):
        AtomTransformerDenoiser(hidden=30, heads=4)


# ---------------------------------------------------------------------- exact resume through train.py
@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory):
    from data_pipelines.base import get_source
    from data_pipelines.build import build_shards

    out = tmp_path_factory.mktemp("family_shards")
    build_shards(get_source("builtin")(None, limit=40), out, progress=False)
    return out


def _losses(curve: Path) -> dict[int, float]:
    """train/loss by step from a learning curve (CSV)."""
    return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(curve.open()) if r.get("train/loss")}


def _families(workdir: Path, shards: Path, *extra: str) -> None:
    from generate_families import main

    main(["train", "--workdir", str(workdir), "--config", GENERATE_TINY, "--seconds", "600", *extra,
          "--", f"--data.shards={shards}", "--data.tokenizer=null", "--data.include_generated_text=false",
          "--model.init_args.pretrained=null", "--trainer.limit_val_batches=1", "--model.init_args.max_steps=4"])


@pytest.fixture(scope="module")
def family_runs(tiny_shards, tmp_path_factory):
    """Both families trained by benchmarks/generate_families.py: in two sittings (a) and in one (b)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    tmp = tmp_path_factory.mktemp("families")
    # one thread: CPU reductions in the same order in every run, so that parameters whose gradient is zero by
    # design (the coordinate bias, removed with the mean velocity) see the same rounding noise under Adam
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _families(tmp / "a", tiny_shards, "--sitting", "0")  # each family stops after its first epoch
        first = {f: json.loads((tmp / "a" / f / "status.json").read_text()) for f in ("flow_gnn", "transformer")}
        _families(tmp / "a", tiny_shards)  # the second call resumes both from their checkpoints
        _families(tmp / "b", tiny_shards)
    finally:
        torch.set_num_threads(threads)
    return tmp, first


def test_generator_training_resumes_exactly(family_runs):
    from safetensors.torch import load_file

    tmp, first = family_runs
    for family in ("flow_gnn", "transformer"):
        assert first[family]["global_step"] == 2 and not first[family]["done"]
        a = json.loads((tmp / "a" / family / "status.json").read_text())
        b = json.loads((tmp / "b" / family / "status.json").read_text())
        assert a["done"] and b["done"] and a["sittings"] == 2 and a["global_step"] == b["global_step"] == 4
        wa = load_file(tmp / "a" / family / "model" / "model.safetensors")
        wb = load_file(tmp / "b" / family / "model" / "model.safetensors")
        assert wa.keys() == wb.keys()
        for k in wa:
            assert torch.allclose(wa[k].float(), wb[k].float(), atol=1e-5), (family, k)
        # the learning curve joined from both sittings equals the uninterrupted one
        la = _losses(tmp / "a" / family / "learning_curve.csv")
        lb = _losses(tmp / "b" / family / "learning_curve.csv")
        assert sorted(la) == sorted(lb) == [0, 1, 2, 3]
        assert np.allclose([la[k] for k in sorted(la)], [lb[k] for k in sorted(lb)], rtol=1e-5)
        assert json.loads((tmp / "a" / family / "model" / "config.json").read_text())["family"] == family
    _families(tmp / "a", tiny_shards)  # a spent budget is not trained again
    assert json.loads((tmp / "a" / "transformer" / "status.json").read_text())["sittings"] == 2


def test_families_are_evaluated_the_same_way(family_runs, tiny_shards):
    from generate_families import main

    tmp, _ = family_runs
    res = tmp / "results" / "generate_families.json"
    main(["eval", "--workdir", str(tmp / "a"), "--shards", str(tiny_shards), "--n", "6", "--n-csp", "3",
          "--steps", "3", "--stages", "validity", "uniqueness", "novelty", "--workers", "1",
          "--result", str(res), "--merge", "--curves-dir", str(tmp / "results")])
    doc = json.loads(res.read_text())
    assert {"card", "date", "command", "metrics"} <= set(doc)
    for family in ("flow_gnn", "transformer"):
        m = doc["metrics"][family]
        assert m["n_generated"] == 6 and 0 <= m["valid"] <= 1 and m["structures_per_s"] > 0
        assert 0 <= m["csp_match_rate"] <= 1 and m["n_csp_materials"] == 3 and m["train_steps"] == 4
        assert (tmp / "results" / f"generate_families_{family}_train_metrics.csv").exists()
    merged = json.loads((tmp / "results" / "generate_denovo_eval.json").read_text())["metrics"]["families"]
    assert set(merged) == {"flow_gnn", "transformer"} and "unique_rate" in merged["transformer"]
    gen = json.loads((tmp / "results" / "generate.json").read_text())["metrics"]
    assert gen["csp_match_rate_generator"] == max(
        doc["metrics"][f]["csp_match_rate"] for f in ("flow_gnn", "transformer"))


def test_families_evaluated_apart_are_joined_with_each_part_kept(family_runs, tiny_shards):
    from generate_families import main

    tmp, _ = family_runs
    parts = []
    for family in ("flow_gnn", "transformer"):  # one family per process, as on one GPU each
        parts.append(tmp / "parts" / f"{family}.json")
        main(["eval", "--workdir", str(tmp / "a"), "--shards", str(tiny_shards), "--families", family, "--n", "4",
              "--n-csp", "2", "--steps", "2", "--stages", "validity", "--workers", "1", "--result", str(parts[-1])])
    res = tmp / "joined" / "generate_families.json"
    main(["join", *map(str, parts), "--result", str(res), "--merge"])
    doc = json.loads(res.read_text())
    single = [json.loads(p.read_text()) for p in parts]
    assert doc["metrics"]["flow_gnn"] == single[0]["metrics"]["flow_gnn"]
    assert doc["metrics"]["transformer"] == single[1]["metrics"]["transformer"]
    assert [p["families"] for p in doc["parts"]] == [["flow_gnn"], ["transformer"]]
    assert doc["card"] == single[0]["card"] and doc["parts"][1]["command"] == single[1]["command"]
    best = doc["metrics"]["best_family_by_csp_match_rate"]
    gen = json.loads((tmp / "joined" / "generate.json").read_text())["metrics"]
    assert gen["csp_match_rate_generator"] == doc["metrics"][best]["csp_match_rate"]
    assert gen["csp_match_rate_generator_family"] == best
    (tmp / "joined" / "generate.json").write_text(json.dumps({"metrics": {"csp_flow_match_rate": 1.5}}))
    main(["join", *map(str, parts), "--result", str(res), "--merge"])  # a better generate.py generator stays
    gen = json.loads((tmp / "joined" / "generate.json").read_text())["metrics"]
    assert gen["csp_match_rate_generator"] == 1.5 and gen["csp_match_rate_generator_family"].endswith("rate)")
    assert gen[f"csp_match_rate_generator_{best}"] == doc["metrics"][best]["csp_match_rate"]
    with pytest.raises(SystemExit, match="no family figures"):
        main(["join", str(tmp / "joined" / "generate.json"), "--result", str(tmp / "bad.json")])


def test_time_budget_carries_its_clock_and_schedule_across_sittings():
    from types import SimpleNamespace

    from mmmat.tasks.callbacks import TimeBudget

    a = TimeBudget(seconds=100)
    a.spent_before, a.planned_steps = 30.0, 500
    state = a.state_dict()
    b = TimeBudget(seconds=100)
    b.load_state_dict(state)
    assert b.elapsed() == pytest.approx(30.0) and b.planned_steps == 500
    trainer = SimpleNamespace(fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(max_steps=60000)))
    module = SimpleNamespace(total_steps=60000)
    b.on_train_start(trainer, module)
    assert trainer.fit_loop.epoch_loop.max_steps == 500 and module.total_steps == 500


def test_transformer_family_is_conditioned_like_the_gnn():
    torch.manual_seed(0)
    flow = CrystalFlow(hidden=16, layers=1, fourier=2, max_atoms=4, latent_dim=8, properties=["band_gap"],
                       family="transformer", heads=2).eval()
    for block in flow.net.blocks:
        torch.nn.init.normal_(block.mod.weight, std=0.2)
    latent = torch.nn.functional.normalize(torch.randn(2, 8), dim=-1)
    cond = flow.condition_vector(latent, torch.ones(2), torch.tensor([[1.0], [3.0]]), torch.ones(2, 1), 2, "cpu")
    counts = torch.tensor([2, 3])
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    plain = flow.sample(counts, cond=None, steps=3, generator=g())
    cond1 = flow.sample(counts, cond=cond, steps=3, generator=g())
    cfg = flow.sample(counts, cond=cond, steps=3, guidance=2.0, generator=g())
    assert not torch.allclose(plain["frac"], cond1["frac"]) and not torch.allclose(cond1["frac"], cfg["frac"])
    # guidance 0 is the unconditional model: the condition zeroed out, as dropped in training
    uncond = flow.sample(counts, cond=cond, steps=3, guidance=0.0, generator=g())
    zero = flow.sample(counts, cond=torch.zeros_like(cond), steps=3, generator=g())
    assert torch.allclose(uncond["frac"], zero["frac"], atol=1e-5)
