"""`kvlib bench --hot-path`: where the cached path's TTFT goes, against the machine's floor.

Design facts:
- A prompt is [E][n x 512-token chunks][question] at 1k, 4k and 8k context tokens, the
  chunks stored in a scratch library of the same home and read back warm, as a repeat
  request would. Each measurement is one `Engine.answer` in the spec given (default
  `rerope`, the library default), one token decoded: TTFT.
- Headline TTFT is the median of unprofiled runs after a warm-up. The split comes from
  separate runs with engine stage marks on (engine/stages.py): KV load (library read),
  rotation, cache assembly (allocation and copies), attention, the rest of the layers
  (projections, MLP, norms, rope of q/k, cache writes), logits, and what remains (Python,
  dispatch, embedding). Medians per part.
- Floors are measured here, not assumed: the compute dtype's matmul rate on the model's
  own layer shapes at the question's length (the faster of the plain and the prepacked
  product) and on one large square product, and memory bandwidth as a large tensor copy,
  measured before and after each context's runs (the faster of the two counts: this
  machine's speed drifts by a quarter within minutes). A part's floor is its FLOPs over the
  matmul rate, or its bytes over the bandwidth; the TTFT floor is their sum. `full` prefill
  of the same prompt is timed beside it, for the speedup.
"""

from __future__ import annotations

import math
import statistics
import time

PARTS = ("load", "rotate", "assemble", "attention", "proj_mlp", "logits", "other")
CHUNK_TOKENS = 512
CONTEXTS = (1024, 4096, 8192)


def matmul_rate(lm, m: int, k: int, n: int, repeats: int = 20) -> float:
    """FLOP/s of an [m, k] x [k, n] product in the compute dtype (median of repeats): the faster
    of torch's plain product and the prepacked one the engine's layers run (engine/fused.py)
    where this dtype packs, so that no part of the engine can beat its floor by kernel choice."""
    import torch

    from kvlib.engine.fused import can_pack, linear, pack

    a = torch.randn(m, k, dtype=lm.dtype, device=lm.device)
    w = torch.randn(n, k, dtype=lm.dtype, device=lm.device)
    products = [lambda: torch.matmul(a, w.t())]
    if can_pack(w):
        packed = pack(w)
        products.append(lambda: linear(a, w, None, packed))
    best = math.inf
    for product in products:
        times = []
        for i in range(repeats + 2):
            t0 = time.perf_counter()
            product()
            if i >= 2:
                times.append(time.perf_counter() - t0)
        best = min(best, statistics.median(times))
    return 2 * m * k * n / best


