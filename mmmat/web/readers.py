"""Reading what a user drops on a page: one function per input kind, so the readers can change in one place.

:func:`read_structure_file` and :func:`read_pattern_file` use :mod:`mmmat.io` when it is installed (every
structure and diffraction format it knows), else the readers the retrieval path already uses (CIF; xy/csv/dat
and powder CIF patterns).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

#: Suffixes read as images (Pillow formats and ``.npy``).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".npy")
_FALLBACK_STRUCTURE_SUFFIXES = (".cif", ".mcif")
_FALLBACK_PATTERN_SUFFIXES = (".xy", ".csv", ".dat", ".txt", ".xye", ".cif")


class ReadError(ValueError):
    """A file that cannot be read as the kind of input asked for; the message names it."""


def has_io() -> bool:
    """Whether :mod:`mmmat.io` (the shared input readers) is installed."""
    return importlib.util.find_spec("mmmat.io") is not None


def structure_suffixes() -> tuple[str, ...]:
    """Lower-case suffixes read as crystal structures."""
    if has_io():
        from mmmat import io

        return tuple(io.STRUCTURE_SUFFIXES)
    return _FALLBACK_STRUCTURE_SUFFIXES


def pattern_suffixes() -> tuple[str, ...]:
    """Lower-case suffixes read as diffraction patterns."""
    if has_io():
        from mmmat import io

        return tuple(io.PATTERN_SUFFIXES)
    return _FALLBACK_PATTERN_SUFFIXES


@dataclass
class QueryPattern:
    """A measured pattern as the pages use it: 2θ (degrees), intensity, wavelength (Å), file name."""

    two_theta: np.ndarray
    intensity: np.ndarray
    wavelength: float | None
    source: str
    meta: dict = field(default_factory=dict)

    def to_measured(self) -> Any:
        """The same pattern as :class:`mmmat.data.xrd.MeasuredPattern` (what the retrieval code embeds)."""
        from mmmat.data.xrd import MeasuredPattern

        return MeasuredPattern(self.two_theta, self.intensity, self.wavelength, self.source)


def read_structure_file(path: str | Path) -> Any:
    """Read one crystal as a pymatgen ``Structure``; :class:`ReadError` names the file on any failure.

    Partial occupancies are refused (see the policy in :func:`mmmat.data.schema.order_policy_message`).
    """
    p = Path(path)
    if has_io():
        from mmmat import io

        try:
            s = io.read_structure(p)
        except ValueError as exc:
            raise ReadError(str(exc)) from None
    else:
        from mmmat.data.schema import RecordError, parse_cif

        if p.suffix.lower() not in _FALLBACK_STRUCTURE_SUFFIXES:
            raise ReadError(f"{p.name}: not a CIF (this installation reads {', '.join(_FALLBACK_STRUCTURE_SUFFIXES)})")
        try:
            s = parse_cif(p.read_text(encoding="utf-8", errors="replace"), p.name)
        except RecordError as exc:
            raise ReadError(f"{p.name}: {exc.reason}") from None
    if not s.is_ordered:
        from mmmat.data.schema import order_policy_message

        raise ReadError(order_policy_message(p.name))
    if len(s) == 0:
        raise ReadError(f"{p.name}: the structure has no atoms")
    return s


def read_pattern_file(path: str | Path, wavelength: float | None = None) -> QueryPattern:
    """Read one measured powder pattern; :class:`ReadError` names the file on any failure.

    Args:
        path: Pattern file (``.xrdml`` and other vendor formats need :mod:`mmmat.io`).
        wavelength: Wavelength in Å when the file does not give it (overrides the file's).

    """
    p = Path(path)
    if has_io():
        from mmmat import io

        try:
            pat = io.read_pattern(p, wavelength=wavelength)
        except ValueError as exc:
            raise ReadError(str(exc)) from None
        return QueryPattern(np.asarray(pat.two_theta, float), np.asarray(pat.intensity, float), pat.wavelength,
                            p.name, dict(getattr(pat, "meta", {}) or {}))
    from mmmat.data.xrd import read_pattern

    if p.suffix.lower() not in _FALLBACK_PATTERN_SUFFIXES:
        raise ReadError(
            f"{p.name}: reading {p.suffix or 'this'} files needs mmmat.io, which this installation does not have "
            f"(readable here: {', '.join(_FALLBACK_PATTERN_SUFFIXES)})"
        )
    try:
        pat = read_pattern(p, wavelength=wavelength)
    except (ValueError, OSError) as exc:
        raise ReadError(f"{p.name}: {exc}") from None
    return QueryPattern(np.asarray(pat.two_theta, float), np.asarray(pat.intensity, float), pat.wavelength, p.name)


def read_image_file(path: str | Path, size: int = 64) -> np.ndarray:
    """Read an image as a (size, size) uint8 grayscale array; :class:`ReadError` names the file."""
    from mmmat.retrieval import RetrievalError, load_image

    try:
        return load_image(path, size)
    except RetrievalError as exc:
        raise ReadError(f"{Path(path).name}: {exc}") from None
