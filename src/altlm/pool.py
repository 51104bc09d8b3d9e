"""The data pool: every sample ever generated, with its feedback, in one SQLite file (WAL).

One row per (prompt, completion). Flushing (`drop_factor`) never deletes: it records the iteration that retired
a row, so a run can always be inspected (`sqlite3 runs/demo/pool.sqlite`) and an unfinished iteration can be
rolled back exactly (`rollback`). Every write is one transaction; `transaction()` groups several into one.

Two more tables make a killed run resumable (runfolder.py): `staged` holds the current iteration's samples and
their feedback batch by batch until the iteration's pool commit moves them into `samples`, and `progress` holds
the run's progress record, written in the same transaction as the pool writes it describes.

Draws (method.md §3):
- `draw_uniform`: the global regime, uniform over the active pool;
- `draw_by_bucket`: the global regime with every feedback string drawn equally often (`train_draw: by_bucket`);
- `draw_balanced`: the per-prompt regime, `per_bucket` rows per prompt and bucket, non-truncated first,
  empty buckets filled up randomly from the prompt's other rows.
"""

from __future__ import annotations

import json
import random
import sqlite3
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path

from .errors import AltlmError

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
    agreement REAL,  -- self-consistency: share of the judge's answers that agree with the kept one
    noise INTEGER  -- feedback_noise: NULL = the row's own feedback; k = replaced by the one k places further
);
CREATE INDEX IF NOT EXISTS samples_active ON samples(dropped_at, valid);
CREATE INDEX IF NOT EXISTS samples_iteration ON samples(iteration);
CREATE TABLE IF NOT EXISTS staged (
    iteration INTEGER NOT NULL,
    idx INTEGER NOT NULL,  -- the request's position in the iteration's request list
    sample TEXT NOT NULL,  -- JSON: completion, truncated, token counts
    feedback TEXT,  -- JSON: the feedback fields once scored; NULL until then
    PRIMARY KEY (iteration, idx)
);
CREATE TABLE IF NOT EXISTS progress (id INTEGER PRIMARY KEY CHECK (id = 1), state TEXT NOT NULL);
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
    noise: int | None = None  # feedback_noise's offset (feedback/noise.py); None: the row's own feedback
    id: int | None = None


_COLS = [f.name for f in fields(Row) if f.name != "id"]
ACTIVE = "dropped_at IS NULL AND valid = 1"


