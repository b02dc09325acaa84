"""Integration tests share one Ray session per module (start-up costs seconds on 2 cores)."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/integration/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.integration)


def local_ray(**system_config):
    """A local Ray cluster for one test module, shut down (with Serve) afterwards."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             ignore_reinit_error=True, _system_config=system_config or None)
    yield ray
    try:
        from ray import serve

        serve.shutdown()
    except Exception:
        pass
    ray.shutdown()


@pytest.fixture(scope="module")
def ray_session():
    """A local Ray cluster for the whole test module (start-up costs seconds on 2 cores)."""
    yield from local_ray()


@pytest.fixture(autouse=True, scope="session")
def feedback_token():
    """Routers started by these tests take their feedback token from the environment
    (serving.feedback_token_env), and so do RouterClient and the traffic generator."""
    mp = pytest.MonkeyPatch()
    mp.setenv("GRACEFUL_FEEDBACK_TOKEN", "integration-feedback-token")
    yield "integration-feedback-token"
    mp.undo()
