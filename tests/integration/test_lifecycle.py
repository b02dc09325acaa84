"""Five generations lived through the library on real Ray Train and Ray Serve (127.0.0.1),
with live traffic and late labels, the registry the only source of truth:

    g0 trained -> production (bootstrap)
    g1 trained against g0, gated, rolled out -> promoted
    g2 trained against g1 on 90 % noisy labels (gate advisory) -> rolled back on live flips
    g3 trained against g1 (parent) with BCT against g1 and g0, never g2 -> promoted
    g4 `recipe: lqf` fine-tuned from g3, served from its LQF checkpoint -> promoted

The router is restarted between rollouts and after the last (a new deployment from
`orchestrator.apps`), and its replica is killed once (Serve starts a new one, which
reads the registry's plan): after every restart `GET /v1/status` reports the registry's
production. The documented CLI contracts are checked on the result.
"""

from __future__ import annotations

import json
import threading
import time

import pytest
import requests
import yaml

from orchestrator.apps import attach_on_cluster, serving_plan, start_router
from orchestrator.chain import build_job, train_generation
from orchestrator.cli import main
from orchestrator.config import load_config
from orchestrator.demo.traffic import TrafficGenerator
from orchestrator.evaluation.evaluate import evaluate
from orchestrator.registry import Registry, registry_path
from orchestrator.rollout.controller import Controller
from orchestrator.rollout.sources import RouterSource
from orchestrator.rollout.start import start_rollout
from orchestrator.rundir import read_metrics
from serving.client import RouterClient
from tests.helpers import free_port
from workers.data import load_dataset

TOKEN = "lifecycle-admin-token-1"
ARCH = {"type": "mlp", "width": 32, "depth": 2, "embed_dim": 16, "activation": "leaky_relu"}
TRAIN = {"steps": 150, "batch_size": 64, "eval_every": 150}
BCT = {"bct": {"weight": 1.0, "against": "ancestors"}}


def _config(tmp) -> dict:
    return {
        "run_dir": str(tmp / "run"),
        "data": {"source": "digits", "test_fraction": 0.3, "val_fraction": 0.1},
        "generations": [
            {"name": "g0", "arch": ARCH, "train_fraction": 0.25, "train": {**TRAIN, "seed": 0}},
            {"name": "g1", "arch": ARCH, "compat": BCT, "train": {**TRAIN, "seed": 1}},
            {"name": "g2", "arch": ARCH, "label_noise": 0.9, "offline_gate": "advisory", "train": {**TRAIN, "seed": 2}},
            {"name": "g3", "arch": ARCH, "compat": BCT, "train": {**TRAIN, "seed": 3}},
            {"name": "g4", "arch": ARCH, "recipe": "lqf", "train": {**TRAIN, "lr": 0.1, "seed": 4},
             "lqf": {"target_scale": 20.0, "damping": 0.01}},
        ],
        "scaling": {"num_workers": 1},
        # 539 test rows resolve an error change to about +-2.5 points: g3 against g1 (measured:
        # 5.0% -> 7.8%, bounds -0.03 to +5.2 points) is inconclusive at max_error_increase 0.05.
        # These rollouts are what this test is about, so the live rollout decides.
        "gates": {"max_error_increase": 0.05, "max_nfr": 0.1, "max_class_nfr": 0.5, "require_bct": False,
                  "allow_inconclusive": True},
        "serving": {"port": free_port(), "admin_token": TOKEN, "cpus_per_replica": 0.1, "router_cpus": 0.1},
        "rollout": {"shadow_bake_seconds": 1, "nfr_limit": 0.1, "tick_seconds": 0.3, "max_source_errors": 30,
                    "error_rate_limit": 0.05, "latency_p99_ms": 5000, "metrics_port": 0,
                    "steps": [{"weight": w, "bake_seconds": 1, "min_requests": 20, "min_labels": 40}
                              for w in (0.3, 0.7)]},
    }


def _status(cfg) -> dict:
    return requests.get(f"http://127.0.0.1:{cfg.serving.port}/v1/status", timeout=10).json()


def _wait_router(cfg, started_after: float = 0.0, timeout: float = 120.0) -> dict:
    """/v1/status once a router (started after `started_after`) answers."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            s = _status(cfg)
            if s.get("started_at", 0) > started_after:
                return s
        except (requests.RequestException, ValueError):
            pass
        if time.monotonic() > deadline:
            raise AssertionError("router did not come back")
        time.sleep(0.5)


def _restart_router(cfg, reg) -> dict:
    """A new router deployment, built from the registry like `graceful serve` does."""
    from ray import serve

    serve.shutdown()
    before = time.time()
    start_router(cfg, reg, serving_plan(cfg, reg))
    return _wait_router(cfg, before)


def _kill_router_replica(cfg) -> dict:
    """SIGKILL-like: kill the router's replica actor; Serve starts a new one from the
    same deployment arguments, which must read the registry's plan."""
    import ray

    before = _status(cfg)["started_at"]
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if "SERVE_REPLICA" in a["name"] and "router" in a["name"]]
    assert names, "no router replica found"
    for n in names:
        ray.kill(ray.get_actor(n, namespace="serve"), no_restart=True)
    return _wait_router(cfg, before)


