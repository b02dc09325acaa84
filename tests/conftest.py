"""Shared fixtures. Unit tests never start Ray: `ray.init` fails outside integration tests."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _no_ray_in_unit_tests(request, monkeypatch):
    if request.node.get_closest_marker("integration") is not None:
        return
    try:
        import ray
    except ImportError:  # pragma: no cover
        return

    def _refuse(*args, **kwargs):
        raise RuntimeError("unit tests must not start Ray; mark the test `integration`")

    monkeypatch.setattr(ray, "init", _refuse)


@pytest.fixture
def cache_dir(tmp_path_factory, monkeypatch):
    """A dataset cache shared by the whole session, so MNIST-1D is generated once."""
    d = tmp_path_factory.getbasetemp() / "dataset-cache"
    monkeypatch.setenv("GRACEFUL_CACHE", str(d))
    return d
