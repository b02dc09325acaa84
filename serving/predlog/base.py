"""The prediction log's one interface, and the pure rules every store shares.

A store keeps, for every answered request, the predicted class of each row by each
generation that predicted it (production's with the answer, candidates' as their
shadows answer), with the request id the router minted, the time and each generation's
checkpoint sha256. Labels join a request once; the live counters behind `/v1/status`
(requests, comparisons, labelled samples, flips, feedback outcomes) are kept in the
store too, so every router replica reads and adds to the same numbers.

Stores: `memory.MemoryLog` (one process, bounded by bytes), `sqlite.SqliteLog` (a file,
several processes on one node) and `redis.RedisLog` (shared across nodes). The two
durable ones write through `BatchedLog`: one writer thread commits whatever queued up
while the previous commit ran (group commit), so a burst of requests costs one
transaction, never one per request.
"""

from __future__ import annotations

import abc
import concurrent.futures
import logging
import threading
import time
import uuid
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np

from serving.core import FlipCounts, count_flips

log = logging.getLogger("graceful.predlog")

# The counter scope of feedback outcomes (a generation name starts with a letter or digit).
FEEDBACK_SCOPE = "~feedback"
# Predictions are stored as little-endian int32 class ids, one per row.
PRED_DTYPE = np.dtype("<i4")


# Flagged requests the memory and redis logs keep in their feed, newest kept (the sqlite
# log keeps a flag on each request instead, so its feed is bounded by the retention).
WANTED_MAX = 100_000
# A join waits this long for the replica's own queued rows (a store that is down does
# not hold a label sender for longer; the join then fails or finds them missing).
JOIN_FLUSH_S = 5.0


class JoinOutcome(str, Enum):
    """What one request's labels did.

    joined: counted against every candidate that predicted it; partial: joined, but no
    candidate prediction with production's to compare (nothing counted); duplicate: the
    request was labelled before (ignored); unknown: never served, or older than the
    retention; mismatched: not one label per row (not joined: labels may come again).
    """

    JOINED = "joined"
    PARTIAL = "partial"
    DUPLICATE = "duplicate"
    UNKNOWN = "unknown"
    MISMATCHED = "mismatched"


OUTCOMES = tuple(o.value for o in JoinOutcome)
# Outcomes that mark a request labelled (a later join of it is a duplicate).
MARKED = (JoinOutcome.JOINED, JoinOutcome.PARTIAL)
DUPLICATE_DETAIL = "request_id: already labelled; these labels are ignored"


@dataclass(frozen=True)
class JoinResult:
    request_id: str
    outcome: JoinOutcome
    candidates: Mapping[str, FlipCounts] = field(default_factory=dict)
    detail: str = ""

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"request_id": self.request_id, "outcome": self.outcome.value,
                               "candidates": {g: asdict(f) for g, f in self.candidates.items()}}
        if self.detail:
            out["detail"] = self.detail
        return out


@dataclass
class Stored:
    """One logged request as a store reads it back for a join."""

    t: float
    production: str
    rows: int
    labelled: bool
    preds: dict[str, np.ndarray]


def encode_pred(pred: np.ndarray) -> bytes:
    return np.asarray(pred, dtype=PRED_DTYPE).tobytes()


def decode_pred(blob: bytes) -> np.ndarray:
    return np.frombuffer(blob, dtype=PRED_DTYPE)


def judge(stored: Optional[Stored], labels: Sequence[int], now: float, retention_s: float
          ) -> tuple[JoinOutcome, dict[str, FlipCounts], str]:
    """The outcome of joining `labels` to a logged request, and the flips it adds.

    Flips of each candidate are counted against the production of that request's moment
    (PCT: a negative flip is production right, candidate wrong). By hand: production g0
    predicted [1, 2], candidate g1 [1, 0], labels [1, 2] -> joined, g1: 2 labelled, 1
    negative flip (row 2), 0 positive, production 2 right, candidate 1 right.
    A request older than `retention_s` is unknown even where a store has not pruned it yet.
    """
    if stored is None or now - stored.t > retention_s:
        return JoinOutcome.UNKNOWN, {}, "request_id: never served by this router, or older than the retention"
    if stored.labelled:
        return JoinOutcome.DUPLICATE, {}, DUPLICATE_DETAIL
    if len(labels) != stored.rows:
        return JoinOutcome.MISMATCHED, {}, f"labels: {len(labels)} labels for a request of {stored.rows} rows"
    ref = stored.preds.get(stored.production)
    if ref is None:
        return JoinOutcome.PARTIAL, {}, "production's prediction of this request was not logged"
    y = np.asarray(labels, dtype=np.int64)
    added = {g: count_flips(y, ref, p) for g, p in stored.preds.items() if g != stored.production}
    return (JoinOutcome.JOINED if added else JoinOutcome.PARTIAL), added, ""


