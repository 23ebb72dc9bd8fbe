"""Triton kernels that move or compare K/V rows addressed by flat pool slot.

Owns (each the twin of the function of the same name in `torch_ref`, minus the suffix):
    store_kv_triton       k, v [T, Hkv, D] -> caches at slot_mapping int64 [T] (-1 = skip)
    key_deviation_triton  k_fresh [N, Hkv, D], src_slots int64 [N], delta int32 [N] -> fp32 [N]
    rotate_copy_triton    src_slots, dst_slots int64 [N], delta int32 [N]; caches in place

Caches are [num_blocks, P, Hkv, D] with any strides; slot s lives at block s // P, offset s % P.
Each program handles BLOCK_T tokens (see tokens_per_program) x all heads x the head dim, as a
3-D tile [BLOCK_T, H_PAD, HALF_PAD] per half of the head dim (RoPE pairs j with j + D/2, see
triton_common), so K rotations are elementwise and no element is loaded twice.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from nanodance.kernels.triton_common import check_launchable, next_pow2, rope_rotate


def tokens_per_program(heads: int, half: int, budget: int) -> int:
    """Tokens per program so one [BLOCK_T, H_PAD, HALF_PAD] tile holds about `budget` elements.

    Sized from ptxas reports for sm_90 (see tools/compile_check.py): ~1K fp32 elements per tile keeps
    the rotating kernels (several live fp32 tiles) free of register spills with 4 warps."""
    fit = max(1, budget // (next_pow2(heads) * next_pow2(half)))
    return 1 << (fit.bit_length() - 1)  # the largest power of two <= fit (tl.arange needs one)


COPY_BUDGET = 4096  # store_kv moves raw elements: bigger tiles
ROTATE_BUDGET = 1024  # key_deviation / rotate_copy hold ~6 fp32 tiles at once


@triton.jit
def _tile_offsets(t, T, H, HALF, H_PAD: tl.constexpr, HALF_PAD: tl.constexpr):
    """Token/head/dim index tiles [BLOCK_T,1,1], [1,H_PAD,1], [1,1,HALF_PAD] and their mask."""
    h = tl.arange(0, H_PAD)[None, :, None]
    j = tl.arange(0, HALF_PAD)[None, None, :]
    t3 = t[:, None, None]
    mask = (t3 < T) & (h < H) & (j < HALF)
    return t3, h, j, mask


@triton.jit
def _slot_offset(slot, P: tl.constexpr, stride_b, stride_s):
    """Element offset (int64) of flat slot `slot` in a [num_blocks, P, ...] cache."""
    slot = slot.to(tl.int64)
    return (slot // P) * stride_b + (slot % P) * stride_s


@triton.jit
def _store_kv_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr, T, H, HALF,
                     s_kt, s_kh, s_kd, s_vt, s_vh, s_vd,
                     s_kcb, s_kcs, s_kch, s_kcd, s_vcb, s_vcs, s_vch, s_vcd,
                     P: tl.constexpr, BLOCK_T: tl.constexpr, H_PAD: tl.constexpr, HALF_PAD: tl.constexpr):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    slot = tl.load(slot_ptr + t, mask=t < T, other=-1)
    t3, h, j, mask = _tile_offsets(t, T, H, HALF, H_PAD, HALF_PAD)
    mask = mask & (slot >= 0)[:, None, None]
    slot3 = slot[:, None, None]
    t3 = t3.to(tl.int64)
    kc = _slot_offset(slot3, P, s_kcb, s_kcs) + h * s_kch
    vc = _slot_offset(slot3, P, s_vcb, s_vcs) + h * s_vch
    for part in tl.static_range(2):  # the two halves of the head dim
        jj = j + part * HALF
        # Same-dtype copies move raw bits (exact even for bf16 in the interpreter).
        k = tl.load(k_ptr + t3 * s_kt + h * s_kh + jj * s_kd, mask=mask)
        v = tl.load(v_ptr + t3 * s_vt + h * s_vh + jj * s_vd, mask=mask)
        tl.store(kc_ptr + kc + jj * s_kcd, k.to(kc_ptr.dtype.element_ty), mask=mask)
        tl.store(vc_ptr + vc + jj * s_vcd, v.to(vc_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _key_deviation_kernel(kf_ptr, kc_ptr, src_ptr, delta_ptr, inv_freq_ptr, out_ptr, N, H, HALF,
                          s_ft, s_fh, s_fd, s_cb, s_cs, s_ch, s_cd,
                          P: tl.constexpr, BLOCK_T: tl.constexpr, H_PAD: tl.constexpr, HALF_PAD: tl.constexpr):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    src = tl.load(src_ptr + t, mask=t < N, other=-1)
    delta = tl.load(delta_ptr + t, mask=t < N, other=0).to(tl.float32)
    t3, h, j, mask = _tile_offsets(t, N, H, HALF, H_PAD, HALF_PAD)
    mask = mask & (src >= 0)[:, None, None]
    f = kf_ptr + t3.to(tl.int64) * s_ft + h * s_fh + j * s_fd
    c = kc_ptr + _slot_offset(src[:, None, None], P, s_cb, s_cs) + h * s_ch + j * s_cd
    f1 = tl.load(f, mask=mask, other=0.0).to(tl.float32)
    f2 = tl.load(f + HALF * s_fd, mask=mask, other=0.0).to(tl.float32)
    c1 = tl.load(c, mask=mask, other=0.0).to(tl.float32)
    c2 = tl.load(c + HALF * s_cd, mask=mask, other=0.0).to(tl.float32)
    inv_freq = tl.load(inv_freq_ptr + j, mask=j < HALF, other=0.0)
    # The reused key, moved into the fresh key's frame: angle [BLOCK_T, 1, HALF_PAD].
    r1, r2 = rope_rotate(c1, c2, delta[:, None, None] * inv_freq)
    e = (f1 - r1) * (f1 - r1) + (f2 - r2) * (f2 - r2)
    dev = tl.sum(tl.sum(tl.where(mask, e, 0.0), axis=2), axis=1)
    tl.store(out_ptr + t, dev, mask=t < N)


@triton.jit
def _rotate_copy_kernel(kc_ptr, vc_ptr, src_ptr, dst_ptr, delta_ptr, inv_freq_ptr, N, H, HALF,
                        s_kb, s_ks, s_kh, s_kd, s_vb, s_vs, s_vh, s_vd,
                        P: tl.constexpr, BLOCK_T: tl.constexpr, H_PAD: tl.constexpr, HALF_PAD: tl.constexpr):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    src = tl.load(src_ptr + t, mask=t < N, other=-1)
    dst = tl.load(dst_ptr + t, mask=t < N, other=-1)
    delta = tl.load(delta_ptr + t, mask=t < N, other=0).to(tl.float32)
    t3, h, j, mask = _tile_offsets(t, N, H, HALF, H_PAD, HALF_PAD)
    mask = mask & ((src >= 0) & (dst >= 0))[:, None, None]
    ks = kc_ptr + _slot_offset(src[:, None, None], P, s_kb, s_ks) + h * s_kh + j * s_kd
    kd = kc_ptr + _slot_offset(dst[:, None, None], P, s_kb, s_ks) + h * s_kh + j * s_kd
    vs = vc_ptr + _slot_offset(src[:, None, None], P, s_vb, s_vs) + h * s_vh + j * s_vd
    vd = vc_ptr + _slot_offset(dst[:, None, None], P, s_vb, s_vs) + h * s_vh + j * s_vd
    k1 = tl.load(ks, mask=mask, other=0.0).to(tl.float32)
    k2 = tl.load(ks + HALF * s_kd, mask=mask, other=0.0).to(tl.float32)
    inv_freq = tl.load(inv_freq_ptr + j, mask=j < HALF, other=0.0)
    r1, r2 = rope_rotate(k1, k2, delta[:, None, None] * inv_freq)
    # One rounding to the cache dtype, after the fp32 rotation (the frame rule, docs/design.md).
    tl.store(kd, r1.to(kc_ptr.dtype.element_ty), mask=mask)
    tl.store(kd + HALF * s_kd, r2.to(kc_ptr.dtype.element_ty), mask=mask)
    # Values carry no position: a raw copy.
    tl.store(vd, tl.load(vs, mask=mask), mask=mask)
    tl.store(vd + HALF * s_vd, tl.load(vs + HALF * s_vd, mask=mask), mask=mask)


def _dims(cache: torch.Tensor) -> tuple[int, int, int]:
    _, page, heads, dim = cache.shape
    if dim % 2:
        raise ValueError(f"head_dim must be even, got {dim}")
    return page, heads, dim // 2


def store_kv_triton(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    slot_mapping: torch.Tensor) -> None:
    """Scatter k/v rows [T, Hkv, D] into flat pool slots; slot -1 rows are skipped."""
    check_launchable(_store_kv_kernel, k, v, k_cache, v_cache)
    T = k.shape[0]
    if T == 0:
        return
    page, H, half = _dims(k_cache)
    slots = slot_mapping.to(torch.int64).contiguous()
    block_t = tokens_per_program(H, half, COPY_BUDGET)
    _store_kv_kernel[(triton.cdiv(T, block_t),)](
        k, v, k_cache, v_cache, slots, T, H, half,
        *k.stride(), *v.stride(), *k_cache.stride(), *v_cache.stride(),
        P=page, BLOCK_T=block_t, H_PAD=next_pow2(H), HALF_PAD=next_pow2(half), num_warps=4)


def key_deviation_triton(k_fresh: torch.Tensor, k_cache: torch.Tensor, src_slots: torch.Tensor,
                         delta: torch.Tensor, inv_freq: torch.Tensor, *,
                         out: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token sum over heads and dims of (k_fresh - R(delta) k_cache[src])^2, fp32 [N].

    `out` (keyword-only) is written in place; tests pre-fill it with NaN."""
    check_launchable(_key_deviation_kernel, k_fresh, k_cache)
    N = k_fresh.shape[0]
    if out is None:
        out = torch.empty(N, dtype=torch.float32, device=k_fresh.device)
    if N == 0:
        return out
    page, H, half = _dims(k_cache)
    block_t = tokens_per_program(H, half, ROTATE_BUDGET)
    _key_deviation_kernel[(triton.cdiv(N, block_t),)](
        k_fresh, k_cache, src_slots.to(torch.int64).contiguous(), delta.to(torch.int32).contiguous(),
        inv_freq.to(device=k_fresh.device, dtype=torch.float32).contiguous(), out, N, H, half,
        *k_fresh.stride(), *k_cache.stride(),
        P=page, BLOCK_T=block_t, H_PAD=next_pow2(H), HALF_PAD=next_pow2(half), num_warps=4)
    return out


def rotate_copy_triton(k_cache: torch.Tensor, v_cache: torch.Tensor, src_slots: torch.Tensor,
                       dst_slots: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor) -> None:
    """Copy K rotated by delta (fp32, one rounding) and V unchanged from src to dst slots, in place.

    Rows run in parallel: dst slots must not overlap the src slots of other rows."""
    check_launchable(_rotate_copy_kernel, k_cache, v_cache)
    N = src_slots.shape[0]
    if N == 0:
        return
    page, H, half = _dims(k_cache)
    block_t = tokens_per_program(H, half, ROTATE_BUDGET)
    _rotate_copy_kernel[(triton.cdiv(N, block_t),)](
        k_cache, v_cache, src_slots.to(torch.int64).contiguous(), dst_slots.to(torch.int64).contiguous(),
        delta.to(torch.int32).contiguous(), inv_freq.to(device=k_cache.device, dtype=torch.float32).contiguous(),
        N, H, half, *k_cache.stride(), *v_cache.stride(),
        P=page, BLOCK_T=block_t, H_PAD=next_pow2(H), HALF_PAD=next_pow2(half), num_warps=4)
