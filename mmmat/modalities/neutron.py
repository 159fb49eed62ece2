"""Neutron powder diffraction: a sixth modality, computed from the crystal.

Physics (pymatgen's ``NDCalculator`` is the reference): the same reflections as the X-ray pattern of
:mod:`mmmat.data.xrd_torch` (one Friedel half-space, intensities doubled), with

``I(g) = 2 |F(g)|² / (sin² θ cos θ)``,  ``F(g) = Σ_j occ_j b_j exp(2πi g · r_j)``,

where ``b_j`` is the bound coherent scattering length of the element (fm, independent of angle; pymatgen's
``neutron_scattering_length.json`` from the Neutron Data Booklet) and only the Lorentz factor applies (no X-ray
polarisation term). No Debye-Waller factor. Elements without a tabulated length scatter nothing.

The pattern is rendered onto the project's grid (:data:`mmmat.data.xrd.TWO_THETA`, 5-90° 2θ) at
:data:`NEUTRON_WAVELENGTH` = 1.54184 Å (``NDCalculator``'s default, a common constant-wavelength choice; also
the grid's X-ray wavelength, so the 1D spectrum encoder's ln d resampling applies unchanged) with the X-ray
peak shape (Gaussian, FWHM :data:`mmmat.data.xrd.DEFAULT_FWHM`), max-normalised to 1.

Shards need no new member: batches carry the crystal, and the profile is computed from it on the batch's
device the first time an encoder asks (:meth:`NeutronSpec.derive`). Measured patterns at another wavelength
are converted through d-spacing by the query reader.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mmmat.data.xrd import DEFAULT_FWHM, TWO_THETA_MAX, TWO_THETA_MIN
from mmmat.modalities import ModalitySpec, register_modality

if TYPE_CHECKING:
    import torch
    from torch import Tensor

#: Neutron wavelength of the modality's grid, Å.
NEUTRON_WAVELENGTH = 1.54184


@functools.lru_cache(maxsize=1)
def _scattering_lengths_np() -> np.ndarray:
    """(119,) bound coherent scattering length (fm) by atomic number, 0 where pymatgen has none."""
    import pymatgen.analysis.diffraction as diffraction
    from pymatgen.core.periodic_table import Element

    path = Path(diffraction.__file__).parent / "neutron_scattering_length.json"
    table = json.loads(path.read_text(encoding="utf-8"))
    out = np.zeros(119, dtype=np.float64)
    for z in range(1, 119):
        value = table.get(Element.from_Z(z).symbol)
        if value is not None:
            out[z] = float(value)
    return out


def scattering_lengths(device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> Tensor:
    """(119,) bound coherent neutron scattering lengths in fm, indexed by atomic number (float32 by default)."""
    import torch

    return torch.as_tensor(_scattering_lengths_np(), dtype=dtype or torch.float32, device=device)


def neutron_pattern_torch(
    lattice: Tensor,
    frac: Tensor,
    z: Tensor,
    batch: Tensor,
    wavelength: float = NEUTRON_WAVELENGTH,
    fwhm: float | Tensor = DEFAULT_FWHM,
    grid: Any = None,
    occupancy: Tensor | None = None,
) -> Tensor:
    """(B, L) neutron powder profiles of a batch of crystals, each row max-normalised to 1.

    Args:
        lattice: (B, 3, 3) lattice vectors as rows, Å.
        frac: (N, 3) fractional coordinates.
        z: (N,) atomic numbers.
        batch: (N,) crystal index of each atom.
        wavelength: Neutron wavelength, Å.
        fwhm: Peak width, degrees 2θ.
        grid: 2θ grid in degrees (None: :data:`mmmat.data.xrd.TWO_THETA`).
        occupancy: (N,) site occupancies, or None.

    """
    import torch

    from mmmat.data.xrd_torch import powder_pattern_torch

    dtype = frac.dtype if frac.dtype in (torch.float32, torch.float64) else torch.float32
    lengths = scattering_lengths(frac.device, dtype)

    def amplitude(zz: Tensor, s2: Tensor) -> Tensor:
        return lengths[zz].to(s2.dtype)

    return powder_pattern_torch(
        lattice, frac, z, batch, wavelength=wavelength, two_theta_range=(TWO_THETA_MIN, TWO_THETA_MAX),
        fwhm=fwhm, grid=grid, occupancy=occupancy, scattering=amplitude, polarisation=False,
    )


def neutron_reflections(structure: Any, wavelength: float = NEUTRON_WAVELENGTH) -> Any:
    """The neutron reflections (2θ in degrees, relative intensity) of a pymatgen ``Structure`` in 5-90° 2θ."""
    import torch

    from mmmat.data.xrd_torch import reflections_torch, structure_tensors

    t = structure_tensors([structure], dtype=torch.float64)
    lengths = scattering_lengths("cpu", torch.float64)
    return reflections_torch(
        t["lattice"], t["frac"], t["z"], t["batch"], wavelength, (TWO_THETA_MIN, TWO_THETA_MAX),
        t["occupancy"], scattering=lambda zz, s2: lengths[zz], polarisation=False,
    )


def neutron_profile(structure: Any, wavelength: float = NEUTRON_WAVELENGTH, fwhm: float = DEFAULT_FWHM) -> np.ndarray:
    """(1701,) float32 neutron profile of a pymatgen ``Structure`` (or record) on the project's grid."""
    from mmmat.data.schema import MaterialRecord
    from mmmat.data.xrd_torch import structure_tensors

    if isinstance(structure, MaterialRecord):
        structure = structure.to_structure()
    t = structure_tensors([structure])
    out = neutron_pattern_torch(t["lattice"], t["frac"], t["z"], t["batch"], wavelength, fwhm,
                                occupancy=t["occupancy"])
    return out[0].numpy().astype(np.float32)


