"""Frozen encoder parts in eval mode, the one AdamW parameter-group builder, metastable_rate's threshold,
and generator models saved with a retired buffer still loading."""

import numpy as np
import pytest
import torch
from torch import nn

from mmmat.heads.property import PropertyModel

ENC = {"name": "crystal/schnet", "hidden": 8, "num_interactions": 2, "cutoff": 4.0, "num_rbf": 8}


class _BNEncoder(nn.Module):
    """Two blocks with BatchNorm and a readout: the shape ``set_trainable`` expects of a crystal encoder."""

    def __init__(self, out_dim: int) -> None:
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(4, out_dim), nn.BatchNorm1d(out_dim))
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(out_dim, out_dim), nn.BatchNorm1d(out_dim), nn.Dropout(0.5)) for _ in range(2)
        )
        self.readout = nn.Linear(out_dim, out_dim)
        self.out_dim = out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for b in self.blocks:
            h = h + b(h)
        return self.readout(h)


def _model() -> PropertyModel:
    model = PropertyModel(ENC, ["y"], head_hidden=8)
    model.encoder = _BNEncoder(model.encoder.out_dim)
    return model


def _stats(model: PropertyModel) -> list[torch.Tensor]:
    return [m.running_mean.clone() for m in model.encoder.modules() if isinstance(m, nn.BatchNorm1d)]


@pytest.mark.parametrize("mode", ["linear_probe", "partial", "full_with_frozen_layers"])
def test_frozen_encoder_parts_keep_batchnorm_statistics(mode):
    torch.manual_seed(0)
    model = _model()
    if mode == "full_with_frozen_layers":
        model.set_trainable("full")
        for part in (model.encoder.embed, model.encoder.blocks[0]):
            part.requires_grad_(False)
    else:
        model.set_trainable(mode, unfreeze_last=1)
    model.train()  # what the trainer does at the start of every epoch
    before = _stats(model)
    for _ in range(3):
        model.heads["y"](model.encoder(torch.randn(16, 4) * 3 + 1))
    after = _stats(model)
    frozen = {"linear_probe": [True, True, True]}.get(mode, [True, True, False])  # embed, block 0, block 1
    for b, a, f in zip(before, after, frozen, strict=True):
        assert torch.equal(b, a) == f
    assert model.encoder.blocks[0][2].training is False  # frozen dropout is off too
    assert model.heads.training
    assert model.encoder.blocks[1].training == (mode != "linear_probe")
    model.eval()
    assert not any(m.training for m in model.modules())


def test_adamw_param_groups_one_builder():
    from mmmat.tasks.schedule import adamw_param_groups

    net = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    net[2].weight.requires_grad_(False)
    groups = adamw_param_groups(net.named_parameters(), 1e-3, 0.05)
    assert [(g["lr"], g["weight_decay"], len(g["params"])) for g in groups] == [(1e-3, 0.05, 1), (1e-3, 0.0, 4)]
    groups = adamw_param_groups(net.named_parameters(), 1e-3, 0.05, lr_scale=lambda n: 0.1 if n.startswith("0.") else 1,
                                part=lambda n: "first" if n.startswith("0.") else "rest")
    got = [(g["part"], g["lr"], g["weight_decay"], len(g["params"])) for g in groups]
    assert got == [("first", pytest.approx(1e-4), 0.05, 1), ("first", pytest.approx(1e-4), 0.0, 1),
                   ("rest", 1e-3, 0.0, 3)]
    torch.optim.AdamW(groups)  # a valid optimiser argument
    import inspect

    from mmmat.tasks import finetune, generate, pretrain

    for mod in (pretrain, finetune, generate):  # the training tasks build their groups with it
        assert "adamw_param_groups(" in inspect.getsource(mod)


def test_metastable_rate_follows_its_threshold(monkeypatch, nacl):
    from mmmat.evaluation import generation
    from mmmat.evaluation.generation_stability import HullReference

    eh = np.array([0.0, 0.05, 0.15, 0.3])

    def fake_stability(structures, hull, **_):
        return {"hull": hull, "energy_per_atom": -np.ones(len(structures)), "e_above_hull": eh[: len(structures)],
                "structures": list(structures)}

    monkeypatch.setattr(generation, "stability", fake_stability)
    hull = HullReference(["Na", "Cl"], [-1.0, -1.0], ["na", "cl"])
    rates = {}
    for threshold in (0.1, 0.2):
        rep = generation.evaluate_generated([nacl] * 4, [nacl], stages=("stability",), hull=hull,
                                            stable_threshold=threshold, relax=False)
        rates[threshold] = rep["metrics"]["metastable_rate"]
        assert rep["metrics"]["stable_rate"] == pytest.approx(0.25)
    assert rates == {0.1: pytest.approx(0.5), 0.2: pytest.approx(0.75)}


def test_generator_saved_with_the_retired_species_histogram_loads(tmp_path):
    from safetensors.torch import load_file, save_file

    from mmmat.generative.flow import CrystalFlow

    flow = CrystalFlow(hidden=16, layers=1, fourier=2, max_atoms=8)
    assert "species_hist" not in flow.state_dict()
    flow.save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    state["species_hist"] = torch.ones(flow.num_species)  # as written before the buffer was removed
    save_file(state, str(tmp_path / "model.safetensors"))
    back = CrystalFlow.from_pretrained(tmp_path)
    for k, v in flow.state_dict().items():
        assert torch.equal(v, back.state_dict()[k])
