"""Processing texts: an index of text-mined synthesis recipes by Materials Project id and reduced formula.

Reads the Ceder group text-mined synthesis data sets (``solid-state_dataset_2019-12-03.json.xz`` and
``sol-gel_dataset_20200713.json.xz``: one JSON object whose ``"reactions"`` list holds the recipes; Kononova
et al., Sci. Data 6, 203 (2019)), renders every reaction to one paragraph with
:func:`mmmat.data.text.render_recipe` and keeps only the rendered texts, so that the index is small and
picklable (it is sent to worker processes).
"""

from __future__ import annotations

import json
import lzma
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mmmat.data.schema import TextItem
from mmmat.data.text import MAX_TEXT_CHARS, clip_text, formula_key, render_recipe

#: Source label prefix of recipe texts.
SOURCE_PREFIX = "synthesis_textmined"


def _source_name(path: Path) -> str:
    name = path.name.lower()
    for kind in ("solid-state", "sol-gel", "solution"):
        if kind in name:
            return f"{SOURCE_PREFIX}/{kind}"
    return f"{SOURCE_PREFIX}/{path.name.split('.')[0]}"


def _read_reactions(path: Path) -> list[Any]:
    opener = lzma.open if path.suffix == ".xz" else open
    with opener(path, "rt", encoding="utf-8") as fh:
        data = json.load(fh)
    if isinstance(data, dict):
        data = data.get("reactions", [])
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON object with a 'reactions' list")
    return data


def target_keys(reaction: dict[str, Any]) -> tuple[str | None, str | None]:
    """Return the target's Materials Project id and reduced formula (each None when absent or unusable).

    The formula comes from ``target.material_formula``; when that is a name ("lithium niobate") or does
    not parse, from the single parsed composition (``target.composition[0]``), if there is exactly one.
    """
    target = reaction.get("target")
    if not isinstance(target, dict):
        return None, None
    mp_id = target.get("mp_id")
    mp_id = mp_id.strip() if isinstance(mp_id, str) and mp_id.strip() else None
    key = formula_key(target.get("material_formula"))  # type: ignore[arg-type]
    if key is None:
        comps = target.get("composition")
        if isinstance(comps, list) and len(comps) == 1 and isinstance(comps[0], dict):
            key = formula_key(comps[0].get("formula"))  # type: ignore[arg-type]
            if key is None and isinstance(comps[0].get("elements"), dict):
                els = comps[0]["elements"]
                key = formula_key("".join(f"{el}{n}" for el, n in els.items()))
    return mp_id, key


