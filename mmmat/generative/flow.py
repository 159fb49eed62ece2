"""Conditional flow matching over crystals: lattice, fractional coordinates and species.

A crystal of N atoms is ``(y, f, s)``:

* ``y`` (6,): the lattice as ``ln(a/N^⅓), ln(b/N^⅓), ln(c/N^⅓), α, β, γ`` (radians), standardised with the
  training set's means and deviations.  Lengths and angles do not change when the cell rotates, so the
  generated lattice needs no rotational canonicalisation;
* ``f`` (N, 3): fractional coordinates on the 3-torus [0, 1)³;
* ``s`` (N, K): species as one-hot vectors over Z = 1..K (continuous during the flow; argmax at the end).

Training draws noise ``x₀``: ``y₀ ~ N(0, I)``, ``f₀ ~ U[0, 1)³`` and ``s₀ ~ N(0, I)``, and the straight path
(the geodesic on the torus) to the data ``x₁``: ``y_t = (1-t) y₀ + t y₁``, ``f_t = f₀ + t·w(f₁ - f₀) mod 1``
with ``w(x) = x - round(x)``, ``s_t = (1-t) s₀ + t s₁``.  The network regresses the constant velocities
``y₁ - y₀``, ``w(f₁ - f₀)`` and ``s₁ - s₀`` (conditional flow matching).  The coordinate velocity is taken
modulo a rigid translation of the crystal (its per-crystal mean is removed from target and prediction), because
a crystal translated on the torus is the same crystal.

Crystal structure prediction (composition given) and de novo generation share one network: in a CSP row the
species are clean (``s_t = s₁``, species time 1) and carry no loss; in a de novo row they flow with the rest.
The atom count of a de novo sample is drawn from the training set's histogram.

The denoiser (:class:`CrystalDenoiser`) passes messages between all atom pairs of a cell: the edge features
are Fourier features of the wrapped fractional difference ``f_j - f_i`` (periodic and translation invariant)
and the lattice parameters (rotation invariant); node updates sum over the other atoms (permutation
equivariant).  Conditioning is one vector per crystal: a shared-latent embedding of any modality (crystal, XRD
pattern, image, text) and/or standardised property targets, each with a presence mask; a condition that is
absent is all zeros with mask 0, which is also the unconditional input of classifier-free guidance.

A second denoiser family, an all-atom transformer (:mod:`mmmat.generative.transformer`), has the same
signature and is selected with ``family="transformer"``; everything else here is shared.

Retrieval-augmented generation (``template_k > 0``): each crystal may come with up to k reference crystals of
its composition (substituted templates, :mod:`mmmat.generative.templates`) as context.  Their atoms become
tokens (species, Fourier features of the fractional coordinates, the template's lattice and its rank); after
every message-passing round the atoms of the crystal being generated cross-attend to their own crystal's
template tokens and to one learned null token (the whole context of a crystal without templates).  The network
thus learns to correct the templates it is shown; at sampling time the flow may also start from the best
template at an intermediate time ``t_start``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

FORMAT = "mmmat.CrystalFlow"
#: Largest atomic number the generator can place (Bi = 83 covers MP-20; 100 leaves room).
NUM_SPECIES = 100
#: Smallest cell volume (Å³) of a generated sample; below it the sample counts as failed (structural validity
#: asks for at least this much).
MIN_CELL_VOLUME = 0.1
#: Denoiser families of :class:`CrystalFlow` (``model.family`` in the generator configs).
FAMILIES = ("flow_gnn", "transformer")
#: Lattice angles of generated cells are kept inside this range, degrees.
ANGLE_RANGE = (30.0, 150.0)


# ---------------------------------------------------------------------- lattices
def lattice_params(lattice: Tensor) -> Tensor:
    """(B, 3, 3) lattice rows (Å) -> (B, 6): a, b, c (Å) and α, β, γ (radians)."""
    a, b, c = lattice[:, 0], lattice[:, 1], lattice[:, 2]
    la, lb, lc = a.norm(dim=-1), b.norm(dim=-1), c.norm(dim=-1)

    def ang(u: Tensor, v: Tensor, nu: Tensor, nv: Tensor) -> Tensor:
        return torch.arccos(((u * v).sum(-1) / (nu * nv)).clamp(-1.0, 1.0))

    return torch.stack([la, lb, lc, ang(b, c, lb, lc), ang(a, c, la, lc), ang(a, b, la, lb)], dim=-1)


def lattice_from_params(p: Tensor) -> Tensor:
    """(B, 6) a, b, c (Å), α, β, γ (radians) -> (B, 3, 3) lattice rows, pymatgen's ``from_parameters`` frame."""
    a, b, c, al, be, ga = p.unbind(-1)
    val = ((torch.cos(al) * torch.cos(be) - torch.cos(ga)) / (torch.sin(al) * torch.sin(be))).clamp(-1.0, 1.0)
    gstar = torch.arccos(val)
    zero = torch.zeros_like(a)
    va = torch.stack([a * torch.sin(be), zero, a * torch.cos(be)], -1)
    vb = torch.stack(
        [-b * torch.sin(al) * torch.cos(gstar), b * torch.sin(al) * torch.sin(gstar), b * torch.cos(al)], -1
    )
    vc = torch.stack([zero, zero, c], -1)
    return torch.stack([va, vb, vc], dim=1)


