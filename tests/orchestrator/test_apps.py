"""What a router starts with comes from the registry (no Ray: the plans and refs only;
the same paths run on real Serve in tests/integration/test_lifecycle.py)."""

from __future__ import annotations

import json

import pytest

from orchestrator.apps import RegistryPlan, ServeRequestError, generation_ref, serving_plan
from orchestrator.cli import main
from orchestrator.config import load_config
from orchestrator.registry import IntegrityError, Registry, registry_path
from tests.helpers import write_untrained_run

DATA = {"source": "digits", "test_fraction": 0.3}
ARCH = {"type": "mlp", "width": 8, "depth": 1, "embed_dim": 8}


@pytest.fixture
def run(tmp_path):
    path = write_untrained_run(tmp_path, DATA, ARCH, trained=("g0", "g1", "g2"))
    cfg = load_config(path)
    reg = Registry(registry_path(cfg))
    yield path, cfg, reg
    reg.close()


def _finish(reg, name, state, weight=1.0):
    r = reg.start_rollout(name, reg.production().name, "test", "go")
    return reg.transition(r.id, ("shadow", 0), state=state, step=1, weight=weight, actor="t", action=state, reason="t")


def test_production_is_the_registrys_not_the_yamls_first(run):
    path, cfg, reg = run
    plan = serving_plan(cfg, reg, ["g1"])
    assert plan.production.name == "g0" and plan.weights == {"g0": 1.0, "g1": 0.0} and plan.shadows == ("g1",)
    _finish(reg, "g1", "promoted")
    plan = serving_plan(cfg, reg, ["g0"])
    assert plan.production.name == "g1" and plan.weights == {"g1": 1.0, "g0": 0.0}
    assert plan.production.sha256 == reg.generation("g1").sha256
    with pytest.raises(ServeRequestError, match="production is 'g1' in the registry"):
        serving_plan(cfg, reg, [], production="g0")


def test_an_active_rollout_keeps_its_candidate_and_weight(run):
    path, cfg, reg = run
    serving_plan(cfg, reg, ["g1"])                          # registers both, bootstraps g0
    r = reg.start_rollout("g1", "g0", "test", "go")
    reg.transition(r.id, ("shadow", 0), state="canary", step=1, weight=0.3, actor="t", action="advance", reason="t")
    plan = serving_plan(cfg, reg)
    assert [c.name for c in plan.candidates] == ["g1"]
    assert plan.weights == pytest.approx({"g0": 0.7, "g1": 0.3}) and plan.shadows == ("g1",)
    # a restarted replica asks the registry: the same plan
    assert RegistryPlan(reg.path)(["g0", "g1"])["weights"] == pytest.approx({"g0": 0.7, "g1": 0.3})


def test_a_router_started_while_guarding_serves_the_previous_production_as_its_reference(run):
    """Guarding: the registry names g1 production already; a fresh `graceful serve` (or a
    RayService upgrade) must still attach g0, the comparison's reference."""
    path, cfg, reg = run
    serving_plan(cfg, reg, ["g1"])
    r = reg.start_rollout("g1", "g0", "test", "go")
    reg.transition(r.id, ("shadow", 0), state="guarding", step=3, weight=1.0, actor="t", action="guard", reason="t")
    assert reg.production().name == "g1"
    plan = serving_plan(cfg, reg)
    assert plan.production.name == "g1" and [c.name for c in plan.candidates] == ["g0"]
    want = RegistryPlan(reg.path)(["g1", "g0"])
    assert want["production"] == "g0" and want["weights"] == {"g0": 0.0, "g1": 1.0} and want["shadows"] == ["g1"]


def test_a_rolled_back_generation_is_not_shadowed_again(run):
    path, cfg, reg = run
    serving_plan(cfg, reg, ["g2"])
    _finish(reg, "g2", "rolled_back", weight=0.0)
    assert RegistryPlan(reg.path, ["g2"])(["g0", "g2"]) == {"weights": {"g0": 1.0, "g2": 0.0}, "shadows": [],
                                                          "production": "g0"}
    assert serving_plan(cfg, reg, ["g2"]).shadows == ()


def test_serving_verifies_the_bytes_against_the_registry(run):
    path, cfg, reg = run
    ref = generation_ref(cfg, reg, "g1")
    assert ref.sha256 == reg.generation("g1").sha256
    f = cfg.run_dir / "generations" / "g1" / "model.pt"
    f.write_bytes(f.read_bytes() + b"x")
    with pytest.raises(IntegrityError, match="changed or truncated"):
        generation_ref(cfg, reg, "g1")


def test_status_json_names_production_without_any_rollout(run, capsys):
    path, cfg, reg = run
    serving_plan(cfg, reg)
    capsys.readouterr()
    assert main(["status", str(path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["production"] == "g0" and out["rollout"] is None
    assert main(["status", str(path)]) == 0
    assert "production: g0" in capsys.readouterr().out


def test_graceful_serve_refuses_a_production_the_registry_contradicts_before_ray(run, capsys):
    path, cfg, reg = run
    serving_plan(cfg, reg)                                   # g0 production (bootstrap)
    assert main(["serve", str(path), "--production", "g1"]) == 2   # Ray would refuse to start here
    assert "production is 'g0' in the registry" in capsys.readouterr().err
