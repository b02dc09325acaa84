"""The registry's schema and its migrations (SQLite, and the PostgreSQL baseline).

The schema is versioned (`schema_version`, one row per applied migration); opening an
older file migrates it in place, keeping its rows (`orchestrator.registry.store`). Each
migration takes the file from version i to i + 1 inside one transaction. Never edit a
released migration: add the next one.
"""

from __future__ import annotations

import sqlite3

_V1 = """
CREATE TABLE generations (
    name TEXT PRIMARY KEY,
    parent TEXT REFERENCES generations(name),
    arch TEXT NOT NULL,
    config_hash TEXT NOT NULL,
    checkpoint_uri TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    created_at REAL NOT NULL,
    status TEXT NOT NULL
);
CREATE TABLE evaluations (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    candidate TEXT NOT NULL REFERENCES generations(name),
    baseline TEXT REFERENCES generations(name),
    metrics TEXT NOT NULL,
    passed INTEGER NOT NULL,
    reasons TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    subject TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    from_state TEXT,
    to_state TEXT
);
"""

_V2 = """
ALTER TABLE generations ADD COLUMN metrics TEXT NOT NULL DEFAULT '{}';
ALTER TABLE events ADD COLUMN data TEXT NOT NULL DEFAULT '{}';
CREATE TABLE rollouts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    candidate TEXT NOT NULL REFERENCES generations(name),
    baseline TEXT NOT NULL REFERENCES generations(name),
    state TEXT NOT NULL CHECK (state IN ('shadow', 'canary', 'paused', 'promoted', 'rolled_back')),
    step INTEGER NOT NULL,
    weight REAL NOT NULL CHECK (weight >= 0 AND weight <= 1),
    paused_from TEXT,
    step_started_at REAL NOT NULL,
    started_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    finished_at REAL,
    data TEXT NOT NULL DEFAULT '{}'
);
-- At most one rollout is active: the partial index holds one row per active rollout, all
-- with the same key.
CREATE UNIQUE INDEX one_active_rollout ON rollouts ((state IN ('shadow', 'canary', 'paused')))
    WHERE state IN ('shadow', 'canary', 'paused');
CREATE TABLE commands (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    rollout_id INTEGER NOT NULL REFERENCES rollouts(id),
    command TEXT NOT NULL CHECK (command IN ('pause', 'resume', 'promote', 'rollback')),
    actor TEXT NOT NULL,
    reason TEXT NOT NULL,
    force INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    done_at REAL,
    outcome TEXT
);
CREATE INDEX commands_pending ON commands (rollout_id, done_at);
CREATE INDEX events_subject ON events (subject, id);
CREATE INDEX evaluations_candidate ON evaluations (candidate, id);
CREATE TRIGGER events_no_update BEFORE UPDATE ON events
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER events_no_delete BEFORE DELETE ON events
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
"""

_V3 = """
-- One controller per rollout: the holder of a rollout's lease drives it; the lease
-- expires unless its holder renews it (heartbeat), so a dead holder's rollout resumes.
CREATE TABLE leases (
    rollout_id INTEGER PRIMARY KEY REFERENCES rollouts(id),
    holder TEXT NOT NULL,
    acquired_at REAL NOT NULL,
    heartbeat_at REAL NOT NULL,
    expires_at REAL NOT NULL
);
"""

_OLD_STATES = "CHECK (state IN ('shadow', 'canary', 'paused', 'promoted', 'rolled_back'))"
_NEW_STATES = "CHECK (state IN ('shadow', 'canary', 'paused', 'frozen', 'guarding', 'promoted', 'rolled_back'))"
_OLD_COMMANDS = "CHECK (command IN ('pause', 'resume', 'promote', 'rollback'))"
_NEW_COMMANDS = "CHECK (command IN ('pause', 'freeze', 'resume', 'promote', 'rollback'))"


def _v4(db: sqlite3.Connection) -> None:
    """Rollout states 'frozen' and 'guarding', command 'freeze'. SQLite cannot alter a CHECK
    constraint; widening one leaves every stored row valid, so the table definitions are
    rewritten in place (SQLite's documented procedure for constraint changes that do not
    touch the on-disk format: writable_schema, then a schema_version bump so that every
    connection reloads them), instead of rebuilding tables other tables' keys point at."""
    version = int(db.execute("PRAGMA schema_version").fetchone()[0])
    db.execute("PRAGMA writable_schema=ON")
    for table, old, new in (("rollouts", _OLD_STATES, _NEW_STATES), ("commands", _OLD_COMMANDS, _NEW_COMMANDS)):
        sql = db.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)).fetchone()[0]
        if old not in sql:
            raise sqlite3.DatabaseError(f"table {table} has an unexpected definition: {sql}")
        db.execute("UPDATE sqlite_master SET sql = ? WHERE type = 'table' AND name = ?", (sql.replace(old, new), table))
    db.execute(f"PRAGMA schema_version={version + 1}")
    db.execute("PRAGMA writable_schema=OFF")
    bad = db.execute("PRAGMA integrity_check").fetchall()
    if [tuple(r) for r in bad] != [("ok",)]:
        raise sqlite3.DatabaseError(f"integrity check after widening the constraints: {bad}")
    # At most one rollout is active, the new states included.
    db.execute("DROP INDEX one_active_rollout")
    db.execute("CREATE UNIQUE INDEX one_active_rollout ON rollouts "
               "((state IN ('shadow', 'canary', 'paused', 'frozen', 'guarding'))) "
               "WHERE state IN ('shadow', 'canary', 'paused', 'frozen', 'guarding')")


