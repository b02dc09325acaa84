"""Rollout controller state machine on a real SQLite registry, with a fake router and a
fake metric source (pure logic; the same paths run against real Ray Serve in
tests/integration/test_rollout.py and real Prometheus in test_prometheus.py)."""

from __future__ import annotations

import json
import socket
import time

import pytest
import requests

from orchestrator.rollout import metric_names
from orchestrator.config import parse_config
from orchestrator.rollout.controller import Controller, ControllerStopped
from orchestrator.rollout.plan import desired_traffic
from orchestrator.rollout.start import begin_rollout
from orchestrator.rollout.decision import Counts
from orchestrator.registry import Registry
from orchestrator.rollout.sources import SourceError, add
from tests.helpers import free_port

TOKEN = "unit-admin-token-1"
SHA = "0" * 64


class FakeRouter:
    """The router's plan and its admin API rules: weights cover every generation, sum to 1."""

    def __init__(self, gens=("g0", "g1")):
        self.production = gens[0]
        self.weights = {g: 1.0 if g == gens[0] else 0.0 for g in gens}
        self.shadows = [g for g in gens[1:]]
        self.calls = 0
        self.fail_set = 0        # set_traffic calls that fail next
        self.fail_status = 0

    def status(self):
        if self.fail_status:
            self.fail_status -= 1
            raise RuntimeError("router unreachable")
        return {"production": self.production, "weights": dict(self.weights), "shadows": list(self.shadows)}

    def set_traffic(self, weights, shadows=None, production=None):
        if self.fail_set:
            self.fail_set -= 1
            raise ConnectionError("router went away")
        assert set(weights) == set(self.weights) and abs(sum(weights.values()) - 1) < 1e-9
        production = production or self.production
        assert production not in (shadows or [])
        self.calls += 1
        self.weights, self.production = dict(weights), production
        if shadows is not None:
            self.shadows = list(shadows)
        return {}


class FakeSource:
    """Cumulative counters growing by `per_read` at every read; `fail` reads raise."""

    name = "fake"

    def __init__(self, per_read: Counts):
        self.per_read = per_read
        self.now = Counts()
        self.fail = 0

    def read(self, candidate):
        if self.fail:
            self.fail -= 1
            raise SourceError("source down")
        self.now = add(self.now, self.per_read, self.per_read.latency_p99_ms)
        return self.now


GOOD = Counts(requests=100, compared=50, disagreements=0, labelled=50, negative_flips=0, latency_p99_ms=5.0)
BAD = Counts(requests=50, compared=50, disagreements=25, labelled=50, negative_flips=20, latency_p99_ms=5.0)


def _cfg(tmp_path, **rollout):
    ro = {"shadow_bake_seconds": 0, "nfr_limit": 0.1, "tick_seconds": 0.05, "max_source_errors": 3,
          "steps": [{"weight": w, "bake_seconds": 0, "min_requests": 20, "min_labels": 20} for w in (0.1, 0.3, 0.6)]}
    ro.update(rollout)
    return parse_config({"run_dir": str(tmp_path), "generations": [{"name": "g0"}, {"name": "g1"}],
                         "serving": {"admin_token": TOKEN}, "rollout": ro})


@pytest.fixture
def env(tmp_path):
    cfg = _cfg(tmp_path)
    reg = Registry(tmp_path / "registry.sqlite")
    for name, parent in (("g0", None), ("g1", "g0")):
        reg.add_generation(name, parent, "mlp", "h", f"/x/{name}.pt", SHA if name == "g0" else "1" * 64)
    router, source = FakeRouter(), FakeSource(GOOD)
    r = begin_rollout(reg, source, "g1", "g0", "tester", "unit test")
    yield cfg, reg, router, source, r
    reg.close()


def _successor(cfg, reg, router, source, k=1):
    """The controller a restart brings up after the k-th crash: another process, whose
    clock is past the dead holder's lease (so it may take the rollout over)."""
    offset = k * (cfg.rollout.lease_seconds + 1)
    return Controller(cfg, reg, router, source, clock=lambda: time.time() + offset)


def _moves(reg):
    return [(e.action, e.from_state, e.to_state, e.data.get("step")) for e in reg.events("g1")
            if e.from_state is not None and e.to_state is not None and e.action != "status"]


def _value(ctl, name, **labels):
    v = ctl.metrics.registry.get_sample_value(name, labels)
    return 0.0 if v is None else v


def test_good_candidate_walks_every_step_in_order_then_promotes(env):
    cfg, reg, router, source, r = env
    ctl = Controller(cfg, reg, router, source)
    seen = []
    for _ in range(10):
        res = ctl.tick()
        seen.append((res.state, res.step, round(router.weights["g1"], 3), router.production))
        if res.final:
            break
    assert seen == [("canary", 1, 0.1, "g0"), ("canary", 2, 0.3, "g0"), ("canary", 3, 0.6, "g0"),
                    ("promoted", 3, 1.0, "g1")]
    assert router.shadows == []  # promoted: g1 is production, nobody shadows it
    assert _moves(reg) == [("advance", "shadow", "canary", 1), ("advance", "canary", "canary", 2),
                           ("advance", "canary", "canary", 3), ("promote", "canary", "promoted", 3)]
    assert reg.generation("g1").status == "production" and reg.generation("g0").status == "retired"
    assert _value(ctl, "graceful_rollout_state", candidate="g1", state="promoted") == 1
    assert _value(ctl, "graceful_rollout_state", candidate="g1", state="canary") == 0
    assert _value(ctl, "graceful_rollout_decisions_total", candidate="g1", decision="promote") == 4
    assert _value(ctl, "graceful_rollout_candidate_weight", candidate="g1") == 1.0


