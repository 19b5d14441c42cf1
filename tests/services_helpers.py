"""The real services for the cluster tests: Ceph's S3 gateway and PostgreSQL from `make services`.

Tests that need them are skipped, with the reason, when `.services/env` is absent (plain
`make test`); `.ci/run` starts the services first, so there they run. Each test gets its
own PostgreSQL database and its own S3 prefix, so tests never see each other's chunks.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
ENV_FILE = REPO_ROOT / ".services" / "env"
SERVICES_SH = REPO_ROOT / "scripts" / "services.sh"
SKIP_REASON = "needs the real Ceph S3 gateway and PostgreSQL: run `make services` (writes .services/env)"

requires_services = pytest.mark.skipif(not ENV_FILE.is_file(), reason=SKIP_REASON)


def kvlib_command(*args) -> list[str]:
    """The installed console script beside this interpreter (.venv/bin/kvlib), as a node runs it."""
    import sys

    return [str(Path(sys.executable).parent / "kvlib"), *map(str, args)]


def services_env() -> dict[str, str]:
    """KEY=VALUE lines of .services/env."""
    pairs = (line.split("=", 1) for line in ENV_FILE.read_text().splitlines() if "=" in line)
    return {key.strip(): value.strip() for key, value in pairs}


def services(action: str, which: str) -> None:
    """`scripts/services.sh up|down s3|rgw|postgres`, as a fault test stops and restarts one."""
    subprocess.run(["bash", str(SERVICES_SH), action, which], check=True, timeout=240,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def fresh_database(manifest_url: str) -> str:
    """A new, empty PostgreSQL database on the services' server; its URL."""
    from kvlib.store.manifest import create_database

    return create_database(manifest_url, f"kvlib_test_{uuid.uuid4().hex[:12]}")


@dataclass
class Cluster:
    """Where each node's library lives: one shared home (the defaults) or one home per node
    over a shared S3 prefix and PostgreSQL database (the services)."""

    kind: str  # "default" or "services"
    root: Path
    store: str | None = None
    manifest: str | None = None
    env: dict[str, str] = field(default_factory=dict)

    def home(self, node: str) -> Path:
        # With the defaults "sharing" means one home: SQLite and the blob folder live there.
        return self.root / ("home" if self.kind == "default" else f"home-{node}")

    def library(self, node: str, **kwargs):
        from kvlib.store import Library

        return Library(self.home(node), store=self.store, manifest=self.manifest, **kwargs)

    def node_env(self) -> dict[str, str]:
        """Environment for a subprocess node (`kvlib ...`, a writer script)."""
        extra = {"KVLIB_STORE": self.store, "KVLIB_MANIFEST": self.manifest} if self.kind == "services" else {}
        return {**os.environ, **self.env, **extra}

    def stored_objects(self) -> set[str]:
        """Keys of the blobs in the shared store (S3 objects, or the home's blob files)."""
        if self.kind == "default":
            return {p.stem for p in (self.home("a") / "blobs").glob("??/*.safetensors")}
        from kvlib.store.s3 import S3Blobs

        return S3Blobs(self.store).list_keys()


def make_cluster(kind: str, tmp_path: Path, monkeypatch) -> Cluster:
    if kind == "default":
        return Cluster("default", tmp_path)
    if not ENV_FILE.is_file():
        pytest.skip(SKIP_REASON)
    env = services_env()
    aws = {k: v for k, v in env.items() if k.startswith("AWS_")}
    for key, value in aws.items():
        monkeypatch.setenv(key, value)  # boto3 in this process reads them
    bucket = env["KVLIB_STORE"].removeprefix("s3://").split("/", 1)[0]
    return Cluster("services", tmp_path, store=f"s3://{bucket}/test-{uuid.uuid4().hex[:12]}",
                   manifest=fresh_database(env["KVLIB_MANIFEST"]), env=aws)
