"""Periodic message-passing crystal encoder: an invariant continuous-filter network (``"crystal/schnet"``).

Design: invariant, not equivariant.
    The encoder sees only interatomic distances (and element types), never edge directions. Equivariant
    networks (PaiNN, NequIP, MACE) carry vector or tensor features; they are needed when the output is
    itself directional (forces, stress, dipoles) and they resolve angles explicitly. Here the output is
    one cell-independent embedding per crystal for contrastive alignment with powder XRD and text, both
    rotation-invariant descriptions (a powder pattern depends on interplanar spacings and structure-factor
    magnitudes, a text on composition, coordination and symmetry), so an invariant embedding is the
    right target and equivariant features would have to be collapsed to invariants before pooling anyway.
    Angles enter indirectly: within a 5 Å cutoff an atom's neighbours are mostly neighbours of each
    other, so stacked distance-based blocks see the triangle distances that fix bond angles; a
    distance-only network is not complete, though (some distinct environments give equal messages), and
    an angle-aware or equivariant model can be registered under another name if alignment quality ever
    calls for it. In exchange, the invariant design is cheap on a GPU: every per-edge operation is one
    dense matrix multiply or an element-wise product on an (E, hidden) tensor followed by one
    ``index_add_``, with no spherical harmonics, tensor products or (E, hidden, 3) tensors, which keeps
    time and memory per edge low and large contrastive batches affordable. It is safe under
    ``torch.autocast`` bf16 (geometry stays in full precision, neighbour sums accumulate in the dtype of
    the residual stream).

Invariances.
    Rotation and translation: only distances enter. Atom order: messages are summed over neighbours and
    atoms are mean-pooled. Choice of unit cell (supercells, unimodular cell changes): the periodic graph
    lists every image within the cutoff, so an atom's features depend only on its infinite-crystal
    neighbourhood, and the crystal embedding is the *mean* over atoms (a supercell repeats every atom
    equally often). The optional global features, number density (atoms/Å³) and the mean smooth
    coordination number (sum of cutoff-envelope weights per atom), are intensive and thus cell-invariant
    too. All edge contributions vanish smoothly at the cutoff (cosine envelope), so an edge that crosses
    the cutoff under rounding or augmentation changes nothing abruptly. With ``max_num_neighbors`` set,
    ties between equidistant neighbours at the truncation radius can be broken differently in different
    cells; keep it ``None`` where exact cell invariance matters.

Architecture (per block, pre-norm residual, SchNet/CGCNN-like):
    ``x = W_in · LayerNorm(h)``; ``m_i = (1 / avg_num_neighbors) Σ_j x_j ⊙ F_l(d_ij)``;
    ``h ← h + MLP(m)``, where the filter ``F_l(d) = A_l · (SiLU(W_r · rbf(d)) · envelope(d))`` shares the
    radial embedding ``SiLU(W_r · rbf(d))`` (width ``radial_dim``) across blocks and adds one bias-free
    linear map ``A_l`` (radial_dim -> hidden) per block (bias-free so that the envelope factors through
    it). Compared with PyG's SchNet, whose two-layer filter network is recomputed from the Gaussian basis
    in every block, this removes one (E × num_rbf × hidden) matrix multiply, one activation and one envelope
    product per block and halves the other. At equal width and depth (128 wide, 6 blocks) a forward+backward
    pass is about 2.5 times faster than PyG's SchNet on CPU (256 MP-20 crystals) and 1.7 (fp32) to 1.9
    (bf16) times faster with a third less memory on an H200 (2,048 MP-20-sized crystals).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from mmmat.encoders.registry import encoder_config, register_encoder

#: Largest atomic number the embedding table holds (index 0 is unused).
MAX_Z = 118

# Centring and scale of the global features on MP-20-like data (log number density in log(Å^-3),
# log(1 + smooth coordination number) at a 5 Å cutoff); only fixes their scale at initialisation.
_LOG_DENSITY_MEAN, _LOG_COORD_MEAN, _GLOBAL_SCALE = -2.9, 1.7, 0.4


class GaussianRBF(nn.Module):
    """Gaussian radial basis ``exp(-(d - mu_k)^2 / (2 delta^2))`` with centres mu_k on [0, cutoff] Å."""

    def __init__(self, cutoff: float, num_rbf: int):
        """Build ``num_rbf`` centres evenly spaced on [0, ``cutoff``] Å, width equal to their spacing."""
        super().__init__()
        centres = torch.linspace(0.0, cutoff, num_rbf)
        spacing = cutoff / max(num_rbf - 1, 1)
        self.coeff = -0.5 / spacing**2
        self.register_buffer("centres", centres, persistent=False)

    def forward(self, dist: Tensor) -> Tensor:
        """(E,) distances in Å -> (E, num_rbf) basis values in [0, 1]."""
        diff = dist.unsqueeze(-1) - self.centres.to(dist.dtype)
        return torch.exp(self.coeff * diff * diff)


def cosine_cutoff(dist: Tensor, cutoff: float) -> Tensor:
    """Smooth envelope ``0.5 * (cos(pi * d / cutoff) + 1)`` for ``d < cutoff`` Å, 0 beyond."""
    env = 0.5 * (torch.cos(dist * (math.pi / cutoff)) + 1.0)
    return torch.where(dist < cutoff, env, torch.zeros_like(env))


class InteractionBlock(nn.Module):
    """One pre-norm residual continuous-filter convolution over the periodic graph."""

    def __init__(self, hidden: int, radial_dim: int, avg_num_neighbors: float):
        """Build the block for width ``hidden``; sums over neighbours are divided by ``avg_num_neighbors``."""
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.lin_in = nn.Linear(hidden, hidden, bias=False)
        self.filter = nn.Linear(radial_dim, hidden, bias=False)
        self.mlp = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.scale = 1.0 / avg_num_neighbors

    def forward(self, h: Tensor, radial: Tensor, src: Tensor, tgt: Tensor) -> Tensor:
        """Update node features ``h`` (N, hidden) from the enveloped radial embedding (E, radial_dim)."""
        x = self.lin_in(self.norm(h))
        msg = x.index_select(0, src) * self.filter(radial)
        agg = torch.zeros_like(h).index_add_(0, tgt, msg.to(h.dtype), alpha=self.scale)
        return h + self.mlp(agg)


@register_encoder("crystal/schnet")
class CrystalEncoder(nn.Module):
    """Invariant periodic continuous-filter network; one embedding per crystal, mean-pooled over atoms.

    Reads ``batch.crystal`` (a torch-geometric ``Batch`` with ``z``, ``pos`` Å, ``lattice`` (B, 3, 3) Å,
    ``batch``, ``ptr`` and, if the collator built it, ``edge_index`` / ``cell_offset``). Without a graph,
    one is built on the input device with :func:`mmmat.data.graph.radius_graph_pbc`. Distances are always
    recomputed from ``pos``, ``lattice`` and ``cell_offset``, so gradients reach positions and lattice and
    augmented coordinates are honoured (the precomputed ``edge_dist`` is ignored). A precomputed graph must
    have been built with a cutoff of at least ``cutoff`` (longer edges are harmless: their weight is 0).
    """

    def __init__(
        self,
        hidden: int = 128,
        num_interactions: int = 4,
        cutoff: float = 5.0,
        num_rbf: int = 50,
        max_num_neighbors: int | None = None,
        out_dim: int | None = None,
        avg_num_neighbors: float = 32.0,
        radial_dim: int = 64,
        global_features: bool = True,
        dropout: float = 0.0,
    ):
        """Build the encoder.

        Args:
            hidden: Width of atom features and filters.
            num_interactions: Number of interaction blocks.
            cutoff: Neighbour cutoff radius, Å.
            num_rbf: Number of Gaussian radial basis functions on [0, cutoff].
            max_num_neighbors: Nearest neighbours kept per atom when the graph is built here (None = all
                within the cutoff, which keeps exact unit-cell invariance).
            out_dim: Width of the crystal embedding (default ``hidden``).
            avg_num_neighbors: Constant divisor of neighbour sums (about the mean degree: 31 on MP-20 at
                5 Å); a fixed constant, so sums stay counts and invariances hold.
            radial_dim: Width of the radial embedding shared by the blocks' filters (each block maps it to
                ``hidden`` filters); a function of one distance needs few features, and 64 instead of
                ``hidden`` cuts the per-edge matrix multiplies.
            global_features: Concatenate embedded number density and mean smooth coordination number to
                the pooled atom features before the output MLP.
            dropout: Dropout rate in the output MLP.

        """
        super().__init__()
        if hidden <= 0 or num_interactions < 0 or num_rbf <= 0 or not cutoff > 0:
            raise ValueError("hidden, num_rbf and cutoff must be positive and num_interactions non-negative")
        self.hidden = int(hidden)
        self.num_interactions = int(num_interactions)
        self.cutoff = float(cutoff)
        self.num_rbf = int(num_rbf)
        self.max_num_neighbors = None if max_num_neighbors is None else int(max_num_neighbors)
        self.out_dim = int(out_dim) if out_dim is not None else self.hidden
        self.global_features = bool(global_features)

        self.embedding = nn.Embedding(MAX_Z + 1, hidden)
        self.rbf = GaussianRBF(self.cutoff, self.num_rbf)
        self.radial = nn.Linear(self.num_rbf, radial_dim)
        self.blocks = nn.ModuleList(
            InteractionBlock(hidden, radial_dim, avg_num_neighbors) for _ in range(num_interactions)
        )
        self.final_norm = nn.LayerNorm(hidden)
        if self.global_features:
            self.global_mlp = nn.Sequential(nn.Linear(2, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        head_in = 2 * hidden if self.global_features else hidden
        self.head = nn.Sequential(
            nn.Linear(head_in, hidden), nn.SiLU(), nn.Dropout(dropout), nn.Linear(hidden, self.out_dim)
        )

    # ------------------------------------------------------------------ geometry
    def _graph(self, crystal: Any) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Return (src, tgt, dist Å, envelope) of the periodic graph, distances recomputed from positions."""
        dtype = self.embedding.weight.dtype
        pos = crystal.pos.to(dtype)
        lattice = crystal.lattice.to(dtype)
        batch = crystal.batch
        edge_index = getattr(crystal, "edge_index", None)
        offset = getattr(crystal, "cell_offset", None)
        if edge_index is None or offset is None:
            from mmmat.data.graph import radius_graph_pbc

            edge_index, offset, _ = radius_graph_pbc(
                pos.detach(), lattice.detach(), batch, self.cutoff, self.max_num_neighbors
            )
        src, tgt = edge_index[0], edge_index[1]
        # Element-wise products (not matmuls) keep the geometry in full precision under autocast.
        shift = (offset.to(dtype).unsqueeze(-1) * lattice.index_select(0, batch.index_select(0, src))).sum(1)
        vec = pos.index_select(0, src) - pos.index_select(0, tgt) + shift
        dist = torch.sqrt((vec * vec).sum(-1))
        return src, tgt, dist, cosine_cutoff(dist, self.cutoff)

    # ------------------------------------------------------------------ encoding
    def encode(self, batch: Any) -> tuple[Tensor, Tensor]:
        """Return (crystal embeddings (B, out_dim), atom features (N, hidden)) in one pass.

        Args:
            batch: A :class:`~mmmat.data.batch.MultimodalBatch` or its ``crystal`` graph batch.

        """
        crystal = getattr(batch, "crystal", batch)
        h, env, tgt = self._atoms(crystal)
        n_graphs = crystal.lattice.shape[0]
        graph_of = crystal.batch
        ptr = getattr(crystal, "ptr", None)
        if ptr is not None and ptr.shape[0] == n_graphs + 1:
            counts = (ptr[1:] - ptr[:-1]).to(h.dtype)
        else:
            counts = torch.bincount(graph_of, minlength=n_graphs).to(h.dtype)
        inv_counts = 1.0 / counts.clamp(min=1.0)
        pooled = h.new_zeros(n_graphs, h.shape[1]).index_add_(0, graph_of, h) * inv_counts.unsqueeze(-1)
        if self.global_features:
            lat = crystal.lattice.to(h.dtype)
            volume = torch.linalg.cross(lat[:, 0], lat[:, 1], dim=-1).mul(lat[:, 2]).sum(-1).abs()
            density = counts / volume.clamp(min=1e-6)
            coord = h.new_zeros(n_graphs).index_add_(0, graph_of.index_select(0, tgt), env.to(h.dtype))
            feats = torch.stack(
                [
                    (torch.log(density.clamp(min=1e-4)) - _LOG_DENSITY_MEAN) / _GLOBAL_SCALE,
                    (torch.log1p(coord * inv_counts) - _LOG_COORD_MEAN) / _GLOBAL_SCALE,
                ],
                dim=-1,
            )
            pooled = torch.cat([pooled, self.global_mlp(feats)], dim=-1)
        return self.head(pooled), h

    def _atoms(self, crystal: Any) -> tuple[Tensor, Tensor, Tensor]:
        """Atom features (N, hidden), edge envelopes (E,) and edge targets (E,)."""
        src, tgt, dist, env = self._graph(crystal)
        return self.message_passing(crystal.z, src, tgt, dist, env), env, tgt

    def message_passing(self, z: Tensor, src: Tensor, tgt: Tensor, dist: Tensor, env: Tensor) -> Tensor:
        """Atom features (N, hidden) from atomic numbers and the edges' distances (Å) and envelopes.

        The network itself, on tensors only (what ``torch.compile`` wraps).
        """
        h = self.embedding(z.long())
        radial = torch.nn.functional.silu(self.radial(self.rbf(dist)))
        radial = radial * env.unsqueeze(-1).to(radial.dtype)
        for block in self.blocks:
            h = block(h, radial, src, tgt)
        return self.final_norm(h)

    def node_features(self, batch: Any) -> Tensor:
        """Per-atom features (N, hidden) after the last block, for generation or property heads.

        Args:
            batch: A :class:`~mmmat.data.batch.MultimodalBatch` or its ``crystal`` graph batch.

        """
        crystal = getattr(batch, "crystal", batch)
        return self._atoms(crystal)[0]

    def forward(self, batch: Any) -> Tensor:
        """Crystal embeddings (B, out_dim) of ``batch.crystal`` (a MultimodalBatch or the crystal batch)."""
        return self.encode(batch)[0]

#: Typed config of ``"crystal/schnet"`` (YAML ``class_path: mmmat.encoders.crystal.CrystalEncoderConfig``).
CrystalEncoderConfig = encoder_config("crystal/schnet")