def test_a_held_step_keeps_its_evidence_window_and_waits_for_bake(tmp_path, env):
    _, reg, router, source, r = env
    cfg = _cfg(tmp_path, shadow_bake_seconds=100)
    clock = [time.time()]
    ctl = Controller(cfg, reg, router, source, clock=lambda: clock[0])
    res = ctl.tick()
    assert res.decision == "hold" and "bake" in res.reason and res.state == "shadow"
    clock[0] += 101
    res = ctl.tick()
    assert (res.decision, res.state, res.step) == ("promote", "canary", 1)
    # the decision saw the evidence of both reads: 100 labels since the start
    assert res.stats["labelled"] == 100


def test_bad_candidate_is_rolled_back_and_unshadowed(env):
    cfg, reg, router, source, r = env
    source.per_read = BAD
    ctl = Controller(cfg, reg, router, source)
    res = ctl.tick()
    assert (res.decision, res.state) == ("rollback", "rolled_back")
    assert router.weights == {"g0": 1.0, "g1": 0.0} and router.shadows == [] and router.production == "g0"
    assert reg.generation("g1").status == "rolled_back"
    assert _value(ctl, "graceful_rollout_rollbacks_total", candidate="g1", actor="controller") == 1
    assert ctl.tick().decision is None  # final: no more decisions
    assert _moves(reg) == [("rollback", "shadow", "rolled_back", 0)]


def test_crash_between_persist_and_router_update_heals_on_restart(env):
    cfg, reg, router, source, r = env
    ctl = Controller(cfg, reg, router, source)
    router.fail_set = 1                   # the router update after the first transition fails
    res = ctl.tick()
    assert res.decision == "error" and "router not updated" in res.reason
    assert reg.rollout(r.id).state == "canary" and router.weights["g1"] == 0.0   # persisted, router behind
    assert _value(ctl, "graceful_controller_tick_errors_total") == 1
    # a new process (the old one died): reconcile on start heals, then it goes on from step 1
    ctl2 = _successor(cfg, reg, router, source)
    assert ctl2.reconcile() is True and router.weights["g1"] == pytest.approx(0.1)
    assert ctl2.reconcile() is False      # idempotent
    res = ctl2.tick()
    assert (res.state, res.step) == ("canary", 2)
    assert [m[3] for m in _moves(reg)] == [1, 2]  # no step repeated or skipped


def test_killed_controller_resumes_from_the_persisted_step(env):
    cfg, reg, router, source, r = env
    Controller(cfg, reg, router, source).tick()          # -> canary 1
    _successor(cfg, reg, router, source, 1).tick()       # a fresh process: -> canary 2
    ctl = _successor(cfg, reg, router, source, 2)
    while not ctl.tick().final:
        pass
    assert _moves(reg) == [("advance", "shadow", "canary", 1), ("advance", "canary", "canary", 2),
                           ("advance", "canary", "canary", 3), ("promote", "canary", "promoted", 3)]
    # a stale controller deciding from an old position cannot move the rollout again
    r_old = reg.rollout(r.id)
    assert ctl.tick().transition is None and reg.rollout(r.id) == r_old


def test_operator_commands_act_within_one_tick_and_are_audited(env):
    cfg, reg, router, source, r = env
    ctl = Controller(cfg, reg, router, source)
    ctl.tick()                                                     # canary 1
    reg.enqueue_command(r.id, "pause", "alice", "looking at a dashboard")
    res = ctl.tick()
    assert res.state == "paused" and any("pause" in c for c in res.commands)
    for _ in range(3):                                             # paused holds
        assert ctl.tick().state == "paused"
    assert router.weights["g1"] == pytest.approx(0.1)              # weights kept while paused
    reg.enqueue_command(r.id, "resume", "alice", "fine")
    res = ctl.tick()
    assert (res.state, res.step) == ("canary", 1)                 # resumed where it paused
    reg.enqueue_command(r.id, "rollback", "bob", "customer complaints")
    res = ctl.tick()
    assert res.state == "rolled_back" and router.weights["g1"] == 0.0
    ev = [e for e in reg.events("g1") if e.action in ("pause", "resume", "rollback")]
    assert [(e.action, e.actor, e.reason) for e in ev] == [
        ("pause", "alice", "looking at a dashboard"), ("resume", "alice", "fine"),
        ("rollback", "bob", "customer complaints")]
    assert reg.pending_commands(r.id) == []
    assert _value(ctl, "graceful_rollout_rollbacks_total", candidate="g1", actor="operator") == 1


def _tick_until_final(ctl, most=10):
    for _ in range(most):
        res = ctl.tick()
        if res.final:
            break
    return res


