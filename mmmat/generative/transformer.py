"""An all-atom transformer denoiser: the second generator family behind :class:`~mmmat.generative.flow.CrystalFlow`.

Every atom is one token: a linear embedding of its (continuous) species vector plus an MLP of the Fourier
features ``sin(2πk f), cos(2πk f)``, k = 1..K, of its fractional coordinates; one more token carries the
lattice (the six standardised flow variables).  Flow time, species time and the condition vector (latent,
properties, presence masks) form one global vector that is added to every token and modulates every block
(adaptive layer norm, DiT style).  A plain pre-norm transformer (``torch.nn.TransformerEncoderLayer``, fused
scaled-dot-product attention) mixes the tokens of each crystal; crystals of different sizes are padded to the
largest one in the batch and the padding is masked out of attention.  Atom tokens are read out as coordinate
and species velocities, the lattice token as the lattice velocity.

It has the same call signature as :class:`~mmmat.generative.flow.CrystalDenoiser`, so the flow objective,
conditioning, classifier-free guidance, sampling and saving are shared (``family="transformer"``).

Symmetries:

* **exact**: permutation equivariance over the atoms of a crystal (no atom index enters a token, attention is
  a set operation, padding is masked); periodicity, i.e. moving any atom by a whole lattice vector
  (``f -> f + n``, n integer) changes nothing (the coordinates enter only through sin/cos of 2πk f); rotation
  invariance (only lattice lengths and angles enter); the flow removes the per-crystal mean of the coordinate
  velocity, so a rigid drift of the whole crystal is never generated.
* **learned**: invariance to a rigid translation of all fractional coordinates by a constant (the Fourier
  features are absolute positions, as in ADiT).  ``translate_augment`` in
  :class:`~mmmat.generative.flow.CrystalFlow` shifts every training crystal by a random vector so the network
  learns it; :func:`translation_error` measures how far it is from exact.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from mmmat.generative.flow import NUM_SPECIES, SinusoidalTime


def pad_atoms(x: Tensor, batch: Tensor, counts: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Flat per-atom rows (N, D) -> padded (B, M, D), the padding mask (B, M; True = padding) and the slot index.

    The slot index (N,) is the position of each atom inside its crystal, so ``padded[batch, slot]`` gives the
    flat rows back.
    """
    b = counts.shape[0]
    m = int(counts.max()) if b else 0
    ptr = torch.cumsum(counts, 0) - counts
    slot = torch.arange(batch.shape[0], device=x.device) - ptr[batch]
    out = x.new_zeros(b, max(m, 1), x.shape[-1])
    out[batch, slot] = x
    pad = torch.arange(max(m, 1), device=x.device)[None, :] >= counts[:, None]
    return out, pad, slot


class AdaLNBlock(nn.Module):
    """Pre-norm transformer block whose norms are shifted and scaled by the global vector (adaLN-Zero)."""

    def __init__(self, hidden: int, heads: int, ff_mult: int = 4, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False)
        self.attn = nn.MultiheadAttention(hidden, heads, dropout=dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False)
        self.ff = nn.Sequential(nn.Linear(hidden, ff_mult * hidden), nn.GELU(), nn.Linear(ff_mult * hidden, hidden))
        self.mod = nn.Linear(hidden, 6 * hidden)
        nn.init.zeros_(self.mod.weight)
        nn.init.zeros_(self.mod.bias)

    def forward(self, x: Tensor, g: Tensor, pad: Tensor) -> Tensor:
        """Update tokens ``x`` (B, T, hidden) given the global vector ``g`` (B, hidden) and padding (B, T)."""
        s1, b1, a1, s2, b2, a2 = self.mod(nn.functional.silu(g)).unsqueeze(1).chunk(6, dim=-1)
        h = self.norm1(x) * (1 + s1) + b1
        h, _ = self.attn(h, h, h, key_padding_mask=pad, need_weights=False)
        x = x + a1 * h
        h = self.norm2(x) * (1 + s2) + b2
        return x + a2 * self.ff(h)


