#!/usr/bin/env bash
# TTFT before and after a change, in turns on the same machine: `kvlib doctor --bench --json` from a
# worktree of BASE_REV and from this checkout, alternately, ROUNDS times each, into OUT/{base,head}-N.json.
# Usage: scripts/ab_doctor.sh BASE_REV HOME OUT [ROUNDS]
set -euo pipefail
BASE_REV=$1 HOME_DIR=$2 OUT=$3 ROUNDS=${4:-3}
PY=${PY:-.venv/bin/python}
BASE_TREE=$(mktemp -d)/base
git worktree add -q --detach "$BASE_TREE" "$BASE_REV"
trap 'git worktree remove --force "$BASE_TREE"' EXIT
mkdir -p "$OUT"
for i in $(seq 1 "$ROUNDS"); do
  for side in base head; do
    tree=$([ "$side" = base ] && echo "$BASE_TREE" || pwd)
    PYTHONPATH="$tree" HF_HUB_OFFLINE=1 "$PY" -c "from kvlib.cli.app import main; main()" \
      doctor --bench --json --home "$HOME_DIR" > "$OUT/$side-$i.json"
    echo "$side $i: $(PYTHONPATH=. "$PY" -c "import json,sys; b=json.load(open(sys.argv[1]))['bench']; print(f\"full {b['full_ttft_s']*1e3:.0f} ms, rerope {b['rerope_ttft_s']*1e3:.1f} ms, {b['speedup']:.1f}x\")" "$OUT/$side-$i.json")"
  done
done
