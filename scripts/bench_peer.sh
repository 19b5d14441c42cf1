#!/usr/bin/env bash
# `make bench-peer`: build llama-cpp-python from its PyPI source once (about 17 minutes on 2 cores; the
# wheel is cached in .peer/wheels), then time llama.cpp and kvlib on the same token ids.
# Usage: bench_peer.sh VENV_BIN HOME OUT
set -euo pipefail
BIN=${1:-.venv/bin}
HOME_DIR=${2:-.kvlib-demo}
OUT=${3:-results/peer}
PEER=.peer
VERSION=0.3.36
mkdir -p "$PEER/wheels"
if ! ls "$PEER"/wheels/llama_cpp_python-"$VERSION"-*.whl >/dev/null 2>&1; then
  echo "== building llama-cpp-python $VERSION from source (native CPU flags; cached in $PEER/wheels)"
  python3 -m pip wheel --no-cache-dir --no-deps "llama-cpp-python==$VERSION" -w "$PEER/wheels"
fi
if [ ! -x "$PEER/venv/bin/python" ]; then
  python3 -m venv "$PEER/venv"
  "$PEER/venv/bin/pip" install -q "$PEER"/wheels/llama_cpp_python-"$VERSION"-*.whl numpy diskcache jinja2 typing-extensions
fi
"$BIN/kvlib" bench --peer "$PEER" --home "$HOME_DIR" --out "$OUT" --repeats 3