def join_increments(outcome: JoinOutcome, added: Mapping[str, FlipCounts]) -> dict[str, dict[str, int]]:
    """The counter increments of one judged join: its outcome, and per candidate one
    labelled request plus its flip counts."""
    out: dict[str, dict[str, int]] = {FEEDBACK_SCOPE: {outcome.value: 1}}
    for g, f in added.items():
        # vars, not dataclasses.asdict: that deep-copies, a quarter of a join's time
        out[g] = {"labelled_requests": 1, **vars(f)}
    return out


class Tally:
    """Counter increments by (scope, name), summed until a store writes them."""

    def __init__(self):
        self._d: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))

    def add(self, scope: str, **inc: int) -> None:
        d = self._d[scope]
        for k, v in inc.items():
            if v:
                d[k] += int(v)

    def merge(self, incs: Mapping[str, Mapping[str, int]]) -> None:
        for scope, d in incs.items():
            self.add(scope, **d)

    def items(self) -> Iterable[tuple[str, str, int]]:
        for scope, d in self._d.items():
            for k, v in d.items():
                if v:
                    yield scope, k, v

    def __bool__(self) -> bool:
        return any(True for _ in self.items())


def split_counters(rows: Iterable[tuple[str, str, int]]) -> tuple[dict[str, dict[str, int]], dict[str, int]]:
    """(per-generation counters, feedback outcome counts) from (scope, name, value) rows."""
    gens: dict[str, dict[str, int]] = defaultdict(dict)
    feedback = {o: 0 for o in OUTCOMES}
    for scope, name, value in rows:
        if scope == FEEDBACK_SCOPE:
            feedback[name] = int(value)
        else:
            gens[scope][name] = int(value)
    return dict(gens), feedback


class PredictionLog(abc.ABC):
    """What the router, `graceful labels import` and the benchmarks use of a store.

    Writes (`record`, `add_prediction`, `count`) never block on the store; `record`
    returns a future that completes once the row is durable in the store (memory: at
    once), which the router awaits before answering when `serving.prediction_log_sync`.
    Joins, reads and the shared router state go to the store directly.
    """

    kind: str = "?"

    def __init__(self, retention_s: float, max_bytes: int):
        self.retention_s = float(retention_s)
        self.max_bytes = int(max_bytes)
        # When this log's counters started: stable across router restarts for a durable
        # store, so a restarted router continues them (the controller compares epochs).
        self.epoch: float = time.time()

    # --- writes ----------------------------------------------------------------------
    @abc.abstractmethod
    def record(self, rid: str, production: str, preds: Mapping[str, tuple[str, np.ndarray]],
               t: Optional[float] = None) -> "concurrent.futures.Future[bool]":
        """Log an answered request: `preds` maps generation -> (sha256, predicted class per
        row). A request id already logged is never overwritten. The future's result is
        False when the row could not be stored (dropped or a failing store)."""

    @abc.abstractmethod
    def add_prediction(self, rid: str, generation: str, sha256: str, pred: np.ndarray) -> None:
        """A candidate's (late) prediction of a logged request; ignored when the request is
        gone or this generation's prediction is already there."""

    @abc.abstractmethod
    def count(self, generation: str, **inc: int) -> None:
        """Add to a generation's counters (`serving.core.GenerationCounters` names)."""

    @abc.abstractmethod
    def mark_wanted(self, rid: str) -> None:
        """Flag a logged request as wanting labels: a candidate disagreed with production on
        it (only there can a label show a negative flip)."""

    @abc.abstractmethod
    def wanted(self, after: str = "", limit: int = 1000) -> tuple[list[dict[str, Any]], str]:
        """Flagged requests not labelled yet and still kept, in the order they were flagged,
        after the cursor `after` ("" = the oldest kept): ([{"request_id", "t", "rows"}], the
        cursor to pass next, `after` itself when there was nothing new). At most `limit`."""

    # --- joins -----------------------------------------------------------------------
    @abc.abstractmethod
    def join(self, items: Sequence[tuple[str, Sequence[int]]]) -> list[JoinResult]:
        """Join labels to logged requests, once each, in order (a request id repeated in
        `items` joins at its first place); counters change in the same step."""

    # --- reads -----------------------------------------------------------------------
    @abc.abstractmethod
    def counters(self) -> tuple[dict[str, dict[str, int]], dict[str, int]]:
        """(per-generation counters, feedback outcome counts), cumulative."""

    @abc.abstractmethod
    def describe(self) -> dict[str, Any]:
        """Kind, stored requests, bytes, retention and the write-side health counters."""

    # --- router state shared by replicas -------------------------------------------------
    @abc.abstractmethod
    def read_state(self) -> tuple[int, Optional[dict]]:
        """(version, document) of the routers' shared state; (0, None) when none yet."""

    @abc.abstractmethod
    def write_state(self, doc: dict) -> int:
        """Store a new state document; returns its version (the last one plus 1)."""

    @abc.abstractmethod
    def heartbeat(self, replica: str, doc: dict) -> None:
        """A router replica's own report (latency windows, in-flight shadows)."""

    @abc.abstractmethod
    def replicas(self, max_age_s: float) -> dict[str, dict]:
        """Reports of the replicas heard from within `max_age_s`, by replica id."""

    # --- life ------------------------------------------------------------------------
    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until every write queued so far is in the store; False on timeout or when
        that write was given up."""
        return True

    def close(self) -> None:
        """Flush and release the store."""


@dataclass
class _Batch:
    requests: list = field(default_factory=list)   # (rid, t, production, rows, [(gen, sha, blob)])
    late: list = field(default_factory=list)       # (rid, gen, sha, blob)
    wanted: list = field(default_factory=list)     # rids flagged for labels
    tally: Tally = field(default_factory=Tally)
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    # Names the batch to the store, so that a retry after an ambiguous failure (the
    # connection lost after the commit was sent) can tell whether it already landed.
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    attempts: int = 0

    def __len__(self) -> int:
        return len(self.requests) + len(self.late) + len(self.wanted)


class CommitLost(RuntimeError):
    """Raised by a store's `_write` when its batch cannot be retried (part of it landed):
    it is counted lost at once."""


def _resolve(fut: concurrent.futures.Future, ok: bool) -> None:
    """Resolve a batch's future unless a waiter cancelled it: the writer thread goes on."""
    try:
        fut.set_result(ok)
    except concurrent.futures.InvalidStateError:
        pass


