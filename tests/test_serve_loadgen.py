"""The load generator's sessions: documents accumulate, reorder and renumber across turns."""

from __future__ import annotations

import re

import pytest

from kvlib.serve.loadgen import HOTPOT, LoadConfig, build_sessions, markdown, summarize, turn_messages, Outcome

pytestmark = pytest.mark.skipif(not HOTPOT.is_file(), reason="shared/data/hotpotqa not beside the repo")
DOC_LINE = re.compile(r"^Document \[(\d+)\]\(Title: (.*?)\) ", re.M)


def test_sessions_accumulate_and_reorder_documents():
    cfg = LoadConfig(url="-", api_key="-", turns=3, seed=1)
    sessions = build_sessions(cfg, 4)
    assert build_sessions(cfg, 4)[2].turns == sessions[2].turns, "same seed, same sessions"
    reordered = 0
    for s in sessions:
        sizes = [len(t) for t in s.turns]
        assert sizes == [2, 4, 6], "two more documents each turn"
        for earlier, later in zip(s.turns, s.turns[1:]):
            assert set(earlier) <= set(later), "documents accumulate"
            reordered += [d for d in later if d in earlier] != earlier
    assert reordered >= 4, "most turns change the order of the documents already shown"
    messages = turn_messages(sessions[0], 2, ["first answer", "second answer"])
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant", "user"]
    numbers = [int(n) for n, _ in DOC_LINE.findall(messages[-1]["content"])]
    assert numbers == [1, 2, 3, 4, 5, 6], "documents are renumbered in the order sent"


def test_summary_and_markdown_are_well_formed():
    parts = {"http": 0.002, "segment": 0.003, "lookup": 0.004}
    outcomes = [Outcome("ok", ttft_s=0.5, e2e_s=1.0, prompt_tokens=100, cached_tokens=60, completion_tokens=8,
                        overhead_s=0.009, overhead_parts_s=parts),
                Outcome("ok", ttft_s=1.5, e2e_s=2.2, prompt_tokens=100, cached_tokens=0, completion_tokens=8),
                Outcome("429"), Outcome("error", detail="APIConnectionError")]
    s = summarize(4, outcomes, wall=4.0)
    assert (s["ok"], s["rate_limited"], s["errors"]) == (2, 1, 1)
    assert s["cached_share"] == 0.3 and s["requests_per_s"] == 0.5 and s["decode_tokens_per_s"] == 4.0
    assert s["ttft_p50_s"] in (0.5, 1.5) and s["ttft_p99_s"] == 1.5
    table = markdown({"levels": [s]}, "reuse", {"levels": [{**s, "requests_per_s": 0.1, "ttft_p99_s": 3.0}]})
    assert "| 4 | 2 | 1 | 1 |" in table and "5.00x" in table and "0.50x" in table
    assert s["server_overhead_parts_p50_ms"] == {"http": 2.0, "segment": 3.0, "lookup": 4.0}, "only measured requests"
    assert "| 9.0 | 2.0 / 3.0 / 4.0 |" in table
    assert s["tpot_p99_ms"] == 100.0 and s["tpot_p50_ms"] in (71.429, 100.0), "(e2e - TTFT) / (tokens - 1)"
    assert f"| {s['tpot_p50_ms']:.1f} / 100.0 |" in table
