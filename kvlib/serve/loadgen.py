"""A bounded load generator for a running `kvlib serve`, through the real openai client.

Design facts:
- Sessions are multi-turn RAG conversations. Each turn's user message carries the
  documents retrieved so far as `Document [n](Title: ...)` lines: documents accumulate
  across turns and are shuffled and renumbered each turn, so a cache keyed on token
  prefixes loses them while one keyed on content can find them. Passages come from the
  HotpotQA sample in shared/data (the session's own question and its context paragraphs)
  and from examples/corpus (paragraphs of at least 40 words), and are cut to ~90 words.
- Each level runs max(sessions, concurrency) sessions, at most `concurrency` at once;
  a session's turns are sequential (the next turn includes the previous answer). Nothing
  starts after `max_seconds`, and every request has a timeout: the run ends by itself.
- TTFT is measured client-side to the first chunk with text (the server sends the
  assistant role at once, before the request reaches the engine), from the call into the
  openai client: what an application sees.
- The server's own overhead is the client TTFT counted from when the request went onto the
  wire (httpx's request hook) less the server's TTFT, plus the server's segmentation and
  lookup: HTTP both ways, SSE, and the server's own prompt work. The time the openai client
  takes to build the request before sending it is the client library's, and is reported on
  its own (`client_build_p50_ms`).
- Decode tokens/s is completion tokens over the level's wall time (aggregate throughput).
  TPOT (time per output token, p50 and p99) is each request's (e2e - TTFT) / (tokens - 1), as
  vLLM's benchmarks define it: what a streaming reader sees between tokens, including the
  decode steps that wait while a newcomer's prompt is begun between them.
  The cached share is sum(cached_tokens) / sum(prompt_tokens), from the usage chunk.
- A 429 is counted and the turn skipped (no retry storms); other failures count as errors.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kvlib.errors import InputError

REPO_ROOT = Path(__file__).resolve().parents[2]
HOTPOT = REPO_ROOT.parent / "shared" / "data" / "hotpotqa" / "qa_train.json"
CORPUS = REPO_ROOT / "examples" / "corpus"
PASSAGE_WORDS = 90
FOLLOW_UPS = ("What else do the documents say about {title}?", "Which document mentions a date, and what is it?",
              "Summarise what is known about {title} in one sentence.", "Is {title} related to the first question?")
SYSTEM = "You are a helpful assistant. Answer using the documents. Be brief."
REQUEST_TIMEOUT_S = 300
# per task (a session's requests are sequential): when the request under way went onto the wire
_SENT: contextvars.ContextVar[dict | None] = contextvars.ContextVar("kvlib_loadgen_sent", default=None)


async def _mark_sent(request) -> None:
    """httpx request hook: the moment the current task's request is handed to the connection."""
    box = _SENT.get()
    if box is not None:
        box.setdefault("t", time.perf_counter())


def client_for(url: str, api_key: str):
    """The openai client the load runs through, on openai's own httpx defaults plus the send hook."""
    import openai

    http = openai.DefaultAsyncHttpxClient(event_hooks={"request": [_mark_sent]})
    return openai.AsyncOpenAI(api_key=api_key, base_url=url, max_retries=0, timeout=REQUEST_TIMEOUT_S,
                              http_client=http)


@dataclass
class LoadConfig:
    url: str
    api_key: str
    levels: list[int] = field(default_factory=lambda: [1, 4, 8, 16])
    sessions: int = 8
    turns: int = 3
    max_tokens: int = 32
    max_seconds: float = 300.0
    seed: int = 0
    hotpot: Path = HOTPOT
    corpus: Path = CORPUS


@dataclass
class Session:
    question: str
    turns: list[list[tuple[str, str]]]  # per turn: the documents (title, text) in the order sent
    follow_ups: list[str]


def clip(text: str, words: int = PASSAGE_WORDS) -> str:
    parts = text.split()
    return " ".join(parts[:words])


