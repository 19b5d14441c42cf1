"""The passage-length table: per merged passage length, each mode's share of the KL gap closed and
its share of requests within a KL budget B, from `kvlib bench` results (kl_per_request).

    python scripts/passage_length_table.py results/passage-length --lengths 128,256,512 --budget 0.2
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def rows(results: list[dict], budget: float) -> dict[str, dict]:
    base = next(r for r in results if r["mode"].count("+") == 1 and r["mode"].startswith("rerope+"))
    out = {}
    for r in results:
        if r["mode"] == "full":
            continue
        kls = r.get("kl_per_request") or []
        out[r["mode"]] = {"gap_closed": 1 - r["kl_to_full"] / base["kl_to_full"] if base["kl_to_full"] else None,
                          "within": sum(k <= budget for k in kls) / len(kls) if kls else None,
                          "kl": r["kl_to_full"], "n": r["n"]}
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("root", type=Path, help="folder holding one bench --out folder per length")
    p.add_argument("--lengths", default="128,256,512")
    p.add_argument("--budget", type=float, default=0.2)
    args = p.parse_args()
    lengths = [n.strip() for n in args.lengths.split(",")]
    table = {n: rows(json.loads((args.root / n / "results.json").read_text())["results"], args.budget) for n in lengths}
    modes = list(next(iter(table.values())))
    pct = lambda x: "" if x is None else f"{100 * x:.0f}%"  # noqa: E731
    print(f"| mode | " + " | ".join(f"{n} tok: gap closed / KL <= {args.budget:g}" for n in lengths) + " |")
    print("|---|" + "---:|" * len(lengths))
    for m in modes:
        cells = [f"{pct(table[n][m]['gap_closed'])} / {pct(table[n][m]['within'])}" if m in table[n] else "" for n in lengths]
        print(f"| {m} | " + " | ".join(cells) + " |")
    (args.root / "table.json").write_text(json.dumps(table, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
