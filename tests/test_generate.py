import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import flat_crystal_tensors, rocksalt_and_wurtzite
from pymatgen.core import Lattice

from data_pipelines.base import BuildOptions, get_source
from data_pipelines.build import build_shards
from mmmat.generative.api import (
    GenerationError,
    Generator,
    condition_vectors,
    generate,
    load_generator,
    parse_composition,
    sample_structures,
    write_samples,
)
from mmmat.generative.flow import (
    CrystalDenoiser,
    CrystalFlow,
    all_pairs,
    lattice_from_params,
    lattice_params,
    wrap,
)

ROOT = Path(__file__).resolve().parents[1]
PRETRAIN_TINY = str(ROOT / "configs" / "pretrain" / "tiny.yaml")
GENERATE_TINY = str(ROOT / "configs" / "generate" / "tiny.yaml")


def test_lattice_parameters_match_pymatgen():
    lat = Lattice.from_parameters(4.1, 5.3, 6.2, 81, 97, 104)
    p = lattice_params(torch.tensor(lat.matrix, dtype=torch.float64)[None])[0]
    assert np.allclose(p[:3].numpy(), lat.abc, atol=1e-9)
    assert np.allclose(np.degrees(p[3:].numpy()), lat.angles, atol=1e-9)
    back = lattice_from_params(p[None])[0].numpy()
    assert np.allclose(back, Lattice.from_parameters(*lat.parameters).matrix, atol=1e-9)


def test_all_pairs_stay_inside_each_crystal():
    counts = torch.tensor([1, 3, 2])
    batch = torch.repeat_interleave(torch.arange(3), counts)
    src, tgt = all_pairs(batch, counts)
    assert src.numel() == 0 + 6 + 2
    assert bool((batch[src] == batch[tgt]).all()) and bool((src != tgt).all())
    assert len({(int(a), int(b)) for a, b in zip(src, tgt)}) == 8


def test_wrap_is_the_shortest_torus_difference():
    x = torch.tensor([0.9, -0.9, 0.2, 0.5 - 1e-6])
    assert torch.allclose(wrap(x), torch.tensor([-0.1, 0.1, 0.2, 0.5 - 1e-6]), atol=1e-6)


def _state(seed=0):
    g = torch.Generator().manual_seed(seed)
    counts = torch.tensor([3, 4])
    batch = torch.repeat_interleave(torch.arange(2), counts)
    y = torch.randn(2, 6, generator=g)
    f = torch.rand(7, 3, generator=g)
    s = torch.randn(7, 100, generator=g)
    t = torch.rand(2, generator=g)
    return y, f, s, t, t.clone(), batch, counts


def test_denoiser_is_permutation_equivariant_and_translation_invariant():
    torch.manual_seed(0)
    net = CrystalDenoiser(hidden=32, layers=2, fourier=3).eval()
    y, f, s, t, ts, batch, counts = _state()
    vy, vf, vs = net(y, f, s, t, ts, batch, counts)
    perm = torch.tensor([2, 0, 1, 6, 4, 3, 5])
    vy2, vf2, vs2 = net(y, f[perm], s[perm], t, ts, batch, counts)
    assert torch.allclose(vy, vy2, atol=1e-5)
    assert torch.allclose(vf[perm], vf2, atol=1e-5) and torch.allclose(vs[perm], vs2, atol=1e-5)
    shift = torch.tensor([0.37, -0.21, 0.9])
    vy3, vf3, _ = net(y, (f + shift) % 1.0, s, t, ts, batch, counts)
    assert torch.allclose(vy, vy3, atol=1e-5) and torch.allclose(vf, vf3, atol=1e-5)
    # periodic: moving one atom by a whole lattice vector changes nothing
    f4 = f.clone()
    f4[0] += 1.0
    assert torch.allclose(net(y, f4, s, t, ts, batch, counts)[1], vf, atol=1e-4)


