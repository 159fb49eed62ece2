"""Text modalities: clipping, text-mined synthesis recipes, generated structure descriptions, formulas.

Nothing here reads files: :mod:`data_pipelines.recipes` and :mod:`data_pipelines.literature` read the raw
data sets and use these functions to render and match texts.

* :func:`render_recipe` turns one text-mined synthesis reaction (the schema of the Ceder group data sets,
  Kononova et al., Sci. Data 6, 203 (2019)) into one readable paragraph.
* :func:`describe_structure` writes a short description generated from a crystal structure; callers must
  label it generated (``TextItem(generated=True)``).
* :func:`formula_key` and :func:`find_formulas` normalise chemical formulas to pymatgen reduced formulas so
  that texts and crystals can be joined.
"""

from __future__ import annotations

import math
import re
import warnings
from functools import lru_cache
from typing import Any

#: Longest text (characters) that a record keeps; longer texts are clipped at a word boundary.
MAX_TEXT_CHARS = 8192

# ---------------------------------------------------------------------------------------------- clipping


def clip_text(text: str, max_chars: int = MAX_TEXT_CHARS) -> tuple[str, bool]:
    """Clip ``text`` to at most ``max_chars`` characters at a word boundary.

    Args:
        text: Any text.
        max_chars: Largest number of characters kept (at least 1).

    Returns:
        The (possibly) shortened text and True when it was shortened.

    """
    text = "" if text is None else str(text)
    max_chars = max(1, int(max_chars))
    if len(text) <= max_chars:
        return text, False
    cut = text[: max_chars + 1]
    # last whitespace at or before max_chars; fall back to a hard cut for one very long word
    pos = max((cut.rfind(c) for c in (" ", "\n", "\t")), default=-1)
    head = cut[:pos] if pos >= max_chars // 2 else text[:max_chars]
    return head.rstrip(), True


# ---------------------------------------------------------------------------------------------- recipes

#: Readable names of the operation types of the text-mined recipes.
_OPERATION_NAMES = {
    "mixing": "mixing",
    "mixingoperation": "mixing",
    "solutionmixing": "solution mixing",
    "liquidgrinding": "wet grinding",
    "heatingoperation": "heating",
    "dryingoperation": "drying",
    "shapingoperation": "shaping",
    "quenchingoperation": "quenching",
    "startingsynthesis": "start of synthesis",
}

_TEMPERATURE_UNITS = {
    "c": "°C", "°c": "°C", "ºc": "°C", "degc": "°C", "celsius": "°C", "k": "K", "kelvin": "K",
}

#: Factor that converts a time unit to hours.
_HOURS_PER_UNIT = {
    "h": 1.0, "hr": 1.0, "hrs": 1.0, "hour": 1.0, "hours": 1.0,
    "min": 1.0 / 60.0, "mins": 1.0 / 60.0, "minute": 1.0 / 60.0, "minutes": 1.0 / 60.0,
    "s": 1.0 / 3600.0, "sec": 1.0 / 3600.0, "second": 1.0 / 3600.0, "seconds": 1.0 / 3600.0,
    "d": 24.0, "day": 24.0, "days": 24.0,
    "week": 168.0, "weeks": 168.0,
}


def _as_list(x: Any) -> list[Any]:
    if x is None:
        return []
    if isinstance(x, list | tuple):
        return list(x)
    return [x]


def _clean_str(x: Any, max_len: int = 200) -> str:
    """Return a short one-line string for any value (empty for None and containers)."""
    if x is None or isinstance(x, dict | list | tuple | set):
        return ""
    s = " ".join(str(x).split())
    return s[:max_len]


def _num(x: Any) -> float | None:
    if isinstance(x, bool):
        return None
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _fmt_num(v: float) -> str:
    """Format a number with at most 3 significant decimals (900.0 -> '900', 0.1667 -> '0.167')."""
    if v == 0:
        return "0"
    if abs(v) >= 100:
        return f"{v:.0f}" if float(v).is_integer() else f"{v:.1f}".rstrip("0").rstrip(".")
    s = f"{v:.3g}"
    if "e" in s:
        s = f"{v:.6f}".rstrip("0").rstrip(".")
    return s


def _unique(items: list[str]) -> list[str]:
    seen: set[str] = set()
    out = []
    for s in items:
        if s and s.lower() not in seen:
            seen.add(s.lower())
            out.append(s)
    return out