def test_a_paused_rollout_never_promotes_but_still_rolls_back_by_itself(env):
    cfg, reg, router, source, r = env
    ctl = Controller(cfg, reg, router, source)
    ctl.tick()                                                     # canary 1
    reg.enqueue_command(r.id, "pause", "alice", "a look first")
    assert ctl.tick().state == "paused"
    held = [ctl.tick() for _ in range(3)]                          # good evidence: would promote
    assert all(x.state == "paused" and x.decision == "hold" and "paused: the rule would promote" in x.reason
               for x in held)
    source.per_read = BAD
    res = _tick_until_final(ctl)
    assert (res.state, res.decision) == ("rolled_back", "rollback") and router.weights["g1"] == 0.0
    assert _moves(reg)[-1] == ("rollback", "paused", "rolled_back", 1)


def test_a_frozen_rollout_does_nothing_automatic_until_resumed(env):
    """Frozen: no decision at all, an Alertmanager rollback is ignored, an operator's
    rollback or resume still applies; after resume the rule acts on the evidence."""
    cfg, reg, router, source, r = env
    ctl = Controller(cfg, reg, router, source)
    ctl.tick()                                                     # canary 1
    reg.enqueue_command(r.id, "freeze", "alice", "incident elsewhere")
    res = ctl.tick()
    assert res.state == "frozen" and reg.rollout(r.id).paused_from == "canary"
    source.per_read = BAD
    for _ in range(3):
        res = ctl.tick()
        assert (res.state, res.decision) == ("frozen", None) and router.weights["g1"] == pytest.approx(0.1)
    reg.enqueue_command(r.id, "rollback", "alert", "CandidateFlipRateHigh")
    res = ctl.tick()
    assert res.state == "frozen" and "ignored: frozen" in res.commands[0]
    reg.enqueue_command(r.id, "resume", "alice", "incident over")
    assert (ctl.tick().state, reg.rollout(r.id).step) == ("canary", 1)
    assert ctl.tick().state == "rolled_back"                       # the rule acts again


def test_guard_watches_the_promoted_generation_and_rolls_back_to_the_previous_production(tmp_path, env):
    _, reg, router, source, r = env
    cfg = _cfg(tmp_path, guard={"labels": 500})
    ctl = Controller(cfg, reg, router, source)
    states = [ctl.tick().state for _ in range(4)]
    assert states == ["canary", "canary", "canary", "guarding"]
    # promoted in the registry; the router still compares every request with g0
    assert reg.generation("g1").status == "production" and reg.generation("g0").status == "retired"
    assert reg.production().name == "g1"
    assert router.weights["g1"] == 1.0 and router.production == "g0"
    res = ctl.tick()
    assert res.state == "guarding" and res.decision == "hold" and "guarding: labels 50/500" in res.reason
    source.per_read = BAD
    res = _tick_until_final(ctl)
    assert (res.state, res.decision) == ("rolled_back", "rollback")
    assert reg.generation("g0").status == "production" and reg.generation("g1").status == "rolled_back"
    assert router.production == "g0" and router.weights["g0"] == 1.0
    assert _moves(reg)[-2:] == [("guard", "canary", "guarding", 3), ("rollback", "guarding", "rolled_back", 3)]


def test_commands_while_guarding_refuse_skipping_the_guard_and_a_held_guard_rolls_back_to_production(tmp_path, env):
    _, reg, router, source, r = env
    cfg = _cfg(tmp_path, guard={"seconds": 3600})
    ctl = Controller(cfg, reg, router, source)
    for _ in range(4):
        ctl.tick()
    assert reg.rollout(r.id).state == "guarding"
    reg.enqueue_command(r.id, "promote", "carol", "enough")
    res = ctl.tick()
    assert res.state == "guarding" and "refused: guarding" in res.commands[0]
    reg.enqueue_command(r.id, "freeze", "alice", "look")
    assert ctl.tick().state == "frozen" and reg.rollout(r.id).paused_from == "guarding"
    assert router.production == "g0" and router.weights["g1"] == 1.0      # the guard's plan is kept
    reg.enqueue_command(r.id, "rollback", "alice", "users complain")
    assert ctl.tick().state == "rolled_back"
    assert reg.production().name == "g0" and reg.generation("g1").status == "rolled_back"
    assert router.production == "g0" and router.weights["g0"] == 1.0


def test_guard_promotes_for_good_once_its_labels_arrived(tmp_path, env):
    _, reg, router, source, r = env
    cfg = _cfg(tmp_path, guard={"labels": 120, "seconds": 3600})
    ctl = Controller(cfg, reg, router, source)
    for _ in range(4):
        ctl.tick()
    assert reg.rollout(r.id).state == "guarding"
    kinds = [(x.state, x.decision) for x in (ctl.tick() for _ in range(3))]
    # 50, 100, 150 labels since the guard began: promoted on the third tick
    assert kinds == [("guarding", "hold"), ("guarding", "hold"), ("promoted", "promote")]
    assert router.production == "g1" and router.weights["g1"] == 1.0 and router.shadows == []
    assert "guard passed" in [e for e in reg.events("g1") if e.action == "promote"][-1].reason
    assert reg.production().name == "g1"