@pytest.fixture(scope="module")
def overfit_flow():
    """A small flow trained to memorise two crystals (CSP and de novo rows)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    structs = rocksalt_and_wurtzite()
    flow = CrystalFlow(hidden=32, layers=2, fourier=4, max_atoms=8)
    lat, frac, z, counts, batch = flat_crystal_tensors(structs)
    flow.fit_statistics(lat, counts, z)
    rep = 16
    lat_r, frac_r, z_r, counts_r, _ = flat_crystal_tensors(structs * rep)
    batch_r = torch.repeat_interleave(torch.arange(2 * rep), counts_r)
    opt = torch.optim.Adam(flow.parameters(), lr=3e-3)
    losses = []
    for _ in range(300):
        csp = torch.arange(2 * rep) % 4 != 0
        out = flow.loss(lat_r, frac_r, z_r, batch_r, counts_r, csp)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(float(out["loss"].detach()))
    yield flow, structs, losses
    torch.set_num_threads(threads)


def test_flow_training_reduces_the_loss(overfit_flow):
    _, _, losses = overfit_flow
    assert np.mean(losses[-50:]) < 0.6 * np.mean(losses[:20])


def test_csp_sampling_recovers_a_memorised_crystal(overfit_flow):
    from pymatgen.analysis.structure_matcher import StructureMatcher

    flow, structs, _ = overfit_flow
    flow.eval()
    nacl = structs[0]
    out = sample_structures(flow, [2] * 8, [11, 17] * 8, steps=50, seed=0)
    m = StructureMatcher(stol=0.5, angle_tol=10, ltol=0.3)
    matched = sum(s is not None and m.fit(s, nacl) for s in out)
    assert matched >= 6, matched


def test_sampling_is_reproducible_and_seed_dependent(overfit_flow):
    flow, _, _ = overfit_flow
    flow.eval()
    a = sample_structures(flow, [2, 4, 3], steps=5, seed=1)
    b = sample_structures(flow, [2, 4, 3], steps=5, seed=1)
    c = sample_structures(flow, [2, 4, 3], steps=5, seed=2)
    assert [s.lattice.abc for s in a] == [s.lattice.abc for s in b]
    assert all(np.array_equal(x.frac_coords, y.frac_coords) for x, y in zip(a, b))
    assert any(not np.allclose(x.frac_coords, y.frac_coords) for x, y in zip(a, c))
    assert [len(s) for s in a] == [2, 4, 3]


def test_save_load_and_written_files_parse_back(overfit_flow, tmp_path):
    from ase.io import read as ase_read
    from pymatgen.core import Structure as S

    flow, _, _ = overfit_flow
    flow.save_pretrained(tmp_path / "gen", extra={"condition_modalities": [], "condition_model": None})
    gen = load_generator(tmp_path / "gen", device="cpu")
    a = sample_structures(flow, [2, 4], steps=5, seed=3)
    b = sample_structures(gen.flow, [2, 4], steps=5, seed=3)
    assert all(np.allclose(x.frac_coords, y.frac_coords, atol=1e-6) for x, y in zip(a, b))
    structures, info = generate(gen, 5, seed=0, steps=5)
    out = write_samples(structures, tmp_path / "samples", info)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["mode"] == "de_novo" and manifest["n"] == 5 and len(manifest["samples"]) == 5
    for entry, s in zip(manifest["samples"], structures):
        back = S.from_file(out / entry["file"])
        assert len(back) == len(s)
        assert np.allclose(back.lattice.abc, s.lattice.abc, atol=1e-4)
    assert len(ase_read(out / "samples.extxyz", index=":")) == 5
    assert manifest["generation"]["structures_per_s"] > 0


def test_csp_generation_keeps_the_composition(overfit_flow):
    flow, _, _ = overfit_flow
    gen = Generator(flow.eval(), None, Path("."), "cpu", [])
    structures, info = generate(gen, 3, composition="Ga2N2", steps=5)
    assert info["mode"] == "csp"
    assert all(s.composition.reduced_formula == "GaN" and len(s) == 4 for s in structures)


def test_bad_generation_requests_are_refused(overfit_flow, tmp_path):
    flow, _, _ = overfit_flow
    gen = Generator(flow.eval(), None, Path("gen"), "cpu", [])
    with pytest.raises(GenerationError, match="without latent"):
        generate(gen, 2, text="a cubic salt")
    with pytest.raises(GenerationError, match="unknown targets"):
        condition_vectors(gen, 2, targets={"band_gap": 1.0})
    with pytest.raises(GenerationError, match="cannot read the composition"):
        parse_composition("Xx2Qq")
    with pytest.raises(GenerationError, match="whole positive"):
        parse_composition("Na0.5Cl")
    with pytest.raises(GenerationError, match="more than"):
        parse_composition("Na10Cl10", max_atoms=8)
    with pytest.raises(GenerationError, match="at least 1"):
        generate(gen, 0)
    with pytest.raises(GenerationError, match="not a generator folder"):
        load_generator(tmp_path / "nothing")


# ---------------------------------------------------------------------- through train.py and the CLI
@pytest.fixture(scope="module")
def tiny_generator(tmp_path_factory):
    import train

    tmp = tmp_path_factory.mktemp("gen")
    shards = tmp / "shards"
    build_shards(
        get_source("builtin")(None, limit=40), shards, progress=False, options=BuildOptions(describe=True)
    )
    train.main(
        [
            "fit",
            "--config",
            PRETRAIN_TINY,
            f"--data.shards={shards}",
            f"--data.tokenizer={tmp}/tok",
            f"--trainer.default_root_dir={tmp}",
            f"--trainer.logger.init_args.save_dir={tmp}",
            f"--model.init_args.save_dir={tmp}/pre",
            "--trainer.max_epochs=1",
        ]
    )
    cli = train.main(
        [
            "fit",
            "--config",
            GENERATE_TINY,
            f"--data.shards={shards}",
            f"--data.tokenizer={tmp}/pre/tokenizer",
            f"--trainer.default_root_dir={tmp}",
            f"--trainer.logger.init_args.save_dir={tmp}",
            f"--model.init_args.pretrained={tmp}/pre",
            f"--model.init_args.save_dir={tmp}/gen",
        ]
    )
    return tmp, shards, cli


def test_tiny_generator_trains_through_train_py(tiny_generator):
    tmp, _, cli = tiny_generator
    assert cli.trainer.global_step == 4  # 40 train materials, batch 16 (last partial batch dropped), 2 epochs
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
    assert np.isfinite(metrics["train/loss"]) and np.isfinite(metrics["val/loss"])
    cfg = json.loads((tmp / "gen" / "config.json").read_text())
    assert cfg["format"] == "mmmat.CrystalFlow" and cfg["properties"] == ["density"]
    assert cfg["latent_dim"] == 32 and (tmp / "gen" / "condition_model" / "config.json").exists()
    assert set(cfg["condition_modalities"]) >= {"crystal", "xrd", "literature_text"}


def test_generator_validation_is_deterministic_and_leaves_the_global_rng_alone(tiny_generator):
    _, _, cli = tiny_generator
    module, dm = cli.model, cli.datamodule
    module.eval()
    batch = next(iter(dm.val_dataloader()))
    logged = []
    module.log_dict = lambda d, **kw: logged.append({k: float(v) for k, v in d.items()})
    torch.manual_seed(123)
    with torch.no_grad():
        for idx in (0, 0, 1):
            torch.rand(7)  # the global state moves between validations, as training moves it
            before = torch.get_rng_state()
            module.validation_step(batch, idx)
            assert torch.equal(torch.get_rng_state(), before)
    assert logged[0] == logged[1]  # the same loss in every validation of the same batch
    assert logged[0] != logged[2]  # another batch index draws other noise


def test_generate_cli_with_conditions(tiny_generator, tmp_path):
    from typer.testing import CliRunner

    from mmmat.cli import app
    from mmmat.data.xrd import TWO_THETA, compute_peaks, render_profile

    tmp, _, _ = tiny_generator
    nacl = rocksalt_and_wurtzite()[0]
    prof = render_profile(compute_peaks(nacl))
    xy = tmp_path / "p.xy"
    np.savetxt(xy, np.stack([TWO_THETA, prof], 1))
    r = CliRunner().invoke(
        app,
        [
            "generate",
            "--model",
            str(tmp / "gen"),
            "-n",
            "3",
            "--out",
            str(tmp_path / "o"),
            "--xrd",
            str(xy),
            "--composition",
            "Na2Cl2",
            "--target",
            "density=2.1",
            "--guidance",
            "2",
            "--steps",
            "4",
            "--seed",
            "5",
        ],
    )
    assert r.exit_code == 0, r.output
    man = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert man["mode"] == "csp" and man["condition"]["latent"]["modality"] == "xrd"
    assert man["condition"]["targets"] == {"density": 2.1}
    assert len(list((tmp_path / "o").glob("sample_*.cif"))) == 3
    r = CliRunner().invoke(
        app,
        [
            "generate",
            "--model",
            str(tmp / "gen"),
            "-n",
            "2",
            "--out",
            str(tmp_path / "t"),
            "--text",
            "rock salt structure",
            "--steps",
            "3",
        ],
    )
    assert r.exit_code == 0, r.output
    for bad, msg in [
        (["--target", "density"], "NAME=VALUE"),
        (["--target", "bandgap=1"], "unknown targets"),
        (["--xrd", str(tmp_path / "missing.xy")], "not found"),
        (["--composition", "Qq2"], "composition"),
        (["--text", "a", "--xrd", str(xy)], "one latent condition"),
    ]:
        r = CliRunner().invoke(
            app,
            [
                "generate",
                "--model",
                str(tmp / "gen"),
                "-n",
                "2",
                "--out",
                str(tmp_path / "x"),
                "--steps",
                "2",
                *bad,
            ],
        )
        assert r.exit_code == 2, (bad, r.output)
        assert msg in r.output, (bad, r.output)
    r = CliRunner().invoke(
        app, ["generate", "--model", str(tmp_path / "none"), "-n", "2", "--out", str(tmp_path / "y")]
    )
    assert r.exit_code == 2 and "not a generator folder" in r.output


def test_generator_checkpoints_leave_out_the_frozen_conditioning_model(tiny_generator, tmp_path):
    from mmmat.tasks.generate import CrystalGeneration

    _, _, cli = tiny_generator
    ckpt = tmp_path / "g.ckpt"
    cli.trainer.save_checkpoint(ckpt)
    state = torch.load(ckpt, weights_only=False)
    assert state["state_dict"] and not any(k.startswith("cond_model.") for k in state["state_dict"])
    assert state["condition_model_fingerprint"].startswith("sha256:")
    fresh = CrystalGeneration(**{k: v for k, v in cli.model.hparams.items() if not k.startswith("_")})
    fresh.on_load_checkpoint(state)
    fresh.load_state_dict(state["state_dict"])  # strict: the conditioning weights came back from `pretrained`
    for k, v in cli.model.flow.state_dict().items():
        assert torch.equal(fresh.flow.state_dict()[k], v), k
    state["condition_model_fingerprint"] = "sha256:other"
    with pytest.raises(ValueError, match="another conditioning model"):
        fresh.on_load_checkpoint(state)
