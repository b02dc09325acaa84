"""`graceful status` and the operator commands on a real registry: the last decision is
shown with its evidence; freeze and resume are queued with their checks (exit 2 when the
rollout is not in a state they apply to)."""

from __future__ import annotations

import json

import pytest
import yaml

from orchestrator.cli import main
from orchestrator.config import load_config
from orchestrator.registry import Registry, registry_path
from orchestrator.rollout.decision import Counts, Observation, decide
from tests.orchestrator.evaluation.test_evaluate import TINY


@pytest.fixture
def rollout(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"), **TINY,
                                    "rollout": {"metrics_port": 0}}, sort_keys=False))
    cfg = load_config(path)
    reg = Registry(registry_path(cfg))
    reg.add_generation("g0", None, "mlp", "h", "/x/g0.pt", "0" * 64)
    reg.set_status("g0", "production", "test", "bootstrap")
    reg.add_generation("g1", "g0", "mlp", "h", "/x/g1.pt", "1" * 64)
    r = reg.start_rollout("g1", "g0", "tester", "unit test")
    c = Counts(requests=300, labelled=300, negative_flips=1, timed=300, slow=2, base_timed=300)
    d = decide(Observation(total=c, step=c, step_elapsed_s=100.0), None, cfg.rollout)
    reg.audit("controller", "decision", "g1", d.reason,
              data={"rollout_id": r.id, "step": 0, "decision": d.kind, "evidence": dict(d.stats)})
    yield path, reg, r
    reg.close()


def test_status_shows_the_last_decision_with_its_evidence(rollout, capsys):
    path, reg, r = rollout
    capsys.readouterr()
    assert main(["status", str(path)]) == 0
    out = capsys.readouterr().out
    line = [x for x in out.splitlines() if x.startswith("evidence: ")][0]
    assert "NFR 1/300" in line and "rollback >=" in line and "errors 0/300" in line and "slow 2/300" in line
    assert main(["status", str(path), "--json"]) == 0
    ev = json.loads(capsys.readouterr().out)["evidence"]
    assert ev["labelled"] == 300 and ev["llr_rollback_at"] > 0 > ev["llr_nfr"]


def test_freeze_and_resume_are_queued_and_refused_where_they_do_not_apply(rollout, capsys):
    path, reg, r = rollout
    assert main(["resume", str(path)]) == 2          # not paused or frozen
    assert main(["freeze", str(path), "--reason", "incident", "--json"]) == 0
    cmd = reg.pending_commands(r.id)[-1]
    assert (cmd.command, cmd.reason) == ("freeze", "incident")
    reg.transition(r.id, ("shadow", 0), state="frozen", step=0, weight=0.0, actor="alice", action="freeze",
                   reason="incident")
    assert main(["freeze", str(path)]) == 2          # already frozen
    assert main(["resume", str(path)]) == 0
    assert reg.pending_commands(r.id)[-1].command == "resume"
