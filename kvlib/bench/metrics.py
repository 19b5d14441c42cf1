"""Quality and fidelity metrics for `kvlib bench`. Pure functions; no model, no I/O.

Design facts:
- Answer metrics follow the SQuAD v1.1 evaluation script: normalise (lowercase, drop
  punctuation, drop the articles a/an/the, collapse whitespace), then exact match or
  token-bag F1, taking the max over gold answers. When either side normalises to
  nothing, F1 is 1 only if both do (the SQuAD v2 rule), so "the" vs "a" is a match
  rather than a division by zero.
- They score `answer_span(continuation)`, not the whole continuation: an instruct model
  answers in its first line or sentence and may go on explaining after it.
- Fidelity metrics compare a mode against `full` recompute on the same token ids
  (DESIGN.md §2), so `full` is always the reference P. They run in float32 through
  `log_softmax`: bf16 logits differ from their softmax by more than the KL we want to
  see, and `log(softmax(x))` underflows to -inf where `log_softmax` does not.
- torch is imported inside the functions that need it, so importing this module for
  EM/F1 (and `kvlib --help`) stays instant.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np

if TYPE_CHECKING:
    import torch

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_LABEL = re.compile(r"^\s*(?:final\s+)?answer\s*[:\-]\s*", re.IGNORECASE)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s")


@dataclass(frozen=True)
class AttentionSimilarity:
    """Per-layer and mean agreement of two attention patterns; 1.0 means identical."""

    cosine_per_layer: tuple[float, ...]
    js_sim_per_layer: tuple[float, ...]  # 1 - Jensen-Shannon divergence, base 2, in [0, 1]
    cosine: float
    js_sim: float


def answer_span(text: str) -> str:
    """The answer an instruct model gave, out of its whole continuation (the rule F1 and EM use).

    The first non-empty line, less a leading "Answer:" label, cut after its first sentence (a
    '.', '!' or '?' followed by white space). So "Paris.\nThe city is..." and "Answer: Paris. It
    is..." both give "Paris."; an abbreviation inside the answer ("St. Louis") cuts it short.
    """
    line = next((ln for ln in text.splitlines() if ln.strip()), "")
    line = _LABEL.sub("", line).strip()
    return _SENTENCE_END.split(line, maxsplit=1)[0].strip()


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lowercase, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(pred: str, golds: str | Sequence[str]) -> float:
    """1.0 if `pred` equals any gold answer after normalisation, else 0.0."""
    norm = normalize_answer(pred)
    return max(float(norm == normalize_answer(g)) for g in _as_golds(golds))


def f1(pred: str, golds: str | Sequence[str]) -> float:
    """Token-bag F1 between `pred` and the best-matching gold answer."""
    pred_tokens = normalize_answer(pred).split()
    return max(_f1_tokens(pred_tokens, normalize_answer(g).split()) for g in _as_golds(golds))


def _f1_tokens(pred: list[str], gold: list[str]) -> float:
    if not pred or not gold:
        return float(pred == gold)
    common = sum((Counter(pred) & Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def _as_golds(golds: str | Sequence[str]) -> list[str]:
    golds = [golds] if isinstance(golds, str) else list(golds)
    if not golds:
        raise ValueError("at least one gold answer is needed")
    return golds


def kl_divergence(logits_p: "torch.Tensor", logits_q: "torch.Tensor") -> float:
    """Mean over positions of KL(P || Q) in nats; P = reference (full recompute) logits.

    Both tensors are [..., vocab] with the same shape; every leading index is a position.
    """
    import torch.nn.functional as F

    if logits_p.shape != logits_q.shape:
        raise ValueError(f"logit shapes differ: {tuple(logits_p.shape)} vs {tuple(logits_q.shape)}")
    vocab = logits_p.shape[-1]
    log_p = F.log_softmax(logits_p.reshape(-1, vocab).float(), dim=-1)
    log_q = F.log_softmax(logits_q.reshape(-1, vocab).float(), dim=-1)
    per_position = F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)
    # KL >= 0 in exact arithmetic; float32 rounding can leave about -1e-7 behind.
    return float(per_position.clamp_min(0).mean())


def gold_nll(logits: "torch.Tensor", gold_ids: "torch.Tensor | Sequence[int]") -> float:
    """Mean negative log-likelihood (nats) of `gold_ids` under `logits`.

    Already aligned: `logits[i]` ([T, vocab], or [1, T, vocab]) scores `gold_ids[i]`; the
    caller does the usual one-step shift.
    """
    import torch
    import torch.nn.functional as F

    vocab = logits.shape[-1]
    flat = logits.reshape(-1, vocab).float()
    target = torch.as_tensor(gold_ids, dtype=torch.long, device=flat.device).reshape(-1)
    if target.numel() != flat.shape[0] or target.numel() == 0:
        raise ValueError(f"{flat.shape[0]} logit rows for {target.numel()} gold ids")
    return float(F.cross_entropy(flat, target))


def perplexity(nll: float) -> float:
    """exp(mean NLL); inf rather than OverflowError for a hopeless model."""
    return math.exp(nll) if nll < 700 else math.inf


def attention_similarity(
    attn_a: "Sequence[torch.Tensor] | torch.Tensor", attn_b: "Sequence[torch.Tensor] | torch.Tensor"
) -> AttentionSimilarity:
    """Compare attention probabilities layer by layer: each layer is [heads, q, k] over the same keys.

    Accepts a list of per-layer tensors or one [layers, heads, q, k] tensor. Rows are
    renormalised before Jensen-Shannon, so attention restricted to a subset of keys
    (e.g. only the context) is compared as a distribution over that subset.
    """
    if len(attn_a) != len(attn_b) or len(attn_a) == 0:
        raise ValueError(f"layer counts differ or are zero: {len(attn_a)} vs {len(attn_b)}")
    cosines, js_sims = [], []
    for layer, (a, b) in enumerate(zip(attn_a, attn_b)):
        if a.shape != b.shape:
            raise ValueError(f"layer {layer}: shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
        cos, js = _layer_similarity(a, b)
        cosines.append(cos)
        js_sims.append(js)
    return AttentionSimilarity(
        cosine_per_layer=tuple(cosines),
        js_sim_per_layer=tuple(js_sims),
        cosine=float(np.mean(cosines)),
        js_sim=float(np.mean(js_sims)),
    )


def _layer_similarity(a: "torch.Tensor", b: "torch.Tensor") -> tuple[float, float]:
    """Mean over (head, query) rows of cosine similarity and of 1 - JS divergence (bits)."""
    import torch
    import torch.nn.functional as F

    # rows: [heads * q, k]
    a = a.reshape(-1, a.shape[-1]).float()
    b = b.reshape(-1, b.shape[-1]).float()
    cosine = F.cosine_similarity(a, b, dim=-1, eps=1e-12)
    p = a / a.sum(-1, keepdim=True).clamp_min(1e-30)
    q = b / b.sum(-1, keepdim=True).clamp_min(1e-30)
    m = 0.5 * (p + q)
    # xlogy gives 0 * log 0 = 0, which sparse (causal, masked) attention rows need.
    kl_pm = (torch.xlogy(p, p) - torch.xlogy(p, m)).sum(-1)
    kl_qm = (torch.xlogy(q, q) - torch.xlogy(q, m)).sum(-1)
    js_bits = (0.5 * (kl_pm + kl_qm) / math.log(2)).clamp(0.0, 1.0)
    return float(cosine.mean().clamp(-1.0, 1.0)), float((1.0 - js_bits).mean())


def summarize(values: Sequence[float]) -> dict[str, float]:
    """{"median", "p90", "mean"} of a non-empty sample (numpy's linear-interpolation percentiles)."""
    arr = np.asarray(list(values), dtype=np.float64)
    if arr.size == 0:
        raise ValueError("cannot summarize an empty sample")
    median, p90 = np.percentile(arr, [50, 90])
    return {"median": float(median), "p90": float(p90), "mean": float(arr.mean())}
