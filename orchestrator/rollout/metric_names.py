"""Prometheus metric names the rollout controller exports: an API, like
`serving/metric_names.py` for the router (dashboards and alert rules use exactly these).

Exported with `prometheus_client` from the controller's own HTTP endpoint
(`rollout.metrics_port`), so without Ray's `ray_` prefix. Counters carry the `_total`
suffix in the exposition, as `EXPORTED` lists.
"""

from __future__ import annotations

# name -> (type, labels, help)
DEFINED: dict[str, tuple[str, tuple[str, ...], str]] = {
    "graceful_rollout_state": ("gauge", ("candidate", "state"),
                               "1 for the rollout's current state (shadow, canary, paused, frozen, "
                               "guarding, promoted, rolled_back), 0 for the others"),
    "graceful_rollout_step": ("gauge", ("candidate",), "current canary step index (0 = shadow, 1.. = canary steps)"),
    "graceful_rollout_candidate_weight": ("gauge", ("candidate",), "share of traffic the controller gave the candidate"),
    "graceful_rollout_live_nfr": ("gauge", ("candidate",), "live negative flip rate the last tick decided on"),
    "graceful_rollout_decisions": ("counter", ("candidate", "decision"),
                                   "decisions by kind: promote, hold, rollback, inconclusive, error"),
    "graceful_rollout_rollbacks": ("counter", ("candidate", "actor"), "rollbacks by who caused them: controller, operator, alert"),
    "graceful_controller_tick_errors": ("counter", (), "controller ticks that raised (counted, logged, loop goes on)"),
    "graceful_controller_metric_source_errors": ("counter", ("source",), "failed reads of the metric source"),
    "graceful_controller_last_tick_timestamp_seconds": ("gauge", (), "unix time of the last completed tick"),
}

STATES = ("shadow", "canary", "paused", "frozen", "guarding", "promoted", "rolled_back")
DECISIONS = ("promote", "hold", "rollback", "inconclusive", "error")

EXPORTED: list[str] = sorted(
    name + ("_total" if kind == "counter" else "")
    for name, (kind, _, _) in DEFINED.items()
)
