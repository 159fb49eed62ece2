"""Literature texts: sentences and abstracts that mention a material, indexed by reduced formula.

Three sources under the reference data folder:

* ``matscholar_ner/*.txt[.xz]``: CoNLL files (``token TAG`` per line, blank line between sentences) of
  abstract sentences with BIO entity tags (Weston et al., J. Chem. Inf. Model. 59, 3692 (2019)). A
  sentence is indexed by the formulas of its MAT entities. Some tokens contain spaces and a few lines lack a
  tag: the tag is the last whitespace-separated field only when it looks like a tag.
* ``glass_abstracts_matscibert/*.csv[.xz]``: abstracts (columns ``Abstract``, ``Label``; Gupta et al., npj
  Comput. Mater. 8, 102 (2022)), indexed by the formulas :func:`~mmmat.data.text.find_formulas` finds.
  UTF-8 text that was decoded as Latin-1 in the source ("Â±") is repaired where that is unambiguous.
* ``sofc_exp_corpus/*.tar.xz``: 45 annotated solid-oxide fuel-cell papers (Friedrich et al., ACL 2020);
  single sentences (``annotations/sentences`` offsets into ``texts/*.txt``) that mention formulas.

The index keeps only strings and integers, so it pickles compactly (it is sent to worker processes).
"""

from __future__ import annotations

import csv
import io
import json
import lzma
import re
import tarfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mmmat.data.schema import TextItem
from mmmat.data.text import MAX_TEXT_CHARS, clip_text, find_formulas, formula_key

#: Source labels, in the order :meth:`LiteratureIndex.lookup` interleaves them.
SOURCES = ("matscholar_ner", "glass_abstracts", "sofc_exp_corpus")

#: Longest sentence (characters) taken from the SOFC corpus; longer ones are title and author blocks.
SOFC_MAX_SENTENCE_CHARS = 600

_TAG_RE = re.compile(r"^(O|[BI]-[A-Z]{2,4})$")


def _open_text(path: Path) -> str:
    data = path.read_bytes()
    if path.suffix == ".xz":
        data = lzma.decompress(data)
    return data.decode("utf-8", errors="replace")


def _files(folder: Path, stem_order: tuple[str, ...], suffixes: tuple[str, ...]) -> list[Path]:
    """List a folder's data files: known split names first (train, dev/val, test), then by name."""
    found = sorted({p for s in suffixes for p in folder.glob(f"*{s}")})

    def rank(p: Path) -> tuple[int, str]:
        stem = p.name.split(".")[0]
        return (stem_order.index(stem) if stem in stem_order else len(stem_order), p.name)

    return sorted(found, key=rank)


def parse_conll(text: str) -> list[list[tuple[str, str]]]:
    """Parse CoNLL ``token TAG`` lines into sentences of (token, tag); blank lines end sentences.

    The tag is the last whitespace-separated field when it looks like a BIO tag (``O``, ``B-MAT``, ...);
    otherwise the whole line is the token and its tag is ``O`` (lines with a missing tag exist).
    """
    sentences: list[list[tuple[str, str]]] = []
    current: list[tuple[str, str]] = []
    for line in text.split("\n"):
        stripped = line.strip()
        if not stripped:
            if current:
                sentences.append(current)
                current = []
            continue
        parts = stripped.rsplit(None, 1)
        if len(parts) == 2 and _TAG_RE.match(parts[1]):
            current.append((parts[0], parts[1]))
        else:
            current.append((stripped, "O"))
    if current:
        sentences.append(current)
    return sentences


_NO_SPACE_BEFORE = {",", ".", ";", ":", ")", "]", "%", "!", "?"}
_NO_SPACE_AFTER = {"(", "["}


def detokenize(tokens: list[str]) -> str:
    """Join tokens into a sentence (no space before closing punctuation or after opening brackets)."""
    out = ""
    for tok in tokens:
        if out and tok not in _NO_SPACE_BEFORE and out[-1] not in _NO_SPACE_AFTER:
            out += " "
        out += tok
    return out


def mat_entities(sentence: list[tuple[str, str]]) -> list[list[str]]:
    """Token lists of the MAT entities (B-MAT followed by I-MAT) of one tagged sentence."""
    spans: list[list[str]] = []
    current: list[str] | None = None
    for tok, tag in sentence:
        if tag == "B-MAT" or (tag == "I-MAT" and current is None):
            if current:
                spans.append(current)
            current = [tok]
        elif tag == "I-MAT":
            current.append(tok)  # type: ignore[union-attr]
        elif current is not None:
            spans.append(current)
            current = None
    if current:
        spans.append(current)
    return spans


