"""`graceful rollout` end to end: real Ray Serve on 127.0.0.1, live traffic with labels,
the controller as a subprocess against the router.

Three tiny MLPs on scikit-learn digits, trained in-process: g0 (production, 20 % of the
data), g1 (all of it: a good candidate, few negative flips), g2 (shuffled labels: a
regression). The bad candidate is rolled back automatically; the good one is promoted
through every canary step although its controller is SIGKILLed mid-canary and started
again, then guarded (rollout.guard) with the previous production still the router's
reference: the audit log shows each step exactly once and one promotion.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import yaml

from orchestrator.registry import Registry
from orchestrator.demo.traffic import TrafficGenerator
from serving.client import RouterClient
from serving.refs import ModelRef
from serving.specs import ServingSpec
from workers.checkpoint import save_model
from workers.data import Split, load_dataset
from workers.models import build_model
from workers.specs import ArchSpec, DataSpec, TrainSpec
from workers.training import fit
from tests.helpers import free_port

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "rollout-admin-token-1"
ARCH = {"type": "mlp", "width": 32, "depth": 2, "embed_dim": 16}
DATA = {"source": "digits", "test_fraction": 0.3, "val_fraction": 0.1}
STEPS = [0.2, 0.5, 0.8]


def _write_run(tmp: Path, rollout: dict, shuffled: bool = True) -> tuple[Path, dict, object]:
    """Train g0, g1 (and g2 on shuffled labels), save them as `graceful train` would, and
    write the run config. Returns (config path, refs by name, dataset)."""
    ds = load_dataset(DataSpec(**DATA))
    rng = np.random.default_rng(0)
    recipes = {"g0": (0.2, ds.train.y, 0), "g1": (1.0, ds.train.y, 1)}
    if shuffled:
        recipes["g2"] = (1.0, rng.permutation(ds.train.y), 2)
    refs = {}
    for name, (fraction, labels, seed) in recipes.items():
        model = build_model(ArchSpec(**ARCH), ds.input_dim, ds.num_classes)
        n = int(len(ds.train) * fraction)
        fit(model, Split(ds.train.x[:n], labels[:n]), TrainSpec(steps=150, batch_size=64, seed=seed))
        d = tmp / "run" / "generations" / name
        sha = save_model(model, d)
        (d / "metrics.json").write_text(json.dumps({"sha256": sha}))
        refs[name] = ModelRef(name, str(d / "model.pt"), sha)
    cfg = {"run_dir": str(tmp / "run"), "data": DATA,
           "generations": [{"name": n, "arch": ARCH} for n in refs],
           "serving": {"admin_token_env": "GRACEFUL_ADMIN_TOKEN"}, "rollout": rollout}
    path = tmp / "rollout.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, refs, ds


LEASE_S = 2.0
ROLLOUT = {"shadow_bake_seconds": 2, "nfr_limit": 0.1, "tick_seconds": 0.5, "max_source_errors": 20,
           "lease_seconds": LEASE_S,
           "error_rate_limit": 0.05, "latency_p99_ms": 5000, "guard": {"seconds": 3},
           "steps": [{"weight": w, "bake_seconds": 3, "min_requests": 20, "min_labels": 40} for w in STEPS]}


@pytest.fixture(scope="module")
def served(ray_session, tmp_path_factory):
    from serving import deploy

    tmp = tmp_path_factory.mktemp("rollout")
    port = free_port()
    path, refs, ds = _write_run(tmp, {**ROLLOUT, "metrics_port": port})
    spec = ServingSpec(port=free_port(), shadow_timeout_s=2.0, max_rows=64, slow_call_ms=ROLLOUT["latency_p99_ms"],
                       prediction_log_path=str(tmp / "predictions.sqlite"))
    url = deploy.start_serving(spec, refs["g0"], [refs["g1"], refs["g2"]], admin_token=TOKEN)
    yield {"url": url, "config": path, "ds": ds, "refs": refs, "metrics_port": port,
           "registry": tmp / "run" / "registry.sqlite"}
    deploy.stop_serving()


class _Traffic:
    """Users sending labelled requests in the background while the controller runs."""

    def __init__(self, url, ds, max_seconds=150):
        self.stop = threading.Event()
        gen = TrafficGenerator(url, ds.test.x, ds.test.y, rows_per_request=4, concurrency=2,
                               label_delay_s=0.2, users=500, seed=1, timeout_s=10)
        self.thread = threading.Thread(target=gen.run, args=(20000, max_seconds, self.stop), kwargs={"rate_per_s": 40},
                                       daemon=True)
        self.gen = gen

    def __enter__(self):
        self.thread.start()
        return self.gen

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(timeout=30)


def _rollout_proc(served, candidate, *extra):
    """`graceful rollout` as an operator runs it. These generations were never gated
    offline (the drill is about the live rule): --skip-gate, which the audit log records."""
    env = {**os.environ, "GRACEFUL_ADMIN_TOKEN": TOKEN}
    return subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "rollout", str(served["config"]),
                             "--candidate", candidate, "--router", served["url"], "--json", "--skip-gate", *extra],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _moves(reg, candidate, rollout_id):
    return [(e.action, e.from_state, e.to_state, e.data.get("step")) for e in reg.events(candidate)
            if e.data.get("rollout_id") == rollout_id and e.to_state is not None and e.action != "status"]


def test_bad_candidate_is_rolled_back_automatically(served):
    client = RouterClient(served["url"], TOKEN)
    with _Traffic(served["url"], served["ds"]):
        proc = _rollout_proc(served, "g2")
        out, err = proc.communicate(timeout=90)
    assert proc.returncode == 1, err[-3000:]
    summary = json.loads(out)
    assert summary["state"] == "rolled_back" and summary["candidate"] == "g2"
    st = client.status()
    assert st["production"] == "g0" and st["weights"]["g2"] == 0.0 and "g2" not in st["shadows"]
    with Registry(served["registry"]) as reg:
        r = reg.latest_rollout("g2")
        moves = _moves(reg, "g2", r.id)
        assert moves[0][0] == "rollout_started" and moves[-1][0] == "rollback" and moves[-1][2] == "rolled_back"
        ev = [e for e in reg.events("g2") if e.action == "rollback"][-1]
        assert ev.actor == "controller" and "NFR" in ev.reason, ev.reason
        assert reg.generation("g2").status == "rolled_back"
        assert not any(m[2] == "promoted" for m in moves)
        started = [e for e in reg.events("g2") if e.action == "rollout_started"][-1]
        assert "skipped with --skip-gate" in started.reason


def test_controller_killed_mid_canary_resumes_and_promotes_once(served):
    client = RouterClient(served["url"], TOKEN)
    metrics_url = f"http://127.0.0.1:{served['metrics_port']}/metrics"
    with _Traffic(served["url"], served["ds"]) as traffic:
        proc = _rollout_proc(served, "g1")
        killed_at = None
        deadline = time.monotonic() + 90
        with Registry(served["registry"]) as reg:
            while time.monotonic() < deadline and proc.poll() is None:
                r = reg.active_rollout()
                if r is not None and r.candidate == "g1" and r.state == "canary" and r.step == 1:
                    # the live controller's metrics say where it is
                    text = requests.get(metrics_url, timeout=5).text
                    assert 'graceful_rollout_state{candidate="g1",state="canary"} 1.0' in text
                    # one controller per rollout: a second one exits 1 naming the holder
                    holder = reg.lease(r.id).holder
                    other = _rollout_proc(served, "g1")
                    _, other_err = other.communicate(timeout=60)
                    assert other.returncode == 1 and f"driven by controller {holder!r}" in other_err, other_err[-2000:]
                    proc.send_signal(signal.SIGKILL)
                    proc.wait(timeout=10)
                    killed_at = (r.state, r.step)
                    break
                time.sleep(0.05)
            assert killed_at is not None, f"never saw canary step 1; rc={proc.poll()} {proc.stderr.read()[-2000:]}"
            assert proc.returncode == -signal.SIGKILL
            # the rollout waits, persisted, while no controller runs; the dead holder's
            # lease expires, then a new controller takes the rollout over
            time.sleep(LEASE_S + 0.5)
            r = reg.active_rollout()
            # (the second controller's start took seconds: the first may have gone on meanwhile)
            assert r is not None and r.state in ("canary", "guarding"), r
            proc2 = _rollout_proc(served, "g1")
            guarded = None
            deadline = time.monotonic() + 120
            while proc2.poll() is None and time.monotonic() < deadline:
                now = reg.active_rollout()
                if guarded is None and now is not None and now.state == "guarding":
                    # the move is persisted first, then the router follows: wait for it
                    st = client.status()
                    if st["weights"].get("g1") == 1.0:
                        guarded = (st, reg.production().name)
                time.sleep(0.1)
            out, err = proc2.communicate(timeout=30)
            assert proc2.returncode == 0, err[-3000:]
            summary = json.loads(out)
            assert summary["state"] == "promoted" and summary["rollout_id"] == r.id
            moves = _moves(reg, "g1", r.id)
            taken = [e for e in reg.events("g1") if e.action == "lease_taken_over"]
            assert len(taken) == 1 and taken[0].data["previous_holder"] == holder
            assert [(m[0], m[2], m[3]) for m in moves] == [
                ("rollout_started", "shadow", None), ("advance", "canary", 1), ("advance", "canary", 2),
                ("advance", "canary", 3), ("guard", "guarding", 3), ("promote", "promoted", 3)], moves
            # guarding: the registry names g1 production, the router still compares with g0
            assert guarded is not None, "never saw the guard"
            st, prod = guarded
            assert prod == "g1" and st["production"] == "g0" and st["weights"]["g1"] == 1.0
            assert "guard passed" in [e for e in reg.events("g1") if e.action == "promote"][-1].reason
            assert reg.generation("g1").status == "production" and reg.generation("g0").status == "retired"
            # A third start after the end reports it and changes nothing.
            proc3 = _rollout_proc(served, "g1")
            out3, _ = proc3.communicate(timeout=60)
            assert proc3.returncode == 0 and json.loads(out3)["state"] == "promoted"
            assert _moves(reg, "g1", r.id) == moves
    assert traffic.stats.ok > 0
    st = client.status()
    assert st["production"] == "g1" and st["weights"]["g1"] == 1.0 and "g1" not in st["shadows"]
    # every call was timed for the latency test (none slower than 5 s)
    c = st["generations"]["g1"]["counters"]
    assert c["timed_calls"] > 0 and c["slow_calls"] == 0
    assert "resum" in err or "rollout" in err  # the second controller printed its progress