class RecipeIndex:
    """Rendered synthesis recipes indexed by target Materials Project id and by target reduced formula.

    Build it with :meth:`from_files` or :meth:`from_root`; query it with :meth:`lookup`. It holds only
    strings and integers, so it pickles compactly.
    """

    def __init__(self) -> None:
        self._texts: list[str] = []  # unique rendered texts
        self._text_ids: dict[str, int] = {}
        self._sources: list[str] = []
        # entries: (text id, source id, DOI, target mp_id or "")
        self._entries: list[tuple[int, int, str, str]] = []
        self._by_mp: dict[str, list[int]] = {}
        self._by_formula: dict[str, list[int]] = {}
        self._stats: dict[str, Any] = {
            "files": [], "reactions_read": 0, "rendered": 0, "skipped": {}, "clipped": 0, "per_source": {},
        }

    def __len__(self) -> int:
        return len(self._entries)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_text_ids", None)  # rebuilt on load; halves the pickle
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._text_ids = {t: i for i, t in enumerate(self._texts)}

    # ------------------------------------------------------------------ building
    @classmethod
    def from_files(cls, paths: Iterable[str | Path]) -> RecipeIndex:
        """Build from JSON files (``.json`` or ``.json.xz``) of text-mined reactions, in the given order."""
        index = cls()
        for p in paths:
            index.add_file(Path(p))
        return index

    @classmethod
    def from_root(cls, root: str | Path) -> RecipeIndex:
        """Build from every ``*.json.xz`` / ``*.json`` file in ``root`` (the ``synthesis_textmined`` folder).

        ``root`` may also be its parent (the reference data folder). Files are read in name order.
        """
        root = Path(root)
        if (root / SOURCE_PREFIX).is_dir():
            root = root / SOURCE_PREFIX
        files = sorted(set(root.glob("*.json.xz")) | set(root.glob("*.json")))
        if not files:
            raise FileNotFoundError(f"no *.json.xz or *.json recipe files in {root}")
        return cls.from_files(files)

    def add_file(self, path: Path) -> None:
        """Read one file of reactions and add every usable reaction."""
        source = _source_name(path)
        reactions = _read_reactions(path)
        self._stats["files"].append(path.name)
        for reaction in reactions:
            self.add_reaction(reaction, source)

    def add_reaction(self, reaction: Any, source: str) -> bool:
        """Render one reaction and index it; returns False (and counts the reason) when it is skipped."""
        st = self._stats
        st["reactions_read"] += 1
        skipped: dict[str, int] = st["skipped"]
        if not isinstance(reaction, dict):
            skipped["not a JSON object"] = skipped.get("not a JSON object", 0) + 1
            return False
        mp_id, key = target_keys(reaction)
        if mp_id is None and key is None:
            skipped["target has no mp_id and no parsable formula"] = (
                skipped.get("target has no mp_id and no parsable formula", 0) + 1
            )
            return False
        try:
            text = render_recipe(reaction)
        except Exception as exc:  # render_recipe is written not to raise; count it if it ever does
            reason = f"render error ({type(exc).__name__})"
            skipped[reason] = skipped.get(reason, 0) + 1
            return False
        if not text:
            skipped["empty rendering"] = skipped.get("empty rendering", 0) + 1
            return False
        text, clipped = clip_text(text, MAX_TEXT_CHARS)
        st["clipped"] += int(clipped)
        st["rendered"] += 1
        st["per_source"][source] = st["per_source"].get(source, 0) + 1
        tid = self._text_ids.get(text)
        if tid is None:
            tid = self._text_ids[text] = len(self._texts)
            self._texts.append(text)
        if source not in self._sources:
            self._sources.append(source)
        doi = reaction.get("doi")
        doi = doi.strip() if isinstance(doi, str) else ""
        eid = len(self._entries)
        self._entries.append((tid, self._sources.index(source), doi, mp_id or ""))
        if mp_id is not None:
            self._by_mp.setdefault(mp_id, []).append(eid)
        if key is not None:
            self._by_formula.setdefault(key, []).append(eid)
        return True

    # ------------------------------------------------------------------ queries
    def lookup(self, mp_id: str | None, formula: str | None, max_items: int = 8) -> list[TextItem]:
        """Recipe texts for one material, newest objects on every call.

        Recipes whose target carries ``mp_id`` come first; when there are none, recipes whose target has the
        same reduced formula, except those linked to a different Materials Project id (another polymorph).
        Identical texts appear once; the order is that of the files.

        Args:
            mp_id: Materials Project id (``"mp-1234"``) or None.
            formula: Any formula of the material (normalised with :func:`formula_key`) or None.
            max_items: Most texts returned.

        """
        eids: list[int] = []
        if mp_id:
            eids = list(self._by_mp.get(mp_id, []))
        if not eids and formula:
            key = formula_key(formula) or formula
            eids = [e for e in self._by_formula.get(key, []) if not (mp_id and self._entries[e][3])]
        out: list[TextItem] = []
        seen: set[int] = set()
        for e in eids:
            tid, sid, doi, _ = self._entries[e]
            if tid in seen:
                continue
            seen.add(tid)
            out.append(TextItem(text=self._texts[tid], source=self._sources[sid], generated=False, ref=doi))
            if len(out) >= max_items:
                break
        return out

    def has_mp_id(self, mp_id: str) -> bool:
        """Whether some recipe's target carries this Materials Project id."""
        return mp_id in self._by_mp

    def has_formula(self, formula: str) -> bool:
        """Whether some recipe's target has this reduced formula."""
        return (formula_key(formula) or formula) in self._by_formula

    def subset(self, mp_ids: Iterable[str] = (), formulas: Iterable[str] = ()) -> RecipeIndex:
        """Return a smaller index holding only the recipes reachable from these ids and formulas."""
        keep_mp = {m for m in mp_ids if m in self._by_mp}
        keep_f = {k for k in ((formula_key(f) or f) for f in formulas) if k in self._by_formula}
        new = RecipeIndex()
        new._stats = json.loads(json.dumps(self._stats))
        new._stats["subset"] = True
        new._sources = list(self._sources)
        eids = sorted(
            {e for m in keep_mp for e in self._by_mp[m]} | {e for k in keep_f for e in self._by_formula[k]}
        )
        remap: dict[int, int] = {}
        for e in eids:
            tid, sid, doi, mp = self._entries[e]
            text = self._texts[tid]
            ntid = new._text_ids.get(text)
            if ntid is None:
                ntid = new._text_ids[text] = len(new._texts)
                new._texts.append(text)
            remap[e] = len(new._entries)
            new._entries.append((ntid, sid, doi, mp))
        for m in sorted(keep_mp):
            new._by_mp[m] = [remap[e] for e in self._by_mp[m]]
        for k in sorted(keep_f):
            new._by_formula[k] = [remap[e] for e in self._by_formula[k]]
        return new

    def stats(self) -> dict[str, Any]:
        """Return counts: reactions read, rendered, skipped (by reason), clipped, mp_ids, formulas."""
        st = json.loads(json.dumps(self._stats))
        st["skipped"] = dict(Counter(st["skipped"]).most_common())
        st["skipped_total"] = sum(st["skipped"].values())
        st["unique_texts"] = len(self._texts)
        st["entries"] = len(self._entries)
        st["mp_ids_indexed"] = len(self._by_mp)
        st["formulas_indexed"] = len(self._by_formula)
        return st