def corpus_passages(corpus: Path) -> list[tuple[str, str]]:
    from kvlib.retrieve.sources import iter_sources

    docs, _ = iter_sources([corpus])
    out = []
    for doc in docs:
        title = Path(doc.path.split("#")[0]).stem.replace("_", " ")
        out += [(title, clip(p)) for p in doc.text.split("\n\n") if len(p.split()) >= 40]
    return out


def build_sessions(cfg: LoadConfig, n: int) -> list[Session]:
    """n sessions; deterministic for a seed. Turn t holds 2 + 2t documents, reshuffled."""
    if not cfg.hotpot.is_file():
        raise InputError(f"HotpotQA sample not found: {cfg.hotpot}")
    records = json.loads(cfg.hotpot.read_text())
    extra = corpus_passages(cfg.corpus)
    rng = random.Random(cfg.seed)
    sessions = []
    for i in range(n):
        rec = records[i % len(records)]
        pool = [(title, clip(" ".join(sents))) for title, sents in rec["context"]]
        pool += rng.sample(extra, min(len(extra), 2 * cfg.turns))
        turns, shown = [], []
        for t in range(cfg.turns):
            shown += pool[len(shown): 2 + 2 * t]
            order = shown[:]
            rng.shuffle(order)
            turns.append(order)
        follow = [rng.choice(FOLLOW_UPS).format(title=rng.choice(turns[t])[0]) for t in range(cfg.turns)]
        sessions.append(Session(question=rec["question"], turns=turns, follow_ups=follow))
    return sessions


def turn_messages(session: Session, t: int, answers: list[str]) -> list[dict]:
    """System, then earlier questions and answers, then this turn's documents and question."""
    questions = [session.question] + session.follow_ups[1:]
    messages = [{"role": "system", "content": SYSTEM}]
    for q, a in zip(questions[:t], answers):
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    docs = "\n".join(f"Document [{n}](Title: {title}) {text}" for n, (title, text) in
                     enumerate(session.turns[t], start=1))
    messages.append({"role": "user", "content": f"{docs}\n\nQuestion: {questions[t]}"})
    return messages


@dataclass
class Outcome:
    status: str  # "ok", "429" or "error"
    ttft_s: float | None = None
    e2e_s: float | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    detail: str = ""
    # the server's own overhead: HTTP and streaming (client TTFT - the server's TTFT) + segmentation + lookup
    overhead_s: float | None = None
    overhead_parts_s: dict = field(default_factory=dict)  # "http", "segment", "lookup": what overhead_s sums
    build_s: float | None = None  # from the call into the openai client until the request went onto the wire

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first, as vLLM's benchmarks define it: (e2e - TTFT) / (tokens - 1)."""
        if self.e2e_s is None or self.ttft_s is None or self.completion_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.completion_tokens - 1)


async def one_request(client, messages, max_tokens: int) -> Outcome:
    import openai

    t0, sent = time.perf_counter(), {}
    _SENT.set(sent)
    ttft, text, usage, meta = None, [], None, None
    try:
        stream = await client.chat.completions.create(
            model="default", messages=messages, max_tokens=max_tokens, temperature=0, stream=True,
            stream_options={"include_usage": True})
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                ttft = ttft if ttft is not None else time.perf_counter() - t0
                text.append(chunk.choices[0].delta.content)
            if chunk.usage is not None:
                usage = chunk.usage
            meta = (chunk.model_extra or {}).get("kvlib", meta)
    except openai.RateLimitError:
        return Outcome("429")
    except (openai.OpenAIError, asyncio.TimeoutError) as exc:
        return Outcome("error", detail=f"{type(exc).__name__}: {exc}"[:200])
    if usage is None:
        return Outcome("error", detail="no usage chunk")
    details = usage.prompt_tokens_details
    ttft = ttft if ttft is not None else time.perf_counter() - t0
    build = sent["t"] - t0 if "t" in sent else None
    parts = overhead_parts(ttft - (build or 0.0), meta)
    return Outcome("ok", ttft_s=ttft, overhead_s=sum(parts.values()) if parts else None, overhead_parts_s=parts,
                   build_s=build,
                   e2e_s=time.perf_counter() - t0, prompt_tokens=usage.prompt_tokens,
                   cached_tokens=(details.cached_tokens or 0) if details else 0,
                   completion_tokens=usage.completion_tokens, detail="".join(text))


