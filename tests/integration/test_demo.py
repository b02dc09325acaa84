"""`graceful demo` end to end on the shipped config/demo.yaml (MNIST-1D, Ray Train, Ray Serve
over 127.0.0.1, the rollout controller), as a subprocess the way a user runs it; and
Ctrl-C stopping it cleanly. Each leaves no Ray process behind."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import yaml
from tests.helpers import free_port

ROOT = Path(__file__).resolve().parents[2]


def _ray_pids() -> set[int]:
    """PIDs of Ray's daemons (any session): a run that cleaned up adds none."""
    out = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    return {int(line.split()[0]) for line in out.splitlines()
            if any(d in line for d in ("raylet", "gcs_server", "ray::", "default_worker.py"))}


def _wait_gone(before: set[int], timeout_s: float = 30) -> set[int]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        left = _ray_pids() - before
        if not left:
            return left
        time.sleep(1)
    return _ray_pids() - before


def _demo_config(tmp_path: Path) -> Path:
    raw = yaml.safe_load((ROOT / "config" / "demo.yaml").read_text())
    raw["run_dir"] = str(tmp_path / "run")
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _env(tmp_path: Path, admin_token: str | None = None) -> dict:
    """Without `admin_token` the demo makes its own for the run; with it, the operator's
    token (exported as the operator's guide says) must reach the router and the controller."""
    env = {**os.environ, "GRACEFUL_CACHE": str(tmp_path / "cache")}
    env.pop("RAY_ADDRESS", None)
    env.pop("GRACEFUL_ADMIN_TOKEN", None)
    if admin_token is not None:
        env["GRACEFUL_ADMIN_TOKEN"] = admin_token
    return env


def test_demo_promotes_the_compatible_generation_and_rolls_back_the_regression(tmp_path):
    cfg = _demo_config(tmp_path)
    before = _ray_pids()
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", "demo", str(cfg), "--port", str(free_port()),
                           "--json"], cwd=ROOT, env=_env(tmp_path, admin_token="operator-token-123"),
                          capture_output=True, text=True, timeout=540)
    wall = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    outcomes = {g["name"]: g["outcome"] for g in summary["generations"]}
    assert outcomes == {"g0": "promoted", "g1": "promoted", "g2": "rolled_back"}, proc.stderr[-3000:]
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert on_disk == summary and summary["wall_seconds"] <= wall
    for g in on_disk["generations"]:
        assert {"name", "error", "nfr", "outcome"} <= set(g)
    g1 = next(g for g in summary["generations"] if g["name"] == "g1")
    g2 = next(g for g in summary["generations"] if g["name"] == "g2")
    # g1 is compatible: its queries search g0's gallery better than g0's own do.
    g0 = next(g for g in summary["generations"] if g["name"] == "g0")
    assert g1["top1_vs_gallery"] > g0["top1_vs_gallery"]
    assert g1["gate_passed"] is True and g2["gate_passed"] is False
    assert g2["live_nfr"] > 0.02 and g2["live_labelled"] > 0
    assert Path(g1["report"]).is_file()
    # The rollback was the controller's own decision, in the audit log.
    db = sqlite3.connect(tmp_path / "run" / "registry.sqlite")
    rows = db.execute("SELECT actor, subject, to_state FROM events WHERE to_state = 'rolled_back'").fetchall()
    assert ("controller", "g2", "rolled_back") in rows
    started = dict(db.execute("SELECT subject, reason FROM events WHERE action = 'rollout_started'").fetchall())
    assert "offline gate: evaluation" in started["g1"] and started["g1"].endswith("against 'g0' passed)")
    assert "against 'g1' failed: " in started["g2"] and "the gate is advisory for g2" in started["g2"]
    promoted = db.execute("SELECT COUNT(*) FROM events WHERE subject = 'g1' AND action LIKE '%promot%' "
                          "AND to_state = 'promoted'").fetchone()[0]
    assert promoted == 1
    # The gates and rollouts were the pipeline's loop: each stage audited once.
    stages = db.execute("SELECT subject, from_state, to_state FROM events WHERE action = 'pipeline_stage' "
                        "ORDER BY id").fetchall()
    assert [s for s in stages if s[0] == "g2"] == [("g2", None, "evaluate"), ("g2", "evaluate", "rollout"),
                                                    ("g2", "rollout", "rolled_back")], stages
    assert ("g1", "rollout", "promoted") in stages and len(stages) == len(set(stages))
    assert "summary:" in proc.stderr and "[g2] rolled_back" in proc.stderr
    assert not _wait_gone(before), "the demo left Ray processes behind"


def test_ctrl_c_stops_the_demo_cleanly(tmp_path):
    cfg = _demo_config(tmp_path)
    before = _ray_pids()
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "demo", str(cfg), "--port", str(free_port())],
                            cwd=ROOT, env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        for line in proc.stdout:  # wait until Ray Train is busy, then interrupt
            lines.append(line)
            if "training on Ray Train" in line:
                break
        time.sleep(2)
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, "".join(lines) + rest
    assert "interrupted" in rest
    assert not _wait_gone(before), "Ctrl-C left Ray processes behind"
