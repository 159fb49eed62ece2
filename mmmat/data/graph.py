"""Periodic neighbour graphs for batches of crystals, in torch (CPU or CUDA).

Conventions (shared by every function here):

* Positions are Cartesian, in Å.  A batch of ``B`` crystals holds ``N`` atoms in total; ``batch`` (N,) gives
  the crystal of each atom and is sorted, as in torch-geometric.
* ``lattice`` is (B, 3, 3) with the lattice vectors as ROWS, in Å, so that Cartesian = fractional @ lattice.
* Edges follow torch-geometric's ``source_to_target`` flow: ``edge_index[0]`` is the source (neighbour) ``j``,
  ``edge_index[1]`` the target (centre) ``i``.  The edge vector, pointing from the centre to the neighbour, is
  ``pos[j] + cell_offsets @ lattice[batch[j]] - pos[i]`` and its length is the distance, in Å.
* An edge has ``0 < distance < cutoff``.  An atom's own periodic images (``i == j``, non-zero offset) are
  edges; the zero-offset self pair is one only with ``self_loops=True``.  Two distinct atoms closer than
  :data:`ZERO_DISTANCE_TOL` are not joined.
* Edges come sorted by target, then source, then cell offset (lexicographic).

The search is fully vectorised over the whole batch (no Python loop over crystals or atoms): with ``b_k``
the rows of ``inv(lattice).T`` (``1 / |b_k|`` is the spacing of the lattice planes spanned by the other two
vectors), an image ``o`` of source ``j`` can lie within the cutoff of target ``i`` only if
``|frac[j] - frac[i] + o|_k < cutoff * |b_k|`` on every axis ``k``.  Every (target, source) pair of every
crystal and, for each pair, every image inside that slab box are laid out with ``repeat_interleave`` /
``cumsum`` index arithmetic and filtered by distance.  Thin or skewed triclinic cells (several images per
axis) and atoms outside the cell need nothing special.  Distances are then computed with plain torch ops
from ``pos`` and ``lattice``, so they are differentiable with respect to both.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: Distances (Å) at or below which two atoms count as the same point (no edge between them).
ZERO_DISTANCE_TOL = 1e-8

#: Default bound on the (target, source, image) candidates examined at once; larger batches are split
#: into consecutive groups of target atoms (one group for MP-20-like batches of 256 crystals).
DEFAULT_MAX_CANDIDATES = 10_000_000

# Slack (Å) of the coarse candidate search; the exact distance test follows on the survivors.
_COARSE_MARGIN = 1e-3


def _check_inputs(pos: Tensor, lattice: Tensor, batch: Tensor | None, cutoff: float) -> Tensor:
    """Validate the shapes and values of the inputs and return ``batch`` (zeros when None)."""
    if pos.dim() != 2 or pos.shape[1] != 3:
        raise ValueError(f"pos must have shape (N, 3), got {tuple(pos.shape)}")
    if not pos.is_floating_point():
        raise ValueError(f"pos must be a floating-point tensor, got {pos.dtype}")
    if lattice.dim() == 2:
        raise ValueError("lattice must have shape (B, 3, 3); add a batch dimension with lattice[None]")
    if lattice.dim() != 3 or lattice.shape[1:] != (3, 3):
        raise ValueError(f"lattice must have shape (B, 3, 3), got {tuple(lattice.shape)}")
    if lattice.device != pos.device:
        raise ValueError(f"pos is on {pos.device} but lattice is on {lattice.device}")
    if not cutoff > 0:
        raise ValueError(f"cutoff must be positive, got {cutoff}")
    if lattice.shape[0] and float(torch.linalg.det(lattice.detach().double()).abs().min()) < 1e-6:
        raise ValueError("lattice holds a degenerate cell (volume below 1e-6 Å^3)")
    n_atoms = pos.shape[0]
    if batch is None:
        if lattice.shape[0] != 1:
            raise ValueError("batch is required when lattice holds more than one crystal")
        batch = torch.zeros(n_atoms, dtype=torch.long, device=pos.device)
    if batch.shape != (n_atoms,):
        raise ValueError(f"batch must have shape ({n_atoms},), got {tuple(batch.shape)}")
    if batch.device != pos.device:
        raise ValueError(f"pos is on {pos.device} but batch is on {batch.device}")
    batch = batch.long()
    if n_atoms:
        if bool((batch[1:] < batch[:-1]).any()):
            raise ValueError("batch must be sorted (atoms of one crystal contiguous, crystals in order)")
        if int(batch[0]) < 0 or int(batch[-1]) >= lattice.shape[0]:
            raise ValueError(f"batch values must lie in [0, {lattice.shape[0]}), lattice has that many cells")
    return batch


def _empty(pos: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Return an edge-free result on the device of ``pos``."""
    dev = pos.device
    return (
        torch.zeros(2, 0, dtype=torch.long, device=dev),
        torch.zeros(0, 3, dtype=torch.long, device=dev),
        pos.new_zeros(0),
    )


