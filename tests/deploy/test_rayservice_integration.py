"""The RayService's Serve config deployed on a real local Ray: the same serveConfigV2 as
deploy/kuberay/rayservice.yaml (only the config path and the HTTP bind changed), applied
declaratively the way KubeRay applies it, answers like `graceful serve`."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import yaml

from serving.client import RouterClient, RouterError
from workers.data import load_dataset
from workers.specs import DataSpec
from tests.helpers import free_port, write_untrained_run

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
ARCH = {"type": "mlp", "width": 8, "depth": 1, "embed_dim": 8}
DATA = {"source": "digits", "test_fraction": 0.3, "val_fraction": 0.1}
TOKEN = "rayservice-admin-token-1"


def _write_run(tmp: Path) -> Path:
    return write_untrained_run(tmp, DATA, ARCH, ("g0", "g1"), serving={"cpus_per_replica": 0.1, "router_cpus": 0.1})


@pytest.fixture
def ray_with_token(monkeypatch):
    import ray

    # Build tasks and replicas inherit the environment, as pods pass the Secret's token.
    monkeypatch.setenv("GRACEFUL_ADMIN_TOKEN", TOKEN)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    from ray import serve

    try:
        serve.shutdown()
    finally:
        ray.shutdown()


def test_rayservice_serve_config_deploys_and_serves(tmp_path, ray_with_token):
    from ray import serve
    from ray.serve._private.api import serve_start
    from ray.serve.schema import ServeDeploySchema

    cfg_path = _write_run(tmp_path)
    port = free_port()
    svc = yaml.safe_load((ROOT / "deploy" / "kuberay" / "rayservice.yaml").read_text())
    raw = yaml.safe_load(svc["spec"]["serveConfigV2"])
    raw["http_options"] = {"host": "127.0.0.1", "port": port}
    for app in raw["applications"]:
        assert app["args"]["config"] == "/config/run.yaml"
        app["args"]["config"] = str(cfg_path)
    # The router first, so that it really has to wait for the generation applications.
    raw["applications"].sort(key=lambda a: a["name"] != "graceful")
    client = serve_start(http_options=raw["http_options"])
    client.deploy_apps(ServeDeploySchema.model_validate(raw))

    deadline = time.monotonic() + 240
    while True:
        apps = serve.status().applications
        states = {n: str(a.status) for n, a in apps.items()}
        if len(states) == 3 and all(s.endswith("RUNNING") for s in states.values()):
            break
        failed = {n: a.message for n, a in apps.items() if "FAIL" in str(a.status)}
        assert not failed, failed
        assert time.monotonic() < deadline, states
        time.sleep(1)
    assert set(states) == {"graceful", "graceful-gen-g0", "graceful-gen-g1"}

    url = f"http://127.0.0.1:{port}"
    router = RouterClient(url, TOKEN)
    st = router.status()
    assert st["production"] == "g0" and st["candidates"] == ["g1"] and st["shadows"] == ["g1"]
    x = load_dataset(DataSpec(**DATA)).test.x[:3].tolist()
    r = router.predict(x)
    assert r["generation"] == "g0" and len(r["predictions"]) == 3, (r, router.status())
    assert router.search(x[:1], k=2)["gallery_generation"] == "g0"
    # The admin token reached the router from the environment; the candidate app answers.
    router.set_traffic({"g0": 0.0, "g1": 1.0}, shadows=[])
    assert router.predict(x)["generation"] == "g1"
    with pytest.raises(RouterError) as e:
        RouterClient(url, "wrong-token-xyz").set_traffic({"g0": 1.0})
    assert e.value.status == 403
    assert os.environ["GRACEFUL_ADMIN_TOKEN"] == TOKEN
