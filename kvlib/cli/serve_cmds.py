"""`kvlib serve`, `kvlib keys add|ls|revoke` and `kvlib loadgen`: parse, call kvlib.serve, render.

FastAPI, uvicorn, torch and the openai client are imported inside the commands so that
`kvlib --help` stays fast.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from kvlib.cli.common import (HomeOpt, JsonOpt, LocalBytesOpt, ManifestOpt, ModelOpt, StoreOpt, console, err_console,
                              fail, print_json)
from kvlib.config import resolve_home
from kvlib.errors import KvlibError

keys_app = typer.Typer(help="API keys: each selects a tenant; the home stores only their sha256.",
                       no_args_is_help=True)


def serve(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to listen on.")] = 8000,
    model: ModelOpt = None,
    home: HomeOpt = None,
    mode: Annotated[str, typer.Option(help="Default mode: rerope (reuse library KV), naive, full (no reuse: the baseline), prefix (exact prefix caching alone, as serving engines do), or rerope+guard:B (bound each answer's KL to full by B; needs `kvlib calibrate`). A request may name its own in kvlib.mode.")] = "rerope",
    repair: Annotated[Optional[str], typer.Option(help="Repair after composing, e.g. boundary:8, auto or guard:B.")] = None,
    misses: Annotated[str, typer.Option(help="New documents: isolated (encoded on their own, as stored, and stored at once) or context (computed in context, stored later by a second encode).")] = "isolated",
    dtype: Annotated[Optional[str], typer.Option(help="Compute dtype: auto, float32, bfloat16.")] = None,
    max_queue: Annotated[int, typer.Option("--max-queue", min=0, help="Requests that may wait for the engine; more get 429.")] = 32,
    max_batch: Annotated[int, typer.Option("--max-batch", min=1, help="Requests decoded together; a finished one's slot goes to the next in the queue at once.")] = 8,
    allow_anonymous: Annotated[bool, typer.Option("--allow-anonymous", help="Callers without a key use the read-only public tenant.")] = False,
    max_body_mb: Annotated[float, typer.Option("--max-body-mb", min=0.001, help="Largest request body accepted.")] = 8.0,
    default_max_tokens: Annotated[int, typer.Option("--default-max-tokens", min=1, help="Completion limit when a request sets none.")] = 256,
    store: StoreOpt = None,
    manifest: ManifestOpt = None,
    local_bytes: LocalBytesOpt = None,
    manifest_retry: Annotated[float, typer.Option("--manifest-retry", min=0.1, help="Seconds between tries of an unreachable manifest (answers are full recompute meanwhile).")] = 5.0,
    sync_interval: Annotated[float, typer.Option("--sync-interval", min=0, help="Seconds between background uploads of the queue a store outage left (0: off).")] = 30.0,
    recent_mb: Annotated[float, typer.Option("--recent-mb", min=0, help="MiB of just-stored KV kept in memory, so a conversation's next turn does not re-read it (0: off).")] = 64.0,
    prefix_cache_mb: Annotated[float, typer.Option("--prefix-cache-mb", min=0, help="MiB of answered requests' KV kept per server, so a conversation's next turn opens with its history's KV (exact prefix caching, per tenant; 0: off).")] = 256.0,
) -> None:
    """Serve the OpenAI chat completions API on the library (see docs/serve.md)."""
    from kvlib.serve.pipeline import MISS_POLICIES

    if misses not in MISS_POLICIES:
        raise fail(f"unknown miss policy '{misses}'; choose one of {', '.join(MISS_POLICIES)}")
    try:
        import uvicorn

        from kvlib.serve.app import create_app
        from kvlib.serve.settings import Settings, serve_spec

        settings = Settings(home=resolve_home(home), model=model, dtype=dtype, mode=mode, repair=repair,
                            misses=misses, max_queue=max_queue, max_batch=max_batch, allow_anonymous=allow_anonymous,
                            max_body_bytes=int(max_body_mb * (1 << 20)), default_max_tokens=default_max_tokens,
                            store=store, manifest=manifest, local_bytes=local_bytes, manifest_retry_s=manifest_retry,
                            sync_interval_s=sync_interval, recent_bytes=int(recent_mb * (1 << 20)),
                            prefix_bytes=int(prefix_cache_mb * (1 << 20)))
        serve_spec(settings.spec)  # a typo fails before the model loads
        warn_without_keys(settings)
        err_console.print(f"kvlib serve: loading the model, then listening on http://{host}:{port}/v1", highlight=False)
        uvicorn.run(create_app(settings), host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)
    except KvlibError as exc:
        raise fail(str(exc))


def warn_without_keys(settings) -> None:
    """Every request would be a 401: say so at start, not per request."""
    from kvlib.serve.keys import KeyStore

    store = KeyStore(settings.home)
    live = [k for k in store.list() if k.revoked is None]
    store.close()
    if not live and not settings.allow_anonymous:
        err_console.print(f"[yellow]warning:[/] no API keys in {settings.home}: every request will get 401; "
                          "create one with `kvlib keys add TENANT`, or pass --allow-anonymous", highlight=False)


def keys_add(
    tenant: Annotated[str, typer.Argument(help="Tenant the key acts as.")],
    admin: Annotated[bool, typer.Option("--admin", help="May also add public documents.")] = False,
    home: HomeOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Create a key and print it once; only its hash is stored."""
    from kvlib.serve.keys import KeyStore

    store = KeyStore(resolve_home(home))
    try:
        key, info = store.add(tenant, admin)
    except KvlibError as exc:
        raise fail(str(exc))
    finally:
        store.close()
    if json_out:
        print_json({"key": key, "id": info.id, "tenant": info.tenant, "admin": info.admin})
        return
    console.print(key, highlight=False, markup=False)
    err_console.print(f"key {info.id} for tenant '{info.tenant}'{' (admin)' if admin else ''}: "
                      "shown once, store it now", highlight=False)


