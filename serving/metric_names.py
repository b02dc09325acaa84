"""Prometheus metric names the router exports: an API (dashboards and alerts use them).

Defined through `ray.serve.metrics` under the names in `DEFINED`; Ray's metrics agent
exports them with a `ray_` prefix, as `EXPORTED` lists (checked against a live Ray
Prometheus endpoint by tests/integration/test_serving.py): counters with a `_total`
suffix, histograms as `_bucket`, `_sum` and `_count` series, gauges as defined. A counter
appears only after its first increment.
Ray Serve adds the labels `deployment`, `replica`, `application` to each.
"""

from __future__ import annotations

PREFIX = "ray_"

# name -> (type, labels of ours, help)
DEFINED: dict[str, tuple[str, tuple[str, ...], str]] = {
    "graceful_requests": ("counter", ("generation", "role"),
                          "requests sent to a generation; role primary (answered) or shadow (mirrored)"),
    "graceful_errors": ("counter", ("generation", "role"), "failed model calls by generation and role"),
    "graceful_shadow_timeouts": ("counter", ("generation",), "shadow calls slower than serving.shadow_timeout_s"),
    "graceful_shadow_dropped": ("counter", ("generation",), "shadow copies not sent: too many in flight"),
    "graceful_compared_samples": ("counter", ("generation",),
                                  "samples predicted by both production and this candidate"),
    "graceful_disagreements": ("counter", ("generation",), "compared samples where the predicted classes differ"),
    "graceful_labelled_samples": ("counter", ("generation",),
                                  "samples with a label joined to production's and this candidate's predictions"),
    "graceful_negative_flips": ("counter", ("generation",), "labelled samples production got right and this candidate wrong"),
    "graceful_positive_flips": ("counter", ("generation",), "labelled samples production got wrong and this candidate right"),
    "graceful_bad_requests": ("counter", ("route", "status"), "requests refused with a 4xx"),
    "graceful_feedback": ("counter", ("outcome",),
                          "labelled requests by outcome: joined, partial, duplicate, unknown, mismatched"),
    "graceful_latency_ms": ("histogram", ("generation", "role"), "model call latency seen by the router, ms"),
    "graceful_traffic_weight": ("gauge", ("generation",), "current share of traffic served by a generation"),
    "graceful_shadow_enabled": ("gauge", ("generation",), "1 when a generation receives shadow copies"),
    "graceful_log_counts": ("gauge", ("generation", "counter"),
                            "the prediction log's shared cumulative counters (every replica exports the same "
                            "values: take max across replicas); includes labels imported by the CLI"),
    "graceful_prediction_log": ("gauge", ("field",),
                                "the prediction log: requests and bytes kept, writes pending, dropped, write errors"),
}

# The counters of the log exported by `graceful_log_counts`.
LOG_GAUGE_COUNTERS = ("compared", "disagreements", "labelled", "negative_flips", "positive_flips",
                      "requests_primary", "requests_shadow", "labelled_disagreements", "timed_calls",
                      "slow_calls")

EXPORTED: list[str] = sorted(
    PREFIX + name + suffix
    for name, (kind, _, _) in DEFINED.items()
    for suffix in {"histogram": ("_bucket", "_sum", "_count"), "counter": ("_total",)}.get(kind, ("",))
)

LATENCY_BUCKETS_MS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000]
