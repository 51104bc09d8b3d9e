"""The data pool (method.md §3) on a real SQLite file in tmp_path."""

from __future__ import annotations

import random
import sqlite3
from collections import Counter

import pytest

from altlm.pool import Pool, Row, balanced_draw


def row(it=1, pid=0, completion="c", bucket=None, truncated=False, score=None, feedback=None, valid=True, prompt=None):
    return Row(
        iteration=it,
        prompt_id=pid,
        prompt=prompt if prompt is not None else f"prompt {pid}",
        completion=completion,
        feedback=feedback,
        score=score,
        bucket=bucket,
        truncated=truncated,
        prompt_tokens=3,
        completion_tokens=len(completion.split()),
        valid=valid,
    )


@pytest.fixture()
def pool(tmp_path):
    p = Pool(tmp_path / "pool.sqlite")
    yield p
    p.close()


def key(r: Row):
    return (
        r.iteration,
        r.prompt_id,
        r.prompt,
        r.completion,
        r.feedback,
        r.score,
        r.bucket,
        bool(r.truncated),
        r.prompt_tokens,
        r.completion_tokens,
        bool(r.valid),
    )


def test_wal_mode(pool, tmp_path):
    assert pool.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    # persistent: another connection sees WAL too
    other = sqlite3.connect(tmp_path / "pool.sqlite")
    assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    other.close()


def test_add_rows_roundtrip(pool):
    rows = [
        row(1, 0, "hello world", score=0.25, truncated=True, prompt='it\'s a "quoted"\nprompt ☃'),
        row(1, 1, "", score=None),
        row(2, 0, "bye", score=1.5, feedback="Good.", bucket=1),
    ]
    pool.add(rows)
    got = pool.rows()
    assert [key(r) for r in got] == [key(r) for r in rows]
    assert [r.id for r in got] == sorted(r.id for r in got) and None not in [r.id for r in got]
    assert pool.count() == 3
    # invalid rows are stored but not active
    pool.add([row(3, 4, "bad", valid=False)])
    assert pool.count() == 4 and len(pool.rows()) == 3
    assert [key(r) for r in pool.rows("valid = 0")] == [key(row(3, 4, "bad", valid=False))]


def test_set_feedback(pool):
    pool.add([row(1, i, f"c{i}", score=i / 10) for i in range(4)])
    rows = pool.rows()
    pool.set_feedback([r.id for r in rows[:3]], [2, 0, 1], ["Mediocre.", "Excellent.", "Good."])
    got = {r.completion: (r.bucket, r.feedback) for r in pool.rows()}
    assert got == {"c0": (2, "Mediocre."), "c1": (0, "Excellent."), "c2": (1, "Good."), "c3": (None, None)}


def test_flush_all_and_rollback(pool):
    rng = random.Random(0)
    pool.add([row(1, i, f"a{i}") for i in range(6)])
    assert pool.flush(1.0, rng, iteration=2) == 6
    assert pool.rows() == []
    assert pool.count("dropped_at = 2") == 6  # retired, never deleted
    pool.add([row(2, i, f"b{i}") for i in range(3)])
    assert [r.completion for r in pool.rows()] == ["b0", "b1", "b2"]
    # undo iteration 2: its rows vanish, the rows it flushed come back
    assert pool.rollback(2) == 3
    assert [r.completion for r in pool.rows()] == [f"a{i}" for i in range(6)]
    assert pool.count() == 6 and pool.count("dropped_at IS NOT NULL") == 0


def test_flush_nothing(pool):
    pool.add([row(1, i) for i in range(4)])
    assert pool.flush(0.0, random.Random(0), iteration=2) == 0
    assert len(pool.rows()) == 4