def keys_ls(home: HomeOpt = None, json_out: JsonOpt = False) -> None:
    """List keys by id and tenant (the keys themselves are not stored)."""
    from kvlib.serve.keys import KeyStore

    store = KeyStore(resolve_home(home))
    rows = store.list()
    store.close()
    if json_out:
        print_json([r.__dict__ for r in rows])
        return
    table = Table(show_edge=False)
    for col in ("id", "tenant", "admin", "created", "revoked"):
        table.add_column(col)
    for r in rows:
        table.add_row(r.id, r.tenant, "yes" if r.admin else "", r.created, r.revoked or "")
    console.print(table)


def keys_revoke(key_id: Annotated[str, typer.Argument(help="Key id from `kvlib keys ls`.")],
                home: HomeOpt = None) -> None:
    """Revoke a key: the server refuses it from the next request on."""
    from kvlib.serve.keys import KeyStore

    store = KeyStore(resolve_home(home))
    try:
        info = store.revoke(key_id)
    except KvlibError as exc:
        raise fail(str(exc))
    finally:
        store.close()
    console.print(f"revoked key {info.id} (tenant '{info.tenant}')", highlight=False)


def loadgen(
    url: Annotated[str, typer.Argument(help="The server's base URL, e.g. http://127.0.0.1:8000/v1")],
    api_key: Annotated[str, typer.Option("--api-key", envvar="KVLIB_API_KEY", help="Bearer key for the server.")],
    concurrency: Annotated[str, typer.Option(help="Comma-separated concurrency levels.")] = "1,4,8,16",
    sessions: Annotated[int, typer.Option(min=1, help="Sessions per level (each a multi-turn conversation).")] = 8,
    turns: Annotated[int, typer.Option(min=1, max=8, help="Turns per session.")] = 3,
    max_tokens: Annotated[int, typer.Option("--max-tokens", min=1, help="Completion tokens per request.")] = 32,
    max_seconds: Annotated[float, typer.Option("--max-seconds", min=1, help="Stop starting requests at a level after this.")] = 300,
    label: Annotated[str, typer.Option(help="Name of this run in the report, e.g. reuse or full.")] = "run",
    baseline: Annotated[Optional[Path], typer.Option(help="An earlier run's JSON to compare against (e.g. --mode full).")] = None,
    out: Annotated[Path, typer.Option(help="Folder for <label>.json, <label>.md and <label>.png.")] = Path("loadgen-out"),
    seed: Annotated[int, typer.Option(help="Seed for the session builder.")] = 0,
    hotpot: Annotated[Optional[Path], typer.Option(help="HotpotQA JSON (default ../shared/data/hotpotqa/qa_train.json).")] = None,
    corpus: Annotated[Optional[Path], typer.Option(help="Folder of extra passages (default examples/corpus).")] = None,
) -> None:
    """Replay multi-turn RAG sessions against a running server through the openai client (bounded)."""
    from kvlib.serve.loadgen import CORPUS, HOTPOT, LoadConfig, run_load, write_report

    try:
        levels = [int(x) for x in concurrency.split(",") if x.strip()]
    except ValueError:
        raise fail(f"--concurrency must be integers separated by commas, got '{concurrency}'")
    if not levels or min(levels) < 1 or max(levels) > 64:
        raise fail("--concurrency levels must lie in 1..64")
    cfg = LoadConfig(url=url, api_key=api_key, levels=levels, sessions=sessions, turns=turns, max_tokens=max_tokens,
                     max_seconds=max_seconds, seed=seed, hotpot=hotpot or HOTPOT, corpus=corpus or CORPUS)
    try:
        result = run_load(cfg, progress=lambda line: err_console.print(line, highlight=False))
        paths = write_report(result, label, out, baseline)
    except KvlibError as exc:
        raise fail(str(exc))
    sys.stdout.write(paths["md_text"])  # markdown for pasting: never wrapped to the terminal
    err_console.print(f"wrote {paths['json']}, {paths['md']}, {paths['png']}", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
    keys_app.command("add")(keys_add)
    keys_app.command("ls")(keys_ls)
    keys_app.command("revoke")(keys_revoke)
    app.add_typer(keys_app, name="keys")
    app.command("loadgen")(loadgen)
