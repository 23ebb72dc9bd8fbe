"""Tiny random Hugging Face checkpoints, written on the fly for tests (docs/design.md, "The default model").

    write_tiny_checkpoint(folder, kind="llama", shards=False, seed=0, **overrides)
        -> (Path folder, transformers model in fp32, eval mode, eager attention)

`kind` picks the architecture feature under test:
    "llama"   Llama, default RoPE, untied embeddings
    "llama3"  Llama with llama3 rope scaling (original context 64, so the scaling really
              changes some frequencies at head_dim 16)
    "linear"  Llama with linear rope scaling (factor 4)
    "tied"    Llama with tied input/output embeddings (no lm_head tensor on disk)
    "qwen2"   Qwen2: q/k/v projections with (non-zero) biases
    "qwen3"   Qwen3: per-head RMSNorm on q and k (non-trivial weights), head_dim 32 so that
              heads * head_dim != hidden_size
Every kind is small (hidden 64, 4 query heads, 2 KV heads, intermediate 128, vocab 256) and
has no tokenizer: feed token ids in [0, 256). `overrides` go to the transformers config
(e.g. `num_hidden_layers=3`, `tie_word_embeddings=True`); `shards=True` writes several
safetensors files plus `model.safetensors.index.json`.

Weights are re-drawn with a larger spread than transformers' init (std 0.15 instead of 0.02)
so attention is far from uniform and a wrong rotation, mask or bias changes the logits;
norm weights are drawn around 1 and biases around 0, never exactly 1 or 0. The global RNG is
left as it was.
"""
from __future__ import annotations

from pathlib import Path

import torch

KINDS = ("llama", "llama3", "linear", "tied", "qwen2", "qwen3")

_COMMON = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
               intermediate_size=128, vocab_size=256, rms_norm_eps=1e-6, max_position_embeddings=512,
               bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)

_KIND_CONFIG = {
    "llama": dict(rope_theta=10000.0),
    "llama3": dict(rope_theta=10000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}),
    "linear": dict(rope_theta=10000.0, rope_scaling={"rope_type": "linear", "factor": 4.0}),
    "tied": dict(rope_theta=10000.0, tie_word_embeddings=True),
    "qwen2": dict(rope_theta=100000.0),
    "qwen3": dict(rope_theta=1000000.0, head_dim=32, num_hidden_layers=3),
}

WEIGHT_STD = 0.15
NORM_SPREAD = 0.3
BIAS_STD = 0.5


def _classes(kind: str):
    import transformers
    if kind == "qwen2":
        return transformers.Qwen2Config, transformers.Qwen2ForCausalLM
    if kind == "qwen3":
        return transformers.Qwen3Config, transformers.Qwen3ForCausalLM
    return transformers.LlamaConfig, transformers.LlamaForCausalLM


def random_ids(n: int, seed: int, vocab_size: int = 256) -> list[int]:
    """`n` seeded random token ids of the tiny vocabulary, above the special ids 0-2."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab_size, (n,), generator=g).tolist()


def tiny_config(kind: str = "llama", **overrides):
    """The transformers config of a tiny checkpoint of `kind` (see the module docstring)."""
    if kind not in KINDS:
        raise ValueError(f"unknown tiny checkpoint kind {kind!r}; choose one of {KINDS}")
    config_cls, _ = _classes(kind)
    kwargs = {**_COMMON, **_KIND_CONFIG[kind], **overrides}
    return config_cls(attn_implementation="eager", **kwargs)


def _randomize(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Redraw every parameter: matrices ~ N(0, 0.15), norms ~ 1 + U(-0.3, 0.3), biases ~ N(0, 0.5)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + NORM_SPREAD * (2 * torch.rand(p.shape, generator=generator) - 1))
            elif name.endswith(".bias"):
                p.copy_(BIAS_STD * torch.randn(p.shape, generator=generator))
            else:
                p.copy_(WEIGHT_STD * torch.randn(p.shape, generator=generator))


def write_tiny_checkpoint(folder: str | Path, kind: str = "llama", shards: bool = False, seed: int = 0,
                          **overrides):
    """Write a tiny random checkpoint of `kind` into `folder`; return (folder, hf_model)."""
    config = tiny_config(kind, **overrides)
    _, model_cls = _classes(kind)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
    generator = torch.Generator().manual_seed(seed)
    _randomize(model, generator)  # tied embeddings share one tensor, so lm_head follows
    model = model.float().eval()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # ~100 KB shards: five or so files for the smallest kinds, so the index is exercised.
    model.save_pretrained(folder, safe_serialization=True, **({"max_shard_size": "100KB"} if shards else {}))
    return folder, model
