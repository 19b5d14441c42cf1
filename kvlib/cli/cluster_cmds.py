"""Cluster commands: `sync` (upload what an outage queued) and `fetch-bench` (local tier vs S3 vs recompute).

Parse, call the library, render; no logic lives here. The store is imported inside
each command, so `kvlib --help` answers at once.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated

import typer

from kvlib.cli.common import HomeOpt, JsonOpt, LocalBytesOpt, ManifestOpt, ModelOpt, StoreOpt, console, fail, print_json
from kvlib.config import resolve_home
from kvlib.errors import KvlibError


def sync_cmd(
    verify: Annotated[bool, typer.Option("--verify", help="Then re-read every blob in the store against the manifest.")] = False,
    home: HomeOpt = None,
    store: StoreOpt = None,
    manifest: ManifestOpt = None,
    local_bytes: LocalBytesOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Upload the blobs this node queued while the object store was unreachable; exit 1 if some remain."""
    from kvlib.errors import NotFoundError
    from kvlib.store.library import Library, library_exists

    try:
        if not library_exists(resolve_home(home), manifest):
            raise NotFoundError(f"no library at {resolve_home(home)} (nothing ingested there yet?)")
        with Library(resolve_home(home), store=store, manifest=manifest, local_bytes=local_bytes) as library:
            report = library.sync()
            problems = library.verify() if verify else []
    except KvlibError as exc:
        raise fail(str(exc)) from None
    if json_out:
        print_json({**dataclasses.asdict(report), "problems": [dataclasses.asdict(p) for p in problems]})
    else:
        console.print(f"sync: uploaded {len(report.uploaded)}, dropped {len(report.dropped)} superseded, "
                      f"{report.pending} still queued")
        for problem in problems:
            console.print(f"[red]{problem.key[:12]}[/] {problem.reason}", highlight=False)
    if report.pending:
        raise fail(f"{report.pending} blobs still queued: {report.error}")
    if problems:
        raise fail(f"{len(problems)} chunks failed verification")


def fetch_bench_cmd(
    tokens: Annotated[int, typer.Option("--tokens", help="Chunk length in tokens.")] = 512,
    repeats: Annotated[int, typer.Option("--repeats", help="Timed repeats per path (median reported).")] = 7,
    model: ModelOpt = None,
    home: HomeOpt = None,
    store: StoreOpt = None,
    manifest: ManifestOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Time one chunk's fetch from the local tier, from the remote store, and by recompute."""
    from kvlib.store.fetch_bench import run_fetch_bench

    try:
        result = run_fetch_bench(resolve_home(home), model=model, store=store, manifest=manifest,
                                 tokens=tokens, repeats=repeats)
    except KvlibError as exc:
        raise fail(str(exc)) from None
    if json_out:
        print_json(result)
        return
    console.print(f"{result['tokens']}-token chunk ({result['bytes']} bytes), median of {result['repeats']}:")
    for name in ("local_ms", "remote_ms", "recompute_ms"):
        console.print(f"  {name[:-3]:<10} {result[name]:9.2f} ms")
    console.print(f"  recompute / remote = {result['remote_speedup']:.1f}x, recompute / local = {result['local_speedup']:.1f}x")


def register(app: typer.Typer) -> None:
    """Add the cluster commands to the `kvlib` app."""
    app.command("sync")(sync_cmd)
    app.command("fetch-bench")(fetch_bench_cmd)
