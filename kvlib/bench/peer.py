"""`kvlib bench --peer DIR` (run by `make bench-peer`): kvlib against llama.cpp on the same token ids.

Design facts:
- Two prompts, [E][chunks][question]: ~1.3k tokens (4 chunks of 320) and ~4.1k (8 of 512),
  the doctor's synthetic chunk text, with the doctor's question as the ~30-token suffix.
- llama.cpp (llama-cpp-python built from its PyPI source in the peer environment DIR/venv,
  the bundled GGUF converted by its own quantize API to the weights kvlib computes in: BF16
  where kvlib computes in bf16, F32 where it computes in float32, as on an AVX2-only CPU,
  where llama.cpp has no fast bf16 products either) is timed by
  scripts/peer_llamacpp.py in a subprocess: full prefill, and its own prefix reuse, the one
  case where it can reuse at all (the identical context, a new suffix).
- kvlib, in this process, with the same threads: full prefill, and `rerope` with the chunks
  read from a library in the given order and shuffled (llama.cpp's order stays identical).
- The two engines run alternately, `rounds` times, and medians are reported, so a drift in
  the shared machine's speed hits both alike.
"""

from __future__ import annotations

import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

from kvlib.errors import InputError

SHAPES = {"1.3k": (4, 320), "4.1k": (8, 512)}


def prompts(engine) -> dict:
    from kvlib.engine.doctor import SAMPLE_QUESTION, synthetic_chunks

    out = {}
    for name, (n, size) in SHAPES.items():
        chunks = synthetic_chunks(engine, n, size)
        out[name] = {"chunks": chunks, "suffix": engine.suffix_ids(SAMPLE_QUESTION)}
    return out


def peer_prompts(engine, ps: dict) -> dict:
    e_ids = [int(t) for t in engine.context.token_ids]
    return {name: {"context": e_ids + [int(t) for c in p["chunks"] for t in c.token_ids], "suffix": p["suffix"]}
            for name, p in ps.items()}


def time_kvlib(engine, library, keys: list, spec, suffix: list, repeats: int) -> float:
    from kvlib.bench.hot_path import one_request

    one_request(engine, library, keys, spec, suffix, profile=False)
    return statistics.median(one_request(engine, library, keys, spec, suffix, profile=False)[0]
                             for _ in range(repeats))


def store(engine, library, chunks) -> list:
    from kvlib.config import PUBLIC

    return [library.put(tenant=PUBLIC, public=True, model_fp=engine.lm.fingerprint, context_id=engine.context_id,
                        token_ids=c.token_ids, k_sem=c.k_sem, v=c.v, text_preview="peer bench chunk").key
            for c in chunks]


def decode_rate(engine, library, keys: list, suffix: list, steps: int = 32) -> float:
    """kvlib's decode tok/s after the cached prompt (greedy; stops early only at a stop token)."""
    from kvlib.engine.compose import ChunkKV
    from kvlib.engine.spec import parse_mode

    chunks = [ChunkKV(s.token_ids, s.k_sem, s.v) for s in library.get_many(keys)]
    return engine.answer(parse_mode("rerope"), chunks, suffix_ids=suffix, max_new_tokens=steps + 1).decode_tok_s


def kvlib_round(engine, library, ps: dict, keys: dict, repeats: int) -> dict:
    from kvlib.engine.spec import parse_mode

    out = {}
    for name, p in ps.items():
        shuffled = keys[name][:]
        random.Random(0).shuffle(shuffled)
        out[name] = {"full_s": time_kvlib(engine, library, keys[name], parse_mode("full"), p["suffix"], 1),
                     "rerope_given_s": time_kvlib(engine, library, keys[name], parse_mode("rerope"), p["suffix"], repeats),
                     "rerope_shuffled_s": time_kvlib(engine, library, shuffled, parse_mode("rerope"), p["suffix"], repeats),
                     "decode_tok_s": decode_rate(engine, library, keys[name], p["suffix"])}
    return out


PEER_FTYPES = {"bfloat16": "bf16", "float32": "f32", "float16": "f16"}


def peer_ftype(lm) -> str:
    """llama.cpp's weight type for kvlib's compute dtype (the same precision on both sides)."""
    return PEER_FTYPES[str(lm.dtype).replace("torch.", "")]