# A migration is a script of statements, or a function of the connection (inside the
# migration's transaction) when it needs to read the file first.
MIGRATIONS: tuple = (_V1, _V2, _V3, _v4)
SCHEMA_VERSION = len(MIGRATIONS)


def statements(script: str) -> list[str]:
    """Split a migration into statements (CREATE TRIGGER bodies hold ';' too)."""
    out, buf = [], ""
    for line in script.splitlines(keepends=True):
        if line.strip().startswith("--"):
            continue
        buf += line
        if sqlite3.complete_statement(buf):
            out.append(buf.strip())
            buf = ""
    if buf.strip():
        out.append(buf.strip())
    return out




# --- PostgreSQL --------------------------------------------------------------------------------
# The same tables, columns, constraints, indexes and append-only audit log as SQLite's
# version 4 (tests/orchestrator/registry/test_backends.py compares the two). A new
# PostgreSQL registry starts here; a later version adds its step to MIGRATIONS (SQLite) and
# to PG_MIGRATIONS under the same number.
PG_BASELINE_VERSION = 4

_PG_ACTIVE = "('shadow', 'canary', 'paused', 'frozen', 'guarding')"

PG_BASELINE = f"""
CREATE TABLE generations (
    name TEXT PRIMARY KEY,
    parent TEXT REFERENCES generations(name),
    arch TEXT NOT NULL,
    config_hash TEXT NOT NULL,
    checkpoint_uri TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    status TEXT NOT NULL,
    metrics TEXT NOT NULL DEFAULT '{{}}'
);
CREATE TABLE evaluations (
    id BIGSERIAL PRIMARY KEY,
    candidate TEXT NOT NULL REFERENCES generations(name),
    baseline TEXT REFERENCES generations(name),
    metrics TEXT NOT NULL,
    passed INTEGER NOT NULL,
    reasons TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL
);
CREATE TABLE events (
    id BIGSERIAL PRIMARY KEY,
    at DOUBLE PRECISION NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    subject TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    from_state TEXT,
    to_state TEXT,
    data TEXT NOT NULL DEFAULT '{{}}'
);
CREATE TABLE rollouts (
    id BIGSERIAL PRIMARY KEY,
    candidate TEXT NOT NULL REFERENCES generations(name),
    baseline TEXT NOT NULL REFERENCES generations(name),
    state TEXT NOT NULL CHECK (state IN ('shadow', 'canary', 'paused', 'frozen', 'guarding', 'promoted', 'rolled_back')),
    step INTEGER NOT NULL,
    weight DOUBLE PRECISION NOT NULL CHECK (weight >= 0 AND weight <= 1),
    paused_from TEXT,
    step_started_at DOUBLE PRECISION NOT NULL,
    started_at DOUBLE PRECISION NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL,
    finished_at DOUBLE PRECISION,
    data TEXT NOT NULL DEFAULT '{{}}'
);
CREATE UNIQUE INDEX one_active_rollout ON rollouts ((state IN {_PG_ACTIVE})) WHERE state IN {_PG_ACTIVE};
CREATE TABLE commands (
    id BIGSERIAL PRIMARY KEY,
    rollout_id BIGINT NOT NULL REFERENCES rollouts(id),
    command TEXT NOT NULL CHECK (command IN ('pause', 'freeze', 'resume', 'promote', 'rollback')),
    actor TEXT NOT NULL,
    reason TEXT NOT NULL,
    force INTEGER NOT NULL DEFAULT 0,
    created_at DOUBLE PRECISION NOT NULL,
    done_at DOUBLE PRECISION,
    outcome TEXT
);
CREATE INDEX commands_pending ON commands (rollout_id, done_at);
CREATE INDEX events_subject ON events (subject, id);
CREATE INDEX evaluations_candidate ON evaluations (candidate, id);
CREATE TABLE leases (
    rollout_id BIGINT PRIMARY KEY REFERENCES rollouts(id),
    holder TEXT NOT NULL,
    acquired_at DOUBLE PRECISION NOT NULL,
    heartbeat_at DOUBLE PRECISION NOT NULL,
    expires_at DOUBLE PRECISION NOT NULL
);
CREATE FUNCTION graceful_events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the audit log is append-only';
END
$$;
CREATE TRIGGER events_no_update BEFORE UPDATE ON events
    FOR EACH ROW EXECUTE FUNCTION graceful_events_append_only();
CREATE TRIGGER events_no_delete BEFORE DELETE ON events
    FOR EACH ROW EXECUTE FUNCTION graceful_events_append_only();
CREATE TRIGGER events_no_truncate BEFORE TRUNCATE ON events
    FOR EACH STATEMENT EXECUTE FUNCTION graceful_events_append_only();
"""

# Version -> script, for versions after the baseline.
PG_MIGRATIONS: dict[int, str] = {}