def test_promote_without_force_needs_the_rule_and_force_skips_it(tmp_path, env):
    _, reg, router, source, r = env
    cfg = _cfg(tmp_path, shadow_bake_seconds=1000)
    # Evidence not there yet (flips in the window keep the rule at hold): promote is refused.
    source.per_read = Counts(requests=50, compared=50, disagreements=5, labelled=50, negative_flips=5,
                             latency_p99_ms=5.0)
    ctl = Controller(cfg, reg, router, source)
    assert ctl.tick().decision == "hold"
    cmd = reg.enqueue_command(r.id, "promote", "carol", "looks fine to me")
    res = ctl.tick()
    assert res.state == "shadow" and "refused" in res.commands[0]
    assert [c.outcome for c in reg.commands(r.id) if c.id == cmd.id][0].startswith("refused")
    # Good evidence but bake time left: promote skips the bake, one step only.
    source.per_read = GOOD
    reg.enqueue_command(r.id, "promote", "carol", "skip the wait")
    res = ctl.tick()
    assert (res.state, res.step) == ("canary", 1)
    reg.enqueue_command(r.id, "promote", "carol", "ship it", force=True)
    res = ctl.tick()
    assert res.state == "promoted" and router.production == "g1"
    assert [m[0] for m in _moves(reg)] == ["promote", "force_promote"]


def test_command_applied_before_a_crash_is_not_applied_twice(env):
    cfg, reg, router, source, r = env
    ctl = Controller(cfg, reg, router, source)
    ctl.tick()                                                     # canary 1
    cmd = reg.enqueue_command(r.id, "promote", "dave", "go", force=False)
    r1 = reg.rollout(r.id)
    # The transition of the command committed, then the process died before completing it.
    reg.transition(r.id, ("canary", 1), state="canary", step=2, weight=0.3, actor="dave", action="promote",
                   reason="go", data={**r1.data, "last_command": cmd.id})
    source.fail = 1                                                # no rule decision in this tick
    res = _successor(cfg, reg, router, source).tick()
    assert "applied before a restart" in res.commands[0]
    assert [m[3] for m in _moves(reg)] == [1, 2] and res.step == 2


def test_source_errors_never_roll_back_and_pause_after_the_limit(env):
    cfg, reg, router, source, r = env
    source.per_read = BAD
    source.fail = 100
    ctl = Controller(cfg, reg, router, source)
    kinds = [ctl.tick() for _ in range(3)]
    assert [k.decision for k in kinds] == ["inconclusive"] * 3
    assert [k.state for k in kinds] == ["shadow", "shadow", "paused"]
    ev = [e for e in reg.events("g1") if e.action == "pause"][-1]
    assert ev.actor == "controller" and "failed 3 times in a row" in ev.reason
    assert _value(ctl, "graceful_controller_metric_source_errors_total", source="fake") == 3
    assert _value(ctl, "graceful_rollout_decisions_total", candidate="g1", decision="inconclusive") == 3
    assert reg.rollout(r.id).state == "paused"   # never rolled back on missing evidence


def test_counter_reset_is_not_negative_evidence(env):
    cfg, reg, router, source, r = env
    ctl = Controller(cfg, reg, router, source)
    ctl.tick()                                      # canary 1; base = 100 labels
    source.now = Counts()                           # the router restarted: counters from 0
    res = ctl.tick()                                # +50 since the restart
    assert res.decision != "rollback" and res.stats["labelled"] >= 100
    assert res.stats["step_labelled"] == 50


class ScriptedSource:
    """Returns the raw snapshots it is given, one per read (the last one repeats)."""

    name = "scripted"

    def __init__(self, *snapshots):
        self.snapshots = list(snapshots)

    def read(self, candidate):
        return self.snapshots.pop(0) if len(self.snapshots) > 1 else self.snapshots[0]


def test_a_router_restart_the_controller_missed_is_a_reset_not_a_regression(tmp_path):
    # The rollout starts with the router at 0 flips / 1000 labels; the router restarts
    # unseen (controller paused or down) and counts 6 flips / 1200 labels at a true NFR of
    # 0.5 %. A fresh controller compares with the persisted start snapshot: the changed
    # router epoch makes it count from zero (6 / 1200, LLR -9.8), not 6 / 200 (LLR 5.4).
    cfg = _cfg(tmp_path, nfr_limit=0.01)
    reg = Registry(tmp_path / "registry.sqlite")
    for name, parent in (("g0", None), ("g1", "g0")):
        reg.add_generation(name, parent, "mlp", "h", f"/x/{name}.pt", SHA if name == "g0" else "1" * 64)
    before = Counts(requests=1000, compared=1000, disagreements=30, labelled=1000, epoch=100.0)
    after = Counts(requests=1200, compared=1200, disagreements=40, labelled=1200, negative_flips=6, epoch=200.0)
    r = begin_rollout(reg, ScriptedSource(before), "g1", "g0", "tester", "unit test")
    assert r.data["raw_at_step_start"]["epoch"] == 100.0       # persisted with the snapshot
    res = Controller(cfg, reg, FakeRouter(), ScriptedSource(after)).tick()
    assert res.decision != "rollback" and res.state != "rolled_back"
    assert (res.stats["labelled"], res.stats["negative_flips"]) == (1200, 6)
    reg.close()


