"""The contract every prediction log store keeps (memory, sqlite on a real file, redis on
a real redis-server), and the pure join rule they share."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from serving.core import FlipCounts
from serving.predlog.base import JoinOutcome, Stored, join_increments, judge
from serving.predlog.memory import MemoryLog
from serving.predlog.sqlite import SqliteLog
from tests.helpers import wait_for

SHA0, SHA1 = "0" * 64, "1" * 64
DAY = 86400.0


def test_judge_counts_flips_against_that_requests_production_by_hand():
    """production g0 [1, 2], candidate g1 [1, 0], labels [1, 2]: g1 has 2 labelled, 1
    negative flip (row 2), 0 positive, production 2 right, candidate 1 right, 1 labelled
    disagreement (row 2: 2 vs 0)."""
    s = Stored(t=100.0, production="g0", rows=2, labelled=False,
               preds={"g0": np.array([1, 2]), "g1": np.array([1, 0])})
    outcome, added, _ = judge(s, [1, 2], now=101.0, retention_s=10.0)
    assert outcome is JoinOutcome.JOINED
    assert added == {"g1": FlipCounts(labelled=2, negative_flips=1, positive_flips=0, production_correct=2,
                                      candidate_correct=1, labelled_disagreements=1)}
    assert join_increments(outcome, added)["g1"]["labelled_requests"] == 1


@pytest.mark.parametrize("case, outcome", [
    ("never served", JoinOutcome.UNKNOWN), ("past retention", JoinOutcome.UNKNOWN),
    ("labelled", JoinOutcome.DUPLICATE), ("3 labels for 2 rows", JoinOutcome.MISMATCHED),
    ("no production prediction", JoinOutcome.PARTIAL), ("no candidate", JoinOutcome.PARTIAL)])
def test_judge_outcomes(case, outcome):
    base = dict(t=100.0, production="g0", rows=2, labelled=False, preds={"g0": np.array([1, 2]), "g1": np.array([1, 0])})
    stored = {"never served": None, "past retention": Stored(**{**base, "t": 80.0}),
              "labelled": Stored(**{**base, "labelled": True}), "3 labels for 2 rows": Stored(**base),
              "no production prediction": Stored(**{**base, "preds": {"g1": np.array([1, 0])}}),
              "no candidate": Stored(**{**base, "preds": {"g0": np.array([1, 2])}})}[case]
    labels = [1, 2, 0] if case.startswith("3 labels") else [1, 2]
    got, added, detail = judge(stored, labels, now=101.0, retention_s=10.0)
    assert got is outcome and not added and (detail or outcome is JoinOutcome.PARTIAL)


@pytest.fixture(params=["memory", "sqlite", "redis"])
def open_store(request, tmp_path):
    """A factory of stores of one kind; two calls give two handles on the same store
    (two replicas) for sqlite and redis."""
    opened = []

    def make(retention_s: float = DAY, max_bytes: int = 1 << 30, **kw):
        if request.param == "memory":
            log = opened[0] if opened else MemoryLog(retention_s, max_bytes)
        elif request.param == "sqlite":
            log = SqliteLog(tmp_path / "log.sqlite", retention_s, max_bytes, **kw)
        else:
            from serving.predlog.redis import RedisLog

            log = RedisLog(request.getfixturevalue("redis_url"), retention_s, max_bytes, **kw)
        opened.append(log)
        return log

    make.kind = request.param
    yield make
    for log in opened:
        log.close()


def _served(log, rid: str, prod=(1, 2), cand=(1, 0), t=None):
    log.record(rid, "g0", {"g0": (SHA0, np.array(prod))}, t=t)
    log.add_prediction(rid, "g1", SHA1, np.array(cand))
    assert log.flush()


def test_a_logged_request_joins_once_and_counts_flips(open_store):
    log = open_store()
    _served(log, "r1")
    [first] = log.join([("r1", [1, 2])])
    [again] = log.join([("r1", [1, 2])])
    assert first.outcome is JoinOutcome.JOINED and first.candidates["g1"].negative_flips == 1
    assert again.outcome is JoinOutcome.DUPLICATE and not again.candidates
    gens, feedback = log.counters()
    assert gens["g1"]["labelled"] == 2 and gens["g1"]["negative_flips"] == 1 and gens["g1"]["labelled_requests"] == 1
    assert feedback["joined"] == 1 and feedback["duplicate"] == 1


def test_unknown_mismatched_and_repeated_ids_in_one_batch(open_store):
    """A wrong label count is not a join: the right labels may come later. A request id
    twice in one batch joins at its first place only."""
    log = open_store()
    _served(log, "r1")
    _served(log, "r2")
    res = log.join([("nope", [1]), ("r1", [1]), ("r2", [1, 2]), ("r2", [1, 2]), ("r1", [1, 2])])
    assert [r.outcome.value for r in res] == ["unknown", "mismatched", "joined", "duplicate", "joined"]
    assert "1 labels for a request of 2 rows" in res[1].detail
    assert log.counters()[1] == {"joined": 2, "partial": 0, "duplicate": 1, "unknown": 1, "mismatched": 1}


def test_a_logged_prediction_is_never_overwritten_and_late_ones_never_create_requests(open_store):
    log = open_store()
    _served(log, "r1", prod=(1, 2), cand=(1, 0))
    log.record("r1", "g0", {"g0": (SHA0, np.array([0, 0]))})  # the same id again: ignored
    log.add_prediction("r1", "g1", SHA1, np.array([2, 2]))    # a second g1 prediction: ignored
    log.add_prediction("ghost", "g1", SHA1, np.array([2]))    # no such request: nothing created
    assert log.flush()
    [r] = log.join([("r1", [1, 2])])
    assert r.candidates["g1"].negative_flips == 1 and r.candidates["g1"].production_correct == 2
    assert log.join([("ghost", [2])])[0].outcome is JoinOutcome.UNKNOWN


def test_requests_older_than_the_retention_do_not_join(open_store):
    log = open_store(retention_s=60.0)
    _served(log, "old", t=time.time() - 120.0)
    _served(log, "new")
    assert [r.outcome.value for r in log.join([("old", [1, 2]), ("new", [1, 2])])] == ["unknown", "joined"]


def test_two_handles_share_requests_counters_and_state(open_store):
    a = open_store()
    b = open_store()
    _served(a, "r1")
    a.count("g1", requests_shadow=3, compared=6)
    assert a.flush()
    assert b.join([("r1", [1, 2])])[0].outcome is JoinOutcome.JOINED
    assert a.counters() == b.counters() and a.counters()[0]["g1"]["compared"] == 6
    v1 = a.write_state({"production": "g0"})
    v2 = b.write_state({"production": "g1"})
    assert v2 == v1 + 1 and a.read_state() == (v2, {"production": "g1"})
    a.heartbeat("ra", {"x": 1})
    b.heartbeat("rb", {"x": 2})
    assert a.replicas(60.0) == {"ra": {"x": 1}, "rb": {"x": 2}} and a.epoch == b.epoch


def test_the_byte_cap_drops_the_oldest_requests(open_store):
    if open_store.kind == "redis":
        pytest.skip("Redis bounds its bytes itself (maxmemory), not the log")
    log = open_store(max_bytes=1 << 16, prune_interval_s=0.05) if open_store.kind == "sqlite" else \
        open_store(max_bytes=1 << 16)
    for i in range(3000):
        log.record(f"r{i}", "g0", {"g0": (SHA0, np.arange(8))})
    assert log.flush()
    deadline = time.monotonic() + 20
    while log.describe()["bytes"] > 1 << 16 and time.monotonic() < deadline:
        time.sleep(0.1)
    d = log.describe()
    assert d["bytes"] <= 1 << 16 and d["pruned"]["bytes"] > 0 and 0 < d["requests"] < 3000
    res = log.join([("r0", list(range(8))), ("r2999", list(range(8)))])
    assert [r.outcome.value for r in res] == ["unknown", "partial"]  # no candidate: partial


def test_a_waiter_cancelling_its_batch_future_does_not_stop_the_writer(tmp_path):
    """A request that stops waiting for its row (the router's bounded wait) may cancel the
    future its whole batch shares; the writer thread must still commit it and the next."""
    log = SqliteLog(tmp_path / "log.sqlite", DAY, 1 << 30)
    release = threading.Event()
    write = log._write
    log._write = lambda batch: (release.wait(10), write(batch))
    try:
        first = log.record("r1", "g0", {"g0": (SHA0, np.array([1, 2]))})
        wait_for(lambda: log._inflight is not None)  # the writer holds r1's batch
        assert first.cancel()
        release.set()
        assert log.record("r2", "g0", {"g0": (SHA0, np.array([1, 2]))}).result(10) is True
        # both logged (production only, so "partial": no candidate to compare)
        assert [r.outcome for r in log.join([("r1", [1, 2]), ("r2", [1, 2])])] == [JoinOutcome.PARTIAL] * 2
    finally:
        log.close()


def test_the_labels_wanted_feed_pages_flagged_unlabelled_requests_oldest_first(open_store):
    """r1, r2, r3 flagged (r3 twice, and an id never logged), r4 not: the feed holds r1, r2,
    r3 once each, in order; pages of one follow the cursor; r1 labelled leaves it; past the
    end the cursor stays where it was."""
    log = open_store()
    for rid in ("r1", "r2", "r3", "r4"):
        _served(log, rid)
    for rid in ("r1", "r2", "r3", "r3", "never-logged"):
        log.mark_wanted(rid)
    assert log.flush()
    items, cursor = log.wanted("", 10)
    assert [i["request_id"] for i in items] == ["r1", "r2", "r3"] and all(i["rows"] == 2 for i in items)
    first, c1 = log.wanted("", 1)
    second, c2 = log.wanted(c1, 1)
    assert [i["request_id"] for i in first + second] == ["r1", "r2"]
    log.join([("r1", [1, 2])])
    assert [i["request_id"] for i in log.wanted("", 10)[0]] == ["r2", "r3"]
    rest, end = log.wanted(c2, 10)
    assert [i["request_id"] for i in rest] == ["r3"] and log.wanted(end, 10) == ([], end)
    # Flags come in any order (shadows of different requests finish when they finish):
    # r5 logged before r6 but flagged after r6 was read is still listed after the cursor.
    _served(log, "r5")
    _served(log, "r6")
    log.mark_wanted("r6")
    assert log.flush()
    got, cursor = log.wanted(end, 10)
    log.mark_wanted("r5")
    assert log.flush()
    assert [i["request_id"] for i in got] == ["r6"]
    assert [i["request_id"] for i in log.wanted(cursor, 10)[0]] == ["r5"]


def test_counting_zero_sets_no_due_time_for_an_empty_tally(tmp_path):
    """count(g, x=0) adds nothing; a due time for the empty tally would make the writer
    thread wait for a moment that has passed, over and over (a busy loop)."""
    log = SqliteLog(tmp_path / "log.sqlite", DAY, 1 << 30)
    try:
        log.count("g1", requests_shadow=0)
        assert log._tally_due is None and not log._batch.tally
    finally:
        log.close()
