"""Reading user inputs: crystal structures and measured powder diffraction patterns, with one error type.

Every reader raises :class:`InputError` (a ``ValueError``) whose message names the file, for a missing file,
an unknown suffix, a truncated or malformed file, a scan without a 2θ axis and the like.

Patterns
    :func:`read_pattern` dispatches on the suffix and returns a :class:`Pattern`: 2θ in degrees (ascending),
    intensity (counts where the file gives counts), and the wavelengths the file states (Kα1 and Kα2 in Å
    and their intensity ratio), ``None`` where it states none.

    ========================  ===================================================================  ==========
    suffix                    format                                                               wavelength
    ========================  ===================================================================  ==========
    ``.xrdml``                Panalytical XRDML (XML, schema 1.x/2.x; first 2θ scan)                Kα1, Kα2, ratio
    ``.brml``                 Bruker DIFFRAC.SUITE (zip of XML, ``Experiment*/RawData*.xml``)       Kα1, Kα2, ratio
    ``.raw``                  Bruker/Siemens DIFFRAC-plus RAW version 3 (``RAW1.01``, binary)      Kα1, Kα2, ratio
    ``.ras``                  Rigaku RAS text (``*RAS_INT_START`` blocks; first scan)               Kα1, Kα2
    ``.gsa .gsas .fxye``      GSAS powder data (``BANK`` with ``CONS`` bins: STD, ESD, ALT, FXYE)   none
    ``.xy .xye .csv .dat``    two columns of text (:func:`read_xy`)                                 none
    ``.txt``
    ``.cif``                  powder CIF profile loops (:func:`read_cif_powder`)                    one
    ========================  ===================================================================  ==========

    Maintained readers were considered first: xylib-py is published as a source package only (a C++ build
    with Boost), xrayutilities reads XRDML and RAS scans but not the wavelength they record (and pulls
    h5py, lmfit, odrpack), and fabio reads 2-D detector images, not 1-D scans.  The formats above are small,
    so they are read here with the standard library (``xml.etree``, ``zipfile``, ``struct``).  Bruker RAW
    version 4 (``RAW4.00``) is refused with a message that names the file: Bruker publishes no specification
    of it (versions 1-3 are documented in the DIFFRAC manuals; the readers of version 4 that exist were
    reverse-engineered from sample files, with several record types left unknown), so a reader could not be
    checked against anything but its own guesses.  Export such scans as ``.brml`` (documented XML) or ``.xy``.

Structures
    :func:`read_structure` reads CIF (a file or CIF text), POSCAR/CONTCAR, extxyz and the other formats
    pymatgen or ASE read; :func:`read_structures` every frame of a multi-structure file.

Images and texts
    :func:`read_image` reads an image (Pillow formats, ``.npy``) as a square uint8 grayscale array;
    :func:`read_text` a query sentence (the string itself, or a ``.txt``/``.md`` file).

Model inputs
    :func:`read_xrd_profile` puts a pattern on the model's 2θ grid (Cu Kα, background removed).

Shards
    :func:`find_shards` is the one place that finds the splits of a shard folder and their ``shard-*.tar``.
"""

from __future__ import annotations

import math
import os
import re
import struct
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.etree import ElementTree as ET

import numpy as np

#: Suffixes :func:`read_pattern` reads.
PATTERN_SUFFIXES: tuple[str, ...] = (
    ".xrdml", ".brml", ".raw", ".ras", ".gsa", ".gsas", ".fxye", ".xy", ".xye", ".csv", ".dat", ".txt", ".cif",
)
#: Suffixes :func:`read_structure` reads (plus any file name pymatgen recognises, such as ``POSCAR``).
STRUCTURE_SUFFIXES: tuple[str, ...] = (".cif", ".vasp", ".poscar", ".extxyz", ".xyz", ".json", ".cssr", ".xsf")
#: Suffixes :func:`read_image` reads.
IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".npy")
#: Suffixes :func:`read_text` reads as a file (any other string is the text itself).
TEXT_SUFFIXES: tuple[str, ...] = (".txt", ".md")


class InputError(ValueError):
    """A user input (file or value) that cannot be used; the message names it."""


@dataclass
class Pattern:
    """A powder diffraction pattern.

    Attributes:
        two_theta: (N,) ascending 2θ in degrees (at ``wavelength``).
        intensity: (N,) intensities (counts or arbitrary units).
        wavelength: Kα1 (or the monochromatic) wavelength in Å; None when unknown.
        wavelength2: Kα2 wavelength in Å; None when the file gives none (monochromatic or unknown).
        ka2_ratio: Intensity ratio I(Kα2)/I(Kα1); None when the file gives none.
        source: Where it came from (the file name, plus a block or scan where relevant).
        meta: Anything else the file says (counting time, scan axis, anode, ...).

    """

    two_theta: np.ndarray
    intensity: np.ndarray
    wavelength: float | None = None
    wavelength2: float | None = None
    ka2_ratio: float | None = None
    source: str = ""
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.two_theta.shape[0])

    def d_spacing(self) -> np.ndarray:
        """d-spacing in Å of every point (needs the wavelength)."""
        if self.wavelength is None:
            raise InputError(f"{self.source}: wavelength unknown, cannot convert 2θ to d")
        with np.errstate(divide="ignore", invalid="ignore"):
            return self.wavelength / (2.0 * np.sin(np.radians(np.asarray(self.two_theta, float)) / 2.0))


_NUMBER = re.compile(r"^[+-]?(?:\d+\.?\d*|\.\d+)(?:[eEdD][+-]?\d+)?")


def _parse_number(token: str) -> float | None:
    """Float from a token such as ``12.5``, ``1234(5)``, ``2.2E+02``; None if it is not a number."""
    token = token.strip()
    if "(" in token:
        head, _, tail = token.partition("(")
        if not tail.rstrip(")").isdigit():
            return None
        token = head
    try:
        return float(token)
    except ValueError:
        if _NUMBER.fullmatch(token):  # Fortran exponent 1.0D+03
            return float(token.replace("d", "e").replace("D", "E"))
        return None


