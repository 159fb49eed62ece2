"""Evaluation of a folder of generated crystals against a shard folder: ``report.json``, ``report.md``, plots.

A generated folder (written by a generator) holds one CIF per sample (``sample_00000.cif``, ...), optionally
``samples.extxyz`` (every sample, ASE extended XYZ) and ``manifest.json``::

    {"mode": "csp" | "de_novo", "n": N,
     "samples": [{"file": "sample_00000.cif", "index": 0, "target_id": <material id or null>,
                  "composition": <formula or null>, "condition": {...}}, ...],
     "generation": {"wall_s": ..., "gpu_s": ..., "device": ..., "structures_per_s": ...}}

:func:`evaluate_folder` reads it (:func:`read_generated`), runs the staged evaluation of
:func:`mmmat.evaluation.generation.evaluate_generated` against the train split of the shard folder (coverage
and distributions against its test split when there is one), adds CSP match rate and RMSE when the samples
name target materials, and writes the JSON report, a Markdown report and PNG plots beside it.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mmmat.evaluation.generation import (
    CSP_TOLERANCES,
    DEFAULT_STAGES,
    FAR_BELOW_HULL,
    MIN_DISTANCE,
    MIN_VOLUME,
    ReferenceSet,
    csp_match_details,
    evaluate_generated,
)
from mmmat.io import InputError, find_shards, read_atoms, read_structure, structure_from_atoms
from mmmat.progress import note

#: Name of the manifest of a generated folder.
MANIFEST_NAME = "manifest.json"
#: Name of the optional extended-XYZ file holding every sample.
EXTXYZ_NAME = "samples.extxyz"


class EvaluationInputError(InputError):
    """A generated folder or reference shard folder that cannot be evaluated (missing, empty, unreadable)."""


# --------------------------------------------------------------------------------------------- reading
def _read_cif(path: Path) -> tuple[Any, str | None]:
    """``(Structure, None)`` or ``(None, reason)`` for one CIF file (:func:`mmmat.io.read_structure`)."""
    try:
        return read_structure(path), None
    except InputError as exc:
        return None, str(exc).removeprefix(f"{path}: ")


def _read_extxyz(path: Path) -> tuple[list, str | None]:
    """Every frame of an extended-XYZ file as ASE ``Atoms`` (``([], reason)`` when it cannot be read)."""
    try:
        return read_atoms(path, ":", format="extxyz"), None
    except InputError as exc:
        return [], f"unreadable extxyz ({str(exc).removeprefix(f'{path}: ')})"


def _atoms_to_structure(atoms: Any) -> tuple[Any, str | None]:
    try:
        return structure_from_atoms(atoms, "frame"), None
    except InputError as exc:
        return None, f"bad extxyz {exc}"


def read_generated(generated_dir: str | Path) -> tuple[list[Any], dict[str, Any]]:
    """Read the samples of a generated folder.

    With ``manifest.json`` the samples are its ``"samples"`` entries in order: each one's ``"file"`` (a CIF
    beside the manifest) or, when that file is absent, the ``samples.extxyz`` frame of sample ``"index"`` (the
    frame tagged ``sample=index`` when frames carry that tag, as ``write_samples`` writes them, else the
    frame at that position; a sample without a frame is a failure). Without a
    manifest: every ``*.cif`` sorted by name, else every frame of ``samples.extxyz``. A sample that cannot be
    read becomes None (an invalid sample); reading never stops at one.

    Args:
        generated_dir: The folder.

    Returns:
        ``(structures, manifest)``: one pymatgen ``Structure`` or None per sample, and the manifest (built
        when there is none: ``mode`` ``"de_novo"``, no targets, empty ``generation``) with ``"samples"``
        filled in, ``"n"`` set to the number of samples read (a different declared count is kept as
        ``"n_declared"``) and ``"read_failures"`` added: ``[{"index", "file", "reason"}]`` for every None.

    Raises:
        EvaluationInputError: The folder is missing, its manifest is not JSON, or it holds no samples.

    """
    d = Path(generated_dir)
    if not d.is_dir():
        raise EvaluationInputError(f"generated folder {d} not found")
    mpath = d / MANIFEST_NAME
    manifest: dict[str, Any] = {}
    if mpath.is_file():
        try:
            manifest = json.loads(mpath.read_text())
        except (OSError, ValueError) as exc:
            raise EvaluationInputError(f"{mpath}: not a readable JSON manifest ({exc})") from None
        if not isinstance(manifest, dict):
            raise EvaluationInputError(f"{mpath}: the manifest must be a JSON object")
    xyz_path = d / EXTXYZ_NAME
    frames: list | None = None
    xyz_error: str | None = None

    def frame(i: int) -> tuple[Any, str | None]:
        nonlocal frames, xyz_error
        if frames is None:
            frames, xyz_error = _read_extxyz(xyz_path)
        if xyz_error:
            return None, xyz_error
        tagged = {int(a.info["sample"]): a for a in frames if "sample" in getattr(a, "info", {})}
        if tagged:  # frames written by mmmat.generative.api.write_samples name their sample
            if i not in tagged:
                return None, f"no frame for sample {i} in {EXTXYZ_NAME} (the sample has no structure)"
            return _atoms_to_structure(tagged[i])
        if not 0 <= i < len(frames):
            return None, f"no frame {i} in {EXTXYZ_NAME} ({len(frames)} frames)"
        return _atoms_to_structure(frames[i])

    entries = manifest.get("samples")
    if not isinstance(entries, list) or not entries:
        cifs = sorted(d.glob("*.cif"))
        if cifs:
            entries = [{"file": p.name, "index": i} for i, p in enumerate(cifs)]
        elif xyz_path.is_file():
            frames, xyz_error = _read_extxyz(xyz_path)
            if xyz_error:
                raise EvaluationInputError(f"{xyz_path}: {xyz_error}")
            entries = [{"file": None, "index": i} for i in range(len(frames))]
        else:
            entries = []
    if not entries:
        raise EvaluationInputError(
            f"{d} holds no samples (no {MANIFEST_NAME} samples, *.cif or {EXTXYZ_NAME})"
        )

    structures: list[Any] = []
    failures: list[dict[str, Any]] = []
    samples: list[dict[str, Any]] = []
    for pos, raw in enumerate(entries):
        e = dict(raw) if isinstance(raw, Mapping) else {"file": str(raw)}
        idx = e.get("index", pos)
        idx = int(idx) if isinstance(idx, int | float) and not isinstance(idx, bool) else pos
        f = e.get("file")
        if f and (d / f).is_file():
            s, why = _read_cif(d / f)
        elif xyz_path.is_file():
            s, why = frame(idx)
            if s is None and f:
                why = f"{f} not found; {why}"
        else:
            s, why = None, f"{f} not found" if f else "entry names no file"
        if s is None:
            failures.append({"index": pos, "file": f, "reason": why})
        structures.append(s)
        samples.append(
            {
                "file": f,
                "index": idx,
                "target_id": None,
                "composition": None,
                "condition": {},
                **{k: v for k, v in e.items() if k not in ("file", "index")},
            }
        )
    out = dict(manifest)
    out.setdefault("mode", "de_novo")
    out.setdefault("generation", {})
    if isinstance(out.get("n"), int) and out["n"] != len(structures):
        out["n_declared"] = out["n"]
    out["n"] = len(structures)
    out["samples"] = samples
    out["read_failures"] = failures
    return structures, out


# --------------------------------------------------------------------------------------------- reference
def shard_splits(shard_dir: str | Path) -> list[str]:
    """Names of the splits of a shard folder that hold shards (:func:`mmmat.io.find_shards`).

    Raises:
        EvaluationInputError: The folder is missing or holds no shards.

    """
    try:
        return list(find_shards(shard_dir))
    except InputError as exc:
        raise EvaluationInputError(f"reference {exc}") from None


def load_split_records(shard_dir: str | Path, splits: Sequence[str] | None = None) -> dict[str, list[Any]]:
    """The records of a shard folder by split name: the named splits, or every split that holds shards.

    Raises:
        EvaluationInputError: The folder is missing or holds no shards.

    """
    from mmmat.data.loader import load_records

    try:
        have = find_shards(shard_dir)
    except InputError as exc:
        raise EvaluationInputError(f"reference {exc}") from None
    return {n: load_records(urls) for n, urls in have.items() if splits is None or n in splits}


# --------------------------------------------------------------------------------------------- helpers
def _jsonable(x: Any) -> Any:
    """``x`` with numpy values made plain and non-finite floats made None (strict JSON)."""
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, Path):
        return str(x)
    return x


def _num(v: Any, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return "nan" if not math.isfinite(v) else f"{v:.{digits}g}"
    return str(v)


def _safe(fn, s) -> float:
    try:
        return float(fn(s))
    except Exception:  # noqa: BLE001 - a degenerate cell has no density
        return math.nan


def _density(s) -> float:
    return _safe(lambda x: x.density, s)


def _n_elems(s) -> float:
    return _safe(lambda x: len(x.composition), s)


# --------------------------------------------------------------------------------------------- CSP
def _csp(
    structures: Sequence, samples: Sequence[Mapping], truth: Mapping[str, Any], workers: int
) -> dict[str, Any]:
    """CSP match rate and RMSE of the samples that name a target material."""
    pairs = [(i, str(e["target_id"])) for i, e in enumerate(samples) if e.get("target_id") not in (None, "")]
    missing = sorted({t for _, t in pairs if t not in truth})
    used = [(i, t) for i, t in pairs if t in truth]
    rms = (
        csp_match_details(
            [structures[i] for i, _ in used], [truth[t] for _, t in used], **CSP_TOLERANCES, workers=workers
        )
        if used
        else []
    )
    hits = [r for r in rms if r is not None]
    out: dict[str, Any] = {
        "csp_n": len(used),
        "csp_match_rate": len(hits) / len(used) if used else math.nan,
        "csp_rmse": float(np.mean(hits)) if hits else math.nan,
        "csp_targets_missing": missing,
        "rms_per_sample": [None] * len(structures),
    }
    for (i, _), r in zip(used, rms):
        out["rms_per_sample"][i] = r
    by_target: dict[str, list[float | None]] = {}
    for (_, t), r in zip(used, rms):
        by_target.setdefault(t, []).append(r)
    if by_target and max(len(v) for v in by_target.values()) > 1:  # several samples per target: match@k
        best = [min((r for r in v if r is not None), default=None) for v in by_target.values()]
        ok = [b for b in best if b is not None]
        out["csp_targets"] = len(by_target)
        out["csp_match_rate_per_target"] = len(ok) / len(by_target)
        out["csp_rmse_per_target"] = float(np.mean(ok)) if ok else math.nan
    return out


# --------------------------------------------------------------------------------------------- plots
def _plots(
    out_dir: Path,
    stem: str,
    n_generated: int,
    stages: Sequence[Mapping],
    gen_structs: Sequence,
    ref_structs: Sequence,
    ref_label: str,
    e_hull: Sequence | None,
) -> dict[str, str]:
    """Write the PNG plots; returns ``{kind: file name}``."""
    from matplotlib.figure import Figure

    files: dict[str, str] = {}

    def save(fig, kind: str) -> None:
        name = f"{stem}_{kind}.png"
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=110)
        files[kind] = name

    fig = Figure(figsize=(6.4, 3.6))
    ax = fig.add_subplot()
    labels = ["generated"] + [s["stage"] for s in stages]
    counts = [n_generated] + [s["n_out"] for s in stages]
    bars = ax.bar(range(len(labels)), counts, color=["#777777"] + ["#3b75af"] * len(stages))
    for b, c in zip(bars, counts):
        ax.text(b.get_x() + b.get_width() / 2, b.get_height(), str(c), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=30, ha="right")
    ax.set_ylabel("samples left")
    ax.set_title("Stage funnel")
    save(fig, "funnel")

    gen_d = np.array([_density(s) for s in gen_structs if s is not None])
    ref_d = np.array([_density(s) for s in ref_structs])
    gen_d, ref_d = gen_d[np.isfinite(gen_d)], ref_d[np.isfinite(ref_d)]
    fig = Figure(figsize=(5.2, 3.6))
    ax = fig.add_subplot()
    both = np.concatenate([gen_d, ref_d])
    if len(both):
        bins = np.linspace(both.min(), both.max() + 1e-9, 31)
        if len(ref_d):
            ax.hist(ref_d, bins=bins, density=True, color="#bbbbbb", label=f"{ref_label} ({len(ref_d)})")
        if len(gen_d):
            ax.hist(
                gen_d,
                bins=bins,
                density=True,
                histtype="step",
                lw=2,
                color="#3b75af",
                label=f"generated ({len(gen_d)})",
            )
        ax.legend(fontsize=8)
    ax.set_xlabel("density (g/cm³)")
    ax.set_ylabel("probability density (cm³/g)")
    ax.set_title("Density")
    save(fig, "density")

    gen_e = np.array([_n_elems(s) for s in gen_structs if s is not None])
    ref_e = np.array([_n_elems(s) for s in ref_structs])
    gen_e, ref_e = gen_e[np.isfinite(gen_e)], ref_e[np.isfinite(ref_e)]
    fig = Figure(figsize=(5.2, 3.6))
    ax = fig.add_subplot()
    both = np.concatenate([gen_e, ref_e])
    if len(both):
        hi = int(both.max())
        ks = np.arange(1, hi + 1)
        for off, v, lab, col in ((-0.2, ref_e, ref_label, "#bbbbbb"), (0.2, gen_e, "generated", "#3b75af")):
            if len(v):
                frac = [(v == k).mean() for k in ks]
                ax.bar(ks + off, frac, width=0.4, color=col, label=f"{lab} ({len(v)})")
        ax.set_xticks(ks)
        ax.legend(fontsize=8)
    ax.set_xlabel("number of elements")
    ax.set_ylabel("fraction of crystals")
    ax.set_title("Number of elements")
    save(fig, "num_elements")

    if e_hull is not None:
        eh = np.array([v for v in e_hull if v is not None], dtype=np.float64)
        eh = eh[np.isfinite(eh)]
        fig = Figure(figsize=(5.2, 3.6))
        ax = fig.add_subplot()
        if len(eh):
            ax.hist(eh, bins=min(40, max(5, len(eh) // 2)), color="#3b75af")
        ax.axvline(0.0, color="k", lw=0.8)
        ax.axvline(0.1, color="k", lw=0.8, ls="--")
        ax.set_xlabel("energy above CHGNet hull (eV/atom)")
        ax.set_ylabel("samples")
        ax.set_title(f"E above hull ({len(eh)} samples)")
        save(fig, "e_hull")
    return files


# --------------------------------------------------------------------------------------------- markdown
def _markdown(rep: Mapping[str, Any]) -> str:
    lines = [f"# Evaluation of `{rep['generated_dir']}`", ""]
    lines += [
        f"- mode: {rep['mode']}; samples: {rep['n_generated']} ({rep['n_read_failed']} unreadable)",
        f"- reference: `{rep['reference_shards']}` ({rep['settings']['reference_split']} split, "
        f"{rep['settings']['n_reference']} crystals); coverage / distributions against the "
        f"{rep['settings']['coverage_reference_split']} split ({rep['settings']['n_coverage_reference']})",
        f"- novelty reference: {rep['settings'].get('novelty_reference', 'train')} "
        f"({', '.join(rep['settings'].get('novelty_reference_splits', ['train']))})",
        f"- coverage convention: {rep['settings'].get('coverage_convention', '-')}",
        f"- stable: {rep['settings'].get('stable_rule', '-')}; hull reference: "
        f"{', '.join(rep['settings'].get('hull_reference_splits', []))} splits plus elemental references",
        f"- evaluation wall time: {_num(rep['evaluation_wall_s'])} s",
        "",
        "## Stages and cost",
        "",
        "| step | n_in | n_out | wall_s | of which reference_s | s/sample | GPU-s/sample | device |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rep["cost"]:
        lines.append(
            f"| {r['step']} | {_num(r.get('n_in'))} | {_num(r.get('n_out'))} | {_num(r.get('wall_s'))} | "
            f"{_num(r.get('reference_s'))} | {_num(r.get('s_per_sample'))} | "
            f"{_num(r.get('gpu_s_per_sample'))} | "
            f"{r.get('device') or '-'} |"
        )
    lines += [
        "",
        "s/sample excludes the reference work (fingerprints, hull) done once per reference set.",
        "",
        "## Metrics",
        "",
        "Rates are over each stage's input; `*_survival_of_generated` and `sun_rate*` over all samples.",
        "",
        "| metric | value |",
        "|---|---:|",
    ]
    for k, v in rep["metrics"].items():
        if isinstance(v, list | dict) or k.endswith("_wall_s"):
            continue
        lines.append(f"| {k} | {_num(v)} |")
    if rep.get("csp"):
        c = rep["csp"]
        lines += ["", "## Crystal structure prediction", ""]
        lines.append(
            f"{c['csp_n']} samples name a target; match rate {_num(c['csp_match_rate'])}, mean normalised "
            f"RMSE of the matches {_num(c['csp_rmse'])} (StructureMatcher "
            + ", ".join(f"{k}={v}" for k, v in CSP_TOLERANCES.items())
            + "; invalid samples count as unmatched)."
        )
        if "csp_match_rate_per_target" in c:
            lines.append(
                f"Per target ({c['csp_targets']} targets, best of their samples): match rate "
                f"{_num(c['csp_match_rate_per_target'])}, RMSE {_num(c['csp_rmse_per_target'])}."
            )
        if c["csp_targets_missing"]:
            lines.append(
                f"Targets not in the shard folder (left out): {', '.join(c['csp_targets_missing'])}."
            )
    lines += ["", "## Settings and tolerances", "", "| setting | value |", "|---|---|"]
    for k, v in rep["settings"].items():
        lines.append(f"| {k} | {json.dumps(_jsonable(v))} |")
    if rep["read_failures"]:
        lines += ["", "## Unreadable samples", "", "| index | file | reason |", "|---:|---|---|"]
        for f in rep["read_failures"]:
            reason = str(f["reason"]).replace("|", "/").replace("\n", " ")
            lines.append(f"| {f['index']} | {f['file'] or '-'} | {reason} |")
    if rep["plots"]:
        lines += ["", "## Plots", ""]
        titles = {
            "funnel": "Stage funnel",
            "density": "Density",
            "num_elements": "Number of elements",
            "e_hull": "Energy above hull",
        }
        for kind, name in rep["plots"].items():
            lines += [f"![{titles.get(kind, kind)}]({name})", ""]
    return "\n".join(lines).rstrip() + "\n"


# --------------------------------------------------------------------------------------------- references
#: Novelty reference choices and the splits they name.
NOVELTY_REFERENCES = ("train", "train+val", "all")


def novelty_splits(choice: str, have: Sequence[str]) -> list[str]:
    """The splits of ``have`` that the novelty reference ``choice`` (:data:`NOVELTY_REFERENCES`) names."""
    if choice not in NOVELTY_REFERENCES:
        raise EvaluationInputError(f"novelty reference {choice!r}: use one of {', '.join(NOVELTY_REFERENCES)}")
    if choice == "all":
        return list(have)
    want = ["train"] if choice == "train" else ["train", "val"]
    got = [s for s in want if s in have]
    if not got:
        return [have[0]]
    return got


def reference_key(reference: ReferenceSet) -> str:
    """A short hash of a reference set's ids and structures (cache files are named by it)."""
    import hashlib

    h = hashlib.sha1()
    for i, st in zip(reference.ids, reference.structures):
        h.update(i.encode())
        h.update(np.asarray(st.lattice.matrix, dtype=np.float32).tobytes())
        h.update(np.asarray(st.frac_coords, dtype=np.float32).tobytes())
        h.update(" ".join(str(sp) for sp in st.species).encode())
    return h.hexdigest()[:12]


