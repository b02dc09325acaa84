"""What differs between the backends, and what must not: the same schema on SQLite and a
real PostgreSQL server, PostgreSQL's own refusals (append-only log under TRUNCATE too),
its connection errors, a server restart, and a run config that selects it."""

from __future__ import annotations

import pickle
import sqlite3
import threading
import time

import psycopg
import pytest

from orchestrator.apps import RegistryPlan
from orchestrator.config import load_config
from orchestrator.registry import SCHEMA_VERSION, Registry, RegistryError, StaleTransition, open_registry
from orchestrator.registry.backends import redact

PASSWORD_ENV = "GRACEFUL_REGISTRY_PASSWORD"
TABLES = ("commands", "evaluations", "events", "generations", "leases", "rollouts", "schema_version")


def _sqlite_columns(path) -> dict:
    db = sqlite3.connect(path)
    out = {t: {(r[1], bool(r[3]) or bool(r[5])) for r in db.execute(f"PRAGMA table_info({t})")} for t in TABLES}
    idx = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL")}
    db.close()
    return {"columns": out, "indexes": idx}


def _pg_columns(url, password) -> dict:
    with psycopg.connect(url, password=password) as c:
        out = {t: set() for t in TABLES}
        for table, col, nullable, default in c.execute(
                "SELECT table_name, column_name, is_nullable, column_default FROM information_schema.columns "
                "WHERE table_schema = 'public'"):
            # a key column is NOT NULL in both; SQLite reports the primary key apart
            out[table].add((col, nullable == "NO"))
        idx = {r[0] for r in c.execute("SELECT indexname FROM pg_indexes WHERE schemaname = 'public' "
                                       "AND indexname NOT LIKE '%%_pkey'")}
    return {"columns": out, "indexes": idx}


def test_both_backends_have_the_same_tables_columns_and_indexes(tmp_path, postgres_url, postgres_server):
    Registry(tmp_path / "r.sqlite").close()
    with Registry(postgres_url, password_env=PASSWORD_ENV) as reg:
        assert reg.schema_version() == SCHEMA_VERSION
    lite, pg = _sqlite_columns(tmp_path / "r.sqlite"), _pg_columns(postgres_url, postgres_server.password)
    for t in TABLES:
        assert {c for c, _ in lite["columns"][t]} == {c for c, _ in pg["columns"][t]}, t
        # NOT NULL agrees, except SQLite's INTEGER PRIMARY KEY (an alias of rowid, never NULL)
        assert {c for c, nn in pg["columns"][t] if nn} >= {c for c, nn in lite["columns"][t] if nn}, t
    assert lite["indexes"] == pg["indexes"] == {"one_active_rollout", "commands_pending", "events_subject",
                                                "evaluations_candidate"}


def test_postgres_audit_log_refuses_update_delete_and_truncate(postgres_url, postgres_server):
    with Registry(postgres_url, password_env=PASSWORD_ENV) as reg:
        reg.audit("alice", "note", "g0", "kept")
    with psycopg.connect(postgres_url, password=postgres_server.password, autocommit=True) as c:
        for sql in ("UPDATE events SET reason = 'edited'", "DELETE FROM events", "TRUNCATE events"):
            with pytest.raises(psycopg.errors.RaiseException, match="append-only"):
                c.execute(sql)
    with Registry(postgres_url, password_env=PASSWORD_ENV) as reg:
        assert [e.reason for e in reg.events()] == ["kept"]


def test_postgres_constraints_hold_for_any_client(postgres_url, postgres_server):
    with Registry(postgres_url, password_env=PASSWORD_ENV) as reg:
        reg.add_generation("g0", None, "mlp", "h", "/x/g0", "a" * 64)
        reg.add_generation("g1", "g0", "mlp", "h", "/x/g1", "b" * 64)
        reg.start_rollout("g1", "g0", "ctl", "go")
    with psycopg.connect(postgres_url, password=postgres_server.password, autocommit=True) as c:
        with pytest.raises(psycopg.errors.UniqueViolation, match="one_active_rollout"):
            c.execute("INSERT INTO rollouts (candidate, baseline, state, step, weight, step_started_at, started_at, "
                      "updated_at) VALUES ('g1', 'g0', 'guarding', 1, 1.0, 0, 0, 0)")
        with pytest.raises(psycopg.errors.CheckViolation):
            c.execute("INSERT INTO commands (rollout_id, command, actor, reason, created_at) "
                      "VALUES (1, 'explode', 'x', 'y', 0)")
        with pytest.raises(psycopg.errors.ForeignKeyViolation):
            c.execute("INSERT INTO generations (name, parent, arch, config_hash, checkpoint_uri, sha256, created_at, "
                      "status) VALUES ('g9', 'nobody', 'mlp', 'h', '/x', 'c', 0, 'trained')")