def entity_formulas(tokens: list[str]) -> set[str]:
    """Reduced formulas of one MAT entity: the whole span when it parses, else each token that parses."""
    whole = formula_key("".join(tokens))
    if whole is not None:
        return {whole}
    return {k for k in (formula_key(t) for t in tokens) if k is not None}


_MOJIBAKE_RE = re.compile("[\u00c2-\u00f4][\u0080-\u00bf]+")


def _fix_run(m: re.Match[str]) -> str:
    run = m.group(0)
    try:
        return run.encode("latin-1").decode("utf-8")
    except UnicodeDecodeError:
        return run


def repair_mojibake(text: str) -> str:
    """Undo UTF-8 text that was decoded as Latin-1 ("Â±" -> "±"), run by run; other text is unchanged."""
    text = _MOJIBAKE_RE.sub(_fix_run, text)
    return re.sub("\u00c2(?=\\s)", "", text)  # a no-break space (C2 A0) whose A0 became a space


class LiteratureIndex:
    """Literature texts indexed by the reduced formulas they mention.

    Build it with :meth:`from_root`; query it with :meth:`lookup`. Holds only strings and integers.
    """

    def __init__(self) -> None:
        self._texts: list[str] = []
        self._text_ids: dict[str, int] = {}
        # entries: (text id, source index in SOURCES, ref)
        self._entries: list[tuple[int, int, str]] = []
        self._by_formula: dict[str, list[int]] = {}
        self._stats: dict[str, Any] = {"sources": {}, "missing": []}

    def __len__(self) -> int:
        return len(self._entries)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_text_ids", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._text_ids = {t: i for i, t in enumerate(self._texts)}

    # ------------------------------------------------------------------ building
    @classmethod
    def from_root(cls, root: str | Path) -> LiteratureIndex:
        """Build from the reference data folder (the parent of ``matscholar_ner`` and the others).

        Sub-folders ``matscholar_ner``, ``glass_abstracts_matscibert`` and ``sofc_exp_corpus`` are read when
        present; missing ones are listed in :meth:`stats`.
        """
        root = Path(root)
        index = cls()
        found = False
        folder = root / "matscholar_ner"
        files = _files(folder, ("train", "dev", "test"), (".txt", ".txt.xz")) if folder.is_dir() else []
        for p in files:
            index.add_conll(_open_text(p), ref_prefix=f"{p.name.split('.')[0]}")
        found |= bool(files)
        if not files:
            index._stats["missing"].append("matscholar_ner")
        folder = root / "glass_abstracts_matscibert"
        files = _files(folder, ("train", "val", "test"), (".csv", ".csv.xz")) if folder.is_dir() else []
        for p in files:
            index.add_glass_csv(_open_text(p), ref_prefix=p.name.split(".")[0])
        found |= bool(files)
        if not files:
            index._stats["missing"].append("glass_abstracts_matscibert")
        folder = root / "sofc_exp_corpus"
        files = sorted(folder.glob("*.tar.xz")) if folder.is_dir() else []
        for p in files:
            index.add_sofc_tar(p)
        found |= bool(files)
        if not files:
            index._stats["missing"].append("sofc_exp_corpus")
        if not found:
            raise FileNotFoundError(f"no literature data under {root}")
        return index

    def _source_stats(self, source: str) -> dict[str, int]:
        return self._stats["sources"].setdefault(
            source, {"texts_read": 0, "texts_with_formulas": 0, "entries": 0, "clipped": 0, "skipped_long": 0}
        )

    def add_text(self, text: str, formulas: Iterable[str], source: str, ref: str) -> bool:
        """Index one text under each of its reduced formulas; False when it names none."""
        st = self._source_stats(source)
        st["texts_read"] += 1
        keys = sorted(set(formulas))
        text = " ".join(text.split())
        if not keys or not text:
            return False
        text, clipped = clip_text(text, MAX_TEXT_CHARS)
        st["clipped"] += int(clipped)
        st["texts_with_formulas"] += 1
        tid = self._text_ids.get(text)
        if tid is None:
            tid = self._text_ids[text] = len(self._texts)
            self._texts.append(text)
        eid = len(self._entries)
        self._entries.append((tid, SOURCES.index(source), ref))
        st["entries"] += 1
        for k in keys:
            self._by_formula.setdefault(k, []).append(eid)
        return True

    def add_conll(self, text: str, ref_prefix: str) -> None:
        """Add the sentences of one CoNLL file (matscholar NER), indexed by their MAT entities."""
        for i, sentence in enumerate(parse_conll(text)):
            formulas: set[str] = set()
            for span in mat_entities(sentence):
                formulas |= entity_formulas(span)
            sent = detokenize([tok for tok, _ in sentence])
            self.add_text(sent, formulas, "matscholar_ner", f"{ref_prefix}/{i}")

    def add_glass_csv(self, text: str, ref_prefix: str) -> None:
        """Add the abstracts of one glass / non-glass CSV (columns ``Abstract``, ``Label``)."""
        reader = csv.DictReader(io.StringIO(text))
        for i, row in enumerate(reader):
            abstract = repair_mojibake(str(row.get("Abstract") or ""))
            self.add_text(abstract, find_formulas(abstract), "glass_abstracts", f"{ref_prefix}/{i}")

    def add_sofc_tar(self, path: Path) -> None:
        """Add the sentences that mention formulas from the SOFC-Exp corpus archive (one sentence each)."""
        texts: dict[str, str] = {}
        sentences: dict[str, str] = {}
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                name = member.name
                if "/texts/" in f"/{name}" and name.endswith(".txt"):
                    pmc = Path(name).stem.split("_")[-1]
                    fh = tar.extractfile(member)
                    if fh is not None:
                        texts[pmc] = fh.read().decode("utf-8", errors="replace")
                elif "/annotations/sentences/" in f"/{name}" and name.endswith(".csv"):
                    fh = tar.extractfile(member)
                    if fh is not None:
                        sentences[Path(name).stem] = fh.read().decode("utf-8", errors="replace")
        st = self._source_stats("sofc_exp_corpus")
        for pmc in sorted(texts):
            doc = texts[pmc]
            spans: list[tuple[str, int, int]] = []
            for line in sentences.get(pmc, "").splitlines():
                f = line.split("\t")
                if len(f) >= 4 and f[2].strip().isdigit() and f[3].strip().isdigit():
                    spans.append((f[0].strip(), int(f[2]), int(f[3])))
            if not spans:  # no annotation: one sentence per line
                pos = 0
                for j, ln in enumerate(doc.split("\n"), 1):
                    spans.append((str(j), pos, pos + len(ln)))
                    pos += len(ln) + 1
            for sid, begin, end in spans:
                sent = doc[begin:end].strip()
                if len(sent) > SOFC_MAX_SENTENCE_CHARS:
                    st["texts_read"] += 1
                    st["skipped_long"] += 1
                    continue
                self.add_text(sent, find_formulas(sent), "sofc_exp_corpus", f"{pmc}/{sid}")

    # ------------------------------------------------------------------ queries
    def lookup(self, formula: str | None, max_items: int = 8) -> list[TextItem]:
        """Texts that mention this formula, taking the sources in turn (matscholar, glass, SOFC).

        Within a source the order is that of the files; identical texts appear once; new objects are
        returned on every call.

        Args:
            formula: Any formula of the material (normalised with :func:`formula_key`) or None.
            max_items: Most texts returned.

        """
        if not formula:
            return []
        eids = self._by_formula.get(formula_key(formula) or formula, [])
        queues: list[list[int]] = [[] for _ in SOURCES]
        for e in eids:
            queues[self._entries[e][1]].append(e)
        out: list[TextItem] = []
        seen: set[int] = set()
        pos = [0] * len(SOURCES)
        while len(out) < max_items and any(pos[s] < len(queues[s]) for s in range(len(SOURCES))):
            for s in range(len(SOURCES)):
                while pos[s] < len(queues[s]):
                    tid, src, ref = self._entries[queues[s][pos[s]]]
                    pos[s] += 1
                    if tid in seen:
                        continue
                    seen.add(tid)
                    out.append(TextItem(text=self._texts[tid], source=SOURCES[src], generated=False, ref=ref))
                    break
                if len(out) >= max_items:
                    break
        return out

    def has_formula(self, formula: str) -> bool:
        """Whether some text mentions this formula."""
        return (formula_key(formula) or formula) in self._by_formula

    def stats(self) -> dict[str, Any]:
        """Return counts per source (texts read, with formulas, entries, clipped) and formulas indexed."""
        st = json.loads(json.dumps(self._stats))
        st["unique_texts"] = len(self._texts)
        st["entries"] = len(self._entries)
        st["formulas_indexed"] = len(self._by_formula)
        return st
