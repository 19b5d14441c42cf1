"""The one place where the server turns messages into a completion.

Design facts:
- Everything else in kvlib/serve calls only `Pipeline.prompt_ids` and `Pipeline.complete`
  and reads a `Completion`; nothing else knows how the prompt's KV came to be.
- TODAY THIS IS FULL RECOMPUTE. The messages are rendered with the model's chat template
  and the whole prompt is prefilled, so `cached_tokens` is 0 and the `kvlib` object says
  `"reuse": "not yet wired"`. Segment lookup and `Engine.answer` replace the body of
  `complete` at merge (kvlib/segment.py and the engine redesign); the interface stays.
- The decode loop is our own (not engine.generate) because a request must be able to
  stop between any two decode steps: `cancelled()` is polled before each step, and a
  client that disconnects gets finish_reason "cancelled" within one token.
- The tokenizer is shared with the HTTP threads (prompt_ids runs there for the context
  check before a request is queued); HF fast tokenizers are not safe to call from two
  threads at once, so every use takes `_tok_lock`.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from kvlib.errors import KvlibError

FINISH_REASONS = ("stop", "length", "cancelled")


class PipelineUnavailable(KvlibError):
    """A request asks for something this pipeline cannot do yet (answered as HTTP 501)."""


@dataclass
class Completion:
    token_ids: list[int]
    text: str
    finish_reason: str  # one of FINISH_REASONS
    prompt_tokens: int
    cached_tokens: int  # prompt tokens whose KV came from the library
    computed_tokens: int  # prompt tokens prefilled in this request
    recomputed_tokens: int  # cached prompt tokens that repair recomputed anyway
    ttft_s: float  # complete() called -> first token chosen (the queue wait is the caller's)
    timings: dict = field(default_factory=dict)  # stage -> seconds
    kvlib: dict = field(default_factory=dict)  # the response's "kvlib" object


class Pipeline:
    def __init__(self, engine, library, *, spec: str, index=None, embedder=None):
        self.engine, self.library, self.spec = engine, library, spec
        self.index, self.embedder = index, embedder  # for the retrieve extension (lead: QueryRunner)
        self._tok_lock = threading.Lock()

    @property
    def model_id(self) -> str:
        return self.engine.lm.name

    @property
    def context_length(self) -> int:
        """Longest prompt + completion the model's positions allow."""
        return int(getattr(self.engine.lm.hf.config, "max_position_embeddings", 2048))

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """The ids full recompute would see: the chat template with the assistant header."""
        tok = self.engine.lm.tokenizer
        with self._tok_lock:
            if getattr(tok, "chat_template", None):
                out = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
                ids = out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out
            else:  # a base model: plain "role: text" lines, then the answer's cue
                text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
                ids = tok.encode(text)
        return [int(i) for i in ids]

    def decode(self, ids: list[int]) -> str:
        with self._tok_lock:
            return self.engine.decode(ids)

    def complete(self, messages: list[dict], tenant: str, *, max_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int | None = None, stop: list[str] = (),
                 on_text: Callable[[str], None] | None = None, cancelled: Callable[[], bool] = lambda: False,
                 retrieve_k: int | None = None, may_store: bool = True) -> Completion:
        """Answer `messages` for `tenant`, calling on_text with each new piece of text.

        may_store is False for read-only callers (anonymous): nothing they send is stored.
        """
        if retrieve_k is not None:
            raise PipelineUnavailable("the kvlib.retrieve extension needs the reuse pipeline, not wired yet")
        t0 = time.perf_counter()
        ids = self.prompt_ids(messages)
        t_render = time.perf_counter()
        decoder = TextStream(self, stop, on_text)
        token_ids, finish, t_first = self._decode(ids, decoder, max_tokens, temperature, top_p, seed, cancelled)
        t_end = time.perf_counter()
        timings = {"render": t_render - t0, "prefill": t_first - t_render, "decode": t_end - t_first}
        return Completion(
            token_ids=token_ids, text=decoder.text, finish_reason=finish, prompt_tokens=len(ids),
            cached_tokens=0, computed_tokens=len(ids), recomputed_tokens=0, ttft_s=t_first - t0, timings=timings,
            kvlib={"spec": "full", "requested_spec": self.spec, "reuse": "not yet wired",
                   "ttft_split_s": {"render": timings["render"], "prefill": timings["prefill"]},
                   "segments": [{"tokens": len(ids), "fate": "computed"}]},
        )

    def _decode(self, ids, decoder, max_tokens, temperature, top_p, seed, cancelled):
        """Prefill the whole prompt, then decode one token per forward until a stop."""
        import torch

        from kvlib.engine.forward import KVCache, forward
        from kvlib.engine.generate import pick_token

        lm, stop_ids = self.engine.lm, self.engine.stop
        gen = None
        if temperature > 0:  # no seed: a fresh random one, as OpenAI samples differently each call
            gen = torch.Generator()
            gen.manual_seed(seed) if seed is not None else gen.seed()
        cache = KVCache.for_model(lm, len(ids) + max_tokens)
        out = forward(lm, torch.tensor(ids), torch.arange(len(ids)), cache, logits="last")
        token = pick_token(out.logits[-1], temperature, top_p, gen)
        t_first, tokens, pos = time.perf_counter(), [], len(ids)
        while True:
            if token in stop_ids:
                decoder.flush()
                return tokens, "stop", t_first
            tokens.append(token)
            if decoder.push(tokens):
                return tokens, "stop", t_first
            if len(tokens) >= max_tokens:
                decoder.flush()
                return tokens, "length", t_first
            if cancelled():
                return tokens, "cancelled", t_first
            out = forward(lm, torch.tensor([token]), torch.tensor([pos]), cache, logits="last")
            pos += 1
            token = pick_token(out.logits[-1], temperature, top_p, gen)


class TextStream:
    """Turns the growing token list into text deltas, honouring stop strings.

    The whole prefix is decoded each step (a token can complete a multi-byte character),
    and text that could still be the start of a stop string is held back until it is not.
    """

    def __init__(self, pipeline: Pipeline, stop, on_text):
        self.pipeline, self.stops, self.on_text = pipeline, list(stop), on_text
        self.text, self.sent = "", 0

    def push(self, tokens: list[int]) -> bool:
        """Decode; True when a stop string appeared (text is cut before it)."""
        self.text = self.pipeline.decode(tokens)
        hits = [i for i in (self.text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self._emit(len(self.text))
            return True
        safe = len(self.text) - self._held_back()
        if self.text.endswith("\ufffd"):  # an unfinished multi-byte character
            safe = min(safe, len(self.text) - 1)
        self._emit(safe)
        return False

    def flush(self) -> None:
        self._emit(len(self.text))

    def _held_back(self) -> int:
        return max((n for s in self.stops for n in range(len(s) - 1, 0, -1) if self.text.endswith(s[:n])),
                   default=0)

    def _emit(self, upto: int) -> None:
        if upto > self.sent:
            if self.on_text:
                self.on_text(self.text[self.sent: upto])
            self.sent = upto
