"""Pure logic of the router: traffic plan, input checks, flip counts, latency windows.

Nothing here touches Ray, Serve or the network, so every rule is unit-tested directly;
`serving.router` wires these pieces to HTTP and deployment handles.

Units: request counters count requests; comparison and label counters count samples
(rows), because the flip rate is a per-sample rate (NFR = negative flips / labelled).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from collections import deque
from dataclasses import dataclass, field
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

# The content type of a binary request body: one `.npy` array of shape (N, *input_shape).
NPY_CONTENT_TYPE = "application/x-npy"
# With an npy body the request's other fields travel outside it: the user id in this
# header, `k` of /v1/search in the query string.
USER_HEADER = "X-Graceful-User"
_NPY_MAGIC = b"\x93NUMPY"
# Every JSON scalar a row may hold: int and float exactly (bool is an int subclass, and a
# row of true/false is a client bug, not a feature vector).
_NUMBER = (int, float)


def as_shape(shape: "int | Iterable[int]") -> tuple[int, ...]:
    """A row's shape as a tuple (an int is the legacy flat `input_dim`)."""
    return (int(shape),) if isinstance(shape, (int, np.integer)) else tuple(int(d) for d in shape)


def _expected(key: str, shape: tuple[int, ...]) -> str:
    return f"{key}: expected shape [N, {', '.join(map(str, shape))}] (rows of shape {list(shape)})"


def _nested_shape(v: Any) -> list[int]:
    """The shape of a nested list, following first elements."""
    out = []
    while isinstance(v, list):
        out.append(len(v))
        if not v:
            break
        v = v[0]
    return out


def _shape_error(key: str, shape: tuple[int, ...], rows: list, detail: str) -> BadRequest:
    got = _nested_shape(rows)
    if got[1:] != list(shape):
        return BadRequest(f"{_expected(key, shape)}, got {got}")
    return BadRequest(f"{_expected(key, shape)}, got lists of unequal lengths: {detail}")


def _check_rows(key: str, rows: list, shape: tuple[int, ...]) -> None:
    """Every row of `rows` is a nested list of `shape` holding numbers only (walked level
    by level, so a deep but small request costs no recursion)."""
    level = rows
    for depth, n in enumerate(shape):
        nxt: list = []
        for i, v in enumerate(level):
            if isinstance(v, list):
                if len(v) != n:
                    where = _path(key, depth, i, shape)
                    raise _shape_error(key, shape, rows, f"{where} has {len(v)} items, not {n}")
                nxt.extend(v)
            elif type(v) in _NUMBER:
                raise _shape_error(key, shape, rows, f"{_path(key, depth, i, shape)} is a number, not a list of {n}")
            else:
                raise _not_a_number(key, _path(key, depth, i, shape), v)
        level = nxt
    for i, v in enumerate(level):
        if type(v) not in _NUMBER:
            where = _path(key, len(shape), i, shape)
            if isinstance(v, list):
                raise _shape_error(key, shape, rows, f"{where} is a list, not a number")
            raise _not_a_number(key, where, v)


def _not_a_number(key: str, where: str, v: Any) -> BadRequest:
    what = "null" if v is None else "a boolean" if isinstance(v, bool) else type(v).__name__
    return BadRequest(f"{key}: rows must hold numbers only; {where} is {what}")


def _path(key: str, depth: int, flat: int, shape: tuple[int, ...]) -> str:
    """`inputs[2][0][5]`: where the `flat`-th element at `depth` sits (the levels above
    have the expected lengths, or the walk would have stopped there)."""
    idx = []
    for n in reversed(shape[:depth]):
        idx.append(flat % n)
        flat //= n
    idx.append(flat)
    return key + "".join(f"[{i}]" for i in reversed(idx))


def _finite(key: str, x: np.ndarray) -> np.ndarray:
    if not np.isfinite(x).all():
        raise BadRequest(f"{key}: NaN or infinite values (or values beyond float32)")
    return x


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


def parse_inputs(obj: dict, input_shape: "int | Iterable[int]", max_rows: int, key: str = "inputs") -> np.ndarray:
    """`obj[key]`, nested lists of shape (N, *input_shape), as a float32 array of finite
    numbers, or BadRequest naming the expected and the received shape."""
    shape = as_shape(input_shape)
    if key not in obj:
        raise BadRequest(f"missing key {key!r}")
    rows = obj[key]
    if not isinstance(rows, list) or not rows:
        raise BadRequest(f"{key}: must be a non-empty list of rows of shape {list(shape)}")
    if len(rows) > max_rows:
        raise BadRequest(f"{key}: {len(rows)} rows, at most {max_rows} per request", status=413)
    _check_rows(key, rows, shape)
    try:
        with np.errstate(over="ignore", invalid="ignore"):
            x = np.asarray(rows, dtype=np.float32)
    except (ValueError, TypeError, OverflowError):  # an integer beyond any float
        raise BadRequest(f"{key}: NaN or infinite values (or values beyond float32)") from None
    return _finite(key, x)


