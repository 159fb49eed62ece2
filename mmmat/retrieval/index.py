"""A FAISS index of L2-normalised embeddings with a material table beside it.

Vectors are stored as float32 and L2-normalised on the way in (queries too), so the inner product that FAISS
ranks by is the cosine similarity (score 1 = same direction).  Two kinds:

``exact``
    ``IndexFlatIP``: brute force, exact; the default below :data:`DEFAULT_APPROX_THRESHOLD` vectors.
``ivf``
    ``IndexIVFFlat`` with an inner-product coarse quantizer of ``nlist`` lists (default
    :func:`default_nlist`: 4·√N rounded to a power of two, e.g. 4096 at 1M); a query scans the ``nprobe``
    (default 16) lists nearest to it.  The lists are trained by spherical k-means (``niter`` iterations) on a
    random sample of ``train_per_list``·nlist vectors (default 40, just above FAISS's minimum of 39; never
    more than 256 per list, never more than N).  Vectors are stored uncompressed, so the scores of the hits
    are exact; only lists not probed are missed.

Row ``i`` of the FAISS index is row ``i`` of the material table (:attr:`EmbeddingIndex.meta`), whose columns
are ``material_id`` (unique), ``formula``, ``spacegroup_number`` (nullable), ``spacegroup_symbol``, ``split``
and any extra columns given.  :meth:`EmbeddingIndex.add` appends vectors to a built index without rebuilding
it (an IVF index keeps its trained lists, so it may be retrained by a fresh build once the data has drifted);
it refuses material ids already in the index with :class:`DuplicateIdError`, or, with
``skip_duplicates=True``, leaves those rows out and reports how many it skipped.  An exact index stays exact
when ``add`` takes it past the threshold: a fresh build switches kind.

On disk (:meth:`EmbeddingIndex.save`): ``index.faiss`` (FAISS's own format), ``meta.parquet`` (the table) and
``index.json`` (kind, dim, count, nlist, nprobe, faiss version, plus whatever the caller records there,
such as the model fingerprint and the modality indexed).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mmmat.io import InputError

#: Above this many vectors, ``kind="auto"`` builds an approximate IVF index.
DEFAULT_APPROX_THRESHOLD = 200_000
#: IVF lists scanned per query.
DEFAULT_NPROBE = 16
#: Training sample per IVF list (k-means points per centroid). At 1M clustered 256-d vectors, 4096 lists,
#: 16 probes: 40 gives recall@10 0.996 for 68 CPU-s of build, 64 gives 0.999 for 95 CPU-s.
DEFAULT_TRAIN_PER_LIST = 40
#: Most training points per IVF list.
MAX_TRAIN_PER_LIST = 256
#: k-means iterations for the IVF lists.
DEFAULT_NITER = 10
#: Batches of fewer queries than this are searched on one thread.
SMALL_BATCH = 8
#: Fewest training points per list that k-means accepts without a warning (FAISS's rule).
MIN_TRAIN_PER_LIST = 39

INDEX_FILE = "index.faiss"
META_FILE = "meta.parquet"
INFO_FILE = "index.json"
FORMAT = "mmmat.EmbeddingIndex"
#: Columns every material table has, in this order.
META_COLUMNS = ("material_id", "formula", "spacegroup_number", "spacegroup_symbol", "split")
KINDS = ("auto", "exact", "ivf")


class RetrievalError(InputError):
    """A retrieval input or index that cannot be used; the message names the problem (an :class:`InputError`)."""


class DuplicateIdError(RetrievalError):
    """Material ids that are already in the index (or repeated in the input)."""

    def __init__(self, ids: Sequence[str]):
        shown = ", ".join(map(repr, list(ids)[:5])) + (f" and {len(ids) - 5} more" if len(ids) > 5 else "")
        super().__init__(f"{len(ids)} material id(s) already in the index: {shown}")
        self.ids = list(ids)


@dataclass
class Hit:
    """One search result.

    Attributes:
        rank: 1 for the best match.
        material_id: Id of the matched material.
        formula: Its reduced formula.
        spacegroup: Space group as ``"Fm-3m (225)"``, empty when unknown.
        score: Cosine similarity of query and match (-1 .. 1).

    """

    rank: int
    material_id: str
    formula: str
    spacegroup: str
    score: float

    def to_dict(self) -> dict[str, Any]:
        """Return the hit as a plain dict."""
        return asdict(self)


def _faiss() -> Any:
    try:
        import faiss
    except ImportError as exc:  # pragma: no cover - a dependency
        raise ImportError("mmmat.retrieval needs faiss: pip install 'faiss-cpu>=1.8'") from exc
    return faiss


def available_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def set_threads(n: int | None = None) -> int:
    """Set FAISS's OpenMP threads (default: every core this process may use); returns the number set."""
    n = available_cores() if not n or n < 1 else int(n)
    _faiss().omp_set_num_threads(n)
    return n


