"""Property surrogates with an uncertainty, their embeddings, and fine-tuning on oracle labels.

Two kinds share one surface (``predict`` -> means, standard deviations, disagreement, embeddings; ``update``
with new labels):

- :class:`EnsembleSurrogate`: a deep ensemble of small MLPs on Magpie composition statistics plus volume per
  atom, density and log atom count. The members' spread is the epistemic uncertainty (ensemble disagreement);
  the embedding is the first member's last hidden layer. Trains in seconds on a CPU.
- :class:`PropertyModelSurrogate`: saved :class:`~mmmat.heads.property.PropertyModel` folders. One folder uses
  its heads' own variance; several form an ensemble (their means' spread is the disagreement). The embedding is
  the crystal encoder's output; fine-tuning trains the heads (encoder frozen).

Predictions are in the units of the label columns.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn


def crystal_features(structures: Sequence[Any]) -> np.ndarray:
    """(N, 135): Magpie composition statistics (132), volume per atom (Å³), density (g/cm³), log atom count."""
    from mmmat.evaluation.generation_fingerprints import composition_fingerprint

    rows = []
    for s in structures:
        comp = composition_fingerprint(s.composition)
        extra = [s.volume / len(s), float(s.density), np.log(len(s))]
        rows.append(np.concatenate([np.asarray(comp, dtype=np.float64), extra]))
    return np.asarray(rows, dtype=np.float64)


class _MLP(nn.Module):
    def __init__(self, d_in: int, hidden: int, d_out: int):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(d_in, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU())
        self.out = nn.Linear(hidden, d_out)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(x)
        return self.out(h), h


class Surrogate:
    """Interface of a surrogate."""

    targets: list[str]

    def predict(self, structures: Sequence[Any]) -> dict[str, np.ndarray]:
        """``mean`` (N, T), ``std`` (N, T) total, ``disagreement`` (N, T) between members, ``embedding`` (N, D)."""
        raise NotImplementedError

    def update(self, structures: Sequence[Any], labels: np.ndarray) -> None:
        """Fine-tune on new labels (N, T) in target order (NaN: missing)."""
        raise NotImplementedError

    def train_embeddings(self) -> np.ndarray:
        """Embeddings of (a subset of) the training crystals, for the distance-to-data guard."""
        raise NotImplementedError


class EnsembleSurrogate(Surrogate):
    """A deep ensemble of MLPs on crystal features.

    Args:
        targets: Label names.
        members: Ensemble members (each trained on a bootstrap resample, its own initialisation).
        hidden: Hidden width.
        epochs: Training epochs.
        finetune_epochs: Epochs of each :meth:`update`.
        seed: Seed.
    """

    def __init__(self, targets: Sequence[str], members: int = 5, hidden: int = 64, epochs: int = 60,
                 finetune_epochs: int = 20, seed: int = 0):
        self.targets = list(targets)
        self.n_members, self.hidden = int(members), int(hidden)
        self.epochs, self.finetune_epochs = int(epochs), int(finetune_epochs)
        self.seed = int(seed)
        self.models: list[_MLP] = []
        self.x = np.zeros((0, 135))
        self.y = np.zeros((0, len(self.targets)))
        self.x_mean = self.x_std = self.y_mean = self.y_std = None
        self._train_emb = None

    def fit(self, structures: Sequence[Any], labels: np.ndarray, features: np.ndarray | None = None
            ) -> EnsembleSurrogate:
        """Train from scratch on structures and labels (N, T) (``features``: precomputed crystal features)."""
        self.x = crystal_features(structures) if features is None else np.asarray(features, dtype=np.float64)
        self.y = np.asarray(labels, dtype=np.float64).reshape(len(self.x), len(self.targets))
        self.x_mean = np.nanmean(self.x, 0)
        self.x_std = np.nanstd(self.x, 0) + 1e-6
        self.y_mean = np.nanmean(self.y, 0)
        self.y_std = np.nanstd(self.y, 0) + 1e-6
        g = torch.Generator().manual_seed(self.seed)
        self.models = []
        for _ in range(self.n_members):
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=g)))
            self.models.append(_MLP(self.x.shape[1], self.hidden, len(self.targets)))
        self._train(self.epochs, g)
        self._train_emb = None
        return self

    def _xt(self, x: np.ndarray) -> torch.Tensor:
        z = (x - self.x_mean) / self.x_std
        return torch.as_tensor(np.nan_to_num(z, nan=0.0, posinf=0.0, neginf=0.0), dtype=torch.float32)

    def _train(self, epochs: int, g: torch.Generator) -> None:
        from mmmat.evaluation.generation_stability import torch_threads

        with torch_threads(1):  # a small MLP: threads only contend, above all on a busy CPU
            self._train_members(epochs, g)

    def _train_members(self, epochs: int, g: torch.Generator) -> None:
        x = self._xt(self.x)
        y = torch.as_tensor((self.y - self.y_mean) / self.y_std, dtype=torch.float32)
        n = len(x)
        for m in self.models:
            idx = torch.randint(0, n, (n,), generator=g)  # bootstrap resample
            opt = torch.optim.AdamW(m.parameters(), lr=3e-3, weight_decay=1e-4)
            m.train()
            for _ in range(epochs):
                perm = idx[torch.randperm(n, generator=g)]
                for lo in range(0, n, 512):
                    b = perm[lo : lo + 512]
                    pred, _ = m(x[b])
                    yb = y[b]
                    mask = torch.isfinite(yb)
                    if not mask.any():
                        continue
                    loss = ((pred - torch.nan_to_num(yb)) ** 2)[mask].mean()
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
            m.eval()

    @torch.no_grad()
    def predict(self, structures: Sequence[Any]) -> dict[str, np.ndarray]:
        """See :meth:`Surrogate.predict`."""
        if not len(structures):
            t, d = len(self.targets), self.hidden
            return {"mean": np.zeros((0, t)), "std": np.zeros((0, t)), "disagreement": np.zeros((0, t)),
                    "embedding": np.zeros((0, d))}
        x = self._xt(crystal_features(structures))
        outs, emb = [], None
        for k, m in enumerate(self.models):
            p, h = m(x)
            outs.append(p.numpy())
            if k == 0:
                emb = h.numpy()
        p = np.stack(outs) * self.y_std + self.y_mean
        std = p.std(0)
        return {"mean": p.mean(0), "std": std, "disagreement": std, "embedding": emb}

    def update(self, structures: Sequence[Any], labels: np.ndarray) -> None:
        """Append the labelled crystals (weighted ×5 by repetition) and train every member further."""
        if not len(structures):
            return
        xn = crystal_features(structures)
        yn = np.asarray(labels, dtype=np.float64).reshape(len(xn), len(self.targets))
        self.x = np.concatenate([self.x, *[xn] * 5])
        self.y = np.concatenate([self.y, *[yn] * 5])
        self._train(self.finetune_epochs, torch.Generator().manual_seed(self.seed + len(self.x)))
        self._train_emb = None  # the embedding (a member's hidden layer) moved with the training

    @torch.no_grad()
    def train_embeddings(self) -> np.ndarray:
        """First member's hidden layer of up to 4,000 training crystals."""
        if self._train_emb is None:
            rng = np.random.default_rng(self.seed)
            idx = rng.permutation(len(self.x))[:4000]
            self._train_emb = self.models[0](self._xt(self.x[idx]))[1].numpy()
        return self._train_emb


