"""Options and rendering shared by every command. No library logic lives here."""

from __future__ import annotations

import json
import sys
import time
from typing import Annotated, Any, Optional

import typer
from rich.console import Console

console = Console()
err_console = Console(stderr=True)

HomeOpt = Annotated[
    Optional[str],
    typer.Option("--home", envvar="KVLIB_HOME", help="Library home (default ~/.kvlib)."),
]
StoreOpt = Annotated[
    Optional[str],
    typer.Option("--store", envvar="KVLIB_STORE", help="Blob store: 'local' (the home's blobs/), s3://bucket or s3://bucket/prefix."),
]
ManifestOpt = Annotated[
    Optional[str],
    typer.Option("--manifest", envvar="KVLIB_MANIFEST", help="Manifest: a SQLite path (default <home>/manifest.sqlite) or postgresql://..."),
]
LocalBytesOpt = Annotated[
    Optional[int],
    typer.Option("--local-bytes", envvar="KVLIB_LOCAL_BYTES", help="Local tier budget in bytes with a remote store (default 2 GiB)."),
]
TenantOpt = Annotated[str, typer.Option("--tenant", "-t", envvar="KVLIB_TENANT", help="Tenant name.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object for scripts.")]
ModelOpt = Annotated[
    Optional[str],
    typer.Option("--model", "-m", envvar="KVLIB_MODEL", help="Known model name (`kvlib models ls`), HF model directory or .gguf file (default SmolLM2-135M-Instruct)."),
]


def print_json(obj: Any) -> None:
    """Machine output goes to stdout untouched by rich markup."""
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


def require_paths(paths) -> None:
    """InputError naming the first path that does not exist (before any model loads)."""
    from kvlib.errors import InputError

    for p in paths:
        if not p.exists():
            raise InputError(f"path not found: {p}")


def fail(message: str) -> "typer.Exit":
    """One red line on stderr and exit code 1, never a traceback."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(1)


class LogProgress:
    """Progress for a log file (stderr not a terminal): one plain line per stage as it starts, as it
    ends and every `every` seconds between.

    Rich draws nothing to a non-terminal until the end, so a long run written to a log would
    look stuck. Same callback shape as the bench's: progress(stage, n=1, total=None).
    """

    def __init__(self, every: float = 30.0):
        self.every, self.t0 = every, time.monotonic()
        self.done: dict[str, int] = {}
        self.totals: dict[str, int | None] = {}
        self.last = 0.0

    def __call__(self, stage: str, n: int = 1, total: int | None = None) -> None:
        first = stage not in self.done  # a new stage is always shown: what the run does now
        self.done[stage] = self.done.get(stage, 0) + n
        if total is not None:
            self.totals[stage] = total
        now = time.monotonic()
        total = self.totals.get(stage)
        finished = total is not None and self.done[stage] >= total
        if first or finished or now - self.last >= self.every:
            self.last = now
            elapsed = now - self.t0
            of = f"/{total}" if total else ""
            err_console.print(f"[{elapsed:7.0f} s] {stage} {self.done[stage]}{of}", highlight=False)