def test_a_router_that_lost_the_candidate_is_audited_and_pauses_the_rollout(env):
    cfg, reg, router, source, r = env          # max_source_errors = 3
    ctl = Controller(cfg, reg, router, source)
    assert ctl.tick().state == "canary"
    # the router restarted without the candidate attached: reconcile cannot place it
    router.weights = {"g0": 1.0}
    router.shadows = []
    results = [ctl.tick() for _ in range(3)]
    assert [x.decision for x in results] == ["error"] * 3
    assert all("not attached" in x.reason for x in results)
    assert reg.rollout(r.id).state == "paused" and reg.rollout(r.id).paused_from == "canary"
    errs = [e for e in reg.events("g1") if e.action == "router_error"]
    assert len(errs) == 1 and "not attached" in errs[0].reason        # once per run of failures
    pause = [e for e in reg.events("g1") if e.action == "pause"][-1]
    assert pause.actor == "controller" and "3 times in a row" in pause.reason
    assert ctl.tick().state == "paused"        # still failing: stays paused, nothing else moves
    # once the router has the candidate again, an operator resumes and it goes on
    router.weights, router.shadows = {"g0": 1.0, "g1": 0.0}, ["g1"]
    reg.enqueue_command(r.id, "resume", "alice", "router fixed")
    res = ctl.tick()
    assert (res.state, res.step) == ("canary", 1) and router.weights["g1"] == pytest.approx(0.1)


def test_latency_rollback_compares_slow_calls_with_production_on_the_same_traffic(tmp_path, env):
    """The latency test counts calls over latency_p99_ms: a candidate as slow as
    production (both 5 %) is never rolled back; one slow on 8 % of calls while production
    is on 0.5 % is, once min_latency_requests timed calls are in, with the evidence in
    the audit log."""
    _, reg, router, source, r = env
    cfg = _cfg(tmp_path, shadow_bake_seconds=1000, latency_p99_ms=100.0)
    ctl = Controller(cfg, reg, router, source)
    base = dict(requests=100, compared=100, labelled=100, timed=100, base_timed=100)
    source.per_read = Counts(**base, slow=5, base_slow=5)
    for _ in range(20):
        res = ctl.tick()
        assert res.decision == "hold" and res.state == "shadow"
    assert res.stats["slow_allowed"] >= 0.05 and res.stats["slow_share"] == pytest.approx(0.05)
    source.per_read = Counts(**base, slow=8, base_slow=0)
    seen = []
    for _ in range(40):
        res = ctl.tick()
        seen.append(res.decision)
        if res.state == "rolled_back":
            break
    assert res.decision == "rollback" and "latency shown worse" in res.reason, seen
    ev = [e for e in reg.events("g1") if e.action == "decision" and e.data.get("decision") == "rollback"][-1]
    assert ev.data["evidence"]["llr_latency"] >= ev.data["evidence"]["llr_latency_rollback_at"]


def test_a_tick_that_raises_is_counted_and_the_loop_goes_on(env):
    cfg, reg, router, source, r = env
    ctl = Controller(cfg, reg, router, source)
    router.fail_status = 1
    res = ctl.tick()
    assert res.decision == "error" and "router unreachable" in res.reason
    assert _value(ctl, "graceful_controller_tick_errors_total") == 1
    assert _value(ctl, "graceful_rollout_decisions_total", candidate="g1", decision="error") == 1
    assert ctl.tick().state == "canary"


def test_run_loop_finishes_and_exports_every_metric_name(env):
    import threading

    cfg, reg, router, source, r = env
    ctl = Controller(cfg, reg, router, source)
    last = ctl.run(threading.Event(), max_seconds=20)
    assert last.state == "promoted"
    text = ctl.metrics.text().decode()
    for name in metric_names.EXPORTED:
        assert f"\n{name}" in text or text.startswith(name) or f"# TYPE {name.removesuffix('_total')}" in text, name
    assert _value(ctl, "graceful_controller_last_tick_timestamp_seconds") > 0


def test_desired_traffic_keeps_other_generations_at_zero(env):
    _, reg, _, _, r = env
    current = {"production": "g0", "weights": {"g0": 1.0, "g1": 0.0, "g9": 0.0}, "shadows": ["g9"]}
    want = desired_traffic(reg.rollout(r.id), current)
    assert want == {"weights": {"g0": 1.0, "g1": 0.0, "g9": 0.0}, "shadows": ["g9", "g1"], "production": "g0"}