async def run_level(cfg: LoadConfig, level: int, progress) -> dict:
    import openai

    sessions = build_sessions(cfg, max(cfg.sessions, level))
    client = client_for(cfg.url, cfg.api_key)
    gate, outcomes = asyncio.Semaphore(level), []
    t0 = time.perf_counter()
    deadline = t0 + cfg.max_seconds

    async def run_session(session: Session):
        async with gate:
            answers: list[str] = []
            for t in range(cfg.turns):
                if time.perf_counter() > deadline:
                    return
                out = await one_request(client, turn_messages(session, t, answers), cfg.max_tokens)
                outcomes.append(out)
                answers.append(out.detail if out.status == "ok" else "")

    await asyncio.gather(*(run_session(s) for s in sessions))
    wall = time.perf_counter() - t0
    await client.close()
    summary = summarize(level, outcomes, wall)
    progress(f"concurrency {level}: {summary['ok']} ok, {summary['rate_limited']} 429, {summary['errors']} errors, "
             f"TTFT p50 {summary['ttft_p50_s']} s, {summary['requests_per_s']} req/s in {wall:.0f} s")
    return summary


def overhead_parts(client_ttft: float, meta: dict | None) -> dict:
    """The parts of TTFT that are neither queueing nor the engine's work, in seconds: "http" (HTTP and SSE
    both ways: client_ttft, counted from when the request went onto the wire, less the server's TTFT),
    "segment" and "lookup" (the server's own prompt work); {} when the server sent no timings."""
    if not meta or "ttft_s" not in meta:
        return {}
    split = meta.get("ttft_split_s", {})
    return {"http": client_ttft - meta["ttft_s"], "segment": split.get("segment", 0.0),
            "lookup": split.get("lookup", 0.0)}


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q * (len(values) - 1))))]


def ms_p50(seconds: list[float | None]) -> float | None:
    """The median in milliseconds of the values that were measured, or None if none was."""
    return ms_pct(seconds, 0.5)


def ms_pct(seconds: list[float | None], q: float) -> float | None:
    """The q-quantile in milliseconds of the values that were measured, or None if none was."""
    known = [x for x in seconds if x is not None]
    return round(1e3 * percentile(known, q), 3) if known else None


def summarize(level: int, outcomes: list[Outcome], wall: float) -> dict:
    ok = [o for o in outcomes if o.status == "ok"]
    ttfts = [o.ttft_s for o in ok]
    prompt = sum(o.prompt_tokens for o in ok)
    r3 = (lambda x: None if x is None else round(x, 3))
    return {
        "concurrency": level, "requests": len(outcomes), "ok": len(ok),
        "rate_limited": sum(o.status == "429" for o in outcomes),
        "errors": sum(o.status == "error" for o in outcomes),
        "error_examples": sorted({o.detail for o in outcomes if o.status == "error"})[:3],
        "wall_s": round(wall, 2), "ttft_p50_s": r3(percentile(ttfts, 0.5)), "ttft_p90_s": r3(percentile(ttfts, 0.9)),
        "ttft_p99_s": r3(percentile(ttfts, 0.99)),
        "ttft_mean_s": r3(statistics.fmean(ttfts)) if ttfts else None,
        "server_overhead_p50_ms": ms_p50([o.overhead_s for o in ok]),
        "server_overhead_parts_p50_ms": {part: ms_p50([o.overhead_parts_s.get(part) for o in ok])
                                         for part in ("http", "segment", "lookup")},
        "client_build_p50_ms": ms_p50([o.build_s for o in ok]),
        "tpot_p50_ms": ms_pct([o.tpot_s for o in ok], 0.5), "tpot_p99_ms": ms_pct([o.tpot_s for o in ok], 0.99),
        "requests_per_s": round(len(ok) / wall, 3) if wall else None,
        "decode_tokens_per_s": round(sum(o.completion_tokens for o in ok) / wall, 2) if wall else None,
        "prompt_tokens": prompt, "cached_tokens": sum(o.cached_tokens for o in ok),
        "cached_share": round(sum(o.cached_tokens for o in ok) / prompt, 4) if prompt else None,
    }


