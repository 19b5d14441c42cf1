"""The shared segmenter on the real SmolLM2 tokenizer and chat template (no model weights load)."""

import random
from pathlib import Path

import pytest

from kvlib.errors import InputError
from kvlib.segment import (DEFAULT_POLICY, SegmentPolicy, cdc_lengths, render_prompt, segment_key,
                           segment_prompt)

SYSTEM = {"role": "system", "content": "You answer from the documents."}
PASSAGES = {
    "Ostrand": "Ostrand is the capital of Varnholm, on the estuary of the Melk. Its harbour handles most of the island's freight.",
    "Brennock": "Brennock is a fishing town on the north coast whose cooperative was founded in 1897 after a storm.",
    "Kell": "Kell lies inland at the head of the Melk valley, where the railway from Ostrand opened in 1866.",
}


@pytest.fixture(scope="session")
def tok(smol_home):
    from kvlib.replay.shape import load_tokenizer_and_shape

    return load_tokenizer_and_shape(None, smol_home)[0]


def lost_in_the_middle(order, question="Where is Kell?"):
    docs = "\n".join(f"Document [{i}](Title: {t}) {PASSAGES[t]}" for i, t in enumerate(order, 1))
    return [SYSTEM, {"role": "user", "content": f"Answer the question.\n\n{docs}\n\nQuestion: {question}"}]


def tagged(order):
    docs = "\n".join(f'<document index="{i}">\n{PASSAGES[t]}\n</document>' for i, t in enumerate(order, 1))
    return [SYSTEM, {"role": "user", "content": f"{docs}\n\nWhich town is oldest?"}]


def tiles(ids, segments):
    return [t for s in segments for t in s.token_ids] == ids and all(
        a.end == b.start for a, b in zip(segments, segments[1:])) and segments[0].start == 0


@pytest.mark.parametrize("messages", [
    lost_in_the_middle(["Ostrand", "Brennock", "Kell"]),
    tagged(["Kell", "Ostrand"]),
    [SYSTEM, {"role": "user", "content": [{"type": "text", "text": "## Notes\n\nSome notes."}, {"type": "text", "text": "What?"}]}],
    [SYSTEM, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}],
])
def test_segments_tile_the_rendered_ids_exactly(tok, messages):
    ids, segments = segment_prompt(tok, messages)
    assert ids == render_prompt(tok, messages)
    assert tiles(ids, segments), [(s.kind, s.start, len(s.token_ids)) for s in segments]


def test_rendered_ids_are_the_chat_templates_own(tok):
    messages = lost_in_the_middle(["Kell", "Brennock"])
    assert render_prompt(tok, messages) == list(tok.apply_chat_template(messages, add_generation_prompt=True)["input_ids"])


def doc_ids(tok, messages, title):
    """The ids of the segment that holds `title`'s passage text."""
    ids, segments = segment_prompt(tok, messages)
    want = PASSAGES[title].split(",")[0]
    hits = [s for s in segments if s.kind == "document" and want in tok.decode(list(s.token_ids))]
    assert len(hits) == 1, [(s.kind, tok.decode(list(s.token_ids))) for s in segments]
    return hits[0].token_ids


def test_a_passage_has_the_same_ids_in_any_order_and_numbering(tok):
    a = doc_ids(tok, lost_in_the_middle(["Ostrand", "Brennock", "Kell"]), "Kell")
    b = doc_ids(tok, lost_in_the_middle(["Kell", "Ostrand"], question="Other question?"), "Kell")
    assert a == b
    c = doc_ids(tok, tagged(["Brennock", "Kell"]), "Kell")
    d = doc_ids(tok, tagged(["Kell", "Ostrand", "Brennock"]), "Kell")
    assert c == d


def kinds_and_text(tok, messages):
    return [(s.kind, tok.decode(list(s.token_ids))) for s in segment_prompt(tok, messages)[1]]


def test_document_headers_and_tags_are_template_scaffolding(tok):
    parts = kinds_and_text(tok, lost_in_the_middle(["Ostrand", "Kell"]))
    headers = [t for k, t in parts if "Document [" in t]
    assert headers and all(k == "template" for k, t in parts if "Document [" in t)
    assert not any("Document [" in t for k, t in parts if k == "document")
    tags = [k for k, t in kinds_and_text(tok, tagged(["Kell", "Ostrand"])) if "<document" in t or "</document>" in t]
    assert tags and set(tags) == {"template"}


