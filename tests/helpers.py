"""Small helpers shared by tests (no fixtures: those live in conftest.py)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path

import pytest
import yaml

PROMETHEUS_APT = "apt-get install prometheus prometheus-alertmanager"


def in_ci() -> bool:
    """True when the environment variable CI is "true" or "1" (any case)."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1")


def require_tool(name: str, install_hint: str = PROMETHEUS_APT, also_in: tuple[str, ...] = ()) -> str:
    """The path of executable `name` (on PATH, else in the directories `also_in`).

    Missing: under CI=true (or 1) the test fails, naming the tool and how to install it,
    since CI must run every test; elsewhere it skips with the same message."""
    path = shutil.which(name) or next((p for d in also_in if shutil.which(p := os.path.join(d, name))), None)
    if path is not None:
        return path
    msg = f"{name} is not installed (Debian: {install_hint}; scripts/install-system.sh does it as root)"
    if in_ci():
        pytest.fail(f"{msg}. CI={os.environ['CI']}: a test needing {name} fails instead of skipping", pytrace=False)
    pytest.skip(msg)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_untrained_run(tmp: Path, data: dict, arch: dict, trained: tuple[str, ...], names: tuple[str, ...] = (),
                        serving: dict | None = None) -> Path:
    """A run config (generations `names`, default `trained`) and a run dir as `graceful train`
    leaves it for the `trained` ones: untrained weights, their sha256 in metrics.json.
    Enough for tests of serving paths; returns the config path."""
    from workers.checkpoint import save_model
    from workers.data import load_dataset
    from workers.models import build_model
    from workers.specs import ArchSpec, DataSpec

    cfg = {"run_dir": str(tmp / "run"), "data": data,
           "generations": [{"name": n, "arch": arch} for n in (names or trained)]}
    if serving:
        cfg["serving"] = serving
    path = tmp / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    ds = load_dataset(DataSpec(**data))
    for name in trained:
        d = tmp / "run" / "generations" / name
        sha = save_model(build_model(ArchSpec(**arch), ds.input_dim, ds.num_classes), d)
        (d / "metrics.json").write_text(json.dumps({"sha256": sha}))
    return path


def moved_lqf(parent, scale: float = 0.2):
    """An LQF model around `parent` whose delta is random (scale * N(0, 1), from torch's
    current seed), so that it differs from its parent; eval mode."""
    import torch

    from workers.models import LinearizedNet

    lin = LinearizedNet(parent)
    with torch.no_grad():
        for d in lin.delta:
            d.copy_(scale * torch.randn_like(d))
    return lin.eval()


def wait_for(cond, timeout_s: float = 10.0):
    """The first truthy value of `cond()`, polled every 0.1 s; AssertionError after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError("condition not met in time")
