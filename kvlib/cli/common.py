"""Options and rendering shared by every command. No library logic lives here."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any, Optional

import typer
from rich.console import Console

console = Console()
err_console = Console(stderr=True)

HomeOpt = Annotated[
    Optional[str],
    typer.Option("--home", envvar="KVLIB_HOME", help="Library home (default ~/.kvlib)."),
]
TenantOpt = Annotated[str, typer.Option("--tenant", "-t", envvar="KVLIB_TENANT", help="Tenant name.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object for scripts.")]
ModelOpt = Annotated[
    Optional[str],
    typer.Option("--model", "-m", envvar="KVLIB_MODEL", help="HF model directory or .gguf file (default SmolLM2-135M-Instruct)."),
]


def print_json(obj: Any) -> None:
    """Machine output goes to stdout untouched by rich markup."""
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


def fail(message: str) -> "typer.Exit":
    """One red line on stderr and exit code 1, never a traceback."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(1)
