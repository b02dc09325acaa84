"""Serve application builders of the RayService (orchestrator/apps.py), without Ray:
`.bind()` builds the application objects only; nothing starts."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from orchestrator.apps import AppArgsError, ClusterRouter, RegistryPlan, generation_app, router_app, wait_for_apps
from orchestrator.config import load_config
from serving.catalogue import read_manifest
from serving.deploy import ModelServer
from serving.refs import app_name_for
from tests.helpers import write_untrained_run

ARCH = {"type": "mlp", "width": 8, "depth": 1, "embed_dim": 8}
DATA = {"source": "digits", "test_fraction": 0.3, "val_fraction": 0.1}


@pytest.fixture
def run_config(tmp_path, cache_dir, monkeypatch):
    """A run dir as `graceful train` leaves it for g0 and g1 (untrained weights are enough);
    g2 is in the config but not trained."""
    monkeypatch.setenv("GRACEFUL_ADMIN_TOKEN", "app-admin-token-1")
    return write_untrained_run(tmp_path, DATA, ARCH, ("g0", "g1"), ("g0", "g1", "g2"),
                               serving={"replicas": 2, "cpus_per_replica": 0.5})


def _deployment(app):
    return app._bound_deployment


def test_generation_app_is_the_model_server_with_the_configs_options(run_config):
    app = generation_app({"config": str(run_config), "generation": "g1"})
    dep = _deployment(app)
    assert dep.func_or_class is ModelServer
    assert dep.name == "model"
    assert dep.num_replicas == 2
    assert dep.ray_actor_options["num_cpus"] == 0.5
    ref = dep.init_args[0]
    assert ref.name == "g1" and ref.app_name == app_name_for("g1")
    assert ref.uri.endswith("generations/g1/model.pt")


def test_router_app_binds_production_candidates_gallery_and_token(run_config):
    app = router_app({"config": str(run_config), "production": "g0", "candidates": ["g1"]})
    dep = _deployment(app)
    assert issubclass(dep.func_or_class, ClusterRouter)
    assert dep.name == "router" and dep.num_replicas == 1
    spec, input_shape, production, gens, weights, shadows, catalogue, token = dep.init_args
    assert spec["replicas"] == 2 and input_shape == (64,) and production == "g0"
    assert {n: g["app"] for n, g in gens.items()} == {"g0": "graceful-gen-g0", "g1": "graceful-gen-g1"}
    assert weights == {"g0": 1.0, "g1": 0.0} and shadows == ["g1"]
    assert isinstance(dep.init_kwargs["plan_source"], RegistryPlan)   # replicas re-read the registry
    m = read_manifest(catalogue)  # built once under run_dir; replicas read it from there
    assert Path(catalogue) == load_config(run_config).catalogue_dir
    assert m["generations"] == ["g0"] and m["dim"] == 8 and m["count"] > 0
    assert token == "app-admin-token-1"
    assert dep.init_kwargs["app_names"] == ("graceful-gen-g0", "graceful-gen-g1")


def test_a_candidate_promoted_since_the_manifest_was_written_is_served_as_production(run_config):
    """The manifest still lists g1 as a candidate after g1's promotion: the router builds,
    with g1 as production and no candidate (a RayService upgrade must not fail)."""
    from orchestrator.config import load_config
    from orchestrator.registry import Registry, registry_path

    router_app({"config": str(run_config), "candidates": ["g1"]})        # registers g0 (production) and g1
    with Registry(registry_path(load_config(run_config))) as reg:
        r = reg.start_rollout("g1", "g0", "t", "go")
        reg.transition(r.id, ("shadow", 0), state="promoted", step=1, weight=1.0, actor="t", action="promote",
                       reason="t")
    dep = _deployment(router_app({"config": str(run_config), "candidates": ["g1"]}))
    assert dep.init_args[2] == "g1" and list(dep.init_args[3]) == ["g1"] and dep.init_args[4] == {"g1": 1.0}


def test_router_app_refuses_a_production_the_registry_contradicts(run_config):
    """The registry says g0 (bootstrapped); args.production g1 can only confirm, not set."""
    with pytest.raises(AppArgsError, match="production is 'g0' in the registry"):
        router_app({"config": str(run_config), "production": "g1"})


def test_router_app_defaults_to_the_first_generation_alone(run_config):
    dep = _deployment(router_app({"config": str(run_config)}))
    assert dep.init_args[2] == "g0" and list(dep.init_args[3]) == ["g0"] and dep.init_args[5] == []


@pytest.mark.parametrize("args, message", [
    ({"generation": "g0"}, "args.config"),
    ({"config": "/nonexistent/run.yaml", "generation": "g0"}, "file not found"),
    ({"config": "RUN", "generation": "g9"}, "unknown generation 'g9'"),
    ({"config": "RUN", "generation": "g2"}, "generation 'g2' is not trained"),
    ({"config": "RUN", "generation": "g0", "replicas": 3}, "unknown args ['replicas']"),
])
def test_generation_app_bad_args_name_the_problem(run_config, args, message):
    args = {k: (str(run_config) if v == "RUN" else v) for k, v in args.items()}
    with pytest.raises(AppArgsError, match=message.replace("[", r"\[").replace("]", r"\]")):
        generation_app(args)


@pytest.mark.parametrize("args, message", [
    ({"candidates": "g1"}, "must be a list"),
    ({"candidates": ["g1"], "shadows": ["g2"]}, "args.shadows"),
    ({"wait_s": 0}, "args.wait_s"),
    ({"candidates": ["g2"]}, "'g2' is not trained"),
])
def test_router_app_bad_args_name_the_problem(run_config, args, message):
    with pytest.raises(AppArgsError, match=message):
        router_app({"config": str(run_config), **args})


def test_a_changed_checkpoint_is_never_built(run_config):
    model = run_config.parent / "run" / "generations" / "g1" / "model.pt"
    model.write_bytes(model.read_bytes() + b"x")
    with pytest.raises(Exception, match="refusing to (serve|register|use) it"):
        generation_app({"config": str(run_config), "generation": "g1"})


def test_wait_for_apps_polls_until_every_app_exists():
    """Apps appear after 0, 2 and 3 polls; a fake clock makes it instant."""
    appear_after = {"a": 0, "b": 2, "c": 3}
    polls = {n: 0 for n in appear_after}
    now = [0.0]

    def lookup(name):
        polls[name] += 1
        if polls[name] <= appear_after[name]:
            raise RuntimeError(f"Application '{name}' does not exist.")

    async def sleep(s):
        now[0] += s

    asyncio.run(wait_for_apps(["a", "b", "c", "b"], 10, lookup, sleep, lambda: now[0]))
    assert polls == {"a": 1, "b": 3, "c": 4} and now[0] == 3.0


def test_wait_for_apps_times_out_naming_the_missing_app():
    now = [0.0]

    async def sleep(s):
        now[0] += s

    def lookup(name):
        if name == "gone":
            raise RuntimeError("does not exist")

    with pytest.raises(TimeoutError, match=r"\['gone'\] did not appear within 5 s"):
        asyncio.run(wait_for_apps(["here", "gone"], 5, lookup, sleep, lambda: now[0]))
    assert now[0] == 5.0
