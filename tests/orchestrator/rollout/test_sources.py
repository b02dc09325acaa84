"""Metric sources: counter arithmetic with resets, router status parsing, PromQL answers.

PrometheusSource is checked here against canned HTTP answers (parsing and error paths);
tests/integration/test_prometheus.py checks it against a real Prometheus server."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import pytest

from orchestrator.rollout.decision import Counts
from orchestrator.rollout.sources import (PrometheusSource, RouterSource, SourceError, add, advance, counts_from_dict,
                                  counts_from_status, counts_to_dict, promql_queries)


def test_advance_takes_differences_and_treats_a_decrease_as_a_reset():
    last = Counts(requests=100, labelled=80, negative_flips=3, latency_p99_ms=9.0)
    assert advance(last, Counts(requests=130, labelled=100, negative_flips=4, latency_p99_ms=7.0)) == \
        Counts(requests=30, labelled=20, negative_flips=1, latency_p99_ms=7.0)
    # router restart: every counter from 0; 20 requests since -> (20, ...) never (-80, ...)
    assert advance(last, Counts(requests=20, labelled=10, negative_flips=0)) == Counts(requests=20, labelled=10)
    # one counter down is enough to call its group reset (they start over together); the
    # request group, which grew, is a difference
    assert advance(last, Counts(requests=200, labelled=90, negative_flips=1)) == \
        Counts(requests=100, labelled=90, negative_flips=1)
    assert advance(last, Counts(requests=50, labelled=100, negative_flips=4)) == \
        Counts(requests=50, labelled=20, negative_flips=1)
    assert advance(None, Counts(requests=5, latency_p99_ms=3.0)) == Counts(latency_p99_ms=3.0)


def test_counts_round_trip_and_add():
    c = Counts(1, 2, 3, 4, 5, 6, 7.5)
    assert counts_from_dict(json.loads(json.dumps(counts_to_dict(c)))) == c
    assert counts_from_dict(None) is None
    assert add(Counts(1, 0, 2, 1, 3, 1), Counts(2, 1, 2, 0, 1, 0), 4.0) == Counts(3, 1, 4, 1, 4, 1, 4.0)


STATUS = {"production": "g0", "generations": {"g1": {
    "counters": {"requests_primary": 7, "requests_shadow": 40, "errors": 1, "shadow_errors": 2,
                 "shadow_timeouts": 3, "compared": 160, "disagreements": 9, "labelled": 150,
                 "negative_flips": 3, "positive_flips": 5},
    "latency": {"primary": {"n": 7, "p99_ms": 12.5}, "shadow": {"n": 40, "p99_ms": 7.9}}},
    "g0": {"counters": {}, "latency": {}}}}


def test_router_status_maps_to_candidate_counts():
    # requests 7 + 40; errors 1 + 2 + 3; latency: primary p99 once it serves users
    assert counts_from_status(STATUS, "g1") == Counts(47, 6, 160, 9, 150, 3, 12.5)
    shadow_only = json.loads(json.dumps(STATUS))
    shadow_only["generations"]["g1"]["latency"]["primary"] = {"n": 0, "p99_ms": None}
    assert counts_from_status(shadow_only, "g1").latency_p99_ms == 7.9
    with pytest.raises(SourceError, match="g9"):
        counts_from_status(STATUS, "g9")


def test_router_source_turns_router_failures_into_source_errors():
    class Down:
        def status(self):
            raise ConnectionError("refused")

    class Up:
        def status(self):
            return STATUS

    with pytest.raises(SourceError, match="refused"):
        RouterSource(Down()).read("g1")
    assert RouterSource(Up()).read("g1").requests == 47


def test_promql_names_the_candidate_and_refuses_injection():
    q = promql_queries("g1", "30s")
    assert q["requests"] == 'sum(ray_graceful_requests_total{generation="g1"})'
    assert "[30s]" in q["latency_p99_ms"] and "histogram_quantile(0.99" in q["latency_p99_ms"]
    with pytest.raises(SourceError):
        promql_queries('g1"} or vector(1) or {x="', "1m")


class _FakeProm(BaseHTTPRequestHandler):
    answers: dict = {}
    seen: list = []

    def log_message(self, *a):
        pass

    def do_GET(self):
        params = parse_qs(urlparse(self.path).query)
        q = params["query"][0]
        _FakeProm.seen.append((q, params.get("time", [None])[0]))
        status, body = self.answers.get("*") or next(
            ((s, b) for k, (s, b) in self.answers.items() if k in q), (200, _vec(0)))
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def _vec(v):
    return {"status": "success", "data": {"resultType": "vector", "result": [{"metric": {}, "value": [0, str(v)]}]}}


@pytest.fixture
def fake_prom():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _FakeProm)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def test_prometheus_source_parses_answers_and_reports_gaps(fake_prom):
    _FakeProm.answers = {"requests_total": (200, _vec(47)), "negative_flips": (200, _vec(3)),
                         'counter="labelled"': (200, _vec(150)), "histogram_quantile": (200, _vec("NaN"))}
    c = PrometheusSource(fake_prom).read("g1")
    assert (c.requests, c.labelled, c.negative_flips, c.latency_p99_ms) == (47, 150, 3, None)
    _FakeProm.answers = {"*": (200, {"status": "success", "data": {"resultType": "vector", "result": []}})}
    with pytest.raises(SourceError, match="no ray_graceful_requests_total"):
        PrometheusSource(fake_prom).read("g1")
    _FakeProm.answers = {"*": (400, {"status": "error", "error": "parse error"})}
    with pytest.raises(SourceError, match="parse error"):
        PrometheusSource(fake_prom).read("g1")
    with pytest.raises(SourceError, match="unavailable"):
        PrometheusSource("http://127.0.0.1:9", timeout_s=1).read("g1")


def test_advance_treats_a_changed_router_epoch_as_a_reset_even_when_every_counter_grew():
    # The router restarted while nobody was reading (a pause, a controller restart): the
    # new counters already exceed the old snapshot. Without the epoch, 1200 - 1000 labels
    # with 6 - 0 flips would read as 6 flips in 200 labels (LLR 5.4 at limit 1 %: rollback).
    old = Counts(requests=1000, labelled=1000, negative_flips=0, epoch=1.0)
    new = Counts(requests=1200, labelled=1200, negative_flips=6, epoch=2.0)
    assert advance(old, new) == Counts(requests=1200, labelled=1200, negative_flips=6)
    # same epoch: a plain difference; an unknown epoch (old persisted data) falls back to decreases
    assert advance(old, Counts(requests=1200, labelled=1200, negative_flips=6, epoch=1.0)) == \
        Counts(requests=200, labelled=200, negative_flips=6)
    assert advance(Counts(requests=1000, labelled=1000), new) == Counts(requests=200, labelled=200, negative_flips=6)


def test_router_status_carries_the_router_start_time_as_epoch():
    status = {**STATUS, "started_at": 1700000000.25}
    assert counts_from_status(status, "g1").epoch == 1700000000.25
    assert counts_from_status(STATUS, "g1").epoch is None
    assert counts_from_status({**STATUS, "started_at": "x"}, "g1").epoch is None


def test_router_status_epoch_is_the_prediction_logs_when_it_has_one():
    # A router restarted over a durable log continues its counters: same counters_epoch,
    # another started_at; the epoch the controller compares is the log's.
    status = {**STATUS, "started_at": 1700000999.0, "counters_epoch": 1700000000.25}
    assert counts_from_status(status, "g1").epoch == 1700000000.25


def test_promql_reads_comparisons_and_labels_from_the_logs_shared_gauge():
    q = promql_queries("g1", "1m")
    assert q["labelled"] == 'max(ray_graceful_log_counts{generation="g1",counter="labelled"})'
    assert q["negative_flips"].startswith("max(") and q["requests"].startswith("sum(")


def test_prometheus_read_evaluates_every_query_at_one_instant(fake_prom):
    _FakeProm.answers, _FakeProm.seen = {"requests_total": (200, _vec(47))}, []
    PrometheusSource(fake_prom, clock=lambda: 1700000000.5).read("g1")
    assert len(_FakeProm.seen) == len(promql_queries("g1")) and {t for _, t in _FakeProm.seen} == {"1700000000.500"}


@pytest.mark.parametrize("answer", [
    (200, _vec("NaN")), (200, _vec("+Inf")), (200, _vec("-1")),        # a counter that is not a count
    (200, ["not", "an", "object"]), (200, b"42"), (200, b"null"),     # JSON, but not a Prometheus answer
    (200, {"status": "success", "data": "x"}),
    (200, {"status": "success", "data": {"result": {"a": 1}}})])
def test_prometheus_nonsense_is_a_source_error(fake_prom, answer):
    # A ValueError/OverflowError/AttributeError would end the tick as "error", which never
    # counts toward max_source_errors; a SourceError is inconclusive and counted.
    _FakeProm.answers = {"requests_total": (200, _vec(47)), 'counter="labelled"': answer}
    with pytest.raises(SourceError):
        PrometheusSource(fake_prom).read("g1")
