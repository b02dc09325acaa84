"""Metric sources of the rollout controller: the candidate's cumulative counters.

A source answers `read(candidate) -> decision.Counts`: cumulative, monotonic counters of
the candidate against production (like Prometheus counters), or raises `SourceError`
when it cannot tell (router down, Prometheus down, no series yet). The controller takes
deltas between snapshots itself (`advance`), treating a counter that went down as a
reset (a router restart), never as negative evidence.

- `RouterSource`: `GET /v1/status` of the router (the embedded default: nothing else
  needs to run).
- `PrometheusSource`: PromQL instant queries over Prometheus's HTTP API: the router
  replicas' `ray_graceful_*` counters summed, and the prediction log's shared counts
  (`ray_graceful_log_counts`), for `generation=<candidate>`.
"""

from __future__ import annotations

import inspect
import math
import re
import time
from dataclasses import asdict, fields
from typing import Any, Callable, Optional, Protocol

import requests

from orchestrator.rollout.decision import Counts

# The counters of Counts (latency_p99_ms is a gauge: taken as read, never differenced;
# epoch identifies the counter set, it is compared, never differenced).
COUNTER_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(Counts) if f.name not in ("latency_p99_ms", "epoch"))


class SourceError(RuntimeError):
    """The source could not produce a snapshot (the decision becomes 'inconclusive')."""


class MetricSource(Protocol):
    """Cumulative counts of `candidate`. A source whose `read` also takes `baseline` (a
    keyword) fills the base_timed / base_slow counts of the latency test from it; one
    that does not is read without it (the latency test then uses the absolute limit)."""

    name: str

    def read(self, candidate: str) -> Counts: ...


def read_source(source: MetricSource, candidate: str, baseline: Optional[str]) -> Counts:
    """source.read(candidate), passing `baseline` to a source whose read takes it."""
    try:
        takes = "baseline" in inspect.signature(source.read).parameters
    except (TypeError, ValueError):
        takes = False
    return source.read(candidate, baseline=baseline) if takes else source.read(candidate)


# --- counter arithmetic (pure) -------------------------------------------------------------

def counts_to_dict(c: Counts) -> dict[str, Any]:
    """A Counts as a JSON-able dict (for the rollout's persisted `data`)."""
    return asdict(c)


def counts_from_dict(d: Optional[dict]) -> Optional[Counts]:
    """The inverse of counts_to_dict; None stays None, unknown keys are ignored."""
    if d is None:
        return None
    names = {f.name for f in fields(Counts)}
    return Counts(**{k: v for k, v in d.items() if k in names})


def add(a: Counts, b: Counts, latency_p99_ms: Optional[float] = None) -> Counts:
    """Counter-wise a + b; latency is the one given (a gauge has no sum)."""
    return Counts(**{k: getattr(a, k) + getattr(b, k) for k in COUNTER_FIELDS}, latency_p99_ms=latency_p99_ms)


# Counters that start over together. The router keeps all of them in its prediction log
# (one set, one epoch); a Prometheus source reads requests and errors from each replica's
# own counters (they reset when a replica restarts) and the comparison and label counts
# from the log's shared gauges (they do not).
COUNTER_GROUPS: tuple[tuple[str, ...], ...] = (("requests", "errors"),
                                               ("compared", "disagreements", "labelled", "negative_flips",
                                                "labelled_disagreements"),
                                               ("timed", "slow", "base_timed", "base_slow"))


def advance(last_raw: Optional[Counts], raw: Counts) -> Counts:
    """What happened between two raw cumulative snapshots, with resets handled.

    Counters of one group (`COUNTER_GROUPS`) start over together. A group was reset when
    ANY of its counters went down, and every group was when both snapshots carry an
    `epoch` (the counters' `counters_epoch`, else the router's `started_at`) and the
    epochs differ. The epoch catches a reset the controller did not see (a pause, a
    controller restart) after which every new counter already exceeds the old snapshot:
    without it, raw - last_raw would mix two counter sets (old 0 flips / 1000 labels, new
    6 / 1200 -> "6 / 200", a false regression). On a reset the increase of the group is
    its `raw` values (counted since; what happened before is lost, which only asks for
    more evidence, never gives wrong evidence). Without a previous snapshot nothing is
    known to have happened yet: zero.

    Example: last (requests 100, labelled 80, flips 3), raw (130, 100, 4) -> (30, 20, 1);
    last (100, 80, 3), raw (20, 10, 0) -> both groups reset -> (20, 10, 0), never (-80, ...);
    last (100, 80, 3), raw (200, 90, 1) -> flips went down: the label group reset ->
    (100, 90, 1); last (labels 1000, flips 0, epoch 1.0), raw (1200, 6, epoch 2.0) -> a
    reset -> (1200, 6).
    """
    if last_raw is None:
        return Counts(latency_p99_ms=raw.latency_p99_ms)
    restarted = last_raw.epoch is not None and raw.epoch is not None and raw.epoch != last_raw.epoch
    out = {}
    for group in COUNTER_GROUPS:
        reset = restarted or any(getattr(raw, k) < getattr(last_raw, k) for k in group)
        for k in group:
            out[k] = getattr(raw, k) if reset else getattr(raw, k) - getattr(last_raw, k)
    return Counts(**out, latency_p99_ms=raw.latency_p99_ms)


