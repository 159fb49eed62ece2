"""What a running ``mmmat serve`` holds: the index, the model (loaded once), uploads, jobs and run folders.

The pages call these methods; none of them needs Dash, so they are tested without a browser too.
"""

from __future__ import annotations

import importlib.util
import json
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mmmat.io import InputError, read_image, read_xrd_profile
from mmmat.web.uploads import DEFAULT_MAX_UPLOAD_MB, UploadStore

#: Meta columns that describe a hit rather than a property of it.
ID_COLUMNS = ("material_id", "formula", "spacegroup_number", "spacegroup_symbol", "split")


class Cancelled(Exception):
    """Raised inside a job's progress callback when the user cancelled it."""


@dataclass
class Job:
    """A long piece of work in a background thread, with progress and a cancel flag."""

    total: int
    done: int = 0
    started: float = field(default_factory=time.perf_counter)
    finished: float | None = None
    result: Any = None
    error: str | None = None
    cancel: threading.Event = field(default_factory=threading.Event)

    @property
    def state(self) -> str:
        """``running``, ``done``, ``cancelled`` or ``failed``."""
        if self.finished is None:
            return "running"
        if self.error is not None:
            return "cancelled" if self.cancel.is_set() else "failed"
        return "done"

    def eta_s(self) -> float | None:
        """Seconds left at the rate so far (None before the first step)."""
        if self.done <= 0 or self.finished is not None:
            return None
        rate = (time.perf_counter() - self.started) / self.done
        return rate * (self.total - self.done)


def module_available(name: str) -> bool:
    """Whether a module can be imported (False also when its parent package is missing)."""
    import sys

    if sys.modules.get(name) is not None:
        return True
    try:
        return importlib.util.find_spec(name) is not None
    except (ModuleNotFoundError, ValueError):
        return False


