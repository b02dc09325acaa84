"""Pure logic of the router: traffic plan, input checks, feedback join, live counters.

Nothing here touches Ray, Serve or the network, so every rule is unit-tested directly;
`serving.router` wires these pieces to HTTP and deployment handles.

Units: request counters count requests; comparison and label counters count samples
(rows), because the flip rate is a per-sample rate (NFR = negative flips / labelled).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections import OrderedDict, deque
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Mapping, Optional

import numpy as np


class BadRequest(ValueError):
    """Client error: becomes a 4xx JSON response naming what is wrong."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


# --- traffic plan ------------------------------------------------------------------------

def sticky_unit(key: str) -> float:
    """A uniform number in [0, 1) that depends only on `key` (stable across processes)."""
    digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0 ** 64


@dataclass(frozen=True)
class TrafficPlan:
    """Who serves and who shadows. Immutable: the router swaps the whole plan at once, so
    a request in flight always sees one consistent plan.

    `weights` covers every known generation (0 for those that serve nothing) and sums to 1.
    A request is mirrored to the `shadows` it is not served by, and to production when a
    candidate serves it: production is the reference every flip is counted against.
    """

    production: str
    weights: Mapping[str, float]
    shadows: tuple[str, ...] = ()
    # Candidates first (sorted), production last: raising one candidate's weight only
    # moves users from production to it, users already on it stay (sticky ramps).
    _order: tuple[str, ...] = field(default=(), repr=False, compare=False)
    _cum: tuple[float, ...] = field(default=(), repr=False, compare=False)

    @staticmethod
    def build(production: str, weights: Mapping[str, float], shadows: Iterable[str],
              known: Iterable[str]) -> "TrafficPlan":
        """Validate and build a plan; BadRequest names the offending generation or value."""
        known = list(known)
        if production not in known:
            raise BadRequest(f"production: unknown generation {production!r}; known: {sorted(known)}")
        full = {g: 0.0 for g in known}
        for g, w in weights.items():
            if g not in full:
                raise BadRequest(f"weights: unknown generation {g!r}; known: {sorted(known)}")
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
                raise BadRequest(f"weights.{g}: must be a finite number >= 0, got {w!r}")
            full[g] = float(w)
        total = sum(full.values())
        if abs(total - 1.0) > 1e-6:
            raise BadRequest(f"weights: must sum to 1, got {total:g}")
        shadow_list = []
        for g in shadows:
            if g not in full:
                raise BadRequest(f"shadows: unknown generation {g!r}; known: {sorted(known)}")
            if g == production:
                raise BadRequest(f"shadows: {g!r} is production; production is the reference, not a shadow")
            if g not in shadow_list:
                shadow_list.append(g)
        order = tuple(sorted(g for g in full if g != production)) + (production,)
        cum, acc = [], 0.0
        for g in order:
            acc += full[g] / total
            cum.append(acc)
        return TrafficPlan(production, dict(full), tuple(shadow_list), order, tuple(cum))

    def choose(self, key: str) -> str:
        """The generation that serves `key` (a user id or request id)."""
        u = sticky_unit(key)
        for g, c in zip(self._order, self._cum):
            if u < c and self.weights[g] > 0:
                return g
        # Rounding: the cumulative sum may end a hair below 1.
        return next(g for g in reversed(self._order) if self.weights[g] > 0)

    def mirrors(self, primary: str) -> tuple[str, ...]:
        """Generations that get a copy of a request served by `primary` (never awaited by
        the response, except production as fallback/fusion partner of a candidate)."""
        out = [g for g in self.shadows if g != primary]
        if primary != self.production:
            out.insert(0, self.production)
        return tuple(out)

    @property
    def candidates(self) -> list[str]:
        return [g for g in self.weights if g != self.production]

    def as_dict(self) -> dict[str, Any]:
        return {"production": self.production, "weights": dict(self.weights), "shadows": list(self.shadows)}


# --- input checks ------------------------------------------------------------------------

def parse_json_object(body: bytes) -> dict:
    """Decode a request body that must be a JSON object."""
    try:
        obj = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadRequest(f"body is not valid JSON ({e})") from None
    except RecursionError:
        raise BadRequest("body is nested too deeply") from None
    if not isinstance(obj, dict):
        raise BadRequest(f"body must be a JSON object, got {type(obj).__name__}")
    return obj


