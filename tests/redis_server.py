"""A real redis-server for tests: its own port on 127.0.0.1 and its own directory.

The Redis prediction log is tested against the server it will run on, not a fake: its
Lua scripts, expiry and persistence are the server's. `persistence=True` turns on the
append-only file with an fsync per write, so a stop, a kill or a restart keeps every
acknowledged write, as a production server configured for it would.

The benchmarks start theirs with this class too, passing `binary` (no pytest lookup).
"""

from __future__ import annotations

import ctypes
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Optional

import redis

from tests.helpers import free_port, require_tool
from tests.server_process import ServerProcess

START_TIMEOUT_S = 10.0


def _die_with_parent() -> None:
    """preexec_fn: SIGTERM to the server when the process that started it dies (Linux
    PR_SET_PDEATHSIG), so not even a killed test run or benchmark leaves one behind."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


class RedisServer(ServerProcess):
    def __init__(self, persistence: bool = False, directory: Optional[Path] = None, binary: Optional[str] = None):
        self.binary = binary or require_tool("redis-server", install_hint="apt-get install redis-server")
        self.persistence = persistence
        self.port = free_port()
        self._own_dir = directory is None
        self.dir = Path(tempfile.mkdtemp(prefix="graceful-redis-")) if directory is None else Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.proc: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _args(self) -> list[str]:
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--daemonize", "no",
                "--dir", str(self.dir), "--logfile", str(self.dir / "redis.log")]
        if self.persistence:
            args += ["--save", "", "--appendonly", "yes", "--appendfsync", "always"]
        else:
            args += ["--save", "", "--appendonly", "no"]
        return args

    def _log_tail(self) -> str:
        try:
            return (self.dir / "redis.log").read_text(errors="replace")[-2000:]
        except OSError:
            return "(no log)"

    def start(self) -> "RedisServer":
        if self.proc is not None and self.proc.poll() is None:
            return self
        self.proc = subprocess.Popen(self._args(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     preexec_fn=_die_with_parent)
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=1, socket_connect_timeout=1)
        deadline = time.monotonic() + START_TIMEOUT_S
        try:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"redis-server on port {self.port} exited ({self.proc.returncode}):\n"
                                       f"{self._log_tail()}")
                try:
                    # PONG only once the data (the AOF with persistence) is loaded
                    if client.ping():
                        return self
                except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
                    pass
                if time.monotonic() > deadline:
                    self.kill()
                    raise RuntimeError(f"redis-server on port {self.port} did not answer PING in "
                                       f"{START_TIMEOUT_S:.0f} s:\n{self._log_tail()}")
                time.sleep(0.02)
        finally:
            client.close()

    def close(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)
