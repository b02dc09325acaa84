"""What the tests' real servers (redis-server, postgres) share: a child process that dies
with the test run, and stop / kill / restart around it."""

from __future__ import annotations

import signal
import subprocess
from typing import Optional


class ServerProcess:
    """A server started by `start()` (a subclass's) as `self.proc`. `STOP_SIGNAL` is the
    server's clean shutdown; a server that does not exit in `STOP_WAIT_S` is killed."""

    STOP_SIGNAL = signal.SIGTERM
    STOP_WAIT_S = 10.0
    proc: Optional[subprocess.Popen] = None

    def start(self):  # pragma: no cover - each server's own
        raise NotImplementedError

    def close(self) -> None:  # pragma: no cover - each server's own
        raise NotImplementedError

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(self.STOP_SIGNAL)
        try:
            self.proc.wait(self.STOP_WAIT_S)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """SIGKILL: what is not on disk is lost."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.kill()
        self.proc.wait(10)

    def restart(self):
        """Stop, then start on the same port and directory."""
        self.stop()
        return self.start()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