class BatchedLog(PredictionLog):
    """A durable store written by one thread in group commits.

    The writer takes everything queued while its last commit ran and writes it in one
    transaction (`_write`); every `record` of that batch shares its future. Beyond
    `max_pending` queued rows new ones are dropped and counted: a store that stalls
    costs logged rows, never the router's memory. A failed commit is retried with
    backoff for up to `retry_s` (a store restarting, a failover): rows queued meanwhile
    wait behind it. Past that its rows are dropped and counted (`write_errors`), and
    the writer goes on with the next batch (its counter increments and flags are lost with
    it; a batch that partly landed raises `CommitLost` and is not retried). Counter
    increments ride with the next rows, or are written alone `tally_delay_s` after the
    first of them (a status read may lag by that much). Retention runs in the same
    thread every `prune_interval_s`.
    """

    def __init__(self, retention_s: float, max_bytes: int, max_pending: int = 100_000,
                 prune_interval_s: float = 5.0, retry_s: float = 30.0, tally_delay_s: float = 0.2):
        super().__init__(retention_s, max_bytes)
        self.max_pending = max_pending
        self.prune_interval_s = prune_interval_s
        self.retry_s = retry_s
        self.tally_delay_s = tally_delay_s
        self.retried = 0
        self._tally_due: Optional[float] = None
        self._flush_now = False
        self._cond = threading.Condition()
        self._batch = _Batch()
        self._inflight: Optional[_Batch] = None
        self._closed = False
        self.dropped = 0
        self.write_errors = 0
        self.batches = 0
        self.pruned = {"age": 0, "bytes": 0}
        self.last_error: Optional[str] = None
        self._thread: Optional[threading.Thread] = None

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"graceful-{self.kind}-log", daemon=True)
        self._thread.start()

    # --- the store's side --------------------------------------------------------------
    @abc.abstractmethod
    def _write(self, batch: _Batch) -> None:
        """Write one batch in one transaction (raise to have it retried)."""

    @abc.abstractmethod
    def _prune(self, now: float) -> dict[str, int]:
        """Apply the retention; requests removed by {"age": n, "bytes": n}."""

    # --- queueing ----------------------------------------------------------------------
    def record(self, rid, production, preds, t=None):
        item = (rid, time.time() if t is None else t, production,
                len(next(iter(preds.values()))[1]), [(g, sha, encode_pred(p)) for g, (sha, p) in preds.items()])
        with self._cond:
            if self._closed or len(self._batch) >= self.max_pending:
                self.dropped += 1
                done: concurrent.futures.Future = concurrent.futures.Future()
                done.set_result(False)
                return done
            self._batch.requests.append(item)
            self._cond.notify()
            return self._batch.future

    def add_prediction(self, rid, generation, sha256, pred):
        with self._cond:
            if self._closed or len(self._batch) >= self.max_pending:
                self.dropped += 1
                return
            self._batch.late.append((rid, generation, sha256, encode_pred(pred)))
            self._cond.notify()

    def mark_wanted(self, rid):
        with self._cond:
            if not self._closed:
                self._batch.wanted.append(rid)
                self._cond.notify()

    def count(self, generation, **inc):
        # Counters alone wait up to tally_delay_s for rows to ride with: one commit per
        # answered request, not one for its counts and another for its row.
        with self._cond:
            self._batch.tally.add(generation, **inc)
            # (zeros add nothing: no due time for an empty tally, or the writer would spin)
            if self._tally_due is None and self._batch.tally:
                self._tally_due = time.monotonic() + self.tally_delay_s
                self._cond.notify()

    def flush(self, timeout_s: float = 10.0) -> bool:
        with self._cond:
            target = self._batch if (self._batch or self._batch.tally) else self._inflight
            self._flush_now = True
            self._cond.notify()
        if target is None:
            return True
        try:
            return bool(target.future.result(timeout_s))   # False: that batch was dropped
        except concurrent.futures.TimeoutError:
            return False
        except concurrent.futures.CancelledError:  # a waiter gave up on it; the writer still commits it
            return True

    def close(self) -> None:
        self.flush()
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(10.0)

    # --- the writer thread ---------------------------------------------------------------
    def _due(self, now: float) -> bool:
        """Is the queued batch to be written now? Rows always; counters alone once due."""
        tally = self._batch.tally and (self._flush_now or self._closed or now >= (self._tally_due or 0.0))
        return bool(self._batch) or bool(tally)

    def _run(self) -> None:
        next_prune = time.monotonic()
        while True:
            with self._cond:
                while True:
                    now = time.monotonic()
                    if self._due(now) or now >= next_prune or (self._closed and not self._batch.tally):
                        break
                    self._cond.wait(min(next_prune, self._tally_due or next_prune) - now)
                if self._closed and not (self._batch or self._batch.tally):
                    return
                batch = None
                if self._due(time.monotonic()):
                    batch, self._batch = self._batch, _Batch()
                    self._inflight = batch  # what flush() waits for when nothing is queued
                    self._tally_due, self._flush_now = None, False
            if batch is not None:
                self._commit(batch)
            if time.monotonic() >= next_prune:
                next_prune = time.monotonic() + self.prune_interval_s
                try:
                    for k, n in self._prune(time.time()).items():
                        self.pruned[k] += n
                except Exception as e:  # the next interval tries again
                    self.last_error = f"prune: {type(e).__name__}: {e}"
                    log.warning("prediction log (%s): %s", self.kind, self.last_error)

    def _commit(self, batch: _Batch) -> None:
        deadline = time.monotonic() + self.retry_s
        delay = 0.05
        while True:
            batch.attempts += 1
            try:
                self._write(batch)
            except CommitLost as e:
                self._lose(batch, f"{type(e).__name__}: {e}")
                return
            except Exception as e:
                self.last_error = f"{type(e).__name__}: {e}"
                # A closed log stops retrying: close() must not hang on a dead store.
                if time.monotonic() + delay <= deadline and not self._closed:
                    if batch.attempts == 1:
                        log.warning("prediction log (%s): write failed, retrying for up to %.0f s: %s",
                                    self.kind, self.retry_s, self.last_error)
                    self.retried += 1
                    time.sleep(delay)
                    delay = min(delay * 2, 1.0)
                    continue
                self._lose(batch, self.last_error)
                return
            self.batches += 1
            _resolve(batch.future, True)
            return

    def _lose(self, batch: _Batch, why: Optional[str]) -> None:
        """Give a batch up: its rows count as dropped, its counter increments and flags go
        with them (counted in `write_errors`)."""
        self.last_error = why
        self.write_errors += 1
        self.dropped += len(batch.requests)
        log.error("prediction log (%s): a batch of %d requests (%d late predictions, %d counter increments, "
                  "%d flags) was lost after %d attempts: %s", self.kind, len(batch.requests), len(batch.late),
                  len(list(batch.tally.items())), len(batch.wanted), batch.attempts, why)
        _resolve(batch.future, False)

    def _health(self) -> dict[str, Any]:
        with self._cond:
            pending = len(self._batch)
        return {"pending": pending, "dropped": self.dropped, "write_errors": self.write_errors,
                "retried": self.retried, "batches": self.batches, "pruned": dict(self.pruned), "last_error": self.last_error}
