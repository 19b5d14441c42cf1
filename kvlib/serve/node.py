"""A `kvlib serve` node in a subprocess: on a free port, ready once /healthz answers, stopped by its PID.

Design facts:
- It runs `python -m kvlib serve` with this interpreter, so a node runs the same code as its
  caller; the environment is the caller's (the caller decides which KVLIB_* and AWS_* it sees).
- Every wait is bounded and names what it waited for. A node that exits while starting
  raises with the tail of its log.
- Used by scripts/cluster_serve.py (two nodes on one machine) and by the serve tests.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

START_TIMEOUT_S = 240  # model load is ~10 s alone, several times that on a busy 2-core machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout: float, what: str, every: float = 0.2):
    """predicate()'s first truthy value, polled every `every` s; AssertionError after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class ServeNode:
    """`kvlib serve --home HOME --port P ARGS...`, its log in `log` (default HOME/server-P.log)."""

    def __init__(self, home: Path, *args: str, env: dict | None = None, log: Path | None = None,
                 start_timeout_s: float = START_TIMEOUT_S) -> None:
        self.home, self.port = Path(home), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log or self.home / f"server-{self.port}.log"
        cmd = [sys.executable, "-m", "kvlib", "serve", "--home", str(home), "--port", str(self.port), *args]
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
        self._wait_ready(start_timeout_s)

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"server not ready after {timeout_s} s:\n{self.log_tail()}")

    def log_tail(self, chars: int = 3000) -> str:
        return self.log.read_text()[-chars:]

    def health(self) -> dict:
        return httpx.get(self.url + "/healthz", timeout=10).json()

    def wait_idle(self, timeout_s: float) -> dict:
        """Wait until nothing is queued, running, waiting to be stored or waiting for upload; the health."""
        def idle():
            h = self.health()
            busy = h["waiting"] or h["running"] or h["pending_stores"] or h.get("upload_queue", 0)
            return None if busy else h

        return wait_until(idle, timeout_s, f"{self.url} to be idle (stores done, upload queue empty)", every=0.5)

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