def peer_round(peer_dir: Path, prompts_file: Path, gguf: Path, threads: int, repeats: int, ftype: str) -> dict:
    python = peer_dir / "venv" / "bin" / "python"
    if not python.exists():
        raise InputError(f"no peer environment at {peer_dir}/venv: run `make bench-peer`")
    script = Path(__file__).resolve().parents[2] / "scripts" / "peer_llamacpp.py"
    cmd = [str(python), str(script), "--gguf", str(gguf), "--out", str(peer_dir / f"model-{ftype}.gguf"),
           "--ftype", ftype, "--prompts", str(prompts_file), "--threads", str(threads), "--repeats", str(repeats)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise InputError(f"llama.cpp timing failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout)["prompts"]


def run_peer(engine, library, peer_dir: Path, home: Path, *, rounds: int = 3, repeats: int = 3) -> dict:
    """The default model's GGUF (the one kvlib dequantizes) is what llama.cpp converts (peer_ftype)."""
    import torch

    from kvlib.engine import models_registry as registry

    library.register_model(engine.lm.fingerprint, engine.lm.name, engine.lm.config_summary)
    ps = prompts(engine)
    keys = {name: store(engine, library, p["chunks"]) for name, p in ps.items()}
    prompts_file = peer_dir / "prompts.json"
    prompts_file.write_text(json.dumps(peer_prompts(engine, ps)))
    threads = torch.get_num_threads()
    gguf = registry.installed_file(registry.SMOLLM2, home)
    kv_rounds, peer_rounds = [], []
    for _ in range(rounds):  # alternate, so both see the same machine
        peer_rounds.append(peer_round(peer_dir, prompts_file, gguf, threads, repeats, peer_ftype(engine.lm)))
        kv_rounds.append(kvlib_round(engine, library, ps, keys, repeats))
        time.sleep(0.5)
    return summarize(engine, ps, kv_rounds, peer_rounds, threads, rounds)


def summarize(engine, ps, kv_rounds, peer_rounds, threads: int, rounds: int) -> dict:
    rows = {}
    for name, p in ps.items():
        med = lambda rs, k: statistics.median(r[name][k] for r in rs)  # noqa: E731
        rows[name] = {"tokens": engine.context.n_tokens + sum(c.n_tokens for c in p["chunks"]) + len(p["suffix"]),
                      "suffix_tokens": len(p["suffix"]),
                      "llama_cpp_full_s": med(peer_rounds, "full_s"),
                      "llama_cpp_prefix_reuse_s": med(peer_rounds, "prefix_reuse_s"),
                      "llama_cpp_decode_tok_s": med(peer_rounds, "decode_tok_s"),
                      "kvlib_full_s": med(kv_rounds, "full_s"), "kvlib_rerope_given_s": med(kv_rounds, "rerope_given_s"),
                      "kvlib_rerope_shuffled_s": med(kv_rounds, "rerope_shuffled_s"),
                      "kvlib_decode_tok_s": med(kv_rounds, "decode_tok_s")}
        r = rows[name]
        r["rerope_shuffled_vs_llama_cpp_reuse"] = r["llama_cpp_prefix_reuse_s"] / r["kvlib_rerope_shuffled_s"]
    return {"settings": {"model": engine.lm.name, "dtype": str(engine.lm.dtype).replace("torch.", ""),
                         "llama_cpp_weights": peer_ftype(engine.lm), "threads": threads, "rounds": rounds, "python": sys.version.split()[0]}, "rows": rows}


def report_lines(report: dict) -> list[str]:
    head = ["prompt", "llama.cpp full", "kvlib full", "llama.cpp prefix reuse (identical order)",
            "kvlib rerope (given)", "kvlib rerope (shuffled)", "kvlib shuffled vs llama.cpp reuse",
            "decode tok/s llama.cpp / kvlib"]
    s = report["settings"]
    lines = [f"kvlib computes in {s['dtype']}; llama.cpp runs the same GGUF converted to "
             f"{s.get('llama_cpp_weights', 'bf16').upper()}; {s['threads']} threads each, {s['rounds']} alternating "
             "rounds, medians.", "",
             "| " + " | ".join(head) + " |", "|:---|" + "---:|" * (len(head) - 1)]
    for name, r in report["rows"].items():
        lines.append(f"| {name} ({r['tokens']:,} tok) | {r['llama_cpp_full_s']:.2f} s | {r['kvlib_full_s']:.2f} s | "
                     f"{r['llama_cpp_prefix_reuse_s'] * 1e3:.0f} ms | {r['kvlib_rerope_given_s'] * 1e3:.0f} ms | "
                     f"{r['kvlib_rerope_shuffled_s'] * 1e3:.0f} ms | {r['rerope_shuffled_vs_llama_cpp_reuse']:.2f}x | "
                     f"{r['llama_cpp_decode_tok_s']:.1f} / {r['kvlib_decode_tok_s']:.1f} |")
    return lines
