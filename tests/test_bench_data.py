"""Evaluation-data parsing: both forms, every container, bad records reported and skipped."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from kvlib.bench.data import Passage, QARecord, load_records, permute
from kvlib.errors import InputError

# DESIGN.md §4: the shared data lies beside the checkout, at ../shared/data/hotpotqa/.
HOTPOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "hotpotqa" / "qa_train.json"

CTX_RECORD = {
    "id": "q1",
    "question": "Where was the author of X educated?",
    "answers": ["Exeter College", "Exeter"],
    "ctxs": [{"title": "X", "text": "X is a play written by Y."}, {"text": " Y studied at Exeter College. "}],
}
HOTPOT_RECORD = {
    "_id": "h1",
    "question": "Which came first?",
    "answer": "yes",
    "context": [["Alpha", ["Alpha is one.", " It has \"two", "\" parts."]], ["Beta", ["Beta is two."]]],
}


def write_json(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj))
    return path


def write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


def test_ctxs_json_list(tmp_path):
    res = load_records(write_json(tmp_path / "d.json", [CTX_RECORD]))
    assert res.form == "ctxs" and res.skipped == []
    assert res.records == [
        QARecord(
            id="q1",
            question="Where was the author of X educated?",
            answers=("Exeter College", "Exeter"),
            passages=(Passage("X", "X is a play written by Y."), Passage("", "Y studied at Exeter College.")),
        )
    ]


def test_ctxs_jsonl_with_answer_string_and_gzip(tmp_path):
    rec = {k: v for k, v in CTX_RECORD.items() if k not in ("answers", "id")} | {"answer": "Exeter"}
    jsonl = write_jsonl(tmp_path / "d.jsonl", [rec, "", rec])
    gz = tmp_path / "data.bin"  # gzip is recognised by content, not by the suffix
    gz.write_bytes(gzip.compress(jsonl.read_bytes()))
    for path in (jsonl, gz):
        res = load_records(path)
        assert res.form == "ctxs"
        assert [r.answers for r in res.records] == [("Exeter",), ("Exeter",)]
        # no id in the data: the location names the record (line 2 is blank)
        assert [r.id for r in res.records] == ["line-1", "line-3"]


def test_hotpotqa_form_joins_sentences_as_given(tmp_path):
    for path in (write_json(tmp_path / "h.json", [HOTPOT_RECORD]), write_jsonl(tmp_path / "h.jsonl", [HOTPOT_RECORD])):
        res = load_records(path)
        assert res.form == "hotpotqa"
        rec = res.records[0]
        assert (rec.id, rec.answers) == ("h1", ("yes",))
        # "".join keeps the quote glued to its word; " ".join would give '" parts.'
        assert rec.passages == (Passage("Alpha", 'Alpha is one. It has "two" parts.'), Passage("Beta", "Beta is two."))


def test_gzip_json_list(tmp_path):
    path = tmp_path / "h.json.gz"
    path.write_bytes(gzip.compress(json.dumps([HOTPOT_RECORD, HOTPOT_RECORD]).encode()))
    assert len(load_records(path).records) == 2


BAD_CASES = [
    ({k: v for k, v in CTX_RECORD.items() if k != "question"}, "missing 'question'"),
    (CTX_RECORD | {"question": 7}, "'question' is int"),
    ({k: v for k, v in CTX_RECORD.items() if k != "answers"}, "no answers"),
    (CTX_RECORD | {"answers": []}, "no answers"),
    (CTX_RECORD | {"answers": [1, 2]}, "list of strings"),
    (CTX_RECORD | {"ctxs": []}, "no passages"),
    (CTX_RECORD | {"ctxs": "text"}, "'ctxs' is str"),
    (CTX_RECORD | {"ctxs": [{"title": "T"}]}, "ctxs[0].text"),
    (CTX_RECORD | {"ctxs": [{"text": "ok", "title": 3}]}, "ctxs[0].title is int"),
    ([1, 2], "expected a JSON object"),
    ("{not json", "invalid JSON"),
]


@pytest.mark.parametrize("bad, reason", BAD_CASES)
def test_bad_jsonl_record_is_skipped_with_line_and_reason(tmp_path, bad, reason):
    res = load_records(write_jsonl(tmp_path / "d.jsonl", [CTX_RECORD, bad, CTX_RECORD]))
    assert len(res.records) == 2
    assert len(res.skipped) == 1
    location, why = res.skipped[0]
    assert location == "line 2"
    assert reason in why, why


def test_bad_hotpot_record_reports_index(tmp_path):
    bad = HOTPOT_RECORD | {"context": [["Alpha", "not a list"]]}
    res = load_records(write_json(tmp_path / "h.json", [bad, HOTPOT_RECORD, {"question": "q", "answer": "a"}]))
    assert [r.id for r in res.records] == ["h1"]
    assert res.skipped[0][0] == "index 0" and "sentences must be a list" in res.skipped[0][1]
    assert res.skipped[1] == ("index 2", "missing 'context' (file is in hotpotqa form)")


def test_ctxs_and_limit(tmp_path):
    recs = [CTX_RECORD | {"id": f"q{i}", "ctxs": CTX_RECORD["ctxs"] + [{"title": 5}]} for i in range(5)]
    path = write_json(tmp_path / "d.json", recs)
    # passage 2 is broken, but ctxs=2 drops it before validation
    res = load_records(path, ctxs=2, limit=3)
    assert [r.id for r in res.records] == ["q0", "q1", "q2"]
    assert all(len(r.passages) == 2 for r in res.records)
    assert len(load_records(path, ctxs=1).records[0].passages) == 1
    # without the cut, every record carries the broken passage
    with pytest.raises(InputError, match="ctxs\\[2\\]"):
        load_records(path)


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "not found"),
        ("[{\"question\": ", "invalid JSON"),
        ("[]", "no records"),
        ("hello\nworld\n", "line 1: invalid JSON"),
        (json.dumps([{"question": "q", "answer": "a", "passages": []}]), "no record has 'ctxs'"),
        (json.dumps([CTX_RECORD | {"answers": []}] * 3), "index 0: no answers"),
    ],
)
def test_unusable_file_raises_input_error(tmp_path, content, message):
    path = tmp_path / "d.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(InputError, match=message) as info:
        load_records(path)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("kwargs", [{"limit": 0}, {"ctxs": -1}, {"limit": "3"}])
def test_bad_arguments(tmp_path, kwargs):
    with pytest.raises(InputError):
        load_records(write_json(tmp_path / "d.json", [CTX_RECORD]), **kwargs)


@pytest.mark.skipif(not HOTPOT.exists(), reason="shared HotpotQA data not present")
def test_real_hotpotqa_slice_parses_with_ten_passages(tmp_path):
    records = json.loads(HOTPOT.read_text())[:5]
    res = load_records(write_json(tmp_path / "slice.json", records))
    assert res.form == "hotpotqa" and res.skipped == []
    assert [len(r.passages) for r in res.records] == [10] * 5
    first = res.records[0]
    assert first.question == "If Gallu is a demon Lilu is what?" and first.answers == ("a spirit",)
    assert first.passages[0].title == "Demon Dice"
    # sentence boundaries keep exactly one space, never two or none
    assert "Tim Brown. In it," in first.passages[0].text and "  " not in first.passages[0].text


def test_permute_is_deterministic_per_seed_and_record():
    items = tuple(range(10))
    assert permute(items, "given", 0, "a") == items
    assert permute(items, "reversed", 0, "a") == items[::-1]
    a = permute(items, "shuffled", 0, "a")
    assert sorted(a) == list(items)
    assert a == permute(list(items), "shuffled", 0, "a")
    # 10! orders: a collision among these three is a 1-in-3.6M event, not flakiness
    assert a != permute(items, "shuffled", 1, "a")
    assert a != permute(items, "shuffled", 0, "b")
    with pytest.raises(InputError, match="unknown passage order"):
        permute(items, "random", 0, "a")
