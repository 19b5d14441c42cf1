"""Replay on OpenAI request logs (real SmolLM2 tokenizer, no weights), the live comparison, the sessions."""

import json
from pathlib import Path

import pytest

from kvlib.replay.accounting import Accountant
from kvlib.replay.live import compare, fit_prompt, predict, reported_usage
from kvlib.replay.prepare import PREFIX_BLOCK, prepare_openai
from kvlib.replay.sessions import SessionSpec, build_sessions
from kvlib.replay.traces import FileStats, TraceRequest, read_file
from kvlib.segment import segment_key, segment_prompt

ROOT = Path(__file__).resolve().parents[1]
HOTPOTQA = ROOT.parent / "shared" / "data" / "hotpotqa" / "qa_train.json"
PASSAGES = [
    ("Ostrand", "Ostrand is the capital of Varnholm, on the estuary of the Melk. Its harbour handles most of the "
                "island's freight, and its old town is built on the slopes above the river mouth."),
    ("Brennock", "Brennock is a fishing town on the north coast whose cooperative was founded in 1897 after a "
                 "storm drowned eleven of its men. The cooperative still sets the quotas for the herring."),
    ("Kell", "Kell lies inland at the head of the Melk valley, where the railway from Ostrand opened in 1866 "
             "and brought the quarries of Vell within a day of the coast."),
]


@pytest.fixture(scope="session")
def tok(smol_home):
    from kvlib.replay.shape import load_tokenizer_and_shape

    return load_tokenizer_and_shape(None, smol_home)[0]


def rag_messages(order, question):
    docs = "\n".join(f"Document [{i}](Title: {PASSAGES[j][0]}) {PASSAGES[j][1]}" for i, j in enumerate(order, 1))
    return [{"role": "system", "content": "Answer from the documents."},
            {"role": "user", "content": f"{docs}\n\nQuestion: {question}"}]


def request(messages, session="s"):
    return TraceRequest(t=None, session=session, source="test", line=0, messages=tuple(messages))


def test_reordered_documents_hand_worked(tok):
    """Expected shares derived from the ids: the prefix is the common head in whole 16-token blocks;
    the library serves every reusable segment of the second prompt seen in the first, beyond it."""
    first, second = rag_messages([0, 1, 2], "Where is Kell?"), rag_messages([2, 0, 1], "Where is Ostrand?")
    ids1, segs1 = segment_prompt(tok, first)
    ids2, segs2 = segment_prompt(tok, second)
    common = next(i for i, (a, b) in enumerate(zip(ids1, ids2)) if a != b)
    prefix = common // PREFIX_BLOCK * PREFIX_BLOCK
    seen = {segment_key(s.token_ids) for s in segs1 if s.reusable}
    library = sum(s.end - max(s.start, prefix) for s in segs2
                  if s.reusable and segment_key(s.token_ids) in seen and s.end > prefix)
    assert library >= sum(len(s.token_ids) for s in segs2 if s.kind == "document") - prefix  # all three documents
    acc = Accountant()
    acc.observe(prepare_openai(request(first), tok))
    out = acc.observe(prepare_openai(request(second), tok))
    assert (out.tokens, out.prefix, out.library) == (len(ids2), prefix, library)
    assert out.new == len(ids2) - prefix - library and out.fixed == 0


