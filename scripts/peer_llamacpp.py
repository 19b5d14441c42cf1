"""llama.cpp's side of `make bench-peer`: full prefill and its own prefix reuse, on kvlib's token ids.

Runs in the peer virtual environment (llama-cpp-python built from its PyPI source), never in
kvlib's. Reads a JSON file of prompts written by kvlib (`{"name": {"context": [ids], "suffix": [ids]}}`),
converts the GGUF once with llama.cpp's own quantize API to the weight type kvlib computes in
(`--ftype`: bf16 where the CPU has native bf16, f32 on an AVX2-only CPU), and prints JSON timings:
- full: a fresh KV cache, the whole prompt (context + suffix) evaluated, then one token sampled;
- prefix_reuse: the context evaluated once and kept; each timed run removes what followed it
  (Llama.eval drops KV beyond n_tokens) and evaluates the suffix, then samples one token;
- decode_tok_s: single-token steps after the whole prompt.
Medians over --repeats after one warm-up.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import llama_cpp

FTYPES = {"f32": 0, "f16": 1, "bf16": 32}  # llama.h: LLAMA_FTYPE_ALL_F32, _MOSTLY_F16, _MOSTLY_BF16


def convert(src: Path, dst: Path, ftype: str) -> None:
    if dst.exists():
        return
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[ftype]
    params.allow_requantize = True  # the bundled GGUF is Q4_1: dequantized, as kvlib dequantizes it
    tmp = dst.with_suffix(".tmp")
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)
    if rc != 0:
        raise SystemExit(f"llama_model_quantize failed with {rc}")
    tmp.rename(dst)


def first_token(llm, ids: list[int]) -> float:
    t0 = time.perf_counter()
    llm.eval(ids)
    llm.sample(temp=0.0)
    return time.perf_counter() - t0


def time_full(llm, ids: list[int], repeats: int) -> list[float]:
    runs = []
    for _ in range(repeats + 1):
        llm.reset()
        runs.append(first_token(llm, ids))
    return runs[1:]


def time_prefix_reuse(llm, context: list[int], suffix: list[int], repeats: int) -> list[float]:
    llm.reset()
    llm.eval(context)
    runs = []
    for _ in range(repeats + 1):
        llm.n_tokens = len(context)  # keep the context's KV, forget the previous suffix
        runs.append(first_token(llm, suffix))
    return runs[1:]


def time_decode(llm, ids: list[int], steps: int = 32) -> float:
    llm.reset()
    llm.eval(ids)
    token = llm.sample(temp=0.0)
    t0 = time.perf_counter()
    for _ in range(steps):
        llm.eval([token])
        token = llm.sample(temp=0.0)
    return steps / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True, help="the converted GGUF (made once)")
    ap.add_argument("--ftype", choices=sorted(FTYPES), default="bf16")
    ap.add_argument("--prompts", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    convert(args.gguf, args.out, args.ftype)
    prompts = json.loads(args.prompts.read_text())
    n_ctx = max(len(p["context"]) + len(p["suffix"]) for p in prompts.values()) + 64
    llm = llama_cpp.Llama(model_path=str(args.out), n_ctx=n_ctx, n_threads=args.threads,
                          n_threads_batch=args.threads, n_batch=512, verbose=False)
    out = {"llama_cpp_version": llama_cpp.__version__, "threads": args.threads, "ftype": args.ftype, "prompts": {}}
    for name, p in prompts.items():
        ids = p["context"] + p["suffix"]
        full = time_full(llm, ids, args.repeats)
        reuse = time_prefix_reuse(llm, p["context"], p["suffix"], args.repeats)
        out["prompts"][name] = {"tokens": len(ids), "suffix_tokens": len(p["suffix"]),
                                "full_s": statistics.median(full), "full_runs_s": full,
                                "prefix_reuse_s": statistics.median(reuse), "prefix_reuse_runs_s": reuse,
                                "decode_tok_s": time_decode(llm, ids)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
