"""Model configuration: the subset of a Hugging Face `config.json` that nanodance needs.

Owns parsing and validation of the architecture and RoPE settings, including both the classic
`rope_theta`/`rope_scaling` keys and the `rope_parameters` form that transformers 5 writes,
and the rope inverse frequencies (`rope_inv_freq`) that the model and the kernels share.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nanodance.errors import ConfigError

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class ModelConfig:
    arch: str  # "llama" | "qwen2" | "qwen3"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict = field(default_factory=dict)  # {"rope_type": ..., factors...}; {} = default
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v biases (Qwen2)
    qk_norm: bool = False  # per-head RMSNorm on q and k (Qwen3)
    max_position_embeddings: int = 4096
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @property
    def rope_type(self) -> str:
        return self.rope_scaling.get("rope_type", "default") if self.rope_scaling else "default"

    @classmethod
    def from_dict(cls, raw: dict) -> "ModelConfig":
        archs = raw.get("architectures") or []
        arch = next((SUPPORTED_ARCHITECTURES[a] for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            model_type = raw.get("model_type")
            arch = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}.get(model_type)
        if arch is None:
            raise ConfigError(
                f"unsupported architecture {archs or raw.get('model_type')!r}; nanodance runs "
                f"{sorted(SUPPORTED_ARCHITECTURES)} (Llama-family decoders)")
        try:
            hidden = int(raw["hidden_size"])
            heads = int(raw["num_attention_heads"])
            layers = int(raw["num_hidden_layers"])
            inter = int(raw["intermediate_size"])
            vocab = int(raw["vocab_size"])
        except KeyError as e:
            raise ConfigError(f"config.json lacks the required key {e.args[0]!r}") from None
        unsupported = []
        if raw.get("mlp_bias"):
            unsupported.append("mlp_bias=true (biases on gate/up/down projections)")
        if arch != "qwen2" and raw.get("attention_bias"):
            unsupported.append("attention_bias=true (biases on q/k/v/o projections)")
        window = raw.get("sliding_window")
        if raw.get("use_sliding_window") or (arch == "llama" and window and window < raw.get("max_position_embeddings", 0)):
            unsupported.append(f"sliding-window attention (sliding_window={raw.get('sliding_window')})")
        if unsupported:
            raise ConfigError(f"this checkpoint uses features nanodance does not implement: {'; '.join(unsupported)}; "
                              f"running it anyway would give wrong logits")
        head_dim = raw.get("head_dim") or hidden // heads
        rope_theta, scaling = _parse_rope(raw)
        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        return cls(
            arch=arch, vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
            num_layers=layers, num_heads=heads,
            num_kv_heads=int(raw.get("num_key_value_heads") or heads), head_dim=int(head_dim),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)), rope_theta=rope_theta,
            rope_scaling=scaling, tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attention_bias=arch == "qwen2",
            qk_norm=arch == "qwen3",
            max_position_embeddings=int(raw.get("max_position_embeddings", 4096)),
            bos_token_id=raw.get("bos_token_id"), eos_token_ids=eos_ids)

    @classmethod
    def from_folder(cls, folder: str | Path) -> "ModelConfig":
        path = Path(folder) / "config.json"
        if not path.is_file():
            raise ConfigError(f"no config.json in {folder}: expected a Hugging Face model folder")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path} must hold a JSON object")
        return cls.from_dict(raw)


def _parse_rope(raw: dict) -> tuple[float, dict]:
    """Return (rope_theta, scaling dict) from either config style; reject unsupported types."""
    params = raw.get("rope_parameters")
    if isinstance(params, dict) and "rope_theta" in params or isinstance(params, dict) and "rope_type" in params:
        theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        theta = float(raw.get("rope_theta", 10000.0))
        scaling = dict(raw.get("rope_scaling") or {})
    if scaling:
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        scaling["rope_type"] = rope_type
        scaling.pop("type", None)
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(
                f"rope type {rope_type!r} is not supported: nanodance rotates cached keys by "
                f"position deltas, which needs frequencies that do not depend on sequence length; "
                f"supported: {SUPPORTED_ROPE_TYPES}")
        if rope_type == "default":
            scaling = {}
    return theta, scaling


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """fp32 [head_dim/2] inverse frequencies with the configured scaling applied."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    kind = cfg.rope_type
    if kind == "linear":
        inv = inv / float(cfg.rope_scaling["factor"])
    elif kind == "llama3":
        s = cfg.rope_scaling
        factor = float(s["factor"])
        low, high = float(s["low_freq_factor"]), float(s["high_freq_factor"])
        old_ctx = float(s["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv = torch.where(medium, smoothed, scaled)
    return inv