def test_flush_half_and_rollback_keeps_earlier_iterations(pool):
    pool.add([row(1, i, f"a{i}") for i in range(10)])
    assert pool.flush(0.5, random.Random(0), iteration=2) == 5
    assert len(pool.rows()) == 5
    pool.add([row(2, i, f"b{i}") for i in range(4)])
    n = pool.flush(0.5, random.Random(1), iteration=3)  # 9 active → round(4.5) = 4
    assert n == round(9 * 0.5)
    assert len(pool.rows()) == 9 - n
    pool.add([row(3, 0, "c0")])
    # rolling back iteration 3 restores exactly the rows iteration 3 flushed, deletes iteration 3's rows,
    # and leaves iteration 2's flush alone
    assert pool.rollback(3) == 1
    active = pool.rows()
    assert len(active) == 9
    assert Counter(r.iteration for r in active) == {1: 5, 2: 4}
    assert pool.count("dropped_at = 2") == 5
    assert pool.count("iteration = 3") == 0


def test_flush_is_random_but_seeded(pool, tmp_path):
    pool.add([row(1, i, f"a{i}") for i in range(20)])
    pool.flush(0.5, random.Random(7), iteration=2)
    kept_a = [r.completion for r in pool.rows()]
    pool.rollback(2)
    pool.flush(0.5, random.Random(7), iteration=2)
    assert [r.completion for r in pool.rows()] == kept_a
    pool.rollback(2)
    pool.flush(0.5, random.Random(8), iteration=2)
    assert [r.completion for r in pool.rows()] != kept_a


def test_draw_uniform(pool):
    assert pool.draw_uniform(5, random.Random(0)) == []
    pool.add([row(1, i, f"c{i}") for i in range(10)])
    pool.add([row(1, 99, "invalid", valid=False)])
    d = pool.draw_uniform(4, random.Random(0))
    assert len(d) == 4 and len({r.id for r in d}) == 4  # without replacement
    assert all(r.valid for r in d)
    d10 = pool.draw_uniform(10, random.Random(0))
    assert sorted(r.completion for r in d10) == sorted(f"c{i}" for i in range(10))
    d25 = pool.draw_uniform(25, random.Random(0))
    assert len(d25) == 25
    assert {r.completion for r in d25} == {f"c{i}" for i in range(10)}  # every row at least once
    assert [r.id for r in pool.draw_uniform(4, random.Random(3))] == [
        r.id for r in pool.draw_uniform(4, random.Random(3))
    ]


def test_draw_by_bucket(pool):
    assert pool.draw_by_bucket(6, 3, random.Random(0)) == []
    # bucket 0: 20 rows, bucket 1: 3 rows, bucket 2: 7 rows; an invalid row and a flushed one are never drawn
    pool.add([row(1, i, f"a{i}", bucket=0) for i in range(20)])
    pool.add([row(1, 20 + i, f"b{i}", bucket=1) for i in range(3)])
    pool.add([row(1, 30 + i, f"c{i}", bucket=2) for i in range(7)])
    pool.add([row(1, 99, "invalid", bucket=1, valid=False)])
    d = pool.draw_by_bucket(15, 3, random.Random(0))
    assert Counter(r.bucket for r in d) == {0: 5, 1: 5, 2: 5}  # a uniform draw gives bucket 1 about 1.5 rows
    assert all(r.valid for r in d)
    assert {r.completion for r in d if r.bucket == 1} == {"b0", "b1", "b2"}  # short bucket: all, then repeats
    assert len({r.id for r in d if r.bucket == 0}) == 5  # without replacement where the bucket suffices
    assert [r.bucket for r in d] != sorted(r.bucket for r in d)  # shuffled, not bucket after bucket
    # the remainder goes to buckets drawn at random; the same stream gives the same draw
    assert sorted(Counter(r.bucket for r in pool.draw_by_bucket(16, 3, random.Random(1))).values()) == [5, 5, 6]
    assert [r.id for r in pool.draw_by_bucket(16, 3, random.Random(2))] == [
        r.id for r in pool.draw_by_bucket(16, 3, random.Random(2))
    ]
    # within a bucket the draw is uniform: over many draws each of bucket 0's 20 rows comes up about alike
    counts = Counter(
        r.id for seed in range(200) for r in pool.draw_by_bucket(15, 3, random.Random(seed)) if r.bucket == 0
    )
    assert len(counts) == 20 and max(counts.values()) < 2 * min(counts.values())
    pool.flush(1.0, random.Random(0), iteration=2)
    pool.add([row(2, 0, "new", bucket=2)])
    assert {r.completion for r in pool.draw_by_bucket(4, 3, random.Random(0))} == {"new"}


