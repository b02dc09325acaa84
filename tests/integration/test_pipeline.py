"""`graceful run CONFIG --until-idle` end to end on a small config: it trains g0 (which
becomes production), starts the serving plane itself, and then takes g1 and g2 one at a
time through training against the production of that moment, the offline gate and the
rollout, while a client sends traffic and posts labels. g1 (compatible) is promoted; g2
(noisy labels, advisory gate) is evaluated against g1, the production it would replace,
and rolled back live. Every stage transition is in the audit log once."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import requests
import yaml

from tests.helpers import free_port

ROOT = Path(__file__).resolve().parents[2]


def _config(tmp_path: Path, port: int) -> Path:
    raw = yaml.safe_load((ROOT / "config" / "quick.yaml").read_text())
    raw["run_dir"] = str(tmp_path / "run")
    raw["generations"].append({"name": "g2", "label_noise": 0.7, "offline_gate": "advisory",
                               "arch": {"type": "mlp", "width": 64, "depth": 2, "embed_dim": 32},
                               "train": {"steps": 200, "batch_size": 64, "eval_every": 100, "seed": 2}})
    raw["scaling"] = {"num_workers": 1, "cpus_per_worker": 0.5, "max_failures": 1}
    raw["serving"] = {"port": port}
    raw["retrieval"] = {"embed_workers": 1}
    raw["pipeline"] = {"poll_seconds": 0.5, "rollout_max_seconds": 240}
    # 539 test rows: the gate decides what it can and leaves the rest to the live rollout.
    raw["gates"] = {"require_bct": False, "max_nfr": 0.05, "max_class_nfr": 0.3, "allow_inconclusive": True}
    raw["rollout"]["nfr_limit"] = 0.05  # g1's NFR against g0 is about 1.5 % on digits; g2's about 17 %
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _traffic(url: str, stop: threading.Event, feedback_token: str) -> None:
    """Once the router answers: predictions over the test split, labels 0.3 s later."""
    from orchestrator.demo.traffic import TrafficGenerator
    from workers.data import load_dataset
    from workers.specs import DataSpec

    ds = load_dataset(DataSpec(source="digits", seed=0, test_fraction=0.3, val_fraction=0.1))
    while not stop.is_set():
        try:
            if requests.get(url + "/healthz", timeout=1).status_code == 200:
                break
        except requests.RequestException:
            pass
        stop.wait(1)
    gen = TrafficGenerator(url, ds.test.x, ds.test.y, rows_per_request=8, concurrency=2, label_delay_s=0.3,
                           feedback_token=feedback_token)
    gen.run(200_000, 600, stop, 30.0)


def test_run_until_idle_promotes_the_compatible_generation_and_rolls_back_the_regression(tmp_path):
    port = free_port()
    cfg = _config(tmp_path, port)
    env = {**os.environ, "GRACEFUL_ADMIN_TOKEN": "pipeline-admin-1", "GRACEFUL_FEEDBACK_TOKEN": "pipeline-feedback-1",
           "GRACEFUL_CACHE": str(tmp_path / "cache")}
    env.pop("RAY_ADDRESS", None)
    stop = threading.Event()
    client = threading.Thread(target=_traffic, args=(f"http://127.0.0.1:{port}", stop, "pipeline-feedback-1"),
                              daemon=True)
    client.start()
    t0 = time.monotonic()
    try:
        proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", "run", str(cfg), "--until-idle",
                               "--max-seconds", "600"], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=660)
    finally:
        stop.set()
        client.join(timeout=20)
    wall = time.monotonic() - t0
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    print(f"graceful run --until-idle: {wall:.1f} s")
    st = subprocess.run([sys.executable, "-m", "orchestrator.cli", "status", str(cfg), "--json"], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=60)
    pipeline = json.loads(st.stdout)["pipeline"]
    assert [(g["name"], g["stage"]) for g in pipeline["generations"]] == [
        ("g0", "promoted"), ("g1", "promoted"), ("g2", "rolled_back")], proc.stdout[-4000:]
    assert pipeline["next"] is None and pipeline["paused"] is False

    db = sqlite3.connect(tmp_path / "run" / "registry.sqlite")
    stages = db.execute("SELECT subject, from_state, to_state FROM events WHERE action = 'pipeline_stage' "
                        "ORDER BY id").fetchall()
    assert len(stages) == len(set(stages))  # every transition once
    assert [(f, t) for s, f, t in stages if s == "g2"] == [
        (None, "train"), ("train", "evaluate"), ("evaluate", "rollout"), ("rollout", "rolled_back")]
    assert [(f, t) for s, f, t in stages if s == "g0"] == [(None, "train"), ("train", "promoted")]
    # g2 was trained after g1's promotion and gated against g1, the production it would replace.
    assert db.execute("SELECT baseline FROM evaluations WHERE candidate = 'g2'").fetchall() == [("g1",)]
    assert db.execute("SELECT parent FROM generations WHERE name = 'g2'").fetchone() == ("g1",)
    assert ("controller", "g2", "rolled_back") in db.execute(
        "SELECT actor, subject, to_state FROM events WHERE to_state = 'rolled_back'").fetchall()

    # Operators: pause and resume are audited and shown.
    for action, paused in (("pause", True), ("resume", False)):
        r = subprocess.run([sys.executable, "-m", "orchestrator.cli", "pipeline", action, str(cfg), "--json"],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and json.loads(r.stdout) == {"paused": paused, "changed": True}
        st = json.loads(subprocess.run([sys.executable, "-m", "orchestrator.cli", "status", str(cfg), "--json"],
                                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=60).stdout)
        assert st["pipeline"]["paused"] is paused
