"""Report of a design run: report.json (see the contract in the module), report.md, PNGs, hits/*.cif.

report.json: ``{"config", "rounds": [per-round statistics], "hits": [{"id", "formula", "cif", "round",
"e_hull": {method: eV/atom}, "properties": {...}}], "strategy", "setup_seconds", "oracle", "guard_notes"}``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

GUARD_NOTES = {
    "invalid_distance": "screen: two atoms closer than guards.min_distance",
    "invalid_charge": "screen: no charge-balanced assignment of SMACT oxidation states",
    "outside_family": "screen: outside the chemistry constraints",
    "single_element": "screen/oracle: a single-element cell",
    "implausible_density": "screen/oracle: density outside guards.density_range",
    "duplicate_seen": "screen: matches a candidate seen before",
    "known_phase": "screen: matches a known phase (not novel)",
    "oracle_error": "oracle: a method gave no energy",
    "unstable": "oracle: E_hull above the window by at least one method",
    "far_below_hull": "oracle: deeper below the known hull than guards.min_e_hull (a hull gap is likelier)",
    "methods_disagree": "oracle: the methods' E_hull differ by more than guards.method_tolerance",
    "large_rmsd": "oracle: the relaxation moved the cell beyond guards.max_rmsd",
    "off_target": "a property outside its window (surrogate prediction unless the oracle measures it)",
    "not_novel": "oracle: the relaxed cell matches a known phase",
    "duplicate_hit": "oracle: matches an earlier hit",
    "ood": "pick farther from the training data than guards.ood_quantile (counted; acted on per guards.ood_action)",
    "sparse_hull": "chemical system with fewer known phases than guards.min_known_phases",
}


def plot_hits_vs_calls(curves: Mapping[str, Sequence[tuple[int, int]]], path: str | Path, title: str = "") -> Path:
    """Cumulative hits against cumulative oracle calls, one line per strategy (``{name: [(calls, hits)]}``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.6))
    for name, pts in curves.items():
        if pts:
            x, y = zip(*pts)
            ax.plot(x, y, label=name, drawstyle="steps-post")
    ax.set_xlabel("oracle calls")
    ax.set_ylabel("hits (cumulative)")
    ax.set_title(title or "hits vs oracle calls")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def _pareto(points: np.ndarray) -> np.ndarray:
    """Mask of the non-dominated rows (every column minimised)."""
    ok = np.ones(len(points), dtype=bool)
    for i, p in enumerate(points):
        if np.any(np.all(points <= p, 1) & np.any(points < p, 1)):
            ok[i] = False
    return ok