# --- router --------------------------------------------------------------------------------

def counts_from_status(status: dict, candidate: str, baseline: Optional[str] = None) -> Counts:
    """The candidate's counters in a router `/v1/status` answer.

    requests = requests_primary + requests_shadow; errors = errors + shadow_errors +
    shadow_timeouts; latency: the primary p99 once the candidate serves users, else the
    shadow p99 (None when neither has calls); timed / slow: timed_calls / slow_calls, and
    base_timed / base_slow the same of `baseline` (default: the router's production; 0
    when it is the candidate or absent); epoch: the counters' `counters_epoch` (the
    prediction log's: it stays when a router restarts over a durable log), else the
    router's `started_at` (None when both are absent).
    """
    gens = status.get("generations") if isinstance(status, dict) else None
    if not isinstance(gens, dict) or candidate not in gens:
        raise SourceError(f"router status has no generation {candidate!r}")
    g = gens[candidate]
    c = g.get("counters") or {}
    base = status.get("production") if baseline is None else baseline
    b = (gens.get(base) or {}).get("counters") or {} if base != candidate else {}
    try:
        counts = Counts(
            requests=int(c.get("requests_primary", 0)) + int(c.get("requests_shadow", 0)),
            errors=int(c.get("errors", 0)) + int(c.get("shadow_errors", 0)) + int(c.get("shadow_timeouts", 0)),
            compared=int(c.get("compared", 0)),
            disagreements=int(c.get("disagreements", 0)),
            labelled=int(c.get("labelled", 0)),
            negative_flips=int(c.get("negative_flips", 0)),
            labelled_disagreements=int(c.get("labelled_disagreements", 0)),
            timed=int(c.get("timed_calls", 0)), slow=int(c.get("slow_calls", 0)),
            base_timed=int(b.get("timed_calls", 0)), base_slow=int(b.get("slow_calls", 0)),
            latency_p99_ms=_router_p99(g.get("latency") or {}),
            epoch=_epoch(status.get("counters_epoch", status.get("started_at"))),
        )
    except (TypeError, ValueError) as e:
        raise SourceError(f"router status of {candidate!r} has a malformed counter ({e})") from None
    return counts


def _epoch(v: Any) -> Optional[float]:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _router_p99(latency: dict) -> Optional[float]:
    for role in ("primary", "shadow"):
        q = latency.get(role) or {}
        if q.get("n") and q.get("p99_ms") is not None:
            return float(q["p99_ms"])
    return None


class RouterSource:
    """Counters from the router's `GET /v1/status` (any object with `.status() -> dict`,
    normally serving.client.RouterClient)."""

    name = "router"

    def __init__(self, client: Any):
        self.client = client

    def read(self, candidate: str, baseline: Optional[str] = None) -> Counts:
        try:
            status = self.client.status()
        except Exception as e:  # router down, timeout, 5xx: inconclusive, never a regression
            raise SourceError(f"router status unavailable: {type(e).__name__}: {e}") from None
        return counts_from_status(status, candidate, baseline)


# --- Prometheus ----------------------------------------------------------------------------

_LABEL_VALUE = re.compile(r"^[A-Za-z0-9_.\-]+$")


