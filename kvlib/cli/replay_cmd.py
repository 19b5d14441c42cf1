"""`kvlib replay`, `kvlib replay-sessions`, `kvlib replay-synth`: parse, call kvlib.replay, render."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Annotated, Optional

import typer

from kvlib.cli.common import HomeOpt, JsonOpt, ModelOpt, console, err_console, fail, print_json

TracesArg = Annotated[list[Path], typer.Argument(help="Trace files (JSONL, or .gz): OpenAI request logs or segment traces.")]
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Folder for replay.json, replay.md and the plots.")]


@contextlib.contextmanager
def _progress():
    """Rich progress on a terminal; one plain line every 30 s in a log."""
    if not err_console.is_terminal:
        from kvlib.cli.common import LogProgress

        log = LogProgress()
        last = [0]

        def report(n: int, tokens: int) -> None:
            log("requests", n - last[0])
            last[0] = n

        yield report
        return
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=err_console,
                  transient=True) as bar:
        task = bar.add_task("replaying", total=None)

        def report(n: int, tokens: int) -> None:
            bar.update(task, description=f"replaying: {n:,} requests, {tokens:,} prompt tokens")

        yield report


def _render(result: dict, out: Path) -> None:
    t, b = result["total"], result["baseline_fixed256"]
    console.print(f"[bold]{t['requests']:,}[/] requests, {t['tokens']:,} prompt tokens: "
                  f"prefix {100 * t['prefix_share']:.1f}%, library beyond prefix {100 * t['library_share']:.1f}%, "
                  f"new {100 * t['new_share']:.1f}% (fixed 256-token chunks beyond prefix "
                  f"{100 * b['share_beyond_prefix']:.1f}%)")
    for i in result["inputs"]:
        if i["malformed"]:
            console.print(f"[yellow]{Path(i['path']).name}: {i['malformed']} malformed lines skipped[/] "
                          f"({'; '.join(i['malformed_examples'][:2])})", highlight=False)
    if "live" in result:
        _render_live(result["live"])
    console.print(f"report: {out / 'replay.md'}")


def _render_live(live: dict) -> None:
    both, lib, n = live["comparisons"]["prefix_plus_library"], live["comparisons"]["library"], live["requests"]
    console.print(f"live: {n} requests answered, {live['errors']} errors, "
                  f"{live['skipped_too_long']} too long; prompt tokens as rendered {live['prompt_tokens_match']}/{n}; "
                  f"cached tokens as predicted {both['exact']}/{n} with the prefix cache (a default server; "
                  f"predicted {both['predicted_total']:,}, reported {both['reported_total']:,}), {lib['exact']}/{n} "
                  f"by the library alone (a server with --prefix-cache-mb 0)", highlight=False)
    for example in live["error_examples"]:
        console.print(f"[yellow]{example}[/]", highlight=False)


def replay_command(
    traces: TracesArg,
    out: OutOpt,
    capacity: Annotated[Optional[str], typer.Option("--capacity", help="Library budget, the same for the prefix cache: bytes (2GiB, 500MB) or tokens (200000tok).")] = None,
    policy: Annotated[str, typer.Option("--policy", help="Library eviction: lru or cost (GreedyDual-Size-Frequency).")] = "lru",
    sweep: Annotated[bool, typer.Option("--sweep", help="Capacity curves from 1% to 100% of the unique bytes, LRU and cost-aware against prefix caching.")] = False,
    live: Annotated[Optional[str], typer.Option("--live", help="Base URL of a running kvlib serve (e.g. http://127.0.0.1:8000/v1): send the requests and compare cached tokens.")] = None,
    api_key: Annotated[Optional[str], typer.Option("--api-key", envvar="KVLIB_API_KEY", help="With --live: the server's bearer key (`kvlib keys add TENANT`).")] = None,
    live_wait: Annotated[bool, typer.Option("--live-wait/--no-live-wait", help="With --live: send each request only once the server has stored the misses of those before (its /healthz pending_stores is 0).")] = True,
    no_cost: Annotated[bool, typer.Option("--no-cost", help="Skip the savings (no model load or cost measurement).")] = False,
    segment: Annotated[str, typer.Option("--segment", help="Segmentation policy MIN/AVG/MAX or MIN/AVG/MAX/WINDOW tokens (see docs/replay.md).")] = "32/256/1024/16",
    json_out: JsonOpt = False,
    model: ModelOpt = None,
    home: HomeOpt = None,
) -> None:
    """How much of a trace prefix caching and the library would serve, and what that saves."""
    from kvlib.config import resolve_home
    from kvlib.errors import KvlibError
    from kvlib.replay.api import replay

    try:
        with _progress() as progress:
            result = replay(traces, out=out, home=resolve_home(home), model=model, capacity=capacity, policy=policy,
                            sweep=sweep, live=live, live_key=api_key, live_wait=live_wait, costs=not no_cost, progress=progress,
                            segment_policy=parse_policy(segment),
                            note=lambda msg: err_console.print(msg, highlight=False))
    except KvlibError as exc:
        raise fail(str(exc))
    if json_out:
        print_json({k: v for k, v in result.items() if k not in ("timeline",)})
    else:
        _render(result, out)


def sessions_command(
    out: Annotated[Path, typer.Argument(help="Output JSONL of OpenAI-form requests.")],
    hotpotqa: Annotated[Optional[Path], typer.Option("--hotpotqa", help="HotpotQA qa file (JSON list).")] = None,
    corpus: Annotated[Optional[Path], typer.Option("--corpus", help="Folder of text/markdown documents.")] = None,
    sessions: Annotated[int, typer.Option("--sessions", help="Sessions per source.")] = 40,
    turns: Annotated[int, typer.Option("--turns", help="Turns per session.")] = 4,
    seed: Annotated[int, typer.Option("--seed")] = 0,
) -> None:
    """Build multi-turn RAG sessions whose documents accumulate and reorder across turns."""
    from kvlib.cli.common import require_paths
    from kvlib.replay.sessions import SessionSpec, write_sessions

    from kvlib.errors import KvlibError

    try:
        require_paths([p for p in (hotpotqa, corpus) if p is not None])
        n = write_sessions(out, SessionSpec(hotpotqa=hotpotqa, corpus=corpus, sessions=sessions, turns=turns, seed=seed))
    except KvlibError as exc:
        raise fail(str(exc))
    console.print(f"{n} requests written to {out}")


def synth_command(
    out: Annotated[Path, typer.Argument(help="Output segment trace (JSONL).")],
    tokens: Annotated[int, typer.Option("--tokens", help="Prompt tokens in all.")] = 50_000_000,
    seed: Annotated[int, typer.Option("--seed")] = 0,
) -> None:
    """Write a large synthetic segment trace (for memory and speed checks)."""
    from kvlib.replay.sessions import write_synthetic_segments

    n = write_synthetic_segments(out, tokens, seed)
    console.print(f"{n} requests written to {out}")


def parse_policy(text: str):
    """'MIN/AVG/MAX[/WINDOW]' token counts as a SegmentPolicy."""
    from kvlib.errors import InputError
    from kvlib.segment import DEFAULT_POLICY, SegmentPolicy

    try:
        parts = [int(x) for x in text.split("/")]
        if len(parts) not in (3, 4):
            raise ValueError(text)
    except ValueError:
        raise InputError(f"segment policy {text!r}: give MIN/AVG/MAX or MIN/AVG/MAX/WINDOW token counts, e.g. 32/256/1024/16") from None
    window = parts[3] if len(parts) == 4 else DEFAULT_POLICY.cdc_window
    return SegmentPolicy(min_tokens=parts[0], avg_tokens=parts[1], max_tokens=parts[2], cdc_window=window)


def segstats_command(
    passages: Annotated[Path, typer.Argument(help="HotpotQA pooled corpus (JSON object title -> sentences).")],
    policies: Annotated[list[str], typer.Option("--policy", help="MIN/AVG/MAX or MIN/AVG/MAX/WINDOW; repeat to compare.")] = ["32/256/1024/16"],
    trials: Annotated[int, typer.Option("--trials")] = 60,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    json_out: JsonOpt = False,
    model: ModelOpt = None,
    home: HomeOpt = None,
) -> None:
    """Measure segmentation policies: is a passage found again when renumbered, reformatted or embedded?"""
    from kvlib.config import resolve_home
    from kvlib.errors import KvlibError
    from kvlib.replay.segstats import CASES, hotpot_passages, measure_policy
    from kvlib.replay.shape import load_tokenizer_and_shape

    try:
        pols = [parse_policy(p) for p in policies]
        tokenizer = load_tokenizer_and_shape(model, resolve_home(home))[0]
        pool = hotpot_passages(passages)
        rows = [measure_policy(tokenizer, pool, p, trials, seed) for p in pols]
    except (KvlibError, OSError, ValueError) as exc:
        raise fail(str(exc))
    if json_out:
        print_json(rows)
        return
    for r in rows:
        p = r["policy"]
        found = ", ".join(f"{c} {100 * r['found'][c]:.0f}%" for c in CASES)
        console.print(f"{p['min_tokens']}/{p['avg_tokens']}/{p['max_tokens']}/{p['cdc_window']}: found again {found}; "
                      f"{r['segments_per_prompt']:.1f} segments/prompt, reusable mean {r['mean_reusable_tokens']:.0f} tokens")


def register(app: typer.Typer) -> None:
    app.command("replay-segstats")(segstats_command)
    app.command("replay")(replay_command)
    app.command("replay-sessions")(sessions_command)
    app.command("replay-synth")(synth_command)
