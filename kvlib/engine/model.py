"""Model loading, fingerprinting and the prompt template.

Design facts:
- This module and forward.py are the only places that touch transformers' API.
- A GGUF file is dequantized once by transformers (about 20-40 s on this CPU) and the
  float32 weights, config and tokenizer are cached as an HF directory under
  `<home>/models/<digest of the gguf file>/`, so later loads take seconds.
- The fingerprint is a sha256 over the weights, the config fields that shape KV
  (layers, kv heads, head_dim, rope parameters), the tokenizer and the KV dtype.
  Cached KV is only ever served to a model with the same fingerprint.
- The engine knows nothing about the library: it maps token ids to KV and logits.
- `--model` takes a path or a known name (models_registry.py); the default is SmolLM2.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from kvlib.errors import ModelLoadError, UnsupportedModelError
from kvlib.memory import release_free_heap

SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
SYSTEM_PROMPT = "You are a helpful assistant. Answer the question using the documents. Be brief."
QUESTION_TEMPLATE = "\nQuestion: {question}\nAnswer in a few words."


@dataclass
class LoadedModel:
    """An HF causal LM plus what kvlib needs to reproduce its attention exactly."""

    hf: object  # transformers PreTrainedModel
    tokenizer: object | None
    name: str
    fingerprint: str
    dtype: object  # compute dtype (torch.dtype)
    kv_dtype: object  # storage dtype of cached KV (torch.float16 / torch.bfloat16)
    device: object  # torch.device
    rope: object  # RopeSpec
    config_summary: dict = field(default_factory=dict)
    fused: list = field(default_factory=list)  # per layer: fused.FusedLayer or None (see fused.py)
    head_packed: object | None = None  # the output head's prepacked weight (fused.pack), or None

    @property
    def layers(self):
        return self.hf.model.layers

    @property
    def n_layers(self) -> int:
        return self.config_summary["num_hidden_layers"]

    @property
    def n_kv_heads(self) -> int:
        return self.config_summary["num_key_value_heads"]

    @property
    def head_dim(self) -> int:
        return self.config_summary["head_dim"]


def pick_device(requested: str | None = None):
    import torch

    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """True when the CPU multiplies bf16 natively (AVX512-BF16 or AMX).

    Without it PyTorch emulates bf16 matmuls and they run ~100x slower than float32
    (measured on an AVX2-only EPYC), so bf16 must not be the default there.
    """
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def pick_dtype(requested: str | None, device) -> object:
    """bf16 where the hardware computes it natively, else float32 (visible in every report)."""
    import torch

    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if requested and requested != "auto":
        if requested not in names:
            raise ModelLoadError(f"unknown dtype '{requested}'; use one of auto, float32, bfloat16, float16")
        return names[requested]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32


def kv_dtype_for(compute_dtype) -> object:
    """Stored KV is half precision: bf16 when computing in bf16, else fp16 (3 more mantissa bits)."""
    import torch

    return torch.bfloat16 if compute_dtype == torch.bfloat16 else torch.float16


def _file_digest(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def quiet_transformers() -> None:
    """kvlib draws its own progress; transformers' per-tensor bars would bury it."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _dequantize_gguf(gguf: Path, target: Path) -> None:
    """Dequantize once with transformers and write an HF directory atomically."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        state = {k: v.contiguous() for k, v in hf.state_dict().items()}
        if getattr(hf.config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)  # tied: safetensors refuses shared storage
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config = hf.config.to_dict()
        config.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        tok.save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError as exc:  # another process published the same conversion first: use theirs
            if not (target / "config.json").exists():
                raise ModelLoadError(f"cannot write the converted model to {target}: {exc}") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def resolve_model_dir(model: str | None, home: Path) -> tuple[Path, str]:
    """Return an HF directory for `model` and a display name.

    `model` is None (the default SmolLM2), a known name (`kvlib models ls`), or a path to an
    HF directory or a .gguf file. A known name wins over a same-named relative path; write
    `./NAME` for the path.
    """
    from kvlib.engine import models_registry as registry

    if model is None or model in registry.KNOWN_MODELS:
        spec = registry.get_spec(model or registry.SMOLLM2.name)
        path = registry.installed_file(spec, home)
        # A pinned file's digest is known: hashing 1.1 GB again would add seconds to every load.
        digest = spec.sha256 or None
        return _dequantized_dir(path, home, digest), spec.title
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelLoadError(f"model not found: '{model}' is neither a path nor a known model "
                             f"({registry.known_names()}); install one with `kvlib models fetch NAME`")
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelLoadError(f"not an HF model directory (no config.json): {path}")
        return path, path.name
    if path.suffix != ".gguf":
        raise ModelLoadError(f"model must be an HF directory or a .gguf file: {path}")
    return _dequantized_dir(path, home), path.stem


def _dequantized_dir(gguf: Path, home: Path, digest: str | None = None) -> Path:
    """The HF directory dequantized from `gguf`, made on first use, keyed by the file's digest."""
    if not gguf.exists():
        raise ModelLoadError(f"model path not found: {gguf}")
    target = home / "models" / (digest or _file_digest(gguf))[:24]
    if not (target / "config.json").exists():
        try:  # before the conversion's half minute
            target.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # e.g. the home's models/ is a symlink to nowhere
            broken = " (a broken symlink)" if target.parent.is_symlink() else ""
            raise ModelLoadError(f"cannot use the model cache {target.parent}: {exc.strerror}{broken}") from exc
        _dequantize_gguf(gguf, target)
    return target


