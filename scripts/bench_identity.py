"""Check that two bench runs agree bit for bit on quality and reuse, mode by resolved spec.

Usage: python scripts/bench_identity.py BEFORE/results.json AFTER/results.json [--old-grammar]

KL to full is deterministic (same model, same ids, same kernels), so a refactor that keeps
behaviour must reproduce kl_to_full, recompute_frac and hit_rate exactly for every mode.
--old-grammar reads BEFORE's mode names as the bench did before the one-door redesign, where
a mode without an encoding read bare chunks (`rerope` was `rerope+bare`).
"""

from __future__ import annotations

import json
import sys

from kvlib.engine.spec import parse_mode

FIELDS = ("kl_to_full", "recompute_frac", "hit_rate", "nll", "attn_sim")


def old_name(mode: str) -> str:
    base, *rest = mode.split("+")
    if base in ("naive", "rerope") and not any(r in ("sink", "lead", "bare") for r in rest):
        rest.insert(0, "bare")
    return "+".join([base, *rest])


def rows(path: str, old: bool) -> dict:
    results = json.load(open(path))["results"]
    return {(parse_mode(old_name(r["mode"]) if old else r["mode"]).name, r["order"]): r for r in results}


def main(argv: list[str]) -> int:
    before, after = rows(argv[1], "--old-grammar" in argv), rows(argv[2], False)
    bad = 0
    for key in sorted(set(before) | set(after)):
        if key not in before or key not in after:
            print(f"{key}: only in {'before' if key in before else 'after'}")
            bad += 1
            continue
        diffs = [f"{f} {before[key][f]!r} != {after[key][f]!r}" for f in FIELDS if before[key][f] != after[key][f]]
        print(f"{key[0]:<28} {key[1]:<9} {'identical' if not diffs else '; '.join(diffs)}")
        bad += bool(diffs)
    print(f"{len(before)} modes compared, {bad} differ")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
