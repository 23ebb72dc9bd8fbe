"""Kernel dispatch: Triton on CUDA tensors, the PyTorch twins on CPU.

`NANODANCE_BACKEND=triton|torch` (read at every call) forces one backend; unset or `auto`
picks by device. Triton on CPU tensors needs TRITON_INTERPRET=1 set before the Triton modules
are first imported (slow, for tests). The Triton modules are imported on first use only, so a
CPU-only run never compiles or even imports a kernel.

Every public function here has the signature of its twin in `torch_ref`:
    store_kv(k, v, k_cache, v_cache, slot_mapping) -> None
    paged_attention(q, k_cache, v_cache, meta, inv_freq, scale) -> [T, Hq, D]
    key_deviation(k_fresh, k_cache, src_slots, delta, inv_freq) -> fp32 [N]
    rotate_copy(k_cache, v_cache, src_slots, dst_slots, delta, inv_freq) -> None
and per_block_sum, rope_cos_sin, rotate are plain torch helpers used by both paths.
"""
from __future__ import annotations

import os

import torch

from nanodance.attention_metadata import AttentionMetadata
from nanodance.kernels.torch_ref import (key_deviation_torch, paged_attention_torch, per_block_sum, rope_cos_sin,
                                         rotate, rotate_copy_torch, store_kv_torch)

BACKEND_ENV = "NANODANCE_BACKEND"


def backend_for(t: torch.Tensor) -> str:
    """'triton' or 'torch' for a call whose main tensor is `t` (env var first, then device)."""
    forced = os.environ.get(BACKEND_ENV, "").strip().lower()
    if forced in ("", "auto"):
        return "triton" if t.is_cuda else "torch"
    if forced in ("triton", "torch"):
        return forced
    raise ValueError(f"{BACKEND_ENV} must be 'triton', 'torch' or 'auto', got {forced!r}")


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Scatter new K/V rows [T, Hkv, D] into pool slots (int64 [T], -1 = skip), in place."""
    if backend_for(k) == "triton":
        from nanodance.kernels.triton_kv import store_kv_triton
        return store_kv_triton(k, v, k_cache, v_cache, slot_mapping)
    return store_kv_torch(k, v, k_cache, v_cache, slot_mapping)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                    inv_freq: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention of each query over its sequence's block views, causal by position: [T, Hq, D]."""
    if backend_for(q) == "triton":
        from nanodance.kernels.triton_attention import paged_attention_triton
        return paged_attention_triton(q, k_cache, v_cache, meta, inv_freq, scale)
    return paged_attention_torch(q, k_cache, v_cache, meta, inv_freq, scale)


def key_deviation(k_fresh: torch.Tensor, k_cache: torch.Tensor, src_slots: torch.Tensor, delta: torch.Tensor,
                  inv_freq: torch.Tensor) -> torch.Tensor:
    """Per-token sum of (k_fresh - R(delta) k_cache[src])^2 over heads and dims: fp32 [N]."""
    if backend_for(k_fresh) == "triton":
        from nanodance.kernels.triton_kv import key_deviation_triton
        return key_deviation_triton(k_fresh, k_cache, src_slots, delta, inv_freq)
    return key_deviation_torch(k_fresh, k_cache, src_slots, delta, inv_freq)


def rotate_copy(k_cache: torch.Tensor, v_cache: torch.Tensor, src_slots: torch.Tensor, dst_slots: torch.Tensor,
                delta: torch.Tensor, inv_freq: torch.Tensor) -> None:
    """Copy K rotated by delta (fp32, one rounding) and V from src to dst slots, in place."""
    if backend_for(k_cache) == "triton":
        from nanodance.kernels.triton_kv import rotate_copy_triton
        return rotate_copy_triton(k_cache, v_cache, src_slots, dst_slots, delta, inv_freq)
    return rotate_copy_torch(k_cache, v_cache, src_slots, dst_slots, delta, inv_freq)


__all__ = [
    "backend_for", "store_kv", "paged_attention", "key_deviation", "rotate_copy", "per_block_sum",
    "rope_cos_sin", "rotate", "store_kv_torch", "paged_attention_torch", "key_deviation_torch",
    "rotate_copy_torch",
]