def run_load(cfg: LoadConfig, progress=print) -> dict:
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    levels = [asyncio.run(run_level(cfg, level, progress)) for level in cfg.levels]
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items() if k != "api_key"}
    return {"started": started, "config": config, "levels": levels}


def markdown(result: dict, label: str, baseline: dict | None) -> str:
    head = ("| concurrency | ok | 429 | errors | TTFT p50 s | TTFT p99 s | req/s | decode tok/s | "
            "TPOT p50 / p99 ms | cached share | "
            "server overhead p50 ms | of it: http / segment / lookup ms |"
            + (" req/s vs baseline | p99 vs baseline |" if baseline else ""))
    lines = [f"**{label}**", "", head, "|" + " --- |" * (head.count("|") - 1)]
    base = {lv["concurrency"]: lv for lv in (baseline or {}).get("levels", [])}
    for lv in result["levels"]:
        row = (f"| {lv['concurrency']} | {lv['ok']} | {lv['rate_limited']} | {lv['errors']} | {lv['ttft_p50_s']} | "
               f"{lv['ttft_p99_s']} | {lv['requests_per_s']} | {lv['decode_tokens_per_s']} | {tpot_cell(lv)} | "
               f"{lv['cached_share']} | "
               f"{lv.get('server_overhead_p50_ms')} | {overhead_parts_cell(lv)} |")
        if baseline:
            b = base.get(lv["concurrency"], {})
            ratio = (lambda a, c: f"{a / c:.2f}x" if a and c else "-")
            row += f" {ratio(lv['requests_per_s'], b.get('requests_per_s'))} | {ratio(lv['ttft_p99_s'], b.get('ttft_p99_s'))} |"
        lines.append(row)
    return "\n".join(lines) + "\n"


def tpot_cell(level: dict) -> str:
    """'p50 / p99' time per output token in ms, or '-' for a level recorded before it was."""
    if level.get("tpot_p50_ms") is None:
        return "-"
    return f"{level['tpot_p50_ms']:.1f} / {level['tpot_p99_ms']:.1f}"


def overhead_parts_cell(level: dict) -> str:
    """'http / segment / lookup' p50s in ms, or '-' for a level recorded before they were."""
    parts = level.get("server_overhead_parts_p50_ms") or {}
    if not parts:
        return "-"
    return " / ".join("-" if parts.get(k) is None else f"{parts[k]:.1f}" for k in ("http", "segment", "lookup"))


def plot(result: dict, label: str, baseline: dict | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    runs = [(label, result)] + ([("baseline", baseline)] if baseline else [])
    for name, run in runs:
        xs = [lv["concurrency"] for lv in run["levels"]]
        ax1.plot(xs, [lv["requests_per_s"] or 0 for lv in run["levels"]], marker="o", label=name)
        ax2.plot(xs, [lv["ttft_p50_s"] or 0 for lv in run["levels"]], marker="o", label=f"{name} p50")
        ax2.plot(xs, [lv["ttft_p99_s"] or 0 for lv in run["levels"]], marker="x", linestyle="--", label=f"{name} p99")
    ax1.set(xlabel="concurrency", ylabel="requests/s", title="throughput")
    ax2.set(xlabel="concurrency", ylabel="seconds", title="time to first token")
    for ax in (ax1, ax2):
        ax.set_ylim(bottom=0)  # ratios between runs read true only from zero
        ax.set_xticks([lv["concurrency"] for lv in result["levels"]])
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(result: dict, label: str, out: Path, baseline_path: Path | None = None) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    baseline = json.loads(baseline_path.read_text()) if baseline_path else None
    paths = {"json": out / f"{label}.json", "md": out / f"{label}.md", "png": out / f"{label}.png"}
    result = {**result, "label": label}
    paths["json"].write_text(json.dumps(result, indent=2) + "\n")
    text = markdown(result, label, baseline)
    paths["md"].write_text(text)
    plot(result, label, baseline, paths["png"])
    return {**paths, "md_text": text}
