"""Rollouts: shadow -> canary steps -> promoted, or rolled back.

    decision      the statistical rule, pure: decide(observation, step, policy)
    plan          the router plans a persisted rollout implies, pure
    start         start_rollout: the checks every entry point obeys (gate, baseline, attach)
    controller    the tick's phases (lease, commands, reconcile, decide, act)
    sources       metric sources behind one Protocol (router, Prometheus)
    http          the controller's endpoint and the Alertmanager webhook
    metric_names  the controller's Prometheus names (an API)
"""

from orchestrator.rollout.controller import Controller, ControllerStopped, TickResult, TrafficRouter
from orchestrator.rollout.decision import Counts, Decision, Observation, decide
from orchestrator.rollout.plan import ReconcileError, desired_traffic, next_position, registry_plan, traffic_matches
from orchestrator.rollout.sources import MetricSource, PrometheusSource, RouterSource, SourceError
from orchestrator.rollout.start import RolloutRefused, begin_rollout, gate_verdict, start_rollout

__all__ = ["Controller", "ControllerStopped", "TickResult", "TrafficRouter", "Counts", "Decision", "Observation",
           "decide", "ReconcileError", "desired_traffic", "next_position", "registry_plan", "traffic_matches",
           "MetricSource", "PrometheusSource", "RouterSource", "SourceError", "RolloutRefused", "begin_rollout",
           "gate_verdict", "start_rollout"]
