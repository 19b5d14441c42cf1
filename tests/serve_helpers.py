"""A real `kvlib serve` in a subprocess on a free port, for the serve tests.

The server runs this checkout's code (`python -m kvlib` with PYTHONPATH set to the repo),
never the installed console script. Every wait is bounded.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 240  # model load is ~10 s alone, several times that on a busy 2-core machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kvlib_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVLIB_")}
    env.update(PYTHONPATH=str(REPO_ROOT), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return env


def run_kvlib(*args, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvlib", *map(str, args)], env=kvlib_env(), capture_output=True,
                          text=True, timeout=timeout)


def add_key(home: Path, tenant: str, admin: bool = False) -> str:
    from kvlib.serve.keys import KeyStore

    store = KeyStore(home)
    try:
        return store.add(tenant, admin)[0]
    finally:
        store.close()


class Server:
    def __init__(self, home: Path, *args: str):
        self.home, self.port = home, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = home / f"server-{self.port}.log"
        cmd = [sys.executable, "-m", "kvlib", "serve", "--home", str(home), "--port", str(self.port), *args]
        self.proc = subprocess.Popen(cmd, env=kvlib_env(), stdout=open(self.log, "w"), stderr=subprocess.STDOUT)
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"server not ready after {START_TIMEOUT_S} s:\n{self.log.read_text()[-3000:]}")

    def client(self, key: str | None, **kw):
        import openai

        return openai.OpenAI(api_key=key or "none", base_url=self.url + "/v1", max_retries=0, **kw)

    def health(self) -> dict:
        return httpx.get(self.url + "/healthz", timeout=10).json()

    def metric(self, name: str, **labels) -> float:
        """One sample's value from /metrics (0.0 if absent)."""
        want = ",".join(f'{k}="{v}"' for k, v in labels.items())
        sample = f"{name}{{{want}}}" if want else name
        for line in httpx.get(self.url + "/metrics", timeout=10).text.splitlines():
            if line.startswith(sample + " "):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

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


def wait_until(predicate, timeout: float, what: str, every: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def new_home(parent: Path, smol_home: Path, name: str = "home") -> Path:
    """A fresh library home whose model cache is the test session's (dequantized once)."""
    (smol_home / "models").mkdir(exist_ok=True)
    home = parent / name
    home.mkdir(parents=True)
    (home / "models").symlink_to(smol_home / "models", target_is_directory=True)
    return home
