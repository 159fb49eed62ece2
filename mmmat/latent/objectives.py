"""Structural self-supervision beside the contrastive loss: objectives that make the crystal encoder model atoms.

Contrastive alignment alone puts little local-structure or energy information into the crystal embedding;
published pretraining gains come mostly from objectives on atomic environments. Each objective here is a
registered class with its own light head, trained on the pretraining split without property labels, and
weighted in the pretraining config::

    objectives:
      denoise: {weight: 1.0, sigma_min: 0.02, sigma_max: 0.3}
      masked_atoms: {weight: 0.5, mask_fraction: 0.15}

Every objective gets a *corrupted copy* of the batch's crystals (the contrastive loss sees the clean ones),
runs the crystal encoder on it, and scores its head on the atom features (``encode(...) -> (emb, atoms)``).

``denoise`` (coordinate denoising)
    Each crystal draws a noise level σ (Å, log-uniform on [sigma_min, sigma_max]); every atom is displaced by
    ε ~ N(0, σ² I) in Cartesian space. The displaced atoms keep their periodic images (the graph's cell
    offsets stay valid: moving an atom without wrapping it back into the cell describes the same crystal as
    the wrapped one). The head predicts ε / σ per atom as an equivariant vector: a sum over the atom's edges
    of the unit edge vector times an invariant weight computed from both atoms' features and the distance,
    so the prediction rotates with the crystal and the encoder stays invariant.
``masked_atoms``
    A fraction of atoms (at least one per crystal) get the mask token (atomic number 0, unused by real
    atoms); a linear head predicts their element from their environment (cross-entropy over Z = 1..118).

The heads live beside the model, not in it: :meth:`mmmat.latent.model.MultimodalModel.save_pretrained` never
writes them; the pretraining task writes them separately when asked (``save_heads``).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

#: name -> objective class
OBJECTIVES: dict[str, type[nn.Module]] = {}


def register_objective(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Register an objective class under ``name`` (used by the pretraining config's ``objectives``)."""

    def deco(cls: type[nn.Module]) -> type[nn.Module]:
        OBJECTIVES[name] = cls
        cls.objective_name = name
        return cls

    return deco


def create_objective(name: str, hidden: int, cutoff: float, **kwargs: Any) -> nn.Module:
    """Build the objective ``name`` for a crystal encoder of width ``hidden`` and cutoff ``cutoff`` (Å)."""
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r} (registered: {sorted(OBJECTIVES)})")
    return OBJECTIVES[name](hidden=hidden, cutoff=cutoff, **kwargs)


def _crystal_copy(crystal: Any, **changes: Tensor) -> Any:
    """A shallow copy of a crystal graph batch with some fields replaced (the original is not touched).

    The unchanged tensors (edges, lattice, ...) are shared, not copied.
    """
    out = copy.copy(crystal)
    for k, v in changes.items():
        out[k] = v
    if getattr(out, "computed_xrd", None) is not None and "pos" in changes:
        del out.computed_xrd  # the geometry changed: the pattern is computed from the new one
    return out


