"""Where the registry's rows live: an embedded SQLite file, or a PostgreSQL database that
several pods share. `orchestrator.registry.store.Registry` writes its SQL once (qmark
parameters, standard SQL both engines accept); a backend runs it.

Both backends give the store the same guarantee: every write is one transaction, and
writes are serialised (SQLite: `BEGIN IMMEDIATE` takes the file's write lock up front;
PostgreSQL: a transaction-scoped advisory lock taken first), so a compare-and-set read
inside a write transaction cannot be overtaken by another writer. Reads see the last
committed state.

Why PostgreSQL at all: WAL-mode SQLite relies on shared memory and POSIX locks that a
network volume (NFS, CephFS, most ReadWriteMany classes) does not provide, so two pods on
one registry file can corrupt it. A database server is the shared medium there.
"""

from __future__ import annotations

import os
import random
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional, Protocol, TypeVar
from urllib.parse import parse_qs, urlsplit, urlunsplit

from orchestrator.registry.schema import MIGRATIONS, PG_BASELINE, PG_BASELINE_VERSION, PG_MIGRATIONS, SCHEMA_VERSION, statements

BUSY_TIMEOUT_S = 30.0
CONNECT_TIMEOUT_S = 10
LOCK_TIMEOUT_S = 4 * BUSY_TIMEOUT_S  # as long as SQLite's writers retry
IDLE_IN_TRANSACTION_S = 60.0

# Any constant works: every graceful registry writer in one database takes this lock first.
_PG_WRITE_LOCK = 0x6772616365  # "grace"

T = TypeVar("T")

# libpq connection parameters that are secrets, in a URL's query string
SECRET_PARAMS = ("password", "sslpassword")


class BackendError(RuntimeError):
    """The registry's storage cannot be opened or used (the message names it and why)."""


def _refuse_newer(location: str, version: int) -> None:
    if version > SCHEMA_VERSION:
        raise BackendError(f"{location}: schema version {version} is newer than this code understands "
                           f"({SCHEMA_VERSION}); upgrade graceful")


class Tx(Protocol):
    """One transaction's (or one read's) view of the database, qmark parameters."""

    def execute(self, sql: str, args: tuple = ()) -> Any: ...

    def insert(self, sql: str, args: tuple = ()) -> int:
        """Run an INSERT into a table with an `id` key; its new id."""
        ...


def is_url(location: str | Path) -> bool:
    return isinstance(location, str) and location.startswith(("postgres://", "postgresql://"))


