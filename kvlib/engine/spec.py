"""`ModeSpec`: what a mode name means, parsed from the mode grammar in exactly one place.

Design facts:
- Grammar: `BASE[+ENCODING][+REPAIR]`, where BASE is full, prefix, naive or rerope;
  ENCODING is sink, lead or bare; REPAIR is one of repair.py's (boundary:K, query:R, chunks:N, a
  '+'-joined union of those, blend:R[:LAST], auto[:TARGET]). Every command that takes a mode
  (query, bench, doctor, serve) resolves it here, so a name means the same everywhere.
- The encoding is always explicit once resolved, and it says which library chunks a mode
  reads: `sink` (behind the encoding context E, the system header: the library default),
  `lead` (behind E and a fixed neutral lead-in) or `bare` (behind nothing). Without one,
  the library default applies: `rerope` is `rerope+sink`, and bare chunks are `rerope+bare`.
- `full` and `prefix` read no chunk KV; their prompt opens with E like every other mode's,
  so their encoding is `sink`, and they take no repair.
- `+guard:B` (rerope only, no other repair) bounds each request's KL to full recompute by B:
  the engine picks a rung of guard.py's ladder per request from a calibrated prediction.
  It is a field of its own, not a repair: its top rung is full recompute, not a repair.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from decimal import Decimal

from kvlib.errors import InputError

BASES = ("full", "prefix", "naive", "rerope")
ENCODINGS = ("sink", "lead", "bare")
DEFAULT_ENCODING = "sink"
# `--modes all`: every base, each encoding and each repair family once.
ALL_MODES = ("full", "prefix", "naive", "rerope", "naive+bare", "rerope+bare", "rerope+lead",
             "rerope+boundary:16", "rerope+lead+boundary:16", "rerope+blend:0.15", "rerope+auto")
MODE_HELP = ("a mode is BASE[+ENCODING][+REPAIR]: BASE full, prefix, naive or rerope; ENCODING sink (default), "
             "lead or bare; REPAIR boundary:K, query:R, chunks:N, blend:R[:LAST], auto[:TARGET], "
             "a union like boundary:8+query:0.05, or guard:B (rerope only: bound each request's KL to full by B)")
GUARD = "guard"


@dataclass(frozen=True)
class ModeSpec:
    base: str  # full, prefix, naive, rerope
    encoding: str  # sink, lead, bare: which library chunks the mode reads
    repair: str | None = None  # a repair name (repair.parse_repair), or None
    guard: float | None = None  # B of `+guard:B`: the per-request bound on KL to full, or None

    @property
    def name(self) -> str:
        """The canonical, fully explicit name: `rerope+sink+auto`, `rerope+sink+guard:0.2`, `full`."""
        if self.base in ("full", "prefix"):
            return self.base
        tail = [self.repair] if self.repair else []
        tail += [f"{GUARD}:{budget_text(self.guard)}"] if self.guard is not None else []
        return "+".join([self.base, self.encoding] + tail)

    @property
    def reads_library(self) -> bool:
        return self.base in ("naive", "rerope")

    def as_dict(self) -> dict:
        """base, encoding, repair; and guard (B) for a guarded mode only, so other modes' dicts stay as they were."""
        out = {"base": self.base, "encoding": self.encoding, "repair": self.repair}
        return out if self.guard is None else {**out, "guard": self.guard}


def budget_text(budget: float) -> str:
    """B as written in a mode name: plain digits (an exponent's '+' would split the name)."""
    text = format(Decimal(repr(float(budget))), "f")  # the shortest exact digits, never an exponent
    return text.rstrip("0").rstrip(".") if "." in text else text


def parse_budget(text: str, mode: str) -> float:
    _, _, arg = text.partition(":")
    try:
        budget = float(arg)
    except ValueError:
        budget = math.nan
    if not math.isfinite(budget) or budget < 0:
        raise InputError(f"unknown mode '{mode}': guard needs a budget B >= 0 on KL to full, e.g. rerope+guard:0.2")
    return budget


def parse_mode(mode: str, repair: str | None = None) -> ModeSpec:
    """The one parser of mode names; `repair` (e.g. a separate --repair option) is appended."""
    from kvlib.engine.repair import parse_repair

    text = mode.strip() + (f"+{repair.strip()}" if repair else "")
    base, *rest = text.split("+")
    if base not in BASES:
        raise InputError(f"unknown mode '{text}'; {MODE_HELP}")
    encodings = [r for r in rest if r in ENCODINGS]
    guards = [r for r in rest if r.partition(":")[0] == GUARD]
    repair_name = "+".join(r for r in rest if r not in ENCODINGS and r not in guards) or None
    if len(encodings) > 1:
        raise InputError(f"unknown mode '{text}': choose one encoding ({', '.join(ENCODINGS)})")
    if base in ("full", "prefix") and (repair_name or encodings or guards):
        raise InputError(f"unknown mode '{text}': {base} takes no encoding or repair")
    if guards and (base != "rerope" or repair_name or len(guards) > 1):
        raise InputError(f"unknown mode '{text}': guard:B climbs its own ladder from rerope; "
                         "write rerope[+ENCODING]+guard:B with no other repair")
    if repair_name:
        parse_repair(repair_name)  # fail on a typo before any work
    guard = parse_budget(guards[0], text) if guards else None
    return ModeSpec(base, encodings[0] if encodings else DEFAULT_ENCODING, repair_name, guard)


def parse_modes(text: str) -> list[ModeSpec]:
    """'all' or a comma list, in order, duplicates (by resolved spec) dropped."""
    names = list(ALL_MODES) if text.strip() == "all" else [m.strip() for m in text.split(",") if m.strip()]
    if not names:
        raise InputError(f"no modes given; {MODE_HELP}")
    specs = [parse_mode(m) for m in names]
    return sorted(set(specs), key=specs.index)