def parse_inputs(obj: dict, input_dim: int, max_rows: int, key: str = "inputs") -> np.ndarray:
    """`obj[key]` as a (rows, input_dim) float32 array of finite numbers, or BadRequest."""
    if key not in obj:
        raise BadRequest(f"missing key {key!r}")
    rows = obj[key]
    if not isinstance(rows, list) or not rows:
        raise BadRequest(f"{key}: must be a non-empty list of rows")
    if len(rows) > max_rows:
        raise BadRequest(f"{key}: {len(rows)} rows, at most {max_rows} per request", status=413)
    if not all(isinstance(r, list) for r in rows):
        raise BadRequest(f"{key}: every row must be a list of {input_dim} numbers")
    # bools are ints to numpy; a row of true/false is a client bug, not a feature vector.
    if any(isinstance(v, (bool, str)) or v is None for r in rows for v in r):
        raise BadRequest(f"{key}: rows must hold numbers only")
    try:
        x = np.asarray(rows, dtype=np.float32)
    except (ValueError, TypeError, OverflowError):
        raise BadRequest(f"{key}: rows must be lists of numbers of equal length {input_dim}") from None
    if x.ndim != 2 or x.shape[1] != input_dim:
        raise BadRequest(f"{key}: each row must have {input_dim} numbers, got shape {list(x.shape)}")
    if not np.isfinite(x).all():
        raise BadRequest(f"{key}: NaN or infinite values (or values beyond float32)")
    return x


def parse_user_id(obj: dict) -> Optional[str]:
    uid = obj.get("user_id")
    if uid is None:
        return None
    if not isinstance(uid, (str, int)) or isinstance(uid, bool) or len(str(uid)) > 256:
        raise BadRequest("user_id: must be a string or integer of at most 256 characters")
    return str(uid)


def parse_feedback(obj: dict) -> tuple[str, np.ndarray]:
    rid = obj.get("request_id")
    if not isinstance(rid, str) or not rid or len(rid) > 256:
        raise BadRequest("request_id: must be a non-empty string")
    labels = obj.get("labels")
    if not isinstance(labels, list) or not labels or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in labels):
        raise BadRequest("labels: must be a non-empty list of class ids (integers >= 0)")
    return rid, np.asarray(labels, dtype=np.int64)


def fuse(old_probs: np.ndarray, new_probs: np.ndarray, weight: float) -> np.ndarray:
    """Serving-time fusion: (1 - w) * old + w * new probabilities."""
    return (1.0 - weight) * old_probs + weight * new_probs


# --- feedback join -----------------------------------------------------------------------

class FeedbackStore:
    """Predictions waiting for their labels, by request id, with a TTL and a size cap.

    Entries go in in time order with one TTL, so the oldest is always first: expiry and
    the cap both pop from the front, O(1) amortised, and memory stays bounded by `max_entries`.
    """

    def __init__(self, ttl_s: float, max_entries: int, clock=time.monotonic):
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._clock = clock
        # rid -> (time stored, production at that time, predictions by generation)
        self._entries: "OrderedDict[str, tuple[float, str, dict[str, np.ndarray]]]" = OrderedDict()
        self.evicted = 0
        self.expired = 0

    def __len__(self) -> int:
        return len(self._entries)

    def _expire(self, now: float) -> None:
        while self._entries:
            t = next(iter(self._entries.values()))[0]
            if now - t <= self.ttl_s:
                break
            self._entries.popitem(last=False)
            self.expired += 1

    def put(self, rid: str, production: str, preds: dict[str, np.ndarray]) -> None:
        """Store the predictions of a request; `production` is its flip reference."""
        now = self._clock()
        self._expire(now)
        self._entries.pop(rid, None)
        self._entries[rid] = (now, production, dict(preds))
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
            self.evicted += 1

    def add(self, rid: str, generation: str, preds: np.ndarray) -> bool:
        """Attach a late (shadow) prediction to a stored request; False if it is gone."""
        entry = self._entries.get(rid)
        if entry is None or self._clock() - entry[0] > self.ttl_s:
            return False
        entry[2][generation] = preds
        return True

    def pop(self, rid: str) -> Optional[tuple[str, dict[str, np.ndarray]]]:
        """(production, predictions) stored for `rid`, removed (a request is labelled
        once); None when unknown or expired."""
        self._expire(self._clock())
        entry = self._entries.pop(rid, None)
        return None if entry is None else (entry[1], entry[2])


# --- counters ----------------------------------------------------------------------------

@dataclass
class FlipCounts:
    labelled: int = 0
    negative_flips: int = 0
    positive_flips: int = 0
    production_correct: int = 0
    candidate_correct: int = 0