def redact(url: str) -> str:
    """`url` without a password, in its user info or its query (logs, messages and pickles
    never carry one)."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, hosts = netloc.rsplit("@", 1)
        netloc = userinfo.split(":", 1)[0] + "@" + hosts
    query = "&".join(kv for kv in parts.query.split("&") if kv and kv.split("=", 1)[0] not in SECRET_PARAMS)
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def url_secrets(url: str) -> list[str]:
    """Where `url` carries a secret: 'password' (user info) and any secret query key."""
    parts = urlsplit(url)
    found = ["password"] if "@" in parts.netloc and ":" in parts.netloc.rsplit("@", 1)[0] else []
    return found + [k for k in parse_qs(parts.query, keep_blank_values=True) if k in SECRET_PARAMS]


# --- SQLite ------------------------------------------------------------------------------------

class _SQLiteTx:
    def __init__(self, db: sqlite3.Connection):
        self._db = db

    def execute(self, sql: str, args: tuple = ()) -> sqlite3.Cursor:
        return self._db.execute(sql, args)

    def insert(self, sql: str, args: tuple = ()) -> int:
        return int(self._db.execute(sql, args).lastrowid)


def _is_busy(e: sqlite3.OperationalError) -> bool:
    msg = str(e).lower()
    return "locked" in msg or "busy" in msg


class SQLiteBackend:
    """One registry file. WAL lets readers go on while one writer writes; a busy timeout
    and a retry on "database is locked" on top make concurrent writers wait, not fail."""

    def __init__(self, path: str | Path, readonly: bool = False):
        self.path = Path(path)
        self.location = str(self.path)
        self._lock = threading.RLock()
        if readonly:
            if not self.path.is_file():
                raise BackendError(f"no registry at {self.path}")
            self._db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_S,
                                       isolation_level=None, check_same_thread=False)
            self._db.row_factory = sqlite3.Row
            self._db.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_S * 1000)}")
            self._check_version()
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: BEGIN IMMEDIATE / COMMIT are issued here.
        self._db = sqlite3.connect(str(self.path), timeout=BUSY_TIMEOUT_S, isolation_level=None,
                                   check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        self._retry(lambda: self._db.execute("PRAGMA journal_mode=WAL").fetchone())
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_S * 1000)}")
        # FULL, not NORMAL: with WAL, NORMAL may lose the last commit on power loss, after the
        # router already acted on it (a promote the registry forgets). Writes are rare.
        self._db.execute("PRAGMA synchronous=FULL")
        self.write(self._migrate)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _retry(self, fn: Callable[[], T]) -> T:
        """Run `fn`, retrying while another process holds the lock past the busy timeout."""
        deadline = time.monotonic() + 4 * BUSY_TIMEOUT_S
        delay = 0.01
        while True:
            try:
                return fn()
            except sqlite3.OperationalError as e:
                if not _is_busy(e) or time.monotonic() > deadline:
                    raise
                time.sleep(delay * (1 + random.random()))
                delay = min(delay * 2, 0.5)

    def write(self, fn: Callable[[Tx], T]) -> T:
        """`fn` in one BEGIN IMMEDIATE transaction (all or nothing), retried on busy."""

        def once() -> T:
            with self._lock:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    out = fn(_SQLiteTx(self._db))
                    self._db.execute("COMMIT")
                    return out
                except BaseException:
                    if self._db.in_transaction:
                        self._db.execute("ROLLBACK")
                    raise

        return self._retry(once)

    def read(self, fn: Callable[[Tx], T]) -> T:
        with self._lock:
            return self._retry(lambda: fn(_SQLiteTx(self._db)))

    @staticmethod
    def _version(tx: Tx) -> int:
        return int(tx.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version").fetchone()[0])

    def _check_version(self) -> None:
        _refuse_newer(self.location, self.read(self._version))

    def _migrate(self, tx: Tx) -> None:
        tx.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, applied_at REAL NOT NULL)")
        current = self._version(tx)
        _refuse_newer(self.location, current)
        for version in range(current + 1, SCHEMA_VERSION + 1):
            migration = MIGRATIONS[version - 1]
            if callable(migration):
                migration(self._db)
            else:
                for stmt in statements(migration):
                    tx.execute(stmt)
            tx.execute("INSERT INTO schema_version (version, applied_at) VALUES (?, ?)", (version, time.time()))
        bad = tx.execute("PRAGMA foreign_key_check").fetchall()
        if bad:
            raise BackendError(f"{self.location}: {len(bad)} row(s) break foreign keys after migration")


# --- PostgreSQL --------------------------------------------------------------------------------

class _Row:
    """A result row by column name or position, like sqlite3.Row."""

    __slots__ = ("_index", "_values")

    def __init__(self, index: dict[str, int], values: Any):
        self._index = index
        self._values = values

    def __getitem__(self, key: Any) -> Any:
        return self._values[self._index[key]] if isinstance(key, str) else self._values[key]


def _row_factory(cursor: Any) -> Callable[[Any], _Row]:
    index = {d.name: i for i, d in enumerate(cursor.description or ())}
    return lambda values: _Row(index, values)


def _pg_sql(sql: str) -> str:
    # The store's SQL has no '%' or '?' inside literals: qmark -> psycopg's %s.
    return sql.replace("%", "%%").replace("?", "%s")


class _PgTx:
    def __init__(self, conn: Any):
        self._conn = conn

    def execute(self, sql: str, args: tuple = ()) -> Any:
        # Without parameters psycopg sends the text as is (a script of several statements
        # may go in one call).
        return self._conn.execute(_pg_sql(sql), args) if args else self._conn.execute(sql)

    def insert(self, sql: str, args: tuple = ()) -> int:
        return int(self.execute(sql + " RETURNING id", args).fetchone()[0])


class PostgresBackend:
    """One PostgreSQL database (`postgresql://user@host:port/db`), one connection per
    Registry. Reads run in autocommit (each sees the last commit); every write is one
    transaction that first takes a transaction-scoped advisory lock, so writers of any
    process are serialised exactly as SQLite's write lock serialises them."""

    def __init__(self, url: str, readonly: bool = False, password: Optional[str] = None):
        try:
            import psycopg
        except ImportError:  # pragma: no cover - psycopg is a dependency
            raise BackendError("registry.url names PostgreSQL but psycopg is not installed "
                               "(pip install 'psycopg[binary]')") from None
        self._psycopg = psycopg
        self.url = url
        self.location = redact(url)
        self.readonly = readonly
        self._password = password
        self._lock = threading.RLock()
        self._conn: Any = None
        self._connect()
        if readonly:
            v = self.read(self._version)
            if v == 0:
                raise BackendError(f"no registry at {self.location} (the database has no graceful schema)")
            _refuse_newer(self.location, v)
        elif self.read(self._version) != SCHEMA_VERSION:
            # Only a new or older database takes the write lock and runs DDL; a current one
            # is opened with data privileges alone.
            self.write(self._migrate)

    def _connect(self) -> None:
        kwargs: dict[str, Any] = {
            "autocommit": True, "connect_timeout": CONNECT_TIMEOUT_S, "row_factory": _row_factory,
            "application_name": "graceful",
            # A writer never waits on the lock longer than SQLite's busy retries allow, and a
            # holder that hangs mid-transaction (or whose network vanished: keepalives) is
            # cut off by the server instead of blocking every writer.
            "options": f"-c lock_timeout={int(LOCK_TIMEOUT_S * 1000)} "
                       f"-c idle_in_transaction_session_timeout={int(IDLE_IN_TRANSACTION_S * 1000)}",
            "keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10, "keepalives_count": 3}
        if self._password is not None:
            kwargs["password"] = self._password
        try:
            self._conn = self._psycopg.connect(self.url, **kwargs)
        except self._psycopg.Error as e:
            raise BackendError(f"cannot connect to the registry at {self.location}: "
                               f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from None
        # The advisory lock serialises writers only under READ COMMITTED (each statement
        # sees the previous writer's commit); a database default of REPEATABLE READ would
        # read a snapshot from before the lock.
        self._conn.isolation_level = self._psycopg.IsolationLevel.READ_COMMITTED
        if self.readonly:
            self._conn.execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")

    def _live(self) -> Any:
        # A connection the server closed (restart, failover) is replaced on next use; the
        # call that saw it break has failed already, so nothing is applied twice.
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._connect()
        return self._conn

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()

    def write(self, fn: Callable[[Tx], T]) -> T:
        with self._lock:
            for attempt in (0, 1):
                conn = self._live()
                locked = False
                try:
                    with conn.transaction():
                        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_PG_WRITE_LOCK,))
                        locked = True
                        return fn(_PgTx(conn))
                except self._psycopg.OperationalError as e:
                    # A connection found dead before the transaction did anything (the
                    # server restarted since the last call) applied nothing: once more on a
                    # new one. After that, a failure may have been at COMMIT: not repeated.
                    if not locked and not attempt and (conn.closed or conn.broken):
                        continue
                    raise BackendError(f"registry at {self.location}: {str(e).strip() or type(e).__name__} "
                                       f"(the write was not confirmed)") from e
            raise AssertionError("unreachable")

    def read(self, fn: Callable[[Tx], T]) -> T:
        with self._lock:
            for attempt in (0, 1):
                try:
                    return fn(_PgTx(self._live()))
                except self._psycopg.OperationalError as e:
                    # A read is safe to repeat once on a fresh connection.
                    if attempt or not (self._conn.closed or self._conn.broken):
                        raise BackendError(f"registry at {self.location}: {str(e).strip() or type(e).__name__}") from e
            raise AssertionError("unreachable")

    @staticmethod
    def _version(tx: Tx) -> int:
        exists = tx.execute("SELECT to_regclass('schema_version') IS NOT NULL").fetchone()[0]
        if not exists:
            return 0
        return int(tx.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version").fetchone()[0])

    def _migrate(self, tx: Tx) -> None:
        tx.execute("CREATE TABLE IF NOT EXISTS schema_version "
                   "(version INTEGER PRIMARY KEY, applied_at DOUBLE PRECISION NOT NULL)")
        current = self._version(tx)
        _refuse_newer(self.location, current)
        if current == 0:
            # A new database starts at the first schema released with PostgreSQL support.
            tx.execute(PG_BASELINE)
            for v in range(1, PG_BASELINE_VERSION + 1):
                tx.execute("INSERT INTO schema_version (version, applied_at) VALUES (?, ?)", (v, time.time()))
            current = PG_BASELINE_VERSION
        for version in range(current + 1, SCHEMA_VERSION + 1):
            tx.execute(PG_MIGRATIONS[version])
            tx.execute("INSERT INTO schema_version (version, applied_at) VALUES (?, ?)", (version, time.time()))


def open_backend(location: str | Path, readonly: bool = False,
                 password_env: Optional[str] = None) -> SQLiteBackend | PostgresBackend:
    """The backend a location names: a postgresql:// URL (password from the environment
    variable `password_env` when set there, else libpq's own sources), else a file path."""
    if is_url(location):
        password = os.environ.get(password_env) if password_env else None
        return PostgresBackend(str(location), readonly=readonly, password=password or None)
    if isinstance(location, str) and "://" in location:
        raise BackendError(f"registry location {location!r}: only postgresql:// URLs or file paths are supported")
    return SQLiteBackend(location, readonly=readonly)