def _edges(crystal: Any, pos: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(src, tgt, edge vectors (E, 3) Å from target to source) of the crystal's graph at positions ``pos``."""
    src, tgt = crystal.edge_index[0], crystal.edge_index[1]
    lat = crystal.lattice.to(pos.dtype)[crystal.batch[src]]
    shift = torch.bmm(crystal.cell_offset.to(pos.dtype).unsqueeze(1), lat).squeeze(1)
    return src, tgt, pos[src] + shift - pos[tgt]


@register_objective("denoise")
class CoordinateDenoising(nn.Module):
    """Predict each atom's Gaussian displacement (divided by its crystal's σ) from the displaced crystal.

    Args:
        hidden: Width of the encoder's atom features.
        cutoff: The encoder's cutoff, Å (edge weights vanish smoothly there).
        sigma_min / sigma_max: Range of the per-crystal noise level σ in Å (log-uniform).
        weight: Loss weight (read by the task).
    """

    def __init__(self, hidden: int, cutoff: float, sigma_min: float = 0.02, sigma_max: float = 0.3,
                 weight: float = 1.0, num_rbf: int = 16):
        super().__init__()
        if not 0 < sigma_min <= sigma_max:
            raise ValueError(f"need 0 < sigma_min <= sigma_max (Å), got {sigma_min}, {sigma_max}")
        self.sigma_min, self.sigma_max, self.weight, self.cutoff = float(sigma_min), float(sigma_max), float(weight), \
            float(cutoff)
        self.register_buffer("centres", torch.linspace(0.0, cutoff, num_rbf), persistent=False)
        self.gamma = (num_rbf / cutoff) ** 2
        self.edge = nn.Sequential(nn.Linear(2 * hidden + num_rbf, hidden), nn.SiLU(), nn.Linear(hidden, 1))

    def corrupt(self, crystal: Any, generator: torch.Generator | None = None) -> tuple[Any, dict[str, Tensor]]:
        """The displaced copy of the crystals and the target (ε / σ per atom)."""
        pos = crystal.pos
        b = crystal.lattice.shape[0]
        u = torch.rand(b, device=pos.device, generator=generator)
        sigma = torch.exp(math.log(self.sigma_min) + u * (math.log(self.sigma_max) - math.log(self.sigma_min)))
        noise = torch.randn(pos.shape, device=pos.device, generator=generator, dtype=pos.dtype)
        eps = noise * sigma[crystal.batch].unsqueeze(-1).to(pos.dtype)
        new_pos = pos + eps
        lat_atoms = crystal.lattice.to(pos.dtype)[crystal.batch]
        frac = torch.linalg.solve(lat_atoms.transpose(1, 2), new_pos.unsqueeze(-1)).squeeze(-1)
        return _crystal_copy(crystal, pos=new_pos, frac_coords=frac), {"target": noise}

    def predict(self, crystal: Any, atoms: Tensor) -> Tensor:
        """(N, 3) predicted ε / σ: Σ over edges of w(h_i, h_j, d_ij) · unit(r_ij), equivariant by construction."""
        src, tgt, vec = _edges(crystal, crystal.pos.float())
        dist = vec.norm(dim=-1).clamp_min(1e-6)
        rbf = torch.exp(-self.gamma * (dist.unsqueeze(-1) - self.centres) ** 2)
        env = torch.where(dist < self.cutoff, 0.5 * (torch.cos(dist * math.pi / self.cutoff) + 1), dist.new_zeros(()))
        h = atoms.float()
        w = self.edge(torch.cat([h[tgt], h[src], rbf], dim=-1)).squeeze(-1) * env
        out = torch.zeros_like(crystal.pos, dtype=torch.float32)
        return out.index_add_(0, tgt, w.unsqueeze(-1) * vec / dist.unsqueeze(-1))

    def loss(self, crystal: Any, atoms: Tensor, target: dict[str, Tensor]) -> Tensor:
        """Mean squared error of the predicted ε / σ (per component)."""
        return (self.predict(crystal, atoms) - target["target"].float()).square().mean()


@register_objective("masked_atoms")
class MaskedAtoms(nn.Module):
    """Predict the element of masked atoms from their environment.

    Args:
        hidden: Width of the encoder's atom features.
        cutoff: Unused (same signature as the other objectives).
        mask_fraction: Fraction of atoms masked (at least one per crystal).
        weight: Loss weight (read by the task).
    """

    MASK_Z = 0

    def __init__(self, hidden: int, cutoff: float = 5.0, mask_fraction: float = 0.15, weight: float = 1.0):
        super().__init__()
        if not 0 < mask_fraction < 1:
            raise ValueError(f"mask_fraction must lie in (0, 1), got {mask_fraction}")
        self.mask_fraction, self.weight = float(mask_fraction), float(weight)
        self.head = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 119))

    def corrupt(self, crystal: Any, generator: torch.Generator | None = None) -> tuple[Any, dict[str, Tensor]]:
        """The copy with masked species and the mask/target."""
        z = crystal.z
        n = z.shape[0]
        r = torch.rand(n, device=z.device, generator=generator)
        mask = r < self.mask_fraction
        # at least one masked atom per crystal: the atom with the smallest draw
        b = crystal.lattice.shape[0]
        smallest = torch.full((b,), 2.0, device=z.device).scatter_reduce(0, crystal.batch, r, reduce="amin")
        mask = mask | (r == smallest[crystal.batch])
        masked_z = torch.where(mask, torch.full_like(z, self.MASK_Z), z)
        return _crystal_copy(crystal, z=masked_z), {"mask": mask, "z": z}

    def loss(self, crystal: Any, atoms: Tensor, target: dict[str, Tensor]) -> Tensor:
        """Cross-entropy of the masked atoms' elements (mean over masked atoms, no host read)."""
        logits = self.head(atoms.float())
        ce = nn.functional.cross_entropy(logits, target["z"].long(), reduction="none")
        m = target["mask"].float()
        return (ce * m).sum() / m.sum().clamp_min(1.0)

    @torch.no_grad()
    def accuracy(self, crystal: Any, atoms: Tensor, target: dict[str, Tensor]) -> Tensor:
        """Share of masked atoms whose element is predicted right."""
        pred = self.head(atoms.float()).argmax(-1)
        m = target["mask"]
        return ((pred == target["z"]) & m).sum() / m.sum().clamp_min(1)
