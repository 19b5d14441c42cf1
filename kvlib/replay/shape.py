"""A model's shape as replay needs it: KV bytes per token and the attention share of prefill compute.

Read from the model's config (no weights load). Segment traces replayed without a model use
the default model's shape, so a byte budget means the same as with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ModelShape:
    name: str
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    intermediate: int
    kv_dtype_bytes: int = 2  # the library stores float16 / bfloat16

    @property
    def kv_bytes_per_token(self) -> int:
        return self.layers * self.kv_heads * self.head_dim * 2 * self.kv_dtype_bytes  # 2: K and V

    @property
    def params(self) -> int:
        """Weights that every token multiplies (attention and MLP projections; embeddings excluded)."""
        q_o = 2 * self.hidden * self.heads * self.head_dim
        k_v = 2 * self.hidden * self.kv_heads * self.head_dim
        return self.layers * (q_o + k_v + 3 * self.hidden * self.intermediate)

    @property
    def attn_flops_per_ctx_token(self) -> int:
        """FLOPs one new token spends per context token it attends to (QK^T and AV, all heads, layers)."""
        return 4 * self.layers * self.heads * self.head_dim

    @property
    def attn_ratio(self) -> float:
        """Attention FLOPs per context token over a token's dense FLOPs (2 per weight)."""
        return self.attn_flops_per_ctx_token / (2 * self.params)

    def as_dict(self) -> dict:
        return {"name": self.name, "layers": self.layers, "heads": self.heads, "kv_heads": self.kv_heads,
                "head_dim": self.head_dim, "hidden": self.hidden, "intermediate": self.intermediate,
                "kv_bytes_per_token": self.kv_bytes_per_token, "params_dense": self.params}


# SmolLM2-135M-Instruct's config (DESIGN.md §5): 30 layers, 9 heads, 3 KV heads, head_dim 64.
SMOLLM2 = ModelShape("SmolLM2-135M-Instruct", layers=30, heads=9, kv_heads=3, head_dim=64, hidden=576,
                     intermediate=1536)
# Meta's published Llama-3.1-8B config: 32 layers, 32 heads, 8 KV heads, head_dim 128.
LLAMA31_8B = ModelShape("Llama-3.1-8B", layers=32, heads=32, kv_heads=8, head_dim=128, hidden=4096,
                        intermediate=14336)


def shape_from_config(config, name: str) -> ModelShape:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return ModelShape(name, layers=config.num_hidden_layers, heads=config.num_attention_heads,
                      kv_heads=config.num_key_value_heads, head_dim=head_dim, hidden=config.hidden_size,
                      intermediate=config.intermediate_size)


def load_tokenizer_and_shape(model: str | None, home: Path):
    """The tokenizer and shape of a model without loading its weights (a GGUF is dequantized once)."""
    import os

    from transformers import AutoConfig, AutoTokenizer

    from kvlib.engine.model import quiet_transformers, resolve_model_dir
    from kvlib.errors import ModelLoadError

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    quiet_transformers()
    model_dir, name = resolve_model_dir(model, home)
    try:
        config = AutoConfig.from_pretrained(model_dir)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read model config or tokenizer in {model_dir}: {exc}") from exc
    return tokenizer, shape_from_config(config, name), int(getattr(config, "max_position_embeddings", 0) or 0)