def _source_text(path_or_text: str | os.PathLike[str]) -> tuple[str, str]:
    """(name, text): a path is read, a string holding a newline is the text itself."""
    if isinstance(path_or_text, str) and ("\n" in path_or_text or "\r" in path_or_text):
        return "<text>", path_or_text
    path = Path(path_or_text)
    return str(path_or_text), path.read_text(encoding="utf-8", errors="replace")


def _check_two_theta(name: str, tt: np.ndarray, inten: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate a (2θ, intensity) pair; return them ascending with non-finite intensities dropped."""
    bad = np.flatnonzero(~np.isfinite(tt))
    if bad.size:
        raise InputError(f"{name}: 2θ is not a finite number at data row {bad[0] + 1}")
    if tt.size < 10:
        raise InputError(f"{name}: need at least 10 data rows (2θ, intensity), found {tt.size}")
    step = np.diff(tt)
    if not ((step > 0).all() or (step < 0).all()):
        k = int(np.flatnonzero(step <= 0)[0] if (step > 0).sum() >= (step < 0).sum() else
                np.flatnonzero(step >= 0)[0])
        raise InputError(
            f"{name}: 2θ is not strictly monotonic (data row {k + 2}: {tt[k + 1]:g} after {tt[k]:g})"
        )
    if step[0] < 0:
        tt, inten = tt[::-1], inten[::-1]
    keep = np.isfinite(inten)
    tt, inten = tt[keep], inten[keep]
    if tt.size < 10:
        raise InputError(f"{name}: need at least 10 rows with a finite intensity, found {tt.size}")
    return np.ascontiguousarray(tt), np.ascontiguousarray(inten)


def read_xy(path_or_text: str | os.PathLike[str], wavelength: float | None = None) -> Pattern:
    """Read a two-column powder pattern (``.xy``, ``.xye``, ``.csv``, ``.txt``, ``.dat``).

    Columns are separated by whitespace, commas or semicolons (with semicolons, a comma inside a number is
    read as a decimal comma).  Lines starting with ``#``, ``!`` or ``;`` are comments, lines without a
    leading number (headers) are skipped, columns after the second (esd) are ignored, ``1234(5)`` reads as
    1234.  A descending scan is reversed.

    Args:
        path_or_text: A file path, or the file's text itself (any string holding a newline).
        wavelength: Wavelength in Å to attach (the format does not carry one).

    Returns:
        The pattern, 2θ ascending.

    Raises:
        InputError: (message names the file) fewer than two numeric columns, fewer than 10 rows, or a
            2θ column that is not finite and strictly monotonic.

    """
    name, text = _source_text(path_or_text)
    lines = [ln.strip() for ln in text.splitlines()]
    lines = [ln for ln in lines if ln and ln[0] not in "#!;"]
    semicolon = any(";" in ln for ln in lines)
    splitter = re.compile(r"[;\s]+") if semicolon else re.compile(r"[,;\s]+")
    rows: list[list[float]] = []
    for ln in lines:
        values: list[float] = []
        for tok in splitter.split(ln):
            if not tok:
                continue
            v = _parse_number(tok.replace(",", ".") if semicolon else tok)
            if v is None:
                break
            values.append(v)
        if values:
            rows.append(values)
    if not rows:
        raise InputError(f"{name}: no numeric data rows found")
    counts = np.array([len(r) for r in rows])
    ncols = int(np.bincount(counts).argmax())
    if ncols < 2:
        raise InputError(f"{name}: need two numeric columns (2θ, intensity), found {ncols}")
    data = np.array([r[:2] for r in rows if len(r) >= 2], dtype=np.float64)
    tt, inten = _check_two_theta(name, data[:, 0], data[:, 1])
    return Pattern(tt, inten, None if wavelength is None else float(wavelength), source=name)


#: CIF items holding the profile's 2θ (degrees), most preferred first.
CIF_TWO_THETA_ITEMS = ("_pd_proc_2theta_corrected", "_pd_meas_2theta_scan", "_pd_meas_angle_2theta")
#: CIF items holding the profile's intensity, measured before processed before calculated.
CIF_INTENSITY_ITEMS = (
    "_pd_meas_counts_total",
    "_pd_meas_intensity_total",
    "_pd_proc_intensity_total",
    "_pd_proc_intensity_net",
    "_pd_calc_intensity_total",
    "_pd_calc_intensity_net",
)
#: CIF items holding the wavelength (Å).
CIF_WAVELENGTH_ITEMS = ("_diffrn_radiation_wavelength", "_pd_proc_wavelength")


def _cif_numbers(values: Any) -> np.ndarray:
    """Floats from CIF values (``1234(5)`` → 1234; ``.``/``?``/junk → NaN)."""
    if isinstance(values, str):
        values = [values]
    cleaned = [v.split("(", 1)[0] for v in values]
    try:
        return np.array([float(v) if v not in (".", "?", "") else math.nan for v in cleaned])
    except ValueError:
        return np.array([math.nan if (x := _parse_number(v)) is None else x for v in values], dtype=float)


def _cif_first_number(value: Any) -> float | None:
    arr = _cif_numbers(value)
    arr = arr[np.isfinite(arr)]
    return float(arr[0]) if arr.size else None


def _cif_range_two_theta(items: dict[str, Any], n: int) -> np.ndarray | None:
    """2θ of n points from ``_pd_proc_2theta_range_*`` or ``_pd_meas_2theta_range_*`` (min, max, inc)."""
    best: tuple[int, np.ndarray] | None = None
    for kind in ("proc", "meas"):
        lo = _cif_first_number(items.get(f"_pd_{kind}_2theta_range_min", "?"))
        hi = _cif_first_number(items.get(f"_pd_{kind}_2theta_range_max", "?"))
        inc = _cif_first_number(items.get(f"_pd_{kind}_2theta_range_inc", "?"))
        if lo is None or (hi is None and (inc is None or inc <= 0)):
            continue
        if hi is not None and hi > lo:
            implied = round((hi - lo) / inc) + 1 if inc and inc > 0 else n
            tt = np.linspace(lo, hi, n)
        elif inc is not None and inc > 0:
            implied = n
            tt = lo + inc * np.arange(n)
        else:
            continue
        mismatch = abs(implied - n)
        if best is None or mismatch < best[0]:
            best = (mismatch, tt)
    return None if best is None else best[1]


def read_cif_powder(path_or_text: str | os.PathLike[str]) -> Pattern:
    """Read the powder profile (2θ, intensity) from a CIF, e.g. an IUCr Rietveld CIF.

    Every data block is searched for a loop with an intensity item (:data:`CIF_INTENSITY_ITEMS`, measured
    preferred over calculated); among blocks, one with measured intensities and then the most points wins
    (so a structure-only block or a calculated pattern is passed over).  2θ comes from a loop item in the
    same loop (:data:`CIF_TWO_THETA_ITEMS`) or, when the loop carries only intensities, from
    ``_pd_proc_2theta_range_{min,max,inc}`` / ``_pd_meas_2theta_range_*``.  Values such as ``1234(5)`` are
    read without their esd.  The wavelength is the first value of ``_diffrn_radiation_wavelength`` or
    ``_pd_proc_wavelength`` in the profile block, else in the other blocks (blocks whose name contains
    ``simulated`` skipped), else None.

    Args:
        path_or_text: A file path, or the CIF text itself (any string holding a newline).

    Returns:
        The pattern, 2θ ascending; ``source`` names the file, block and intensity item.

    Raises:
        InputError: (message names the file) unparseable CIF or no profile in it.

    """
    import warnings

    from pymatgen.io.cif import CifFile

    name, text = _source_text(path_or_text)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cif = CifFile.from_str(text)
    except Exception as exc:  # pymatgen raises many types on bad CIFs
        raise InputError(f"{name}: unparseable CIF ({type(exc).__name__}: {str(exc)[:200]})") from None
    blocks = [
        (
            block_name,
            {k.lower(): v for k, v in block.data.items()},
            [[k.lower() for k in lp] for lp in block.loops],
        )
        for block_name, block in cif.data.items()
    ]

    candidates = []
    for order, (block_name, items, _) in enumerate(blocks):
        for rank, key in enumerate(CIF_INTENSITY_ITEMS):
            values = items.get(key)
            if not isinstance(values, list) or len(values) < 10:
                continue
            inten = _cif_numbers(values)
            if np.isfinite(inten).sum() < 10:
                continue
            measured = not key.startswith("_pd_calc")
            candidates.append((not measured, -inten.size, order, rank, block_name, key, inten))
            break
    if not candidates:
        raise InputError(f"{name}: no powder profile (no loop with {', '.join(CIF_INTENSITY_ITEMS)})")
    candidates.sort(key=lambda c: c[:4])

    problems = []
    for _, _, order, _, block_name, key, inten in candidates:
        items, loops = blocks[order][1], blocks[order][2]
        loop = next((lp for lp in loops if key in lp), [key])
        tt = None
        for tt_key in CIF_TWO_THETA_ITEMS:
            if tt_key in loop and isinstance(items.get(tt_key), list):
                tt = _cif_numbers(items[tt_key])
                break
        if tt is None:
            tt = _cif_range_two_theta(items, inten.size)
        if tt is None:  # range given in another block (e.g. a separate instrument block)
            for other_name, other_items, _ in blocks:
                if other_name != block_name and "simulated" not in other_name.lower():
                    tt = _cif_range_two_theta(other_items, inten.size)
                    if tt is not None:
                        break
        if tt is None:
            problems.append(f"block {block_name!r} has {key} but no 2θ (loop item or *_2theta_range_*)")
            continue
        source = f"{name} [data_{block_name}: {key}]"
        try:
            tt, inten = _check_two_theta(source, tt, inten)
        except InputError as exc:
            problems.append(str(exc))
            continue
        return Pattern(tt, inten, _cif_wavelength(blocks, order), source=source)
    raise InputError(f"{name}: no usable powder profile ({'; '.join(problems)})")


def _cif_wavelength(blocks: list[tuple[str, dict[str, Any], list[list[str]]]], order: int) -> float | None:
    """Wavelength (Å) from the profile block, else from the other non-simulated blocks."""
    rest = [b for i, b in enumerate(blocks) if i != order and "simulated" not in b[0].lower()]
    for _, items, _ in [blocks[order], *rest]:
        for key in CIF_WAVELENGTH_ITEMS:
            if key in items:
                value = _cif_first_number(items[key])
                if value is not None and 0.01 < value < 10.0:
                    return value
    return None


# ====================================================================== helpers for the vendor readers
def _local(tag: str) -> str:
    """An XML tag without its namespace."""
    return tag.rsplit("}", 1)[-1]


def _find(elem: Any, name: str) -> Any:
    """First descendant of ``elem`` whose local tag is ``name`` (any namespace), or None."""
    for e in elem.iter():
        if _local(e.tag) == name:
            return e
    return None


def _float_or_none(text: Any) -> float | None:
    try:
        value = float(str(text).strip().strip('"'))
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _wavelength_ok(value: float | None) -> float | None:
    """A wavelength in Å when it is plausible for X-rays or neutrons (0.01-10 Å), else None."""
    return value if value is not None and 0.01 < value < 10.0 else None


def _numbers(text: str | None, name: str, what: str) -> np.ndarray:
    if text is None or not text.strip():
        raise InputError(f"{name}: empty {what}")
    try:
        return np.array(text.split(), dtype=np.float64)
    except ValueError:
        raise InputError(f"{name}: {what} holds a value that is not a number") from None


def _parse_xml(data: bytes, name: str) -> Any:
    try:
        return ET.fromstring(data)
    except ET.ParseError as exc:
        raise InputError(f"{name}: truncated or malformed XML ({exc})") from None


# ====================================================================== Panalytical XRDML
def read_xrdml(path: str | os.PathLike[str]) -> Pattern:
    """Read a Panalytical ``.xrdml`` scan (first scan with a 2θ axis; counts, or intensities as given).

    The 2θ axis is ``positions[@axis="2Theta"]`` as a list (``listPositions``) or as start and end
    positions over the number of intensities; wavelengths from ``usedWavelength`` (``kAlpha1``,
    ``kAlpha2``, ``ratioKAlpha2KAlpha1``).
    """
    name = str(path)
    root = _parse_xml(Path(path).read_bytes(), name)
    scans = [e for e in root.iter() if _local(e.tag) == "scan"]
    if not scans:
        raise InputError(f"{name}: no <scan> in the XRDML file")
    problems = []
    for number, scan in enumerate(scans):
        points = _find(scan, "dataPoints")
        if points is None:
            problems.append(f"scan {number} has no <dataPoints>")
            continue
        axis = next((p for p in points if _local(p.tag) == "positions" and p.get("axis") == "2Theta"), None)
        if axis is None:
            problems.append(f"scan {number} has no 2Theta axis (axes: "
                            + ", ".join(p.get("axis", "?") for p in points if _local(p.tag) == "positions")
                            + ")")
            continue
        counts_el = next((p for p in points if _local(p.tag) in ("counts", "intensities")), None)
        if counts_el is None:
            problems.append(f"scan {number} has no <counts> or <intensities>")
            continue
        y = _numbers(counts_el.text, name, f"<{_local(counts_el.tag)}> of scan {number}")
        listed = _find(axis, "listPositions")
        if listed is not None:
            tt = _numbers(listed.text, name, "2Theta <listPositions>")
        else:
            start = _float_or_none(getattr(_find(axis, "startPosition"), "text", None))
            end = _float_or_none(getattr(_find(axis, "endPosition"), "text", None))
            if start is None or end is None:
                problems.append(f"scan {number}: 2Theta axis without start/end or list positions")
                continue
            tt = np.linspace(start, end, y.size)
        if tt.size != y.size:
            raise InputError(f"{name}: scan {number} has {tt.size} 2θ positions but {y.size} intensities")
        used = _find(root, "usedWavelength")
        wl1 = wl2 = ratio = None
        meta: dict[str, Any] = {"format": "xrdml", "scan": number, "intensity_kind": _local(counts_el.tag)}
        if used is not None:
            wl1 = _wavelength_ok(_float_or_none(getattr(_find(used, "kAlpha1"), "text", None)))
            wl2 = _wavelength_ok(_float_or_none(getattr(_find(used, "kAlpha2"), "text", None)))
            ratio = _float_or_none(getattr(_find(used, "ratioKAlpha2KAlpha1"), "text", None))
            meta["intended_wavelength"] = used.get("intended")
        time_el = _find(points, "commonCountingTime")
        if time_el is not None:
            meta["counting_time_s"] = _float_or_none(time_el.text)
        anode = _find(root, "anodeMaterial")
        if anode is not None and anode.text:
            meta["anode"] = anode.text.strip()
        tt, y = _check_two_theta(name, tt, y)
        return Pattern(tt, y, wl1, wl2, ratio, source=name, meta=meta)
    raise InputError(f"{name}: no usable 2θ scan ({'; '.join(problems)})")


# ====================================================================== Bruker BRML
def read_brml(path: str | os.PathLike[str]) -> Pattern:
    """Read a Bruker ``.brml`` file (a zip of XML): the first ``RawData*.xml`` with a 2θ scan.

    Each ``Datum`` is a comma-separated row; the ``DataViews`` say which column holds the 2θ positions
    (a varying view whose field definitions name ``TwoTheta``) and which the counts (a recorded view);
    without a 2θ column the positions come from ``ScanAxisInfo[@AxisId="TwoTheta"]`` (``Start`` and
    ``Increment``).  Wavelengths from ``WaveLengthAlpha1``/``WaveLengthAlpha2``/``WaveLengthRatio``
    (``Value`` attributes) anywhere in the file.
    """
    name = str(path)
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise InputError(f"{name}: not a readable BRML (zip) file ({exc})") from None
    with zf:
        members = sorted(n for n in zf.namelist() if re.search(r"RawData\d*\.xml$", n))
        if not members:
            raise InputError(f"{name}: no RawData*.xml inside the BRML archive")
        wl1 = wl2 = ratio = None
        problems = []
        for member in members:
            try:
                root = _parse_xml(zf.read(member), f"{name} [{member}]")
            except (zipfile.BadZipFile, OSError, EOFError) as exc:
                raise InputError(f"{name}: truncated BRML archive ({member}: {exc})") from None
            for key, tag in (("wl1", "WaveLengthAlpha1"), ("wl2", "WaveLengthAlpha2"), ("ratio", "WaveLengthRatio")):
                el = _find(root, tag)
                value = None if el is None else _float_or_none(el.get("Value"))
                if key == "wl1" and wl1 is None:
                    wl1 = _wavelength_ok(value)
                elif key == "wl2" and wl2 is None:
                    wl2 = _wavelength_ok(value)
                elif key == "ratio" and ratio is None:
                    ratio = value
            rows = [e.text for e in root.iter() if _local(e.tag) == "Datum" and e.text]
            if not rows:
                problems.append(f"{member}: no <Datum> rows")
                continue
            try:
                table = np.array([[float(v) for v in r.split(",")] for r in rows], dtype=np.float64)
            except ValueError:
                raise InputError(f"{name} [{member}]: a <Datum> row holds a value that is not a number") from None
            tt_col = count_col = None
            for view in root.iter():
                if _local(view.tag) != "RawDataView":
                    continue
                kind = view.get("{http://www.w3.org/2001/XMLSchema-instance}type", "")
                start = int(view.get("Start", "0"))
                if kind.endswith("VaryingRawDataView"):
                    defs = [d for d in view.iter() if _local(d.tag) == "FieldDefinitions"]
                    for i, d in enumerate(defs):
                        if "TwoTheta" in (d.get("TwoTheta"), d.get("AxisId"), d.get("LogicName")) or d.get("TwoTheta"):
                            tt_col = start + i
                            break
                elif kind.endswith("RecordedRawDataView") and count_col is None:
                    rec = _find(view, "Recording")
                    if rec is None or rec.get("LogicName") in ("Counter0D", "Counter1D", "ScanCounter", None):
                        count_col = start
            if count_col is None:
                count_col = table.shape[1] - 1
            if tt_col is not None and tt_col < table.shape[1]:
                tt = table[:, tt_col]
            else:
                axis = next((e for e in root.iter() if _local(e.tag) == "ScanAxisInfo"
                             and "TwoTheta" in (e.get("AxisId"), e.get("AxisName"))), None)
                if axis is None:
                    problems.append(f"{member}: no 2θ column and no ScanAxisInfo for TwoTheta")
                    continue
                start_el, inc_el = _find(axis, "Start"), _find(axis, "Increment")
                start = _float_or_none(getattr(start_el, "text", None))
                inc = _float_or_none(getattr(inc_el, "text", None))
                if start is None or not inc:
                    problems.append(f"{member}: TwoTheta ScanAxisInfo without Start/Increment")
                    continue
                tt = start + inc * np.arange(table.shape[0])
            if count_col >= table.shape[1]:
                problems.append(f"{member}: the counts column {count_col} is beyond the {table.shape[1]} columns")
                continue
            tt, y = _check_two_theta(f"{name} [{member}]", tt, table[:, count_col])
            meta = {"format": "brml", "member": member}
            return Pattern(tt, y, wl1, wl2, ratio, source=name, meta=meta)
    raise InputError(f"{name}: no usable 2θ scan ({'; '.join(problems)})")


# ====================================================================== Bruker RAW v3
_RAW3_HEADER = 712
_RAW3_RANGE = 304


def read_bruker_raw(path: str | os.PathLike[str]) -> Pattern:
    """Read a Bruker/Siemens DIFFRAC-plus RAW file, version 3 (``RAW1.01``): its first range.

    Layout (DIFFRAC-plus XCH user manual, appendix A): a 712-byte file header (range count at byte 12,
    anode at 608, Kα average/Kα1/Kα2/Kβ/ratio as little-endian doubles at 616-648), then per range a
    304-byte header (steps at 4, start 2θ at 16, step size at 176, supplementary header size at 256)
    followed by that many float32 intensities.
    """
    name = str(path)
    data = Path(path).read_bytes()
    head = data[:8]
    if head.startswith(b"RAW4"):
        raise InputError(f"{name}: Bruker RAW version 4 is not supported; export the scan as .brml or .xy")
    if not head.startswith(b"RAW1.01"):
        kind = "version 1/2" if head[:4] in (b"RAW ", b"RAW2") else "not a Bruker RAW file"
        raise InputError(f"{name}: only Bruker RAW version 3 (RAW1.01) is read ({kind})")
    if len(data) < _RAW3_HEADER + _RAW3_RANGE:
        raise InputError(f"{name}: truncated Bruker RAW file ({len(data)} bytes, header needs "
                         f"{_RAW3_HEADER + _RAW3_RANGE})")
    (ranges,) = struct.unpack_from("<I", data, 12)
    if ranges < 1:
        raise InputError(f"{name}: the RAW file holds no range")
    anode = data[608:612].split(b"\0")[0].decode("ascii", "replace").strip()
    _, wl1, wl2, _, ratio = struct.unpack_from("<5d", data, 616)
    off = _RAW3_HEADER
    header_len, steps = struct.unpack_from("<II", data, off)
    if header_len != _RAW3_RANGE:
        raise InputError(f"{name}: range header length {header_len}, expected {_RAW3_RANGE} (corrupt file)")
    (start_2theta,) = struct.unpack_from("<d", data, off + 16)
    (step,) = struct.unpack_from("<d", data, off + 176)
    (supp,) = struct.unpack_from("<I", data, off + 256)
    (used,) = struct.unpack_from("<d", data, off + 240)
    begin = off + header_len + supp
    end = begin + 4 * steps
    if end > len(data):
        raise InputError(f"{name}: truncated Bruker RAW file (range needs {steps} values, file ends early)")
    y = np.frombuffer(data, dtype="<f4", count=steps, offset=begin).astype(np.float64)
    if not (math.isfinite(step) and step > 0 and math.isfinite(start_2theta)):
        raise InputError(f"{name}: no 2θ axis (start {start_2theta!r}, step {step!r})")
    tt = start_2theta + step * np.arange(steps)
    tt, y = _check_two_theta(name, tt, y)
    meta = {"format": "bruker_raw_v3", "ranges": int(ranges), "anode": anode, "used_lambda": used}
    return Pattern(tt, y, _wavelength_ok(wl1), _wavelength_ok(wl2), ratio if ratio and ratio > 0 else None,
                   source=name, meta=meta)


# ====================================================================== Rigaku RAS
def read_ras(path: str | os.PathLike[str]) -> Pattern:
    """Read a Rigaku ``.ras`` text file: the first scan (``*RAS_INT_START`` … ``*RAS_INT_END``).

    Data rows are ``2θ intensity attenuation``; the intensity returned is intensity × attenuation.  The
    scan axis (``*MEAS_SCAN_AXIS_X``) must be a 2θ axis; wavelengths from ``*HW_XG_WAVE_LENGTH_ALPHA1`` and
    ``*HW_XG_WAVE_LENGTH_ALPHA2``.
    """
    name = str(path)
    text = Path(path).read_bytes().decode("latin-1")
    header: dict[str, str] = {}
    rows: list[list[float]] = []
    state = "header"
    for line in text.splitlines():
        s = line.strip()
        if not s:
            continue
        if s.startswith("*RAS_INT_START"):
            state = "data"
            continue
        if s.startswith("*RAS_INT_END"):
            state = "done"
            break
        if state == "header" and s.startswith("*"):
            key, _, value = s[1:].partition(" ")
            header.setdefault(key, value.strip().strip('"'))
        elif state == "data":
            try:
                rows.append([float(v) for v in s.split()])
            except ValueError:
                raise InputError(f"{name}: data row {len(rows) + 1} is not numeric: {s[:60]!r}") from None
    if state == "header":
        raise InputError(f"{name}: no *RAS_INT_START data block (not a Rigaku RAS file?)")
    if state != "done":
        raise InputError(f"{name}: truncated RAS file (no *RAS_INT_END after {len(rows)} rows)")
    axis = header.get("MEAS_SCAN_AXIS_X", "")
    if axis and "theta" not in axis.lower() and "2" not in axis:
        raise InputError(f"{name}: the scan axis is {axis!r}, not 2θ")
    if not rows or min(len(r) for r in rows) < 2:
        raise InputError(f"{name}: need two numeric columns (2θ, intensity)")
    arr = np.array([r[:3] if len(r) >= 3 else [*r[:2], 1.0] for r in rows], dtype=np.float64)
    tt, y = _check_two_theta(name, arr[:, 0], arr[:, 1] * arr[:, 2])
    wl1 = _wavelength_ok(_float_or_none(header.get("HW_XG_WAVE_LENGTH_ALPHA1")))
    wl2 = _wavelength_ok(_float_or_none(header.get("HW_XG_WAVE_LENGTH_ALPHA2")))
    meta = {"format": "ras", "scan_axis": axis, "anode": header.get("HW_XG_TARGET_NAME")}
    return Pattern(tt, y, wl1, wl2, None, source=name, meta=meta)


# ====================================================================== GSAS
def read_gsas(path: str | os.PathLike[str], wavelength: float | None = None) -> Pattern:
    """Read a GSAS powder data file (``.gsa``, ``.gsas``, ``.fxye``): the first ``BANK`` with ``CONS`` bins.

    ``BANK n nchan nrec CONS start step 0 0 TYPE`` with start and step in centidegrees 2θ; TYPE ``STD``
    (ten 8-character fields per line: a 2-character count number and a 6-character intensity), ``ESD``
    (five intensity/esd pairs of 8 characters), ``ALT`` (x, intensity, esd in 8/7/5 characters, x in
    centidegrees) or ``FXYE`` (whitespace-separated x, intensity, esd, x in centidegrees).  The file
    carries no wavelength (it lives in the instrument parameter file): pass ``wavelength``.
    """
    name = str(path)
    lines = Path(path).read_text(encoding="latin-1").splitlines()
    bank = next((i for i, ln in enumerate(lines) if ln.upper().startswith("BANK")), None)
    if bank is None:
        raise InputError(f"{name}: no BANK line (not a GSAS powder data file?)")
    parts = lines[bank].split()
    try:
        nchan = int(parts[2])
        bintyp = parts[4].upper()
    except (IndexError, ValueError):
        raise InputError(f"{name}: malformed BANK line {lines[bank]!r}") from None
    kind = parts[-1].upper() if parts[-1].upper() in ("STD", "ESD", "ALT", "FXYE") else "STD"
    body = []
    for ln in lines[bank + 1:]:
        if ln.upper().startswith("BANK"):
            break
        if ln.strip() and not ln.lstrip().startswith("#"):
            body.append(ln.rstrip("\n"))
    try:
        if kind in ("FXYE", "ALT"):
            if kind == "FXYE":
                xyz = [ln.split()[:2] for ln in body]
                x = np.array([float(a) for a, _ in xyz])
                y = np.array([float(b) for _, b in xyz])
            else:
                vals = [(ln[i:i + 8], ln[i + 8:i + 15]) for ln in body for i in range(0, len(ln.rstrip()), 20)]
                x = np.array([float(a) for a, _ in vals])
                y = np.array([float(b) for _, b in vals])
            tt = x / 100.0
        else:
            if bintyp not in ("CONS", "CONST"):
                raise InputError(f"{name}: bin type {bintyp!r} is not read (only CONS for STD/ESD data)")
            start, step = float(parts[5]) / 100.0, float(parts[6]) / 100.0
            width = 8
            fields = [ln[i:i + width] for ln in body for i in range(0, len(ln.rstrip()), width)]
            if kind == "STD":
                y = np.array([float(f[2:]) for f in fields if f.strip()])
            else:
                y = np.array([float(f) for f in fields if f.strip()][0::2])
            tt = start + step * np.arange(y.size)
    except ValueError:
        raise InputError(f"{name}: a data value of the {kind} bank is not a number") from None
    if y.size < nchan:
        raise InputError(f"{name}: truncated GSAS file ({y.size} of {nchan} channels)")
    tt, y = _check_two_theta(name, tt[:nchan], y[:nchan])
    return Pattern(tt, y, wavelength, None, None, source=name, meta={"format": f"gsas_{kind.lower()}"})


# ====================================================================== dispatch
def read_pattern(path: str | os.PathLike[str], wavelength: float | None = None) -> Pattern:
    """Read a measured powder pattern, dispatching on the suffix (see the module table).

    Args:
        path: File path.
        wavelength: Wavelength in Å; overrides the file's (Kα2 and its ratio are then dropped).

    Raises:
        InputError: (message names the file) missing file, unknown suffix, malformed or truncated
            content, no 2θ axis.

    """
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: pattern file not found")
    suffix = p.suffix.lower()
    if wavelength is not None and not (float(wavelength) > 0 and math.isfinite(float(wavelength))):
        raise InputError(f"{p}: wavelength must be a positive number of Å, got {wavelength!r}")
    readers = {".xrdml": read_xrdml, ".brml": read_brml, ".raw": read_bruker_raw, ".ras": read_ras,
               ".gsa": read_gsas, ".gsas": read_gsas, ".fxye": read_gsas, ".cif": read_cif_powder}
    if suffix not in PATTERN_SUFFIXES:
        raise InputError(f"{p}: unknown pattern format {suffix!r} (known: {', '.join(PATTERN_SUFFIXES)})")
    try:
        pattern = readers.get(suffix, read_xy)(p)
    except InputError:
        raise
    except (OSError, UnicodeDecodeError, struct.error, EOFError) as exc:
        raise InputError(f"{p}: cannot read ({type(exc).__name__}: {exc})") from None
    if wavelength is not None:
        pattern.wavelength = float(wavelength)
        pattern.wavelength2 = pattern.ka2_ratio = None
    pattern.meta.setdefault("format", suffix.lstrip("."))
    return pattern


# ====================================================================== structures
def _is_text(value: Any) -> bool:
    """Whether a string argument is file content (it holds a newline) rather than a path."""
    return isinstance(value, str) and ("\n" in value or "\r" in value)


def _checked(structure: Any, name: str, ordered: bool) -> Any:
    """``structure`` after the checks every reader applies (atoms present; ordered sites when asked)."""
    if len(structure) == 0:
        raise InputError(f"{name}: empty structure (no atoms)")
    if ordered and not structure.is_ordered:
        from mmmat.data.schema import order_policy_message

        raise InputError(order_policy_message(name))
    return structure


def parse_cif_text(text: str, name: str = "<CIF text>") -> Any:
    """The first structure of CIF text (pymatgen's ``CifParser``, conventional cell); InputError names ``name``."""
    from pymatgen.io.cif import CifParser

    if not isinstance(text, str) or not text.strip():
        raise InputError(f"{name}: empty CIF")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            structures = CifParser.from_str(text).parse_structures(primitive=False)
    except Exception as exc:  # pymatgen raises many types on bad CIFs
        raise InputError(f"{name}: malformed CIF ({type(exc).__name__}: {str(exc)[:200]})") from None
    if not structures:
        raise InputError(f"{name}: the CIF holds no structure")
    return structures[0]


def structure_from_atoms(atoms: Any, name: str = "<atoms>") -> Any:
    """An ASE ``Atoms`` as a pymatgen ``Structure``.

    Raises:
        InputError: no atoms, no periodic direction or no 3-D cell (the message names ``name``).

    """
    from pymatgen.io.ase import AseAtomsAdaptor

    if len(atoms) == 0:
        raise InputError(f"{name}: empty structure (no atoms)")
    if not atoms.pbc.any() or atoms.cell.rank < 3:
        raise InputError(f"{name}: not a periodic crystal (no 3-D cell)")
    try:
        return AseAtomsAdaptor.get_structure(atoms)
    except Exception as exc:  # pymatgen raises many types on odd frames
        raise InputError(f"{name}: not a crystal ({type(exc).__name__}: {str(exc)[:200]})") from None


def read_atoms(path: str | os.PathLike[str], index: Any = ":", format: str | None = None) -> list[Any]:
    """ASE ``Atoms`` frames of a file (extxyz and the other formats ASE reads), ``info`` and arrays kept.

    Raises:
        InputError: missing or unreadable file (the message names it).

    """
    import ase.io

    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: structure file not found")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            frames = ase.io.read(str(p), index=index, format=format)
    except Exception as exc:  # ASE raises many types on a bad file
        raise InputError(f"{p}: unreadable ({type(exc).__name__}: {str(exc)[:200]})") from None
    return frames if isinstance(frames, list) else [frames]


def read_structure(path: str | os.PathLike[str], ordered: bool = False) -> Any:
    """Read a crystal structure (CIF, POSCAR/CONTCAR, extxyz, ... through pymatgen, else ASE).

    Args:
        path: A file path, or CIF text itself (any string holding a newline).
        ordered: Refuse a structure with partial occupancies (the message states the project's policy,
            :func:`mmmat.data.schema.order_policy_message`).

    Returns:
        A pymatgen ``Structure`` (the first one of a multi-structure file).

    Raises:
        InputError: missing file, unreadable content or no periodic structure; the message names the file.

    """
    from pymatgen.core import Structure

    if _is_text(path):
        return _checked(parse_cif_text(str(path), "<CIF text>"), "<CIF text>", ordered)
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: structure file not found")
    if p.suffix.lower() in (".cif", ".mcif"):
        try:
            text = p.read_text(encoding="utf-8", errors="replace")
        except OSError as exc:
            raise InputError(f"{p}: cannot read ({exc})") from None
        return _checked(parse_cif_text(text, str(p)), str(p), ordered)
    problems = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if p.suffix.lower() not in (".extxyz", ".xyz"):
            try:
                return _checked(Structure.from_file(str(p)), str(p), ordered)
            except InputError:
                raise
            except Exception as exc:  # pymatgen raises many types on bad files
                problems.append(f"pymatgen: {type(exc).__name__}: {str(exc)[:160]}")
        try:
            return _checked(structure_from_atoms(read_atoms(p, 0)[0], str(p)), str(p), ordered)
        except InputError as exc:
            if p.suffix.lower() in (".extxyz", ".xyz") or "periodic" in str(exc) or "empty" in str(exc):
                raise
            problems.append(f"ASE: {str(exc).removeprefix(f'{p}: ')}")
    raise InputError(f"{p}: not a readable structure ({'; '.join(problems)})")


def read_structures(path: str | os.PathLike[str]) -> list[Any]:
    """Every structure of a file: each frame of an extxyz (or other ASE trajectory), else :func:`read_structure`.

    Raises:
        InputError: missing or unreadable file, or a frame that is not a 3-D crystal (the message names the
            file and the frame).

    """
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: structure file not found")
    if p.suffix.lower() not in (".extxyz", ".xyz"):
        return [read_structure(p)]
    frames = read_atoms(p)
    return [structure_from_atoms(a, f"{p} (frame {k})" if len(frames) > 1 else str(p)) for k, a in enumerate(frames)]


# ====================================================================== images and texts
def read_image(image: str | os.PathLike[str] | np.ndarray, size: int = 64) -> np.ndarray:
    """An image file (Pillow formats or ``.npy``) or array as a (size, size) uint8 grayscale array.

    Colour is reduced to luminance (ITU-R 601); 16-bit and float images are scaled from their own minimum
    and maximum to 0-255; other sizes are resized (bilinear).

    Raises:
        InputError: missing or unreadable file, not a 2-D image, NaN or infinite values (names the file).

    """
    from PIL import Image, UnidentifiedImageError

    name = "<array>"
    if isinstance(image, np.ndarray):
        arr = image
    else:
        p = Path(image)
        name = str(p)
        if not p.is_file():
            raise InputError(f"image file {p} not found")
        try:
            if p.suffix.lower() == ".npy":
                arr = np.load(p, allow_pickle=False)
            else:
                with Image.open(p) as img:
                    img.load()
                    if img.mode in ("1", "L", "P", "RGB", "RGBA", "LA", "CMYK", "YCbCr", "PA"):
                        img = img.convert("L")
                    arr = np.asarray(img)
        except (UnidentifiedImageError, ValueError, OSError) as exc:
            raise InputError(f"{name}: not a readable image ({exc})") from None
    arr = np.asarray(arr)
    if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
        arr = np.moveaxis(arr, 0, -1)  # channels first
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):  # colour: ITU-R 601 luminance
        was_uint8 = arr.dtype == np.uint8
        arr = arr[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])
        if was_uint8:
            arr = np.clip(np.round(arr), 0, 255).astype(np.uint8)
    if arr.ndim != 2 or min(arr.shape) < 2:
        raise InputError(f"{name}: expected a 2-D grayscale or colour image, got shape {arr.shape}")
    if arr.dtype != np.uint8:
        a = arr.astype(np.float64)
        if not np.isfinite(a).all():
            raise InputError(f"{name}: image holds NaN or infinite values")
        lo, hi = float(a.min()), float(a.max())
        scaled = (a - lo) / (hi - lo) * 255 if hi > lo else np.zeros(a.shape)
        arr = np.round(scaled).astype(np.uint8)
    if arr.shape != (size, size):
        arr = np.asarray(Image.fromarray(arr).resize((size, size), Image.BILINEAR))
    return np.array(arr, dtype=np.uint8, order="C")


