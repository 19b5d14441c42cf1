"""A real `kvlib serve` in a subprocess on a free port, for the serve tests.

The server runs this checkout's code (`python -m kvlib` with PYTHONPATH set to the repo),
never the installed console script. Every wait is bounded.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx

from kvlib.serve.node import ServeNode, free_port, wait_until  # noqa: F401 - re-exported for the tests

REPO_ROOT = Path(__file__).resolve().parents[1]


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


class Server(ServeNode):
    """A node that sees no KVLIB_* variable of the caller's (backends come as flags), with the openai client."""

    def __init__(self, home: Path, *args: str):
        super().__init__(home, *args, env=kvlib_env())

    def client(self, key: str | None, **kw):
        import openai

        return openai.OpenAI(api_key=key or "none", base_url=self.url + "/v1", max_retries=0, **kw)

    def metric(self, name: str, **labels) -> float:
        """One sample's value from /metrics (0.0 if absent)."""
        want = ",".join(f'{k}="{v}"' for k, v in labels.items())
        sample = f"{name}{{{want}}}" if want else name
        for line in httpx.get(self.url + "/metrics", timeout=10).text.splitlines():
            if line.startswith(sample + " "):
                return float(line.rsplit(" ", 1)[1])
        return 0.0


def new_home(parent: Path, smol_home: Path, name: str = "home") -> Path:
    """A fresh library home whose model cache is the test session's (dequantized once)."""
    (smol_home / "models").mkdir(exist_ok=True)
    home = parent / name
    home.mkdir(parents=True)
    (home / "models").symlink_to(smol_home / "models", target_is_directory=True)
    return home
