#!/bin/bash
# profile the reuse server's engine during one concurrency-8 level (after levels 1 and 4 warm it)
set -u
cd /work/main
PY=.venv/bin/python
H=/tmp/ph/prof-home; rm -rf $H; mkdir -p $H; ln -s /work/main/build/guard-home/models $H/models
KEY=$(.venv/bin/kvlib keys add bench --home $H | tail -1)
HF_HUB_OFFLINE=1 .venv/bin/kvlib serve --home $H --port 8140 > /tmp/ph/prof-serve.log 2>&1 &
for i in $(seq 180); do curl -fs localhost:8140/healthz >/dev/null && break; sleep 1; done
PID=$(pgrep -f "kvlib serve --home $H" | head -1)
HF_HUB_OFFLINE=1 .venv/bin/kvlib loadgen http://127.0.0.1:8140/v1 --api-key $KEY --label w --out /tmp/ph/prof --concurrency 1,4 --sessions 8 --turns 3 --max-tokens 16 --max-seconds 120 | grep "^concurrency"
.venv/bin/py-spy record -p $PID -r 200 -f raw -o /tmp/ph/prof.raw --threads --nonblocking &
SPY=$!
sleep 1
HF_HUB_OFFLINE=1 .venv/bin/kvlib loadgen http://127.0.0.1:8140/v1 --api-key $KEY --label p --out /tmp/ph/prof --concurrency 8 --sessions 8 --turns 3 --max-tokens 16 --max-seconds 120 | grep "^concurrency"
kill -INT $SPY; wait $SPY
kill -INT $PID
