"""Fixtures of the prediction log tests: a real redis-server per test (no persistence)."""

from __future__ import annotations

import pytest

from tests.redis_server import RedisServer


@pytest.fixture
def redis_server():
    """A fresh redis-server on its own port, stopped after the test (skips, or fails under
    CI=true, where redis-server is not installed)."""
    with RedisServer() as server:
        yield server


@pytest.fixture
def redis_url(redis_server) -> str:
    return redis_server.url
