"""The data pool: every sample ever generated, with its feedback, in one SQLite file (WAL).

One row per (prompt, completion). Flushing (`drop_factor`) never deletes: it records the iteration that retired
a row, so a run can always be inspected (`sqlite3 runs/demo/pool.sqlite`) and an unfinished iteration can be
rolled back exactly (`rollback`). Every write is one transaction.

Draws (method.md §3):
- `draw_uniform`: the global regime, uniform over the active pool;
- `draw_balanced`: the per-prompt regime, `per_bucket` rows per prompt and bucket, non-truncated first,
  empty buckets filled up randomly from the prompt's other rows.
"""
from __future__ import annotations

import random
import sqlite3
from dataclasses import dataclass, fields
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS samples (
    id INTEGER PRIMARY KEY,
    iteration INTEGER NOT NULL,
    prompt_id INTEGER NOT NULL,
    prompt TEXT NOT NULL,
    completion TEXT NOT NULL,
    feedback TEXT,
    score REAL,
    bucket INTEGER,
    truncated INTEGER NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    valid INTEGER NOT NULL DEFAULT 1,
    dropped_at INTEGER,  -- iteration whose flush retired the row; NULL = active
    raw TEXT,  -- the judge's answer(s) as received (LLM feedback): kept for invalid rows too
    agreement REAL  -- self-consistency: share of the judge's answers that agree with the kept one
);
CREATE INDEX IF NOT EXISTS samples_active ON samples(dropped_at, valid);
CREATE INDEX IF NOT EXISTS samples_iteration ON samples(iteration);
"""


@dataclass
class Row:
    iteration: int
    prompt_id: int
    prompt: str
    completion: str
    feedback: str | None
    score: float | None
    bucket: int | None
    truncated: bool
    prompt_tokens: int
    completion_tokens: int
    valid: bool = True
    raw: str | None = None
    agreement: float | None = None
    id: int | None = None


_COLS = [f.name for f in fields(Row) if f.name != "id"]


class Pool:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.db = sqlite3.connect(self.path, isolation_level=None)  # autocommit; we open transactions explicitly
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)
        have = {r[1] for r in self.db.execute("PRAGMA table_info(samples)")}
        for col, typ in (("raw", "TEXT"), ("agreement", "REAL")):  # pools written before these columns existed
            if col not in have:
                self.db.execute(f"ALTER TABLE samples ADD COLUMN {col} {typ}")

    def close(self) -> None:
        self.db.close()

    def _tx(self, sql: str, rows) -> None:
        with self.db:  # noqa: SIM117 — sqlite3's context manager commits or rolls back
            self.db.execute("BEGIN")
            self.db.executemany(sql, rows)

    def add(self, rows: list[Row]) -> None:
        self._tx(f"INSERT INTO samples ({', '.join(_COLS)}) VALUES ({', '.join('?' * len(_COLS))})",
                 [tuple(getattr(r, c) for c in _COLS) for r in rows])

    def rows(self, where: str = "dropped_at IS NULL AND valid = 1", params: tuple = ()) -> list[Row]:
        cur = self.db.execute(f"SELECT {', '.join(_COLS)}, id FROM samples WHERE {where} ORDER BY id", params)
        return [Row(*r[:-1], id=r[-1]) for r in cur]

    def count(self, where: str = "1", params: tuple = ()) -> int:
        return self.db.execute(f"SELECT COUNT(*) FROM samples WHERE {where}", params).fetchone()[0]

    def set_feedback(self, ids: list[int], buckets: list[int], texts: list[str]) -> None:
        self._tx("UPDATE samples SET bucket = ?, feedback = ? WHERE id = ?", list(zip(buckets, texts, ids)))

    def flush(self, drop_factor: float, rng: random.Random, iteration: int) -> int:
        """Retire a random `drop_factor` share of the active rows (1.0 = flush all). Returns how many."""
        if drop_factor <= 0:
            return 0
        ids = [r[0] for r in self.db.execute("SELECT id FROM samples WHERE dropped_at IS NULL ORDER BY id")]
        drop = ids if drop_factor >= 1 else rng.sample(ids, round(len(ids) * drop_factor))
        self._tx("UPDATE samples SET dropped_at = ? WHERE id = ?", [(iteration, i) for i in drop])
        return len(drop)

    def rollback(self, iteration: int) -> int:
        """Undo everything iterations >= `iteration` wrote (resume redoes them from their sampling phase)."""
        with self.db:
            self.db.execute("BEGIN")
            self.db.execute("UPDATE samples SET dropped_at = NULL WHERE dropped_at >= ?", (iteration,))
            return self.db.execute("DELETE FROM samples WHERE iteration >= ?", (iteration,)).rowcount

    def draw_uniform(self, n: int, rng: random.Random) -> list[Row]:
        """Global regime: n rows uniformly from the active, valid pool (with replacement only if n > pool)."""
        rows = self.rows()
        if not rows:
            return []
        if n <= len(rows):
            return rng.sample(rows, n)
        out = rows + [rng.choice(rows) for _ in range(n - len(rows))]
        rng.shuffle(out)
        return out

    def draw_balanced(self, per_bucket: int, num_buckets: int, rng: random.Random) -> list[Row]:
        return balanced_draw(self.rows(), per_bucket, num_buckets, rng)


def balanced_draw(rows: list[Row], per_bucket: int, num_buckets: int, rng: random.Random) -> list[Row]:
    """Per prompt: `per_bucket` rows from each bucket, non-truncated first (random within each group);
    a bucket short of rows is filled up randomly from the prompt's remaining rows, again non-truncated first.
    A prompt contributes at most per_bucket × num_buckets rows (fewer if it has fewer)."""
    by_prompt: dict[int, list[Row]] = {}
    for r in rows:
        by_prompt.setdefault(r.prompt_id, []).append(r)

    def prefer_complete(group: list[Row]) -> list[Row]:
        group = group[:]
        rng.shuffle(group)
        return sorted(group, key=lambda r: bool(r.truncated))  # stable: random order within each class

    out: list[Row] = []
    for pid in sorted(by_prompt):
        group = by_prompt[pid]
        chosen: list[Row] = []
        for b in range(num_buckets):
            chosen += prefer_complete([r for r in group if r.bucket == b])[:per_bucket]
        taken = {id(r) for r in chosen}
        want = min(per_bucket * num_buckets, len(group)) - len(chosen)
        if want > 0:
            chosen += prefer_complete([r for r in group if id(r) not in taken])[:want]
        out += chosen
    return out