class ServeContext:
    """Shared state of one server.

    Args:
        index_dir: Index folder written by ``mmmat index build``.
        model_dir: Model folder (default: the one the index records).
        design_runs: A design run folder, or a folder of them.
        generator: A generator folder (``configs/generate``) for the Generate page.
        max_upload_mb: Largest accepted upload, MB.
        upload_root: Where the private temporary upload folder is made (default: the system's).

    """

    def __init__(
        self,
        index_dir: str | Path,
        model_dir: str | Path | None = None,
        design_runs: str | Path | None = None,
        generator: str | Path | None = None,
        max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
        upload_root: str | Path | None = None,
    ):
        from mmmat.retrieval.api import _model_dir, open_index

        self.index_dir = Path(index_dir)
        self.index = open_index(self.index_dir)
        self.model_dir = _model_dir(self.index, model_dir)
        self.design_runs = Path(design_runs) if design_runs is not None else None
        self.generator_dir = Path(generator) if generator is not None else None
        self.uploads = UploadStore(int(max_upload_mb * 1e6), upload_root)
        self._model: Any = None
        self._records: dict[str, Any] | None = None
        self._generator: Any = None
        self._lock = threading.Lock()
        self.jobs: dict[str, Job] = {}

    # ------------------------------------------------------------------ model and records
    @property
    def model(self) -> Any:
        """The index's model, loaded on first use and checked against the index's fingerprint."""
        with self._lock:
            if self._model is None:
                from mmmat.retrieval.api import check_model, load_model

                model = load_model(self.model_dir)
                check_model(self.index, self.model_dir)
                self._model = model
        return self._model

    def records(self) -> dict[str, Any]:
        """material_id → record, read once from the shard folders the index records (empty if gone)."""
        with self._lock:
            if self._records is None:
                from mmmat.retrieval.api import shard_records

                recs: dict[str, Any] = {}
                for d in self.index.info.get("shards", []):
                    if Path(d).is_dir():
                        try:
                            recs.update({r.material_id: r for r in shard_records(d)})
                        except Exception:  # an unreadable shard folder only loses the structure views
                            continue
                self._records = recs
        return self._records

    def structure_of(self, material_id: str) -> Any | None:
        """The indexed crystal ``material_id`` as a pymatgen ``Structure`` (None when its shards are gone)."""
        rec = self.records().get(material_id)
        return None if rec is None else rec.to_structure()

    def property_columns(self) -> list[str]:
        """Numeric property columns of the index's material table."""
        m = self.index.meta
        return [c for c in m.columns if c not in ID_COLUMNS and pd.api.types.is_numeric_dtype(m[c])]

    # ------------------------------------------------------------------ search
    def embed(self, kind: str, value: Any) -> np.ndarray:
        """Embed one query of ``kind`` crystal (Structure), xrd (mmmat.io.Pattern), image (array/file) or text."""
        from mmmat.data.schema import MaterialRecord
        from mmmat.retrieval.api import _image_size, _one_thread, _require

        model = self.model
        if kind == "crystal":
            modality, inputs = "crystal", [MaterialRecord.from_structure(value, "query")]
        elif kind == "xrd":
            modality = "xrd"
            inputs = read_xrd_profile(value)[None]
        elif kind == "image":
            modality = "image"
            inputs = (read_image(value, _image_size(model)) if not isinstance(value, np.ndarray) else value)[None]
        else:
            modality = "literature_text"
            if not isinstance(value, str) or not value.strip():
                raise InputError("empty text: type a sentence to search with")
            inputs = [value.strip()[:4000]]
        try:
            _require(model, modality)
        except ValueError as exc:
            raise InputError(str(exc)) from None
        with _one_thread():
            return model.embed(modality, inputs).float().cpu().numpy()[0]

    def search(self, kind: str, value: Any, k: int = 10) -> pd.DataFrame:
        """Top-``k`` hits: rank, material_id, formula, spacegroup, similarity, then known properties."""
        q = self.embed(kind, value)
        scores, rows = self.index.search_batch(q[None], int(k))
        hits = self.index.hits(scores, rows)[0]
        out = pd.DataFrame([h.to_dict() for h in hits]).rename(columns={"score": "similarity"})
        props = self.property_columns()
        if len(out) and props:
            kept = rows[0][rows[0] >= 0][: len(out)]
            extra = self.index.meta.iloc[kept][props].reset_index(drop=True)
            out = pd.concat([out, extra.dropna(axis=1, how="all")], axis=1)
        return out

    # ------------------------------------------------------------------ identify
    @staticmethod
    def identify_available() -> bool:
        """Whether phase identification (``mmmat.xrd.identify``) is installed."""
        return module_available("mmmat.xrd.identify")

    def identify(self, pattern_path: Path, elements: list[str] | None, max_phases: int = 4) -> Any:
        """Run :func:`mmmat.xrd.identify.identify` on an uploaded scan against the served index."""
        from mmmat.xrd.identify import identify

        return identify(pattern_path, self.index_dir, elements=elements or None, max_phases=max_phases,
                        model=self.model_dir)

    # ------------------------------------------------------------------ generate
    def generator(self) -> Any:
        """The generator (loaded on first use); None when the server has none."""
        if self.generator_dir is None:
            return None
        with self._lock:
            if self._generator is None:
                from mmmat.generative.api import load_generator

                self._generator = load_generator(self.generator_dir, "cpu")
        return self._generator

    def start_generation(self, n: int, steps: int, seed: int = 0, composition: str | None = None,
                         text: str | None = None, xrd: Any = None, targets: dict | None = None) -> str:
        """Start sampling ``n`` crystals in a background thread; returns the job id (see :attr:`jobs`)."""
        gen = self.generator()
        if gen is None:
            raise InputError("this server has no generator (start it with --generator DIR)")
        job = Job(total=n)
        jid = uuid.uuid4().hex
        self.jobs[jid] = job

        def progress(k: int) -> None:
            job.done = int(k)
            if job.cancel.is_set():
                raise Cancelled()

        def run() -> None:
            from mmmat.generative.api import generate

            try:
                structures, info = generate(
                    gen, n, composition=composition, text=text, xrd=xrd, targets=targets or None, seed=seed,
                    steps=steps, batch_size=max(1, min(n, 8)), progress=progress,
                )
                job.result = (structures, info, score_candidates(structures))
            except Cancelled:
                job.error = "cancelled"
            except Exception as exc:  # the page shows the message; the server keeps running
                job.error = f"{type(exc).__name__}: {exc}"
            finally:
                job.finished = time.perf_counter()

        threading.Thread(target=run, daemon=True, name=f"generate-{jid[:8]}").start()
        return jid

    # ------------------------------------------------------------------ design runs
    def design_run_folders(self) -> list[Path]:
        """Run folders under ``--design-runs`` (the folder itself when it is one), newest name last."""
        d = self.design_runs
        if d is None or not d.is_dir():
            return []
        if (d / "report.json").is_file():
            return [d]
        return sorted(p for p in d.iterdir() if p.is_dir() and (p / "report.json").is_file())

    def design_run(self, name: str) -> dict[str, Any]:
        """One run folder's report, ledger table and hits (path checked to be one of the listed runs)."""
        runs = {p.name: p for p in self.design_run_folders()}
        if name not in runs:
            raise InputError(f"no design run named {name!r}")
        return read_design_run(runs[name])


def score_candidates(structures: list[Any]) -> pd.DataFrame:
    """Staged scores of generated crystals: validity (structure, composition), then uniqueness of the valid."""
    from mmmat.evaluation.generation import unique_mask, validity

    rows = [i for i, s in enumerate(structures) if s is not None]
    table = pd.DataFrame({
        "sample": list(range(len(structures))),
        "formula": [s.composition.reduced_formula if s is not None else "(failed)" for s in structures],
        "atoms": [len(s) if s is not None else 0 for s in structures],
        "density_g_cm3": [round(float(s.density), 3) if s is not None else None for s in structures],
        "struct_valid": False, "comp_valid": False, "valid": False, "unique": False,
    })
    if rows:
        v = validity([structures[i] for i in rows])
        for key in ("struct_valid", "comp_valid", "valid"):
            table.loc[rows, key] = v[key]
        valid_rows = [i for i, ok in zip(rows, v["valid"]) if ok]
        if valid_rows:
            table.loc[valid_rows, "unique"] = unique_mask([structures[i] for i in valid_rows])
    return table


