"""CHGNet energies, forces and stresses of a batch of crystals, with the input graph built by tensor ops.

CHGNet's own pipeline builds one ``CrystalGraph`` per structure on the CPU (a pymatgen neighbour list, then a
C/Python bookkeeping of directed and undirected edges) and featurises the graphs one by one in
``BatchedGraph.from_graphs``; in batched relaxations on a GPU this per-structure work costs far more than the
model.  Here the same batched input is built for the whole batch at once with torch ops on the device of the
inputs, and fed to the model's own ``CHGNet._compute``:

* Atom graph: every directed edge ``(i, j, image)`` (centre ``i``, neighbour ``j`` shifted by ``image`` lattice
  vectors) with length at most the converter's ``atom_graph_cutoff``, the zero-image self pair excluded.  The
  edges ``(i, j, n)`` and ``(j, i, -n)`` form one undirected edge, whose length gives the bond's radial bases.
* Bond graph: every ordered pair of distinct directed edges with the same centre atom, both shorter than the
  converter's ``bond_graph_cutoff``; its rows hold the centre atom and the two undirected edges, and the angle
  is that between the two (centre minus neighbour) bond vectors.
* As in ``BatchedGraph.from_graphs``, the Cartesian positions ``x`` are the fractional coordinates (in the
  model's dtype) times the lattice strained by a zero strain ``ε``, ``lattice @ (1 + ε)``; forces are
  ``-dE/dx`` and stresses ``dE/dε / V``, in GPa.

Edge order differs from CHGNet's, which changes results only by float round-off (every sum over edges is a
scatter-add).  The neighbour search and the graph's cutoff tests run in float64.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

from mmmat.data.graph import radius_graph_pbc

if TYPE_CHECKING:
    from chgnet.model import CHGNet

#: CHGNet's conversion of stress from eV/Å^3 to GPa.
EV_PER_A3_TO_GPA = 160.21766208

# Extra reach (Å) of the neighbour search, so that both directions of every edge within the cutoff are found.
_SEARCH_MARGIN = 1e-6


class CHGNetEdges(NamedTuple):
    """Index tensors of CHGNet's atom and bond graphs for a batch of crystals (atoms indexed over the batch).

    Attributes:
        center: (E,) centre atom ``i`` of each directed edge.
        neighbor: (E,) neighbour atom ``j`` of each directed edge.
        image: (E, 3) long; the neighbour sits at ``x[j] + image @ lattice``.
        directed2undirected: (E,) undirected edge of each directed edge.
        undirected2directed: (U,) one directed edge of each undirected edge (E == 2 U).
        angle_edges: (2, A) directed edges ``(e, e')`` of each bond-graph row, ``center[e] == center[e']``.
    """

    center: Tensor
    neighbor: Tensor
    image: Tensor
    directed2undirected: Tensor
    undirected2directed: Tensor
    angle_edges: Tensor


def _lex_sign(image: Tensor) -> Tensor:
    """Sign of the first non-zero component of each row of ``image`` (0 for a zero row)."""
    s = image.sign()
    return torch.where(s[:, 0] != 0, s[:, 0], torch.where(s[:, 1] != 0, s[:, 1], s[:, 2]))


@torch.no_grad()
def chgnet_edges(
    pos: Tensor, lattice: Tensor, batch: Tensor, atom_graph_cutoff: float, bond_graph_cutoff: float
) -> CHGNetEdges:
    """Build CHGNet's atom graph, its undirected-edge bookkeeping and its bond graph for a batch of crystals.

    Args:
        pos: (N, 3) Cartesian positions, Å.
        lattice: (B, 3, 3) lattice vectors as rows, Å.
        batch: (N,) sorted crystal index of each atom.
        atom_graph_cutoff: Directed edges have length ``<= atom_graph_cutoff`` (pymatgen's rule), Å.
        bond_graph_cutoff: Bond-graph pairs join edges shorter than ``bond_graph_cutoff``, Å.

    Returns:
        The index tensors, on the device of ``pos``; edges are grouped by centre atom.
    """
    pos, lattice = pos.double(), lattice.double()
    edge_index, image, _ = radius_graph_pbc(pos, lattice, batch, atom_graph_cutoff + _SEARCH_MARGIN)
    neighbor, center = edge_index
    n_atoms = pos.shape[0]

    # Canonical direction of each undirected edge: i < j, or i == j with a lexicographically positive image.
    canonical = (center < neighbor) | ((center == neighbor) & (_lex_sign(image) > 0))
    lo = torch.where(canonical, center, neighbor)
    hi = torch.where(canonical, neighbor, center)
    img = torch.where(canonical[:, None], image, -image)
    vec = pos[hi] + torch.einsum("ei,eij->ej", img.double(), lattice[batch[lo]]) - pos[lo]
    length = torch.linalg.vector_norm(vec, dim=1)

    keep = length <= atom_graph_cutoff
    center, neighbor, image, canonical = center[keep], neighbor[keep], image[keep], canonical[keep]
    lo, hi, img, length = lo[keep], hi[keep], img[keep], length[keep]

    reach = int(img.abs().max()) if img.shape[0] else 0
    width = 2 * reach + 1
    if n_atoms * n_atoms * width**3 < 2**62:
        key = (lo * n_atoms + hi) * width**3
        key = key + ((img[:, 0] + reach) * width + img[:, 1] + reach) * width + img[:, 2] + reach
        undirected, directed2undirected = torch.unique(key, return_inverse=True)
    else:
        key = torch.cat([lo[:, None], hi[:, None], img], 1)
        undirected, directed2undirected = torch.unique(key, dim=0, return_inverse=True)
    undirected2directed = torch.empty(undirected.shape[0], dtype=torch.long, device=pos.device)
    undirected2directed[directed2undirected[canonical]] = torch.nonzero(canonical).squeeze(1)

    # Bond graph: ordered pairs of distinct short edges around each centre (edges are sorted by centre); as in
    # CHGNet, the first edge may lie at the cutoff, the second lies strictly inside it.
    short = torch.nonzero(length <= bond_graph_cutoff).squeeze(1)
    short_center = center[short]
    degree = torch.bincount(short_center, minlength=n_atoms)
    start = torch.cumsum(degree, 0) - degree
    reps = degree[short_center]
    n_pairs = int(reps.sum())
    first = torch.repeat_interleave(torch.arange(short.shape[0], device=pos.device), reps, output_size=n_pairs)
    offset = torch.arange(n_pairs, device=pos.device) - (torch.cumsum(reps, 0) - reps)[first]
    second = start[short_center[first]] + offset
    first, second = short[first], short[second]
    valid = (first != second) & (length[second] < bond_graph_cutoff)
    angle_edges = torch.stack([first[valid], second[valid]])

    return CHGNetEdges(center, neighbor, image, directed2undirected, undirected2directed, angle_edges)


def chgnet_efs(
    model: CHGNet, pos: Tensor, lattice: Tensor, numbers: Tensor, counts: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """CHGNet energy, forces and stress of each crystal of a batch, with the graphs built on the device.

    Equals ``model.predict_graph([model.graph_converter(s) for s in structures], task="efs")`` up to float32
    round-off, except that atoms without neighbours are allowed (as with ``on_isolated_atoms="ignore"``) and
    distinct atoms at the same point get no edge (CHGNet gives NaN there).  The model is put in eval mode, as
    ``predict_graph`` does.

    Args:
        model: A CHGNet model; its ``graph_converter`` gives the cutoffs.
        pos: (N, 3) Cartesian positions of the atoms of all crystals, crystal after crystal, Å.
        lattice: (B, 3, 3) lattice vectors as rows, Å.
        numbers: (N,) atomic numbers.
        counts: (B,) atoms per crystal, each at least 1.

    Returns:
        ``energy`` (B,), eV/atom (CHGNet's ``e``: per atom for intensive models such as the pretrained ones,
        composition reference included); ``forces`` (N, 3), eV/Å; ``stress`` (B, 3, 3), GPa, CHGNet's
        ``dE/dε / V`` (ASE's sign convention: negative under compression), with ``V`` the signed volume
        ``det(lattice)``.  All detached, on the device of ``pos``, in the model's dtype.

    Raises:
        ValueError: If ``counts`` does not add up to the number of atoms.
    """
    from chgnet.model.composition_model import AtomRef
    from chgnet.model.model import BatchedGraph

    model.eval()
    dev = pos.device
    dtype = next(model.parameters()).dtype
    counts = counts.to(device=dev, dtype=torch.long)
    numbers = numbers.to(device=dev, dtype=torch.long)
    n_graphs = counts.shape[0]
    if int(counts.sum()) != pos.shape[0]:
        raise ValueError(f"counts add up to {int(counts.sum())} atoms, pos holds {pos.shape[0]}")
    batch = torch.repeat_interleave(torch.arange(n_graphs, device=dev), counts)
    conv = model.graph_converter
    edges = chgnet_edges(pos.detach(), lattice.detach(), batch, conv.atom_graph_cutoff, conv.bond_graph_cutoff)
    d2u, u2d = edges.directed2undirected, edges.undirected2directed
    e1, e2 = edges.angle_edges

    inv_lattice = torch.linalg.inv(lattice.detach().double())
    frac = torch.einsum("ni,nij->nj", pos.detach().double(), inv_lattice[batch]).to(dtype)
    with torch.enable_grad():
        strain = torch.zeros(n_graphs, 3, 3, dtype=dtype, device=dev, requires_grad=True)
        lat = lattice.detach().to(dtype) @ (torch.eye(3, dtype=dtype, device=dev) + strain)
        x = torch.einsum("ni,nij->nj", frac, lat[batch])
        shift = torch.einsum("ei,eij->ej", edges.image.to(dtype), lat[batch[edges.center]])
        vec = x[edges.center] - (x[edges.neighbor] + shift)
        length = torch.linalg.vector_norm(vec, dim=1)
        unit = vec / length[:, None]
        length_u = length[u2d]
        radial = model.bond_basis_expansion
        graph = BatchedGraph(
            atomic_numbers=numbers,
            bond_bases_ag=radial.rbf_expansion_ag(length_u),
            bond_bases_bg=radial.rbf_expansion_bg(length_u),
            angle_bases=model.angle_basis_expansion(unit[e1], unit[e2]),
            batched_atom_graph=torch.stack([edges.center, edges.neighbor], 1),
            batched_bond_graph=torch.stack([edges.center[e1], d2u[e1], d2u[e2]], 1),
            atom_owners=batch,
            directed2undirected=d2u,
            atom_positions=[x],
            strains=[strain],
            volumes=torch.linalg.det(lat.detach()),
        )
        energy = model._compute(graph)["e"]
        total = energy * counts if model.is_intensive else energy
        grad_x, grad_strain = torch.autograd.grad(total.sum(), (x, strain))

    comp = model.composition_model
    if comp is not None:
        if not isinstance(comp, AtomRef):
            raise TypeError(f"unsupported CHGNet composition model {type(comp).__name__}")
        feas = torch.zeros(n_graphs, comp.max_num_elements, dtype=dtype, device=dev)
        feas.index_put_((batch, numbers - 1), torch.ones_like(numbers, dtype=dtype), accumulate=True)
        if comp.is_intensive:
            feas = feas / counts[:, None]
        energy = energy + comp.fc(feas).view(-1)
    stress = grad_strain * (EV_PER_A3_TO_GPA / graph.volumes)[:, None, None]
    return energy.detach(), -grad_x, stress
