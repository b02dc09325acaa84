"""The traffic plans the registry implies (pure)."""

from __future__ import annotations

import pytest

from orchestrator.registry import RolloutRecord, RolloutState
from orchestrator.rollout.plan import ReconcileError, registry_plan
from orchestrator.rollout.http import alert_rollbacks


def _rollout(state, weight=0.0, paused_from=None):
    return RolloutRecord(1, "g2", "g1", RolloutState(state), 1, weight,
                         RolloutState(paused_from) if paused_from else None, 0.0, 0.0, 0.0, None)


def test_without_a_rollout_production_serves_everything_and_asked_shadows_mirror():
    plan = registry_plan("g1", None, ["g0", "g1", "g3"], ["g3", "g1"])
    assert plan == {"weights": {"g0": 0.0, "g1": 1.0, "g3": 0.0}, "shadows": ["g3"], "production": "g1"}


def test_an_active_rollout_keeps_its_persisted_weight_paused_ones_too():
    """canary at 0.25: g2 0.25, g1 0.75, g2 still mirrored; paused from canary: the same."""
    for r in (_rollout("canary", 0.25), _rollout("paused", 0.25, paused_from="canary")):
        plan = registry_plan("g1", r, ["g1", "g2"])
        assert plan["weights"] == pytest.approx({"g1": 0.75, "g2": 0.25})
        assert plan["shadows"] == ["g2"] and plan["production"] == "g1"


def test_a_finished_rollout_is_not_replayed_and_production_must_be_attached():
    assert registry_plan("g1", _rollout("rolled_back"), ["g1", "g2"])["weights"] == {"g1": 1.0, "g2": 0.0}
    with pytest.raises(ReconcileError, match="production 'g1' is not attached"):
        registry_plan("g1", None, ["g0"])


def test_alert_rollbacks_takes_firing_alerts_of_the_candidate_only():
    """Two firing alerts for g1 (one with a summary), one resolved, one for g0 ->
    (["alert A", "alert B: flips"], 2)."""
    body = {"alerts": [
        {"status": "firing", "labels": {"alertname": "A", "candidate": "g1"}},
        {"status": "firing", "labels": {"alertname": "B", "generation": "g1"}, "annotations": {"summary": "flips"}},
        {"status": "resolved", "labels": {"alertname": "C", "candidate": "g1"}},
        {"status": "firing", "labels": {"alertname": "D", "candidate": "g0"}}]}
    assert alert_rollbacks(body, "g1") == (["alert A", "alert B: flips"], 2)
    assert alert_rollbacks(body, None) == ([], 4)
    with pytest.raises(ValueError, match="'alerts' list"):
        alert_rollbacks({"alerts": "x"}, "g1")
