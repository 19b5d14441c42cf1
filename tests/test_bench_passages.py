"""The passage-length axis's input (kvlib/bench/passages.py): passages merged to about N tokens,
with the same text in the same order, read back by the bench's loader."""

import pytest

from kvlib.bench.data import Passage, load_records
from kvlib.bench.passages import TEXT_JOIN, merge_passages, write_merged
from kvlib.errors import InputError

PASSAGES = tuple(Passage(title=f"T{i}", text=" ".join(f"word{i}x{j}" for j in range(8 * (i + 1)))) for i in range(5))


@pytest.fixture(scope="module")
def tok(smol_home):
    from kvlib.replay.shape import load_tokenizer_and_shape

    return load_tokenizer_and_shape(None, smol_home)[0]


def n_tokens(tok, text):
    return len(tok(text, add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize("target", [1, 60, 200, 10_000])
def test_merged_passages_keep_the_text_and_stay_under_the_target(tok, target):
    merged = merge_passages(PASSAGES, tok, target)
    assert TEXT_JOIN.join(p.text for p in merged) == TEXT_JOIN.join(p.text for p in PASSAGES)
    assert " / ".join(p.title for p in merged) == " / ".join(p.title for p in PASSAGES)
    sizes = {p.text: n_tokens(tok, p.text) for p in PASSAGES}
    for p in merged:
        parts = p.text.split(TEXT_JOIN)
        assert len(parts) == 1 or sum(sizes[t] for t in parts) <= target, "only a lone passage may exceed the target"
    if target in (1, 10_000):
        assert len(merged) == (len(PASSAGES) if target == 1 else 1)
    assert 1 < len(merge_passages(PASSAGES, tok, 200)) < len(PASSAGES)


def test_merged_file_loads_in_the_bench(tmp_path, tok):
    src = tmp_path / "qa.json"
    src.write_text('[{"question": "Q?", "answer": "A", "context": [["T0", ["one two.", " three."]], '
                   '["T1", ["four five."]]]}]', encoding="utf-8")
    stats = write_merged(src, tmp_path / "m" / "merged-64.json", tok, 64)
    rec = load_records(tmp_path / "m" / "merged-64.json").records[0]
    assert (stats["records"], rec.question, rec.answers, [p.title for p in rec.passages]) == (1, "Q?", ("A",), ["T0 / T1"])
    with pytest.raises(InputError, match="at least 1 token"):
        merge_passages(PASSAGES, tok, 0)
