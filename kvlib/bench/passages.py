"""Merge a QA file's passages into longer ones: the passage-length axis of the map and the guard.

Design facts:
- Each record's passages, in their given order, are packed greedily into passages of about
  `target` tokens (the model's tokenizer counts them): a passage is added while the merged
  one stays under the target, so a single passage longer than it stands alone. The
  prompt's total text and its order stay the same; only where passages begin changes, so a
  bench over the merged files compares chunk lengths on the same prompts.
- A merged passage's title joins its parts' titles with " / " and its text joins their
  texts with a blank line, the way a chunker packs paragraphs.
- Records come out in the DPR/FiD `ctxs` form with the source's id, question and answers
  (kvlib/bench/data.py reads it); gold titles are dropped, since merged titles no longer name
  one passage each.
"""

from __future__ import annotations

import json
from pathlib import Path

from kvlib.bench.data import Passage, QARecord, load_records
from kvlib.errors import InputError

TITLE_JOIN, TEXT_JOIN = " / ", "\n\n"


def merge_passages(passages: tuple[Passage, ...], tokenizer, target: int) -> list[Passage]:
    """Consecutive passages packed into ones of fewer than about `target` tokens each."""
    if target < 1:
        raise InputError(f"the target passage length must be at least 1 token, got {target}")
    merged: list[list[Passage]] = []
    size = 0
    for p in passages:
        n = len(tokenizer(p.text, add_special_tokens=False)["input_ids"])
        if merged and size + n <= target:
            merged[-1].append(p)
            size += n
        else:
            merged.append([p])
            size = n
    return [Passage(title=TITLE_JOIN.join(q.title for q in group if q.title),
                    text=TEXT_JOIN.join(q.text for q in group)) for group in merged]


def merged_record(rec: QARecord, tokenizer, target: int) -> dict:
    return {"id": rec.id, "question": rec.question, "answers": list(rec.answers),
            "ctxs": [{"title": p.title, "text": p.text} for p in merge_passages(rec.passages, tokenizer, target)]}


def write_merged(source: Path, out: Path, tokenizer, target: int) -> dict:
    """Write the merged file; returns its passage statistics."""
    records = [merged_record(r, tokenizer, target) for r in load_records(source).records]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    tmp.replace(out)
    counts = [len(r["ctxs"]) for r in records]
    return {"out": str(out), "records": len(records), "target_tokens": target,
            "passages_per_record": sum(counts) / len(counts)}