def _quantity_values(entry: Any, scale: float = 1.0) -> str:
    """Render the values of one condition entry (``values`` list, else ``min_value``..``max_value``)."""
    if not isinstance(entry, dict):
        v = _num(entry)
        if v is not None:
            return _fmt_num(v * scale)
        return _clean_str(entry, 40)
    vals = []
    for x in _as_list(entry.get("values")):
        v = _num(x)
        if v is not None:
            vals.append(_fmt_num(v * scale))
        elif _clean_str(x, 40):
            vals.append(_clean_str(x, 40))
    vals = _unique(vals)
    lo, hi = _num(entry.get("min_value")), _num(entry.get("max_value"))
    if len(vals) == 2 and lo is not None and hi is not None and lo != hi:
        return f"{_fmt_num(lo * scale)}–{_fmt_num(hi * scale)}"
    if vals:
        return " or ".join([", ".join(vals[:-1]), vals[-1]]) if len(vals) > 1 else vals[0]
    if lo is not None and hi is not None and lo != hi:
        return f"{_fmt_num(lo * scale)}–{_fmt_num(hi * scale)}"
    if lo is not None or hi is not None:
        return _fmt_num((hi if hi is not None else lo) * scale)  # type: ignore[operator]
    return ""


def _temperature(entries: Any) -> str:
    parts = []
    for e in _as_list(entries):
        vals = _quantity_values(e)
        if not vals:
            continue
        unit_raw = _clean_str(e.get("units"), 20) if isinstance(e, dict) else ""
        unit = _TEMPERATURE_UNITS.get(unit_raw.lower().replace(" ", ""), unit_raw) if unit_raw else "°C"
        parts.append(f"{vals} {unit}".strip())
    return " and ".join(_unique(parts))


def _time_hours(entries: Any) -> str:
    parts = []
    for e in _as_list(entries):
        unit_raw = (_clean_str(e.get("units"), 20) if isinstance(e, dict) else "") or "h"
        scale = _HOURS_PER_UNIT.get(unit_raw.lower().strip(". "))
        if scale is None:  # unknown unit: keep it as given
            vals = _quantity_values(e)
            if vals:
                parts.append(f"{vals} {unit_raw}".strip())
            continue
        vals = _quantity_values(e, scale)
        if vals:
            parts.append(f"{vals} h")
    return " and ".join(_unique(parts))


def _words(x: Any) -> list[str]:
    """Condition values that are words (a string or a list of strings)."""
    return _unique([_clean_str(v, 60) for v in _as_list(x)])


def _material_name(m: Any) -> str:
    if isinstance(m, dict):
        for key in ("material_formula", "material_string", "material_name", "formula"):
            s = _clean_str(m.get(key), 120)
            if s:
                return s
        return ""
    return _clean_str(m, 120)


def _render_operation(op: Any) -> str:
    if not isinstance(op, dict):
        return _clean_str(op, 60)
    typ = _clean_str(op.get("type"), 60)
    name = _OPERATION_NAMES.get(typ.lower().replace(" ", "").replace("_", ""), "")
    if not name and typ:
        name = re.sub(r"(?<=[a-z])(?=[A-Z])", " ", typ).lower().replace(" operation", "").strip()
    token = _clean_str(op.get("token"), 40)
    if not name:
        name = token
        token = ""
    text = name
    if token and token.lower() not in name.lower():
        text += f" ({token})"
    cond = op.get("conditions")
    cond = cond if isinstance(cond, dict) else {}
    temp = _temperature(cond.get("heating_temperature"))
    time = _time_hours(cond.get("heating_time"))
    atmosphere = _words(cond.get("heating_atmosphere"))
    device = _words(cond.get("mixing_device"))
    media = [m for m in _words(cond.get("mixing_media")) if m.lower() not in {d.lower() for d in device}]
    if temp:
        text += f" at {temp}"
    if time:
        text += f" for {time}"
    if atmosphere:
        text += f" in {' and '.join(atmosphere)}"
    if device:
        text += f" with {' and '.join(device)}"
    if media:
        text += f" in {' and '.join(media)}"
    return text