def test_draw_uniform_skips_flushed(pool):
    pool.add([row(1, i, f"a{i}") for i in range(5)])
    pool.flush(1.0, random.Random(0), iteration=2)
    pool.add([row(2, i, f"b{i}") for i in range(5)])
    assert {r.completion for r in pool.draw_uniform(20, random.Random(0))} == {f"b{i}" for i in range(5)}


def test_reopen_keeps_rows(tmp_path):
    path = tmp_path / "pool.sqlite"
    p = Pool(path)
    p.add([row(1, i, f"c{i}", score=i * 0.1) for i in range(7)])
    p.set_feedback([r.id for r in p.rows()], [0] * 7, ["x"] * 7)
    p.flush(1.0, random.Random(0), iteration=2)
    p.add([row(2, 0, "new")])
    before = [key(r) for r in p.rows("1")]
    p.close()
    q = Pool(path)  # schema creation is idempotent and keeps the data
    assert [key(r) for r in q.rows("1")] == before
    assert [r.completion for r in q.rows()] == ["new"]
    q.add([row(3, 1, "more")])
    assert q.count() == 9
    q.close()


# --------------------------------------------------------------------------- balanced draw (per-prompt regime)


def grid(pid, per_bucket_rows, truncated_pattern=None, k=5):
    """Rows of one prompt: per_bucket_rows[b] rows in bucket b; truncated_pattern[b] = list of bools."""
    out = []
    for b, n in enumerate(per_bucket_rows):
        for j in range(n):
            t = truncated_pattern[b][j] if truncated_pattern else False
            out.append(row(1, pid, f"p{pid}b{b}n{j}{'T' if t else ''}", bucket=b, truncated=t))
    for i, r in enumerate(out):
        r.id = pid * 1000 + i
    return out


def test_balanced_picks_per_bucket_non_truncated_first():
    trunc = [
        [True, True, False, True, False],
        [True, False, True, True],
        [False, False, False],
        [True, True, True],
        [False, True],
    ]
    rows = grid(0, [5, 4, 3, 3, 2], trunc)
    for seed in range(20):
        d = balanced_draw(rows, 2, 5, random.Random(seed))
        assert len(d) == 10
        by_b = Counter(r.bucket for r in d)
        assert by_b == {b: 2 for b in range(5)}
        for b in range(5):
            picked = [r for r in d if r.bucket == b]
            n_complete = sum(not t for t in trunc[b])
            # every bucket uses its non-truncated rows before any truncated one
            assert sum(not r.truncated for r in picked) == min(2, n_complete)


def test_balanced_fill_up_from_other_rows():
    # bucket 4 is empty and bucket 3 has one row: 3 rows must come from the prompt's other rows
    rows = grid(0, [4, 4, 3, 1, 0])
    d = balanced_draw(rows, 2, 5, random.Random(0))
    assert len(d) == 10
    c = Counter(r.bucket for r in d)
    assert c[3] == 1 and c[4] == 0
    assert len({id(r) for r in d}) == 10  # no row twice
    assert sum(c[b] for b in (0, 1, 2)) == 9


def test_balanced_fill_up_is_random_and_seeded():
    rows = grid(0, [6, 6, 6, 0, 0])  # buckets 3 and 4 empty: 4 of the 10 rows come from the fill-up
    draws = [tuple(r.id for r in balanced_draw(rows, 2, 5, random.Random(s))) for s in range(10)]
    assert draws[0] == tuple(r.id for r in balanced_draw(rows, 2, 5, random.Random(0)))  # deterministic per seed
    assert len({frozenset(d) for d in draws}) > 1  # ...but the seed matters
    # Filling up in stored order (the official code's bug) would always take the 4 leftover rows of bucket 0,
    # giving bucket counts {0: 6, 1: 2, 2: 2}; a random fill-up spreads over the buckets.
    by_id = {r.id: r for r in rows}
    counts = [Counter(by_id[i].bucket for i in d) for d in draws]
    assert all(sum(c.values()) == 10 and min(c[b] for b in range(3)) >= 2 for c in counts)
    assert any(c != Counter({0: 6, 1: 2, 2: 2}) for c in counts)


