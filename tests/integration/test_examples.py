"""The examples of docs/bring-your-model.md, end to end on real Ray Train and Ray Serve
(127.0.0.1): user models and data by import path, shipped to Ray's workers through the
config's runtime_env, trained, gated, served with image-shaped requests (a wrong shape
refused), rolled out and promoted.

- examples/image_resnet through the CLI and the library (a model with its own embed/head,
  `ray.runtime_env.working_dir`);
- examples/custom_backbone through the Python API, by running the code block of
  docs/bring-your-model.md as it is written (a backbone without embed/head,
  `ray.runtime_env.py_modules`).
Each test starts its own Ray cluster: the runtime_env is fixed when Ray starts.
"""

from __future__ import annotations

import json
import re
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import requests
import yaml

from orchestrator.cli import main
from orchestrator.config import init_ray, load_config
from tests.helpers import free_port

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
TOKEN = "examples-admin-token-1"


@pytest.fixture
def own_ray():
    """Started by the test (with the example's runtime_env); Serve and Ray shut down after."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    yield
    try:
        from ray import serve

        serve.shutdown()
    except Exception:
        pass
    ray.shutdown()


def _example_config(tmp_path: Path, example: str) -> Path:
    """The example's config with an absolute runtime_env, run_dir under tmp, a free port."""
    raw = yaml.safe_load((EXAMPLES / example / "config.yaml").read_text())
    env = raw["ray"]["runtime_env"]
    if "working_dir" in env:
        env["working_dir"] = str((EXAMPLES / example / env["working_dir"]).resolve())
    if "py_modules" in env:
        env["py_modules"] = [str((EXAMPLES / example / p).resolve()) for p in env["py_modules"]]
    raw["run_dir"] = str(tmp_path / "run")
    raw["serving"] = {**raw.get("serving", {}), "port": free_port(), "admin_token": TOKEN}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.mark.timeout(900)
def test_image_resnet_example_trains_serves_images_and_is_promoted(own_ray, tmp_path, capsys):
    from orchestrator.apps import attach_on_cluster, serving_plan, start_router
    from orchestrator.demo.traffic import TrafficGenerator
    from orchestrator.registry import Registry, registry_path
    from orchestrator.rollout.controller import Controller
    from orchestrator.rollout.sources import RouterSource
    from orchestrator.rollout.start import start_rollout
    from orchestrator.rundir import read_metrics
    from serving.client import RouterClient
    from workers.data import load_dataset

    path = _example_config(tmp_path, "image_resnet")
    assert main(["validate", str(path)]) == 0
    cfg = load_config(path)  # puts the example directory on the driver's sys.path
    init_ray(cfg, address="local", num_cpus=2)  # workers get the example through working_dir
    assert main(["train", str(path), "--json"]) == 0  # g0, production
    assert main(["train", str(path), "--json"]) == 0  # g1 against g0
    m1 = read_metrics(cfg, "g1")
    assert m1["parent"] == "g0" and m1["input_shape"] == [1, 8, 8] and m1["factory"] == "resnet:build"
    assert {c["kind"] for c in m1["constraints"]} == {"bct", "focal_distillation"}
    assert main(["evaluate", str(path), "--candidate", "g1", "--json"]) == 0, capsys.readouterr().out
    capsys.readouterr()

    ds = load_dataset(cfg.data)
    assert ds.input_shape == (1, 8, 8)
    base = f"http://127.0.0.1:{cfg.serving.port}"
    with Registry(registry_path(cfg)) as reg:
        start_router(cfg, reg, serving_plan(cfg, reg, ["g1"]))
        status = requests.get(f"{base}/v1/status", timeout=10).json()
        assert status["production"] == "g0" and "g1" in status["generations"]
        ok = requests.post(f"{base}/v1/predict", json={"inputs": ds.test.x[:3].tolist()}, timeout=30)
        assert ok.status_code == 200 and len(ok.json()["predictions"]) == 3
        flat = requests.post(f"{base}/v1/predict", json={"inputs": ds.test.x[:3].reshape(3, 64).tolist()},
                             timeout=30)
        assert flat.status_code == 400 and "8" in flat.json()["error"]

        client = RouterClient(base, TOKEN)
        source = RouterSource(client)
        attach = attach_on_cluster(cfg, reg)
        r = start_rollout(cfg, reg, client, source, "g1", "test", "example", attach=attach)
        users = TrafficGenerator(base, ds.test.x, ds.test.y, rows_per_request=8, concurrency=2, label_delay_s=0.2)
        stop = threading.Event()
        t = threading.Thread(target=users.run, args=(20_000, 120.0, stop, 60.0), daemon=True)
        t.start()
        try:
            last = Controller(cfg, reg, client, source, rollout_id=r.id, attach=attach).run(
                threading.Event(), max_seconds=150)
        finally:
            stop.set()
            t.join(timeout=15)
            client.close()
        assert last.state == "promoted", last
        assert reg.production().name == "g1"
    assert requests.get(f"{base}/v1/status", timeout=10).json()["production"] == "g1"


def _doc_python_block() -> str:
    text = (ROOT / "docs" / "bring-your-model.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) == 1, "docs/bring-your-model.md has one python block, run here"
    return blocks[0]


@pytest.mark.timeout(900)
def test_bring_your_model_doc_code_runs_the_custom_backbone_lifecycle(own_ray, tmp_path, monkeypatch, capsys):
    code = _doc_python_block()
    assert '"runs/byom"' in code and "8123" in code
    code = code.replace('"runs/byom"', repr(str(tmp_path / "byom"))).replace("8123", str(free_port()))
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the code puts the example on sys.path
    namespace: dict = {"__name__": "doc_example"}
    exec(compile(code, "docs/bring-your-model.md", "exec"), namespace)
    assert namespace["final"].state == "promoted" and namespace["refused"] == 400
    g1 = namespace["g1"]
    assert g1.metrics["parent"] == "g0" and g1.metrics["input_shape"] == [1, 12, 12]
    assert g1.metrics["factory"] == "tinynet.backbone:build"
    # the run the code built is one the CLI reads
    capsys.readouterr()
    assert main(["registry", str(tmp_path / "byom" / "graceful.yaml"), "show", "g1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "production"
    # a model whose factory differs from the config's is refused before it is imported
    from workers.checkpoint import CheckpointError, load_model

    with pytest.raises(CheckpointError, match="factory"):
        load_model(g1.checkpoint, g1.sha256, factory="resnet:build")
    assert np.isfinite(namespace["verdict"].metrics["nfr"])
