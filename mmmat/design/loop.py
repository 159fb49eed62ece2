"""The closed design loop: propose, screen, select, verify, learn; repeated, with every guard measured.

See :func:`run`. Each round:

1. propose: generator samples (when a generator folder is configured), template substitutions, mutations of
   the best candidates so far;
2. screen: minimum interatomic distance, charge balance (SMACT), the chemical family, single-element and
   implausible-density cells, duplicates of anything seen before (pymatgen StructureMatcher within each reduced
   formula), matches to known phases (not novel); the survivors get surrogate predictions with an uncertainty,
   an embedding and a distance to the training data;
3. select: the configured acquisition under the remaining oracle budget;
4. verify: the oracle, each result committed to the ledger as it arrives;
5. judge and learn: guard flags and hits; the surrogate is fine-tuned on the oracle's labels.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mmmat.design.config import DesignConfig, load_config
from mmmat.design.ledger import Ledger
from mmmat.design.oracle import KnownPhases, build_oracle
from mmmat.design.propose import default_allowed, generator_proposals, in_family, mutations, template_proposals
from mmmat.design.select import gp_inputs, select, violation
from mmmat.design.surrogate import EnsembleSurrogate, PropertyModelSurrogate, nearest_distance, ood_threshold

#: Guard flags that stop a verified candidate from counting as a hit (``sparse_hull`` only when configured;
#: ``ood`` never: it is counted, and acted on at selection).
BLOCKING = ("oracle_error", "unstable", "far_below_hull", "methods_disagree", "single_element", "implausible_density",
            "large_rmsd", "off_target", "not_novel", "duplicate_hit")
#: Screening rejections, in the order they are checked.
SCREEN_REASONS = ("invalid_distance", "invalid_charge", "outside_family", "single_element", "implausible_density",
                  "duplicate_seen", "known_phase")
log = logging.getLogger("mmmat.design")
MATCH_TOL = {"ltol": 0.2, "stol": 0.3, "angle_tol": 5.0}


class DesignError(ValueError):
    """A design run that cannot start or resume; the message says why."""


# ------------------------------------------------------------------------------------------- data
def _cache_key(data) -> str:
    import hashlib

    files = []
    if data.root:
        for f in sorted(Path(data.root).glob("*.csv*")):
            st = f.stat()
            files.append([f.name, st.st_size, int(st.st_mtime)])
    doc = [data.source, str(Path(data.root).resolve()) if data.root else None, data.limit, files, 1]
    return hashlib.sha1(json.dumps(doc).encode()).hexdigest()[:16]


def _save_structures(path: Path, entries: dict[str, tuple[Any, str, dict]]) -> None:
    ids, lat, counts, z, frac, props = [], [], [], [], [], []
    for mid, (s, _, p) in entries.items():
        if s is None:
            continue
        ids.append(mid)
        lat.append(s.lattice.matrix)
        counts.append(len(s))
        z.extend(site.specie.Z for site in s)
        frac.append(s.frac_coords)
        props.append(p)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, ids=np.asarray(ids), lattice=np.asarray(lat), counts=np.asarray(counts),
                        z=np.asarray(z), frac=np.concatenate(frac) if frac else np.zeros((0, 3)),
                        props=np.asarray(json.dumps(props, default=float)))
    tmp.replace(path)


def _load_structures(path: Path) -> dict[str, tuple[Any, str, dict]]:
    from pymatgen.core import Lattice, Structure

    with np.load(path, allow_pickle=False) as z:
        d = {k: z[k] for k in z.files}  # read each array once
    props = json.loads(str(d["props"]))
    out = {}
    off = np.concatenate([[0], np.cumsum(d["counts"])])
    for i, mid in enumerate(d["ids"]):
        a, b = off[i], off[i + 1]
        s = Structure(Lattice(d["lattice"][i]), d["z"][a:b].tolist(), d["frac"][a:b])
        out[str(mid)] = (s, str(mid), props[i])
    return out


def load_reference(data) -> dict[str, Any]:
    """Known phases, surrogate training rows and templates of a :class:`~mmmat.design.config.DataConfig`."""
    from mmmat.data.reference import read_reference, row_structure
    from mmmat.data.schema import RecordError

    if data.source == "mp20":
        if not data.root:
            raise DesignError("data.root must name the mp_20 folder for source mp20")
        src = read_reference("mp20", data.root, limit=data.limit)
    elif data.source == "builtin":
        src = read_reference("builtin", limit=data.limit)
    else:
        raise DesignError(f"data.source must be mp20 or builtin, got {data.source!r}")
    cache: dict[str, tuple[Any, str, dict]] = {}
    cache_file = Path(data.cache) / f"structures_{data.source}_{_cache_key(data)}.npz" if data.cache else None
    if cache_file is not None and cache_file.exists():
        cache.update(_load_structures(cache_file))

    def rows(splits: Sequence[str]) -> list[tuple[Any, str, dict]]:
        out = []
        for sp in splits:
            if sp not in src.splits:
                raise DesignError(f"data: split {sp!r} not in {sorted(src.splits)}")
            for r in src.splits[sp]:
                if r.material_id not in cache:
                    try:
                        s = row_structure(r)
                    except RecordError:  # an unreadable reference row is skipped and counted
                        cache[r.material_id] = (None, r.material_id, {})
                        continue
                    cache[r.material_id] = (s, r.material_id, dict(r.properties))
                if cache[r.material_id][0] is not None:
                    out.append(cache[r.material_id])
        return out

    known = rows(data.known_splits)
    train = rows(data.train_splits)
    templates = rows(data.template_splits or data.train_splits)
    skipped = sum(v[0] is None for v in cache.values())
    if cache_file is not None and not cache_file.exists():
        _save_structures(cache_file, cache)
    return {
        "known": KnownPhases([s for s, _, _ in known], [i for _, i, _ in known]),
        "train": train,
        "templates": [(s, i) for s, i, _ in templates],
        "skipped": skipped,
    }


def _labels(rows: Sequence[tuple[Any, str, dict]], targets: Sequence[str]) -> np.ndarray:
    y = np.full((len(rows), len(targets)), np.nan)
    for i, (_, _, p) in enumerate(rows):
        for k, t in enumerate(targets):
            v = p.get(t)
            try:
                y[i, k] = float(v) if v is not None else np.nan
            except (TypeError, ValueError):
                y[i, k] = np.nan
    return y


def build_surrogate(cfg: DesignConfig, train: Sequence[tuple[Any, str, dict]], features: np.ndarray | None = None):
    """The configured surrogate, trained (ensemble) or loaded (property models) and ready to predict.

    ``features``: precomputed :func:`~mmmat.design.surrogate.crystal_features` of ``train`` (ensemble only).
    """
    sc = cfg.surrogate
    rng = np.random.default_rng(cfg.seed)
    rows = list(train)
    sel = np.arange(len(rows))
    if sc.max_train and len(rows) > sc.max_train:
        sel = np.sort(rng.permutation(len(rows))[: sc.max_train])
        rows = [rows[i] for i in sel]
    if sc.kind == "ensemble":
        y = _labels(rows, sc.targets)
        keep = np.isfinite(y).any(1)
        feats = None if features is None else np.asarray(features)[sel][keep]
        rows = [r for r, k in zip(rows, keep) if k]
        return EnsembleSurrogate(sc.targets, sc.members, sc.hidden, sc.epochs, sc.finetune_epochs, cfg.seed).fit(
            [s for s, _, _ in rows], y[keep], feats
        )
    import torch

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    return PropertyModelSurrogate(sc.paths, sc.targets, sc.finetune_epochs, [s for s, _, _ in rows], dev, cfg.seed)


# ------------------------------------------------------------------------------------------- helpers
def _structure(cif: str):
    from pymatgen.core import Structure

    return Structure.from_str(cif, fmt="cif")


def _matches(a, others: Sequence[Any]) -> bool:
    from pymatgen.analysis.structure_matcher import StructureMatcher

    sm = StructureMatcher(**MATCH_TOL)
    for b in others:
        try:
            if sm.fit(a, b):
                return True
        except Exception:  # noqa: BLE001 - a pair the matcher cannot process is no match
            continue
    return False


def prototype(structure) -> str:
    """Prototype label: anonymized formula and space-group number (spglib, symprec 0.1 Å)."""
    from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

    try:
        sg = SpacegroupAnalyzer(structure, symprec=0.1).get_space_group_number()
    except Exception:  # noqa: BLE001 - spglib failure: unknown space group
        sg = 0
    return f"{structure.composition.anonymized_formula}_{sg}"


def _objective_values(cfg: DesignConfig, row: dict) -> np.ndarray:
    """Objective values of a verified row: oracle values where measured (worst method), else surrogate means."""
    vals = np.full(len(cfg.objectives), np.nan)
    sur = row.get("surrogate") or {}
    orc = row.get("oracle") or {}
    for k, o in enumerate(cfg.objectives):
        if o.oracle == "e_hull":
            eh = [v for v in (orc.get("e_hull") or {}).values() if v is not None]
            # deeper than guards.min_e_hull is a hull gap, not a better candidate: no reward beyond it
            vals[k] = max(max(eh), cfg.guards.min_e_hull) if eh else np.nan
        elif o.oracle and o.oracle in (orc.get("properties") or {}):
            vals[k] = orc["properties"][o.oracle]
        elif o.surrogate and o.surrogate in sur.get("mean", {}):
            vals[k] = sur["mean"][o.surrogate]
    return vals


#: Upper bound of the e_hull labels the surrogate learns from (eV/atom): a relaxation that blew up (one MLIP put
#: a crystal 1,226 eV/atom above its hull) would otherwise dominate the surrogate's loss; above 1 eV/atom a
#: crystal is far from stable whatever the exact figure.
E_HULL_LABEL_MAX = 1.0


def _oracle_label(cfg: DesignConfig, orc: dict, target: str) -> float:
    """The oracle's label for a surrogate target, NaN when it gives none.

    For e_hull: the mean over methods, within [``guards.min_e_hull``, :data:`E_HULL_LABEL_MAX`].
    """
    for o in cfg.objectives:
        if o.surrogate == target and o.oracle:
            if o.oracle == "e_hull":
                eh = [v for v in (orc.get("e_hull") or {}).values() if v is not None]
                return float(np.clip(np.mean(eh), cfg.guards.min_e_hull, E_HULL_LABEL_MAX)) if eh else math.nan
            v = (orc.get("properties") or {}).get(o.oracle)
            return math.nan if v is None else float(v)
    return math.nan


# ------------------------------------------------------------------------------------------- the loop
#: Config keys that change how the work is done, not its results: a run may resume with others.
EXECUTION_KEYS = {"oracle": ("workers", "batch")}


def _results_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """The config without :data:`EXECUTION_KEYS` (what a resumed run must share with the ledger's)."""
    out = json.loads(json.dumps(cfg))
    for section, keys in EXECUTION_KEYS.items():
        for k in keys:
            (out.get(section) or {}).pop(k, None)
    return out


class DesignLoop:
    """One design run over a folder; :meth:`run` goes round by round, resuming from the ledger."""

    def __init__(self, config: str | Path | dict | DesignConfig, resume: bool = False,
                 reference: dict[str, Any] | None = None):
        self.cfg = load_config(config)
        self._reference = reference
        self.out = Path(self.cfg.out)
        ledger_path = self.out / "ledger.sqlite"
        if ledger_path.exists() and not resume:
            raise DesignError(f"{ledger_path} exists: resume it with --resume or choose another out folder")
        if resume and not ledger_path.exists():
            raise DesignError(f"nothing to resume: {ledger_path} does not exist")
        self.out.mkdir(parents=True, exist_ok=True)
        self.ledger = Ledger(ledger_path)
        stored = self.ledger.get_meta("config")
        mine = json.loads(json.dumps(self.cfg.to_dict()))
        a, b = _results_config(mine), _results_config(stored) if stored is not None else None
        if b is not None and a != b:
            diff = sorted(k for k in a if a[k] != b.get(k))
            raise DesignError(f"{ledger_path} was written with another config (differs in {diff})")
        self.ledger.set_meta("config", mine)
        (self.out / "config.json").write_text(json.dumps(mine, indent=1))
        self.log: list[str] = []

    # ---------------------------------------------------------------- setup
    def _setup(self) -> None:
        t0 = time.perf_counter()
        self.ref = self._reference or load_reference(self.cfg.data)
        self.known: KnownPhases = self.ref["known"]
        allowed = self.cfg.chemistry.allowed or default_allowed(self.known.elements())
        self.allowed = sorted(allowed)
        t1 = time.perf_counter()
        self.surrogate = build_surrogate(self.cfg, self.ref["train"], self.ref.get("train_features"))
        self.ood_thr = ood_threshold(self.surrogate.train_embeddings(), self.cfg.guards.ood_quantile, self.cfg.seed)
        t2 = time.perf_counter()
        cache = self.cfg.oracle.cache or str(self.out.parent / "hull_cache")
        self.oracle = build_oracle(self.cfg.oracle, self.known, cache)
        log.info("setup: reference %.1f s, surrogate %.1f s", t1 - t0, t2 - t1)
        self.setup_seconds = {"reference": t1 - t0, "surrogate": t2 - t1, "oracle_setup": time.perf_counter() - t2}
        self.generator = None
        g = self.cfg.propose.generator
        if g.path and g.n > 0:
            from mmmat.generative.api import load_generator

            self.generator = load_generator(g.path, g.device)
        # everything proposed before (resume): the dedup buckets
        self.seen: dict[str, list[Any]] = {}
        for r in self.ledger.candidates("reject_reason IS NULL OR reject_reason IN ('duplicate_seen', 'known_phase')"):
            self.seen.setdefault(r["formula"], []).append(_structure(r["cif"]))

    def _targets(self) -> list[str]:
        return list(self.cfg.surrogate.targets)

    # ---------------------------------------------------------------- propose + screen
    def _propose(self, r: int) -> tuple[list[tuple[Any, str, str | None]], dict[str, float]]:
        cfg, p = self.cfg, self.cfg.propose
        rng = np.random.default_rng([cfg.seed, r])
        out: list[tuple[Any, str, str | None]] = []
        secs = {"generation": 0.0, "templates": 0.0, "mutations": 0.0}
        if self.generator is not None:
            t = time.perf_counter()
            targets = self.ledger.get_meta(f"generator_targets_{r}") or dict(p.generator.targets)
            self.ledger.set_meta(f"generator_targets_{r}", targets)
            for s in generator_proposals(self.generator, p.generator.n, targets, p.generator.guidance,
                                         p.generator.steps, cfg.seed * 1000 + r):
                if s is not None:
                    out.append((s, "generator", None))
            secs["generation"] = time.perf_counter() - t
        t = time.perf_counter()
        for s, tid in template_proposals(self.ref["templates"], p.templates, self.allowed, cfg.chemistry, rng,
                                         p.similarity_width):
            out.append((s, "template", tid))
        secs["templates"] = time.perf_counter() - t
        t = time.perf_counter()
        parents = self._parents()
        for s, pid in mutations(parents, p.mutations, self.allowed, cfg.chemistry, rng, p.max_strain,
                                p.strain_share, p.similarity_width):
            out.append((s, "mutation", pid))
        secs["mutations"] = time.perf_counter() - t
        return out, secs

    def _parents(self) -> list[tuple[Any, str]]:
        rows = self.ledger.candidates("status = 'verified'")
        if not rows:
            return []
        scored = []
        suspect = ("far_below_hull", "methods_disagree", "single_element", "implausible_density", "large_rmsd",
                   "oracle_error")
        for row in rows:
            if any((row.get("guards") or {}).get(k) for k in suspect):
                continue  # a guard caught it: not a parent
            v = violation(_objective_values(self.cfg, row)[None], self.cfg.objectives)[0]
            cif = (row.get("oracle") or {}).get("relaxed_cif") or row["cif"]
            scored.append((-int(row["is_hit"]), v, row["id"], cif))
        scored.sort()
        return [(_structure(c), i) for _, _, i, c in scored[: self.cfg.propose.parents]]

    def _screen(self, proposals, r: int) -> list[dict]:
        from mmmat.evaluation.generation import compositional_validity, structural_validity

        g = self.cfg.guards
        rows: list[dict] = []
        survivors: list[int] = []
        structs: list[Any] = []
        for k, (s, source, parent) in enumerate(proposals):
            row = {"id": f"r{r:03d}-{source[:3]}-{k:05d}", "round": r, "source": source, "parent": parent,
                   "formula": s.composition.reduced_formula, "cif": s.to(fmt="cif"), "status": "rejected",
                   "reject_reason": None}
            reason = None
            density = float(s.density) if s.volume > 0 else math.inf
            if not structural_validity(s, cutoff=g.min_distance):
                reason = "invalid_distance"
            elif not compositional_validity(s):
                reason = "invalid_charge"
            elif in_family(s, self.cfg.chemistry):
                reason = "outside_family"
            elif len(s.composition.elements) == 1:
                reason = "single_element"
            elif not g.density_range[0] <= density <= g.density_range[1]:
                reason = "implausible_density"
            elif _matches(s, self.seen.get(row["formula"], [])):
                reason = "duplicate_seen"
            elif _matches(s, [self.known.structures[i] for i in self.known.by_formula.get(row["formula"], [])]):
                reason = "known_phase"
            if reason in (None, "duplicate_seen", "known_phase"):
                self.seen.setdefault(row["formula"], []).append(s)
            row["reject_reason"] = reason
            if reason is None:
                row["status"] = "screened"
                survivors.append(len(rows))
                structs.append(s)
            rows.append(row)
        pred = self.surrogate.predict(structs)
        dist = nearest_distance(pred["embedding"], self.surrogate.train_embeddings())
        for j, i in enumerate(survivors):
            rows[i]["surrogate"] = {
                "mean": {t: float(pred["mean"][j, k]) for k, t in enumerate(self._targets())},
                "std": {t: float(pred["std"][j, k]) for k, t in enumerate(self._targets())},
                "disagreement": {t: float(pred["disagreement"][j, k]) for k, t in enumerate(self._targets())},
            }
            rows[i]["embedding"] = [round(float(x), 5) for x in pred["embedding"][j]]
            rows[i]["ood_distance"] = float(dist[j])
        return rows

    # ---------------------------------------------------------------- select
    def _objective_arrays(self, rows: Sequence[dict]) -> tuple[np.ndarray, np.ndarray]:
        mean = np.full((len(rows), len(self.cfg.objectives)), np.nan)
        std = np.zeros_like(mean)
        for i, row in enumerate(rows):
            for k, o in enumerate(self.cfg.objectives):
                if o.surrogate:
                    mean[i, k] = row["surrogate"]["mean"][o.surrogate]
                    std[i, k] = row["surrogate"]["std"][o.surrogate]
        return mean, std

    def _select(self, r: int, k: int) -> str:
        cfg = self.cfg
        rows = self.ledger.candidates("round = ? AND status = 'screened'", (r,))
        if not rows or k <= 0:
            self.ledger.mark_selected([], r)
            return "none"
        mean, std = self._objective_arrays(rows)
        emb = np.asarray([row["embedding"] for row in rows], dtype=float)
        ood = np.asarray([row["ood_distance"] for row in rows]) > self.ood_thr
        penalty = None
        if cfg.guards.ood_action == "penalize":
            penalty = cfg.guards.ood_penalty * ood
        elif cfg.guards.ood_action == "exclude":
            penalty = np.where(ood, np.inf, 0.0)
        labelled = None
        if cfg.select.strategy == "qei":
            done = [x for x in self.ledger.candidates("status = 'verified'") if x.get("embedding")]
            if done:
                m2, s2 = self._objective_arrays(done)
                x = gp_inputs(np.asarray([d["embedding"] for d in done], dtype=float), m2, s2)
                y = np.asarray([-violation(_objective_values(cfg, d)[None], cfg.objectives)[0] for d in done])
                ok = np.isfinite(y)
                labelled = (x[ok], y[ok])
        if cfg.select.strategy == "qei" and penalty is not None and int((~ood).sum()) >= k:
            # the GP acquisition takes no penalty: out-of-distribution candidates leave the choice set instead
            penalty = np.where(ood, np.inf, 0.0)
        if penalty is not None and np.isinf(penalty).any():
            keep = np.flatnonzero(~np.isinf(penalty))
            sub, vals, used = select(cfg.select.strategy, k, mean[keep], std[keep], emb[keep], cfg.objectives,
                                     np.random.default_rng([cfg.seed, r, 7]), cfg.select.kappa, None, labelled,
                                     cfg.select.max_choices, cfg.seed + r)
            picks = [int(keep[i]) for i in sub]
        else:
            picks, vals, used = select(cfg.select.strategy, k, mean, std, emb, cfg.objectives,
                                       np.random.default_rng([cfg.seed, r, 7]), cfg.select.kappa, penalty, labelled,
                                       cfg.select.max_choices, cfg.seed + r)
        self.ledger.mark_selected([(rows[i]["id"], float(v)) for i, v in zip(picks, vals)], r)
        self.ledger.set_meta(f"strategy_used_{r}", used)
        return used

    # ---------------------------------------------------------------- verify
    def _verify(self, r: int) -> None:
        pending = self.ledger.candidates("round = ? AND status = 'selected'", (r,))
        # oracle calls of the size the oracle does best (a GPU relaxes a whole round in one batch); the ledger is
        # written after each, so a kill costs at most the unfinished call
        size = self.cfg.oracle.batch if self.cfg.oracle.batch is not None else getattr(self.oracle, "batch_size", 1)
        chunk = max(1, len(pending) if size <= 0 else size)
        for lo in range(0, len(pending), chunk):
            part = pending[lo : lo + chunk]
            results = self.oracle.evaluate([_structure(p["cif"]) for p in part])
            log.debug("oracle: %s done", [p["id"] for p in part])
            for p, res in zip(part, results):
                self.ledger.set_oracle(p["id"], res)

    # ---------------------------------------------------------------- judge
    def _judge(self, r: int) -> None:
        cfg, g = self.cfg, self.cfg.guards
        hits_before = [(_structure(h["oracle"]["relaxed_cif"]), h["formula"])
                       for h in self.ledger.candidates("is_hit = 1 AND round < ?", (r,))]
        for row in self.ledger.candidates("round = ? AND status = 'verified'", (r,)):
            orc = row["oracle"]
            flags = dict.fromkeys(BLOCKING + ("ood", "sparse_hull"), False)
            relaxed = _structure(orc["relaxed_cif"]) if orc.get("relaxed_cif") else _structure(row["cif"])
            eh = orc.get("e_hull") or {}
            vals = [v for v in eh.values() if v is not None]
            flags["oracle_error"] = bool(orc.get("error")) or len(vals) < len(self.oracle.methods)
            flags["far_below_hull"] = bool(vals) and min(vals) < g.min_e_hull
            if vals and max(vals) - min(vals) > g.method_tolerance:
                flags["methods_disagree"] = True
            for o in cfg.objectives:
                if o.oracle == "e_hull":
                    if any((o.max is not None and v > o.max) or (o.min is not None and v < o.min) for v in vals):
                        flags["unstable"] = True
            ov = _objective_values(cfg, row)
            other = [o for o in cfg.objectives if o.oracle != "e_hull"]
            if other:
                idx = [cfg.objectives.index(o) for o in other]
                if violation(ov[idx][None], other)[0] > 0:
                    flags["off_target"] = True
            flags["single_element"] = len(relaxed.composition.elements) == 1
            d = float(relaxed.density)
            flags["implausible_density"] = not g.density_range[0] <= d <= g.density_range[1]
            rm = list((orc.get("rmsd") or {}).values())
            flags["large_rmsd"] = any(x is None or x > g.max_rmsd for x in rm)
            flags["sparse_hull"] = int(orc.get("n_known_phases", 0)) < g.min_known_phases
            flags["ood"] = bool(row.get("ood_distance") is not None and row["ood_distance"] > self.ood_thr)
            f = relaxed.composition.reduced_formula
            flags["not_novel"] = _matches(relaxed, [self.known.structures[i] for i in self.known.by_formula.get(f, [])])
            blocking = [k for k in BLOCKING if flags[k]] + (["sparse_hull"] if g.sparse_hull_blocks and
                                                             flags["sparse_hull"] else [])
            if not blocking:
                flags["duplicate_hit"] = _matches(relaxed, [h for h, hf in hits_before if hf == f])
            is_hit = not blocking and not flags["duplicate_hit"]
            if is_hit:
                hits_before.append((relaxed, f))
            self.ledger.set_verdict(row["id"], flags, is_hit)

    # ---------------------------------------------------------------- learn
    def _learn(self, r: int) -> None:
        rows = self.ledger.candidates("round = ? AND status = 'verified'", (r,))
        if not rows:
            return
        y = np.asarray([[_oracle_label(self.cfg, row["oracle"], t) for t in self._targets()] for row in rows])
        if not np.isfinite(y).any():
            return
        keep = np.isfinite(y).any(1)
        self.surrogate.update([_structure(row["cif"]) for row, k in zip(rows, keep) if k], y[keep])
        # the distance-to-data guard measures in the surrogate's embedding, which the update may have moved
        self.ood_thr = ood_threshold(self.surrogate.train_embeddings(), self.cfg.guards.ood_quantile, self.cfg.seed)
        g = self.cfg.propose.generator
        if self.generator is not None and g.reweight > 0:
            hits = self.ledger.candidates("is_hit = 1")
            cur = self.ledger.get_meta(f"generator_targets_{r}") or dict(g.targets)
            new = dict(cur)
            for name in cur:
                vals = [h["surrogate"]["mean"].get(name) for h in hits if h.get("surrogate")]
                vals = [v for v in vals if v is not None]
                if vals:
                    new[name] = (1 - g.reweight) * cur[name] + g.reweight * float(np.mean(vals))
            if self.ledger.get_meta(f"generator_targets_{r + 1}") is None:
                self.ledger.set_meta(f"generator_targets_{r + 1}", new)

    # ---------------------------------------------------------------- stats
    def _stats(self, r: int, seconds: dict[str, float], used: str) -> dict[str, Any]:
        cfg = self.cfg
        allr = self.ledger.candidates("round = ?", (r,))
        picks = [x for x in allr if x["status"] == "verified"]
        hits_all = self.ledger.candidates("is_hit = 1")
        guards: dict[str, int] = {k: 0 for k in SCREEN_REASONS}
        for x in allr:
            if x["reject_reason"]:
                guards[x["reject_reason"]] = guards.get(x["reject_reason"], 0) + 1
        for k in BLOCKING + ("ood", "sparse_hull"):
            guards[k] = sum(bool((x.get("guards") or {}).get(k)) for x in picks)
        errs, dis = [], []
        for x in picks:
            for t in self._targets():
                lab = _oracle_label(cfg, x["oracle"], t)
                if np.isfinite(lab) and x.get("surrogate"):
                    errs.append(abs(x["surrogate"]["mean"][t] - lab))
            if x.get("surrogate"):
                dis.append(float(np.mean(list(x["surrogate"]["disagreement"].values()))))
        ood = [bool((x.get("guards") or {}).get("ood")) for x in picks]
        protos = set()
        for h in hits_all:
            protos.add(prototype(_structure(h["oracle"]["relaxed_cif"])))
        coverage = {}
        for k, o in enumerate(cfg.objectives):
            if o.min is not None and o.max is not None and o.max > o.min:
                vals = [_objective_values(cfg, h)[k] for h in hits_all]
                bins = {int(min(9, max(0, (v - o.min) / (o.max - o.min) * 10))) for v in vals if np.isfinite(v)}
                coverage[o.name] = len(bins) / 10
        prev = self.ledger.round_stats()
        cum_calls = sum(s["oracle_calls"] for s in prev if s["round"] < r) + len(picks)
        hits_r = sum(int(x["is_hit"]) for x in picks)
        return {
            "round": r,
            "oracle_calls": len(picks),
            "cumulative_oracle_calls": cum_calls,
            "hits": hits_r,
            "cumulative_hits": len(hits_all),
            "guards": guards,
            "surrogate_mae": float(np.mean(errs)) if errs else None,
            "disagreement": float(np.mean(dis)) if dis else None,
            "ood_share": float(np.mean(ood)) if ood else None,
            "unique_compositions": len({h["formula"] for h in hits_all}),
            "unique_prototypes": len(protos),
            "coverage": coverage,
            "proposed": {s: sum(x["source"] == s for x in allr) for s in ("generator", "template", "mutation")},
            "screened": sum(x["status"] != "rejected" for x in allr),
            "strategy_used": used,
            "seconds": seconds,
        }

    # ---------------------------------------------------------------- run
    def run(self) -> dict[str, Any]:
        """Run (or resume) every round, then write the report; returns report.json's content."""
        from mmmat.design.report import write_report

        self._setup()
        cfg = self.cfg
        try:
            for r in range(cfg.rounds):
                phase = self.ledger.phase(r)
                if phase == "done":
                    self._learn(r)  # replay the surrogate's fine-tuning on the round's labels
                    continue
                spent = self.ledger.count("status IN ('verified', 'selected')")
                if spent >= cfg.budget and phase is None:
                    break
                sec: dict[str, float] = {}
                if phase is None:
                    t = time.perf_counter()
                    proposals, psec = self._propose(r)
                    sec.update(psec)
                    t2 = time.perf_counter()
                    rows = self._screen(proposals, r)
                    self.ledger.add_candidates(rows, replace_round=r)
                    self.ledger.set_phase(r, "screened")
                    log.info("round %d: %d proposed, %d screened in", r, len(rows),
                             sum(x["status"] == "screened" for x in rows))
                    sec["screening"] = time.perf_counter() - t2
                    sec["proposal"] = t2 - t
                    phase = "screened"
                if phase == "screened":
                    t = time.perf_counter()
                    k = min(cfg.select.per_round, cfg.budget - self.ledger.count("status IN ('verified', 'selected')"))
                    self._select(r, k)
                    sec["selection"] = time.perf_counter() - t
                    phase = "selected"
                used = self.ledger.get_meta(f"strategy_used_{r}") or cfg.select.strategy
                if phase == "selected":
                    t = time.perf_counter()
                    self._verify(r)
                    log.info("round %d: oracle %.1f s", r, time.perf_counter() - t)
                    sec["oracle"] = time.perf_counter() - t
                    self.ledger.set_phase(r, "verified")
                t = time.perf_counter()
                self._judge(r)
                sec["judging"] = time.perf_counter() - t
                t = time.perf_counter()
                self._learn(r)
                sec["learning"] = time.perf_counter() - t
                sec["total"] = sum(v for k, v in sec.items() if k not in ("templates", "mutations", "generation"))
                self.ledger.set_phase(r, "done", self._stats(r, sec, used))
        finally:
            self.oracle.close()
        return write_report(self)


def run(config: str | Path | dict | DesignConfig, resume: bool = False,
        reference: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run a design loop from a config (YAML path, dict or :class:`DesignConfig`); resume from its ledger.

    ``reference``: the output of :func:`load_reference` for the config's data (to share one load between runs;
    may hold ``train_features``). Returns report.json's content; the run folder (``config.out``) holds
    ledger.sqlite, report.json, report.md, the PNGs and hits/*.cif.
    """
    return DesignLoop(config, resume=resume, reference=reference).run()