def render_recipe(reaction: dict[str, Any]) -> str:
    """Render one text-mined synthesis reaction as one readable paragraph.

    The reaction follows the schema of the Ceder group text-mined synthesis data sets (keys ``target``,
    ``precursors``, ``operations``, ``reaction_string``, ``synthesis_type``, ...). Temperatures keep their
    unit (°C or K), times are converted to hours, a missing unit is read as the data sets' default (°C,
    h), and missing conditions are left out. Missing keys and odd
    values (None, empty lists, strings where numbers belong) are tolerated.

    Args:
        reaction: One reaction dict as read from the JSON data set.

    Returns:
        For example ``"Target: LiCoO2. Precursors: Li2CO3, Co3O4. Reaction: ... Steps: 1. mixing (ground)
        in ethanol; 2. heating (calcined) at 900 °C for 12 h in air."``; empty when nothing is usable.

    """
    if not isinstance(reaction, dict):
        return ""
    parts = []
    target = _material_name(reaction.get("target"))
    if not target:
        target = ", ".join(_unique([_clean_str(t, 120) for t in _as_list(reaction.get("targets_string"))]))
    if target:
        parts.append(f"Target: {target}.")
    synthesis_type = _clean_str(reaction.get("synthesis_type"), 40)
    if synthesis_type:
        parts.append(f"Synthesis: {synthesis_type}.")
    precursors = _unique([_material_name(p) for p in _as_list(reaction.get("precursors"))])
    if precursors:
        parts.append(f"Precursors: {', '.join(precursors)}.")
    reaction_string = _clean_str(reaction.get("reaction_string"), 400)
    if reaction_string:
        parts.append(f"Reaction: {reaction_string}.")
    steps = [s for s in (_render_operation(op) for op in _as_list(reaction.get("operations"))) if s]
    if steps:
        parts.append("Steps: " + "; ".join(f"{i}. {s}" for i, s in enumerate(steps, 1)) + ".")
    return " ".join(parts)


# ---------------------------------------------------------------------------------------------- structures


def describe_structure(structure: Any, symprec: float = 0.1) -> str:
    """Write a short description generated from a crystal structure (to be labelled generated).

    States the reduced formula, space group (symbol and number, from pymatgen's SpacegroupAnalyzer with
    tolerance ``symprec`` Å; "not determined" when it fails), crystal system, lattice parameters (Å,
    degrees), number of atoms, density (g/cm³), shortest interatomic distance (Å) and mean coordination
    number (neighbours closer than 1.2 × each atom's nearest-neighbour distance).

    Args:
        structure: A pymatgen ``Structure`` or anything with ``to_structure()`` (a ``MaterialRecord``).
        symprec: Symmetry tolerance, Å.

    """
    import numpy as np

    if not hasattr(structure, "lattice") or not hasattr(structure, "species"):
        structure = structure.to_structure()
    formula = structure.composition.reduced_formula
    sg_text, system = "space group not determined", ""
    try:
        from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sga = SpacegroupAnalyzer(structure, symprec=symprec)
            sg_text = f"space group {sga.get_space_group_symbol()} (No. {sga.get_space_group_number()})"
            system = sga.get_crystal_system()
    except Exception:  # spglib fails on some inputs; the description goes on without symmetry
        pass
    a, b, c = structure.lattice.abc
    alpha, beta, gamma = structure.lattice.angles
    head = f"{formula} crystal, {sg_text}" + (f", {system} crystal system" if system else "") + "."
    lat = (
        f"Lattice parameters a = {a:.3f} Å, b = {b:.3f} Å, c = {c:.3f} Å, "
        f"α = {alpha:.1f}°, β = {beta:.1f}°, γ = {gamma:.1f}°."
    )
    n = len(structure)
    cell = f"{n} atom{'s' if n != 1 else ''} in the cell, density {float(structure.density):.2f} g/cm³."
    parts = [head, lat, cell]
    try:
        centers, _, _, dists = structure.get_neighbor_list(r=6.0)
        if len(dists):
            nearest = np.full(n, np.inf)
            np.minimum.at(nearest, centers, dists)
            ok = np.isfinite(nearest)
            within = dists <= 1.2 * nearest[centers] + 1e-8
            cn = np.bincount(centers[within], minlength=n)[ok]
            parts.append(
                f"Shortest interatomic distance {float(nearest[ok].min()):.2f} Å; "
                f"mean coordination number {float(cn.mean()):.1f}."
            )
    except Exception:  # neighbour search is optional information
        pass
    return " ".join(parts)


# ---------------------------------------------------------------------------------------------- formulas


@lru_cache(maxsize=1)
def _element_symbols() -> frozenset[str]:
    from pymatgen.core import Element

    return frozenset(Element.from_Z(z).symbol for z in range(1, 119))


_SYMBOL_RE = re.compile(r"[A-Z][a-z]?")


