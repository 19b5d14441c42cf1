"""`kvlib replay --live` against a real `kvlib serve` (SmolLM2, a real API key, the real openai client).

The trace is built by `kvlib replay-sessions` from examples/corpus: multi-turn sessions whose
documents accumulate and reorder, plus one request that opens with the engine's encoding context
E (kvlib's own system prompt), whose KV the server holds from the start. Replay waits for the
server's /healthz `pending_stores` to reach 0 before each request, so the library holds exactly
what the accounting assumes, and every request's prediction is well-defined: each must match.
"""

from __future__ import annotations

import json

import pytest

from serve_helpers import REPO_ROOT, Server, add_key, new_home, run_kvlib, wait_until

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def live_run(tmp_path_factory, smol_home):
    from kvlib.engine.model import SYSTEM_PROMPT

    tmp = tmp_path_factory.mktemp("replay-live")
    trace = tmp / "sessions.jsonl"
    built = run_kvlib("replay-sessions", trace, "--corpus", REPO_ROOT / "examples" / "corpus",
                      "--sessions", 2, "--turns", 3)
    assert built.returncode == 0, built.stderr
    lines = [json.loads(x) for x in trace.read_text().splitlines()]
    last = lines[-1]["body"]["messages"][-1]
    lines.append({"session": "opens-with-E", "type": "request", "body": {"model": "default", "messages": [
        {"role": "system", "content": SYSTEM_PROMPT}, last]}})
    trace.write_text("".join(json.dumps(x) + "\n" for x in lines))
    home = new_home(tmp, smol_home)
    server = Server(home)
    try:
        key = add_key(home, "replayer")
        out = tmp / "out"
        done = run_kvlib("replay", trace, "--live", server.url + "/v1", "--api-key", key, "--no-cost",
                         "--home", home, "--out", out, timeout=1800)
        # the last request's misses are stored after replay has finished: the count must come back to 0
        health = wait_until(lambda: (h := server.health())["pending_stores"] == 0 and h, 600, "pending_stores 0")
    finally:
        server.stop()
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads((out / "replay.json").read_text()), done.stdout, health, len(lines)


def test_every_request_is_answered_and_rendered_alike(live_run):
    result, _, _, n = live_run
    live = result["live"]
    assert (live["requests"], live["errors"], live["skipped_too_long"]) == (n, 0, 0), live["error_examples"]
    assert live["waited_for_stores"] and live["wait_timeouts"] == 0
    for row in live["rows"]:
        assert row["reported_prompt_tokens"] == row["predicted_prompt_tokens"], (
            f"request {row['index']}: the server rendered {row['reported_prompt_tokens']} prompt tokens, "
            f"replay {row['predicted_prompt_tokens']}: the two sides do not render the same ids")


def test_cached_tokens_equal_the_prefix_plus_library_prediction(live_run):
    """Exact, request by request: with the stores waited for, nothing is left to timing. The server
    runs its defaults: its prefix cache first, the library beyond it."""
    result, stdout, _, _ = live_run
    rows = result["live"]["rows"]
    wrong = [(r["index"], r["predicted_prefix_plus_library"], r["reported_cached_tokens"]) for r in rows
             if r["predicted_prefix_plus_library"] != r["reported_cached_tokens"]]
    assert not wrong, f"(request, predicted, reported cached tokens) that disagree: {wrong}"
    assert rows[0]["reported_cached_tokens"] == 0, "the first request has nothing to reuse"
    reusing = [r for r in rows[1:] if r["reported_cached_tokens"] > 0]
    assert len(reusing) >= 3, f"later turns must reuse earlier documents; cached tokens: {[r['reported_cached_tokens'] for r in rows]}"
    both = result["live"]["comparisons"]["prefix_plus_library"]
    assert both["exact"] == len(rows) and both["predicted_total"] == both["reported_total"] > 0
    assert any(r["predicted_prefix_plus_library"] > r["predicted_library"] for r in rows), \
        "the sessions' later turns open with their history: the prefix cache must add to the library"


def test_a_prompt_opening_with_e_is_credited_e(live_run, smol_home):
    from kvlib.replay.live import encoding_context_ids
    from kvlib.replay.shape import load_tokenizer_and_shape

    result, _, _, _ = live_run
    row = result["live"]["rows"][-1]
    n_e = len(encoding_context_ids(load_tokenizer_and_shape(None, smol_home)[0]))
    assert row["session"] == "opens-with-E" and n_e > 0
    # the same documents as the request before it, now behind E: E plus the documents, all cached
    assert row["reported_cached_tokens"] == row["predicted_prefix_plus_library"] >= n_e + 32


def test_pending_stores_comes_back_to_zero(live_run):
    _, _, health, _ = live_run
    assert health["pending_stores"] == 0 and health["waiting"] == 0 and health["running"] == 0
