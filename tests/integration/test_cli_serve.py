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

import requests
import yaml

from serving.client import RouterClient, RouterError
from workers.checkpoint import save_model
from workers.data import load_dataset
from workers.models import build_model
from workers.specs import ArchSpec, DataSpec, TrainSpec
from workers.training import fit
from tests.helpers import free_port

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


def test_graceful_serve_runs_and_stops_cleanly(tmp_path):
    cfg = _write_run(tmp_path)
    port = free_port()
    env = {**os.environ, "GRACEFUL_ADMIN_TOKEN": "cli-admin-token-1"}
    env.pop("RAY_ADDRESS", None)  # its own local Ray, not a cluster the test session may know
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "serve", str(cfg), "--candidate", "g1",
                             "--port", str(port), "--duration", "240", "--json"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline:
            try:
                if requests.get(url + "/healthz", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert proc.poll() is None, "graceful serve exited early"
            time.sleep(1)
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
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=90)
    assert proc.returncode == 0
    info = json.loads(out[out.index("{"):out.rindex("}") + 1])
    assert info["url"] == url and info["candidates"] == ["g1"] and info["admin"] is True
    assert "127.0.0.1" in info["url"]
