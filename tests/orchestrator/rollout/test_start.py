"""`start_rollout`'s offline gate reads the three-way verdict of the latest evaluation: an
inconclusive one (too little test data to decide) is refused, naming why, unless
gates.allow_inconclusive lets the live rollout decide."""

from __future__ import annotations

import hashlib

import pytest

from orchestrator.config import parse_config
from orchestrator.registry import Registry
from orchestrator.rollout.start import RolloutRefused, gate_verdict, start_rollout
from tests.orchestrator.rollout.test_controller import GOOD, FakeRouter, FakeSource


def _env(tmp_path, **gates):
    cfg = parse_config({"run_dir": str(tmp_path), "generations": [{"name": "g0"}, {"name": "g1"}],
                        "serving": {"admin_token": "unit-admin-token-1"}, "rollout": {"metrics_port": 0},
                        "gates": gates})
    reg = Registry(tmp_path / "registry.sqlite")
    for name, parent in (("g0", None), ("g1", "g0")):
        f = tmp_path / f"{name}.pt"
        f.write_bytes(name.encode() * 100)
        reg.add_generation(name, parent, "mlp", "h", str(f), hashlib.sha256(f.read_bytes()).hexdigest())
    reg.set_status("g0", "production", "test", "bootstrap")
    return cfg, reg


def _record(reg, verdict, reasons=("NFR (1/171) 0.0058, bounds [0.0001, 0.0367]: INCONCLUSIVE",)):
    """An evaluation recorded as `evaluate` records it: the verdict in the metrics."""
    sha = {n: reg.generation(n).sha256 for n in ("g0", "g1")}
    return reg.record_evaluation("g1", "g0", {"verdict": verdict, "candidate_sha256": sha["g1"],
                                              "baseline_sha256": sha["g0"]},
                                 verdict == "pass", [] if verdict == "pass" else list(reasons))


def test_an_inconclusive_evaluation_is_refused_naming_why(tmp_path):
    cfg, reg = _env(tmp_path)
    eid = _record(reg, "inconclusive")
    passed, why = gate_verdict(reg, "g1", "g0")
    assert passed is False and why.startswith(f"evaluation {eid} against 'g0' was inconclusive: the test set is "
                                              f"too small to decide")
    assert "evaluate on more data, or set gates.allow_inconclusive to let the live rollout decide" in why
    assert "NFR (1/171)" in why
    with pytest.raises(RolloutRefused, match="inconclusive: the test set is too small to decide") as e:
        start_rollout(cfg, reg, FakeRouter(("g0", "g1")), FakeSource(GOOD), "g1", "tester", "go")
    assert "--skip-gate overrides" in str(e.value) and "run `graceful evaluate" not in str(e.value)
    assert reg.latest_rollout("g1") is None
    reg.close()


def test_allow_inconclusive_lets_the_live_rollout_decide_and_says_so(tmp_path):
    cfg, reg = _env(tmp_path, allow_inconclusive=True)
    eid = _record(reg, "inconclusive")
    assert gate_verdict(reg, "g1", "g0", allow_inconclusive=True)[0] is True
    r = start_rollout(cfg, reg, FakeRouter(("g0", "g1")), FakeSource(GOOD), "g1", "tester", "go")
    started = [e for e in reg.events("g1") if e.action == "rollout_started"][-1]
    assert r.state == "shadow"
    assert f"evaluation {eid} against 'g0' was inconclusive; gates.allow_inconclusive" in started.reason
    reg.close()


def test_allow_inconclusive_does_not_let_a_failure_through(tmp_path):
    cfg, reg = _env(tmp_path, allow_inconclusive=True)
    _record(reg, "fail", ["NFR (20/171): FAIL, lower bound 0.0600 > max_nfr 0.0200"])
    with pytest.raises(RolloutRefused, match=r"failed: NFR \(20/171\): FAIL"):
        start_rollout(cfg, reg, FakeRouter(("g0", "g1")), FakeSource(GOOD), "g1", "tester", "go")
    reg.close()


def test_a_record_without_a_verdict_is_read_from_passed(tmp_path):
    """Evaluations recorded before the three-way gate: `passed` decides."""
    _, reg = _env(tmp_path)
    sha = {n: reg.generation(n).sha256 for n in ("g0", "g1")}
    reg.record_evaluation("g1", "g0", {"candidate_sha256": sha["g1"], "baseline_sha256": sha["g0"]}, True, [])
    assert gate_verdict(reg, "g1", "g0")[0] is True
    reg.record_evaluation("g1", "g0", {"candidate_sha256": sha["g1"], "baseline_sha256": sha["g0"]}, False, ["x"])
    assert gate_verdict(reg, "g1", "g0") == (False, f"evaluation {reg.evaluations('g1')[-1]['id']} against 'g0' failed: x")
    reg.close()
