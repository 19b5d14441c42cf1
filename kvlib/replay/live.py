"""`--live URL`: send the trace's OpenAI-form requests to a running server and compare its cached tokens.

Design facts:
- Requests go through the real `openai` client, one at a time in trace order, so each
  request's cache state is what the accounting predicts from the requests before it.
- Trim rule: a prompt must leave `RESERVE` tokens of the model's context for the answer.
  Oldest messages that are neither system messages nor the last message are dropped one at
  a time until it fits; a request whose system and last messages alone do not fit is
  skipped and counted. The accounting runs on the trimmed requests, so it predicts what
  was actually sent.
- Two predictions are compared with `usage.prompt_tokens_details.cached_tokens`:
  `library` (what `kvlib serve --prefix-cache-mb 0` serves: reusable segments found in the
  library at any position, plus the encoding context E when the prompt opens with it, whose
  KV the server holds from the start) and `prefix_plus_library` (what `kvlib serve` serves by
  default: its prefix cache first, the library beyond it; E's KV instead where the prompt
  opens with E and the prefix hit is no longer). The prefix cache's budget is the server's
  (`prefix_cache_tokens` in its /healthz), evicted least recently used, leaves first, as it
  does. The rendered prompt length is compared with
  `usage.prompt_tokens` too, which checks that replay and the server render the same ids.
- The server stores misses off the request's critical path, when its queue is empty. With
  `wait` (the default), each request is sent only once the server's /healthz reports
  `pending_stores: 0` and an empty queue, so the library holds everything the accounting
  assumes; without it, a segment sent again at once may not be stored yet, and the
  disagreements that makes are shown, not hidden.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator

from kvlib.replay.accounting import Accountant
from kvlib.replay.policies import PrefixLRU
from kvlib.replay.prepare import prepare_openai
from kvlib.replay.traces import TraceRequest
from kvlib.segment import DEFAULT_POLICY, SegmentPolicy, render_prompt

RESERVE = 64  # context tokens left for the answer (the server is sent max_tokens=1)
TRIM_RULE = (f"keep system messages and the last message; drop the oldest other messages until the prompt "
             f"leaves {RESERVE} tokens of the model's context; skip a request that still does not fit")
PREDICTIONS = ("library", "prefix_plus_library")
IDLE_TIMEOUT_S = 600.0  # longest wait for the server to store a request's misses before the next is sent


def fit_prompt(tokenizer, messages: list[dict], context: int, policy: SegmentPolicy = DEFAULT_POLICY):
    """(messages trimmed by TRIM_RULE, their rendered ids), or None when the request cannot fit."""
    msgs = list(messages)
    limit = context - RESERVE
    while len(ids := render_prompt(tokenizer, msgs, policy)) > limit:
        drop = next((i for i, m in enumerate(msgs[:-1]) if m.get("role") != "system"), None)
        if drop is None:
            return None
        del msgs[drop]
    return msgs, ids


@dataclass(frozen=True)
class Prediction:
    index: int
    session: str
    prompt_tokens: int
    library: int
    prefix_plus_library: int


def encoding_context_ids(tokenizer) -> list[int]:
    """E, the opening whose KV the server holds from the start (the engine's prompt template)."""
    from kvlib.engine.prompt import template_for

    return list(template_for(tokenizer).context_ids)


def predict(requests: Iterator[TraceRequest], tokenizer, context: int, policy: SegmentPolicy = DEFAULT_POLICY,
            prefix_tokens: int | None = None):
    """(prediction, trimmed messages) per request that fits, in order; and the count skipped.

    A prompt that opens with E is served E from the server's own cache: the `library`
    prediction counts E's tokens and not the segments inside it, which the server never looks up.
    prefix_tokens: the server's prefix cache budget in tokens (its /healthz `prefix_cache_tokens`;
    None: unbounded), which the prediction's prefix LRU then holds, evicting as the server does."""
    acc, skipped, e_ids = Accountant(None, "lru", keep_requests=False), [0], encoding_context_ids(tokenizer)
    acc.prefix = PrefixLRU(prefix_tokens)

    def gen():
        for i, req in enumerate(requests):
            fitted = fit_prompt(tokenizer, list(req.messages), context, policy)
            if fitted is None:
                skipped[0] += 1
                continue
            msgs, ids = fitted
            trimmed = TraceRequest(t=req.t, session=req.session, source=req.source, line=req.line, messages=tuple(msgs))
            prepared = prepare_openai(trimmed, tokenizer, policy)
            n_e = len(e_ids) if e_ids and ids[: len(e_ids)] == e_ids else 0
            inside_e = sum(p.tokens for p in prepared.pieces
                           if p.reusable and p.start + p.tokens <= n_e and p.key in acc.library)
            o = acc.observe(prepared)
            library = n_e + o.library_any - inside_e
            yield Prediction(i, req.session, o.tokens, library, o.prefix + o.library if o.prefix > n_e else library), msgs

    return gen(), skipped


def health_url(url: str) -> str:
    """The server's /healthz beside its OpenAI base URL (http://host:port/v1 -> http://host:port/healthz)."""
    base = url.rstrip("/")
    return (base[: -len("/v1")] if base.endswith("/v1") else base) + "/healthz"


def server_prefix_tokens(url: str) -> int | None:
    """The server's prefix cache budget in tokens, from its /healthz; None when it does not say
    (unreachable, or a server from before the prefix cache: the prediction is then unbounded)."""
    import httpx

    try:
        return httpx.get(health_url(url), timeout=10).json().get("prefix_cache_tokens")
    except (httpx.HTTPError, ValueError, AttributeError):
        return None


def wait_idle(url: str, timeout: float = IDLE_TIMEOUT_S, every: float = 0.2) -> bool:
    """Wait until the server has stored every miss and runs nothing; False on timeout.

    A server whose /healthz has no `pending_stores` cannot say so: a clear error, not a guess."""
    import httpx

    from kvlib.errors import InputError

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            health = httpx.get(health_url(url), timeout=10).json()
        except (httpx.HTTPError, ValueError):
            return False  # the request that follows fails too, and is counted as an error
        if "pending_stores" not in health:
            raise InputError(f"{health_url(url)} reports no pending_stores (an older kvlib serve?): "
                             "pass --no-live-wait to send requests without waiting for its stores")
        if health["pending_stores"] == 0 and health.get("waiting", 0) == 0 and health.get("running", 0) == 0:
            return True
        time.sleep(every)
    return False


def send(url: str, messages: list[dict], *, model: str = "default", api_key: str = "kvlib-replay", client=None):
    """One chat completion through the real openai client; returns the response as a dict."""
    import openai

    client = client or openai.OpenAI(base_url=url, api_key=api_key, max_retries=0, timeout=600)
    resp = client.chat.completions.create(model=model, messages=messages, max_tokens=1, temperature=0)
    return resp.model_dump()


def reported_usage(response: dict) -> tuple[int | None, int | None]:
    """(prompt_tokens, cached_tokens) of a recorded chat completion, parsed by the openai package's own types."""
    from openai.types.chat import ChatCompletion

    usage = ChatCompletion.model_validate(response).usage
    if usage is None:
        return None, None
    details = usage.prompt_tokens_details
    return usage.prompt_tokens, (details.cached_tokens if details is not None else None)


def compare(predictions: list[Prediction], responses: list[dict | None]) -> dict:
    """Per-request rows and, per prediction, exact-match share and mean absolute error.

    A None response is an error (counted); a response without cached_tokens counts as 0 cached,
    as OpenAI's API omits the details when nothing was cached."""
    rows, errors = [], 0
    for p, r in zip(predictions, responses):
        if r is None:
            errors += 1
            continue
        prompt, cached = reported_usage(r)
        rows.append({"index": p.index, "session": p.session, "predicted_prompt_tokens": p.prompt_tokens,
                     "reported_prompt_tokens": prompt, "reported_cached_tokens": cached or 0,
                     **{f"predicted_{name}": getattr(p, name) for name in PREDICTIONS}})
    comparisons = {}
    for name in PREDICTIONS:
        diffs = [abs(row[f"predicted_{name}"] - row["reported_cached_tokens"]) for row in rows]
        comparisons[name] = {"exact_share": sum(d == 0 for d in diffs) / len(diffs) if diffs else 0.0,
                             "exact": sum(d == 0 for d in diffs),
                             "mean_abs_error": sum(diffs) / len(diffs) if diffs else 0.0,
                             "predicted_total": sum(row[f"predicted_{name}"] for row in rows),
                             "reported_total": sum(row["reported_cached_tokens"] for row in rows)}
    same_prompt = sum(row["predicted_prompt_tokens"] == row["reported_prompt_tokens"] for row in rows)
    return {"requests": len(rows), "errors": errors, "prompt_tokens_match": same_prompt,
            "prompt_tokens_match_share": same_prompt / len(rows) if rows else 0.0,
            "comparisons": comparisons, "rows": rows}


def run_live(url: str, requests: Iterator[TraceRequest], tokenizer, context: int, *, model: str = "default",
             api_key: str | None = None, wait: bool = True, progress=None,
             policy: SegmentPolicy = DEFAULT_POLICY) -> dict:
    """Send every request that fits, in order, and compare; a failed request is an error row, not a crash.

    wait: before each request, wait until the server has stored the misses of the ones before."""
    import openai

    client = openai.OpenAI(base_url=url, api_key=api_key or "kvlib-replay", max_retries=0, timeout=600)
    prefix_tokens = server_prefix_tokens(url)
    stream, skipped = predict(requests, tokenizer, context, policy, prefix_tokens)
    preds, responses, error_examples, wait_timeouts = [], [], [], 0
    for pred, msgs in stream:
        if wait:
            wait_timeouts += not wait_idle(url)
        try:
            responses.append(send(url, msgs, model=model, client=client))
        except openai.OpenAIError as exc:
            responses.append(None)
            if len(error_examples) < 3:
                error_examples.append(f"request {pred.index}: {str(exc)[:200]}")
        preds.append(pred)
        if progress:
            progress(len(preds), pred.prompt_tokens)
    result = compare(preds, responses)
    return {"url": url, "trim_rule": TRIM_RULE, "waited_for_stores": wait, "wait_timeouts": wait_timeouts,
            "prefix_cache_tokens": prefix_tokens,
            "skipped_too_long": skipped[0], **result, "error_examples": error_examples}
