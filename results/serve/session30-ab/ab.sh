#!/bin/bash
# A/B of the reuse server at two commits: cold home, levels 1,4 warm-up, then c=8 three times
set -u
PY=/work/main/.venv/bin/python
for round in 1 2; do
for c in ba80531 a2aae03; do
  H=/tmp/ph/abh-$c-$round; rm -rf $H; mkdir -p $H; ln -s /work/main/build/guard-home/models $H/models
  KEY=$(PYTHONPATH=/tmp/ph/wt-$c $PY -m kvlib keys add bench --home $H | tail -1)
  (cd /tmp/ph/wt-$c && HF_HUB_OFFLINE=1 PYTHONPATH=/tmp/ph/wt-$c $PY -m kvlib serve --home $H --port 8130 > /tmp/ph/ab-serve.log 2>&1 &)
  for i in $(seq 180); do curl -fs localhost:8130/healthz >/dev/null && break; sleep 1; done
  HF_HUB_OFFLINE=1 PYTHONPATH=/tmp/ph/wt-$c $PY -m kvlib loadgen http://127.0.0.1:8130/v1 --api-key $KEY --label ab-$c-$round --out /tmp/ph/ab --concurrency 1,4,8,8,8 --sessions 8 --turns 3 --max-tokens 16 --max-seconds 120 2>&1 | grep "^concurrency" | sed "s/^/$c r$round /"
  pkill -INT -f "kvlib serve --home $H"; sleep 4
done
done
