"""A real PostgreSQL server for tests: initdb into its own directory, listening on
127.0.0.1 on a free port, password authentication over TCP.

The PostgreSQL registry backend is tested against the server it runs on, not a fake: its
locks, constraints, triggers and transactions are the server's. PostgreSQL refuses to run
as root, so as root the server runs as the `postgres` user (Debian's package creates it).
Durability settings are off (fsync) unless `durable`: these tests check transactions and
concurrency, not crash recovery, and the machine is shared.
"""

from __future__ import annotations

import ctypes
import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Optional

from tests.helpers import free_port, require_tool
from tests.server_process import ServerProcess

START_TIMEOUT_S = 30.0
USER = "graceful"
APT = "apt-get install postgresql"


def bin_dirs() -> tuple[str, ...]:
    # Debian keeps the server binaries off PATH, under /usr/lib/postgresql/<major>/bin.
    return tuple(sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True))


def _as_user(uid: Optional[int], gid: Optional[int]):
    """preexec_fn: drop to the server's user, then SIGTERM to the server when the process
    that started it dies (PR_SET_PDEATHSIG, set after the uid change that would clear it)."""

    def run() -> None:
        if uid is not None:
            os.setgid(gid)
            os.setuid(uid)
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)
        except (OSError, AttributeError):
            pass

    return run


class PostgresServer(ServerProcess):
    STOP_SIGNAL = signal.SIGINT  # fast shutdown: open transactions roll back, clients are disconnected
    STOP_WAIT_S = 20.0

    def __init__(self, password: Optional[str] = None, bin_dir: Optional[str] = None, durable: bool = False):
        """`bin_dir`: where initdb and postgres are (the benchmarks pass it: no pytest
        lookup). `durable`: keep PostgreSQL's fsync on, as a production server has it."""
        if bin_dir is not None:
            self.initdb, self.postgres = os.path.join(bin_dir, "initdb"), os.path.join(bin_dir, "postgres")
        else:
            self.initdb = require_tool("initdb", install_hint=APT, also_in=bin_dirs())
            self.postgres = require_tool("postgres", install_hint=APT, also_in=bin_dirs())
        self.durable = durable
        self.password = password or uuid.uuid4().hex
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="graceful-pg-"))
        self.data = self.dir / "data"
        self.proc: Optional[subprocess.Popen] = None
        self._uid = self._gid = None
        if os.geteuid() == 0:
            try:
                pw = pwd.getpwnam("postgres")
            except KeyError:
                raise RuntimeError("PostgreSQL refuses to run as root and there is no `postgres` user "
                                   f"to run it as ({APT} creates one)") from None
            self._uid, self._gid = pw.pw_uid, pw.pw_gid
            os.chown(self.dir, self._uid, self._gid)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{database}"

    def _run(self, args: list[str]) -> None:
        out = subprocess.run(args, capture_output=True, text=True, preexec_fn=_as_user(self._uid, self._gid),
                             timeout=120, cwd=self.dir)
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(args[:2])} failed ({out.returncode}): {out.stdout[-1500:]}{out.stderr[-1500:]}")

    def _log_tail(self) -> str:
        try:
            return (self.dir / "postgres.log").read_text(errors="replace")[-2000:]
        except OSError:
            return "(no log)"

    def start(self) -> "PostgresServer":
        if self.proc is not None and self.proc.poll() is None:
            return self
        if not self.data.exists():
            pwfile = self.dir / "pw"
            pwfile.write_text(self.password + "\n")
            if self._uid is not None:
                os.chown(pwfile, self._uid, self._gid)
            self._run([self.initdb, "-D", str(self.data), "-U", USER, "--pwfile", str(pwfile), "--auth-local=trust",
                       "--auth-host=scram-sha-256", "--no-sync", "-E", "UTF8", "--locale=C"])
            pwfile.unlink()
        log = open(self.dir / "postgres.log", "ab")
        try:
            self.proc = subprocess.Popen(
                [self.postgres, "-D", str(self.data), "-p", str(self.port), "-c", "listen_addresses=127.0.0.1",
                 "-c", f"unix_socket_directories={self.dir}", "-c", "max_connections=100"]
                + ([] if self.durable else ["-c", "fsync=off", "-c", "synchronous_commit=off",
                                            "-c", "full_page_writes=off"]),
                stdout=log, stderr=log, preexec_fn=_as_user(self._uid, self._gid), cwd=self.dir)
        finally:
            log.close()
        import psycopg

        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"postgres on port {self.port} exited ({self.proc.returncode}):\n{self._log_tail()}")
            try:
                psycopg.connect(self.url(), password=self.password, connect_timeout=2).close()
                return self
            except psycopg.OperationalError:
                pass
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"postgres on port {self.port} did not accept connections in "
                                   f"{START_TIMEOUT_S:.0f} s:\n{self._log_tail()}")
            time.sleep(0.1)

    def create_database(self) -> str:
        """A new empty database; its URL (no password: tests pass it by environment)."""
        import psycopg

        name = "t_" + uuid.uuid4().hex[:16]
        with psycopg.connect(self.url(), password=self.password, autocommit=True) as c:
            c.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