def test_a_document_in_its_other_spacing_is_served_all_but_its_first_word(tok):
    """Pasted as a block of its own, then behind a `Document [n](Title: T)` header on the same line
    (first token spaced): as the server does, the library serves the tail the two forms share, and
    stores nothing for the header form, so a third request in that form is served the same way."""
    from kvlib.segment import spacing_variant

    blocks = [{"role": "user", "content": "\n\n".join(p for _, p in PASSAGES) + "\n\nQuestion: Where is Kell?"}]
    headed = rag_messages([2, 0, 1], "Where is Ostrand?")
    _, segs1 = segment_prompt(tok, blocks)
    _, segs2 = segment_prompt(tok, headed)
    seen = {s.token_ids for s in segs1 if s.reusable}
    docs = [s for s in segs2 if s.kind == "document" and s.reusable]
    assert docs and not seen & {s.token_ids for s in docs}, "the header form's ids differ"
    tails = [spacing_variant(tok, s.token_ids) for s in docs]
    expected = sum(shared for alt, shared in filter(None, tails) if alt in seen)
    assert expected >= sum(len(s.token_ids) for s in docs) - 4 * len(docs), "every document but its first word"
    acc = Accountant()
    acc.observe(prepare_openai(request(blocks), tok))
    second = acc.observe(prepare_openai(request(headed), tok))
    third = acc.observe(prepare_openai(request(headed), tok))
    assert (second.prefix, second.library, second.library_any) == (0, expected, expected)
    assert third.library_any == expected + sum(len(s.token_ids) for s in segs2 if s.reusable and s.kind != "document"
                                               and s.token_ids not in seen), "the header forms were not stored"


def test_openai_log_forms_types_timestamps_and_malformed_lines(tmp_path):
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    lines = [json.dumps(body),
             json.dumps({"type": "request", "timestamp_utc": "2025-01-01T00:00:01Z", "session_id": "x", "body": body}),
             json.dumps({"type": "response", "timestamp_utc": "2025-01-01T00:00:02Z", "body": {"choices": []}}),
             json.dumps({"type": "request", "timestamp": "yesterday", "body": body}),
             json.dumps({"body": {"model": "m", "messages": [{"content": "no role"}]}}),
             json.dumps({"messages": [{"role": "user", "content": 5}]}),
             "[1, 2",
             json.dumps({"type": "request", "timestamp_rel_s": 3.5, "body": {**body, "user": "u9"}})]
    path = tmp_path / "log.jsonl"
    path.write_text("\n".join(lines) + "\n")
    stats = FileStats(path=str(path))
    reqs = list(read_file(path, stats))
    assert stats.form == "openai" and (stats.requests, stats.skipped, stats.malformed) == (3, 1, 4)
    assert reqs[1].t == pytest.approx(1735689601.0) and reqs[1].session == "x" and reqs[2].session == "u9"
    assert any("yesterday" in e for e in stats.examples)


def completion(prompt_tokens, cached):
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": 1, "total_tokens": prompt_tokens + 1}
    if cached is not None:
        usage["prompt_tokens_details"] = {"cached_tokens": cached}
    return {"id": "c", "object": "chat.completion", "created": 0, "model": "m", "usage": usage,
            "choices": [{"index": 0, "finish_reason": "length", "message": {"role": "assistant", "content": "x"}}]}


def test_live_comparison_on_recorded_responses(tok):
    msgs = [rag_messages([0, 1, 2], "Where is Kell?"), rag_messages([1, 2, 0], "Where is Kell?")]
    stream, skipped = predict(iter([request(m) for m in msgs]), tok, context=8192)
    preds = [p for p, _ in stream]
    assert skipped[0] == 0 and preds[0].library == 0 and preds[1].library > 0
    responses = [completion(preds[0].prompt_tokens, None), completion(preds[1].prompt_tokens, preds[1].library - 16)]
    result = compare(preds, responses + [None])
    lib = result["comparisons"]["library"]
    assert result["requests"] == 2 and result["errors"] == 0 and result["prompt_tokens_match_share"] == 1.0
    assert lib["exact_share"] == 0.5 and lib["mean_abs_error"] == 8.0
    assert reported_usage(responses[0]) == (preds[0].prompt_tokens, None)


def test_trim_drops_oldest_turns_then_gives_up(tok):
    history = [{"role": "system", "content": "Be brief."}]
    for i in range(6):
        history += [{"role": "user", "content": f"Question {i} " * 30}, {"role": "assistant", "content": "Answer " * 30}]
    last = {"role": "user", "content": "Final question?"}
    trimmed = fit_prompt(tok, history + [last], context=400)[0]
    assert trimmed[0] == history[0] and trimmed[-1] == last and len(trimmed) < len(history) + 1
    kept = trimmed[1:-1]
    assert kept == history[len(history) - len(kept):]  # the newest turns survive
    assert fit_prompt(tok, [history[0], {"role": "user", "content": "long " * 500}], context=300) is None


