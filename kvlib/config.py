"""Configuration resolved once, with a stated precedence: flag, then environment, then default."""

from __future__ import annotations

import os
from pathlib import Path

# The tenant everyone sees: what it stores is public, deduplicated across all tenants.
PUBLIC = "public"
DEFAULT_TENANT = PUBLIC


def resolve_home(home: str | Path | None = None) -> Path:
    """Library home: `--home`, then `KVLIB_HOME`, then `~/.kvlib`."""
    if home:
        return Path(home).expanduser()
    env = os.environ.get("KVLIB_HOME")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".kvlib"


# A node with a remote store keeps this much of it on local disk unless told otherwise.
DEFAULT_LOCAL_BYTES = 2 << 30


def resolve_store(store: str | None = None) -> str | None:
    """Blob store: `--store`, then `KVLIB_STORE`; None (or 'local') means the home's `blobs/` folder."""
    value = store or os.environ.get("KVLIB_STORE") or None
    return None if value in (None, "", "local") else value


def resolve_manifest(manifest: str | None, home: Path) -> str:
    """Manifest: `--manifest`, then `KVLIB_MANIFEST`, then `<home>/manifest.sqlite`."""
    return manifest or os.environ.get("KVLIB_MANIFEST") or str(home / "manifest.sqlite")


def resolve_local_bytes(local_bytes: int | None = None) -> int:
    """Local tier budget with a remote store: `--local-bytes`, then `KVLIB_LOCAL_BYTES`, then 2 GiB."""
    if local_bytes is not None:
        return local_bytes
    env = os.environ.get("KVLIB_LOCAL_BYTES")
    return int(env) if env else DEFAULT_LOCAL_BYTES
