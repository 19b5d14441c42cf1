"""`guard:B`: per request, the cheapest rung of a ladder whose calibrated KL bound is <= B.

Design facts:
- The ladder climbs from the cheapest reuse to full recompute: rerope, +boundary:16, +blend
  at 0.15, 0.2 and 0.25, then narrowing blends (blend:R:LAST, CacheBlend's gradual filtering:
  on the dev questions each reaches the mean KL of a fixed blend for about 15% less TTFT)
  from blend:0.4:0.1 to blend:0.8:0.2, then full (LADDER; a calibration stores the rungs it
  was fitted on, and the engine climbs those). Full's KL to itself is 0, so it always meets
  any B >= 0. The steps are fine because the guard's cost is set by the ladder: its features
  barely predict a request's KL (docs/guard.md), so at a budget it serves, in effect, one rung
  for most requests, and a coarse ladder overspends to the next rung up (the first ladder,
  rerope / boundary:16 / blend:0.15 / blend:0.3, kept as LEGACY_LADDER for the rows measured
  on it, jumped from blend:0.3 at 0.42x full's TTFT straight to full).
- Before answering, the engine composes the request as rerope and measures FEATURES, all
  cheap: what the library stored (the chunks' ingest drift scores), the prompt's shape
  (number of chunks, their lengths, where they sit in the context), and what `auto`
  measures at layer 1 (repair.head_deviation, read-only), also weighted by the question's
  layer-1 attention (repair.question_attention, run in free slots). None of it changes the
  composed cache, so the rerope rung answers exactly as `rerope` would.
- The calibration (calibration.py) turns features into a bound per rung, risk-controlled
  for this B at its stated confidence; the first rung whose bound is < B answers. If none
  is, the rerope composition is dropped and the request is composed as `full`: B = 0 is
  exactly full.
- A guard mode without a calibration for this model and encoding is a
  CalibrationMissingError, never a silent default.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from kvlib.engine.calibration import Calibration
from kvlib.engine.compose import Composed
from kvlib.engine.repair import head_deviation, question_attention
from kvlib.engine.spec import ModeSpec
from kvlib.errors import CalibrationMissingError

# repairs on rerope, cheapest first; full is the top
LADDER = ("", "boundary:16", "blend:0.15", "blend:0.2", "blend:0.25", "blend:0.4:0.1", "blend:0.5:0.1", "blend:0.6:0.1",
          "blend:0.7:0.1", "blend:0.8:0.2")
LEGACY_LADDER = ("", "boundary:16", "blend:0.15", "blend:0.3")  # the ladder of calibrate.json files without "ladder"
FULL_RUNG = "full"
HEAD_WINDOW = 32  # head tokens measured per chunk, as auto's candidates
FEATURES = ("n_chunks", "log_context", "log_mean_chunk", "log_min_chunk", "drift_max", "drift_mean",
            "mean_offset", "head_dev", "head_dev_max", "q_head_dev", "q_chunk_share")


def rung_name(repair: str) -> str:
    return repair or "rerope"


def rung_spec(encoding: str, repair: str) -> ModeSpec:
    return ModeSpec("rerope", encoding, repair or None)


@dataclass(frozen=True)
class GuardChoice:
    budget: float
    rung: str  # "rerope", a repair name, or "full"
    repair: str | None  # what the engine runs on the rerope composition (None: none, or full)
    fell_back: bool  # no rung's bound met B: the request is recomputed in full
    predicted_kl: float  # the chosen rung's point prediction (0 for full)
    kl_bound: float  # its upper bound at this budget's slack (0 for full)
    confidence: float
    features: dict
    predict_s: float = 0.0  # seconds spent measuring and predicting (part of the repair stage)
    target: str = "gold"  # what the calibration measured KL along: gold answers, or full's own ("full")

    def as_dict(self) -> dict:
        return {"budget": self.budget, "rung": self.rung, "fell_back": self.fell_back,
                "predicted_kl": self.predicted_kl, "kl_bound": self.kl_bound, "confidence": self.confidence,
                "target": self.target, "predict_s": self.predict_s}


def require_calibration(calibration: Calibration | None, lm, spec: ModeSpec) -> Calibration:
    """The calibration a guard spec needs, or the one-line error saying how to make it."""
    if calibration is None or calibration.model_fp != lm.fingerprint or calibration.encoding != spec.encoding:
        raise CalibrationMissingError(missing_message(lm.name, lm.fingerprint, spec.encoding))
    return calibration


def missing_message(model_name: str, fingerprint: str, encoding: str) -> str:
    return (f"no guard calibration for model {model_name} ({fingerprint[:12]}, encoding {encoding}) in this "
            f"library: run `kvlib calibrate --model MODEL --data FILE` first")


def load_calibration(library, lm, spec: ModeSpec) -> Calibration:
    """The library's calibration for this model and the spec's encoding, or CalibrationMissingError."""
    stored = library.calibration(lm.fingerprint, spec.encoding)
    return require_calibration(None if stored is None else Calibration.from_dict(stored), lm, spec)


@torch.inference_mode()
def measure_features(lm, composed: Composed, chunks, suffix_ids) -> dict:
    """FEATURES of one request from its rerope composition; leaves the cache as it found it."""
    lengths = [c.n_tokens for c in chunks]
    drifts = [c.drift for c in chunks if c.drift is not None]
    n_ctx = max(composed.n_context, 1)
    out = {"n_chunks": float(len(chunks)), "log_context": math.log(n_ctx),
           "log_mean_chunk": math.log(max(sum(lengths) / max(len(lengths), 1), 1.0)),
           "log_min_chunk": math.log(max(min(lengths, default=1), 1)),
           "drift_max": max(drifts) if drifts else math.nan,
           "drift_mean": sum(drifts) / len(drifts) if drifts else math.nan,
           "mean_offset": sum(s for s, _ in composed.spans) / max(len(composed.spans), 1) / n_ctx}
    slots, dev = head_deviation(lm, composed, chunks, HEAD_WINDOW)
    per_chunk = [dev[(slots >= s) & (slots < s + n)] for s, n in composed.spans]
    out["head_dev"] = float(dev.mean()) if dev.numel() else 0.0
    out["head_dev_max"] = max((float(d.mean()) for d in per_chunk if d.numel()), default=0.0)
    if len(suffix_ids) and composed.spans:
        mass = question_attention(lm, composed.cache, suffix_ids).float().cpu()  # [n_ctx]
        on_heads = mass[slots] if slots.numel() else torch.zeros(0)
        out["q_head_dev"] = float((on_heads * dev).sum() / on_heads.sum().clamp_min(1e-12)) if slots.numel() else 0.0
        first = composed.spans[0][0]
        out["q_chunk_share"] = float(mass[first:].sum() / mass.sum().clamp_min(1e-12))
    else:
        out["q_head_dev"], out["q_chunk_share"] = 0.0, 0.0
    return out


def choose_rung(lm, calibration: Calibration, spec: ModeSpec, composed: Composed, chunks, suffix_ids,
                features: dict | None = None) -> GuardChoice:
    """Measure (unless given) and pick the rung for this request (see the module docstring)."""
    t0 = time.perf_counter()
    features = measure_features(lm, composed, chunks, suffix_ids) if features is None else features
    index, point, bound = calibration.choose(features, spec.guard)
    fell_back = index == len(calibration.rungs)
    repair = None if fell_back else calibration.rungs[index].name or None
    return GuardChoice(budget=spec.guard, rung=FULL_RUNG if fell_back else rung_name(calibration.rungs[index].name),
                       repair=repair, fell_back=fell_back, predicted_kl=point, kl_bound=bound,
                       confidence=calibration.confidence, features=features, predict_s=time.perf_counter() - t0,
                       target=calibration.report.get("target", "gold"))
