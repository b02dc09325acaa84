"""`graceful run` end to end with a data trigger, SIGKILLed twice. The config lists g0
only; `pipeline.snapshots` turns each .npz dropped into a folder into a generation of
`pipeline.template` trained on it. While a client sends traffic and posts labels:

  run A  trains g0 (production), starts the serving plane; snap-a is dropped; A is
         SIGKILLed while Ray Train trains snap-a
  run B  resumes snap-a's training, gates and promotes it; snap-b (70 % wrong labels,
         advisory gate) is dropped; B is SIGKILLed during snap-b's rollout
  run C  (--until-idle) resumes snap-b's rollout (after the dead controller's lease
         expires), which rolls it back; snap-c, dropped meanwhile, is trained against
         snap-a, the production that stayed, gated against it and promoted; exit 0.

The audit log then holds every stage transition of every generation once. The registry
is PostgreSQL (`registry.url`, a real server on 127.0.0.1), as on a cluster whose pods
share it: the three processes, the controller and the router's replicas all use it."""

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
import psycopg
import requests
import yaml

from tests.helpers import free_port

ROOT = Path(__file__).resolve().parents[2]
DIGITS = {"source": "digits", "seed": 0, "test_fraction": 0.3, "val_fraction": 0.1}


def _config(tmp_path: Path, port: int, registry_url: str) -> Path:
    raw = yaml.safe_load((ROOT / "config" / "quick.yaml").read_text())
    raw["run_dir"] = str(tmp_path / "run")
    raw["registry"] = {"url": registry_url}
    raw["generations"] = raw["generations"][:1]  # g0; the rest come from snapshots
    raw["scaling"] = {"num_workers": 1, "cpus_per_worker": 0.5, "max_failures": 1}
    raw["serving"] = {"port": port}
    raw["retrieval"] = {"embed_workers": 1}
    # 539 test rows: the gate decides what it can and leaves the rest to the live rollout.
    raw["gates"] = {"require_bct": False, "max_nfr": 0.05, "max_class_nfr": 0.3, "allow_inconclusive": True}
    raw["rollout"].update(nfr_limit=0.05, lease_seconds=3.0)
    raw["pipeline"] = {
        "poll_seconds": 0.5, "rollout_max_seconds": 240,
        "snapshots": {"pattern": "snaps/*.npz", "name": "snap-{stem}", "settle_seconds": 0.5},
        "template": {"offline_gate": "advisory", "arch": {"type": "mlp", "width": 64, "depth": 2, "embed_dim": 32},
                     "train": {"steps": 300, "batch_size": 64, "eval_every": 50}}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    (tmp_path / "snaps").mkdir()
    return path


def _drop(tmp_path: Path, stem: str, wrong: float, seed: int) -> None:
    """A snapshot: the digits training rows, a share `wrong` of their labels replaced."""
    from workers.data import load_dataset
    from workers.specs import DataSpec

    tr = load_dataset(DataSpec(**DIGITS)).train
    y = tr.y.copy()
    rng = np.random.default_rng(seed)
    flip = rng.random(len(y)) < wrong
    y[flip] = (y[flip] + rng.integers(1, 10, flip.sum())) % 10
    tmp = tmp_path / "snaps" / f".{stem}.tmp.npz"
    np.savez(tmp, x=tr.x, y=y)
    os.replace(tmp, tmp_path / "snaps" / f"{stem}.npz")  # matches the pattern only once complete


def _traffic(url: str, stop: threading.Event) -> None:
    from orchestrator.demo.traffic import TrafficGenerator
    from workers.data import load_dataset
    from workers.specs import DataSpec

    ds = load_dataset(DataSpec(**DIGITS))
    while not stop.is_set():  # each run's router in turn; labels only reach a live one
        try:
            if requests.get(url + "/healthz", timeout=1).status_code == 200:
                TrafficGenerator(url, ds.test.x, ds.test.y, rows_per_request=8, concurrency=2, label_delay_s=0.3,
                                 feedback_token="pipeline-feedback-1").run(2000, 20, stop, 30.0)
                continue
        except requests.RequestException:
            pass
        stop.wait(1)


class Run:
    """One `graceful run` process, its output in a file, lines awaited."""

    def __init__(self, cfg: Path, env: dict, log: Path, *extra: str):
        self.log = log
        self.out = open(log, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "run", str(cfg), *extra], cwd=ROOT,
                                     env=env, stdout=self.out, stderr=subprocess.STDOUT, text=True)

    def wait_for(self, text: str, timeout_s: float = 300) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if text in self.log.read_text():
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"graceful run exited ({self.proc.returncode}) before {text!r}:\n"
                                     + self.log.read_text()[-4000:])
            time.sleep(0.5)
        raise AssertionError(f"no {text!r} in {timeout_s:g} s:\n" + self.log.read_text()[-4000:])

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)


