"""Tiny random models of every supported family and rope type (no download).

Shapes follow transformers' own tests: hidden 64, 2 layers, GQA 4:2, head_dim 16.
"""

from __future__ import annotations

import torch

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
ROPE_TYPES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
    "llama3": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 1024},
}


def tiny_config(family: str = "llama", rope: str = "default", **overrides):
    from transformers import AutoConfig

    kwargs = dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=96, max_position_embeddings=4096,
        rope_parameters=dict(ROPE_TYPES[rope]), tie_word_embeddings=False,
    )
    if family == "qwen2":
        kwargs["use_sliding_window"] = False  # Qwen2 always has q/k/v bias
    if family == "qwen3":
        kwargs.update(head_dim=16, use_sliding_window=False)
    if family == "mistral":
        kwargs["sliding_window"] = None
    kwargs.update(overrides)
    return AutoConfig.for_model(family, **kwargs)


def tiny_hf(family: str = "llama", rope: str = "default", seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(family, rope, **overrides)
    config._attn_implementation = "eager"  # reference path with no kernel-specific rounding
    model = AutoModelForCausalLM.from_config(config).eval()
    if family == "qwen2":
        # from_config zero-inits biases; make them nonzero so the bias path is exercised
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    if family == "qwen3":
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.q_norm.weight.uniform_(0.5, 1.5)
                layer.self_attn.k_norm.weight.uniform_(0.5, 1.5)
    return model


def tiny_lm(family: str = "llama", rope: str = "default", seed: int = 0, **overrides):
    """A kvlib LoadedModel in float32 on the CPU around a tiny random HF model."""
    from kvlib.engine.model import wrap_model

    hf = tiny_hf(family, rope, seed, **overrides)
    return wrap_model(hf, None, name=f"tiny-{family}-{rope}", dtype=torch.float32, device=torch.device("cpu")), hf


def random_ids(n: int, seed: int, vocab: int = 96) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n,), generator=g)