def check_supported(config) -> None:
    family = getattr(config, "model_type", None)
    if family not in SUPPORTED_FAMILIES:
        raise UnsupportedModelError(
            f"model family '{family}' is not supported; supported: {', '.join(SUPPORTED_FAMILIES)}"
        )


def config_summary(config) -> dict:
    """The config fields that shape KV; part of the fingerprint and the manifest."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return {
        "model_type": config.model_type,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": head_dim,
        "hidden_size": config.hidden_size,
        "vocab_size": config.vocab_size,
        "rope_parameters": dict(getattr(config, "rope_parameters", None) or {}),
        "sliding_window": sliding_window_of(config),
    }


def sliding_window_of(config) -> int | None:
    """The attention window if any layer uses one, else None."""
    window = getattr(config, "sliding_window", None)
    if window is None:
        return None
    if config.model_type in ("qwen2", "qwen3") and not getattr(config, "use_sliding_window", False):
        return None
    return int(window)


def tokenizer_digest(tokenizer) -> str:
    if tokenizer is None:
        return "none"
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(text.encode()).hexdigest()


def weights_digest(hf) -> str:
    """sha256 over every parameter's name, shape, dtype and bytes, in name order."""
    import torch

    h = hashlib.sha256()
    for name, tensor in sorted(hf.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _weights_stamp(model_dir: Path) -> str:
    files = sorted(model_dir.glob("*.safetensors")) + sorted(model_dir.glob("*.bin"))
    return hashlib.sha256(
        json.dumps([(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]).encode()
    ).hexdigest()


def memoised_weights_digest(model_dir: Path) -> str | None:
    """The weights digest memoised beside the weights, if the files are unchanged since."""
    try:
        data = json.loads((model_dir / ".kvlib-weights-digest.json").read_text())
        return data["digest"] if data.get("stamp") == _weights_stamp(model_dir) else None
    except (OSError, ValueError, KeyError):
        return None


def cached_weights_digest(model_dir: Path, hf) -> str:
    """Weights digest (of the weights as stored), memoised beside them keyed by file sizes and mtimes."""
    digest = memoised_weights_digest(model_dir)
    if digest is not None:
        return digest
    digest = weights_digest(hf)
    try:
        memo = {"stamp": _weights_stamp(model_dir), "digest": digest}
        (model_dir / ".kvlib-weights-digest.json").write_text(json.dumps(memo))
    except OSError:
        pass  # a read-only model directory only costs a re-hash next time
    return digest


def fingerprint(weights: str, summary: dict, tokenizer, kv_dtype) -> str:
    payload = json.dumps(
        {"weights": weights, "config": summary, "tokenizer": tokenizer_digest(tokenizer), "kv_dtype": str(kv_dtype)},
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def wrap_model(hf, tokenizer, *, name: str, dtype=None, device=None, weights: str | None = None) -> LoadedModel:
    """Wrap an in-memory HF model (used by load_model and by tests with tiny random models)."""
    from kvlib.engine.rope import rope_spec_from_rotary

    check_supported(hf.config)
    device = pick_device(None) if device is None else device
    dtype = pick_dtype(None, device) if dtype is None else dtype
    rope = rope_spec_from_rotary(hf.model.rotary_emb)
    summary = config_summary(hf.config)
    weights = weights or weights_digest(hf)
    hf = hf.to(device=device, dtype=dtype).eval()
    kv_dtype = kv_dtype_for(dtype)
    fp = fingerprint(weights, summary, tokenizer, kv_dtype)
    fused, head_packed = fuse_model(hf)
    own_weights(hf, fused)
    release_free_heap()  # the plain weights the packed copies replaced, kept as free heap otherwise
    return LoadedModel(hf=hf, tokenizer=tokenizer, name=name, fingerprint=fp, dtype=dtype,
                       kv_dtype=kv_dtype, device=device, rope=rope, config_summary=summary,
                       fused=fused, head_packed=head_packed)


def _stack_modules(modules) -> tuple | None:
    """fused.stack_rows of linear modules, whose weights (and biases) become views of the stack."""
    import torch

    from kvlib.engine.fused import stack_rows

    stacked = stack_rows([m.weight.detach() for m in modules],
                         [None if m.bias is None else m.bias.detach() for m in modules])
    if stacked is None:
        return None
    weight, bias, weight_views, bias_views = stacked
    for m, w, b in zip(modules, weight_views, bias_views):
        m.weight = torch.nn.Parameter(w, requires_grad=False)
        if b is not None:
            m.bias = torch.nn.Parameter(b, requires_grad=False)
    return weight, bias


def _fuse_layer(layer):
    from kvlib.engine.fused import FusedLayer

    attn, mlp = layer.self_attn, layer.mlp
    qkv = _stack_modules([attn.q_proj, attn.k_proj, attn.v_proj])
    if qkv is None:
        return None
    sizes = (attn.q_proj.weight.shape[0], attn.k_proj.weight.shape[0], attn.v_proj.weight.shape[0])
    gate_up = _stack_modules([mlp.gate_proj, mlp.up_proj])
    return FusedLayer(qkv_weight=qkv[0], qkv_bias=qkv[1], qkv_sizes=sizes,
                      gate_up_weight=None if gate_up is None else gate_up[0],
                      gate_up_bias=None if gate_up is None else gate_up[1],
                      intermediate=mlp.gate_proj.weight.shape[0])


def fuse_model(hf) -> tuple[list, object | None]:
    """Each layer's stacked projections (engine/fused.py), prepacked by group where the copies
    fit (fused.plan_packing): (per layer FusedLayer or None, the head's packed weight or None).

    A packed weight replaces its plain copy: the modules' weights behind it become meta
    placeholders (shape and dtype only), so no weight is held twice, and `plain_weights` gives
    transformers' own forward the dense weights back, bit for bit, while it runs. A head tied
    to the embedding keeps its plain copy, which the embedding reads."""
    import torch

    from kvlib.engine.fused import layer_products, pack, pack_layer, plan_packing

    with torch.no_grad():
        layers = hf.model.layers
        fused = [_fuse_layer(layer) for layer in layers]
        products = [None if f is None else layer_products(f, layer.self_attn.o_proj.weight, layer.mlp.down_proj.weight)
                    for layer, f in zip(layers, fused)]
        groups = [("head", [hf.lm_head.weight])] + [
            (group, [w for p in products if p is not None for w in p[group].values()]) for group in ("mlp", "attention")]
        plan = plan_packing(groups)
        fused = [f if f is None else _release_packed(layer, pack_layer(f, p, plan - {"head"}))
                 for layer, f, p in zip(layers, fused, products)]
        head = pack(hf.lm_head.weight) if "head" in plan else None
        if head is not None and hf.lm_head.weight is not hf.model.embed_tokens.weight:
            hf.lm_head.weight = _meta_like(hf.lm_head.weight)
        return fused, head


def own_weights(hf, fused: list) -> None:
    """Give every weight still read from the loaded file (transformers maps a safetensors file
    and, where no dtype cast is needed, hands out views of the mapping) a private copy, so the
    mapping goes: its touched pages counted ~400-500 MB of SmolLM2's resident memory in float32,
    held by the embedding alone once the layers were stacked and packed. Stacked matrices are
    copies already and are left alone."""
    import torch

    stacked = {t.untyped_storage().data_ptr() for f in fused if f is not None
               for t in (f.qkv_weight, f.gate_up_weight, f.qkv_bias, f.gate_up_bias) if t is not None and not t.is_meta}
    with torch.no_grad():
        for p in list(hf.parameters()) + list(hf.buffers()):
            if not p.is_meta and p.untyped_storage().data_ptr() not in stacked:
                p.data = p.data.clone()


def _meta_like(t):
    import torch

    return torch.nn.Parameter(torch.empty(t.shape, dtype=t.dtype, device="meta"), requires_grad=False)


def _product_modules(layer) -> dict:
    """The transformers linear modules behind each of a fused layer's products, in stacked row order."""
    attn, mlp = layer.self_attn, layer.mlp
    return {"qkv": [attn.q_proj, attn.k_proj, attn.v_proj], "o": [attn.o_proj],
            "gate_up": [mlp.gate_proj, mlp.up_proj], "down": [mlp.down_proj]}


def _release_packed(layer, fused):
    """The layer's plain weights of its packed products dropped: meta placeholders in the modules
    and in the FusedLayer (whose products read the packed copies)."""
    from dataclasses import replace

    if not fused.packed:
        return fused
    modules = _product_modules(layer)
    for name in fused.packed:
        for m in modules[name]:
            m.weight = _meta_like(m.weight)
    stacked = {"qkv_weight": "qkv", "gate_up_weight": "gate_up"}
    return replace(fused, **{field_: _meta_like(getattr(fused, field_)) for field_, name in stacked.items()
                             if name in fused.packed})


@contextlib.contextmanager
def plain_weights(lm: "LoadedModel"):
    """transformers' modules hold their dense weights again while the block runs (rebuilt from the
    packed copies, which reorder losslessly), then let them go: the doctor's reference forward."""
    import torch

    restored = []
    with torch.no_grad():
        for layer, fused in zip(lm.layers, lm.fused or []):
            modules = _product_modules(layer)
            for name, packed in ((fused.packed or {}).items() if fused is not None else ()):
                dense, start = packed.to_dense(), 0
                for m in modules[name]:
                    n = m.weight.shape[0]
                    m.weight = torch.nn.Parameter(dense[start : start + n], requires_grad=False)
                    start += n
                restored += modules[name]
        head = lm.hf.lm_head
        if head.weight.is_meta and lm.head_packed is not None:
            head.weight = torch.nn.Parameter(lm.head_packed.to_dense(), requires_grad=False)
            restored.append(head)
    try:
        yield lm.hf
    finally:
        for m in restored:
            m.weight = _meta_like(m.weight)


def load_model(model: str | None, home: Path, *, dtype: str | None = None, device: str | None = None) -> LoadedModel:
    """Load the default model, an HF directory, or a .gguf file, ready for kvlib's forward."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever fetched at run time
    quiet_transformers()
    model_dir, name = resolve_model_dir(model, home)
    try:
        config = AutoConfig.from_pretrained(model_dir)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read model config in {model_dir}: {exc}") from exc
    check_supported(config)
    dev = pick_device(device)
    compute = pick_dtype(dtype, dev)
    # The digest is over the stored float32 weights. Once it is memoised, load straight into the
    # compute dtype rather than materialising a float32 copy first (7.1 GB for Qwen2.5-1.5B, whose
    # bf16 model is 3.5 GB). from_pretrained's cast equals .to(dtype) bit for bit and keeps
    # inv_freq in float32 (checked on a tiny qwen2), so the fingerprint and rotation are unchanged.
    weights = memoised_weights_digest(model_dir)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32 if weights is None else compute)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    weights = weights or cached_weights_digest(model_dir, hf)
    return wrap_model(hf, tokenizer, name=name, dtype=compute, device=dev, weights=weights)


def matmul_params(lm: LoadedModel) -> dict:
    """Weights multiplied per token: one decoder layer's linear layers, and the LM head.
    A token costs 2 FLOPs per weight (multiply and add), the yardstick of the hot-path floor."""
    layer = sum(p.numel() for p in lm.layers[0].parameters() if p.dim() == 2)
    return {"layer": int(layer), "head": int(lm.hf.lm_head.weight.numel())}