def test_a_wrong_password_is_a_clear_error_without_the_password(postgres_url, monkeypatch):
    monkeypatch.setenv(PASSWORD_ENV, "not-the-password")
    with pytest.raises(RegistryError, match=r"cannot connect to the registry at postgresql://graceful@127\.0\.0\.1:"
                                            r"\d+/t_\w+: .*password authentication failed") as e:
        Registry(postgres_url, password_env=PASSWORD_ENV)
    assert "not-the-password" not in str(e.value)


def test_no_server_is_a_clear_error():
    from tests.helpers import free_port

    with pytest.raises(RegistryError, match=r"cannot connect to the registry at postgresql://u@127\.0\.0\.1:\d+/db"):
        Registry(f"postgresql://u@127.0.0.1:{free_port()}/db")


def test_readonly_open_of_an_empty_database_says_there_is_no_registry(postgres_url):
    with pytest.raises(RegistryError, match="no registry at postgresql://.*no graceful schema"):
        Registry(postgres_url, readonly=True, password_env=PASSWORD_ENV)


def test_the_registry_reconnects_after_a_server_restart(postgres_url, postgres_server):
    reg = Registry(postgres_url, password_env=PASSWORD_ENV)
    reg.add_generation("g0", None, "mlp", "h", "/x/g0", "a" * 64)
    postgres_server.restart()
    try:
        # The connection died with the server: the first read reconnects and repeats itself
        # (a read is safe to repeat); the committed generation is there, and writes go on.
        assert [g.name for g in reg.generations()] == ["g0"]
        reg.add_generation("g1", "g0", "mlp", "h", "/x/g1", "b" * 64)
        assert [g.name for g in reg.generations()] == ["g0", "g1"]
    finally:
        reg.close()


def test_a_run_config_with_registry_url_uses_postgres(tmp_path, postgres_url):
    path = tmp_path / "run.yaml"
    path.write_text(f"run_dir: {tmp_path / 'run'}\nregistry:\n  url: {postgres_url}\n"
                    "generations:\n  - name: g0\n    arch: {type: mlp, width: 8}\n")
    cfg = load_config(path)
    with open_registry(cfg) as reg:
        assert reg.location == postgres_url and reg.path is None
        reg.add_generation("g0", None, "mlp", "h", "/x/g0", "a" * 64)
    assert not (tmp_path / "run" / "registry.sqlite").exists()
    with Registry(postgres_url, password_env=PASSWORD_ENV) as reg:
        assert reg.generation("g0").sha256 == "a" * 64


def test_a_password_in_registry_url_is_refused_at_load(tmp_path):
    from orchestrator.config import ConfigError

    path = tmp_path / "run.yaml"
    path.write_text("registry:\n  url: postgresql://graceful:hunter2@db:5432/graceful\n"
                    "generations:\n  - name: g0\n    arch: {type: mlp, width: 8}\n")
    with pytest.raises(ConfigError, match=r"registry\.url: .*password_env") as e:
        load_config(path)
    assert "hunter2" not in str(e.value)


def test_the_router_plan_source_reads_postgres_and_pickles_without_a_password(postgres_url):
    with Registry(postgres_url, password_env=PASSWORD_ENV) as reg:
        reg.add_generation("g0", None, "mlp", "h", "/x/g0", "a" * 64)
        reg.add_generation("g1", "g0", "mlp", "h", "/x/g1", "b" * 64)
        reg.bootstrap_production("g0", "test")
        plan = RegistryPlan(reg.location, ["g1"], reg.password_env)
    blob = pickle.dumps(plan)
    assert b"GRACEFUL_REGISTRY_PASSWORD" in blob and postgres_url.encode() in blob
    got = pickle.loads(blob)(["g0", "g1"])
    assert got["production"] == "g0" and got["weights"] == {"g0": 1.0, "g1": 0.0}