def default_nlist(n: int) -> int:
    """IVF lists for ``n`` vectors: 4·√n rounded to the nearest power of two, at most n/39 (at least 1)."""
    if n <= 0:
        return 1
    nlist = 2 ** round(math.log2(max(1.0, 4.0 * math.sqrt(n))))
    return int(max(1, min(nlist, n // MIN_TRAIN_PER_LIST)))


@lru_cache(maxsize=1)
def _spacegroup_symbols() -> dict[int, str]:
    """Short international symbol of each space group number (spglib's table, first setting)."""
    import spglib

    out: dict[int, str] = {}
    for hall in range(1, 531):
        t = spglib.get_spacegroup_type(hall)
        number = int(t.number if hasattr(t, "number") else t["number"])
        out.setdefault(number, str(t.international_short if hasattr(t, "international_short")
                                   else t["international_short"]))
    return out


def spacegroup_symbol(number: int | None) -> str:
    """Short Hermann-Mauguin symbol of space group ``number`` (1-230), empty when unknown."""
    if number is None or pd.isna(number):
        return ""
    return _spacegroup_symbols().get(int(number), "")


def normalize(vectors: Any, dim: int | None = None) -> np.ndarray:
    """(N, d) C-contiguous float32 copy of ``vectors`` with unit rows; 1-D input is one row.

    Raises:
        RetrievalError: wrong shape or dimension, non-finite values, or a zero vector.

    """
    x = vectors.detach().cpu().numpy() if hasattr(vectors, "detach") else vectors
    x = np.array(x, dtype=np.float32, copy=True, order="C")
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2:
        raise RetrievalError(f"vectors must be (N, d), got shape {x.shape}")
    if dim is not None and x.shape[1] != dim:
        raise RetrievalError(f"vectors have dimension {x.shape[1]}, the index has {dim}")
    if not np.isfinite(x).all():
        raise RetrievalError("vectors hold NaN or infinite values")
    norms = np.linalg.norm(x, axis=1)
    if x.shape[0] and norms.min() == 0.0:
        raise RetrievalError(f"vector {int(norms.argmin())} is all zeros: it has no direction to compare")
    x /= norms[:, None]
    return x


def make_meta(meta: Any, n: int) -> pd.DataFrame:
    """The material table for ``n`` vectors from a DataFrame, a mapping of columns, or a list of ids.

    Missing standard columns are filled (``formula``/``split``/``spacegroup_symbol`` empty,
    ``spacegroup_number`` NA; the symbol is derived from the number when only the number is given).
    """
    if isinstance(meta, pd.DataFrame):
        df = meta.reset_index(drop=True).copy()
    elif isinstance(meta, Mapping):
        df = pd.DataFrame(dict(meta))
    else:
        df = pd.DataFrame({"material_id": list(meta)})
    if "material_id" not in df.columns:
        raise RetrievalError("the material table needs a 'material_id' column")
    if len(df) != n:
        raise RetrievalError(f"{n} vectors but {len(df)} rows of metadata")
    df["material_id"] = df["material_id"].astype(str)
    for col in ("formula", "split"):
        df[col] = df[col].fillna("").astype(str) if col in df.columns else ""
    sg = df["spacegroup_number"] if "spacegroup_number" in df.columns else pd.Series([pd.NA] * n)
    df["spacegroup_number"] = pd.to_numeric(sg, errors="coerce").round().astype("Int64").values
    if "spacegroup_symbol" not in df.columns:
        df["spacegroup_symbol"] = [spacegroup_symbol(v) for v in df["spacegroup_number"]]
    df["spacegroup_symbol"] = df["spacegroup_symbol"].fillna("").astype(str)
    extra = [c for c in df.columns if c not in META_COLUMNS]
    return df[list(META_COLUMNS) + extra]


def _duplicates(ids: pd.Series) -> list[str]:
    return sorted(set(ids[ids.duplicated()]))


class EmbeddingIndex:
    """FAISS inner-product index over unit vectors plus the material table (see the module docstring).

    Build one with :meth:`build` or read one with :meth:`load`; the constructor takes already-made parts.

    Args:
        index: A FAISS ``IndexFlatIP`` or ``IndexIVFFlat`` (inner product).
        meta: Material table, one row per vector, in FAISS row order.
        info: Free-form facts recorded in ``index.json`` (model fingerprint, modality, ...).

    """

    def __init__(self, index: Any, meta: pd.DataFrame, info: dict[str, Any] | None = None):
        faiss = _faiss()
        self.index = index
        self.meta = make_meta(meta, index.ntotal)
        self.info = dict(info or {})
        ivf = faiss.try_extract_index_ivf(index)
        self.kind = "ivf" if ivf is not None else "exact"
        if index.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise RetrievalError("an EmbeddingIndex ranks by inner product; this FAISS index does not")
        dup = _duplicates(self.meta["material_id"])
        if dup:
            raise DuplicateIdError(dup)
        self._ids = set(self.meta["material_id"])
        self._columns: tuple[np.ndarray, ...] | None = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def build(
        cls,
        vectors: Any,
        meta: Any,
        kind: str = "auto",
        approx_threshold: int = DEFAULT_APPROX_THRESHOLD,
        nlist: int | None = None,
        nprobe: int = DEFAULT_NPROBE,
        train_per_list: int = DEFAULT_TRAIN_PER_LIST,
        niter: int = DEFAULT_NITER,
        seed: int = 0,
        threads: int | None = None,
        info: dict[str, Any] | None = None,
    ) -> EmbeddingIndex:
        """Index ``vectors`` (N, d) with material table ``meta`` (DataFrame, column mapping or id list).

        Args:
            vectors: Embeddings (normalised here; any float dtype, numpy or torch).
            meta: One row per vector; needs ``material_id`` (unique).
            kind: ``exact``, ``ivf``, or ``auto`` (``ivf`` when N > ``approx_threshold``).
            approx_threshold: Size above which ``auto`` picks IVF.
            nlist: IVF lists (default :func:`default_nlist`).
            nprobe: IVF lists scanned per query.
            train_per_list: k-means training points per list (capped at 256 and at N).
            niter: k-means iterations.
            seed: Seed of the training sample and k-means.
            threads: FAISS threads (default: every available core).
            info: Facts to record in ``index.json``.

        Raises:
            RetrievalError: bad vectors or table, duplicate ids, unknown kind, too few vectors for ``nlist``.

        """
        faiss = _faiss()
        if kind not in KINDS:
            raise RetrievalError(f"unknown index kind {kind!r} (one of {', '.join(KINDS)})")
        set_threads(threads)
        x = normalize(vectors)
        n, d = x.shape
        table = make_meta(meta, n)
        dup = _duplicates(table["material_id"])
        if dup:
            raise DuplicateIdError(dup)
        if kind == "auto":
            kind = "ivf" if n > approx_threshold else "exact"
        t0 = time.perf_counter()
        build: dict[str, Any] = {}
        if kind == "exact":
            index = faiss.IndexFlatIP(d)
        else:
            nlist = int(nlist or default_nlist(n))
            if nlist < 1 or n < nlist:
                raise RetrievalError(f"an IVF index of {nlist} lists needs at least {nlist} vectors, got {n}")
            per = max(1, min(int(train_per_list), MAX_TRAIN_PER_LIST))
            n_train = min(n, per * nlist)
            rng = np.random.default_rng(seed)
            sample = x if n_train == n else x[np.sort(rng.choice(n, n_train, replace=False))]
            quantizer = faiss.IndexFlatIP(d)
            index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
            index.cp.niter = int(niter)
            index.cp.seed = int(seed)
            index.cp.spherical = True
            index.cp.max_points_per_centroid = MAX_TRAIN_PER_LIST
            index.cp.min_points_per_centroid = 1
            index.train(sample)
            index.nprobe = int(nprobe)
            build.update(nlist=nlist, train_size=int(n_train), niter=int(niter),
                         train_seconds=round(time.perf_counter() - t0, 3))
        index.add(x)
        build["seconds"] = round(time.perf_counter() - t0, 3)
        out = cls(index, table, info)
        out.info["build"] = build
        return out

    # ------------------------------------------------------------------ properties
    @property
    def dim(self) -> int:
        """Vector dimension."""
        return int(self.index.d)

    def __len__(self) -> int:
        return int(self.index.ntotal)

    @property
    def nlist(self) -> int | None:
        """IVF lists (None for an exact index)."""
        ivf = _faiss().try_extract_index_ivf(self.index)
        return None if ivf is None else int(ivf.nlist)

    @property
    def nprobe(self) -> int | None:
        """IVF lists scanned per query (None for an exact index)."""
        ivf = _faiss().try_extract_index_ivf(self.index)
        return None if ivf is None else int(ivf.nprobe)

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        ivf = _faiss().try_extract_index_ivf(self.index)
        if ivf is not None:
            if value < 1:
                raise RetrievalError(f"nprobe must be at least 1, got {value}")
            ivf.nprobe = int(min(value, ivf.nlist))

    def __contains__(self, material_id: object) -> bool:
        return material_id in self._ids

    # ------------------------------------------------------------------ adding
    def add(self, vectors: Any, meta: Any, skip_duplicates: bool = False) -> int:
        """Append vectors and their table rows without rebuilding (IVF: assigned to the trained lists).

        Args:
            vectors: (N, d) embeddings.
            meta: Their table rows (DataFrame, column mapping or id list).
            skip_duplicates: Leave out rows whose material id is already indexed (or repeated in the input,
                keeping the first) instead of raising.

        Returns:
            The number of vectors added (``N`` minus the number skipped).

        Raises:
            DuplicateIdError: an id is already indexed or repeated, and ``skip_duplicates`` is False.

        """
        x = normalize(vectors, self.dim)
        table = make_meta(meta, x.shape[0])
        ids = table["material_id"]
        clash = ids.isin(self._ids) | ids.duplicated()
        if clash.any():
            if not skip_duplicates:
                raise DuplicateIdError(sorted(set(ids[clash])))
            keep = ~clash.to_numpy()
            x, table = x[keep], table[keep].reset_index(drop=True)
        if len(table):
            self.index.add(np.ascontiguousarray(x))
            self.meta = pd.concat([self.meta, table], ignore_index=True)
            extra = [c for c in self.meta.columns if c not in META_COLUMNS]
            self.meta = self.meta[list(META_COLUMNS) + extra]
            self._ids.update(table["material_id"])
            self._columns = None
        return len(table)

    # ------------------------------------------------------------------ searching
    def search_batch(self, queries: Any, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` matches of each query, as arrays.

        Args:
            queries: (Q, d) or (d,) embeddings (normalised here).
            k: Matches per query.

        Returns:
            ``(scores, rows)``: (Q, k) float32 cosine similarities, best first, and (Q, k) int64 table rows
            (-1 where fewer than ``k`` vectors could be returned). ``meta.iloc[row]`` describes a match.

        """
        if k < 1:
            raise RetrievalError(f"k must be at least 1, got {k}")
        q = normalize(queries, self.dim)
        if q.shape[0] >= SMALL_BATCH:
            scores, rows = self.index.search(q, int(k))
        else:  # a few queries: OpenMP hand-offs cost more than they share (p50 0.6 -> 0.27 ms, 17k exact)
            faiss = _faiss()
            threads = faiss.omp_get_max_threads()
            faiss.omp_set_num_threads(1)
            try:
                scores, rows = self.index.search(q, int(k))
            finally:
                faiss.omp_set_num_threads(threads)
        return scores, rows.astype(np.int64, copy=False)

    def hits(self, scores: np.ndarray, rows: np.ndarray) -> list[list[Hit]]:
        """Turn :meth:`search_batch` output into one list of :class:`Hit` per query."""
        mids, formulas, numbers, symbols = self._hit_columns()
        out = []
        for srow, rrow in zip(scores, rows, strict=True):
            hits = []
            for rank, (s, r) in enumerate(zip(srow, rrow, strict=True), start=1):
                if r < 0:
                    break
                sg = "" if numbers[r] is None else f"{symbols[r]} ({int(numbers[r])})".strip()
                hits.append(Hit(rank, str(mids[r]), str(formulas[r]), sg, float(s)))
            out.append(hits)
        return out

    def _hit_columns(self) -> tuple[np.ndarray, ...]:
        """The table columns a :class:`Hit` shows, as arrays (cached until the table changes)."""
        if self._columns is None:
            m = self.meta
            self._columns = (
                m["material_id"].to_numpy(dtype=object),
                m["formula"].to_numpy(dtype=object),
                m["spacegroup_number"].to_numpy(dtype=object, na_value=None),
                m["spacegroup_symbol"].to_numpy(dtype=object),
            )
        return self._columns

    def search(self, query: Any, k: int = 10) -> list[Hit]:
        """Top-``k`` matches of one query vector (d,) or (1, d), best first."""
        q = query.detach().cpu().numpy() if hasattr(query, "detach") else np.asarray(query)
        if q.ndim == 2 and q.shape[0] != 1:
            raise RetrievalError(f"search takes one query, got {q.shape[0]}: use search_batch")
        return self.hits(*self.search_batch(q, k))[0]

    def search_frame(self, queries: Any, k: int = 10) -> pd.DataFrame:
        """Top-``k`` matches of each query as one long table (query, rank, material_id, ..., score)."""
        scores, rows = self.search_batch(queries, k)
        recs = [{"query": qi, **h.to_dict()} for qi, hs in enumerate(self.hits(scores, rows)) for h in hs]
        return pd.DataFrame(recs, columns=["query", "rank", "material_id", "formula", "spacegroup", "score"])

    # ------------------------------------------------------------------ persistence
    def describe(self) -> dict[str, Any]:
        """What ``index.json`` holds: the caller's info plus kind, dim, count, nlist, nprobe, versions."""
        faiss = _faiss()
        return {
            **self.info,
            "format": FORMAT,
            "version": 1,
            "kind": self.kind,
            "dim": self.dim,
            "count": len(self),
            "metric": "inner_product (cosine on unit vectors)",
            "nlist": self.nlist,
            "nprobe": self.nprobe,
            "faiss_version": faiss.__version__,
            "files": {"index": INDEX_FILE, "meta": META_FILE},
        }

    def save(self, path: str | Path) -> Path:
        """Write ``index.faiss``, ``meta.parquet`` and ``index.json`` into folder ``path`` (created)."""
        faiss = _faiss()
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        doc = self.describe()
        doc["saved"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        # write beside, then rename: a reader never sees a half-written index
        faiss.write_index(self.index, str(path / (INDEX_FILE + ".tmp")))
        self.meta.to_parquet(path / (META_FILE + ".tmp"), index=False)
        (path / (INFO_FILE + ".tmp")).write_text(json.dumps(doc, indent=1, default=str))
        for name in (INDEX_FILE, META_FILE, INFO_FILE):
            os.replace(path / (name + ".tmp"), path / name)
        self.info = {k: v for k, v in doc.items() if k not in _DERIVED}
        return path

    @classmethod
    def load(cls, path: str | Path, nprobe: int | None = None, threads: int | None = None) -> EmbeddingIndex:
        """Read an index written by :meth:`save`.

        Args:
            path: The index folder.
            nprobe: Override the recorded nprobe (IVF only).
            threads: FAISS threads (default: every available core).

        Raises:
            FileNotFoundError: the folder or one of its three files is missing.
            RetrievalError: the files disagree (count or dimension) or are not an mmmat index.

        """
        faiss = _faiss()
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"index directory {path} not found")
        for name in (INFO_FILE, INDEX_FILE, META_FILE):
            if not (path / name).is_file():
                raise FileNotFoundError(f"{path / name} not found: is {path} an index folder?")
        try:
            doc = json.loads((path / INFO_FILE).read_text())
        except json.JSONDecodeError as exc:
            raise RetrievalError(f"{path / INFO_FILE} is not valid JSON ({exc})") from None
        if doc.get("format") != FORMAT:
            raise RetrievalError(f"{path / INFO_FILE} does not describe an mmmat embedding index")
        set_threads(threads)
        index = faiss.read_index(str(path / INDEX_FILE))
        meta = pd.read_parquet(path / META_FILE)
        if index.ntotal != len(meta) or index.ntotal != doc.get("count", index.ntotal):
            raise RetrievalError(
                f"{path}: index.faiss holds {index.ntotal} vectors, meta.parquet {len(meta)} rows, "
                f"index.json says {doc.get('count')}: the folder is inconsistent, rebuild it"
            )
        if index.d != doc.get("dim", index.d):
            raise RetrievalError(f"{path}: index.faiss has dimension {index.d}, index.json says {doc['dim']}")
        out = cls(index, meta, {k: v for k, v in doc.items() if k not in _DERIVED})
        if nprobe is not None:
            out.nprobe = nprobe
        return out


#: Keys of ``index.json`` that :meth:`EmbeddingIndex.describe` recomputes (not carried in ``info``).
_DERIVED = (
    "format", "version", "kind", "dim", "count", "metric", "nlist", "nprobe", "faiss_version", "files",
    "saved",
)