def test_alert_webhook_over_http_rolls_back_the_named_candidate(env):
    cfg, reg, router, source, r = env
    ctl = Controller(cfg, reg, router, source)
    srv = ctl.serve_http(port=free_port())
    url = f"http://127.0.0.1:{srv.server_address[1]}"
    try:
        def alert(status, labels):
            return {"version": "4", "status": status, "receiver": "graceful",
                    "alerts": [{"status": status, "labels": labels, "annotations": {"summary": "flips up"}}]}

        auth = {"Authorization": f"Bearer {TOKEN}"}
        firing = alert("firing", {"alertname": "GracefulLiveNFRHigh", "generation": "g1"})
        assert requests.post(url + "/v1/admin/alert", json=firing, timeout=5).status_code == 401
        assert requests.post(url + "/v1/admin/alert", json=firing, timeout=5,
                             headers={"Authorization": "Bearer wrong-token"}).status_code == 403
        bad = requests.post(url + "/v1/admin/alert", data="{not json", headers=auth, timeout=5)
        assert bad.status_code == 400 and "error" in bad.json()
        assert requests.post(url + "/v1/admin/alert", json={"alerts": "x"}, headers=auth, timeout=5).status_code == 400
        for ignored in (alert("resolved", {"alertname": "A", "generation": "g1"}),
                        alert("firing", {"alertname": "A", "candidate": "g7"}),
                        alert("firing", {"alertname": "A"})):
            out = requests.post(url + "/v1/admin/alert", json=ignored, headers=auth, timeout=5).json()
            assert out["rollbacks"] == [] and out["ignored"] == 1
        assert reg.pending_commands(r.id) == []
        out = requests.post(url + "/v1/admin/alert", json=firing, headers=auth, timeout=5).json()
        assert len(out["rollbacks"]) == 1
        # Alertmanager repeats firing alerts: one queued rollback is enough
        again = requests.post(url + "/v1/admin/alert", json=firing, headers=auth, timeout=5).json()
        assert again["rollbacks"] == []
        cmd = reg.pending_commands(r.id)[0]
        assert (cmd.command, cmd.actor, cmd.reason) == ("rollback", "alert", "alert GracefulLiveNFRHigh: flips up")
        assert ctl.tick().state == "rolled_back"
        assert _value(ctl, "graceful_rollout_rollbacks_total", candidate="g1", actor="alert") == 1
        m = requests.get(url + "/metrics", timeout=5)
        assert m.status_code == 200 and 'graceful_rollout_rollbacks_total{actor="alert",candidate="g1"} 1.0' in m.text
        st = requests.get(url + "/v1/rollout", timeout=5).json()
        assert st["rollout"]["state"] == "rolled_back" and st["last_tick"]["state"] == "rolled_back"
        json.dumps(st)
    finally:
        ctl.stop_http()


def test_webhook_strips_the_token_and_times_out_a_short_body(env, monkeypatch):
    import orchestrator.rollout.http as controller_mod

    cfg, reg, router, source, r = env
    assert controller_mod._Handler.timeout == 10          # the shipped socket timeout
    monkeypatch.setattr(controller_mod._Handler, "timeout", 0.5)   # same mechanism, faster test
    ctl = Controller(cfg, reg, router, source)
    srv = ctl.serve_http(port=free_port())
    port = srv.server_address[1]
    try:
        # a token pasted with a trailing newline or spaces is accepted, as by the router
        ok = requests.post(f"http://127.0.0.1:{port}/v1/admin/alert", json={"alerts": []}, timeout=5,
                           headers={"Authorization": f"Bearer  {TOKEN} \t"})
        assert ok.status_code == 200
        # a client announcing 100 bytes and sending 2 does not pin the handler thread
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall((f"POST /v1/admin/alert HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                          f"Content-Length: 100\r\n\r\n{{}}").encode())
            while sock.recv(4096):       # the server gives up and closes (an answer, then EOF);
                pass                     # a server that never did would hit the 5 s socket timeout
    finally:
        ctl.stop_http()


# --- the operator CLI against the same registry ---------------------------------------------

def _write_cfg(tmp_path):
    import yaml

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"run_dir": str(tmp_path), "generations": [{"name": "g0"}, {"name": "g1"}],
                                    "rollout": {"metrics_port": 0}}))
    return str(path)


