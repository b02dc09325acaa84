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


_exit_status: list[int] = []


def pytest_sessionfinish(session, exitstatus):
    _exit_status.append(int(exitstatus))


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """Leave without the interpreter's teardown once pytest has reported.

    With torch, faiss (OpenMP pools) and Ray's atexit hooks loaded in one process,
    finalisation after the last test has crashed the interpreter (SIGSEGV, exit 139)
    after every test had passed; the run's result is pytest's, so hand that back
    directly. Any crash during a test still kills the run before this point."""
    import os
    import sys

    if not _exit_status:
        return
    try:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    except Exception:  # pragma: no cover - best effort before a hard exit
        pass
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_exit_status[-1])


@pytest.fixture(scope="session")
def postgres_server():
    """One real PostgreSQL server for the session (tests/postgres_server.py); skips, or
    fails under CI, when PostgreSQL is not installed."""
    from tests.postgres_server import PostgresServer

    server = PostgresServer()
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture
def postgres_url(postgres_server, monkeypatch):
    """A fresh database on the session's server; its password in GRACEFUL_REGISTRY_PASSWORD
    (registry.password_env's default), as a pod gets it from a Secret."""
    monkeypatch.setenv("GRACEFUL_REGISTRY_PASSWORD", postgres_server.password)
    return postgres_server.create_database()
