#!/usr/bin/env bash
# The README's first command (`make demo`): ingest the bundled corpus, answer three of its
# questions with --compare, and print TTFT by mode. Usage: demo.sh VENV_BIN HOME
set -euo pipefail
BIN=${1:-.venv/bin}
HOME_DIR=${2:-.kvlib-demo}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
KV="$BIN/kvlib"

echo "== kvlib ingest examples/corpus (first run encodes; a second run is a no-op)"
"$KV" ingest examples/corpus --home "$HOME_DIR"

for q in "How many arches does the Skelder Viaduct have?" \
         "On what date did the Ostrand–Kell railway line open?" \
         "Who was the captain of the Margarethe Lund on her last voyage?"; do
  echo
  echo "== kvlib query \"$q\" --compare"
  "$KV" query "$q" --home "$HOME_DIR" --compare --max-new-tokens 32
done

echo
echo "== TTFT by mode on the corpus questions"
"$KV" bench --data examples --limit 5 --modes full,prefix,naive+sink,rerope+sink --home "$HOME_DIR" --out "$HOME_DIR/bench"