@pytest.mark.skipif(not HOTPOTQA.exists(), reason="shared HotpotQA data not beside the repo")
def test_sessions_accumulate_and_reorder_documents():
    lines = build_sessions(SessionSpec(hotpotqa=HOTPOTQA, corpus=ROOT / "examples" / "corpus", sessions=3, turns=3))
    assert len(lines) == 18 and [x["timestamp_rel_s"] for x in lines] == sorted(x["timestamp_rel_s"] for x in lines)
    by_session = {}
    for line in lines:
        by_session.setdefault(line["session"], []).append(line["body"]["messages"][-1]["content"])
    reordered = 0
    for turns in by_session.values():
        docs = [[p for p in t.split("\n") if p.strip()] for t in turns]
        assert len(docs[0]) < len(docs[1]) < len(docs[2])
        reordered += any(a != b for a, b in zip(docs[1], docs[2]))
    assert reordered >= 3, "documents keep their slots in most sessions: nothing to reorder"


def test_replay_cuts_prompts_with_the_shared_segmenter_unchanged(tok):
    """What replay accounts is segment_prompt's output itself (the function serve imports), key for key."""
    messages = rag_messages([2, 0, 1], "Where is Brennock?")
    ids, segments = segment_prompt(tok, messages)
    prepared = prepare_openai(request(messages), tok)
    assert prepared.tokens == len(ids)
    assert [(p.kind, p.key, p.start, p.tokens, p.reusable) for p in prepared.pieces] == [
        (s.kind, segment_key(s.token_ids), s.start, len(s.token_ids), s.reusable) for s in segments]


def test_a_request_the_segmenter_refuses_is_a_malformed_line(tmp_path, tok):
    from kvlib.replay.run import ReplayConfig, run_replay
    from kvlib.replay.shape import SMOLLM2

    good = {"messages": [{"role": "user", "content": "hello there"}]}
    image = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}
    path = tmp_path / "log.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in (good, image, good)) + "\n")
    result, _ = run_replay([path], tokenizer=tok, shape=SMOLLM2, config=ReplayConfig(), work_dir=tmp_path)
    (stats,) = result["inputs"]
    assert result["total"]["requests"] == 2 and stats["requests"] == 2 and stats["malformed"] == 1
    assert "line 2: cannot render" in stats["malformed_examples"][0]


def test_live_against_no_server_counts_errors_and_does_not_crash(tok):
    """The real openai client against a closed local port: every request is an error row, the run completes."""
    import socket

    from kvlib.replay.live import run_live

    with socket.socket() as s:  # a port that was free a moment ago and has no listener now
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    reqs = [request(rag_messages([0, 1], "Where is Kell?")), request(rag_messages([1, 0], "Where is Kell?"))]
    result = run_live(f"http://127.0.0.1:{port}/v1", iter(reqs), tok, context=8192)
    assert result["errors"] == 2 and result["requests"] == 0 and result["skipped_too_long"] == 0


@pytest.mark.parametrize("url, expected", [
    ("http://127.0.0.1:8000/v1", "http://127.0.0.1:8000/healthz"),
    ("http://127.0.0.1:8000/v1/", "http://127.0.0.1:8000/healthz"),
    ("http://h:9/", "http://h:9/healthz")])
def test_health_url_sits_beside_the_openai_base(url, expected):
    from kvlib.replay.live import health_url

    assert health_url(url) == expected


def test_waiting_on_a_server_that_cannot_report_its_stores_is_a_clear_error():
    """A real HTTP server whose /healthz has no pending_stores (as kvlib serve before it had one)."""
    import http.server
    import threading

    from kvlib.errors import InputError
    from kvlib.replay.live import wait_idle

    class OldHealth(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps({"status": "ok", "waiting": 0, "running": 0}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), OldHealth)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        with pytest.raises(InputError, match="pending_stores.*--no-live-wait"):
            wait_idle(f"http://127.0.0.1:{httpd.server_address[1]}/v1", timeout=5)
    finally:
        httpd.shutdown()
        httpd.server_close()