def _chunks(per_atom: Tensor, max_candidates: int) -> list[tuple[int, int]]:
    """Split atoms ``0..N`` into consecutive ranges of about ``max_candidates`` candidates each.

    Every range holds at most ``max_candidates`` candidates plus those of its last atom.
    """
    n_atoms = per_atom.shape[0]
    cum = torch.cumsum(per_atom, 0)
    total = int(cum[-1])
    if total <= max_candidates:
        return [(0, n_atoms)]
    group = (cum - per_atom) // max_candidates
    sizes = torch.unique_consecutive(group, return_counts=True)[1].tolist()
    bounds, start = [], 0
    for size in sizes:
        bounds.append((start, start + size))
        start += size
    return bounds


@torch.no_grad()
def _candidate_edges(
    pos: Tensor, lattice: Tensor, batch: Tensor, cutoff: float, max_candidates: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Return (source, target, cell offsets) of every pair within about ``cutoff`` (a superset of the edges).

    For each (target i, source j) pair of a crystal, with fractional difference ``df = frac[j] - frac[i]``, an
    image ``o`` can be within the cutoff only if ``|df_k + o_k| < cutoff * |b_k|`` on every axis ``k`` (the
    distance is at least the separation of the lattice planes); only those images are enumerated.
    """
    dev, dtype = pos.device, pos.dtype
    n_graphs, n_atoms = lattice.shape[0], pos.shape[0]
    arange = torch.arange

    # Geometry in float64 (B x 3 x 3 and N x 3 only).
    lat64 = lattice.double()
    inv = torch.linalg.inv(lat64)
    frac = torch.einsum("ni,nij->nj", pos.double(), inv[batch])
    # Reach along each axis in units of the lattice vector: |b_k| = norm of column k of inv(lattice).
    reach = (cutoff + _COARSE_MARGIN) * torch.linalg.vector_norm(inv, dim=1)  # (B, 3)
    # Upper bound on the images of one pair, used to size the groups of atoms processed at once.
    bound = (torch.floor(2 * reach) + 1).prod(dim=1).clamp(max=2**62 // max(n_atoms, 1)).long()  # (B,)

    counts = torch.bincount(batch, minlength=n_graphs)
    ptr = torch.cumsum(counts, 0) - counts
    atom_pairs = counts[batch]  # pairs with each atom as target
    atom_bound = atom_pairs * bound[batch]

    sources, targets, offsets = [], [], []
    for a0, a1 in _chunks(atom_bound, max_candidates):
        # All (target, source) pairs of the atoms a0..a1, target-major.
        rows = atom_pairs[a0:a1]
        n_pairs = int(rows.sum())
        tgt = torch.repeat_interleave(arange(a0, a1, device=dev), rows, output_size=n_pairs)
        g = batch[tgt]
        src = ptr[g] + arange(n_pairs, device=dev) - (torch.cumsum(rows, 0) - rows)[tgt - a0]
        df = frac[src] - frac[tgt]
        # Integer images o with -reach - df < o < reach - df on each axis.
        lo = torch.floor(-reach[g] - df).long() + 1
        size = (torch.ceil(reach[g] - df).long() - lo).clamp(min=0)
        n_img = size.prod(dim=1)
        n_cand = int(n_img.sum())
        if n_cand == 0:
            continue
        # All candidate images of all pairs, lexicographic in (o0, o1, o2) within a pair.
        pair = torch.repeat_interleave(arange(n_pairs, device=dev), n_img, output_size=n_cand)
        t = arange(n_cand, device=dev) - (torch.cumsum(n_img, 0) - n_img)[pair]
        s = size[pair]
        o2 = t % s[:, 2]
        t = torch.div(t, s[:, 2], rounding_mode="floor")
        o1 = t % s[:, 1]
        o0 = torch.div(t, s[:, 1], rounding_mode="floor")
        del t, s
        off = torch.stack([o0, o1, o2], dim=1) + lo[pair]
        del o0, o1, o2
        x = (df[pair] + off).to(dtype)
        vec = torch.einsum("ki,kij->kj", x, lattice[g[pair]])
        del x
        keep = (vec * vec).sum(dim=1) < (cutoff + _COARSE_MARGIN) ** 2
        del vec
        pair = pair[keep]
        sources.append(src[pair])
        targets.append(tgt[pair])
        offsets.append(off[keep])

    if not sources:
        empty = torch.zeros(0, dtype=torch.long, device=dev)
        return empty, empty, torch.zeros(0, 3, dtype=torch.long, device=dev)
    return torch.cat(sources), torch.cat(targets), torch.cat(offsets)


def _nearest_k(distances: Tensor, target: Tensor, n_atoms: int, k: int) -> Tensor:
    """Boolean mask keeping, for each target, its ``k`` shortest edges (ties: the earlier edge wins)."""
    order = torch.argsort(distances, stable=True)
    order = order[torch.argsort(target[order], stable=True)]
    tgt_sorted = target[order]
    degree = torch.bincount(target, minlength=n_atoms)
    first = torch.cumsum(degree, 0) - degree
    rank = torch.arange(order.shape[0], device=target.device) - first[tgt_sorted]
    keep = torch.zeros_like(target, dtype=torch.bool)
    keep[order] = rank < k
    return keep


def radius_graph_pbc(
    pos: Tensor,
    lattice: Tensor,
    batch: Tensor | None,
    cutoff: float,
    max_num_neighbors: int | None = None,
    self_loops: bool = False,
    max_candidates: int = DEFAULT_MAX_CANDIDATES,
) -> tuple[Tensor, Tensor, Tensor]:
    """Build the periodic radius graph of a batch of crystals.

    All crystals are handled at once with tensor ops, on the device of ``pos``; cells of any shape (thin
    or skewed triclinic cells needing several images per axis) and atoms outside the cell are handled.

    Args:
        pos: (N, 3) Cartesian positions in Å of the atoms of all crystals.
        lattice: (B, 3, 3) lattice vectors as rows, in Å.
        batch: (N,) sorted crystal index of each atom; may be None when B == 1.
        cutoff: Radius in Å; edges have distance strictly below it.
        max_num_neighbors: If given, keep for each target atom only its nearest ``max_num_neighbors`` edges;
            ties are broken by source index, then cell offset (the edge order).
        self_loops: Also return the zero-offset edge ``i -> i`` (distance 0) of every atom; it counts as the
            nearest neighbour for ``max_num_neighbors``.
        max_candidates: Bound on the (target, source, image) candidates examined at once (peak memory is
            roughly 150 bytes per candidate); bigger batches are processed in consecutive groups of target
            atoms.  The bound counts ``prod_k (floor(2 * cutoff * |b_k|) + 1)`` images per pair.

    Returns:
        ``edge_index`` (2, E) long with rows (source j, target i); ``cell_offsets`` (E, 3) long, the integer
        image of the source such that the edge vector is ``pos[j] + cell_offsets @ lattice[batch[j]] -
        pos[i]``; ``distances`` (E,) in Å, dtype of ``pos``, differentiable with respect to ``pos`` and
        ``lattice``.  Edges are sorted by target, then source, then offset.

    Raises:
        ValueError: On inconsistent shapes or devices, an unsorted ``batch``, a degenerate cell, a
            non-positive cutoff or a negative ``max_num_neighbors``.

    """
    batch = _check_inputs(pos, lattice, batch, cutoff)
    if max_num_neighbors is not None and max_num_neighbors < 0:
        raise ValueError(f"max_num_neighbors must be non-negative, got {max_num_neighbors}")
    if pos.shape[0] == 0:
        return _empty(pos)
    lattice = lattice.to(pos.dtype)
    src, tgt, offsets = _candidate_edges(pos.detach(), lattice.detach(), batch, float(cutoff), max_candidates)

    # Exact distances from the inputs as given (keeps the autograd graph).
    is_self = (src == tgt) & (offsets == 0).all(dim=1)
    vec = pos[src] + torch.einsum("ei,eij->ej", offsets.to(pos.dtype), lattice[batch[src]]) - pos[tgt]
    if self_loops:
        vec = torch.where(is_self[:, None], torch.ones_like(vec), vec)
        dist = torch.where(is_self, torch.zeros_like(vec[:, 0]), torch.linalg.vector_norm(vec, dim=1))
    else:
        dist = torch.linalg.vector_norm(vec, dim=1)

    d = dist.detach()
    keep = (d < cutoff) & (d > ZERO_DISTANCE_TOL)
    if self_loops:
        keep |= is_self
    else:
        keep &= ~is_self
    src, tgt, offsets, dist = src[keep], tgt[keep], offsets[keep], dist[keep]

    if max_num_neighbors is not None:
        keep = _nearest_k(dist.detach(), tgt, pos.shape[0], max_num_neighbors)
        src, tgt, offsets, dist = src[keep], tgt[keep], offsets[keep], dist[keep]

    return torch.stack([src, tgt]), offsets, dist


def radius_graph_pbc_from_frac(
    frac_coords: Tensor,
    lattice: Tensor,
    batch: Tensor | None,
    cutoff: float,
    max_num_neighbors: int | None = None,
    self_loops: bool = False,
    max_candidates: int = DEFAULT_MAX_CANDIDATES,
) -> tuple[Tensor, Tensor, Tensor]:
    """Like :func:`radius_graph_pbc`, but with (N, 3) fractional coordinates instead of Cartesian positions.

    Cartesian positions are ``frac_coords @ lattice[batch]`` (Å); the returned offsets and distances refer
    to them, so an edge vector is ``(frac[j] + offset - frac[i]) @ lattice``.
    """
    if frac_coords.dim() != 2 or frac_coords.shape[1] != 3:
        raise ValueError(f"frac_coords must have shape (N, 3), got {tuple(frac_coords.shape)}")
    if batch is None:
        batch = torch.zeros(frac_coords.shape[0], dtype=torch.long, device=frac_coords.device)
    if lattice.dim() != 3 or lattice.shape[1:] != (3, 3):
        raise ValueError(f"lattice must have shape (B, 3, 3), got {tuple(lattice.shape)}")
    lattice = lattice.to(frac_coords.dtype)
    pos = torch.einsum("ni,nij->nj", frac_coords, lattice[batch.long()])
    return radius_graph_pbc(
        pos,
        lattice,
        batch,
        cutoff,
        max_num_neighbors=max_num_neighbors,
        self_loops=self_loops,
        max_candidates=max_candidates,
    )