def _roll_out(cfg, reg, client, ds, name: str) -> str:
    """Gate, start through the library (attaching the candidate), run the controller to
    a final state under live traffic with labels 0.2 s later."""
    evaluate(cfg, name, registry=reg, n_boot=50)
    source = RouterSource(client)
    attach = attach_on_cluster(cfg, reg)
    r = start_rollout(cfg, reg, client, source, name, "test", f"lifecycle {name}", attach=attach)
    gen = TrafficGenerator(f"http://127.0.0.1:{cfg.serving.port}", ds.test.x, ds.test.y, rows_per_request=8,
                           concurrency=2, label_delay_s=0.2, seed=int(name[1:]))
    stop = threading.Event()
    t = threading.Thread(target=gen.run, args=(20_000, 120.0, stop, 60.0), daemon=True)
    t.start()
    try:
        last = Controller(cfg, reg, client, source, rollout_id=r.id, attach=attach).run(threading.Event(),
                                                                                        max_seconds=120)
    finally:
        stop.set()
        t.join(timeout=15)
    return last.state


@pytest.mark.timeout(1500)
def test_five_generations_the_registry_drives(ray_session, tmp_path, capsys, cache_dir):
    path = tmp_path / "life.yaml"
    path.write_text(yaml.safe_dump(_config(tmp_path), sort_keys=False))
    cfg = load_config(path)
    ds = load_dataset(cfg.data)
    reg = Registry(registry_path(cfg))
    client = RouterClient(f"http://127.0.0.1:{cfg.serving.port}", TOKEN)
    quiet = lambda s: None  # noqa: E731
    try:
        train_generation(cfg, "g0", log=quiet)
        assert reg.production().name == "g0"
        before = time.time()
        start_router(cfg, reg, serving_plan(cfg, reg))
        assert _wait_router(cfg, before)["production"] == "g0"

        # g1: trained against production g0, promoted
        train_generation(cfg, "g1", log=quiet)
        assert reg.generation("g1").parent == "g0"
        assert _roll_out(cfg, reg, client, ds, "g1") == "promoted"
        assert reg.production().name == "g1" and _status(cfg)["production"] == "g1"
        assert _restart_router(cfg, reg)["production"] == "g1"

        # g2: a regression, trained against g1, rolled back on its live flips
        train_generation(cfg, "g2", log=quiet)
        assert reg.generation("g2").parent == "g1"
        assert _roll_out(cfg, reg, client, ds, "g2") == "rolled_back"
        assert reg.generation("g2").status == "rolled_back" and reg.production().name == "g1"
        # the replica dies: Serve's new one reads the registry (the deploy-time args say g1
        # too here, so check it also kept g2 out of the shadows it was deployed with)
        back = _kill_router_replica(cfg)
        assert back["production"] == "g1" and back["plan_source"] == "registry" and "g2" not in back["shadows"]

        # g3: parent g1 (production), BCT against the ever-production g1 and g0, not g2
        job = build_job(cfg, "g3", verbose=False, registry=reg)
        assert job.production.name == "g1" and [c.name for c in job.bct] == ["g1", "g0"]
        train_generation(cfg, "g3", log=quiet, job=job)
        m3 = read_metrics(cfg, "g3")
        assert m3["parent"] == "g1" and {c["name"] for c in m3["constraints"] if c["kind"] == "bct"} == {"g1", "g0"}
        assert _roll_out(cfg, reg, client, ds, "g3") == "promoted"
        assert _restart_router(cfg, reg)["production"] == "g3"

        # g4: LQF from g3, served from its LQF checkpoint (Ray Serve app), promoted
        train_generation(cfg, "g4", log=quiet)
        assert reg.generation("g4").parent == "g3" and read_metrics(cfg, "g4")["recipe"] == "lqf"
        assert _roll_out(cfg, reg, client, ds, "g4") == "promoted"
        last = _restart_router(cfg, reg)
        assert last["production"] == "g4" and last["generations"]["g4"]["sha256"] == reg.generation("g4").sha256
        answer = client.predict(ds.test.x[:4].tolist())
        assert answer["generation"] == "g4" and len(answer["predictions"]) == 4
        # a replica restart after the last rollout: still the registry's production
        assert _kill_router_replica(cfg)["production"] == "g4"

        # every rollout's steps recorded once, one promotion each
        for name, final in (("g1", "promoted"), ("g2", "rolled_back"), ("g3", "promoted"), ("g4", "promoted")):
            moves = [e for e in reg.events(name) if e.action in ("advance", "promote", "rollback")]
            steps = [(e.action, e.data.get("step")) for e in moves]
            assert len(steps) == len(set(steps)), (name, steps)
            assert reg.latest_rollout(name).state == final
    finally:
        client.close()
        reg.close()

    # the contracts checks outside this repository rely on
    capsys.readouterr()
    assert main(["registry", str(path), "show", "g3", "--json"]) == 0
    show = json.loads(capsys.readouterr().out)
    assert (show["parent"], show["status"]) == ("g1", "retired")
    assert main(["registry", str(path), "show", "g2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "rolled_back"
    assert main(["status", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["production"] == "g4"