def write_report(loop) -> dict[str, Any]:
    """Write report.json, report.md, the PNGs and the hits' CIFs of a finished :class:`DesignLoop`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mmmat.design.loop import _objective_values
    from mmmat.design.select import violation

    cfg, out, ledger = loop.cfg, loop.out, loop.ledger
    rounds = ledger.round_stats()
    verified = ledger.candidates("status = 'verified'")
    hits = [v for v in verified if v["is_hit"]]
    (out / "hits").mkdir(exist_ok=True)
    hit_docs = []
    for h in hits:
        orc = h["oracle"]
        name = f"{h['id']}_{h['formula']}.cif"
        (out / "hits" / name).write_text(orc.get("relaxed_cif") or h["cif"])
        props = {k: v for k, v in ((h.get("surrogate") or {}).get("mean") or {}).items()}
        props.update({f"oracle_{k}": v for k, v in (orc.get("properties") or {}).items()})
        hit_docs.append({
            "id": h["id"], "formula": h["formula"], "cif": f"hits/{name}", "round": h["round"],
            "e_hull": orc.get("e_hull") or {}, "properties": props,
            "n_known_phases": orc.get("n_known_phases"), "source": h["source"],
            "rmsd": orc.get("rmsd"), "ood": bool((h.get("guards") or {}).get("ood")),
        })
    # hits vs calls, in pick order
    pts, n_hit = [(0, 0)], 0
    for k, v in enumerate(verified, 1):
        n_hit += int(v["is_hit"])
        pts.append((k, n_hit))
    plot_hits_vs_calls({cfg.select.strategy: pts}, out / "hits_vs_calls.png", cfg.name)
    # Pareto front of the objectives (violations, minimised)
    if verified:
        vals = np.stack([_objective_values(cfg, v) for v in verified])
        cols = [np.asarray([violation(vals[i : i + 1, [k]], [o])[0] for i in range(len(vals))])
                for k, o in enumerate(cfg.objectives)]
        fig, ax = plt.subplots(figsize=(5, 3.6))
        if len(cfg.objectives) >= 2:
            x, y = vals[:, 0], vals[:, 1]
            mask = _pareto(np.stack(cols[:2], 1))
            ax.set_xlabel(cfg.objectives[0].name)
            ax.set_ylabel(cfg.objectives[1].name)
        else:
            x, y = np.arange(len(vals)), vals[:, 0]
            mask = _pareto(np.stack([cols[0]], 1))
            ax.set_xlabel("oracle call")
            ax.set_ylabel(cfg.objectives[0].name)
        hit = np.asarray([bool(v["is_hit"]) for v in verified])
        ax.scatter(x[~hit], y[~hit], s=10, c="0.6", label="verified")
        ax.scatter(x[hit], y[hit], s=16, c="tab:green", label="hit")
        ax.scatter(x[mask], y[mask], s=40, facecolors="none", edgecolors="tab:red", label="Pareto front")
        ax.legend(fontsize=8)
        ax.set_title("objectives of verified candidates")
        fig.tight_layout()
        fig.savefig(out / "pareto.png", dpi=110)
        plt.close(fig)
    # diversity and surrogate error per round
    for fname, keys, ylabel in (
        ("diversity.png", ("cumulative_hits", "unique_compositions", "unique_prototypes"), "count"),
        ("surrogate_error.png", ("surrogate_mae", "disagreement", "ood_share"), "value"),
    ):
        fig, ax = plt.subplots(figsize=(5, 3.6))
        for key in keys:
            xs = [s["round"] for s in rounds if s.get(key) is not None]
            ys = [s[key] for s in rounds if s.get(key) is not None]
            ax.plot(xs, ys, marker="o", label=key)
        ax.set_xlabel("round")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=110)
        plt.close(fig)
    oracle_stats = dict(getattr(loop.oracle, "stats", {}))
    if oracle_stats.get("relax_seconds"):
        oracle_stats["structures_per_s"] = oracle_stats["structures"] / oracle_stats["relax_seconds"]
    doc = {
        "config": cfg.to_dict(),
        "rounds": rounds,
        "hits": hit_docs,
        "strategy": cfg.select.strategy,
        "oracle": {"methods": list(loop.oracle.methods), "kind": cfg.oracle.kind, **oracle_stats},
        "setup_seconds": loop.setup_seconds,
        "ood_threshold": loop.ood_thr,
        "guard_notes": GUARD_NOTES,
        "reference": {"known_phases": len(loop.known), "train_rows": len(loop.ref["train"]),
                      "unreadable_rows": loop.ref["skipped"]},
    }
    (out / "report.json").write_text(json.dumps(doc, indent=1, default=float))
    (out / "report.md").write_text(_markdown(doc))
    return doc


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def _markdown(doc: dict) -> str:
    cfg = doc["config"]
    lines = [f"# Design run `{cfg['name']}`", ""]
    methods = ", ".join(doc["oracle"]["methods"])
    lines.append(f"Strategy `{doc['strategy']}`, oracle `{doc['oracle']['kind']}` ({methods}), "
                 f"budget {cfg['budget']} calls, {len(doc['rounds'])} rounds, seed {cfg['seed']}.")
    if cfg["oracle"]["kind"] == "stand_in":
        lines.append("")
        lines.append("**The stand-in oracle's energies are not physics (tests and the tiny config only).**")
    objs = "; ".join(f"{o['name']} in [{_fmt(o['min'])}, {_fmt(o['max'])}] "
                     f"({'oracle: ' + o['oracle'] if o['oracle'] else 'surrogate only'})" for o in cfg["objectives"])
    lines += ["", f"Objectives: {objs}.", "",
              "A hit: verified by the oracle, inside every window by every method, methods agree, not single-element, "
              "plausible density, small relaxation, novel against the known phases, unique among hits.", ""]
    lines += ["## Rounds", "", "| round | calls | cum. calls | hits | cum. hits | surrogate MAE | disagreement | "
              "OOD share | unique comps | unique protos | strategy | s total | s proposal | s screen | s oracle |",
              "|" + "---|" * 15]
    for s in doc["rounds"]:
        sec = s["seconds"]
        lines.append("| " + " | ".join(_fmt(x) for x in (
            s["round"], s["oracle_calls"], s["cumulative_oracle_calls"], s["hits"], s["cumulative_hits"],
            s["surrogate_mae"], s["disagreement"], s["ood_share"], s["unique_compositions"], s["unique_prototypes"],
            s["strategy_used"], sec.get("total"), sec.get("proposal"), sec.get("screening"), sec.get("oracle"))) + " |")
    names = sorted({k for s in doc["rounds"] for k in s["guards"]})
    lines += ["", "## Guards (candidates caught per round)", "", "| guard | " +
              " | ".join(str(s["round"]) for s in doc["rounds"]) + " | meaning |",
              "|" + "---|" * (len(doc["rounds"]) + 2)]
    for n in names:
        lines.append(f"| {n} | " + " | ".join(str(s["guards"].get(n, 0)) for s in doc["rounds"]) +
                     f" | {doc['guard_notes'].get(n, '')} |")
    lines += ["", "## Hits", "", "| id | formula | round | E_hull per method (eV/atom) | known phases in system | "
              "source | properties (surrogate) |", "|---|---|---|---|---|---|---|"]
    for h in doc["hits"]:
        eh = ", ".join(f"{k} {_fmt(v)}" for k, v in h["e_hull"].items())
        pr = ", ".join(f"{k} {_fmt(v)}" for k, v in h["properties"].items())
        lines.append(f"| {h['id']} | {h['formula']} | {h['round']} | {eh} | {h['n_known_phases']} | {h['source']} | "
                     f"{pr} |")
    o = doc["oracle"]
    if o.get("structures_per_s"):
        lines += ["", f"Oracle throughput: {o['structures_per_s']:.3g} structures/s "
                  f"({o['structures']} structures, every method, relaxation included)."]
    lines += ["", "Figures: hits_vs_calls.png, pareto.png, diversity.png, surrogate_error.png. Hits: hits/*.cif.", ""]
    return "\n".join(lines)