def wrap(x: Tensor) -> Tensor:
    """Shortest signed difference on the unit torus: x - round(x), in [-0.5, 0.5]."""
    return x - torch.round(x)


def _segment_mean(x: Tensor, index: Tensor, size: int) -> Tensor:
    out = torch.zeros(size, x.shape[-1], device=x.device, dtype=x.dtype).index_add_(0, index, x)
    cnt = torch.zeros(size, device=x.device, dtype=x.dtype).index_add_(
        0, index, torch.ones_like(index, dtype=x.dtype)
    )
    return out / cnt.clamp(min=1).unsqueeze(-1)


def all_pairs(batch: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
    """Every ordered pair (i, j), i != j, of atoms in the same crystal: (src, tgt) over the flat atom index."""
    n = batch.shape[0]
    ptr = torch.zeros(counts.shape[0] + 1, dtype=torch.long, device=batch.device)
    ptr[1:] = torch.cumsum(counts, 0)
    rep = counts[batch]
    src = torch.repeat_interleave(torch.arange(n, device=batch.device), rep)
    start = torch.cumsum(rep, 0) - rep
    k = torch.arange(src.shape[0], device=batch.device) - torch.repeat_interleave(start, rep)
    tgt = ptr[batch[src]] + k
    keep = src != tgt
    return src[keep], tgt[keep]


# ---------------------------------------------------------------------- network
class SinusoidalTime(nn.Module):
    """Sinusoidal features of t in [0, 1] followed by an MLP."""

    def __init__(self, dim: int, freqs: int = 32):
        super().__init__()
        self.register_buffer(
            "freq", torch.exp(torch.linspace(0.0, math.log(1000.0), freqs)), persistent=False
        )
        self.mlp = nn.Sequential(nn.Linear(2 * freqs, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: Tensor) -> Tensor:
        """(B,) -> (B, dim)."""
        x = t.unsqueeze(-1) * self.freq
        return self.mlp(torch.cat([torch.sin(x), torch.cos(x)], dim=-1))


class PairLayer(nn.Module):
    """One round of all-pairs message passing with periodic edge features."""

    def __init__(self, hidden: int, edge_dim: int):
        super().__init__()
        self.edge = nn.Sequential(
            nn.Linear(2 * hidden + edge_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU()
        )
        self.node = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.norm = nn.LayerNorm(hidden)

    def forward(self, h: Tensor, src: Tensor, tgt: Tensor, edge_attr: Tensor) -> Tensor:
        """Update node features ``h`` (N, hidden)."""
        hn = self.norm(h)
        m = self.edge(torch.cat([hn[src], hn[tgt], edge_attr], dim=-1))
        agg = _segment_mean(m, src, h.shape[0])
        return h + self.node(torch.cat([hn, agg], dim=-1))


def pack_templates(templates: Sequence[Sequence[Any]], k: int) -> dict[str, Tensor]:
    """Flat template tokens of a batch: up to ``k`` pymatgen structures per crystal (fewer or none allowed).

    Returns ``{"lattice": (T, 3, 3) Å, "counts": (T,) atoms per template, "owner": (T,) crystal index,
    "rank": (T,) rank of the template for its crystal, "frac": (M, 3), "z": (M,), "template": (M,)
    template index of each token}``, where T is the number of templates and M the number of their atoms.
    """
    lat, counts, owner, rank, frac, z, tpl = [], [], [], [], [], [], []
    for i, ts in enumerate(templates):
        for r, s in enumerate(list(ts or [])[:k]):
            lat.append(np.asarray(s.lattice.matrix, dtype=np.float32))
            counts.append(len(s))
            owner.append(i)
            rank.append(r)
            frac.append(np.asarray(s.frac_coords, dtype=np.float32) % 1.0)
            z.append(np.asarray(s.atomic_numbers, dtype=np.int64))
            tpl.append(np.full(len(s), len(lat) - 1, dtype=np.int64))
    if not lat:
        return {"lattice": torch.zeros(0, 3, 3), "counts": torch.zeros(0, dtype=torch.long),
                "owner": torch.zeros(0, dtype=torch.long), "rank": torch.zeros(0, dtype=torch.long),
                "frac": torch.zeros(0, 3), "z": torch.zeros(0, dtype=torch.long),
                "template": torch.zeros(0, dtype=torch.long)}
    return {
        "lattice": torch.as_tensor(np.stack(lat)), "counts": torch.as_tensor(counts),
        "owner": torch.as_tensor(owner), "rank": torch.as_tensor(rank),
        "frac": torch.as_tensor(np.concatenate(frac)), "z": torch.as_tensor(np.concatenate(z)),
        "template": torch.as_tensor(np.concatenate(tpl)),
    }


def _dense(x: Tensor, index: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """Rows of ``x`` grouped by ``index`` (sorted or not) into (size, L, D) with a (size, L) presence mask."""
    cnt = torch.bincount(index, minlength=size)
    width = int(cnt.max()) if cnt.numel() and x.shape[0] else 0
    order = torch.argsort(index, stable=True)
    start = torch.cumsum(cnt, 0) - cnt
    pos = torch.arange(x.shape[0], device=x.device) - start[index[order]]
    out = x.new_zeros(size, width, x.shape[-1])
    mask = torch.zeros(size, width, dtype=torch.bool, device=x.device)
    out[index[order], pos] = x[order]
    mask[index[order], pos] = True
    return out, mask


class TemplateAttention(nn.Module):
    """Atoms of each crystal cross-attend to the tokens of their own crystal's templates (and a null token)."""

    def __init__(self, hidden: int, heads: int = 4):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.attn = nn.MultiheadAttention(hidden, heads, batch_first=True)
        self.null = nn.Parameter(torch.zeros(1, 1, hidden))

    def forward(self, h: Tensor, batch: Tensor, tokens: Tensor, token_mask: Tensor) -> Tensor:
        """Atoms h (N, hidden) updated from tokens; template tokens (B, L, hidden), mask (B, L) True where present."""
        b = tokens.shape[0]
        q, qmask = _dense(self.norm(h), batch, b)
        kv = torch.cat([self.null.expand(b, 1, -1), tokens], dim=1)
        keep = torch.cat([torch.ones(b, 1, dtype=torch.bool, device=h.device), token_mask], dim=1)
        out, _ = self.attn(q, kv, kv, key_padding_mask=~keep, need_weights=False)
        upd = torch.empty_like(h)
        upd[torch.argsort(batch, stable=True)] = out[qmask]  # dense rows follow the atoms sorted by crystal
        return h + upd


class CrystalDenoiser(nn.Module):
    """Velocity field v(y_t, f_t, s_t, t, t_s, c) of the crystal flow.

    Args:
        hidden: Width of node and edge features.
        layers: Message-passing rounds.
        fourier: Fourier frequencies k = 1..K per fractional axis in the edge features.
        cond_dim: Length of the condition vector (values and masks), 0 for none.
        num_species: Species vocabulary (Z = 1..num_species).
        template_k: Templates per crystal taken as context (0: no template context).
    """

    def __init__(
        self,
        hidden: int = 256,
        layers: int = 6,
        fourier: int = 8,
        cond_dim: int = 0,
        num_species: int = NUM_SPECIES,
        template_k: int = 0,
    ):
        super().__init__()
        self.template_k = int(template_k)
        self.register_buffer("kvec", torch.arange(1, fourier + 1, dtype=torch.float32), persistent=False)
        self.species_in = nn.Linear(num_species, hidden)
        self.lattice_in = nn.Linear(6, hidden)
        self.time = SinusoidalTime(hidden)
        self.species_time = SinusoidalTime(hidden)
        self.cond = (
            nn.Sequential(nn.Linear(cond_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
            if cond_dim
            else None
        )
        edge_dim = 6 * fourier + 6
        self.layers = nn.ModuleList([PairLayer(hidden, edge_dim) for _ in range(layers)])
        self.out_norm = nn.LayerNorm(hidden)
        self.coord_out = nn.Linear(hidden, 3)
        self.species_out = nn.Linear(hidden, num_species)
        self.lattice_out = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.SiLU(), nn.Linear(hidden, 6))
        if self.template_k:
            self.tpl_coord = nn.Linear(6 * fourier, hidden)
            self.tpl_lattice = nn.Linear(6, hidden)
            self.tpl_rank = nn.Embedding(self.template_k, hidden)
            self.tpl_attn = nn.ModuleList([TemplateAttention(hidden) for _ in range(layers)])

    def template_tokens(self, context: dict[str, Tensor], b: int) -> tuple[Tensor, Tensor]:
        """Template tokens (B, L, hidden) and mask (B, L) from packed context (``y``: standardised lattices)."""
        tpl = context["template"]
        ang = 2 * math.pi * context["frac"].unsqueeze(-1) * self.kvec
        x = (
            self.species_in(F.one_hot(context["z"] - 1, self.species_in.in_features).to(ang.dtype))
            + self.tpl_coord(torch.cat([torch.sin(ang).flatten(1), torch.cos(ang).flatten(1)], dim=-1))
            + (self.tpl_lattice(context["y"]) + self.tpl_rank(context["rank"].clamp(max=self.template_k - 1)))[tpl]
        )
        return _dense(x, context["owner"][tpl], b)

    def forward(
        self,
        y: Tensor,
        f: Tensor,
        s: Tensor,
        t: Tensor,
        ts: Tensor,
        batch: Tensor,
        counts: Tensor,
        cond: Tensor | None = None,
        context: dict[str, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Velocities (lattice (B, 6), coordinates (N, 3), species (N, K)) at the given state.

        ``context``: packed template tokens (:meth:`CrystalFlow.encode_context`), used when ``template_k > 0``.
        """
        b = counts.shape[0]
        g = self.lattice_in(y) + self.time(t) + self.species_time(ts)
        if self.cond is not None and cond is not None:
            g = g + self.cond(cond)
        h = self.species_in(s) + g[batch]
        src, tgt = all_pairs(batch, counts)
        d = wrap(f[tgt] - f[src])  # (E, 3)
        ang = 2 * math.pi * d.unsqueeze(-1) * self.kvec  # (E, 3, K)
        edge_attr = torch.cat([torch.sin(ang).flatten(1), torch.cos(ang).flatten(1), y[batch[src]]], dim=-1)
        tokens = None
        if self.template_k:
            if context is None or context["z"].numel() == 0:
                tokens = (h.new_zeros(b, 0, h.shape[-1]), torch.zeros(b, 0, dtype=torch.bool, device=h.device))
            else:
                tokens = self.template_tokens(context, b)
        for k, layer in enumerate(self.layers):
            h = layer(h, src, tgt, edge_attr)
            if tokens is not None:
                h = self.tpl_attn[k](h, batch, *tokens)
        h = self.out_norm(h)
        pooled = torch.cat([_segment_mean(h, batch, b), g], dim=-1)
        return self.lattice_out(pooled), self.coord_out(h), self.species_out(h)


# ---------------------------------------------------------------------- the flow
class CrystalFlow(nn.Module):
    """Flow-matching crystal generator with optional conditioning (see the module docstring).

    Args:
        hidden: Denoiser width.
        layers: Denoiser message-passing rounds.
        fourier: Fourier frequencies of the periodic edge features.
        latent_dim: Length of the shared-latent condition (0: no latent conditioning).
        properties: Names of property targets it can be conditioned on.
        num_species: Species vocabulary size.
        max_atoms: Largest cell it generates (atom-count histogram length - 1).
        coord_weight: Loss weight of the coordinate velocity (its natural scale is about 0.3).
        lattice_weight: Loss weight of the lattice velocity.
        species_weight: Loss weight of the species velocity (de novo rows).
        family: The denoiser: ``"flow_gnn"`` (:class:`CrystalDenoiser`, all-pairs message passing, exactly
            translation invariant) or ``"transformer"`` (:class:`~mmmat.generative.transformer.
            AtomTransformerDenoiser`, atom tokens with absolute periodic coordinate encodings).
        heads: Attention heads of the transformer family.
        translate_augment: Shift every training crystal by a random fractional vector (teaches a denoiser that
            is not translation invariant by construction to be so; changes nothing for ``flow_gnn`` but the
            random draws).
        template_k: Templates per crystal the denoiser attends to (0: none; retrieval-augmented generation).
    """

    def __init__(
        self,
        hidden: int = 256,
        layers: int = 6,
        fourier: int = 8,
        latent_dim: int = 0,
        properties: Sequence[str] = (),
        num_species: int = NUM_SPECIES,
        max_atoms: int = 20,
        coord_weight: float = 10.0,
        lattice_weight: float = 1.0,
        species_weight: float = 1.0,
        family: str = "flow_gnn",
        heads: int = 8,
        translate_augment: bool = False,
        template_k: int = 0,
    ):
        super().__init__()
        if family not in FAMILIES:
            raise ValueError(f"unknown generator family {family!r}; known: {', '.join(FAMILIES)}")
        self.config = {
            "hidden": hidden,
            "layers": layers,
            "fourier": fourier,
            "latent_dim": latent_dim,
            "properties": list(properties),
            "num_species": num_species,
            "max_atoms": max_atoms,
            "coord_weight": coord_weight,
            "lattice_weight": lattice_weight,
            "species_weight": species_weight,
            "family": family,
            "heads": heads,
            "translate_augment": translate_augment,
            "template_k": int(template_k),
        }
        self.properties = list(properties)
        self.num_species = num_species
        cond_dim = (latent_dim + 1 if latent_dim else 0) + 2 * len(self.properties)
        self.net: nn.Module
        if family == "transformer":
            from mmmat.generative.transformer import AtomTransformerDenoiser

            if template_k:
                raise ValueError("template_k (retrieval-augmented generation) needs family='flow_gnn'")
            self.net = AtomTransformerDenoiser(hidden, layers, fourier, cond_dim, num_species, heads)
        else:
            self.net = CrystalDenoiser(hidden, layers, fourier, cond_dim, num_species, int(template_k))
        self.register_buffer("y_mean", torch.zeros(6))
        self.register_buffer("y_std", torch.ones(6))
        self.register_buffer("prop_mean", torch.zeros(len(self.properties)))
        self.register_buffer("prop_std", torch.ones(len(self.properties)))
        self.register_buffer("atom_count_hist", torch.ones(max_atoms + 1))

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        state_dict.pop(prefix + "species_hist", None)  # a buffer nothing read, still in models saved before
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def latent_dim(self) -> int:
        """Length of the shared-latent condition (0: none)."""
        return int(self.config["latent_dim"])

    # -------------------------------------------------------------- statistics
    @torch.no_grad()
    def fit_statistics(self, lattice: Tensor, counts: Tensor, z: Tensor, props: Tensor | None = None) -> None:
        """Set normalisation and histograms from training crystals (lattices (B,3,3), counts (B,), all Z)."""
        y = self._raw_y(lattice, counts)
        self.y_mean.copy_(y.mean(0))
        self.y_std.copy_(y.std(0).clamp(min=1e-3))
        hist = torch.bincount(
            counts.long().clamp(max=self.config["max_atoms"]), minlength=self.config["max_atoms"] + 1
        )
        self.atom_count_hist.copy_(hist.float())
        if props is not None and len(self.properties):
            for k in range(len(self.properties)):
                col = props[:, k]
                col = col[torch.isfinite(col)]
                if col.numel() > 1:
                    self.prop_mean[k] = col.mean()
                    self.prop_std[k] = col.std().clamp(min=1e-6)

    @staticmethod
    def _raw_y(lattice: Tensor, counts: Tensor) -> Tensor:
        p = lattice_params(lattice)
        scale = counts.to(p.dtype).clamp(min=1).pow(1.0 / 3.0).unsqueeze(-1)
        return torch.cat([torch.log(p[:, :3] / scale), p[:, 3:]], dim=-1)

    def encode_lattice(self, lattice: Tensor, counts: Tensor) -> Tensor:
        """(B, 3, 3) lattices -> standardised (B, 6) flow variables."""
        return (self._raw_y(lattice, counts) - self.y_mean) / self.y_std

    def decode_lattice(self, y: Tensor, counts: Tensor) -> Tensor:
        """Standardised (B, 6) flow variables -> (B, 6) a, b, c (Å), α, β, γ (degrees), angles clamped."""
        raw = y * self.y_std + self.y_mean
        scale = counts.to(raw.dtype).clamp(min=1).pow(1.0 / 3.0).unsqueeze(-1)
        lengths = torch.exp(raw[:, :3].clamp(max=5.0)) * scale
        angles = torch.rad2deg(raw[:, 3:]).clamp(*ANGLE_RANGE)
        return torch.cat([lengths, angles], dim=-1)

    @property
    def template_k(self) -> int:
        """Templates per crystal the denoiser attends to (0: none)."""
        return int(self.config.get("template_k", 0))

    def encode_context(self, templates: Sequence[Sequence[Any]] | dict[str, Tensor] | None) -> dict[str, Tensor] | None:
        """Template context on the model's device: per crystal a list of pymatgen structures, or packed tokens.

        Returns None when the model takes no templates or none are given.
        """
        if not self.template_k or templates is None:
            return None
        packed = templates if isinstance(templates, dict) else pack_templates(templates, self.template_k)
        dev = self.y_mean.device
        out = {k: v.to(dev) for k, v in packed.items()}
        if "y" not in out:
            out["y"] = (
                self.encode_lattice(out["lattice"].float(), out["counts"])
                if out["counts"].numel() else torch.zeros(0, 6, device=dev)
            )
        return out

    def one_hot(self, z: Tensor) -> Tensor:
        """Atomic numbers (N,) -> (N, K) one-hot species vectors."""
        if int(z.max()) > self.num_species or int(z.min()) < 1:
            raise ValueError(
                f"atomic numbers must lie in 1..{self.num_species}, got {int(z.min())}..{int(z.max())}"
            )
        return F.one_hot(z.long() - 1, self.num_species).to(torch.float32)

    def condition_vector(
        self,
        latent: Tensor | None,
        latent_mask: Tensor | None,
        props: Tensor | None,
        props_mask: Tensor | None,
        b: int,
        device: torch.device,
    ) -> Tensor | None:
        """Pack the condition: [latent·m, m, standardised props·mask, mask] (zeros where absent)."""
        parts = []
        if self.latent_dim:
            if latent is None:
                latent = torch.zeros(b, self.latent_dim, device=device)
                latent_mask = torch.zeros(b, device=device)
            m = latent_mask.to(latent.dtype).reshape(b, 1)
            parts += [latent * m, m]
        if self.properties:
            if props is None:
                props = torch.zeros(b, len(self.properties), device=device)
                props_mask = torch.zeros_like(props)
            pm = props_mask.to(props.dtype) * torch.isfinite(props).to(props.dtype)
            pn = torch.nan_to_num((props - self.prop_mean) / self.prop_std) * pm
            parts += [pn, pm]
        return torch.cat(parts, dim=-1) if parts else None

    # -------------------------------------------------------------- training loss
    def loss(
        self,
        lattice: Tensor,
        frac: Tensor,
        z: Tensor,
        batch: Tensor,
        counts: Tensor,
        csp_rows: Tensor,
        cond: Tensor | None = None,
        generator: torch.Generator | None = None,
        context: Any = None,
    ) -> dict[str, Tensor]:
        """Conditional flow-matching loss of a batch of crystals.

        Args:
            lattice: (B, 3, 3) lattice rows, Å.
            frac: (N, 3) fractional coordinates.
            z: (N,) atomic numbers.
            batch: (N,) crystal index of each atom.
            counts: (B,) atoms per crystal.
            csp_rows: (B,) bool, True where the species are given (crystal structure prediction).
            cond: (B, cond_dim) condition vector (:meth:`condition_vector`) or None.
            generator: Random generator for the noise (default: the global one).
            context: Templates per crystal (lists of structures or :func:`pack_templates` output), used when
                ``template_k > 0``.
        """
        b, dev = counts.shape[0], frac.device
        ctx = self.encode_context(context)
        y1 = self.encode_lattice(lattice, counts)
        f1 = frac % 1.0
        if self.config["translate_augment"]:
            f1 = (f1 + torch.rand(b, 3, device=dev, generator=generator)[batch]) % 1.0
        s1 = self.one_hot(z)
        t = torch.rand(b, device=dev, generator=generator)
        y0 = torch.randn(y1.shape, device=dev, generator=generator)
        f0 = torch.rand(f1.shape, device=dev, generator=generator)
        s0 = torch.randn(s1.shape, device=dev, generator=generator)
        ta = t[batch].unsqueeze(-1)
        yt = (1 - t.unsqueeze(-1)) * y0 + t.unsqueeze(-1) * y1
        uf = wrap(f1 - f0)
        ft = (f0 + ta * uf) % 1.0
        csp_atoms = csp_rows[batch].unsqueeze(-1)
        st = torch.where(csp_atoms, s1, (1 - ta) * s0 + ta * s1)
        ts = torch.where(csp_rows, torch.ones_like(t), t)
        vy, vf, vs = self.net(yt, ft, st, t, ts, batch, counts, cond, ctx)
        uf_c = uf - _segment_mean(uf, batch, b)[batch]
        vf_c = vf - _segment_mean(vf, batch, b)[batch]
        l_coord = ((vf_c - uf_c) ** 2).sum(-1)
        l_coord = _segment_mean(l_coord.unsqueeze(-1), batch, b).squeeze(-1).mean()
        l_lat = ((vy - (y1 - y0)) ** 2).mean()
        denovo = (~csp_atoms).squeeze(-1).to(vs.dtype)
        l_spec_atom = ((vs - (s1 - s0)) ** 2).mean(-1) * denovo
        l_spec = l_spec_atom.sum() / denovo.sum().clamp(min=1.0)
        c = self.config
        total = c["coord_weight"] * l_coord + c["lattice_weight"] * l_lat + c["species_weight"] * l_spec
        return {
            "loss": total,
            "coord": l_coord.detach(),
            "lattice": l_lat.detach(),
            "species": l_spec.detach(),
        }

    # -------------------------------------------------------------- sampling
    def sample_atom_counts(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Atom counts of ``n`` de novo samples, drawn from the training histogram."""
        p = self.atom_count_hist.clone().cpu()
        p[0] = 0
        return torch.multinomial(p / p.sum(), n, replacement=True, generator=generator)

    @torch.no_grad()
    def sample(
        self,
        counts: Tensor,
        z: Tensor | None = None,
        cond: Tensor | None = None,
        steps: int = 100,
        guidance: float = 1.0,
        coord_anneal: float = 0.0,
        generator: torch.Generator | None = None,
        start: tuple[Tensor, Tensor] | None = None,
        t_start: float = 0.0,
        context: Any = None,
    ) -> dict[str, Tensor]:
        """Integrate the flow from noise (Euler, ``steps`` steps).

        Args:
            counts: (B,) atoms per crystal.
            z: (N,) atomic numbers for crystal structure prediction; None samples species too (de novo).
            cond: (B, cond_dim) condition vectors or None (unconditional).
            steps: Euler steps from t = ``t_start`` to 1.
            guidance: Classifier-free guidance scale w: v = v_uncond + w (v_cond - v_uncond); 1 = plain
                conditional sampling, 0 = unconditional.
            coord_anneal: Coordinate velocities are scaled by (1 + coord_anneal · t) (0: off).
            generator: Random generator (a seed reproduces the samples on the same device).
            start: Optional (lattice (B, 3, 3), frac (N, 3)) to start from: the path begins at
                (1 - t_start)·noise + t_start·start instead of pure noise (refinement of a template).
            t_start: Flow time of ``start`` (0 ignores ``start``).
            context: Templates per crystal (lists of structures or packed tokens) for a model with
                ``template_k > 0``; ignored otherwise.

        Returns:
            ``{"lattice_params": (B, 6) a, b, c Å and α, β, γ degrees, "frac": (N, 3), "z": (N,), "batch": (N,)}``
            on the model's device.
        """
        dev = self.y_mean.device
        counts = counts.to(dev).long()
        b = counts.shape[0]
        ctx = self.encode_context(context)
        batch = torch.repeat_interleave(torch.arange(b, device=dev), counts)
        n = int(counts.sum())
        y = torch.randn(b, 6, device=dev, generator=generator)
        f = torch.rand(n, 3, device=dev, generator=generator)
        csp = z is not None
        s = (
            self.one_hot(z.to(dev))
            if csp
            else torch.randn(n, self.num_species, device=dev, generator=generator)
        )
        t0 = 0.0
        if start is not None and t_start > 0:
            lat0, f_start = start
            t0 = float(t_start)
            y = (1 - t0) * y + t0 * self.encode_lattice(lat0.to(dev).float(), counts)
            f = (f + t0 * wrap(f_start.to(dev).float() - f)) % 1.0
        use_cfg = cond is not None and guidance != 1.0
        ts_csp = torch.ones(b, device=dev)
        dt = (1.0 - t0) / max(steps, 1)
        for i in range(steps):
            tv = t0 + i * dt
            t = torch.full((b,), tv, device=dev)
            ts = ts_csp if csp else t
            vy, vf, vs = self.net(y, f, s, t, ts, batch, counts, cond, ctx)
            if use_cfg:
                uy, uf, us = self.net(y, f, s, t, ts, batch, counts, torch.zeros_like(cond), ctx)
                vy, vf, vs = (uy + guidance * (vy - uy), uf + guidance * (vf - uf), us + guidance * (vs - us))
            vf = vf - _segment_mean(vf, batch, b)[batch]
            y = y + dt * vy
            f = (f + dt * (1.0 + coord_anneal * tv) * vf) % 1.0
            if not csp:
                s = s + dt * vs
        zout = z.to(dev).long() if csp else s.argmax(-1) + 1
        return {"lattice_params": self.decode_lattice(y, counts), "frac": f, "z": zout, "batch": batch}

    # -------------------------------------------------------------- persistence
    def save_pretrained(self, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
        """Write ``config.json`` + ``model.safetensors`` (``extra`` goes into the config)."""
        from mmmat.modelio import write_model_dir

        config = dict(self.config, format=FORMAT, version=1, **(extra or {}))
        return write_model_dir(path, config, self)

    @classmethod
    def from_pretrained(cls, path: str | Path, map_location: str | torch.device = "cpu") -> CrystalFlow:
        """Rebuild a model written by :meth:`save_pretrained` (no pickle is loaded)."""
        from mmmat.modelio import load_weights, read_model_config

        config = read_model_config(path, FORMAT)
        keys = (
            "hidden",
            "layers",
            "fourier",
            "latent_dim",
            "properties",
            "num_species",
            "max_atoms",
            "coord_weight",
            "lattice_weight",
            "species_weight",
        )
        optional = ("family", "heads", "translate_augment", "template_k")  # absent from older folders
        model = cls(**{k: config[k] for k in keys}, **{k: config[k] for k in optional if k in config})
        model.extra = {k: v for k, v in config.items() if k not in keys + optional}
        load_weights(model, path, map_location)
        return model.to(map_location)


def to_structures(out: dict[str, Tensor]) -> list[Any]:
    """Pymatgen ``Structure`` objects from :meth:`CrystalFlow.sample` output (None where one cannot be built)."""
    from pymatgen.core import Lattice, Structure

    params = out["lattice_params"].double().cpu().numpy()
    frac = out["frac"].double().cpu().numpy()
    z = out["z"].cpu().numpy()
    batch = out["batch"].cpu().numpy()
    structs: list[Any] = []
    for i, p in enumerate(params):
        rows = np.nonzero(batch == i)[0]
        try:
            lat = Lattice.from_parameters(*p.tolist())
            ok = np.isfinite(lat.matrix).all() and np.isfinite(lat.volume) and lat.volume >= MIN_CELL_VOLUME
            structs.append(Structure(lat, [int(x) for x in z[rows]], frac[rows]) if ok else None)
        except Exception:  # a degenerate cell: reported as an invalid sample downstream
            structs.append(None)
    return structs
