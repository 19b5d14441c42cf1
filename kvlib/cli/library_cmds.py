"""Library commands: `inspect`, `ls`, `stats`, `verify`, `gc`.

Parse, call `kvlib.store.Library`, render with rich; no logic lives here.
The store is imported inside each command (sqlite-utils alone costs ~0.4 s),
so `kvlib --help` answers at once. A KvlibError becomes one red line, exit 1.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import TYPE_CHECKING, Annotated, Any, Iterator

import typer
from rich.table import Table

from kvlib.cli.common import HomeOpt, JsonOpt, TenantOpt, console, fail, print_json
from kvlib.config import DEFAULT_TENANT, resolve_home
from kvlib.errors import KvlibError, NotFoundError

if TYPE_CHECKING:
    from kvlib.store import Library

PREVIEW_WIDTH = 40


@contextlib.contextmanager
def open_library(home: str | None) -> Iterator["Library"]:
    """The library at the resolved home; domain errors become one red line and exit 1.

    Read commands never create a library: a mistyped --home should say so, not
    silently show an empty one.
    """
    try:
        from kvlib.store import Library
        from kvlib.store.library import library_exists

        path = resolve_home(home)
        if not library_exists(path):
            raise NotFoundError(f"no library at {path} (nothing ingested there yet?)")
        with Library(path) as library:
            yield library
    except KvlibError as exc:
        raise fail(str(exc)) from None


def inspect_cmd(
    hash: Annotated[str, typer.Argument(help="Chunk key, or a unique prefix of at least 6 hex digits.")],
    home: HomeOpt = None,
    tenant: TenantOpt = DEFAULT_TENANT,
    json_out: JsonOpt = False,
) -> None:
    """Show one chunk: model, tokens, preview, dtype, shapes, checksum (verified now), use, documents."""
    with open_library(home) as library:
        info = library.inspect(hash, tenant)
    if json_out:
        print_json(info)
        return
    table = Table(show_header=False, title=f"chunk {info['key'][:12]}")
    table.add_column(no_wrap=True)
    table.add_column(overflow="fold")  # the full 64-digit key must stay copyable
    rows: list[tuple[str, Any]] = [
        ("key", info["key"]),
        ("owner", info["owner"]),
        ("model", f"{info['model_name'] or '(unregistered)'}  {info['model_fp']}"),
        ("encoding context", info["context_id"]),
        ("tokens", info["tokens"]),
        ("dtype", info["dtype"]),
        ("shapes", f"k_sem {info['shapes']['k_sem']}  v {info['shapes']['v']}"),
        ("bytes", info["bytes"]),
        ("checksum", f"{info['checksum']} ({info['checksum_status']})"),
        ("hits", info["hits"]),
        ("last used", info["last_used"]),
        ("drift score", "-" if info["drift_score"] is None else f"{info['drift_score']:.4g}"),
        ("documents", ", ".join(f"{d['path']}#{d['ord']}" for d in info["documents"]) or "-"),
        ("preview", info["text_preview"]),
    ]
    for name, value in rows:
        table.add_row(name, str(value))
    console.print(table)


def ls_cmd(
    chunks: Annotated[bool, typer.Option("--chunks", help="List chunks instead of documents.")] = False,
    home: HomeOpt = None,
    tenant: TenantOpt = DEFAULT_TENANT,
    json_out: JsonOpt = False,
) -> None:
    """List the documents (or, with --chunks, the chunks) this tenant may see."""
    with open_library(home) as library:
        items = library.list_chunks(tenant) if chunks else library.list_documents(tenant)
    if json_out:
        print_json({"chunks" if chunks else "documents": items})
        return
    console.print(_chunk_table(items) if chunks else _document_table(items))


def _document_table(documents: list[dict]) -> Table:
    table = Table(title=f"{len(documents)} documents")
    for column in ("id", "path", "owner", "chunks", "tokens", "ingested"):
        table.add_column(column)
    for doc in documents:
        table.add_row(
            str(doc["id"]), doc["path"], doc["owner"], str(doc["chunks"]), str(doc["tokens"]), _when(doc["ingested_at"])
        )
    return table


def _chunk_table(chunks: list[dict]) -> Table:
    table = Table(title=f"{len(chunks)} chunks")
    for column in ("key", "owner", "tokens", "bytes", "hits", "docs", "last used"):
        table.add_column(column, no_wrap=True)
    table.add_column("preview", no_wrap=True, overflow="ellipsis", ratio=1)
    for chunk in chunks:
        preview = (chunk["text_preview"] or "").replace("\n", " ")[:PREVIEW_WIDTH]
        table.add_row(
            chunk["key"][:12], chunk["owner"], str(chunk["tokens"]), str(chunk["bytes"]),
            str(chunk["hits"]), str(chunk["documents"]), _when(chunk["last_used"])[5:16], preview,
        )
    return table


def _when(timestamp: str | None) -> str:
    """Seconds are enough in a table; --json keeps the full UTC timestamp."""
    return (timestamp or "-")[:19].replace("T", " ")


def stats_cmd(home: HomeOpt = None, tenant: TenantOpt = DEFAULT_TENANT, json_out: JsonOpt = False) -> None:
    """Documents, chunks, bytes, tokens, bytes per token, dedup ratio and hits, as this tenant sees them."""
    with open_library(home) as library:
        stats = library.stats(tenant)
    if json_out:
        print_json(stats)
        return
    table = Table(show_header=False, title=f"library {stats['home']} (tenant {stats['tenant']})")
    for name, value in stats.items():
        if name not in ("home", "tenant"):
            shown = f"{value:.3f}" if isinstance(value, float) else ("-" if value is None else str(value))
            table.add_row(name.replace("_", " "), shown)
    console.print(table)


def verify_cmd(
    all_tenants: Annotated[bool, typer.Option("--all", help="Check every chunk in the home, not only this tenant's view.")] = False,
    home: HomeOpt = None,
    tenant: TenantOpt = DEFAULT_TENANT,
    json_out: JsonOpt = False,
) -> None:
    """Re-read every blob and check checksum, shapes, dtype and key against the manifest; exit 1 on problems."""
    with open_library(home) as library:
        problems = library.verify(None if all_tenants else tenant)
    if json_out:
        print_json({"ok": not problems, "problems": [dataclasses.asdict(p) for p in problems]})
    elif problems:
        table = Table(title=f"{len(problems)} problems")
        table.add_column("key")
        table.add_column("reason")
        for problem in problems:
            table.add_row(problem.key[:12], problem.reason)
        console.print(table)
    else:
        console.print("[green]verify: every blob matches the manifest[/]")
    if problems:
        raise fail(f"{len(problems)} chunks failed verification")


def gc_cmd(home: HomeOpt = None, json_out: JsonOpt = False) -> None:
    """Remove orphans: blob files without rows, rows without blob files, abandoned partial writes."""
    with open_library(home) as library:
        report = library.gc()
    if json_out:
        print_json(dataclasses.asdict(report))
        return
    console.print(
        f"gc: removed {len(report.orphan_blobs)} orphan blobs, {len(report.orphan_rows)} orphan rows "
        f"({report.doc_links} document links), {len(report.temp_files)} temp files"
    )
    if report.damaged_documents:
        console.print(f"[yellow]documents that lost chunks (re-ingest them):[/] {', '.join(report.damaged_documents)}")


def register(app: typer.Typer) -> None:
    """Add the library commands to the `kvlib` app."""
    app.command("inspect")(inspect_cmd)
    app.command("ls")(ls_cmd)
    app.command("stats")(stats_cmd)
    app.command("verify")(verify_cmd)
    app.command("gc")(gc_cmd)