def test_redact_drops_only_the_password():
    """postgresql://u:secret@h:5/db -> postgresql://u@h:5/db; a password in the query goes
    too; several hosts and IPv6 brackets stay; a URL without one is unchanged."""
    assert redact("postgresql://u:secret@h:5/db?sslmode=require") == "postgresql://u@h:5/db?sslmode=require"
    assert redact("postgresql://u@h/db?password=s3&sslmode=require") == "postgresql://u@h/db?sslmode=require"
    assert redact("postgresql://u:p@h1:5432,h2:5433/db") == "postgresql://u@h1:5432,h2:5433/db"
    assert redact("postgresql://u:p@[::1]:5432/db") == "postgresql://u@[::1]:5432/db"
    assert redact("postgresql://u@h/db") == "postgresql://u@h/db"


@pytest.mark.parametrize("url", ["postgresql://graceful@db/graceful?password=hunter2",
                                 "postgresql://graceful@db/graceful?sslmode=verify-full&sslpassword=hunter2"])
def test_a_password_in_the_query_string_is_refused_too(tmp_path, url):
    from orchestrator.config import ConfigError

    path = tmp_path / "run.yaml"
    path.write_text(f"registry:\n  url: '{url}'\ngenerations:\n  - name: g0\n    arch: {{type: mlp, width: 8}}\n")
    with pytest.raises(ConfigError, match=r"registry\.url: .*carries a secret") as e:
        load_config(path)
    assert "hunter2" not in str(e.value)


def test_compare_and_set_holds_when_the_database_defaults_to_repeatable_read(postgres_url, postgres_server):
    """The backend pins READ COMMITTED: under a REPEATABLE READ default a writer would read
    a snapshot from before the lock and fail to serialise instead of seeing the move."""
    with psycopg.connect(postgres_url, password=postgres_server.password, autocommit=True) as c:
        c.execute("ALTER DATABASE " + postgres_url.rsplit("/", 1)[1] + " SET default_transaction_isolation "
                  "TO 'repeatable read'")
    a = Registry(postgres_url, password_env=PASSWORD_ENV)
    b = Registry(postgres_url, password_env=PASSWORD_ENV)
    try:
        a.add_generation("g0", None, "mlp", "h", "/x/g0", "a" * 64)
        a.add_generation("g1", "g0", "mlp", "h", "/x/g1", "b" * 64)
        rid = a.start_rollout("g1", "g0", "ctl", "go").id
        holding = threading.Event()

        def move_slowly(tx):  # a moves the rollout and holds the write lock a while
            tx.execute("UPDATE rollouts SET state = 'canary', step = 1 WHERE id = ?", (rid,))
            holding.set()
            time.sleep(1.5)

        mover = threading.Thread(target=a._write, args=(move_slowly,))
        mover.start()
        assert holding.wait(30)
        # b's transaction starts while a holds the lock: it must read a's commit, not a
        # snapshot from before it
        with pytest.raises(StaleTransition, match=r"at \(canary, step 1\)"):
            b.transition(rid, ("shadow", 0), state="rolled_back", step=0, weight=0.0, actor="b", action="rb",
                         reason="")
        mover.join(30)
    finally:
        a.close()
        b.close()


def test_the_first_write_after_the_server_dropped_the_connection_succeeds(postgres_url, postgres_server):
    reg = Registry(postgres_url, password_env=PASSWORD_ENV)
    try:
        reg.audit("t", "before", "s")
        with psycopg.connect(postgres_url, password=postgres_server.password, autocommit=True) as c:
            c.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'graceful' "
                      "AND datname = current_database() AND pid <> pg_backend_pid()")
        reg.audit("t", "after", "s")  # nothing had been sent on the dead connection: retried once
        assert [e.action for e in reg.events("s")] == ["before", "after"]
    finally:
        reg.close()
