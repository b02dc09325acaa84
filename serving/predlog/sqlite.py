"""The prediction log in a SQLite file (`serving.prediction_log: sqlite`, the default).

The file (`serving.prediction_log_path`, by default `<run_dir>/predictions.sqlite`) is
owned by this module: its schema, writes, joins and retention live here and nowhere
else. WAL mode with `synchronous=NORMAL`: a committed batch survives the router process
being killed. Several router replicas on one node open the same file; each has its own
writer thread, and SQLite serialises their commits (`busy_timeout`).

Retention: requests older than `retention_s` are deleted, and while the rows take more
than `max_bytes` (the pages in use, free pages excluded) the oldest are deleted too.
Freed pages are reused, so the file stops growing at about `max_bytes`.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Optional

from serving.predlog.base import (JOIN_FLUSH_S, MARKED, BatchedLog, JoinResult, Stored, Tally, decode_pred,
                                  join_increments, judge, split_counters)

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS gens (id INTEGER PRIMARY KEY, name TEXT NOT NULL, sha256 TEXT NOT NULL,
                                 UNIQUE (name, sha256));
CREATE TABLE IF NOT EXISTS requests (id INTEGER PRIMARY KEY, rid TEXT NOT NULL UNIQUE, t REAL NOT NULL,
                                     production TEXT NOT NULL, rows INTEGER NOT NULL,
                                     labelled INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS requests_t ON requests (t);
CREATE TABLE IF NOT EXISTS preds (req INTEGER NOT NULL, gen INTEGER NOT NULL, pred BLOB NOT NULL,
                                  PRIMARY KEY (req, gen)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS counters (scope TEXT NOT NULL, name TEXT NOT NULL, value INTEGER NOT NULL,
                                     PRIMARY KEY (scope, name)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS replicas (id TEXT PRIMARY KEY, t REAL NOT NULL, doc TEXT NOT NULL);
"""
_ADD_COUNT = ("INSERT INTO counters (scope, name, value) VALUES (?, ?, ?) "
              "ON CONFLICT (scope, name) DO UPDATE SET value = value + excluded.value")
# SQLite's default limit of host parameters per statement is 32766; chunks stay far below.
_CHUNK = 500


class LogFileError(RuntimeError):
    """The file is not a prediction log this version can use (the message says why)."""


