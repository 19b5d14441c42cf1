"""The prompt layout every mode shares: [context E][chunk 1]...[chunk k][question suffix].

Design facts:
- Each part is tokenized on its own and the prompt is the concatenation of the ids,
  so `full` recompute sees exactly the token ids the cached modes compose.
- The encoding context E is the chat template's fixed opening (system turn and the
  start of the user turn). Chunks are encoded behind E, whose KV is dropped: E soaks
  up the attention-sink mass, and a single cached chunk composed behind the same E
  is exactly the prompt full recompute would see.
- The context id (a digest of E's ids) is part of every chunk key.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from kvlib.engine.model import QUESTION_TEMPLATE, SYSTEM_PROMPT

SENTINEL = "\x00"


def context_id_of(ids) -> str:
    return hashlib.sha256((",".join(str(int(i)) for i in ids)).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class PromptTemplate:
    """context_ids: E. suffix_text: what follows the question, e.g. the assistant header."""

    context_ids: tuple[int, ...]
    suffix_text: str
    question_template: str = QUESTION_TEMPLATE

    @property
    def context_id(self) -> str:
        return context_id_of(self.context_ids)

    def suffix_ids(self, tokenizer, question: str) -> list[int]:
        text = self.question_template.format(question=question.strip()) + self.suffix_text
        return list(tokenizer.encode(text, add_special_tokens=False))


def template_for(tokenizer) -> PromptTemplate:
    """Split the chat template around a sentinel user message; fall back to BOS + plain text."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": SENTINEL}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        head, tail = text.split(SENTINEL, 1)
    else:
        bos = tokenizer.bos_token or ""
        head, tail = f"{bos}{SYSTEM_PROMPT}\n\n", "\nAnswer:"
    ids = tuple(tokenizer.encode(head, add_special_tokens=False))
    return PromptTemplate(context_ids=ids, suffix_text=tail)


def stop_ids(tokenizer) -> set[int]:
    """Token ids that end generation: EOS and the chat end-of-turn marker."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    for marker in ("<|im_end|>", "<|eot_id|>", "<|endoftext|>"):
        tid = tokenizer.convert_tokens_to_ids(marker)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid >= 0:
            ids.add(tid)
    return ids