class AtomTransformerDenoiser(nn.Module):
    """Velocity field v(y_t, f_t, s_t, t, t_s, c) as a transformer over atom tokens and a lattice token.

    Args:
        hidden: Token width.
        layers: Transformer blocks.
        fourier: Fourier frequencies k = 1..K per fractional axis in the atom tokens.
        cond_dim: Length of the condition vector (values and masks), 0 for none.
        num_species: Species vocabulary (Z = 1..num_species).
        heads: Attention heads (must divide ``hidden``).
    """

    def __init__(
        self,
        hidden: int = 256,
        layers: int = 6,
        fourier: int = 8,
        cond_dim: int = 0,
        num_species: int = NUM_SPECIES,
        heads: int = 8,
    ):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden ({hidden}) must be a multiple of heads ({heads})")
        self.register_buffer("kvec", torch.arange(1, fourier + 1, dtype=torch.float32), persistent=False)
        self.species_in = nn.Linear(num_species, hidden)
        self.coord_in = nn.Sequential(nn.Linear(6 * fourier, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.lattice_in = nn.Sequential(nn.Linear(6, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.kind = nn.Parameter(torch.zeros(2, hidden))  # 0: atom token, 1: lattice token
        self.time = SinusoidalTime(hidden)
        self.species_time = SinusoidalTime(hidden)
        self.cond = (
            nn.Sequential(nn.Linear(cond_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
            if cond_dim
            else None
        )
        self.blocks = nn.ModuleList([AdaLNBlock(hidden, heads) for _ in range(layers)])
        self.out_norm = nn.LayerNorm(hidden)
        self.coord_out = nn.Linear(hidden, 3)
        self.species_out = nn.Linear(hidden, num_species)
        self.lattice_out = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 6))

    def fourier_features(self, f: Tensor) -> Tensor:
        """(N, 3) fractional coordinates -> (N, 6K) sin/cos(2πk f): periodic with period 1 on every axis."""
        ang = 2 * math.pi * f.unsqueeze(-1) * self.kvec
        return torch.cat([torch.sin(ang).flatten(1), torch.cos(ang).flatten(1)], dim=-1)

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

        ``context`` (template tokens of retrieval-augmented generation) is not used by this family; a
        :class:`~mmmat.generative.flow.CrystalFlow` with templates is built with the message-passing family.
        """
        g = self.time(t) + self.species_time(ts)
        if self.cond is not None and cond is not None:
            g = g + self.cond(cond)
        atoms = self.species_in(s) + self.coord_in(self.fourier_features(f)) + self.kind[0]
        padded, pad, slot = pad_atoms(atoms, batch, counts)
        lat = (self.lattice_in(y) + self.kind[1]).unsqueeze(1)
        x = torch.cat([lat, padded], dim=1) + g.unsqueeze(1)
        pad = torch.cat([torch.zeros_like(pad[:, :1]), pad], dim=1)
        for block in self.blocks:
            x = block(x, g, pad)
        x = self.out_norm(x)
        h = x[:, 1:][batch, slot]
        return self.lattice_out(x[:, 0]), self.coord_out(h), self.species_out(h)


@torch.no_grad()
def translation_error(net: nn.Module, y: Tensor, f: Tensor, s: Tensor, t: Tensor, batch: Tensor,
                      counts: Tensor, cond: Tensor | None = None, shifts: int = 4,
                      generator: torch.Generator | None = None) -> float:
    """How far a denoiser is from invariance to a rigid translation of the fractional coordinates.

    The mean over ``shifts`` random shifts c of ``|v(f + c) - v(f)|² / |v(f)|²`` for the (per-crystal
    mean-removed) coordinate velocity; 0 for an exactly invariant denoiser.
    """
    from mmmat.generative.flow import _segment_mean

    b = counts.shape[0]

    def coord_v(ff: Tensor) -> Tensor:
        v = net(y, ff, s, t, t, batch, counts, cond)[1]
        return v - _segment_mean(v, batch, b)[batch]

    ref = coord_v(f)
    errs = []
    for _ in range(shifts):
        c = torch.rand(b, 3, device=f.device, generator=generator)[batch]
        errs.append(float(((coord_v((f + c) % 1.0) - ref) ** 2).sum() / (ref**2).sum().clamp(min=1e-12)))
    return sum(errs) / len(errs)
