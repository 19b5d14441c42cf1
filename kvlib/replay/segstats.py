"""Measure a segmentation policy: is a passage found again when the prompt around it changes?

Design facts:
- Each trial puts a passage P among other passages in a first prompt, stores that prompt's
  reusable segments, then sends a second prompt in which P is the only text shared with
  the first (other neighbours, another question, no system message). The found share is the
  second prompt's library-hit tokens over P's own token count, so shared scaffolding is
  never counted as a find.
- Cases: `renumbered` (same format, other number and neighbours), `reformatted` (document
  tags instead of `Document [n](Title: ...)` lines) and `embedded` (P run into one paragraph
  with other text, no block structure at all).
- Passages come from the data given (HotpotQA's pooled paragraphs); nothing is tuned here.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from kvlib.segment import SegmentPolicy, segment_key, segment_prompt

CASES = ("renumbered", "reformatted", "embedded")


def _lim(docs: list[tuple[str, str]], question: str) -> list[dict]:
    body = "\n".join(f"Document [{i}](Title: {t}) {x}" for i, (t, x) in enumerate(docs, 1))
    return [{"role": "user", "content": f"{body}\n\nQuestion: {question}"}]


def _tags(docs: list[tuple[str, str]], question: str) -> list[dict]:
    body = "\n".join(f'<document index="{i}">\n{x}\n</document>' for i, (_, x) in enumerate(docs, 1))
    return [{"role": "user", "content": f"{body}\n\n{question}"}]


def _embedded(docs: list[tuple[str, str]], question: str) -> list[dict]:
    return [{"role": "user", "content": "Notes: " + " ".join(x for _, x in docs) + f" {question}"}]


SECOND = {"renumbered": _lim, "reformatted": _tags, "embedded": _embedded}


def found_share(tokenizer, first: list[dict], second: list[dict], passage: str, policy: SegmentPolicy) -> float:
    _, segs1 = segment_prompt(tokenizer, first, policy)
    stored = {segment_key(s.token_ids) for s in segs1 if s.reusable}
    _, segs2 = segment_prompt(tokenizer, second, policy)
    hit = sum(len(s.token_ids) for s in segs2 if s.reusable and segment_key(s.token_ids) in stored)
    return min(1.0, hit / max(1, len(tokenizer(passage, add_special_tokens=False)["input_ids"])))


def measure_policy(tokenizer, passages: list[tuple[str, str]], policy: SegmentPolicy, trials: int, seed: int) -> dict:
    rng = random.Random(seed)
    found = {c: 0.0 for c in CASES}
    segments = reusable_tokens = reusable = 0
    for _ in range(trials):
        picked = rng.sample(passages, 7)
        p, first_others, second_others = picked[0], picked[1:4], picked[4:7]
        first = _lim(first_others[:1] + [p] + first_others[1:], "Which of these came first?")
        for case in CASES:
            docs = second_others[:2] + [p] + second_others[2:]
            found[case] += found_share(tokenizer, first, SECOND[case](docs, "What is said about it?"), p[1], policy)
        _, segs = segment_prompt(tokenizer, first, policy)
        segments += len(segs)
        reusable += sum(s.reusable for s in segs)
        reusable_tokens += sum(len(s.token_ids) for s in segs if s.reusable)
    return {"policy": {"min_tokens": policy.min_tokens, "avg_tokens": policy.avg_tokens, "max_tokens": policy.max_tokens,
                       "cdc_window": policy.cdc_window},
            "trials": trials, "found": {c: v / trials for c, v in found.items()},
            "segments_per_prompt": segments / trials, "mean_reusable_tokens": reusable_tokens / max(1, reusable)}


def hotpot_passages(corpus_json: Path) -> list[tuple[str, str]]:
    pool = json.loads(corpus_json.read_text())
    return [(title, "".join(sents).strip()) for title, sents in sorted(pool.items()) if len("".join(sents)) > 200]
