"""Every shipped config parses; encoder configs are typed (unknown keys fail, dotted overrides change one field)."""

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
TRAIN_CONFIGS = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if p.parent.name != "design")
DESIGN_CONFIGS = sorted((ROOT / "configs" / "design").glob("*.yaml"))
TINY = ROOT / "configs" / "pretrain" / "tiny.yaml"
#: Configs laid over another one (their first lines say so), parsed on top of that base.
OVERLAY_BASES = {"generate/transformer.yaml": "generate/mp20p.yaml"}


def _print_config(args: list[str], capsys) -> dict:
    import train

    with pytest.raises(SystemExit) as e:
        train.main(["fit", *args, "--print_config"])
    assert e.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def _encoder_entries(model: dict) -> dict:
    args = model["init_args"]
    if "encoders" in args:
        return dict(args["encoders"])
    return {"encoder": args["encoder"]} if args.get("encoder") else {}


def test_shipped_configs_are_found():
    names = {p.relative_to(ROOT / "configs").as_posix() for p in TRAIN_CONFIGS}
    assert {"pretrain/tiny.yaml", "finetune/tiny.yaml", "generate/tiny.yaml", "pretrain/mp20p.yaml"} <= names
    assert DESIGN_CONFIGS


def test_every_training_config_parses_with_print_config(capsys, monkeypatch):
    """``train.py fit --config X --print_config`` for each shipped training config (design configs below)."""
    from mmmat.encoders import list_encoder_configs

    monkeypatch.chdir(ROOT)
    typed = {f"{c.__module__}.{c.__qualname__}" for c in list_encoder_configs().values()}
    n_encoders = 0
    for path in TRAIN_CONFIGS:
        raw = yaml.safe_load(path.read_text())
        base = OVERLAY_BASES.get(path.relative_to(ROOT / "configs").as_posix())
        args = ["--config", str(path.relative_to(ROOT))]
        if base is not None:
            args = ["--config", f"configs/{base}", *args]
            raw = yaml.safe_load((ROOT / "configs" / base).read_text())
            assert _encoder_entries(yaml.safe_load(path.read_text())["model"]) == {}, path
        cfg = _print_config(args, capsys)
        assert cfg["model"]["class_path"] == raw["model"]["class_path"], path
        for modality, enc in _encoder_entries(cfg["model"]).items():
            assert enc["class_path"] in typed, (path, modality, enc)
            raw_args = _encoder_entries(raw["model"])[modality].get("init_args") or {}
            for key, value in raw_args.items():  # the file's values survive, the defaults are filled in
                assert enc["init_args"][key] == value or list(enc["init_args"][key]) == value, (path, key)
            n_encoders += 1
    assert n_encoders >= 20


@pytest.mark.parametrize("path", DESIGN_CONFIGS, ids=lambda p: p.name)
def test_every_design_config_loads(path):
    from mmmat.design.config import load_config

    cfg = load_config(path)
    assert cfg.name and cfg.budget > 0


def test_unknown_encoder_key_is_an_error_naming_it(capsys, monkeypatch):
    import train

    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit):
        train.main(["fit", "--config", str(TINY), "--model.init_args.encoders.xrd.init_args.widht=3", "--print_config"])
    assert "widht" in capsys.readouterr().err
    typo = {"xrd": {"class_path": "mmmat.encoders.spectrum.XRDCNNEncoderConfig", "init_args": {"out_dimm": 3}}}
    with pytest.raises(SystemExit):
        train.main(["fit", "--config", str(TINY), f"--model.init_args.encoders={yaml.safe_dump(typo)}",
                    "--print_config"])
    assert "out_dimm" in capsys.readouterr().err
    # the library path checks the same
    from mmmat.encoders import encoder_spec

    with pytest.raises(ValueError, match="out_dimm"):
        encoder_spec(typo["xrd"])