def read_text(value: str | os.PathLike[str]) -> str:
    """A query sentence: the string itself, or the content of a ``.txt``/``.md`` file it names.

    Raises:
        InputError: empty text, or an unreadable file.

    """
    named_file = isinstance(value, str) and not _is_text(value) and value.lower().endswith(TEXT_SUFFIXES)
    if isinstance(value, os.PathLike) or (named_file and Path(value).is_file()):
        try:
            value = Path(value).read_text(encoding="utf-8", errors="replace")
        except OSError as exc:
            raise InputError(f"{value}: cannot read ({exc})") from None
    if not isinstance(value, str) or not value.strip():
        raise InputError("empty text: give a sentence to search with")
    return value.strip()


# ====================================================================== model inputs
def read_xrd_profile(pattern: Pattern | str | os.PathLike[str], wavelength: float | None = None) -> np.ndarray:
    """A measured pattern (a :class:`Pattern` or a file for :func:`read_pattern`) on the model's 2θ grid.

    The grid is :data:`mmmat.data.xrd.TWO_THETA` (5-90° 2θ for Cu Kα); :func:`mmmat.data.xrd.resample`
    converts through d-spacing, removes the background and max-normalises.

    Returns:
        (1701,) float32 profile.

    Raises:
        InputError: unreadable file, or no part of the pattern on the grid above its background.

    """
    from mmmat.data.xrd import resample

    pat = pattern if isinstance(pattern, Pattern) else read_pattern(pattern, wavelength=wavelength)
    profile = resample(pat)
    if not profile.any():
        raise InputError(
            f"{pat.source}: no part of the pattern falls on the model's grid (5-90° 2θ, Cu Kα) above its "
            "background"
        )
    return profile