def test_blank_lines_headings_and_messages_cut_blocks(tok):
    content = "First block of plain text here.\n\nSecond block follows.\n## A heading\nUnder the heading.\n\nQ?"
    parts = kinds_and_text(tok, [SYSTEM, {"role": "user", "content": content}])
    texts = [t for k, t in parts if k != "template"]
    assert texts[0] == SYSTEM["content"] and parts[1][0] == "system"
    assert "First block of plain text here." in texts and "Second block follows." in texts
    assert "## A heading\nUnder the heading." in texts
    assert parts[-2] == ("question", "Q?")


def test_role_headers_never_share_a_segment_with_content(tok):
    for kind, text in kinds_and_text(tok, [SYSTEM, {"role": "user", "content": "Hello there"}]):
        if "<|im_start|>" in text or "<|im_end|>" in text:
            assert kind == "template"


def test_text_parts_render_as_their_joined_string(tok):
    parts = [SYSTEM, {"role": "user", "content": [{"type": "text", "text": "One."}, {"type": "text", "text": "Two?"}]}]
    plain = [SYSTEM, {"role": "user", "content": "One.\nTwo?"}]
    assert segment_prompt(tok, parts) == segment_prompt(tok, plain)


def test_non_text_parts_and_bad_messages_are_refused(tok):
    with pytest.raises(InputError, match="text content parts"):
        segment_prompt(tok, [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])
    with pytest.raises(InputError, match="role"):
        segment_prompt(tok, [{"content": "no role"}])


def test_cdc_pieces_respect_min_and_max():
    rng = random.Random(1)
    policy = SegmentPolicy(min_tokens=16, avg_tokens=64, max_tokens=128)
    ids = [rng.randrange(50_000) for _ in range(5_000)]
    lengths = cdc_lengths(ids, policy)
    assert sum(lengths) == len(ids)
    assert all(policy.min_tokens <= n <= policy.max_tokens for n in lengths[:-1]), lengths
    assert 0 < lengths[-1] <= policy.max_tokens
    mean = sum(lengths[:-1]) / len(lengths[:-1])
    assert 0.5 * policy.avg_tokens < mean < 2 * policy.avg_tokens, f"mean piece {mean:.0f} far from avg 64"


def test_cdc_finds_a_passage_again_behind_other_text():
    """Content-defined cuts resynchronise: after an insertion, later cut points are the same."""
    rng = random.Random(2)
    policy = SegmentPolicy(min_tokens=16, avg_tokens=64, max_tokens=256)
    passage = [rng.randrange(50_000) for _ in range(3_000)]
    lead = [rng.randrange(50_000) for _ in range(137)]

    def cuts(ids, offset):
        out, pos = set(), 0
        for n in cdc_lengths(ids, policy):
            pos += n
            out.add(pos - offset)
        return out

    alone, behind = cuts(passage, 0), cuts(lead + passage, len(lead))
    late = {c for c in alone if c > 600}
    assert len(late & behind) >= 0.9 * len(late), f"{len(late & behind)} of {len(late)} late cuts shared"


def test_long_blocks_become_cdc_pieces_that_tile(tok):
    words = " ".join(f"word{i} of the long unbroken passage" for i in range(400))
    messages = [SYSTEM, {"role": "user", "content": words}]
    ids, segments = segment_prompt(tok, messages)
    cdc = [s for s in segments if s.kind == "cdc"]
    assert len(cdc) >= 2 and tiles(ids, segments)
    assert all(len(s.token_ids) <= DEFAULT_POLICY.max_tokens for s in cdc)
    assert all(s.reusable for s in cdc[:-1])


def test_short_segments_and_scaffolding_are_not_reusable(tok):
    _, segments = segment_prompt(tok, lost_in_the_middle(["Ostrand", "Kell"]))
    for s in segments:
        assert s.reusable == (s.kind != "template" and len(s.token_ids) >= DEFAULT_POLICY.min_tokens)