def prepare_reference(
    reference_shards: str | Path,
    out_dir: str | Path,
    mlips: Sequence[str] = ("chgnet", "sevennet"),
    workers: int = 1,
    device: str | None = None,
    limit_reference: int | None = None,
    coverage: bool = True,
    hull: bool = True,
) -> dict[str, Any]:
    """Compute once what every evaluation against ``reference_shards`` reuses, into ``out_dir``.

    - the coverage reference's fingerprints (test split, else train): ``coverage_fps_<split>_<hash>.npz``, the
      hash of the structures and ids (:func:`reference_key`);
    - each MLIP's single-point energy of every crystal of every split (the hull's known phases):
      ``hull/<mlip>-<version>-<weights>.json``, one entry per crystal keyed by its id and a hash of its
      structure, read by :class:`mmmat.design.oracle.MethodHull` (so an evaluation and the design loop share it).

    Pass ``out_dir`` as ``cache_dir`` to :func:`evaluate_folder` (``--cache-dir`` on the command line).

    Returns:
        ``{"coverage_cache", "n_coverage", "hull_cache", "n_hull", "seconds": {step: s}}``.

    """
    from mmmat.design.oracle import KnownPhases, MethodHull, MLIPMethod

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    have = shard_splits(reference_shards)
    cov_split = "test" if "test" in have else ("train" if "train" in have else have[0])
    by_split = load_split_records(reference_shards, have)
    info: dict[str, Any] = {"seconds": {}}
    if coverage:
        t0 = time.perf_counter()
        recs = by_split[cov_split][:limit_reference] if limit_reference else by_split[cov_split]
        ref = ReferenceSet.from_records(recs)
        path = out / f"coverage_fps_{cov_split}_{reference_key(ref)}.npz"
        ref.fingerprints(path, workers)
        info.update(coverage_cache=str(path), n_coverage=len(ref))
        info["seconds"]["coverage_fingerprints"] = time.perf_counter() - t0
    if hull:
        recs = [r for sp in have for r in by_split[sp]]
        recs = recs[:limit_reference] if limit_reference else recs
        ref = ReferenceSet.from_records(recs)
        kp = KnownPhases(ref.structures, ref.ids)
        systems = sorted({tuple(sorted(el.symbol for el in s.composition.elements)) for s in ref.structures})
        info["n_hull"] = len(ref)
        for m in mlips:
            t0 = time.perf_counter()
            mh = MethodHull(MLIPMethod(m, device), kp, out / "hull")
            mh.ensure_many(systems)
            info.setdefault("hull_cache", {})[m] = str(mh.path)
            info["seconds"][f"hull_{m}"] = time.perf_counter() - t0
    return info


