"""A crystal encoder with a diffraction branch: graph network plus the crystal's own computed powder pattern.

``"crystal/schnet_xrd"`` = :class:`~mmmat.encoders.crystal.CrystalEncoder` (``"crystal/schnet"``) ⊕ a 1D CNN
(:class:`~mmmat.encoders.spectrum.XRDCNNEncoder`, ``"xrd/cnn"``) applied to the powder pattern that
:func:`mmmat.data.xrd_torch.powder_pattern_torch` computes from the structure in the batch (kinematic
diffraction, Cu Kα, the grid and peak width of the data set's profiles), fused by concatenation and one
linear layer (``fusion="concat"``) or by the sum of two linear maps (``fusion="sum"``).

Why a physics branch
    Aligning XRD with crystals contrastively asks the crystal encoder to map a structure close to the
    embedding of its diffraction pattern.  A graph network has to learn the structure → pattern relation
    (interplanar spacings from the lattice, intensities from a Fourier sum over atoms) from the training
    crystals alone; on a few thousand crystals it memorises them and generalises poorly to XRD queries of
    unseen ones.  The powder pattern is a fixed, exactly known function of the structure, so computing it
    and encoding it with a CNN of the same kind as the query-side XRD encoder hands the alignment a feature
    in the query's own language: similar patterns give similar features for any crystal, seen or not.  The
    graph branch keeps what the pattern does not show directly (local coordination, composition, bonding)
    for the other modalities.  The pattern is computed under ``torch.no_grad`` (no parameter shapes it) and
    in float32 outside autocast.

Invariances
    The pattern depends only on the reciprocal metric, integer Miller indices and fractional phases, so it
    is unchanged by rotation or reflection of the cell, translation of the atoms, reordering of the atoms
    and the choice of unit cell (supercell, Niggli or any unimodular basis change); the graph branch is
    invariant to the same operations (see :mod:`mmmat.encoders.crystal`), and hence so is the fused output.

Input
    ``batch.crystal`` (or the crystal graph batch itself) with ``z``, ``pos`` (Å), ``lattice`` (B, 3, 3) Å,
    ``batch``; fractional coordinates for the pattern are recomputed from ``pos`` and ``lattice`` so that
    augmented geometry reaches both branches alike.  The graph branch also uses ``edge_index`` /
    ``cell_offset`` when the collator built them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from mmmat.data.xrd import CU_KA, DEFAULT_FWHM
from mmmat.data.xrd_torch import MAX_PAIRS, powder_pattern_torch
from mmmat.encoders.crystal import CrystalEncoder
from mmmat.encoders.registry import encoder_config, register_encoder
from mmmat.encoders.spectrum import XRDCNNEncoder


@register_encoder("crystal/schnet_xrd")
class CrystalXRDEncoder(nn.Module):
    """Graph network fused with a CNN over the crystal's computed powder pattern (Cu Kα, 2θ 5-90°).

    Attributes:
        gnn: The graph branch (a :class:`~mmmat.encoders.crystal.CrystalEncoder`).
        xrd: The diffraction branch (an :class:`~mmmat.encoders.spectrum.XRDCNNEncoder`).
        cutoff: The graph cutoff in Å (the graph branch's), read by models that collate raw crystals.
        out_dim: Width of the fused embedding.

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
        xrd: Mapping[str, Any] | None = None,
        fusion: str = "concat",
        fwhm: float = DEFAULT_FWHM,
        wavelength: float = CU_KA,
        max_pairs: int = MAX_PAIRS,
    ):
        """Build the encoder.

        Args:
            hidden: Graph branch: width of atom features (also its output width).
            num_interactions: Graph branch: interaction blocks.
            cutoff: Graph branch: neighbour cutoff radius, Å.
            num_rbf: Graph branch: Gaussian radial basis functions.
            max_num_neighbors: Graph branch: nearest neighbours kept when the graph is built here.
            out_dim: Width of the fused embedding (default ``hidden``).
            avg_num_neighbors: Graph branch: constant divisor of neighbour sums.
            radial_dim: Graph branch: width of the shared radial embedding.
            global_features: Graph branch: add number density and coordination features.
            dropout: Graph branch: dropout in its output MLP.
            xrd: Keyword arguments of the diffraction branch's :class:`XRDCNNEncoder` (its ``out_dim``
                included; its ``wavelength`` is set to ``wavelength``).
            fusion: ``"concat"`` (concatenate both branches, one linear map to ``out_dim``) or ``"sum"``
                (a linear map of each branch to ``out_dim``, summed).
            fwhm: Peak full width at half maximum of the computed patterns, degrees 2θ.
            wavelength: Wavelength of the computed patterns, Å (the diffraction branch's grid is 2θ at it).
            max_pairs: Memory bound of the pattern computation (see :mod:`mmmat.data.xrd_torch`).

        """
        super().__init__()
        if fusion not in ("concat", "sum"):
            raise ValueError(f"fusion must be 'concat' or 'sum', got {fusion!r}")
        if not fwhm > 0:
            raise ValueError(f"fwhm must be positive (degrees 2θ), got {fwhm}")
        self.gnn = CrystalEncoder(
            hidden=hidden,
            num_interactions=num_interactions,
            cutoff=cutoff,
            num_rbf=num_rbf,
            max_num_neighbors=max_num_neighbors,
            avg_num_neighbors=avg_num_neighbors,
            radial_dim=radial_dim,
            global_features=global_features,
            dropout=dropout,
        )
        xrd_cfg = dict(xrd or {})
        xrd_cfg["wavelength"] = float(wavelength)
        self.xrd = XRDCNNEncoder(**xrd_cfg)
        self.cutoff = self.gnn.cutoff
        self.out_dim = int(out_dim) if out_dim is not None else self.gnn.hidden
        self.fusion = fusion
        self.fwhm = float(fwhm)
        self.wavelength = float(wavelength)
        self.max_pairs = int(max_pairs)
        if fusion == "concat":
            self.fuse = nn.Linear(self.gnn.out_dim + self.xrd.out_dim, self.out_dim)
        else:
            self.fuse_gnn = nn.Linear(self.gnn.out_dim, self.out_dim)
            self.fuse_xrd = nn.Linear(self.xrd.out_dim, self.out_dim, bias=False)

    @torch.no_grad()
    def pattern(self, batch: Any) -> Tensor:
        """(B, 1701) float32 powder profiles computed from the crystals' structures (max-normalised to 1).

        A batch whose crystal graph carries ``computed_xrd`` (the same profiles, computed once when the data
        were loaded, see :meth:`mmmat.data.resident.ResidentData.precompute_crystal_feature`) uses them.
        """
        crystal = getattr(batch, "crystal", batch)
        cached = getattr(crystal, "computed_xrd", None)
        if cached is not None:
            return cached.float()
        lattice = crystal.lattice.detach().float()
        pos = crystal.pos.detach().float()
        graph_of = crystal.batch
        with torch.autocast(device_type=pos.device.type, enabled=False):
            lat_atoms = lattice.index_select(0, graph_of)  # (N, 3, 3), pos = frac @ lattice
            det_ok = torch.linalg.det(lat_atoms.double()).abs() > 1e-6
            eye = torch.eye(3, device=pos.device, dtype=lattice.dtype).expand_as(lat_atoms)
            lat_atoms = torch.where(det_ok[:, None, None], lat_atoms, eye)
            frac = torch.linalg.solve(lat_atoms.transpose(1, 2), pos.unsqueeze(-1)).squeeze(-1)
            return powder_pattern_torch(
                lattice, frac, crystal.z, graph_of, wavelength=self.wavelength, fwhm=self.fwhm,
                max_pairs=self.max_pairs,
            )

    def encode(self, batch: Any) -> tuple[Tensor, Tensor]:
        """Return (crystal embeddings (B, out_dim), graph-branch atom features (N, hidden)) in one pass.

        Args:
            batch: A :class:`~mmmat.data.batch.MultimodalBatch` or its ``crystal`` graph batch.

        """
        crystal = getattr(batch, "crystal", batch)
        h_graph, atoms = self.gnn.encode(crystal)
        h_xrd = self.xrd(profile=self.pattern(crystal))
        if self.fusion == "concat":
            out = self.fuse(torch.cat([h_graph, h_xrd.to(h_graph.dtype)], dim=-1))
        else:
            out = self.fuse_gnn(h_graph) + self.fuse_xrd(h_xrd).to(h_graph.dtype)
        return out, atoms

    def node_features(self, batch: Any) -> Tensor:
        """Per-atom features (N, hidden) of the graph branch."""
        return self.gnn.node_features(batch)

    def forward(self, batch: Any) -> Tensor:
        """Crystal embeddings (B, out_dim) of ``batch.crystal`` (a MultimodalBatch or the crystal batch)."""
        return self.encode(batch)[0]

#: Typed config of ``"crystal/schnet_xrd"`` (YAML ``class_path: mmmat.encoders.crystal_xrd.CrystalXRDEncoderConfig``).
CrystalXRDEncoderConfig = encoder_config("crystal/schnet_xrd")
