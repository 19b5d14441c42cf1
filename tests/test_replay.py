"""Replay on segment traces: readers, hand-worked accounting, eviction policies, capacity, the CLI."""

import json
from pathlib import Path

import pytest

from kvlib.errors import InputError
from kvlib.replay.accounting import Accountant
from kvlib.replay.api import parse_capacity
from kvlib.replay.policies import LibraryCost, LibraryLRU, flop_cost
from kvlib.replay.prepare import prepare_segments
from kvlib.replay.run import ReplayConfig, run_replay
from kvlib.replay.shape import SMOLLM2
from kvlib.replay.traces import FileStats, TraceRequest, SegmentRef, read_file, read_traces

RAGPULSE = Path(__file__).resolve().parents[2] / "shared" / "data" / "ragpulse" / "ragpulse-dev.jsonl"


def seg_request(*segs, t=0.0, session="s"):
    """segs: (id, tokens) pairs; kind from the id's first letter."""
    refs = tuple(SegmentRef(kind={"s": "system", "q": "question"}.get(i[0], "passage"), id=i, tokens=n) for i, n in segs)
    return TraceRequest(t=t, session=session, source="test", line=0, segments=refs)


def account(requests, capacity=None, policy="lru"):
    acc = Accountant(capacity, policy, attn_per_ctx_token=SMOLLM2.attn_ratio)
    return acc, [acc.observe(prepare_segments(r)) for r in requests]


def split(o):
    return o.prefix, o.library, o.new


def test_reordered_repeat():
    # The system prompt is a cached prefix; A and B come back in the other order, which only the library serves.
    _, (first, second) = account([seg_request(("sys", 64), ("A", 100), ("B", 100), ("q1", 10)),
                                  seg_request(("sys", 64), ("B", 100), ("A", 100), ("q2", 10))])
    assert split(first) == (0, 0, 274)
    assert split(second) == (64, 200, 10)


def test_shifted_repeat():
    # A new segment in front: no prefix at all, A and B found at their new positions.
    _, (_, second) = account([seg_request(("sys", 64), ("A", 100), ("B", 100)),
                              seg_request(("X", 40), ("sys", 64), ("A", 100), ("B", 100))])
    assert split(second) == (0, 264, 40)


def test_repeat_after_eviction():
    # 150 tokens of capacity: B evicts A from both caches, so A's return is new again.
    _, outs = account([seg_request(("A", 100)), seg_request(("B", 100)), seg_request(("A", 100))], capacity=150)
    assert [split(o) for o in outs] == [(0, 0, 100), (0, 0, 100), (0, 0, 100)]
    _, outs = account([seg_request(("A", 100)), seg_request(("B", 100)), seg_request(("A", 100))], capacity=200)
    assert split(outs[2]) == (100, 0, 0)  # room for both: the prefix cache serves it first


def test_short_segments_are_not_library_hits():
    # 10 tokens is under the policy's min_tokens (32): not worth a lookup, so it stays new.
    _, (_, second) = account([seg_request(("A", 100), ("q", 10)), seg_request(("B", 50), ("q", 10))])
    assert split(second) == (0, 0, 60)


def test_fixed_chunk_baseline_needs_alignment():
    # A 256-token segment after another 256-token one: aligned, so the fixed matcher finds it;
    # shifted by 10 tokens, it finds nothing, while the library still does.
    _, (_, aligned) = account([seg_request(("X", 256), ("A", 256)), seg_request(("Y", 256), ("A", 256))])
    assert aligned.fixed == 256 and aligned.library == 256
    _, (_, shifted) = account([seg_request(("X", 256), ("A", 256)), seg_request(("Y", 266), ("A", 256))])
    assert shifted.fixed == 0 and shifted.library == 256


def test_shares_total_and_by_kind_add_up():
    acc, _ = account([seg_request(("sys", 64), ("A", 100), ("q1", 10), session="u1"),
                      seg_request(("sys", 64), ("A", 100), ("q2", 10), session="u2"),
                      seg_request(("sys", 64), ("B", 100), ("A", 100), ("q3", 10), session="u1")])
    t = acc.tally.total
    assert (t["tokens"], t["prefix"], t["library"], t["new"]) == (622, 228, 100, 294)
    assert sum(k["tokens"] for k in acc.tally.by_kind.values()) == 622
    assert acc.tally.by_kind["system"]["prefix"] == 128 and acc.tally.by_kind["passage"]["library"] == 100
    assert acc.tally.by_session["u1"][:2] == [2, 448]


def test_cost_aware_keeps_the_often_reused_segment_lru_does_not():
    lru, cost = LibraryLRU(200), LibraryCost(200, flop_cost(0.0))
    for lib in (lru, cost):
        lib.add(b"A", 100, 0)
        lib.hit(b"A", 0)
        lib.hit(b"A", 0)
        lib.add(b"B", 100, 0)
        lib.hit(b"B", 0)  # B is the most recent, A the most reused
        lib.add(b"C", 100, 0)
    assert b"A" not in lru and b"B" in lru and b"C" in lru
    # GDSF: the newcomer has one use against A's three and B's two, so it goes first.
    assert b"A" in cost and b"B" in cost and b"C" not in cost


def test_cost_aware_prefers_segments_at_late_positions():
    cost = LibraryCost(200, flop_cost(SMOLLM2.attn_ratio))
    cost.add(b"late", 100, 4000)  # recomputing it attends to 4,000 more tokens
    cost.add(b"early", 100, 0)
    cost.add(b"new", 100, 0)
    assert b"late" in cost and b"early" not in cost