# --------------------------------------------------------------------------------------------- entry point
#: Below this many samples the default stages leave out the population metrics (:data:`POPULATION_STAGES`).
POPULATION_MIN = 100
POPULATION_STAGES = ("coverage", "distribution")


def evaluate_folder(
    generated_dir: str | Path,
    reference_shards: str | Path,
    out_json: str | Path,
    stages: Sequence[str] | None = None,
    truth: str | Path | Mapping[str, Any] | None = None,
    hull: Any = None,
    relax: bool = True,
    relax_steps: int = 500,
    workers: int = 1,
    device: str | None = None,
    limit_reference: int | None = None,
    cache_dir: str | Path | None = None,
    threads: int | None = None,
    endpoint_cache: str | Path | None = None,
    novelty_reference: str = "train",
    mlips: Sequence[str] | None = ("chgnet", "sevennet"),
    min_e_hull: float | None = FAR_BELOW_HULL,
) -> dict[str, Any]:
    """Evaluate a generated folder against a shard folder; write ``out_json``, a ``.md`` report and plots.

    Args:
        generated_dir: Folder of generated samples (see :func:`read_generated`).
        reference_shards: Shard folder written by ``mmmat data build``. Its train split is the reference for
            novelty and the hull; its test split (the train split when there is none) the one for coverage
            and distributions.
        out_json: The JSON report; ``<stem>.md`` and ``<stem>_*.png`` are written beside it.
        stages: Stage names in order (default :data:`~mmmat.evaluation.generation.DEFAULT_STAGES`, without
            coverage and distribution when there are fewer than :data:`POPULATION_MIN` samples).
        truth: Where CSP targets are looked up by material id: a shard folder, or ``{id: Structure}``
            (default: every split of ``reference_shards``). Used only when samples name a ``target_id``.
        hull: A :class:`~mmmat.evaluation.generation_stability.HullReference` or the JSON file of one;
            default: built from the reference with CHGNet (cached in ``cache_dir`` when given).
        relax: Relax samples with CHGNet in the stability stage.
        relax_steps: Most FIRE steps per relaxation.
        workers: Processes for matching, fingerprints and CHGNet relaxations.
        device: Torch device for CHGNet (default: CUDA if available).
        limit_reference: Use only the first this many reference (and coverage-reference) crystals.
        cache_dir: Folder for the coverage fingerprints and the CHGNet hull, reused by later runs.
        threads: Torch CPU threads for CHGNet (None: unchanged).
        endpoint_cache: JSON file of CHGNet-relaxed elemental end points, reused across evaluations (default:
            ``cache_dir/chgnet_endpoints.json`` when ``cache_dir`` is given).
        novelty_reference: Splits novelty is measured against: ``train`` (default), ``train+val`` or ``all``
            (stated in the report's settings).
        mlips: MLIPs of the stability stage (each relaxes every sample; stable when all agree) against a hull
            of EVERY split of ``reference_shards`` plus the shipped elemental references, cached in
            ``cache_dir`` (see :func:`prepare_reference`). None or an explicit ``hull``: the single-CHGNet hull
            of the train split.
        min_e_hull: With ``mlips``: deeper than this below an MLIP's hull (eV/atom) a sample is counted apart
            (``n_far_below_hull``), not as stable; the rates without the bound are reported as ``*_unguarded``.

    Returns:
        The report as written to ``out_json`` (JSON-ready: ``evaluate_generated``'s report without
        ``"structures"``, plus ``mode``, ``read_failures``, ``csp``, ``generation``, ``cost`` and ``plots``).

    Raises:
        EvaluationInputError: Missing or empty generated folder, missing reference shards, unknown stage.

    """
    from mmmat.evaluation.generation_stability import HullReference, reference_hull

    t_all = time.perf_counter()
    auto_stages = stages is None
    stages = list(DEFAULT_STAGES if stages is None else stages)
    unknown = [s for s in stages if s not in DEFAULT_STAGES]
    if unknown:
        raise EvaluationInputError(f"unknown stages {unknown}; known: {', '.join(DEFAULT_STAGES)}")
    out_json = Path(out_json)
    out_dir = out_json.parent
    cost: list[dict[str, Any]] = []

    t0 = time.perf_counter()
    structures, manifest = read_generated(generated_dir)
    n = len(structures)
    if auto_stages and n < POPULATION_MIN:
        stages = [s for s in stages if s not in POPULATION_STAGES]
        note(
            f"{n} samples: coverage and distribution compare populations (CDVAE uses 10,000 samples) and are "
            f"left out below {POPULATION_MIN}; name them in --stages (`stages=` in Python) to run them anyway"
        )
    cost.append(
        {
            "step": "read samples",
            "n_in": n,
            "n_out": n - len(manifest["read_failures"]),
            "wall_s": time.perf_counter() - t0,
            "device": "cpu",
        }
    )

    t0 = time.perf_counter()
    have = shard_splits(reference_shards)
    nov_splits = novelty_splits(novelty_reference, have)
    ref_split = "+".join(nov_splits)
    cov_split = "test" if "test" in have else nov_splits[0]
    use_mlips = bool(mlips) and hull is None and "stability" in stages
    wanted = set(nov_splits) | {cov_split} | (set(have) if use_mlips else set())
    by_split = load_split_records(reference_shards, sorted(wanted))
    ref_recs = [r for sp in nov_splits for r in by_split[sp]]
    ref_recs = ref_recs[:limit_reference] if limit_reference else ref_recs
    cov_recs = by_split[cov_split][:limit_reference] if limit_reference else by_split[cov_split]
    if not ref_recs:
        raise EvaluationInputError(f"{reference_shards}: no readable records in split(s) {ref_split!r}")
    reference = ReferenceSet.from_records(ref_recs)
    cov_reference = reference if [cov_split] == nov_splits else ReferenceSet.from_records(cov_recs)
    hull_reference = None
    if use_mlips:
        hull_recs = [r for sp in have for r in by_split[sp]]
        hull_reference = ReferenceSet.from_records(hull_recs[:limit_reference] if limit_reference else hull_recs)
    cost.append(
        {
            "step": "load reference",
            "n_in": sum(len(v) for v in by_split.values()),
            "wall_s": time.perf_counter() - t0,
            "device": "cpu",
        }
    )

    cache = Path(cache_dir) if cache_dir is not None else None
    if endpoint_cache is None and cache is not None:
        endpoint_cache = cache / "chgnet_endpoints.json"
    fp_cache = cache / f"coverage_fps_{cov_split}_{reference_key(cov_reference)}.npz" if cache is not None else None
    if "stability" in stages and not use_mlips:
        t0 = time.perf_counter()
        if hull is None and cache is not None:
            hull = reference_hull(
                reference.structures,
                reference.ids,
                cache=cache / f"chgnet_hull_{ref_split}.json",
                device=device,
                threads=threads,
                endpoint_steps=relax_steps,
                endpoint_cache=endpoint_cache,
            )
        elif hull is not None and not isinstance(hull, HullReference):
            hp = Path(hull)
            if not hp.is_file():
                raise EvaluationInputError(f"hull file {hp} not found")
            hull = HullReference.load(hp)
        if hull is not None:
            cost.append(
                {
                    "step": "hull reference",
                    "n_in": len(hull),
                    "wall_s": time.perf_counter() - t0,
                    "device": device or "auto",
                }
            )

    res = evaluate_generated(
        structures,
        reference,
        stages,
        coverage_reference=cov_reference,
        hull=hull,
        relax=relax,
        relax_steps=relax_steps,
        device=device,
        threads=threads,
        workers=workers,
        fingerprint_cache=fp_cache,
        endpoint_cache=endpoint_cache,
        mlips=list(mlips) if use_mlips else None,
        hull_reference=hull_reference,
        hull_cache=cache / "hull" if cache is not None else None,
        min_e_hull=min_e_hull,
    )
    res.pop("structures", None)
    metrics = dict(res["metrics"])

    csp: dict[str, Any] | None = None
    if any(e.get("target_id") not in (None, "") for e in manifest["samples"]):
        t0 = time.perf_counter()
        if truth is None:
            rest = [n for n in have if n not in by_split]
            recs = [
                r
                for v in [*by_split.values(), *load_split_records(reference_shards, rest).values()]
                for r in v
            ]
        elif not isinstance(truth, Mapping):
            recs = [r for v in load_split_records(truth).values() for r in v]
        if isinstance(truth, Mapping):
            truth_map: Mapping[str, Any] = truth
        else:
            wanted = {
                str(e["target_id"]) for e in manifest["samples"] if e.get("target_id") not in (None, "")
            }
            truth_map = {r.material_id: r.to_structure() for r in recs if r.material_id in wanted}
        csp = _csp(structures, manifest["samples"], truth_map, workers)
        metrics.update({k: v for k, v in csp.items() if k.startswith("csp_") and k != "csp_targets_missing"})
        wall = time.perf_counter() - t0
        cost.append(
            {
                "step": "csp matching",
                "n_in": csp["csp_n"],
                "wall_s": wall,
                "s_per_sample": wall / csp["csp_n"] if csp["csp_n"] else math.nan,
                "device": "cpu",
            }
        )

    gen = dict(manifest.get("generation") or {})
    gen_rows: list[dict[str, Any]] = []
    if gen:
        wall, gpu = gen.get("wall_s"), gen.get("gpu_s")
        gen_rows.append(
            {
                "step": "generation",
                "n_out": n,
                "wall_s": wall,
                "s_per_sample": wall / n if isinstance(wall, int | float) and n else None,
                "gpu_s_per_sample": gpu / n if isinstance(gpu, int | float) and n else None,
                "device": gen.get("device"),
            }
        )
    stage_rows = [
        {
            "step": s["stage"],
            "n_in": s["n_in"],
            "n_out": s["n_out"],
            "wall_s": s["wall_s"],
            "s_per_sample": s["s_per_sample"],
            "gpu_s_per_sample": s["gpu_s_per_sample"],
            "device": s["device"],
            "reference_s": s["reference_s"],
        }
        for s in res["stages"]
    ]
    cost = gen_rows + cost[:2] + stage_rows + cost[2:]

    settings = dict(res["settings"])
    settings.update(
        novelty_reference=novelty_reference,
        novelty_reference_splits=nov_splits,
        hull_reference_splits=list(have) if use_mlips else [nov_splits[0]],
        reference_split=ref_split,
        coverage_reference_split=cov_split,
        limit_reference=limit_reference,
        csp_tolerances=dict(CSP_TOLERANCES),
        min_distance_A=MIN_DISTANCE,
        min_volume_A3=MIN_VOLUME,
        workers=workers,
    )
    per_sample = dict(res["per_sample"])
    per_sample["file"] = [e.get("file") for e in manifest["samples"]]
    per_sample["target_id"] = [e.get("target_id") for e in manifest["samples"]]
    if csp is not None:
        per_sample["csp_rms"] = csp.pop("rms_per_sample")

    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_json.stem
    ehull = res["per_sample"].get("e_above_hull", []) if "stability" in stages else None
    plots = _plots(
        out_dir,
        stem,
        n,
        res["stages"],
        structures,
        cov_reference.structures,
        f"reference ({cov_split})",
        ehull,
    )
    rep: dict[str, Any] = {
        "generated_dir": str(generated_dir),
        "reference_shards": str(reference_shards),
        "mode": manifest.get("mode", "de_novo"),
        "n_generated": n,
        "n_read_failed": len(manifest["read_failures"]),
        "read_failures": manifest["read_failures"],
        "stages": res["stages"],
        "metrics": metrics,
        "csp": csp,
        "survivors": res["survivors"],
        "per_sample": per_sample,
        "settings": settings,
        "generation": gen,
        "cost": cost,
        "plots": plots,
        "report_md": out_json.with_suffix(".md").name,
        "evaluation_wall_s": time.perf_counter() - t_all,
    }
    rep = _jsonable(rep)
    out_json.write_text(json.dumps(rep, indent=1, allow_nan=False))
    out_json.with_suffix(".md").write_text(_markdown(rep))
    return rep


__all__ = [
    "NOVELTY_REFERENCES",
    "novelty_splits",
    "prepare_reference",
    "reference_key",
    "EXTXYZ_NAME",
    "MANIFEST_NAME",
    "EvaluationInputError",
    "evaluate_folder",
    "load_split_records",
    "shard_splits",
    "read_generated",
]