def test_operator_commands_queue_audited_commands_and_refuse_bad_usage(env, tmp_path, capsys):
    from orchestrator.cli import main

    cfg, reg, router, source, r = env
    path = _write_cfg(tmp_path)
    assert main(["resume", path]) == 2                           # not paused
    assert "not paused" in capsys.readouterr().err
    assert main(["pause", path, "--candidate", "g7"]) == 2       # another candidate
    with pytest.raises(SystemExit) as e:                         # --reason is required (argparse)
        main(["rollback", path])
    assert e.value.code == 2
    capsys.readouterr()
    assert main(["pause", path, "--actor", "erin", "--reason", "investigating", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["command"] == "pause" and out["actor"] == "erin" and out["outcome"] is None
    ctl = Controller(cfg, reg, router, source)
    assert ctl.tick().state == "paused"
    assert main(["status", path, "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["rollout"]["state"] == "paused" and st["controller_running"] is False
    assert any(e["action"] == "pause" and e["actor"] == "erin" and e["reason"] == "investigating"
               for e in st["events"])
    assert main(["status", path]) == 0
    table = capsys.readouterr().out
    assert "g1" in table and "paused" in table and "recent events" in table
    assert main(["rollback", path, "--reason", "bad flips", "--actor", "erin"]) == 0
    ctl.tick()
    assert reg.rollout(r.id).state == "rolled_back"
    capsys.readouterr()
    assert main(["pause", path]) == 2                            # no active rollout any more
    assert "no active rollout" in capsys.readouterr().err


def test_commands_without_a_registry_exit_2(tmp_path, capsys):
    from orchestrator.cli import main

    path = _write_cfg(tmp_path / "empty") if (tmp_path / "empty").mkdir() is None else None
    assert main(["status", path]) == 2 and "no registry" in capsys.readouterr().err
    assert main(["rollout", path, "--candidate", "nope"]) == 2


def _gate_env(tmp_path, gate="enforce"):
    """A registry with real checkpoint files (sha256 of their bytes), g0 in production."""
    import hashlib

    cfg = parse_config({"run_dir": str(tmp_path), "generations": [{"name": "g0"}, {"name": "g1", "offline_gate": gate},
                                                                  {"name": "g2"}],
                        "serving": {"admin_token": TOKEN}, "rollout": {"metrics_port": 0}})
    reg = Registry(tmp_path / "registry.sqlite")
    for name, parent in (("g0", None), ("g1", "g0"), ("g2", "g0")):
        f = tmp_path / f"{name}.pt"
        f.write_bytes(name.encode() * 100)
        reg.add_generation(name, parent, "mlp", "h", str(f), hashlib.sha256(f.read_bytes()).hexdigest())
    reg.set_status("g0", "production", "test", "bootstrap")
    return cfg, reg


def _evaluate(reg, candidate, baseline, passed):
    sha = {n: reg.generation(n).sha256 for n in (candidate, baseline)}
    return reg.record_evaluation(candidate, baseline, {"candidate_sha256": sha[candidate],
                                                       "baseline_sha256": sha[baseline]},
                                 passed, [] if passed else ["NFR 0.05 > max_nfr 0.02"])


def test_an_enforced_gate_needs_a_passing_evaluation_against_current_production(tmp_path):
    """start_rollout (every entry point) refuses g1 never evaluated, evaluated and failed,
    or evaluated against an older production; a pass against production g0 starts it."""
    from orchestrator.rollout.start import RolloutRefused, start_rollout

    cfg, reg = _gate_env(tmp_path)
    router, source = FakeRouter(("g0", "g1", "g2")), FakeSource(GOOD)
    with pytest.raises(RolloutRefused, match="never evaluated against production 'g0'"):
        start_rollout(cfg, reg, router, source, "g1", "tester", "go")
    _evaluate(reg, "g1", "g0", passed=False)
    with pytest.raises(RolloutRefused, match=r"failed: NFR 0.05 > max_nfr"):
        start_rollout(cfg, reg, router, source, "g1", "tester", "go")
    _evaluate(reg, "g1", "g2", passed=True)           # against a generation that is not production
    with pytest.raises(RolloutRefused, match="never evaluated against production 'g0'|failed"):
        start_rollout(cfg, reg, router, source, "g1", "tester", "go")
    assert reg.latest_rollout("g1") is None           # nothing recorded by a refusal
    eid = _evaluate(reg, "g1", "g0", passed=True)
    r = start_rollout(cfg, reg, router, source, "g1", "tester", "go")
    assert (r.candidate, r.baseline, r.state) == ("g1", "g0", "shadow")
    assert f"evaluation {eid} against 'g0' passed" in reg.events("g1")[-2].reason or \
        any(f"evaluation {eid}" in e.reason for e in reg.events("g1") if e.action == "rollout_started")
    reg.close()


def test_a_gate_of_other_bytes_does_not_count_and_skip_gate_is_audited(tmp_path):
    """An evaluation of g1's old bytes does not pass the retrained g1; --skip-gate lets it
    through and the audit log says so."""
    from orchestrator.rollout.start import RolloutRefused, gate_verdict, start_rollout

    cfg, reg = _gate_env(tmp_path)
    reg.record_evaluation("g1", "g0", {"candidate_sha256": "f" * 64, "baseline_sha256": reg.generation("g0").sha256},
                          True, [])
    assert gate_verdict(reg, "g1", "g0")[0] is False
    router, source = FakeRouter(("g0", "g1")), FakeSource(GOOD)
    with pytest.raises(RolloutRefused, match="other bytes"):
        start_rollout(cfg, reg, router, source, "g1", "tester", "go")
    r = start_rollout(cfg, reg, router, source, "g1", "tester", "go", skip_gate=True)
    started = [e for e in reg.events("g1") if e.action == "rollout_started"][-1]
    assert started.data["rollout_id"] == r.id and "skipped with --skip-gate" in started.reason
    reg.close()


def test_an_evaluation_that_does_not_record_its_bytes_does_not_pass(tmp_path):
    from orchestrator.rollout.start import gate_verdict

    cfg, reg = _gate_env(tmp_path)
    reg.record_evaluation("g1", "g0", {"nfr": 0.0}, True, [])
    passed, why = gate_verdict(reg, "g1", "g0")
    assert passed is False and "does not record the bytes" in why
    reg.close()


def test_a_slow_controller_whose_lease_was_taken_over_moves_nothing(env):
    """Fencing: ctl-a's lease expired and ctl-b took the rollout; a's late transition is
    refused inside the registry's transaction and a stops."""
    cfg, reg, router, source, r = env
    a = Controller(cfg, reg, router, source, holder="ctl-a")
    a.tick()                                                 # canary 1, a holds the lease
    later = time.time() + cfg.rollout.lease_seconds + 1
    b = Controller(cfg, reg, router, source, holder="ctl-b", clock=lambda: later)
    b.tick()                                                 # takes over: canary 2
    moved = reg.rollout(r.id)
    # a was slow: it decided before b took over and moves now, without a new tick
    with pytest.raises(ControllerStopped, match="no longer holds the lease"):
        a._move(reg.rollout(r.id), "canary", 3, 0.6, "controller", "advance", "late", None, time.time())
    assert reg.rollout(r.id) == moved
    res = a.tick()                                           # and its next tick stops naming b
    assert a.stopped is not None and "'ctl-b'" in a.stopped and "controller stopped" in res.reason


def test_an_advisory_gate_lets_a_rejected_generation_through_saying_so(tmp_path):
    from orchestrator.rollout.start import start_rollout

    cfg, reg = _gate_env(tmp_path, gate="advisory")
    _evaluate(reg, "g1", "g0", passed=False)
    r = start_rollout(cfg, reg, FakeRouter(("g0", "g1")), FakeSource(GOOD), "g1", "tester", "go")
    started = [e for e in reg.events("g1") if e.action == "rollout_started"][-1]
    assert r.state == "shadow" and "advisory for g1" in started.reason
    reg.close()


def test_start_rollout_attaches_a_candidate_the_router_lacks_and_restores_production(tmp_path):
    """The router holds only g0 and thinks g2 is production: g1 is attached through the
    caller's `attach`, and production is brought back to the registry's g0."""
    from orchestrator.rollout.start import RolloutRefused, start_rollout

    cfg, reg = _gate_env(tmp_path)
    _evaluate(reg, "g1", "g0", passed=True)
    router = FakeRouter(("g2", "g0"))
    with pytest.raises(RolloutRefused, match="not attached to the router"):
        start_rollout(cfg, reg, router, FakeSource(GOOD), "g1", "tester", "go")
    attached = []

    def attach(name):
        attached.append(name)
        router.weights[name] = 0.0
        router.shadows.append(name)

    r = start_rollout(cfg, reg, router, FakeSource(GOOD), "g1", "tester", "go", attach=attach)
    assert attached == ["g1"] and r.baseline == "g0"
    Controller(cfg, reg, router, FakeSource(GOOD)).tick()   # its first reconcile: the registry's plan
    assert router.production == "g0" and router.weights["g0"] == 1.0 and "g1" in router.shadows
    reg.close()


def test_the_cli_refuses_an_ungated_rollout_with_exit_2(tmp_path, capsys):
    import yaml

    from orchestrator.cli import main

    _, reg = _gate_env(tmp_path)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"run_dir": str(tmp_path), "generations": [{"name": "g0"}, {"name": "g1"}],
                                    "serving": {"port": free_port()}, "rollout": {"metrics_port": 0}}))
    assert main(["rollout", str(path), "--candidate", "g1"]) == 2
    err = capsys.readouterr().err
    assert "no passing offline gate against production 'g0'" in err and "--skip-gate" in err
    assert reg.latest_rollout("g1") is None
    reg.close()


def test_a_second_controller_is_refused_and_takes_over_once_the_lease_expired(env):
    """One controller per rollout: a second one stops naming the holder; after the holder
    stops renewing (it died), the lease expires and a new controller resumes."""
    cfg, reg, router, source, r = env
    first = Controller(cfg, reg, router, source, holder="ctl-a")
    assert first.tick().state == "canary"
    second = Controller(cfg, reg, router, source, holder="ctl-b")
    res = second.tick()
    assert second.stopped is not None and "'ctl-a'" in second.stopped and "controller stopped" in res.reason
    assert reg.rollout(r.id).step == 1                      # the refused one moved nothing
    later = Controller(cfg, reg, router, source, holder="ctl-c",
                       clock=lambda: time.time() + cfg.rollout.lease_seconds + 1)
    assert later.tick().step == 2 and later.stopped is None
    assert reg.lease(r.id).holder == "ctl-c"
    taken = [e for e in reg.events("g1") if e.action == "lease_taken_over"]
    assert len(taken) == 1 and taken[0].data["previous_holder"] == "ctl-a"


def test_a_controller_whose_token_the_router_refuses_says_so_once_and_stops(env, caplog):
    from serving.client import RouterError

    cfg, reg, router, source, r = env

    def refuse(*a, **k):
        raise RouterError(401, {"error": "admin route: missing bearer token"})

    router.status = refuse
    ctl = Controller(cfg, reg, router, source)
    import threading

    last = ctl.run(threading.Event(), max_seconds=5)
    assert ctl.stopped is not None and "refused the admin token (HTTP 401)" in ctl.stopped
    assert last.decision is None and reg.rollout(r.id).state == "shadow"
    assert sum("stops:" in rec.message for rec in caplog.records) == 1




def test_a_command_whose_move_was_refused_is_reported_not_applied(env):
    """The controller applies a rollback from a stale view (shadow) while the registry is
    at canary 1: the compare-and-set refuses it, and the outcome says so (never 'rolled
    back')."""
    cfg, reg, router, source, r = env
    ctl = Controller(cfg, reg, router, source)
    stale = reg.rollout(r.id)
    ctl.tick()                                                      # canary 1
    cmd = reg.enqueue_command(r.id, "rollback", "erin", "test")
    after, outcome = ctl._apply_command(stale, cmd, time.time())
    assert outcome.startswith("not applied: the rollout was moved first") and after.state == "canary"
