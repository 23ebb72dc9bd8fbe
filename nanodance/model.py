"""The Llama-family decoder (Llama, Mistral-style, Qwen2, Qwen3) in plain PyTorch.

Owns the layers and their math; not the cache layout (kernels + AttentionMetadata) nor the
weights on disk (weights.py). One forward runs a ragged batch flattened to T tokens:

    forward(input_ids int64 [T], positions int64 [T], meta, kv_caches) -> hidden [T, H]
    (queries are rotated at `positions`, new keys at `meta.k_pos`: their slot's frame position)
    compute_logits(hidden [N, H]) -> fp32 [N, vocab]     (only for the rows that sample)

`kv_caches[i]` is layer i's `(k_cache, v_cache)`, each `[num_blocks, block_size, Hkv, D]`.
Keys are stored after RoPE (docs/design.md, "Why the query is rotated"), written by
`kernels.store_kv` before attention, so a query sees the keys of its own step. q/k/v and
gate/up projections are fused at load time (one matmul each); Qwen2 adds q/k/v biases, Qwen3
a per-head RMSNorm on q and k.
RoPE follows transformers exactly (cos/sin computed in fp32, cast to the activation dtype),
so logits match `transformers` bit for bit on the same weights and dtype.

Under tensor parallelism (`tp`, parallel.py) each rank builds only its shard: its query and KV
heads (so `kv_caches` hold `Hkv = len(tp.kv_heads(cfg))` heads), its part of the intermediate
size and of the vocabulary; o_proj, down_proj and the embedding end in an all-reduce, and
`compute_logits` gathers the vocabulary parts on rank 0 (None on the other ranks). With the
default `SINGLE` nothing changes and no collective runs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanodance import kernels
from nanodance.attention_metadata import AttentionMetadata
from nanodance.config import ModelConfig, rope_inv_freq
from nanodance.parallel import SINGLE, TensorParallel


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalize in fp32 and cast back before the weight, as transformers does.
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TensorParallel = SINGLE):
        super().__init__()
        self.tp = tp
        self.num_heads, self.num_kv_heads = len(tp.q_heads(cfg)), len(tp.kv_heads(cfg))  # this rank's
        self.head_dim = cfg.head_dim
        self.q_size = self.num_heads * cfg.head_dim
        self.kv_size = self.num_kv_heads * cfg.head_dim
        self.scale = cfg.head_dim ** -0.5
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, ...], meta: AttentionMetadata,
                kv_cache: tuple[torch.Tensor, torch.Tensor], inv_freq: torch.Tensor) -> torch.Tensor:
        T = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(T, self.num_heads, self.head_dim)
        k = k.view(T, self.num_kv_heads, self.head_dim)
        v = v.view(T, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin, k_cos, k_sin = rope
        q = kernels.rotate(q, cos, sin)
        k = kernels.rotate(k, k_cos, k_sin)  # at the frame position of its slot (= its own, unless packed)
        k_cache, v_cache = kv_cache
        kernels.store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        out = kernels.paged_attention(q, k_cache, v_cache, meta, inv_freq, self.scale)  # [T, Hq, D]
        return self.tp.all_reduce(self.o_proj(out.reshape(T, self.q_size)))  # row-parallel: sum the ranks' parts


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TensorParallel = SINGLE):
        super().__init__()
        self.tp = tp
        self.intermediate_size = len(tp.split(cfg.intermediate_size))  # this rank's part
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * self.intermediate_size, bias=False)
        self.down_proj = nn.Linear(self.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.tp.all_reduce(self.down_proj(F.silu(gate) * up))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TensorParallel = SINGLE):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, tp)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg, tp)

    def forward(self, x, rope, meta, kv_cache, inv_freq):
        x = x + self.self_attn(self.input_layernorm(x), rope, meta, kv_cache, inv_freq)
        return x + self.mlp(self.post_attention_layernorm(x))


class CausalLM(nn.Module):
    """Embedding -> decoder layers -> final norm; `compute_logits` applies the LM head."""

    def __init__(self, cfg: ModelConfig, tp: TensorParallel = SINGLE):
        super().__init__()
        self.config = cfg
        self.tp = tp
        self.vocab_rows = tp.vocab(cfg.vocab_size)  # this rank's rows of the embedding and the LM head
        self.kv_heads = len(tp.kv_heads(cfg))  # KV heads this model's caches hold
        self.embed_tokens = nn.Embedding(len(self.vocab_rows), cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, tp) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = (None if cfg.tie_word_embeddings
                        else nn.Linear(cfg.hidden_size, len(self.vocab_rows), bias=False))
        # fp32 [D/2], with rope scaling applied; a buffer so .to(device) moves it, kept fp32
        # by `_apply` below (the query rotation by view deltas needs exact frequencies).
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.inv_freq = self.inv_freq.float()
        return self

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]], num_layers: int | None = None) -> torch.Tensor:
        """Hidden states [T, H] after the final norm (or the raw residual after `num_layers`).

        `num_layers` stops early and returns the residual stream un-normalized; the KV
        collector uses it to compute fresh keys of the first layers only.
        """
        x = self._embed(input_ids)
        cos, sin = self._rope(positions, x.dtype)  # [T, 1, D] each
        k_cos, k_sin = (cos, sin) if meta.k_pos is None else self._rope(meta.k_pos, x.dtype)
        layers = self.layers if num_layers is None else self.layers[:num_layers]
        for layer, kv_cache in zip(layers, kv_caches):
            x = layer(x, (cos, sin, k_cos, k_sin), meta, kv_cache, self.inv_freq)
        return x if num_layers is not None else self.norm(x)

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        if not self.tp.active:
            return self.embed_tokens(input_ids)
        # Vocab-parallel: each rank embeds the ids in its rows, zeros elsewhere; the sum is exact
        # because exactly one rank contributes a non-zero row per token.
        lo, n = self.vocab_rows.start, len(self.vocab_rows)
        local = input_ids - lo
        mine = (local >= 0) & (local < n)
        x = self.embed_tokens(local.clamp(0, max(n - 1, 0))) * mine[:, None].to(self.embed_tokens.weight.dtype)
        return self.tp.all_reduce(x)

    def _rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = kernels.rope_cos_sin(positions, self.inv_freq)
        return cos[:, None].to(dtype), sin[:, None].to(dtype)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """fp32 [N, vocab]; under tensor parallelism on rank 0 only (the others get None)."""
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return self.tp.gather_vocab(F.linear(hidden, weight).float(), self.config.vocab_size)

    def layer_keys(self, layer_index: int, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotated keys [T, Hkv, D] that layer `layer_index` computes from its input residual."""
        attn = self.layers[layer_index].self_attn
        x = self.layers[layer_index].input_layernorm(hidden)
        _, k, _ = attn.qkv_proj(x).split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
        k = k.view(-1, attn.num_kv_heads, attn.head_dim)
        if attn.k_norm is not None:
            k = attn.k_norm(k)
        cos, sin = kernels.rope_cos_sin(positions, self.inv_freq)
        return kernels.rotate(k, cos[:, None].to(k.dtype), sin[:, None].to(k.dtype))