def promql_queries(candidate: str, latency_window: str = "1m", baseline: Optional[str] = None) -> dict[str, str]:
    """The PromQL instant queries behind each field of Counts for `candidate`.

    Requests and errors are the replicas' own counters summed across replicas, nodes and
    roles (`sum(...)`): a restarted router makes the sum go down, which `advance` treats
    as a reset. Comparisons, labels and flips are the prediction log's shared counters,
    which every replica exports as the same gauge (`max(...)` across them); they include
    labels imported with `graceful labels import`.
    """
    for who in (candidate, baseline):
        if who is not None and not _LABEL_VALUE.match(who):
            raise SourceError(f"generation name {who!r} cannot be used in a PromQL label matcher")
    sel = f'{{generation="{candidate}"}}'

    def counter(metric: str) -> str:
        # A counter appears only after its first increment: absent is 0 (requests excepted:
        # no requests series at all means Prometheus has no data for the candidate yet).
        return f"(sum({metric}{sel}) or vector(0))"

    def shared(name: str, gen: str = candidate) -> str:
        return f'max(ray_graceful_log_counts{{generation="{gen}",counter="{name}"}})'

    return {
        "requests": f"sum(ray_graceful_requests_total{sel})",
        "errors": f"{counter('ray_graceful_errors_total')} + {counter('ray_graceful_shadow_timeouts_total')}",
        "compared": shared("compared"),
        "disagreements": shared("disagreements"),
        "labelled": shared("labelled"),
        "negative_flips": shared("negative_flips"),
        # absent from routers older than the counter: 0 (the disagreements test then says so)
        "labelled_disagreements": f'({shared("labelled_disagreements")} or vector(0))',
        "timed": f'({shared("timed_calls")} or vector(0))',
        "slow": f'({shared("slow_calls")} or vector(0))',
        **({"base_timed": f'({shared("timed_calls", baseline)} or vector(0))',
            "base_slow": f'({shared("slow_calls", baseline)} or vector(0))'} if baseline else {}),
        "latency_p99_ms": f"histogram_quantile(0.99, sum by (le) "
                          f"(rate(ray_graceful_latency_ms_bucket{sel}[{latency_window}])))",
    }


class PrometheusSource:
    """Counters from a Prometheus server scraping Ray's metrics endpoint."""

    name = "prometheus"

    def __init__(self, url: str, timeout_s: float = 5.0, latency_window: str = "1m",
                 session: Optional[requests.Session] = None, clock: Callable[[], float] = time.time):
        self.url = url.rstrip("/")
        self.clock = clock
        self.timeout_s = timeout_s
        self.latency_window = latency_window
        self._session = session or requests.Session()

    def query(self, promql: str, at: Optional[float] = None) -> Optional[float]:
        """One instant query evaluated at unix time `at` (Prometheus' "now" when None); the
        value of its single sample, None when the answer is empty.

        SourceError when Prometheus is unreachable, answers with an error or with a body
        that is not a Prometheus answer."""
        params: dict[str, Any] = {"query": promql}
        if at is not None:
            params["time"] = f"{at:.3f}"
        try:
            r = self._session.get(f"{self.url}/api/v1/query", params=params, timeout=self.timeout_s)
            body = r.json()
        except (requests.RequestException, ValueError) as e:
            raise SourceError(f"prometheus at {self.url} unavailable: {type(e).__name__}: {e}") from None
        if not isinstance(body, dict):
            raise SourceError(f"prometheus answer is not a JSON object ({r.status_code}): {body!s:.200}")
        if r.status_code != 200 or body.get("status") != "success":
            raise SourceError(f"prometheus query failed ({r.status_code}): {body.get('error', body)!s:.200} "
                              f"[{promql}]")
        data = body.get("data")
        result = (data.get("result") if isinstance(data, dict) else None) or []
        if not isinstance(result, list):
            raise SourceError(f"prometheus answer not understood: {result!s:.200}")
        if not result:
            return None
        if len(result) > 1:
            raise SourceError(f"prometheus query returned {len(result)} series, expected one: {promql}")
        try:
            return float(result[0]["value"][1])
        except (KeyError, IndexError, TypeError, ValueError):
            raise SourceError(f"prometheus answer not understood: {result[0]!s:.200}") from None

    def read(self, candidate: str, baseline: Optional[str] = None) -> Counts:
        """Every query of one read is evaluated at the same instant, so that labelled and
        negative_flips (etc.) come from the same scrapes."""
        at = self.clock()
        values: dict[str, Any] = {}
        for key, q in promql_queries(candidate, self.latency_window, baseline).items():
            v = self.query(q, at)
            if key == "requests" and v is None:
                raise SourceError(f"prometheus has no ray_graceful_requests_total series for {candidate!r} yet")
            if key == "latency_p99_ms":
                values[key] = v if v is not None and math.isfinite(v) else None
            elif v is None:
                raise SourceError(f"prometheus has no answer for {key} of {candidate!r}")
            elif not math.isfinite(v) or v < 0:
                raise SourceError(f"prometheus answered {v} for the counter {key} of {candidate!r}")
            else:
                values[key] = int(round(v))
        return Counts(**values)


def source_for(cfg: Any, client: Any) -> MetricSource:
    """The metric source `rollout.metric_source` of run config `cfg` names (`client`: the
    router's `serving.client.RouterClient`, read by the router source)."""
    if cfg.rollout.metric_source == "prometheus":
        return PrometheusSource(cfg.rollout.prometheus_url, cfg.rollout.prometheus_query_timeout_s,
                                cfg.rollout.prometheus_latency_window)
    return RouterSource(client)