def count_flips(labels: np.ndarray, production: np.ndarray, candidate: np.ndarray) -> FlipCounts:
    """Per-sample flips of `candidate` against `production` (PCT: negative = old right, new wrong)."""
    p_ok = production == labels
    c_ok = candidate == labels
    return FlipCounts(
        labelled=int(len(labels)),
        negative_flips=int(np.sum(p_ok & ~c_ok)),
        positive_flips=int(np.sum(~p_ok & c_ok)),
        production_correct=int(np.sum(p_ok)),
        candidate_correct=int(np.sum(c_ok)),
    )


@dataclass
class GenerationCounters:
    """Cumulative (monotonic) counters of one generation; the controller takes deltas.

    Comparison and label counters are kept on the candidate, against production.
    """

    requests_primary: int = 0
    requests_shadow: int = 0
    samples_primary: int = 0
    errors: int = 0
    shadow_errors: int = 0
    shadow_timeouts: int = 0
    shadow_dropped: int = 0
    fallbacks: int = 0
    compared: int = 0
    disagreements: int = 0
    labelled_requests: int = 0
    labelled: int = 0
    negative_flips: int = 0
    positive_flips: int = 0
    production_correct: int = 0
    candidate_correct: int = 0


class LatencyWindow:
    """The last `size` latencies; quantiles over that recent window."""

    def __init__(self, size: int = 2048):
        self._values: deque[float] = deque(maxlen=size)

    def add(self, ms: float) -> None:
        self._values.append(ms)

    def summary(self) -> dict[str, Optional[float]]:
        if not self._values:
            return {"n": 0, "p50_ms": None, "p90_ms": None, "p99_ms": None}
        a = np.fromiter(self._values, dtype=np.float64)
        p50, p90, p99 = np.percentile(a, [50, 90, 99])
        return {"n": int(len(a)), "p50_ms": round(float(p50), 3), "p90_ms": round(float(p90), 3),
                "p99_ms": round(float(p99), 3)}


class LiveStats:
    """Counters and latency windows of every generation the router has seen."""

    def __init__(self, window: int = 2048):
        self._window = window
        self.counters: dict[str, GenerationCounters] = {}
        self._latency: dict[tuple[str, str], LatencyWindow] = {}
        self.feedback = {"joined": 0, "unknown": 0, "partial": 0, "mismatched": 0}

    def of(self, generation: str) -> GenerationCounters:
        c = self.counters.get(generation)
        if c is None:
            c = self.counters[generation] = GenerationCounters()
        return c

    def latency(self, generation: str, role: str, ms: float) -> None:
        w = self._latency.get((generation, role))
        if w is None:
            w = self._latency[(generation, role)] = LatencyWindow(self._window)
        w.add(ms)

    def record_comparison(self, candidate: str, production_pred: np.ndarray, candidate_pred: np.ndarray) -> int:
        """Count a shadow comparison; returns the number of disagreeing samples."""
        c = self.of(candidate)
        n_dis = int(np.sum(production_pred != candidate_pred))
        c.compared += int(len(production_pred))
        c.disagreements += n_dis
        return n_dis

    def record_labels(self, candidate: str, flips: FlipCounts) -> None:
        c = self.of(candidate)
        c.labelled_requests += 1
        for k, v in asdict(flips).items():
            setattr(c, k, getattr(c, k) + v)

    def generation_snapshot(self, generation: str) -> dict[str, Any]:
        return {
            "counters": asdict(self.of(generation)),
            "latency": {role: self._latency[(generation, role)].summary()
                        if (generation, role) in self._latency else LatencyWindow(1).summary()
                        for role in ("primary", "shadow")},
        }


def join_feedback(stats: LiveStats, stored: Optional[tuple[str, dict[str, np.ndarray]]],
                  labels: np.ndarray) -> dict[str, FlipCounts]:
    """Count the flips of every candidate that predicted this request against the
    production of that moment; returns the counts added, by candidate.

    Raises BadRequest for an unknown (or expired, or already labelled) request id, or
    labels that do not match its rows. Without production's prediction (its shadow
    failed) nothing can be compared: the feedback counts as partial.
    """
    if stored is None:
        stats.feedback["unknown"] += 1
        raise BadRequest("request_id: unknown, expired or already labelled", status=404)
    production, preds = stored
    n = len(next(iter(preds.values())))
    if len(labels) != n:
        stats.feedback["mismatched"] += 1
        raise BadRequest(f"labels: {len(labels)} labels for a request of {n} rows", status=422)
    ref = preds.get(production)
    added: dict[str, FlipCounts] = {}
    if ref is not None:
        for gen, p in preds.items():
            if gen != production:
                added[gen] = count_flips(labels, ref, p)
                stats.record_labels(gen, added[gen])
    stats.feedback["joined" if added else "partial"] += 1
    return added