def formula_key(formula: str) -> str | None:
    """Normalised reduced formula (pymatgen ``Composition.reduced_formula``) or None.

    None when the string is not a real composition: fewer than 2 characters, no upper-case letter (a
    lower-case word), a symbol that is not one of the 118 elements, or anything pymatgen cannot parse.
    Ambiguous strings get pymatgen's reading ("CO" is carbon monoxide, C1 O1).

    Args:
        formula: A chemical formula such as ``"La0.8Sr0.2MnO3"`` or ``"O2Si"``.

    """
    if not isinstance(formula, str):
        return None
    return _formula_key(formula.strip())


@lru_cache(maxsize=65536)
def _formula_key(s: str) -> str | None:
    if len(s) < 2 or not any(ch.isupper() for ch in s):
        return None
    symbols = _SYMBOL_RE.findall(s)
    elements = _element_symbols()
    if not symbols or any(sym not in elements for sym in symbols):
        return None
    try:
        from pymatgen.core import Composition, Element

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            comp = Composition(s)
            if comp.num_atoms <= 0 or not math.isfinite(comp.num_atoms):
                return None
            if any(not isinstance(el, Element) or amt <= 0 for el, amt in comp.items()):
                return None
            return str(comp.reduced_formula)
    except Exception:  # pymatgen raises several types on non-formulas
        return None


_NUM = r"(?:\d+(?:\.\d+)?|\.\d+)"
_UNIT = rf"(?:[A-Z][a-z]?{_NUM}?)"
_GROUP = rf"(?:\((?:{_UNIT})+\){_NUM}?)"
_FORMULA_TOKEN_RE = re.compile(rf"(?<![A-Za-z0-9])(?:{_UNIT}|{_GROUP})+(?![A-Za-z0-9])")

#: All-capital tokens without digits that are formulas rather than acronyms.
_CAPS_FORMULAS = frozenset({"CO", "NO", "HF", "HI", "BN", "BP", "KF", "KI"})

#: Single-element tokens that name a material (molecules, allotropes); others ("S1", "B13", "P25") are labels.
_ELEMENT_MATERIALS = frozenset({"H2", "N2", "O2", "O3", "F2", "Cl2", "Br2", "I2", "S8", "P4", "C60", "C70"})

_CHARGE_SIGNS = frozenset("+-−–⁺⁻")
_ACRONYM_NUMBER_RE = re.compile(r"^[A-Z]{3,}\d{2,}$")  # "SCN20", "LSCF6428": acronym and a number
_VARIABLE_AFTER_RE = re.compile(r"^\s?[-−–+]\s?[xyz]")  # "SrCo1−xNbxO3": amounts with variables


def find_formulas(text: str) -> set[str]:
    """Reduced formulas of the chemical formulas mentioned in free text.

    A formula-like token (element symbols with optional amounts and parentheses, e.g. ``LiFePO4``,
    ``La0.8Sr0.2MnO3``, ``(Bi0.5Na0.5)TiO3``) counts when it has at least two element symbols or a digit,
    so that words such as "In", "As" or "I" are not taken. Left out as well: all-capital acronyms without
    digits ("SOFC", "SOFCs", "NIR"; a few formulas such as CO, NO, HF, BN are kept), acronyms with numbers
    ("SCN20"), single elements other than common molecules (H2, O2, C60, ...; "S1" and "P25" are labels),
    and formulas that go on with variable amounts ("SrCo1−xNbxO3−δ"). Tokens are normalised with
    :func:`formula_key`; an oxygen deficiency ("O3−δ") is dropped.

    Args:
        text: Free text.

    """
    if not isinstance(text, str) or not text:
        return set()
    found: set[str] = set()
    for m in _FORMULA_TOKEN_RE.finditer(text):
        tok = m.group(0)
        if text[m.end() : m.end() + 1] in ("(", "["):
            continue  # the formula goes on in a form the pattern does not take ("Ba0.5Sr0.5(Co1-xFex)O3")
        core = tok[1:-1] if tok.startswith("(") and tok.endswith(")") else tok
        has_digit = any(ch.isdigit() for ch in tok)
        symbols = _SYMBOL_RE.findall(tok)
        if len(set(symbols)) < 2:
            if core not in _ELEMENT_MATERIALS or text[m.end() : m.end() + 1] in _CHARGE_SIGNS:
                continue  # a label ("S1") or an ion ("O2-")
        elif not has_digit:
            if (core.isupper() and core not in _CAPS_FORMULAS) or (core.endswith("s") and core[:-1].isupper()):
                continue
        elif _ACRONYM_NUMBER_RE.match(core):
            continue
        if symbols[-1] != "O" and _VARIABLE_AFTER_RE.match(text[m.end() : m.end() + 4]):
            continue
        key = formula_key(core)
        if key is not None:
            found.add(key)
    return found