class Pool:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.db = sqlite3.connect(self.path, isolation_level=None)  # autocommit; we open transactions explicitly
        try:
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.executescript(SCHEMA)
            have = {r[1] for r in self.db.execute("PRAGMA table_info(samples)")}
        except sqlite3.DatabaseError as e:
            self.db.close()
            raise AltlmError(
                f"pool file '{self.path}' is not a readable SQLite pool ({e}); restore it from a backup or start a new run folder"
            ) from None
        # pools written before these columns existed
        for col, typ in (("raw", "TEXT"), ("agreement", "REAL"), ("noise", "INTEGER")):
            if col not in have:
                self.db.execute(f"ALTER TABLE samples ADD COLUMN {col} {typ}")

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def transaction(self):
        """One transaction (commit on success, rollback on any exception, a kill leaves nothing); nests flat."""
        if self.db.in_transaction:
            yield
            return
        with self.db:  # sqlite3's context manager commits or rolls back
            self.db.execute("BEGIN")
            yield

    def _tx(self, sql: str, rows) -> None:
        with self.transaction():
            self.db.executemany(sql, rows)

    # ---- resumability: staged samples of the unfinished iteration, the progress record
    def stage(self, iteration: int, items: list[tuple[int, dict]]) -> None:
        self._tx(
            "INSERT OR REPLACE INTO staged (iteration, idx, sample) VALUES (?, ?, ?)",
            [(iteration, i, json.dumps(d)) for i, d in items],
        )

    def stage_feedback(self, iteration: int, items: list[tuple[int, dict]]) -> None:
        self._tx(
            "UPDATE staged SET feedback = ? WHERE iteration = ? AND idx = ?",
            [(json.dumps(d), iteration, i) for i, d in items],
        )

    def staged(self, iteration: int) -> dict[int, tuple[dict, dict | None]]:
        """idx → (sample, feedback or None) for what the iteration already sampled (and scored)."""
        cur = self.db.execute("SELECT idx, sample, feedback FROM staged WHERE iteration = ?", (iteration,))
        return {i: (json.loads(s), json.loads(f) if f is not None else None) for i, s, f in cur}

    def unstage(self, iteration: int) -> None:
        self._tx("DELETE FROM staged WHERE iteration = ?", [(iteration,)])

    def progress(self) -> dict | None:
        row = self.db.execute("SELECT state FROM progress WHERE id = 1").fetchone()
        return json.loads(row[0]) if row else None

    def set_progress(self, state: dict) -> None:
        self._tx("INSERT OR REPLACE INTO progress (id, state) VALUES (1, ?)", [(json.dumps(state),)])

    def add(self, rows: list[Row]) -> None:
        self._tx(
            f"INSERT INTO samples ({', '.join(_COLS)}) VALUES ({', '.join('?' * len(_COLS))})",
            [tuple(getattr(r, c) for c in _COLS) for r in rows],
        )

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
        """Undo everything iterations >= `iteration` wrote to `samples` (a resume redoes their pool commit)."""
        with self.transaction():
            self.db.execute("UPDATE samples SET dropped_at = NULL WHERE dropped_at >= ?", (iteration,))
            return self.db.execute("DELETE FROM samples WHERE iteration >= ?", (iteration,)).rowcount

    def common_feedback(self, best: bool) -> list[str]:
        """The feedback texts of the best (or worst) bucket among active rows, most frequent first (LMU exemplars)."""
        rows = [r for r in self.rows() if r.feedback is not None and r.bucket is not None]
        if not rows:
            return []
        target = min(r.bucket for r in rows) if best else max(r.bucket for r in rows)
        counts: dict[str, int] = {}
        for r in rows:
            if r.bucket == target:
                counts[r.feedback] = counts.get(r.feedback, 0) + 1
        return sorted(counts, key=lambda t: -counts[t])

    def draw_uniform(self, n: int, rng: random.Random) -> list[Row]:
        """Global regime: n rows uniformly from the active, valid pool (with replacement only if n > pool).
        Row ids are drawn from the id range and the active rows among them kept (rejection sampling, a few rounds),
        so a draw reads about 2n rows whether the pool holds 10³ or 10⁶; a pool that is mostly retired or smaller
        than n is read whole."""
        lo = self.db.execute("SELECT MIN(id) FROM samples").fetchone()[0]  # (one aggregate per query: O(log n))
        hi = self.db.execute("SELECT MAX(id) FROM samples").fetchone()[0]
        if lo is None:
            return []
        picks, found = [], {}
        for _ in range(4):
            cand = [rng.randint(lo, hi) for _ in range(2 * (n - len(picks)))]
            found.update(self.rows_by_id(cand, ACTIVE))
            chosen = set(picks)
            for i in cand:
                if i in found and i not in chosen and len(picks) < n:
                    chosen.add(i)
                    picks.append(i)
            if len(picks) == n:
                return [found[i] for i in picks]
        rows = self.rows()
        if n <= len(rows) or not rows:
            return rng.sample(rows, n) if rows else []
        out = rows + [rng.choice(rows) for _ in range(n - len(rows))]
        rng.shuffle(out)
        return out

    def draw_by_bucket(self, n: int, num_buckets: int, rng: random.Random) -> list[Row]:
        """Global regime, `train_draw: by_bucket`: n rows split evenly over the buckets that hold rows (the
        remainder to buckets chosen at random), uniform within each bucket, without replacement unless a bucket
        holds fewer rows than its share; shuffled. Ties can leave a quantile bucket with a few percent of the pool
        (VADER's zeros); a uniform draw then trains its feedback string that rarely."""
        by_bucket: dict[int, list[int]] = {}
        for i, b in self.db.execute(f"SELECT id, bucket FROM samples WHERE {ACTIVE} ORDER BY id"):
            if b is not None and 0 <= b < num_buckets:
                by_bucket.setdefault(b, []).append(i)
        if not by_bucket or n <= 0:
            return []
        buckets = sorted(by_bucket)
        share = {b: n // len(buckets) for b in buckets}
        for b in rng.sample(buckets, n % len(buckets)):
            share[b] += 1
        picks: list[int] = []
        for b in buckets:
            ids = by_bucket[b]
            if share[b] <= len(ids):
                picks += rng.sample(ids, share[b])
            else:
                picks += ids + [rng.choice(ids) for _ in range(share[b] - len(ids))]
        rng.shuffle(picks)
        found = self.rows_by_id(picks)
        return [found[i] for i in picks]

    def rows_by_id(self, ids: list[int], where: str = "1") -> dict[int, Row]:
        """{id: row} for the rows among `ids` that meet `where`, read in chunks (SQLite caps bound parameters)."""
        distinct = sorted(set(ids))
        found: dict[int, Row] = {}
        for start in range(0, len(distinct), 500):
            chunk = distinct[start : start + 500]
            found.update(
                (r.id, r) for r in self.rows(f"id IN ({','.join('?' * len(chunk))}) AND {where}", tuple(chunk))
            )
        return found

    def draw_balanced(self, per_bucket: int, num_buckets: int, rng: random.Random, group: bool = False) -> list[Row]:
        """The per-prompt regime's draw (balanced_draw). `group`: prompts in random order, each prompt's rows kept
        together, so a training batch holds one prompt under its different feedback (contrastive batches: each
        step sees what the feedback changes with the prompt held fixed)."""
        rows = balanced_draw(self.rows(), per_bucket, num_buckets, rng)
        if not group:
            return rows
        groups: dict[int, list[Row]] = {}
        for r in rows:
            groups.setdefault(r.prompt_id, []).append(r)
        order = list(groups)
        rng.shuffle(order)
        return [r for pid in order for r in groups[pid]]


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