class PropertyModelSurrogate(Surrogate):
    """Saved PropertyModel folders as the surrogate (see the module docstring).

    Args:
        paths: PropertyModel folders (one: the heads' variance; several: an ensemble).
        targets: Targets used (each must be a head of every model).
        finetune_epochs: Epochs of each :meth:`update` (heads only).
        reference: Training crystals, for the distance-to-data guard (a subset is embedded).
        device: Torch device.
        seed: Seed.
    """

    def __init__(self, paths: Sequence[str], targets: Sequence[str], finetune_epochs: int = 20,
                 reference: Sequence[Any] = (), device: str = "cpu", seed: int = 0):
        from mmmat.heads.property import PropertyModel

        self.models = [PropertyModel.from_pretrained(p, map_location=device) for p in paths]
        self.targets = list(targets)
        for p, m in zip(paths, self.models):
            missing = sorted(set(self.targets) - set(m.target_names))
            if missing:
                raise ValueError(f"{p}: the property model has no head for {missing} (it has {m.target_names})")
        self.finetune_epochs = int(finetune_epochs)
        rng = np.random.default_rng(seed)
        ref = list(reference)
        self.reference = [ref[i] for i in rng.permutation(len(ref))[:2000]]
        self.device = device
        self._train_emb = None

    def _embed(self, model, structures) -> np.ndarray:
        from mmmat.data.batch import Collator
        from mmmat.data.schema import as_records

        collate = Collator(cutoff=model.config["cutoff"])
        recs = as_records(list(structures))
        out = []
        with torch.no_grad():
            for lo in range(0, len(recs), 256):
                out.append(model.embed(collate(recs[lo : lo + 256]).to(self.device)).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, model.encoder.out_dim))

    def predict(self, structures: Sequence[Any]) -> dict[str, np.ndarray]:
        """See :meth:`Surrogate.predict`."""
        n = len(structures)
        means, variances = [], []
        for m in self.models:
            p = m.predict_records(list(structures)) if n else {}
            means.append(np.stack([p.get(t, np.zeros(0)) for t in self.targets], 1) if n else
                         np.zeros((0, len(self.targets))))
            variances.append(np.stack([p.get(f"{t}_std", np.zeros(0)) ** 2 for t in self.targets], 1) if n else
                             np.zeros((0, len(self.targets))))
        mu = np.stack(means)
        dis = mu.std(0)
        std = np.sqrt(np.stack(variances).mean(0) + dis**2)
        emb = self._embed(self.models[0], structures) if n else np.zeros((0, self.models[0].encoder.out_dim))
        return {"mean": mu.mean(0), "std": std, "disagreement": dis if len(self.models) > 1 else std,
                "embedding": emb}

    def update(self, structures: Sequence[Any], labels: np.ndarray) -> None:
        """Train the heads (encoders frozen) on the labelled crystals."""
        from mmmat.data.batch import Collator
        from mmmat.data.schema import as_records

        if not len(structures) or self.finetune_epochs <= 0:
            return
        labels = np.asarray(labels, dtype=np.float64).reshape(len(structures), len(self.targets))
        for m in self.models:
            collate = Collator(cutoff=m.config["cutoff"])
            batch = collate(as_records(list(structures))).to(self.device)
            cols = np.full((len(structures), len(m.target_names)), np.nan)
            for k, t in enumerate(self.targets):
                cols[:, m.target_names.index(t)] = labels[:, k]
            y = torch.as_tensor(cols, dtype=torch.float32, device=self.device)
            params = [p for h in m.heads.values() for p in h.parameters()]
            opt = torch.optim.Adam(params, lr=1e-3)
            m.train()
            with torch.no_grad():
                emb = m.embed(batch)
            for _ in range(self.finetune_epochs):
                raw = {name: head(emb) for name, head in m.heads.items()}
                loss, _ = m.loss(raw, y)
                opt.zero_grad()
                loss.backward()
                opt.step()
            m.eval()

    def train_embeddings(self) -> np.ndarray:
        """Crystal-encoder embeddings of up to 2,000 training crystals."""
        if self._train_emb is None:
            self._train_emb = self._embed(self.models[0], self.reference)
        return self._train_emb


def ood_threshold(train_emb: np.ndarray, quantile: float, seed: int = 0) -> float:
    """The ``quantile`` of training crystals' distances to their nearest other training crystal."""
    if len(train_emb) < 3:
        return float("inf")
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(train_emb))[:500]
    d = nearest_distance(train_emb[idx], train_emb, exclude_self=True)
    return float(np.quantile(d, quantile))


def nearest_distance(x: np.ndarray, ref: np.ndarray, exclude_self: bool = False) -> np.ndarray:
    """Euclidean distance of each row of ``x`` to its nearest row of ``ref`` (zero skipped with ``exclude_self``)."""
    if len(x) == 0 or len(ref) == 0:
        return np.full(len(x), np.inf)
    xt, rt = torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(ref, dtype=torch.float32)
    out = []
    for lo in range(0, len(xt), 1024):
        d = torch.cdist(xt[lo : lo + 1024], rt)
        if exclude_self:
            d = torch.where(d < 1e-9, torch.full_like(d, float("inf")), d)
        out.append(d.min(1).values.numpy())
    return np.concatenate(out).astype(np.float64)
