"""Every registry test that does not open a SQLite file by hand runs on both backends."""

from __future__ import annotations

import pytest

from orchestrator.registry import Registry

PASSWORD_ENV = "GRACEFUL_REGISTRY_PASSWORD"


@pytest.fixture(params=["sqlite", "postgresql"])
def location(request, tmp_path):
    """Where a fresh registry lives: a file, or a new database on a real PostgreSQL server."""
    if request.param == "sqlite":
        return tmp_path / "registry.sqlite"
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def reg(location):
    r = Registry(location, password_env=PASSWORD_ENV)
    yield r
    r.close()