def test_snapshots_become_generations_and_two_sigkills_repeat_or_skip_no_stage(tmp_path, postgres_url,
                                                                             postgres_server):
    port = free_port()
    cfg = _config(tmp_path, port, postgres_url)
    # the registry's password reaches every process (and Ray's workers) by environment
    env = {**os.environ, "GRACEFUL_ADMIN_TOKEN": "pipeline-admin-1", "GRACEFUL_FEEDBACK_TOKEN": "pipeline-feedback-1",
           "GRACEFUL_CACHE": str(tmp_path / "cache"), "GRACEFUL_REGISTRY_PASSWORD": postgres_server.password}
    env.pop("RAY_ADDRESS", None)
    stop = threading.Event()
    client = threading.Thread(target=_traffic, args=(f"http://127.0.0.1:{port}", stop), daemon=True)
    client.start()
    t0 = time.monotonic()
    try:
        a = Run(cfg, env, tmp_path / "a.log")
        a.wait_for("serving: started the router")
        _drop(tmp_path, "a", wrong=0.0, seed=1)
        a.wait_for("[snap-a] training on Ray Train")
        a.wait_for("step 100/300")
        a.kill()

        b = Run(cfg, env, tmp_path / "b.log")
        b.wait_for("[snap-a] stage rollout -> promoted")
        _drop(tmp_path, "b", wrong=0.7, seed=2)
        b.wait_for("[snap-b] rollout")
        time.sleep(3)
        b.kill()

        _drop(tmp_path, "c", wrong=0.0, seed=3)
        c = Run(cfg, env, tmp_path / "c.log", "--until-idle", "--max-seconds", "500")
        rc = c.proc.wait(timeout=560)
    finally:
        stop.set()
        client.join(timeout=30)
        for r in ("a", "b", "c"):
            p = locals().get(r)
            if p is not None and p.proc.poll() is None:
                p.proc.kill()
    wall = time.monotonic() - t0
    print(f"three runs, two SIGKILLs: {wall:.1f} s")
    out = c.log.read_text()
    assert rc == 0, out[-4000:]
    assert "resum" in (tmp_path / "b.log").read_text().lower()  # snap-a's training went on from a checkpoint

    st = subprocess.run([sys.executable, "-m", "orchestrator.cli", "status", str(cfg), "--json"], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=60)
    pipeline = json.loads(st.stdout)["pipeline"]
    assert [(g["name"], g["stage"]) for g in pipeline["generations"]] == [
        ("g0", "promoted"), ("snap-a", "promoted"), ("snap-b", "rolled_back"), ("snap-c", "promoted")], out[-4000:]
    assert pipeline["next"] is None and "snaps/*.npz" in pipeline["next_trigger"]

    assert not (tmp_path / "run" / "registry.sqlite").exists()
    db = psycopg.connect(postgres_url, password=postgres_server.password)
    rows = db.execute("SELECT subject, from_state, to_state FROM events WHERE action = 'pipeline_stage' "
                      "ORDER BY id").fetchall()
    assert len(rows) == len(set(rows)), rows  # no stage recorded twice across three processes
    path = {s: [(f, t) for s2, f, t in rows if s2 == s] for s in ("g0", "snap-a", "snap-b", "snap-c")}
    assert path["g0"] == [(None, "train"), ("train", "promoted")]
    full = [(None, "train"), ("train", "evaluate"), ("evaluate", "rollout")]
    assert path["snap-a"] == full + [("rollout", "promoted")]
    assert path["snap-b"] == full + [("rollout", "rolled_back")]
    assert path["snap-c"] == full + [("rollout", "promoted")]
    # snap-c trained and gated against snap-a, the production that stayed.
    assert db.execute("SELECT baseline FROM evaluations WHERE candidate = 'snap-c'").fetchall() == [("snap-a",)]
    assert db.execute("SELECT parent FROM generations WHERE name = 'snap-c'").fetchone() == ("snap-a",)
    assert db.execute("SELECT COUNT(*) FROM rollouts WHERE candidate = 'snap-b'").fetchone() == (1,)
    snaps = db.execute("SELECT data FROM events WHERE action = 'pipeline_snapshot' ORDER BY id").fetchall()
    assert [json.loads(d)["generation"] for (d,) in snaps] == ["snap-a", "snap-b", "snap-c"]
    assert all(len(json.loads(d)["sha256"]) == 64 for (d,) in snaps)
    db.close()

    # Operators: pause and resume are audited and shown.
    for action, paused in (("pause", True), ("resume", False)):
        r = subprocess.run([sys.executable, "-m", "orchestrator.cli", "pipeline", action, str(cfg), "--json"],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and json.loads(r.stdout) == {"paused": paused, "changed": True}
        st = json.loads(subprocess.run([sys.executable, "-m", "orchestrator.cli", "status", str(cfg), "--json"],
                                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=60).stdout)
        assert st["pipeline"]["paused"] is paused