def test_an_entry_larger_than_the_capacity_is_never_admitted():
    for lib in (LibraryLRU(50), LibraryCost(50, flop_cost(0.0))):
        lib.add(b"big", 100, 0)
        assert b"big" not in lib and lib.used == 0


@pytest.mark.parametrize("text, tokens", [("200000tok", 200_000), ("23040", 1), ("1GiB", 2**30 // 23040),
                                          ("2.5MB", 2_500_000 // 23040)])
def test_capacity_parses_bytes_or_tokens(text, tokens):
    assert parse_capacity(text, 23040).tokens == tokens


@pytest.mark.parametrize("text", ["lots", "100 parsecs", "10"])
def test_bad_capacity_is_one_line_error(text):
    with pytest.raises(InputError, match="capacity"):
        parse_capacity(text, 23040)


def write(tmp_path: Path, name: str, lines: list) -> Path:
    p = tmp_path / name
    p.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return p


def test_segment_trace_with_malformed_lines_is_counted_not_fatal(tmp_path):
    good = {"t": 1.0, "session": "a", "segments": [{"kind": "passage", "id": 7, "tokens": 50}]}
    path = write(tmp_path, "seg.jsonl", [good, "{not json", {"t": 2, "segments": []},
                                         {"t": 3, "segments": [{"kind": "p", "id": 1, "tokens": -4}]},
                                         {"t": 4, "segments": [{"kind": "p", "tokens": 5}]}, "", good])
    stats = FileStats(path=str(path))
    reqs = list(read_file(path, stats))
    assert len(reqs) == 2 and stats.malformed == 4 and stats.form == "segments"
    assert stats.examples[0].startswith("line 2: not JSON")
    assert reqs[0].segments == (SegmentRef("passage", "7", 50),)


def test_a_file_of_neither_form_is_refused(tmp_path):
    path = write(tmp_path, "other.jsonl", [{"prompt": "hi"}, "plain text"])
    with pytest.raises(InputError, match="neither an OpenAI request log .* nor a segment trace"):
        read_traces([path])


def test_files_merge_in_time_order(tmp_path):
    a = write(tmp_path, "a.jsonl", [{"t": t, "segments": [{"id": f"a{t}", "tokens": 1}]} for t in (1, 5, 9)])
    b = write(tmp_path, "b.jsonl", [{"t": t, "segments": [{"id": f"b{t}", "tokens": 1}]} for t in (2, 3, 10)])
    stream, _ = read_traces([a, b])
    assert [r.t for r in stream] == [1, 2, 3, 5, 9, 10]


NO_TRACE = pytest.mark.skipif(not RAGPULSE.exists(), reason="shared RAGPulse trace not beside the repo")


@NO_TRACE
def test_ragpulse_replay_and_sweep(tmp_path):
    result, acc = run_replay([RAGPULSE], tokenizer=None, shape=SMOLLM2, config=ReplayConfig(sweep=True,
                             fractions=(0.1, 1.0)), work_dir=tmp_path)
    t = result["total"]
    assert t["requests"] == 1000 and abs(t["prefix_share"] + t["library_share"] + t["new_share"] - 1) < 1e-9
    unbounded = result["sweep"][-1]["lru"]
    # At 100% of the unique bytes nothing the library holds is ever evicted: same as unbounded.
    assert unbounded["library_share"] == pytest.approx(t["library_share"])
    assert not (tmp_path / ".replay-spool.pkl").exists()


@NO_TRACE
def test_cli_replay_writes_reports_and_fails_cleanly(tmp_path):
    from typer.testing import CliRunner

    from kvlib.cli.app import app

    runner = CliRunner()
    out = tmp_path / "out"
    res = runner.invoke(app, ["replay", str(RAGPULSE), "--out", str(out), "--no-cost", "--capacity", "100000tok",
                              "--policy", "cost", "--home", str(tmp_path / "home")])
    assert res.exit_code == 0, res.output
    data = json.loads((out / "replay.json").read_text())
    assert set(data["total"]) == {"prefix_share", "library_share", "new_share", "tokens", "requests"}
    assert data["config"]["capacity_tokens"] == 100000 and data["config"]["policy"] == "cost"
    assert (out / "replay.md").exists() and (out / "shares_over_time.png").exists()
    bad = write(tmp_path, "bad.jsonl", [{"prompt": "x"}])
    res = runner.invoke(app, ["replay", str(bad), "--out", str(out), "--no-cost"])
    assert res.exit_code == 1 and "neither an OpenAI request log" in res.output
    res = runner.invoke(app, ["replay", str(RAGPULSE), "--out", str(out), "--no-cost", "--policy", "fifo"])
    assert res.exit_code == 1 and "unknown policy" in res.output


@pytest.mark.parametrize("command", ["replay", "replay-sessions", "replay-segstats", "replay-synth"])
def test_every_replay_command_has_help(command):
    from typer.testing import CliRunner

    from kvlib.cli.app import app

    res = CliRunner().invoke(app, [command, "--help"])
    assert res.exit_code == 0 and "Usage" in res.output, res.output


def test_bad_segment_policy_is_one_line_error(tmp_path):
    from typer.testing import CliRunner

    from kvlib.cli.app import app

    res = CliRunner().invoke(app, ["replay", str(RAGPULSE), "--out", str(tmp_path), "--no-cost", "--segment", "1/2"])
    assert res.exit_code == 1 and "segment policy '1/2'" in res.output, res.output
