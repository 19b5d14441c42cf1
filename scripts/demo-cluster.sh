#!/usr/bin/env bash
# Two kvlib nodes on one machine, separate homes, one shared S3 store and PostgreSQL manifest
# (from `make services`): node A ingests the corpus, node B answers from A's KV, then B's
# fetch times (local tier, S3, recompute) are measured; last, two `kvlib serve` nodes: B answers
# the load sessions from what A stored, cold local tier then warm (scripts/cluster_serve.py).
# Usage: demo-cluster.sh VENV_BIN ROOT
set -euo pipefail
BIN=${1:-.venv/bin}
ROOT=${2:-.kvlib-cluster}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
set -a; . .services/env; set +a
KV="$BIN/kvlib"
Q="How many arches does the Skelder Viaduct have?"

echo "== node A: kvlib ingest examples/corpus"
"$KV" ingest examples/corpus --home "$ROOT/node-a"

echo "== node B (cold local tier): kvlib query \"$Q\""
"$KV" ingest examples/corpus/history --home "$ROOT/node-b" >/dev/null  # creates B's home; every chunk dedups
"$KV" query "$Q" --home "$ROOT/node-b" --max-new-tokens 32

echo "== node B (warm local tier): the same question"
"$KV" query "$Q" --home "$ROOT/node-b" --max-new-tokens 32

echo "== fetch time of one 512-token chunk: local tier, S3, recompute"
"$KV" fetch-bench --home "$ROOT/node-b"
"$KV" sync --home "$ROOT/node-b" --verify

echo "== two kvlib serve nodes: B answers the load sessions from A's stores, cold then warm local tier"
"$BIN/python" scripts/cluster_serve.py --root "$ROOT" --models "$ROOT/node-a/models"
echo "(table in $ROOT/serve-load/summary.md, every run in $ROOT/serve-load/*.json)"
