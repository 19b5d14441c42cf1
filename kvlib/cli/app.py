"""The `kvlib` command. Typer commands only: parse, call the library API, render.

Each command module exposes `register(app)`; heavy imports (torch, transformers,
faiss) happen inside commands so that `kvlib --help` answers at once.
"""

from __future__ import annotations

import typer

from kvlib.errors import KvlibError

app = typer.Typer(
    name="kvlib",
    help="Store a model's reading of documents once; rotate, compose and repair it at query time.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _root() -> None:
    """Store a model's reading of documents once; rotate, compose and repair it at query time."""


COMMAND_MODULES: tuple[str, ...] = ("doctor_cmd", "library_cmds", "rag_cmds", "bench_cmd", "calibrate_cmd",
                                  "replay_cmd", "models_cmd", "cluster_cmds", "serve_cmds")


def _register_all() -> None:
    import importlib

    for name in COMMAND_MODULES:
        importlib.import_module(f"kvlib.cli.{name}").register(app)


_register_all()


def main() -> None:
    """Console entry point: domain errors become one red line and exit code 1."""
    from kvlib.cli.common import fail

    try:
        app()
    except KvlibError as exc:
        raise SystemExit(fail(str(exc)).exit_code)
