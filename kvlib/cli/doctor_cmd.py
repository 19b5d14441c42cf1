"""`kvlib doctor`: the per-model correctness gate, and `--bench` for in-memory TTFT."""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich.table import Table

from kvlib.cli.common import HomeOpt, JsonOpt, ModelOpt, console, fail, print_json
from kvlib.config import resolve_home
from kvlib.errors import KvlibError


def doctor(
    model: ModelOpt = None,
    home: HomeOpt = None,
    json_out: JsonOpt = False,
    bench: Annotated[bool, typer.Option("--bench", help="Also time full vs rerope TTFT (8 x 512-token chunks).")] = False,
    dtype: Annotated[Optional[str], typer.Option(help="Compute dtype for --bench: auto, float32, bfloat16.")] = None,
    device: Annotated[Optional[str], typer.Option(help="cpu or cuda (default: cuda when present).")] = None,
    chunks: Annotated[int, typer.Option(help="Chunks in the --bench prompt.")] = 8,
    chunk_tokens: Annotated[int, typer.Option(help="Tokens per chunk in the --bench prompt.")] = 512,
    repeats: Annotated[int, typer.Option(help="Timed repeats per mode (after a warm-up).")] = 5,
) -> None:
    """Check that cached KV is exact on this model (float32): shift invariance, composition, rotation."""
    from kvlib.engine.doctor import bench_ttft, checks_as_json, run_checks
    from kvlib.engine.model import load_model, pick_device, pick_dtype
    from kvlib.engine.session import Engine

    try:
        root = resolve_home(home)
        engine = Engine(load_model(model, root, dtype="float32", device=device))
        report = checks_as_json(engine, run_checks(engine))
        if bench:
            bench_dtype = pick_dtype(dtype, pick_device(device))
            if bench_dtype != engine.lm.dtype:
                engine = None  # free the float32 model first: on a 1.5B model the two would hold ~14 GB at once
                engine = Engine(load_model(model, root, dtype=str(bench_dtype).replace("torch.", ""), device=device))
            report["bench"] = bench_ttft(engine, n_chunks=chunks, chunk_tokens=chunk_tokens, repeats=repeats)
    except KvlibError as exc:
        raise fail(str(exc))
    print_json(report) if json_out else render(report)
    if not report["ok"]:
        raise typer.Exit(1)


def render(report: dict) -> None:
    table = Table(title=f"kvlib doctor: {report['model']} ({report['dtype']}, {report['device']})")
    for col in ("check", "value", "limit", "ok"):
        table.add_column(col)
    for c in report["checks"]:
        table.add_row(c["name"], f"{c['value']:.2e}", f"{c['limit']:.0e}", "[green]yes" if c["ok"] else "[red]NO")
    console.print(table)
    console.print(f"fingerprint {report['fingerprint'][:16]}; C kernels: rope {report['rope_kernel']}, "
                  f"attention {report['attn_kernel']}, linear {report['linear_kernel']}, "
                  f"pointwise {report['pointwise_kernel']}, bf16 attention {report['bf16_attn_kernel']}, "
                  f"bf16 linear {report['bf16_linear_kernel']}")
    if "bench" in report:
        b = report["bench"]
        console.print(
            f"TTFT, {b['prompt_tokens']}-token prompt ({b['n_chunks']} x {b['chunk_tokens']}), {b['dtype']} on "
            f"{b['device']}, median of {b['repeats']}: full {b['full_ttft_s'] * 1000:.0f} ms, rerope "
            f"{b['rerope_ttft_s'] * 1000:.1f} ms, [bold]{b['speedup']:.1f}x[/]"
        )
        console.print(
            f"plain prefill: {b['full_prefill_tok_s']:,.0f} tok/s for the whole prompt, "
            f"{b['chunk_prefill_tok_s']:,.0f} tok/s for {b['chunk_tokens']}-token chunks (compare `kvlib ingest`)"
        )


def register(app: typer.Typer) -> None:
    app.command("doctor")(doctor)