def bandwidth(lm, n_bytes: int = 1 << 28, repeats: int = 5) -> float:
    """Bytes/s of a large tensor copy (read + write counted)."""
    import torch

    src = torch.empty(n_bytes // 2, dtype=torch.bfloat16, device=lm.device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return 2 * n_bytes / statistics.median(times[1:])


def floors(lm, t_question: int) -> dict:
    """The machine's rates: matmul on the model's projection shape at the question's length and
    on a large square product, and copy bandwidth."""
    hidden = lm.config_summary["hidden_size"]
    return {"matmul_flops_model_shape": matmul_rate(lm, t_question, hidden, 4 * hidden),
            "matmul_flops_large": matmul_rate(lm, 2048, 2048, 2048, repeats=5),
            "bandwidth_bytes_s": bandwidth(lm)}


def work(lm, n_ctx: int, t_q: int) -> dict:
    """FLOPs and bytes of each part for a t_q-token question over n_ctx cached slots."""
    from kvlib.engine.model import matmul_params

    s, c = lm.config_summary, matmul_params(lm)
    heads, kv_heads, dim, layers = s["num_attention_heads"], s["num_key_value_heads"], s["head_dim"], s["num_hidden_layers"]
    kv_bytes = 2 * layers * kv_heads * n_ctx * dim * 2  # K and V, 2 bytes per element
    return {"proj_mlp_flops": 2 * t_q * c["layer"] * layers,
            "attention_flops": 2 * 2 * heads * t_q * (n_ctx + t_q) * dim * layers,
            "logits_flops": 2 * c["head"],
            "kv_bytes": kv_bytes}


def part_floors(w: dict, rates: dict, copy_in_rotation: bool = False) -> dict:
    """Seconds each part could take at the measured rates (load, rotation and assembly are memory bound:
    load reads the stored KV once; rotation reads and writes K; assembly copies V into the cache). Where
    the values are copied in the rotation's pass (rope_kernel's run of a bf16 cache), that pass's floor
    is both copies' and assembly's (allocation, E's slots) is 0: the same sum."""
    flops, bw = rates["matmul_flops_model_shape"], rates["bandwidth_bytes_s"]
    copy = w["kv_bytes"] / bw
    rotate, assemble = (2 * copy, 0.0) if copy_in_rotation else (copy, copy)
    return {"load": copy, "rotate": rotate, "assemble": assemble,
            "attention": w["attention_flops"] / flops, "proj_mlp": w["proj_mlp_flops"] / flops,
            "logits": w["logits_flops"] / flops, "other": 0.0}


def copy_in_rotation(lm) -> bool:
    """Whether a run of stored chunks reaches this model's cache through rope_kernel's one pass, which
    copies the values as it rotates the keys (a bf16 cache where the kernel builds)."""
    import torch

    from kvlib.engine import rope_kernel

    return lm.dtype == torch.bfloat16 and lm.device.type == "cpu" and rope_kernel.build() is not None


def scratch_chunks(engine, library, n_ctx: int) -> list:
    """Store n_ctx / 512 synthetic chunks (public, the library default encoding); return their keys."""
    from kvlib.config import PUBLIC
    from kvlib.engine.doctor import synthetic_chunks

    keys = []
    for kv in synthetic_chunks(engine, max(1, n_ctx // CHUNK_TOKENS), CHUNK_TOKENS):
        keys.append(library.put(tenant=PUBLIC, public=True, model_fp=engine.lm.fingerprint,
                                context_id=engine.context_id, token_ids=kv.token_ids, k_sem=kv.k_sem,
                                v=kv.v, text_preview="hot-path scratch chunk").key)
    return keys


def one_request(engine, library, keys, spec, suffix, profile: bool) -> tuple[float, dict]:
    """(TTFT, stage seconds) of one cached request, from the library read to the first token."""
    from contextlib import nullcontext

    from kvlib.engine.compose import ChunkKV
    from kvlib.engine.session import sync
    from kvlib.engine.stages import recording

    with recording(engine.lm.device) if profile else nullcontext() as parts:
        sync(engine.lm)
        t0 = time.perf_counter()
        stored = library.get_many(keys, touch=False)
        chunks = [ChunkKV(s.token_ids, s.k_sem, s.v, drift=s.drift_score) for s in stored]
        load = time.perf_counter() - t0
        gen = engine.answer(spec, chunks, suffix_ids=suffix, max_new_tokens=1, t0=t0)
        sync(engine.lm)
    library.touch(keys)  # the uses counted after the first token, as the server and `kvlib query` count them
    parts = dict(parts or {})
    parts["load"] = load
    return gen.ttft_s, parts


def split(parts: dict) -> dict:
    """The marked parts of one profiled request (stages nest: attention is inside the layers)."""
    return {"load": parts["load"], "rotate": parts.get("rotate", 0.0), "assemble": parts.get("assemble", 0.0),
            "attention": parts.get("attention", 0.0),
            "proj_mlp": parts.get("layers", 0.0) - parts.get("attention", 0.0), "logits": parts.get("logits", 0.0)}


def profile_context(engine, library, n_ctx: int, spec, suffix, repeats: int, full_repeats: int) -> dict:
    """One context size: median TTFT (plain and full), the split, work and floors."""
    from kvlib.engine.spec import parse_mode

    keys = scratch_chunks(engine, library, n_ctx)
    one_request(engine, library, keys, spec, suffix, profile=False)  # warm-up: page cache, allocator, tables
    plain = [one_request(engine, library, keys, spec, suffix, profile=False)[0] for _ in range(repeats)]
    profiled = [one_request(engine, library, keys, spec, suffix, profile=True) for _ in range(repeats)]
    splits = [split(p) for _, p in profiled]
    profiled_ttft = statistics.median(t for t, _ in profiled)
    parts = {k: statistics.median(s[k] for s in splits) for k in PARTS if k != "other"}
    parts["other"] = profiled_ttft - sum(parts.values())  # Python, dispatch, embedding: what the marks leave
    full = [one_request(engine, library, keys, parse_mode("full"), suffix, profile=False)[0]
            for _ in range(full_repeats)]
    n_slots = engine.context.n_tokens + len(keys) * CHUNK_TOKENS
    return {"context_tokens": n_slots, "question_tokens": len(suffix), "chunks": len(keys),
            "ttft_s": statistics.median(plain), "ttft_runs_s": plain,
            "profiled_ttft_s": profiled_ttft, "parts_s": parts,
            "full_ttft_s": statistics.median(full), "work": work(engine.lm, n_slots, len(suffix))}


def run_hot_path(engine, library, *, spec, contexts=CONTEXTS, repeats: int = 5, full_repeats: int = 2,
                 progress=None) -> dict:
    import torch

    from kvlib.engine.doctor import SAMPLE_QUESTION
    from kvlib.engine.kernels import statuses
    from kvlib.memory import malloc_tuning

    suffix = engine.suffix_ids(SAMPLE_QUESTION)
    library.register_model(engine.lm.fingerprint, engine.lm.name, engine.lm.config_summary)
    rows, all_rates = [], []
    for n_ctx in contexts:
        # the rates around each context's runs, the faster of before and after: this machine's
        # speed drifts within minutes, and a floor from another minute is not this row's floor
        before = floors(engine.lm, len(suffix))
        row = profile_context(engine, library, n_ctx, spec, suffix, repeats, full_repeats)
        after = floors(engine.lm, len(suffix))
        row["rates"] = rates = {k: max(before[k], after[k]) for k in before}
        all_rates.append(rates)
        row["floor_s"] = part_floors(row["work"], rates, copy_in_rotation(engine.lm))
        row["floor_total_s"] = sum(row["floor_s"].values())
        row["ttft_over_floor"] = row["ttft_s"] / row["floor_total_s"]
        row["speedup_vs_full"] = row["full_ttft_s"] / row["ttft_s"]
        rows.append(row)
        if progress:
            progress("contexts", 1, len(contexts))
    lm = engine.lm
    return {"settings": {"model": lm.name, "dtype": str(lm.dtype).replace("torch.", ""), "device": str(lm.device),
                         "threads": torch.get_num_threads(), "spec": spec.as_dict(), "repeats": repeats,
                         "values_copied_in_rotation": copy_in_rotation(lm),
                         "torch": torch.__version__.split("+")[0], "malloc_tuning": malloc_tuning(),
                         **statuses()},
            "rates": {k: statistics.median(r[k] for r in all_rates) for k in all_rates[0]}, "rows": rows}


def report_lines(report: dict) -> list[str]:
    """The profile as a markdown table: measured ms (floor ms) per part, per context size."""
    rates, rows = report["rates"], report["rows"]
    head = ["part"] + [f"{r['context_tokens']:,} ctx: ms (floor)" for r in rows]
    lines = [f"Rates measured here (median over the contexts; each row's floor uses the rates measured around "
             f"its own runs): matmul {rates['matmul_flops_model_shape'] / 1e9:.0f} GFLOP/s at the model's "
             f"projection shape ({rates['matmul_flops_large'] / 1e9:.0f} GFLOP/s on a 2048^3 product), copy "
             f"bandwidth {rates['bandwidth_bytes_s'] / 1e9:.1f} GB/s.", "",
             "| " + " | ".join(head) + " |", "|:---|" + "---:|" * len(rows)]
    lines.append("| matmul rate, this row (GFLOP/s) | " + " | ".join(
        f"{r.get('rates', rates)['matmul_flops_model_shape'] / 1e9:.0f}" for r in rows) + " |")
    for part in PARTS:
        cells = [f"{r['parts_s'][part] * 1e3:.1f} ({r['floor_s'][part] * 1e3:.1f})" for r in rows]
        lines.append(f"| {part} | " + " | ".join(cells) + " |")
    lines.append("| **TTFT (unprofiled median)** | " + " | ".join(
        f"**{r['ttft_s'] * 1e3:.1f}** ({r['floor_total_s'] * 1e3:.1f})" for r in rows) + " |")
    lines.append("| TTFT / floor | " + " | ".join(f"{r['ttft_over_floor']:.2f}x" for r in rows) + " |")
    lines.append("| full prefill TTFT | " + " | ".join(f"{r['full_ttft_s'] * 1e3:.0f}" for r in rows) + " |")
    lines.append("| speedup vs full | " + " | ".join(f"{r['speedup_vs_full']:.1f}x" for r in rows) + " |")
    return lines


def write_hot_path(out_dir, report: dict) -> None:
    import json

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "hot_path.json").write_text(json.dumps(report, indent=2) + "\n")
    s = report["settings"]
    head = [f"# kvlib hot path: {s['model']} ({s['dtype']}, {s['device']}, {s['threads']} threads), "
            f"mode {s['spec']}, median of {s['repeats']}", ""]
    (out_dir / "hot_path.md").write_text("\n".join(head + report_lines(report)) + "\n")
