"""`ModeSpec`: what a mode name means, parsed from the mode grammar in exactly one place.

Design facts:
- Grammar: `BASE[+ENCODING][+REPAIR]`, where BASE is full, prefix, naive or rerope;
  ENCODING is sink, lead or bare; REPAIR is one of repair.py's (boundary:K, query:R, a
  '+'-joined union of those, blend:R, auto[:TARGET]). Every command that takes a mode
  (query, bench, doctor, serve) resolves it here, so a name means the same everywhere.
- The encoding is always explicit once resolved, and it says which library chunks a mode
  reads: `sink` (behind the encoding context E, the system header: the library default),
  `lead` (behind E and a fixed neutral lead-in) or `bare` (behind nothing). Without one,
  the library default applies: `rerope` is `rerope+sink`, and bare chunks are `rerope+bare`.
- `full` and `prefix` read no chunk KV; their prompt opens with E like every other mode's,
  so their encoding is `sink`, and they take no repair.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvlib.errors import InputError

BASES = ("full", "prefix", "naive", "rerope")
ENCODINGS = ("sink", "lead", "bare")
DEFAULT_ENCODING = "sink"
# `--modes all`: every base, each encoding and each repair family once.
ALL_MODES = ("full", "prefix", "naive", "rerope", "naive+bare", "rerope+bare", "rerope+lead",
             "rerope+boundary:16", "rerope+lead+boundary:16", "rerope+blend:0.15", "rerope+auto")
MODE_HELP = ("a mode is BASE[+ENCODING][+REPAIR]: BASE full, prefix, naive or rerope; ENCODING sink (default), "
             "lead or bare; REPAIR boundary:K, query:R, blend:R, auto[:TARGET] or a union like boundary:8+query:0.05")


@dataclass(frozen=True)
class ModeSpec:
    base: str  # full, prefix, naive, rerope
    encoding: str  # sink, lead, bare: which library chunks the mode reads
    repair: str | None = None  # a repair name (repair.parse_repair), or None

    @property
    def name(self) -> str:
        """The canonical, fully explicit name: `rerope+sink+auto`, `full`."""
        if self.base in ("full", "prefix"):
            return self.base
        return "+".join([self.base, self.encoding] + ([self.repair] if self.repair else []))

    @property
    def reads_library(self) -> bool:
        return self.base in ("naive", "rerope")

    def as_dict(self) -> dict:
        return {"base": self.base, "encoding": self.encoding, "repair": self.repair}


def parse_mode(mode: str, repair: str | None = None) -> ModeSpec:
    """The one parser of mode names; `repair` (e.g. a separate --repair option) is appended."""
    from kvlib.engine.repair import parse_repair

    text = mode.strip() + (f"+{repair.strip()}" if repair else "")
    base, *rest = text.split("+")
    if base not in BASES:
        raise InputError(f"unknown mode '{text}'; {MODE_HELP}")
    encodings = [r for r in rest if r in ENCODINGS]
    repair_name = "+".join(r for r in rest if r not in ENCODINGS) or None
    if len(encodings) > 1:
        raise InputError(f"unknown mode '{text}': choose one encoding ({', '.join(ENCODINGS)})")
    if base in ("full", "prefix") and (repair_name or encodings):
        raise InputError(f"unknown mode '{text}': {base} takes no encoding or repair")
    if repair_name:
        parse_repair(repair_name)  # fail on a typo before any work
    return ModeSpec(base, encodings[0] if encodings else DEFAULT_ENCODING, repair_name)


def parse_modes(text: str) -> list[ModeSpec]:
    """'all' or a comma list, in order, duplicates (by resolved spec) dropped."""
    names = list(ALL_MODES) if text.strip() == "all" else [m.strip() for m in text.split(",") if m.strip()]
    if not names:
        raise InputError(f"no modes given; {MODE_HELP}")
    specs = [parse_mode(m) for m in names]
    return sorted(set(specs), key=specs.index)