def _npy_header(body: bytes) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, header length) of an npy body; BadRequest when it is not one."""
    if not body.startswith(_NPY_MAGIC):
        raise BadRequest(f"body is not an .npy array (Content-Type: {NPY_CONTENT_TYPE}; "
                         f"write it with numpy.save)")
    fp = io.BytesIO(body)
    try:
        version = np.lib.format.read_magic(fp)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(fp)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(fp)
        else:
            raise BadRequest(f"npy body: format version {version[0]}.{version[1]} is not supported (1.0 or 2.0)")
    except BadRequest:
        raise
    except Exception as e:  # numpy raises ValueError, EOFError, SyntaxError... for broken headers
        raise BadRequest(f"npy body: malformed header ({type(e).__name__}: {e})") from None
    return tuple(int(d) for d in shape), dtype, fp.tell()


def parse_npy(body: bytes, input_shape: "int | Iterable[int]", max_rows: int, key: str = "inputs") -> np.ndarray:
    """An `application/x-npy` body (one array of shape (N, *input_shape), any float or
    integer dtype) as a float32 array of finite numbers, or BadRequest. The header is
    checked (dtype, shape, data size) before the array is read, which
    `np.load(..., allow_pickle=False)` then does."""
    shape = as_shape(input_shape)
    got, dtype, start = _npy_header(body)
    if dtype.hasobject or dtype.fields is not None or dtype.subdtype is not None or dtype.kind not in "fiu":
        raise BadRequest(f"{key}: npy dtype {dtype.str!r} is not a number type (expected float32, "
                         f"or another float or integer dtype)")
    if len(got) != len(shape) + 1 or got[1:] != shape:
        raise BadRequest(f"{_expected(key, shape)}, got {list(got)}")
    if got[0] == 0:
        raise BadRequest(f"{key}: the array has no rows")
    if got[0] > max_rows:
        raise BadRequest(f"{key}: {got[0]} rows, at most {max_rows} per request", status=413)
    want = math.prod(got) * dtype.itemsize
    if len(body) - start != want:
        raise BadRequest(f"npy body: malformed, {len(body) - start} bytes of data where its header "
                         f"(shape {list(got)}, dtype {dtype.str!r}) needs {want}")
    try:
        x = np.load(io.BytesIO(body), allow_pickle=False)
    except Exception as e:
        raise BadRequest(f"npy body: cannot be read ({type(e).__name__}: {e})") from None
    if not isinstance(x, np.ndarray) or x.shape != got:  # cannot happen after the header checks
        raise BadRequest("npy body: malformed")
    with np.errstate(over="ignore", invalid="ignore"):
        x = np.ascontiguousarray(x, dtype=np.float32)
    return _finite(key, x)


def is_npy(content_type: Optional[str]) -> bool:
    """Whether a Content-Type header names the npy body (parameters ignored)."""
    return (content_type or "").split(";")[0].strip().lower() == NPY_CONTENT_TYPE


def parse_user_id(obj: dict) -> Optional[str]:
    uid = obj.get("user_id")
    if uid is None:
        return None
    if not isinstance(uid, (str, int)) or isinstance(uid, bool) or len(str(uid)) > 256:
        raise BadRequest("user_id: must be a string or integer of at most 256 characters")
    return str(uid)


# A class id must fit the log's int32 predictions.
MAX_CLASS_ID = 2 ** 31 - 1


def parse_feedback(obj: Any, where: str = "") -> tuple[str, list[int]]:
    """(request id, labels) of `{"request_id": str, "labels": [class id per row]}`;
    BadRequest naming the key (prefixed by `where`, e.g. `items[3].`) otherwise."""
    if not isinstance(obj, dict):
        raise BadRequest(f"{where.rstrip('.') or 'body'}: must be an object with request_id and labels")
    rid = obj.get("request_id")
    if not isinstance(rid, str) or not rid or len(rid) > 256:
        raise BadRequest(f"{where}request_id: must be a non-empty string of at most 256 characters")
    labels = obj.get("labels")
    if not isinstance(labels, list) or not labels or not all(
            isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_CLASS_ID for v in labels):
        raise BadRequest(f"{where}labels: must be a non-empty list of class ids (integers from 0 to {MAX_CLASS_ID})")
    return rid, [int(v) for v in labels]


def parse_feedback_batch(obj: dict, max_items: int) -> list[tuple[str, list[int]]]:
    """The items of `{"items": [{"request_id", "labels"}, ...]}`, every one checked before
    any joins (a malformed item refuses the batch, naming it)."""
    items = obj.get("items")
    if not isinstance(items, list) or not items:
        raise BadRequest("items: must be a non-empty list of {request_id, labels}")
    if len(items) > max_items:
        raise BadRequest(f"items: {len(items)} items, at most {max_items} per request", status=413)
    return [parse_feedback(item, f"items[{i}].") for i, item in enumerate(items)]


def fuse(old_probs: np.ndarray, new_probs: np.ndarray, weight: float) -> np.ndarray:
    """Serving-time fusion: (1 - w) * old + w * new probabilities.

    A generation may add classes, so the two matrices may differ in width (N, C_old) vs
    (N, C_new): the narrower one is padded with zero columns up to the wider one's
    classes (a model that does not know a class gives it probability 0), and the answer
    has max(C_old, C_new) columns, still summing to 1 per row. By hand, w = 0.5:

        old [[0.6, 0.4]]        -> padded [[0.6, 0.4, 0.0]]
        new [[0.2, 0.2, 0.6]]
        fused  [[0.4, 0.3, 0.3]]
    """
    width = max(old_probs.shape[1], new_probs.shape[1])
    old_probs, new_probs = _pad_columns(old_probs, width), _pad_columns(new_probs, width)
    return (1.0 - weight) * old_probs + weight * new_probs


def _pad_columns(probs: np.ndarray, width: int) -> np.ndarray:
    """`probs` (N, C) with zero columns appended up to (N, width)."""
    missing = width - probs.shape[1]
    return probs if missing <= 0 else np.pad(probs, ((0, 0), (0, missing)))


# --- counters ----------------------------------------------------------------------------

@dataclass
class FlipCounts:
    labelled: int = 0
    negative_flips: int = 0
    positive_flips: int = 0
    production_correct: int = 0
    candidate_correct: int = 0
    labelled_disagreements: int = 0   # labelled samples where the two predictions differ


def count_flips(labels: np.ndarray, production: np.ndarray, candidate: np.ndarray) -> FlipCounts:
    """Per-sample flips of `candidate` against `production` (PCT: negative = old right, new wrong).

    From three counts: negative = production right - both right, positive = candidate
    right - both right (a join runs this per request: one numpy call each, not four).
    """
    p_ok = production == labels
    c_ok = candidate == labels
    pc, cc, both = int(np.count_nonzero(p_ok)), int(np.count_nonzero(c_ok)), int(np.count_nonzero(p_ok & c_ok))
    return FlipCounts(labelled=int(len(labels)), negative_flips=pc - both, positive_flips=cc - both,
                      production_correct=pc, candidate_correct=cc,
                      labelled_disagreements=int(np.count_nonzero(production != candidate)))


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
    labelled_disagreements: int = 0
    timed_calls: int = 0      # calls timed (with serving.slow_call_ms set)
    slow_calls: int = 0       # of those, slower than slow_call_ms


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


class Latencies:
    """Latency windows of one router replica, by (generation, role)."""

    def __init__(self, window: int = 2048):
        self._window = window
        self._w: dict[tuple[str, str], LatencyWindow] = {}

    def add(self, generation: str, role: str, ms: float) -> None:
        w = self._w.get((generation, role))
        if w is None:
            w = self._w[(generation, role)] = LatencyWindow(self._window)
        w.add(ms)

    def snapshot(self) -> dict[str, dict[str, dict]]:
        """{generation: {role: summary}} of every window with calls."""
        out: dict[str, dict[str, dict]] = {}
        for (g, role), w in list(self._w.items()):
            out.setdefault(g, {})[role] = w.summary()
        return out


def merge_latency(summaries: Iterable[Optional[dict]]) -> dict[str, Optional[float]]:
    """One summary of several replicas' windows: calls summed, each quantile the worst
    replica's (an upper bound of the pooled quantile, never an underestimate).

    By hand: {n 10, p99 8 ms} and {n 30, p99 12 ms} -> {n 40, p99 12 ms}.
    """
    got = [s for s in summaries if s and s.get("n")]
    if not got:
        return LatencyWindow(1).summary()
    out: dict[str, Optional[float]] = {"n": int(sum(s["n"] for s in got))}
    for q in ("p50_ms", "p90_ms", "p99_ms"):
        vals = [s[q] for s in got if s.get(q) is not None]
        out[q] = max(vals) if vals else None
    return out