def test_balanced_fill_up_prefers_non_truncated():
    # buckets 3, 4 empty → 4 fill-up rows; after 2 complete picks per bucket the leftovers are
    # 1 complete row (bucket 0) + 8 truncated ones
    trunc = [
        [False, False, False, True, True],
        [False, False, True, True, True],
        [False, False, True, True, True],
        [],
        [],
    ]
    rows = grid(0, [5, 5, 5, 0, 0], trunc)
    for seed in range(20):
        d = balanced_draw(rows, 2, 5, random.Random(seed))
        assert len(d) == 10
        # 6 complete picks + the one complete leftover, whatever the seed
        assert sum(not r.truncated for r in d) == 7


def test_balanced_caps_and_small_prompts():
    rows = grid(0, [10, 10, 10, 10, 10]) + grid(1, [1, 0, 1, 0, 0]) + grid(2, [0, 0, 0, 0, 30])
    d = balanced_draw(rows, 2, 5, random.Random(0))
    c = Counter(r.prompt_id for r in d)
    assert c == {0: 10, 1: 2, 2: 10}  # at most per_bucket × k; a small prompt gives all it has
    d3 = balanced_draw(rows, 3, 5, random.Random(0))
    assert Counter(r.prompt_id for r in d3) == {0: 15, 1: 2, 2: 15}
    assert len({id(r) for r in d3}) == len(d3)


def test_balanced_draw_through_pool(pool):
    rows = grid(0, [3, 3, 3, 3, 3]) + grid(1, [2, 2, 0, 2, 2])
    for r in rows:
        r.id = None
    pool.add(rows)
    d = pool.draw_balanced(2, 5, random.Random(0))
    assert Counter(r.prompt_id for r in d) == {0: 10, 1: 8}
    assert all(r.id is not None for r in d)
    assert [r.id for r in d] == [r.id for r in pool.draw_balanced(2, 5, random.Random(0))]
    assert [r.id for r in d] != [r.id for r in pool.draw_balanced(2, 5, random.Random(1))]


def test_a_failed_transaction_leaves_nothing(tmp_path):
    p = Pool(tmp_path / "pool.sqlite")
    p.add([row(1, 0)])
    with pytest.raises(RuntimeError):
        with p.transaction():
            p.add([row(2, 1), row(2, 2)])
            p.set_progress({"phase": "train"})
            raise RuntimeError("killed half-way")
    assert p.count() == 1 and p.progress() is None
    with p.transaction():  # nested writes join the outer transaction
        p.add([row(2, 1)])
        p.set_progress({"phase": "train"})
    assert p.count() == 2 and p.progress() == {"phase": "train"}


def test_staged_samples_and_their_feedback_round_trip(tmp_path):
    p = Pool(tmp_path / "pool.sqlite")
    p.stage(3, [(0, {"completion": "a", "truncated": False}), (5, {"completion": "b", "truncated": True})])
    p.stage_feedback(3, [(5, {"score": float("nan"), "text": None})])
    got = p.staged(3)
    assert set(got) == {0, 5} and got[0] == ({"completion": "a", "truncated": False}, None)
    assert got[5][0]["completion"] == "b" and got[5][1]["score"] != got[5][1]["score"]  # NaN survives
    assert p.staged(4) == {}
    p.unstage(3)
    assert p.staged(3) == {}


def test_a_file_that_is_not_a_pool_is_one_clear_error(tmp_path):
    from altlm.errors import AltlmError

    bad = tmp_path / "pool.sqlite"
    bad.write_bytes(b"not a database" * 100)
    with pytest.raises(AltlmError, match="not a readable SQLite pool"):
        Pool(bad)