def test_segment_key_is_content_and_salt():
    assert segment_key([1, 2, 3]) == segment_key((1, 2, 3))
    assert segment_key([1, 2, 3]) != segment_key([1, 2, 4])
    assert segment_key([1, 2, 3], salt=b"tenant-a") != segment_key([1, 2, 3], salt=b"tenant-b")


def test_policy_validation():
    with pytest.raises(InputError, match="min < avg < max"):
        SegmentPolicy(min_tokens=64, avg_tokens=32, max_tokens=128)


def test_text_segments_are_the_blocks_a_prompt_carries(tok):
    """A document stored on its own (POST /v1/documents) has the ids of its block in a chat that
    pastes it behind a blank line or a document tag, so that chat finds it."""
    from kvlib.segment import text_segments

    doc = PASSAGES["Ostrand"] + "\n\n" + PASSAGES["Kell"]
    policy = SegmentPolicy(min_tokens=8, avg_tokens=64, max_tokens=512)
    stored = {s.token_ids for s in text_segments(tok, doc, policy) if s.reusable}
    assert len(stored) == 2, "two paragraphs, two blocks"
    for messages in (tagged(["Ostrand", "Kell"]),
                     [SYSTEM, {"role": "user", "content": f"Context:\n\n{doc}\n\nWhere is Kell?"}]):
        _, segments = segment_prompt(tok, messages, policy)
        found = {s.token_ids for s in segments if s.reusable} & stored
        assert found == stored, f"both stored blocks recur in {messages[1]['content'][:30]!r}"
    assert text_segments(tok, " \n\n ") == []


def test_spacing_variant_links_a_header_line_block_to_its_own_form(tok):
    """'Document [1](Title: T) Kell' gives the body ' Kell' as first token; alone it is 'K', 'ell'."""
    from kvlib.segment import spacing_variant, text_segments

    policy = SegmentPolicy(min_tokens=8, avg_tokens=64, max_tokens=512)
    _, segments = segment_prompt(tok, lost_in_the_middle(["Kell", "Ostrand"]), policy)
    alone = {s.token_ids for s in text_segments(tok, PASSAGES["Kell"], policy) if s.reusable}
    in_prompt = [s for s in segments if s.reusable and s.kind == "document"]
    assert not alone & {s.token_ids for s in in_prompt}, "the spaced first token differs"
    variants = {spacing_variant(tok, s.token_ids)[0] for s in in_prompt}
    assert alone <= variants, "toggling the leading space gives the stored form"
    for s in in_prompt:
        alt, shared = spacing_variant(tok, s.token_ids)
        assert 0 < len(s.token_ids) - shared <= 4 and alt[-shared:] == s.token_ids[-shared:]
        assert spacing_variant(tok, alt)[0] == s.token_ids, "toggling twice comes back"
    assert spacing_variant(tok, in_prompt[0].token_ids[:1]) is None, "a single token has no tail to share"


def test_spacing_variants_retokenize_a_head_as_the_whole_text_would(tok):
    """The server re-tokenizes only the head up to the first spaced token after the first word;
    on every paragraph of the example corpus, in both spacings, that gives exactly the variant
    the whole toggled text would (decode all, toggle, encode all), and None where that gives None."""
    from kvlib.segment import _shared_tail, spacing_variants

    corpus = Path(__file__).resolve().parents[1] / "examples" / "corpus"
    paragraphs = [p.strip() for f in sorted(corpus.glob("*.md")) + sorted(corpus.glob("*.txt"))
                  for p in f.read_text().split("\n\n") if len(p.strip()) > 20]
    id_lists = [tuple(tok(form, add_special_tokens=False)["input_ids"]) for p in paragraphs for form in (p, " " + p)]
    whole = []
    for ids in id_lists:
        text = tok.decode(list(ids))
        other = tuple(tok(text[1:] if text.startswith(" ") else " " + text, add_special_tokens=False)["input_ids"])
        whole.append(_shared_tail(ids, other))
    assert len(id_lists) > 100 and sum(v is not None for v in whole) > 50, "enough paragraphs with a variant"
    assert spacing_variants(tok, id_lists) == whole
