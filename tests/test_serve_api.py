"""`kvlib serve` through the real openai client, against one server on a free port.

The server runs with --max-queue 1 and --max-batch 1 so that the queue tests can fill it with two requests.
Completions are short (a few greedy tokens): the point is the protocol, not the answers.
"""

from __future__ import annotations

import json
import threading

import httpx
import openai
import pytest

from serve_helpers import Server, add_key, new_home, wait_until

pytestmark = pytest.mark.slow
HELLO = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
LONG = [{"role": "user", "content": "Count from 1 to 500, one number per line."}]


@pytest.fixture(scope="module")
def server(tmp_path_factory, smol_home):
    home = new_home(tmp_path_factory.mktemp("serve-api"), smol_home)
    srv = Server(home, "--max-queue", "1", "--max-batch", "1", "--max-body-mb", "1")
    srv.key = add_key(home, "alice")
    yield srv
    srv.stop()


def test_models_lists_the_loaded_model(server):
    models = server.client(server.key).models.list().data
    assert [m.id for m in models] == ["SmolLM2-135M-Instruct"]


def test_non_streaming_and_streaming_agree(server):
    client = server.client(server.key)
    full = client.chat.completions.create(model="default", messages=HELLO, max_tokens=6, temperature=0)
    assert full.choices[0].finish_reason in ("stop", "length") and full.choices[0].message.content
    u = full.usage
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens and u.prompt_tokens > 10
    assert u.prompt_tokens_details.cached_tokens == 0  # a short chat with its own opening: nothing to reuse
    assert full.model_extra["kvlib"]["segments"], "the kvlib object says what became of the prompt"
    chunks = list(client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=HELLO, max_tokens=6,
                                                 temperature=0, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content, "greedy decoding must give the same text streamed or not"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == u.completion_tokens
    assert "kvlib" in chunks[-1].model_extra, "the kvlib object rides on the last chunk"


def test_stream_ends_with_done(server):
    body = {"model": "default", "messages": HELLO, "max_tokens": 3, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=120,
                      headers={"Authorization": f"Bearer {server.key}"}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["object"] == "chat.completion.chunk"


@pytest.mark.parametrize("key", ["kvl-not-a-real-key", None])
def test_bad_or_missing_key_is_401(server, key):
    with pytest.raises(openai.AuthenticationError) as err:
        server.client(key).chat.completions.create(model="default", messages=HELLO, max_tokens=2)
    assert err.value.status_code == 401 and err.value.body["type"] == "authentication_error"


@pytest.mark.parametrize("body, code", [
    (b"{not json", "invalid_json"),
    (b"[1, 2]", "invalid_request"),
    (b'{"model": "default"}', "invalid_value"),
    (b'{"model": "default", "messages": [{"role": "user", "content": "hi"}], "bogus": 1}', "unsupported_parameter"),
    (b"x" * (1 << 20 + 1), "request_too_large"),
])
def test_bad_bodies_get_openai_error_objects(server, body, code):
    r = httpx.post(server.url + "/v1/chat/completions", content=body, timeout=60,
                   headers={"Authorization": f"Bearer {server.key}", "Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == code and error["type"] == "invalid_request_error" and error["message"]


@pytest.mark.parametrize("extra, param", [({"n": 2}, "n"), ({"logprobs": True}, "logprobs"),
                                          ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools")])
def test_answer_changing_fields_are_refused(server, extra, param):
    with pytest.raises(openai.BadRequestError) as err:
        server.client(server.key).chat.completions.create(model="default", messages=HELLO, max_tokens=2, **extra)
    assert err.value.body["param"] == param and err.value.body["code"] == "unsupported_parameter"


def test_unknown_model_is_404(server):
    with pytest.raises(openai.NotFoundError) as err:
        server.client(server.key).chat.completions.create(model="gpt-4o", messages=HELLO, max_tokens=2)
    assert err.value.body["code"] == "model_not_found"


def test_over_long_prompt_is_context_length_exceeded(server):
    words = [{"role": "user", "content": "word " * 9000}]  # SmolLM2's context is 8192 tokens
    with pytest.raises(openai.BadRequestError) as err:
        server.client(server.key).chat.completions.create(model="default", messages=words, max_tokens=2)
    assert err.value.body["code"] == "context_length_exceeded"


def test_queue_full_is_429_and_cancelled_streams_free_their_slots(server):
    client = server.client(server.key, timeout=300)
    cancelled_before = server.metric("kvlib_chat_completions_total", finish_reason="cancelled")
    running = client.chat.completions.create(model="default", messages=LONG, max_tokens=400, temperature=0,
                                             stream=True)
    next(iter(running))  # the role chunk
    wait_until(lambda: server.health()["running"] == 1, 60, "the long request to reach the engine")
    queued_stream = client.chat.completions.create(model="default", messages=HELLO, max_tokens=3, stream=True)
    next(iter(queued_stream))
    wait_until(lambda: server.health()["waiting"] == 1, 60, "the second request to wait in the queue")
    with pytest.raises(openai.RateLimitError) as err:
        client.chat.completions.create(model="default", messages=HELLO, max_tokens=2)
    assert int(err.value.response.headers["Retry-After"]) >= 1 and err.value.body["code"] == "queue_full"
    queued_stream.close()  # a client leaves while it waits: its slot frees without reaching the engine
    wait_until(lambda: server.health()["waiting"] == 0, 10, "the abandoned queued stream to leave the queue")
    queued: dict = {}
    waiter = threading.Thread(target=lambda: queued.setdefault("r", client.chat.completions.create(
        model="default", messages=HELLO, max_tokens=3, temperature=0)))
    waiter.start()
    wait_until(lambda: server.health()["waiting"] == 1, 60, "a new request to take the freed slot")
    running.close()  # the client goes away mid-generation
    wait_until(lambda: server.metric("kvlib_chat_completions_total", finish_reason="cancelled") > cancelled_before,
               30, "the engine to stop the abandoned stream")
    waiter.join(120)
    assert queued["r"].choices[0].message.content, "the waiting request got the engine and an answer"
    assert server.health()["waiting"] == 0


def test_metrics_exposes_the_serving_figures(server):
    server.client(server.key).chat.completions.create(model="default", messages=HELLO, max_tokens=1)
    assert httpx.post(server.url + "/v1/chat/completions", json={}, timeout=10).status_code == 401
    text = httpx.get(server.url + "/metrics", timeout=10).text
    for name in ("kvlib_http_requests_total", "kvlib_time_to_first_token_seconds_bucket",
                 'kvlib_prompt_tokens_total{source="cached"}', 'kvlib_prompt_tokens_total{source="computed"}',
                 'kvlib_prompt_tokens_total{source="recomputed"}', "kvlib_queue_depth_requests",
                 "kvlib_library_bytes", "kvlib_prefix_cache_bytes"):
        assert name in text, f"{name} missing from /metrics"
    assert server.metric("kvlib_prompt_tokens_total", source="computed") > 0
    assert server.metric("kvlib_prefix_cache_bytes") > 0, "the answered prompt's KV is kept for its next turn"
    assert server.metric("kvlib_http_requests_total", route="/v1/chat/completions", status="401") >= 1


def test_loadgen_runs_against_the_server(server, tmp_path):
    """Benchmarks are not tests: this checks that a tiny bounded run completes and reports well-formed numbers."""
    from kvlib.serve.loadgen import HOTPOT, LoadConfig, run_load, write_report

    if not HOTPOT.is_file():
        pytest.skip("shared/data/hotpotqa not beside the repo")
    cfg = LoadConfig(url=server.url + "/v1", api_key=server.key, levels=[1], sessions=1, turns=2, max_tokens=2,
                     max_seconds=120)
    result = run_load(cfg, progress=lambda line: None)
    (level,) = result["levels"]
    assert level["ok"] == 2 and level["errors"] == 0, level
    assert level["prompt_tokens"] > 200 and 0.0 <= level["cached_share"] <= 1.0
    assert level["ttft_p50_s"] > 0 and level["requests_per_s"] > 0
    assert 0 < level["client_build_p50_ms"] < 1e3 * level["ttft_p50_s"], "the send hook fired before the first token"
    assert level["server_overhead_p50_ms"] is not None
    paths = write_report(result, "reuse", tmp_path)
    assert all(paths[k].stat().st_size > 0 for k in ("json", "md", "png"))


def test_stop_string_ends_the_completion_before_it(server):
    client = server.client(server.key)
    plain = client.chat.completions.create(model="default", messages=LONG, max_tokens=12, temperature=0)
    assert "3" in plain.choices[0].message.content, "the model counts past 3 within 12 tokens"
    cut = client.chat.completions.create(model="default", messages=LONG, max_tokens=12, temperature=0, stop=["3"])
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="default", messages=LONG, max_tokens=12, temperature=0, stop=["3"], stream=True) if c.choices)
    text = cut.choices[0].message.content
    assert cut.choices[0].finish_reason == "stop" and text == plain.choices[0].message.content.split("3")[0]
    assert streamed == text, "held-back text is released, and the stop string never streamed"