def read_design_run(run: Path) -> dict[str, Any]:
    """A design run folder (``report.json``, ``ledger.sqlite``, ``hits/*.cif``) as tables for the page."""
    try:
        report = json.loads((run / "report.json").read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{run.name}/report.json: {exc}") from None
    rounds = pd.DataFrame(report.get("rounds", []))
    if "guards" in rounds:
        guards = pd.DataFrame(list(rounds["guards"].map(lambda g: g or {}))).fillna(0).sum().astype(int)
        rounds = rounds.drop(columns=["guards"])
    else:
        guards = pd.Series(dtype=int)
    for col in ("seconds",):
        if col in rounds:
            rounds[col] = rounds[col].map(lambda v: round(sum(v.values()), 2) if isinstance(v, dict) else v)
    hits = []
    for h in report.get("hits", []):
        row = {"id": h.get("id"), "formula": h.get("formula"), "round": h.get("round"), "cif": h.get("cif")}
        row.update({f"e_hull_{k}": v for k, v in (h.get("e_hull") or {}).items()})
        row.update(h.get("properties") or {})
        hits.append(row)
    ledger = pd.DataFrame()
    db = run / "ledger.sqlite"
    if db.is_file():
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            ledger = pd.read_sql_query("SELECT * FROM candidates", con)
        except (sqlite3.Error, pd.errors.DatabaseError) as exc:
            raise InputError(f"{run.name}/ledger.sqlite: {exc}") from None
        finally:
            con.close()
    return {"run": run, "report": report, "rounds": rounds, "guards": guards, "hits": pd.DataFrame(hits),
            "ledger": ledger, "strategy": report.get("strategy", "")}


def run_file(run: Path, relative: str) -> Path:
    """A file named by a run's report, refused unless it lies inside the run folder."""
    p = (run / relative).resolve()
    if run.resolve() not in p.parents or not p.is_file():
        raise InputError(f"{relative!r} is not a file inside the run folder {run.name}")
    return p


def model_summary(ctx: ServeContext) -> dict[str, Any]:
    """What the served model and index are: modalities, encoders, sizes, fingerprint, training data."""
    cfg_file = ctx.model_dir / "config.json"
    cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
    enc = cfg.get("encoders", {})
    out: dict[str, Any] = {
        "model folder": str(ctx.model_dir),
        "fingerprint": ctx.index.info.get("model_fingerprint", "?"),
        "modalities": ", ".join(enc) or "?",
        "encoders": "; ".join(f"{m}: {c.get('name', '?')}" for m, c in enc.items()),
        "embedding dim": cfg.get("embed_dim"),
        "graph cutoff (Å)": cfg.get("cutoff"),
        "index": f"{ctx.index_dir} ({len(ctx.index)} crystals, {ctx.index.kind})",
        "index built from": ", ".join(ctx.index.info.get("shards", [])) or "?",
        "index splits": ", ".join(ctx.index.info.get("splits", [])) or "?",
    }
    for parent in [ctx.model_dir, *list(ctx.model_dir.parents)[:3]]:
        y = parent / "config.yaml"
        if y.is_file():
            import yaml

            try:
                data = (yaml.safe_load(y.read_text()) or {}).get("data", {})
            except Exception:  # a config we cannot parse only loses this line
                break
            args = data.get("init_args", data) if isinstance(data, dict) else {}
            out["training data"] = f"{args.get('shards', '?')} (from {y})"
            break
    return out


def index_vectors(ctx: ServeContext, limit: int = 20000, seed: int = 0) -> tuple[np.ndarray, pd.DataFrame]:
    """Up to ``limit`` of the index's vectors (a fixed random subset above it) and their meta rows."""
    n = len(ctx.index)
    rows = np.arange(n) if n <= limit else np.sort(np.random.default_rng(seed).choice(n, limit, replace=False))
    idx = ctx.index.index
    try:
        vec = np.stack([idx.reconstruct(int(i)) for i in rows]) if len(rows) else np.zeros((0, ctx.index.dim))
    except RuntimeError as exc:
        raise InputError(f"this index cannot return its vectors ({exc})") from None
    return vec, ctx.index.meta.iloc[rows].reset_index(drop=True)


__all__ = [
    "Cancelled",
    "Job",
    "ServeContext",
    "index_vectors",
    "model_summary",
    "read_design_run",
    "run_file",
    "score_candidates",
]
