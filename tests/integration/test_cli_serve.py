"""`graceful serve` end to end: a run dir as `graceful train` leaves it, a real Serve
instance on a free 127.0.0.1 port, admin over HTTP, a clean stop on SIGINT."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import requests
import yaml

from serving.client import RouterClient, RouterError
from workers.checkpoint import save_model
from workers.data import load_dataset
from workers.models import build_model
from workers.specs import ArchSpec, DataSpec, TrainSpec
from workers.training import fit
from tests.helpers import free_port, wait_for

ROOT = Path(__file__).resolve().parents[2]


def _write_run(tmp: Path) -> Path:
    arch = {"type": "mlp", "width": 16, "depth": 1, "embed_dim": 8}
    cfg = {"run_dir": str(tmp / "run"), "data": {"source": "digits", "test_fraction": 0.3, "val_fraction": 0.1},
           "generations": [{"name": "g0", "arch": arch}, {"name": "g1", "arch": arch}]}
    path = tmp / "serve.yaml"
    path.write_text(yaml.safe_dump(cfg))
    ds = load_dataset(DataSpec(source="digits", test_fraction=0.3, val_fraction=0.1))
    for i, name in enumerate(("g0", "g1")):
        model = build_model(ArchSpec(**arch), ds.input_dim, ds.num_classes)
        fit(model, ds.train, TrainSpec(steps=60, batch_size=64, seed=i))
        d = tmp / "run" / "generations" / name
        sha = save_model(model, d)
        (d / "metrics.json").write_text(json.dumps({"sha256": sha, "parent": None if i == 0 else "g0"}))
    return path


def _serve(cfg: Path, port: int, *extra: str) -> tuple[subprocess.Popen, str]:
    """`graceful serve CONFIG` in its own local Ray, once its /healthz answers."""
    env = {**os.environ, "GRACEFUL_ADMIN_TOKEN": "cli-admin-token-1"}
    env.pop("RAY_ADDRESS", None)  # its own local Ray, not a cluster the test session may know
    # stderr to a file (a pipe nobody reads could fill and block it), quoted when it fails.
    err = open(cfg.parent / f"serve-{port}.stderr", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "serve", str(cfg), "--candidate", "g1",
                             "--port", str(port), "--duration", "240", *extra],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 150
    while time.monotonic() < deadline:
        try:
            if requests.get(url + "/healthz", timeout=2).status_code == 200:
                return proc, url
        except requests.RequestException:
            pass
        if proc.poll() is not None:
            err.seek(0)
            raise AssertionError(f"graceful serve exited early ({proc.returncode}); stderr ends:\n{err.read()[-3000:]}")
        time.sleep(1)
    proc.kill()
    raise AssertionError("graceful serve did not answer /healthz in 150 s")


def _stop(proc: subprocess.Popen) -> str:
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=90)
    assert proc.returncode == 0
    return out


def test_graceful_serve_runs_and_stops_cleanly(tmp_path):
    cfg = _write_run(tmp_path)
    port = free_port()
    proc, url = _serve(cfg, port, "--json")
    try:
        client = RouterClient(url, "cli-admin-token-1")
        st = client.status()
        assert st["production"] == "g0" and st["shadows"] == ["g1"]
        r = client.predict([[0.0] * 64])
        assert r["generation"] == "g0"
        assert client.search([[0.0] * 64], k=2)["gallery_generation"] == "g0"
        client.set_traffic({"g0": 0.0, "g1": 1.0}, shadows=[])
        assert client.predict([[0.0] * 64])["generation"] == "g1"
        try:
            RouterClient(url, "wrong-token-xyz").set_traffic({"g0": 1.0})
            raise AssertionError("a wrong token was accepted")
        except RouterError as e:
            assert e.status == 403
    finally:
        out = _stop(proc)
    info = json.loads(out[out.index("{"):out.rindex("}") + 1])
    assert info["url"] == url and info["candidates"] == ["g1"] and info["admin"] is True
    assert "127.0.0.1" in info["url"]


def test_labels_for_answers_before_a_serve_restart_join_after_it(tmp_path):
    """The sqlite log under run_dir outlives `graceful serve`: 6 requests answered, the
    server stopped and started again; 3 of them labelled over /v1/feedback, the other 3
    (and an id never served) by `graceful labels import` while it runs; all 6 join, the
    counters went on from the first run's, in the same epoch."""
    cfg = _write_run(tmp_path)
    x = np.random.default_rng(0).random((6, 2, 64)).round(3)
    proc, url = _serve(cfg, free_port())
    try:
        client = RouterClient(url, "cli-admin-token-1")
        answers = [client.predict(xi.tolist()) for xi in x]
        # the shadow copies are compared after the answers: wait until all 6 are counted
        before = wait_for(lambda: (st := client.status())["generations"]["g1"]["counters"]["compared"] == 12
                          and st, timeout_s=30)
    finally:
        _stop(proc)
    proc, url = _serve(cfg, free_port())
    try:
        client = RouterClient(url, "cli-admin-token-1")
        joined = [client.feedback(a["request_id"], a["predictions"])["outcome"] for a in answers[:3]]
        labels = tmp_path / "labels.jsonl"
        labels.write_text("".join(json.dumps({"request_id": a["request_id"], "labels": a["predictions"]}) + "\n"
                                  for a in answers[3:]) + json.dumps({"request_id": "never-served", "labels": [1]}) + "\n")
        imp = subprocess.run([sys.executable, "-m", "orchestrator.cli", "labels", "import", str(cfg), str(labels),
                              "--json"], cwd=ROOT, capture_output=True, text=True, timeout=120)
        after = client.status()
    finally:
        _stop(proc)
    assert joined == ["joined"] * 3
    assert imp.returncode == 0, imp.stderr
    summary = json.loads(imp.stdout)
    assert summary["joined"] == 3 and summary["outcomes"]["unknown"] == 1
    assert after["counters_epoch"] == before["counters_epoch"]
    c0, c1 = before["generations"]["g1"]["counters"], after["generations"]["g1"]["counters"]
    assert c1["requests_shadow"] == c0["requests_shadow"] == 6
    assert c0["labelled"] == 0 and c1["labelled"] == 12
