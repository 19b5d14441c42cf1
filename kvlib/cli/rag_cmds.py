"""`kvlib ingest` and `kvlib query`: parse, call kvlib.rag, render with rich."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from kvlib.cli.common import (
    HomeOpt, JsonOpt, ModelOpt, TenantOpt, console, err_console, fail, print_json, require_paths,
)
from kvlib.config import DEFAULT_TENANT, resolve_home
from kvlib.errors import InputError, KvlibError

DtypeOpt = Annotated[Optional[str], typer.Option(help="Compute dtype: auto (bf16 where native), float32, bfloat16.")]


class RichProgress:
    """Files, chunks, tokens/s and new vs deduplicated chunks, on stderr."""

    def __init__(self, progress: Progress):
        self.p, self.new, self.dedup, self.tokens = progress, 0, 0, 0
        self.files = progress.add_task("files", total=None, stats="")
        self.chunks = progress.add_task("chunks", total=0, stats="")

    def start(self, total_docs: int) -> None:
        self.p.update(self.files, total=total_docs)

    def doc_started(self, path: str, n_chunks: int) -> None:
        task = self.p.tasks[self.chunks]
        self.p.update(self.chunks, total=(task.total or 0) + n_chunks, description=Path(path).name[:28])

    def chunk_done(self, n_tokens: int, new: bool) -> None:
        self.new, self.dedup, self.tokens = self.new + new, self.dedup + (not new), self.tokens + n_tokens
        elapsed = self.p.tasks[self.chunks].elapsed or 1e-9
        self.p.update(self.chunks, advance=1,
                      stats=f"{self.tokens / elapsed:,.0f} tok/s  new {self.new}  dedup {self.dedup}")

    def doc_done(self, path: str, unchanged: bool) -> None:
        self.p.update(self.files, advance=1)


def ingest(
    paths: Annotated[list[Path], typer.Argument(help="Folders (recursive) and files: .txt, .md, .jsonl (text field).")],
    home: HomeOpt = None,
    tenant: TenantOpt = DEFAULT_TENANT,
    public: Annotated[bool, typer.Option("--public", help="Share with every tenant (deduplicated across all).")] = False,
    chunk_tokens: Annotated[int, typer.Option("--chunk-tokens", min=16, help="Max tokens per chunk.")] = 256,
    prompt_forms: Annotated[bool, typer.Option("--prompt-forms", help="Also store the forms a chat pasting these documents sends, so `kvlib serve` serves that chat from the library on its first turn (more encode time).")] = False,
    model: ModelOpt = None,
    dtype: DtypeOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Encode documents once into the library (pre-RoPE KV) and the retrieval index."""
    from kvlib.rag.ingest import Ingestor
    from kvlib.rag.stack import open_stack
    from kvlib.store.manifest import check_tenant

    try:
        check_tenant(tenant)  # bad input fails before the model loads and the progress bar starts
        require_paths(paths)
        stack = open_stack(resolve_home(home), model=model, dtype=dtype)
        ingestor = Ingestor(stack.engine, stack.library, stack.index, stack.embedder, tenant, public, chunk_tokens,
                            prompt_forms=prompt_forms)
        columns = (TextColumn("{task.description:<28}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), TextColumn("{task.fields[stats]}"))
        with Progress(*columns, console=err_console, transient=json_out, disable=json_out) as bar:
            report = ingestor.run(paths, RichProgress(bar))
        stack.close()
    except KeyboardInterrupt:
        raise fail("interrupted: the library is consistent; run the same command again to continue")
    except KvlibError as exc:
        raise fail(str(exc))
    print_json(report.as_dict()) if json_out else render_ingest(report)


def render_ingest(r) -> None:
    by_path: dict[str, list[str]] = {}
    for path, reason in r.skipped:
        by_path.setdefault(path, []).append(reason)
    for path, reasons in by_path.items():
        more = f" (and {len(reasons) - 1} more like it)" if len(reasons) > 1 else ""
        err_console.print(f"[yellow]skipped[/] {path}: {reasons[0]}{more}", highlight=False)
    rate = r.tokens_encoded / r.seconds if r.seconds else 0.0
    console.print(
        f"[bold]{r.documents}[/] documents ({r.unchanged} unchanged, {len(by_path)} files with skipped input), "
        f"[bold]{r.chunks_new}[/] new chunks, {r.chunks_dedup} deduplicated, {r.tokens_encoded:,} tokens encoded "
        f"({rate:,.0f} tok/s), {r.bytes_written / 1e6:,.1f} MB written in {r.seconds:.1f} s"
    )
    if r.forms_new or r.forms_dedup:
        console.print(f"prompt forms for kvlib serve: {r.forms_new} new, {r.forms_dedup} already stored", highlight=False)
    if r.tokens_encoded:
        st = r.stage_s
        console.print(f"time: encode {st['encode']:.1f} s ({r.tokens_encoded / max(st['encode'], 1e-9):,.0f} tok/s), "
                      f"drift score {st['drift']:.1f} s, KV write {st['write']:.1f} s, embed + index {st['embed']:.1f} s",
                      highlight=False)


class Streamer:
    """Prints the answer as tokens arrive (decoding the whole prefix keeps multi-byte text intact)."""

    def __init__(self, engine, enabled: bool):
        self.engine, self.enabled, self.ids, self.shown = engine, enabled, [], ""

    def __call__(self, token: int) -> None:
        self.ids.append(token)
        if self.enabled:
            text = self.engine.decode(self.ids)
            console.print(text[len(self.shown):], end="", highlight=False, markup=False, soft_wrap=True)
            self.shown = text


def query(
    question: Annotated[str, typer.Argument(help="The question to answer from the library.")],
    k: Annotated[int, typer.Option("--k", min=1, help="Chunks to retrieve.")] = 4,
    mode: Annotated[str, typer.Option(help="BASE[+ENCODING][+REPAIR]: rerope (= rerope+sink: rotate cached keys), naive (as encoded), full, prefix; +bare/+lead read other encodings; rerope+guard:B bounds KL to full by B (needs `kvlib calibrate`).")] = "rerope",
    repair: Annotated[Optional[str], typer.Option(help="Repair after composing: boundary:K, query:R, a union (boundary:8+query:0.05), blend:R, auto[:TARGET] or guard:B.")] = None,
    compare: Annotated[bool, typer.Option("--compare", help="Also run full recompute on the same ids.")] = False,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1, help="Answer length limit.")] = 64,
    home: HomeOpt = None,
    tenant: TenantOpt = DEFAULT_TENANT,
    model: ModelOpt = None,
    dtype: DtypeOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Answer a question from cached chunk KV, streaming, with TTFT split by stage."""
    from kvlib.rag.query import QueryRunner
    from kvlib.rag.stack import open_stack
    from kvlib.store.manifest import check_tenant

    from kvlib.engine.spec import parse_mode

    try:
        check_tenant(tenant)
        spec = parse_mode(mode, repair)  # a typo fails before the model loads
        root = resolve_home(home)
        if not (root / "index").is_dir():  # a read command never creates a library (e.g. a mistyped --home)
            raise InputError(f"no indexed documents in {root}: run `kvlib ingest PATH --home {root}` first")
        stack = open_stack(root, model=model, dtype=dtype)
        if len(stack.index) == 0:
            raise InputError("the library has no indexed documents: run `kvlib ingest PATH` first")
        runner = QueryRunner(stack.engine, stack.library, stack.index, stack.embedder, tenant)
        runner.calibration_for(spec)  # a guard mode without a calibration fails before retrieval
        stack.embedder.warm()  # loading the embedding model is start-up, like loading the LLM, not per question
        t0 = time.perf_counter()  # TTFT starts when the question arrives: retrieval is part of it
        hits = runner.retrieve(question, k)
        retrieval_s = time.perf_counter() - t0
        if not hits:
            raise InputError(f"no documents visible to tenant '{tenant}'")
        stream = Streamer(stack.engine, not json_out)
        main = runner.answer(question, k=k, mode=spec, max_new_tokens=max_new_tokens, on_token=stream, hits=hits,
                             t0=t0)
        # full is charged the same retrieval time, so the TTFT ratio compares like with like
        other = runner.answer(question, k=k, mode="full", max_new_tokens=max_new_tokens, hits=hits,
                              t0=time.perf_counter() - retrieval_s) if compare else None
        stack.close()
    except KvlibError as exc:
        raise fail(str(exc))
    name = stack.engine.lm.name
    if json_out:
        out = main.as_dict(name)
        if other:
            out["compare"] = {"full": other.as_dict(name), "ttft_ratio": other.ttft_s / main.ttft_s,
                              "same_answer": other.answer == main.answer}
        print_json(out)
    else:
        render_answer(main, other)


def render_answer(main, other) -> None:
    console.print()
    for w in main.warnings:
        err_console.print(f"[yellow]warning:[/] {w}", highlight=False)
    src = Table(title="sources", show_edge=False)
    for col in ("doc", "chunk", "score"):
        src.add_column(col)
    for s in main.sources:
        src.add_row(s["doc"], s["key"][:12], f"{s['score']:.3f}")
    console.print(src)
    t, n = main.timings, main.tokens
    stages = " + ".join(f"{k} {t[k] * 1000:.0f}" for k in ("retrieval", "load", "compose", "repair", "prefill"))
    console.print(
        f"[bold]{main.mode}[/] TTFT {main.ttft_s * 1000:.0f} ms = {stages} ms; decode {main.decode_tok_s:.1f} tok/s; "
        f"prompt tokens cached {n['cached']}, recomputed {n['recomputed']}, computed {n['computed']}"
    )
    if main.guard:
        g = main.guard
        console.print(f"guard: rung {g['rung']}{' (fell back to full)' if g['fell_back'] else ''}, predicted KL to "
                      f"full {g['predicted_kl']:.3f}, bound {g['kl_bound']:.3f} at {g['confidence']:.0%} "
                      f"(budget {g['budget']:g}, KL along {'full' if g['target'] == 'full' else 'gold'} answers)",
                      highlight=False)
    if other:
        console.print(f"[bold]full[/] answer: {other.answer}", highlight=False)
        console.print(f"full TTFT {other.ttft_s * 1000:.0f} ms -> {main.mode} is "
                      f"[bold]{other.ttft_s / main.ttft_s:.1f}x[/] faster")


def register(app: typer.Typer) -> None:
    app.command("ingest")(ingest)
    app.command("query")(query)