def _connect(path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=30.0, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA busy_timeout=30000")
    return conn


class SqliteLog(BatchedLog):
    kind = "sqlite"

    def __init__(self, path: "str | Path", retention_s: float, max_bytes: int, **kw: Any):
        super().__init__(retention_s, max_bytes, **kw)
        self.path = str(Path(path).expanduser().resolve())
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        try:
            self._w = _connect(self.path)       # the writer thread's
            self._r = _connect(self.path)       # joins, reads and state, under _rlock
            self._w.executescript(_SCHEMA)
            self._add_wanted_column()
            self._init_meta()
        except sqlite3.DatabaseError as e:
            raise LogFileError(f"{self.path}: not a usable prediction log ({e})") from None
        self._rlock = threading.Lock()
        self._gen_ids: dict[tuple[str, str], int] = {}
        self._start()

    def _add_wanted_column(self) -> None:
        """The `wanted` column (0, or the order in which the request was flagged for labels:
        a candidate disagreed), added in place to logs written before it, inside the
        write lock so that replicas opening one old file together add it once. Its partial
        index holds only the flagged, unlabelled requests, in flag order (the feed's)."""
        with _Tx(self._w):
            cols = {row[1] for row in self._w.execute("PRAGMA table_info(requests)")}
            if "wanted" not in cols:
                self._w.execute("ALTER TABLE requests ADD COLUMN wanted INTEGER NOT NULL DEFAULT 0")
            self._w.execute("DROP INDEX IF EXISTS requests_wanted")
            self._w.execute("CREATE INDEX IF NOT EXISTS requests_wanted_seq ON requests (wanted) "
                            "WHERE wanted > 0 AND labelled = 0")
            self._w.execute("INSERT OR IGNORE INTO meta VALUES ('wanted_seq', '0')")

    def _init_meta(self) -> None:
        with _Tx(self._w):
            self._w.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
            self._w.execute("INSERT OR IGNORE INTO meta VALUES ('epoch', ?)", (repr(time.time()),))
            self._w.execute("INSERT OR IGNORE INTO meta VALUES ('state_version', '0')")
            meta = dict(self._w.execute("SELECT key, value FROM meta").fetchall())
        if meta["schema"] != str(SCHEMA_VERSION):
            raise LogFileError(f"{self.path}: prediction log schema {meta['schema']}, this version reads "
                               f"{SCHEMA_VERSION}")
        self.epoch = float(meta["epoch"])

    # --- writer thread -----------------------------------------------------------------
    def _gen_id(self, name: str, sha: str) -> int:
        key = (name, sha)
        gid = self._gen_ids.get(key)
        if gid is None:
            self._w.execute("INSERT OR IGNORE INTO gens (name, sha256) VALUES (?, ?)", key)
            gid = self._w.execute("SELECT id FROM gens WHERE name = ? AND sha256 = ?", key).fetchone()[0]
            self._gen_ids[key] = gid
        return gid

    def _write(self, batch) -> None:
        with _Tx(self._w):
            c = self._w
            if batch.requests:
                c.executemany("INSERT OR IGNORE INTO requests (rid, t, production, rows) VALUES (?, ?, ?, ?)",
                              [(rid, t, prod, rows) for rid, t, prod, rows, _ in batch.requests])
                c.executemany("INSERT OR IGNORE INTO preds (req, gen, pred) SELECT id, ?, ? FROM requests WHERE rid = ?",
                              [(self._gen_id(g, sha), blob, rid) for rid, _, _, _, preds in batch.requests
                               for g, sha, blob in preds])
            if batch.late:
                c.executemany("INSERT OR IGNORE INTO preds (req, gen, pred) SELECT id, ?, ? FROM requests WHERE rid = ?",
                              [(self._gen_id(g, sha), blob, rid) for rid, g, sha, blob in batch.late])
            if batch.wanted:
                # Flags are numbered in the order they are made, across replicas (the
                # write lock orders them): the feed pages by it, so a request flagged
                # after a later one was read is still listed.
                seq = int(c.execute("SELECT value FROM meta WHERE key = 'wanted_seq'").fetchone()[0])
                for rid in batch.wanted:
                    seq += c.execute("UPDATE requests SET wanted = ? WHERE rid = ? AND wanted = 0",
                                     (seq + 1, rid)).rowcount
                c.execute("UPDATE meta SET value = ? WHERE key = 'wanted_seq'", (str(seq),))
            if batch.tally:
                c.executemany(_ADD_COUNT, list(batch.tally.items()))

    def _used_bytes(self, c: sqlite3.Connection) -> int:
        pages = c.execute("PRAGMA page_count").fetchone()[0] - c.execute("PRAGMA freelist_count").fetchone()[0]
        return pages * c.execute("PRAGMA page_size").fetchone()[0]

    @staticmethod
    def _span(c: sqlite3.Connection) -> tuple[Optional[int], int]:
        """(first id, number of requests) without a scan: ids are given in insertion order
        and only ever deleted from the front (retention), so the kept ones are contiguous."""
        lo, hi = c.execute("SELECT min(id), max(id) FROM requests").fetchone()
        return lo, 0 if lo is None else hi - lo + 1

    def _delete_upto(self, c: sqlite3.Connection, last_id: int) -> int:
        c.execute("DELETE FROM preds WHERE req <= ?", (last_id,))
        return c.execute("DELETE FROM requests WHERE id <= ?", (last_id,)).rowcount

    def _prune(self, now: float) -> dict[str, int]:
        out = {"age": 0, "bytes": 0}
        c = self._w
        with _Tx(c):
            # ids grow with commit order, which follows time to within a batch across replicas:
            # "older than" is taken as an id range
            row = c.execute("SELECT max(id) FROM requests WHERE t < ?", (now - self.retention_s,)).fetchone()
            if row[0] is not None:
                out["age"] = self._delete_upto(c, row[0])
        for _ in range(50):
            if self._used_bytes(c) <= self.max_bytes:
                break
            with _Tx(c):
                lo, n = self._span(c)
                if n == 0:
                    break
                # a tenth of the requests per step: a few steps reach the cap from any size
                out["bytes"] += self._delete_upto(c, lo + max(1, n // 10) - 1)
        return out

    # --- joins -------------------------------------------------------------------------
    def _stored(self, c: sqlite3.Connection, rids: list[str]) -> dict[str, tuple[int, Stored]]:
        out: dict[str, tuple[int, Stored]] = {}
        for i in range(0, len(rids), _CHUNK):
            part = rids[i:i + _CHUNK]
            q = ("SELECT r.rid, r.id, r.t, r.production, r.rows, r.labelled, g.name, p.pred FROM requests r "
                 "LEFT JOIN preds p ON p.req = r.id LEFT JOIN gens g ON g.id = p.gen "
                 f"WHERE r.rid IN ({','.join('?' * len(part))})")
            for rid, rowid, t, prod, rows, labelled, gen, blob in c.execute(q, part):
                if rid not in out:
                    out[rid] = (rowid, Stored(t, prod, rows, bool(labelled), {}))
                if gen is not None:
                    out[rid][1].preds[gen] = decode_pred(blob)
        return out

    def join(self, items):
        # this replica's queued rows first: a label may follow its answer at once
        self.flush(JOIN_FLUSH_S)
        now = time.time()
        results, marked, tally = [], [], Tally()
        with self._rlock, _Tx(self._r):
            stored = self._stored(self._r, list({rid for rid, _ in items}))
            for rid, labels in items:
                rowid, s = stored.get(rid, (None, None))
                outcome, added, detail = judge(s, labels, now, self.retention_s)
                if outcome in MARKED:
                    s.labelled = True  # a repeat later in `items` is a duplicate
                    marked.append((rowid,))
                tally.merge(join_increments(outcome, added))
                results.append(JoinResult(rid, outcome, added, detail))
            self._r.executemany("UPDATE requests SET labelled = 1 WHERE id = ?", marked)
            self._r.executemany(_ADD_COUNT, list(tally.items()))
        return results

    # --- reads and state -----------------------------------------------------------------
    def counters(self):
        with self._rlock:
            return split_counters(self._r.execute("SELECT scope, name, value FROM counters").fetchall())

    def wanted(self, after="", limit=1000):
        self.flush(JOIN_FLUSH_S)
        with self._rlock:
            rows = self._r.execute("SELECT wanted, rid, t, rows FROM requests WHERE wanted > 0 AND labelled = 0 "
                                   "AND wanted > ? ORDER BY wanted LIMIT ?",
                                   (int(after) if after else 0, int(limit))).fetchall()
        items = [{"request_id": rid, "t": t, "rows": n} for _, rid, t, n in rows]
        return items, str(rows[-1][0]) if rows else after

    def describe(self) -> dict[str, Any]:
        with self._rlock:
            _, n = self._span(self._r)
            used = self._used_bytes(self._r)
        try:
            on_disk = sum(os.path.getsize(self.path + s) for s in ("", "-wal") if os.path.exists(self.path + s))
        except OSError:
            on_disk = None
        return {"kind": self.kind, "path": self.path, "requests": n, "bytes": used, "file_bytes": on_disk,
                "max_bytes": self.max_bytes, "retention_s": self.retention_s, **self._health()}

    def read_state(self):
        with self._rlock:
            rows = dict(self._r.execute("SELECT key, value FROM meta WHERE key IN ('state', 'state_version')"))
        return int(rows.get("state_version", 0)), json.loads(rows["state"]) if "state" in rows else None

    def write_state(self, doc):
        with self._rlock, _Tx(self._r):
            version = int(self._r.execute("SELECT value FROM meta WHERE key = 'state_version'").fetchone()[0]) + 1
            self._r.execute("INSERT OR REPLACE INTO meta VALUES ('state', ?)", (json.dumps(doc),))
            self._r.execute("UPDATE meta SET value = ? WHERE key = 'state_version'", (str(version),))
        return version

    def heartbeat(self, replica, doc):
        with self._rlock:
            self._r.execute("INSERT OR REPLACE INTO replicas VALUES (?, ?, ?)", (replica, time.time(), json.dumps(doc)))

    def replicas(self, max_age_s):
        with self._rlock:
            rows = self._r.execute("SELECT id, doc FROM replicas WHERE t >= ?", (time.time() - max_age_s,)).fetchall()
        return {r: json.loads(d) for r, d in rows}

    def close(self) -> None:
        super().close()
        for c in (self._w, self._r):
            try:
                c.close()
            except sqlite3.Error:
                pass


class _Tx:
    """`with _Tx(conn)`: BEGIN IMMEDIATE ... COMMIT, ROLLBACK on error. Immediate: the
    write lock is taken (or waited for) at the start, so a transaction that reads, then
    writes, never fails half-way on another process's lock."""

    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn

    def __enter__(self):
        self.conn.execute("BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, exc_type, *_):
        self.conn.execute("ROLLBACK" if exc_type else "COMMIT")
        return False