def test_dotted_override_changes_one_field(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    base = _print_config(["--config", str(TINY)], capsys)["model"]["init_args"]["encoders"]
    new = _print_config(["--config", str(TINY), "--model.init_args.encoders.xrd.init_args.out_dim=64"],
                        capsys)["model"]["init_args"]["encoders"]
    assert new["xrd"]["init_args"]["out_dim"] == 64 and base["xrd"]["init_args"]["out_dim"] == 32
    assert {k: v for k, v in new["xrd"]["init_args"].items() if k != "out_dim"} == \
        {k: v for k, v in base["xrd"]["init_args"].items() if k != "out_dim"}
    assert {m: e for m, e in new.items() if m != "xrd"} == {m: e for m, e in base.items() if m != "xrd"}
    ft = ROOT / "configs" / "finetune" / "tiny.yaml"
    enc = _print_config(["--config", str(ft), "--model.init_args.encoder.init_args.hidden=24"],
                        capsys)["model"]["init_args"]["encoder"]["init_args"]
    assert enc["hidden"] == 24 and enc["num_interactions"] == 2 and enc["num_rbf"] == 16


def test_typed_and_plain_encoder_configs_build_the_same_model():
    """Saved models keep the plain ``{"name", ...}`` form; both forms and config objects give equal models."""
    import torch

    from mmmat.encoders import encoder_spec
    from mmmat.encoders.spectrum import XRDCNNEncoderConfig
    from mmmat.encoders.text import TextEncoderConfig
    from mmmat.latent.model import MultimodalModel

    typed = yaml.safe_load(TINY.read_text())["model"]["init_args"]["encoders"]
    plain = {m: encoder_spec(c) for m, c in typed.items()}
    assert plain["xrd"] == {"name": "xrd/cnn", "out_dim": 32, "num_bins": 256, "widths": [8, 16], "depths": [1, 1],
                            "hidden_dim": 32}
    objs = {m: c for m, c in plain.items()}
    objs["xrd"] = XRDCNNEncoderConfig(out_dim=32, num_bins=256, widths=[8, 16], depths=[1, 1], hidden_dim=32)
    sizes = []
    for encoders in (typed, plain, objs):
        torch.manual_seed(0)
        model = MultimodalModel(encoders, embed_dim=16)
        assert model.config["encoders"] == plain
        sizes.append(sum(p.numel() for p in model.parameters()))
    assert len(set(sizes)) == 1
    # a text slot's encoder reads that slot's text field (the config leaves ``modality`` to the slot)
    assert model.encoders["literature_text"].modality == "literature_text"
    assert "modality" not in TextEncoderConfig(hidden=8).spec()
    with pytest.raises(ValueError, match="class_path"):
        encoder_spec({"hidden": 3})


def test_old_plain_encoder_dict_in_yaml_stops_with_the_typed_replacement(tmp_path, monkeypatch):
    import train

    monkeypatch.chdir(ROOT)
    doc = yaml.safe_load((ROOT / "configs" / "finetune" / "tiny.yaml").read_text())
    doc["model"]["init_args"]["encoder"] = {"name": "crystal/schnet", "hidden": 32}
    old = tmp_path / "old.yaml"
    old.write_text(yaml.safe_dump(doc))
    with pytest.raises(SystemExit) as e:
        train.main(["fit", "--config", str(old), "--print_config"])
    msg = str(e.value.code)
    assert "model.init_args.encoder" in msg and "class_path: mmmat.encoders.crystal.CrystalEncoderConfig" in msg
    assert "init_args: {hidden: 32}" in msg


def test_a_new_encoder_gets_its_typed_config_in_one_line(monkeypatch):
    """The pattern a new modality's encoder follows: register the class, then ``encoder_config(name)``."""
    from torch import nn

    from mmmat.encoders import registry

    monkeypatch.setattr(registry, "_ENCODERS", dict(registry._ENCODERS))
    monkeypatch.setattr(registry, "_CONFIGS", dict(registry._CONFIGS))

    @registry.register_encoder("spectrum/test")
    class TestSpectrumEncoder(nn.Module):
        def __init__(self, out_dim: int = 4, scale: float = 1.0) -> None:
            super().__init__()
            self.out_dim = out_dim
            self.lin = nn.Linear(1, out_dim)

    cfg_cls = registry.encoder_config("spectrum/test")
    assert cfg_cls.__qualname__ == "TestSpectrumEncoderConfig" and cfg_cls.name == "spectrum/test"
    assert cfg_cls(out_dim=8, scale=1.0).spec() == {"name": "spectrum/test", "out_dim": 8}
    assert cfg_cls(out_dim=8).build().out_dim == 8
    path = f"{cfg_cls.__module__}.TestSpectrumEncoderConfig"
    assert registry.encoder_spec({"class_path": path, "init_args": {"scale": 2.0}}) == {"name": "spectrum/test",
                                                                                         "scale": 2.0}
    with pytest.raises(ValueError, match="sclae"):
        registry.encoder_spec({"class_path": path, "init_args": {"sclae": 2.0}})
    # the same class under a second name needs a config class of its own name
    registry.register_encoder("spectrum/test2")(TestSpectrumEncoder)
    with pytest.raises(KeyError, match="qualname"):
        registry.encoder_config("spectrum/test2")
    assert registry.encoder_config("spectrum/test2", "TestSpectrum2Config").name == "spectrum/test2"
