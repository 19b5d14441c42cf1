#!/usr/bin/env bash
# The server load benchmark of the README ("The server under load"): a --mode full server on a cold home,
# a --mode prefix server (exact prefix caching alone, as serving engines do) and a reuse server (the
# default spec, with its prefix cache), each on another cold home, each driven by `kvlib loadgen` at
# concurrency 1/4/8/16, with peak resident memory from GNU time. Run it alone on the machine.
#   OUT=results/serve bash scripts/serve_load.sh
set -euo pipefail
OUT=${OUT:-results/serve}
WORK=${WORK:-$(mktemp -d)}
KV=${KV:-.venv/bin/kvlib}
MODELS=${MODELS:-$HOME/.kvlib/models}  # linked into each home when it exists (saves the first conversion)
LOAD=(--concurrency 1,4,8,16 --sessions 8 --turns 3 --max-tokens 16 --max-seconds 120)
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
mkdir -p "$OUT"

wait_healthy() {  # $1 port
  for _ in $(seq 1 240); do
    curl -fsS "http://127.0.0.1:$1/healthz" >/dev/null 2>&1 && return 0
    sleep 1
  done
  echo "serve_load: the server on port $1 did not come up" >&2
  return 1
}

run_one() {  # $1 label, $2 port, rest: extra serve flags
  local label=$1 port=$2
  shift 2
  local home="$WORK/$label"
  mkdir -p "$home"
  [ -e "$home/models" ] || [ ! -d "$MODELS" ] || ln -s "$(realpath "$MODELS")" "$home/models"
  local key
  key=$("$KV" keys add bench --home "$home" | tail -1)
  /usr/bin/time -v "$KV" serve --home "$home" --port "$port" "$@" >"$OUT/memory-$label.txt" 2>&1 &
  local timer=$!
  wait_healthy "$port"
  local baseline=()
  [ "$label" != full ] && [ -f "$OUT/full.json" ] && baseline=(--baseline "$OUT/full.json")
  "$KV" loadgen "http://127.0.0.1:$port/v1" --api-key "$key" --label "$label" --out "$OUT" \
    "${LOAD[@]}" "${baseline[@]}"
  # GNU time ignores SIGINT itself, so signal its child, the server, which then shuts down cleanly.
  kill -INT "$(pgrep -P "$timer")"
  wait "$timer"
  grep -E "Maximum resident" "$OUT/memory-$label.txt"
}

run_one full 8101 --mode full
run_one prefix 8103 --mode prefix
run_one reuse 8102
