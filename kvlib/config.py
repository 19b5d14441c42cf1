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
