"""Two calibrate.json files of the same requests and ladder, measured along different targets
(`kvlib calibrate --target gold` and `--target full`): per rung, mean KL to full under each, the
Spearman rank correlation of the two over the requests, the shares within 0.05 / 0.1 / 0.2, and mean
TTFT against full's. numpy only, no model.

    python scripts/compare_kl_targets.py GOLD/calibrate.json FULL/calibrate.json
"""

from __future__ import annotations

import json
import sys

import numpy as np


def ranks(values: np.ndarray) -> np.ndarray:
    return np.argsort(np.argsort(values))


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    gold, full = (json.load(open(p)) for p in sys.argv[1:])
    if gold["ladder"] != full["ladder"]:
        sys.exit("the two files were measured on different ladders")
    g = {r["record"]: r for r in gold["rows"]}
    f = {r["record"]: r for r in full["rows"]}
    ids = [k for k in g if k in f]
    tokens = [f[i].get("target_tokens", 0) for i in ids]
    print(f"{len(ids)} requests in both; {gold.get('target', 'gold')} against {full.get('target', 'gold')}; "
          f"second file's target tokens per request: mean {np.mean(tokens):.1f}")
    print("| rung | mean KL (1st) | mean KL (2nd) | Spearman | <= 0.05 (1st / 2nd) | <= 0.1 | <= 0.2 | mean TTFT vs full |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for j, name in enumerate(gold["ladder"]):
        a = np.array([g[i]["kl"][j] for i in ids])
        b = np.array([f[i]["kl"][j] for i in ids])
        rho = np.corrcoef(ranks(a), ranks(b))[0, 1]
        ttft = np.mean([f[i]["ttft_s"][j] for i in ids]) / np.mean([f[i]["ttft_s"][-1] for i in ids])
        shares = " | ".join(f"{np.mean(a <= t):.0%} / {np.mean(b <= t):.0%}" for t in (0.05, 0.1, 0.2))
        print(f"| {name or 'rerope'} | {a.mean():.3f} | {b.mean():.3f} | {rho:.2f} | {shares} | {ttft:.2f}x |")


if __name__ == "__main__":
    main()
