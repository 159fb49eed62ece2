"""SQLite ledger of a design run: every candidate, its provenance, scores, oracle results and guard flags.

Rows are written as the loop goes (each oracle result is committed as soon as it arrives), so a run killed at
any point resumes from the ledger without calling the oracle again for a candidate that already has a result.

Tables:
    ``candidates``: one row per candidate (``id``, ``round``, ``source``, ``parent``, ``formula``, ``cif``,
    ``status`` = proposed | rejected | screened | selected | verified, ``reject_reason``, ``surrogate``
    (JSON: mean and std per target), ``embedding`` (JSON list), ``ood_distance``, ``acquisition``,
    ``oracle`` (JSON), ``guards`` (JSON: flag name -> bool), ``is_hit``).
    ``rounds``: ``round``, ``phase`` (screened | selected | verified | done), ``stats`` (JSON).
    ``meta``: ``key``, ``value`` (the resolved config).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS candidates (
    id TEXT PRIMARY KEY,
    round INTEGER NOT NULL,
    source TEXT NOT NULL,
    parent TEXT,
    formula TEXT NOT NULL,
    cif TEXT NOT NULL,
    status TEXT NOT NULL,
    reject_reason TEXT,
    surrogate TEXT,
    embedding TEXT,
    ood_distance REAL,
    acquisition REAL,
    pick_order INTEGER,
    oracle TEXT,
    guards TEXT,
    is_hit INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS candidates_round ON candidates(round, status);
CREATE TABLE IF NOT EXISTS rounds (round INTEGER PRIMARY KEY, phase TEXT NOT NULL, stats TEXT);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
"""

PHASES = ("screened", "selected", "verified", "done")
JSON_COLUMNS = ("surrogate", "embedding", "oracle", "guards")


class Ledger:
    """The ledger of one run folder (``ledger.sqlite``), opened for reading and writing."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(self.path), timeout=60)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(SCHEMA)
        self.db.commit()

    def close(self) -> None:
        """Close the database."""
        self.db.close()

    # ------------------------------------------------------------------ meta
    def get_meta(self, key: str) -> Any:
        """A stored JSON value (None when absent)."""
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def set_meta(self, key: str, value: Any) -> None:
        """Store a JSON value."""
        with self.db:
            self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value)))

    # ------------------------------------------------------------------ rounds
    def phase(self, round_: int) -> str | None:
        """The last finished phase of a round (None: nothing finished)."""
        row = self.db.execute("SELECT phase FROM rounds WHERE round = ?", (round_,)).fetchone()
        return None if row is None else row[0]

    def set_phase(self, round_: int, phase: str, stats: dict | None = None) -> None:
        """Mark a phase of a round finished (with the round's statistics when done)."""
        if phase not in PHASES:
            raise ValueError(f"unknown phase {phase!r}")
        with self.db:
            self.db.execute(
                "INSERT OR REPLACE INTO rounds VALUES (?, ?, ?)",
                (round_, phase, None if stats is None else json.dumps(stats)),
            )

    def round_stats(self) -> list[dict]:
        """Statistics of every finished round, in order."""
        rows = self.db.execute("SELECT stats FROM rounds WHERE phase = 'done' ORDER BY round").fetchall()
        return [json.loads(r[0]) for r in rows if r[0]]

    # ------------------------------------------------------------------ candidates
    def add_candidates(self, rows: Sequence[dict], replace_round: int | None = None) -> None:
        """Insert candidate rows in one transaction (after deleting the unfinished rows of ``replace_round``)."""
        cols = [
            "id", "round", "source", "parent", "formula", "cif", "status", "reject_reason", "surrogate",
            "embedding", "ood_distance",
        ]
        with self.db:
            if replace_round is not None:
                self.db.execute("DELETE FROM candidates WHERE round = ?", (replace_round,))
            self.db.executemany(
                f"INSERT INTO candidates ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                [tuple(_enc(c, r.get(c)) for c in cols) for r in rows],
            )

    def mark_selected(self, picks: Sequence[tuple[str, float]], round_: int) -> None:
        """Mark picks (id, acquisition score) selected, in pick order, and the round's selection finished."""
        with self.db:
            for k, (cid, score) in enumerate(picks):
                self.db.execute(
                    "UPDATE candidates SET status = 'selected', acquisition = ?, pick_order = ? WHERE id = ?",
                    (float(score), k, cid),
                )
            self.db.execute("INSERT OR REPLACE INTO rounds VALUES (?, 'selected', NULL)", (round_,))

    def set_oracle(self, cid: str, result: dict) -> None:
        """Store one oracle result (committed at once)."""
        with self.db:
            self.db.execute(
                "UPDATE candidates SET status = 'verified', oracle = ? WHERE id = ?", (json.dumps(result), cid)
            )

    def set_verdict(self, cid: str, guards: dict, is_hit: bool) -> None:
        """Store a verified candidate's guard flags and hit verdict."""
        with self.db:
            self.db.execute(
                "UPDATE candidates SET guards = ?, is_hit = ? WHERE id = ?", (json.dumps(guards), int(is_hit), cid)
            )

    def candidates(self, where: str = "1", params: Iterable[Any] = ()) -> list[dict]:
        """Candidate rows as dicts (JSON columns decoded), ordered by round and pick order then id."""
        cur = self.db.execute(
            f"SELECT * FROM candidates WHERE {where} ORDER BY round, pick_order IS NULL, pick_order, rowid",
            tuple(params),
        )
        names = [d[0] for d in cur.description]
        out = []
        for row in cur.fetchall():
            r = dict(zip(names, row))
            for c in JSON_COLUMNS:
                if r.get(c) is not None:
                    r[c] = json.loads(r[c])
            out.append(r)
        return out

    def count(self, where: str = "1", params: Iterable[Any] = ()) -> int:
        """Number of candidate rows matching ``where``."""
        return int(self.db.execute(f"SELECT COUNT(*) FROM candidates WHERE {where}", tuple(params)).fetchone()[0])


def _enc(col: str, v: Any) -> Any:
    if col in JSON_COLUMNS and v is not None:
        return json.dumps(v)
    return v