# ====================================================================== shards
class ShardsNotFoundError(InputError, FileNotFoundError):
    """A shard folder, or a split of it, that holds no ``shard-*.tar`` (also a ``FileNotFoundError``)."""


def find_shards(shard_dir: str | os.PathLike[str], splits: str | Any = None) -> dict[str, list[str]]:
    """The splits of a shard folder written by ``mmmat data build`` and their shard paths, in order.

    Splits are ``<shard_dir>/<split>/shard-*.tar``.  Without ``splits``, the folder's ``manifest.json``
    names them (in its order; splits it names without shards on disk are left out); without a readable
    manifest, every sub-folder holding shards does, sorted by name.

    Args:
        shard_dir: The folder.
        splits: A split name, a comma-separated list, or a sequence of names; None for all.

    Returns:
        ``{split: [shard path, ...]}`` (paths sorted by name).

    Raises:
        ShardsNotFoundError: the folder is missing, holds no shards, or a named split holds none.

    """
    import json

    d = Path(shard_dir)
    if not d.is_dir():
        raise ShardsNotFoundError(f"shard folder {d} not found")

    def shards_of(name: str) -> list[str]:
        return sorted(str(p) for p in (d / name).glob("shard-*.tar"))

    if splits:
        names = [s.strip() for s in splits.split(",") if s.strip()] if isinstance(splits, str) else list(splits)
        out = {}
        for name in names:
            out[name] = shards_of(name)
            if not out[name]:
                raise ShardsNotFoundError(f"no shards for split {name!r} under {d}")
        return out
    names = []
    manifest = d / "manifest.json"
    if manifest.is_file():
        try:
            names = list(json.loads(manifest.read_text())["splits"])
        except (OSError, ValueError, KeyError, TypeError):
            names = []
    if not names:
        names = sorted(p.name for p in d.iterdir() if p.is_dir())
    out = {name: found for name in names if (found := shards_of(name))}
    if not out:
        raise ShardsNotFoundError(f"{d} holds no shards (expected <split>/shard-*.tar from `mmmat data build`)")
    return out