@register_modality
class NeutronSpec(ModalitySpec):
    """Neutron powder diffraction: (B, 1701) profiles at 1.54184 Å, derived from the crystal."""

    name = "neutron"
    order = 50
    record_fields = ()
    members = ()
    derived = True
    lazy = True
    query_aliases = ("nd", "neutron_diffraction")
    query_suffixes = ()  # the same file formats as X-ray patterns: say ``neutron=FILE``
    query_units = (
        "a constant-wavelength neutron powder pattern file (xy, csv, GSAS, ...): 2θ in degrees, intensity in "
        "counts; wavelength in Å (default 1.54184 Å)"
    )
    default_encoder = {"name": "xrd/cnn", "out_dim": 256}

    def derive(self, batch: Any) -> Tensor:
        """(B, 1701) profiles computed from ``batch.crystal`` on its device (zeros for rows without atoms)."""
        import torch

        c = batch.crystal
        with torch.no_grad():
            return neutron_pattern_torch(c.lattice, c.frac_coords, c.z, c.batch).float()

    def run_encoder(self, encoder: torch.nn.Module, batch: Any) -> Tensor:
        """The spectrum encoder on the neutron profiles."""
        return encoder(None, profile=self.batch_input(batch))

    def raw_batch(self, model: Any, chunk: Any) -> Any:
        """(N, 1701) neutron profiles on the grid."""
        from mmmat.modalities.builtin import profile_batch

        b, b.inputs[self.name] = profile_batch(model, chunk, self.name)
        return b

    def read_query(self, source: Any, model: Any = None, wavelength: float | None = None, **options: Any) -> Any:
        """A (1701,) profile from a pattern file (:func:`mmmat.io.read_pattern`), a ``Pattern`` or a profile.

        ``wavelength`` (Å) is the pattern's when its file does not say; the profile is converted through d to
        :data:`NEUTRON_WAVELENGTH`, background removed and max-normalised (:func:`mmmat.data.xrd.resample`).
        """
        from mmmat.data.xrd import TWO_THETA, resample
        from mmmat.io import InputError, Pattern, read_pattern
        from mmmat.modalities.builtin import _grid_profile

        if isinstance(source, np.ndarray):  # a profile already on the grid
            return _grid_profile(source, self.name)
        pattern = source if isinstance(source, Pattern) else read_pattern(Path(source), wavelength=wavelength)
        if pattern.wavelength is None and wavelength is not None:
            pattern.wavelength = wavelength
        profile = resample(pattern, TWO_THETA, NEUTRON_WAVELENGTH)
        if not profile.any():
            raise InputError(f"{pattern.source}: no part of the pattern falls on the 5-90° 2θ grid at "
                             f"{NEUTRON_WAVELENGTH} Å above its background")
        return profile

    def record_input(self, record: Any) -> np.ndarray | None:
        """The profile computed from the record's crystal."""
        return neutron_profile(record) if record.num_atoms else None

    def render(self, structure: Any, **options: Any) -> np.ndarray:
        """(1701,) neutron profile of ``structure`` (:func:`neutron_profile`)."""
        return neutron_profile(structure, **options)
