"""KV store and the diff kernels (key deviation, rotate-copy), Triton under the interpreter
against their torch twins, plus backend dispatch.

Caches are NaN-poisoned so a write to the wrong slot, or a missing write, shows; outputs are
NaN-filled before each run.
"""
from __future__ import annotations

import pytest
import torch

import nanodance.kernels as K
from nanodance.tools.synthetic import default_inv_freq
from nanodance.kernels.torch_ref import (key_deviation_torch, per_block_sum, rope_cos_sin, rotate, rotate_copy_torch,
                                         store_kv_torch)
from nanodance.kernels.triton_common import check_launchable
from nanodance.kernels.triton_kv import key_deviation_triton, rotate_copy_triton, store_kv_triton

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ULP = {torch.float32: 2.0 ** -23, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}


def poisoned_cache(num_blocks, block_size, heads, dim, dtype):
    return torch.full((num_blocks, block_size, heads, dim), float("nan"), dtype=dtype)


def assert_within_ulps(actual, expected, dtype, ulps=1):
    """|a - e| <= ulps * ulp(e), elementwise, NaN only where expected is NaN."""
    assert torch.equal(actual.isnan(), expected.isnan())
    a, e = actual.float().nan_to_num(), expected.float().nan_to_num()
    tol = ulps * ULP[dtype] * e.abs().clamp(min=2.0 ** -14) * 2  # ulp(x) <= 2 * eps * |x|
    assert ((a - e).abs() <= tol).all(), f"max err {(a - e).abs().max().item()}"


# ---------------------------------------------------------------- store_kv

@pytest.mark.parametrize("dtype,block_size,heads,dim", [
    (torch.float32, 16, 3, 64), (torch.float16, 32, 2, 128), (torch.bfloat16, 16, 1, 96), (torch.bfloat16, 32, 8, 64)])
def test_store_kv_writes_exactly_the_mapped_slots(dtype, block_size, heads, dim):
    gen = torch.Generator().manual_seed(0)
    T, nb = 37, 5
    # k and v as the model produces them: slices of a fused qkv projection (not contiguous).
    qkv = torch.randn(T, 4 + 2 * heads, dim, generator=gen).to(dtype)
    k, v = qkv[:, 4:4 + heads], qkv[:, 4 + heads:]
    slots = torch.randperm(nb * block_size, generator=gen)[:T]
    slots[[0, 9, 36]] = -1  # padding tokens: not written
    expected_k, expected_v = poisoned_cache(nb, block_size, heads, dim, dtype), poisoned_cache(nb, block_size, heads, dim, dtype)
    store_kv_torch(k, v, expected_k, expected_v, slots)
    kc, vc = poisoned_cache(nb, block_size, heads, dim, dtype), poisoned_cache(nb, block_size, heads, dim, dtype)
    store_kv_triton(k, v, kc, vc, slots)
    # Same dtype in and out: a bit-exact copy (and untouched slots stay NaN).
    assert torch.equal(kc.view(torch.uint8), expected_k.view(torch.uint8))
    assert torch.equal(vc.view(torch.uint8), expected_v.view(torch.uint8))
    assert int((~kc.isnan().all(-1).all(-1)).sum()) == T - 3


# ---------------------------------------------------------------- key deviation

def test_key_deviation_twin_matches_fp64_formula():
    gen = torch.Generator().manual_seed(1)
    inv = default_inv_freq(64)
    kc = torch.randn(4, 16, 2, 64, generator=gen)
    k_fresh = torch.randn(5, 2, 64, generator=gen)
    src = torch.tensor([3, 17, 40, -1, 63])
    delta = torch.tensor([0, 5, -9, 4, 300], dtype=torch.int32)
    out = key_deviation_torch(k_fresh, kc, src, delta, inv)
    for i in range(5):
        if src[i] < 0:
            assert out[i] == 0
            continue
        cached = kc.view(-1, 2, 64)[src[i]].double()
        half = 32
        ang = delta[i].double() * inv.double()
        c, s = ang.cos(), ang.sin()
        reused = torch.cat([cached[:, :half] * c - cached[:, half:] * s, cached[:, half:] * c + cached[:, :half] * s], -1)
        assert abs(out[i].item() - ((k_fresh[i].double() - reused) ** 2).sum().item()) < 1e-3


@pytest.mark.parametrize("dtype,block_size,heads,dim", [
    (torch.float32, 16, 3, 64), (torch.float16, 32, 2, 128), (torch.bfloat16, 16, 4, 128)])
def test_key_deviation_triton_matches_twin(dtype, block_size, heads, dim):
    gen = torch.Generator().manual_seed(2)
    N, nb = 41, 6
    kc = torch.randn(nb, block_size, heads, dim, generator=gen).to(dtype)
    k_fresh = torch.randn(N, heads, dim, generator=gen).to(dtype)
    src = torch.randint(0, nb * block_size, (N,), generator=gen)
    src[7] = -1
    delta = torch.randint(-3000, 3000, (N,), generator=gen, dtype=torch.int32)
    delta[:5] = 0
    inv = default_inv_freq(dim)
    expected = key_deviation_torch(k_fresh, kc, src, delta, inv)
    out = key_deviation_triton(k_fresh, kc, src, delta, inv, out=torch.full((N,), float("nan")))
    assert out[7] == 0
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-4)


def test_key_deviation_is_zero_for_a_block_reused_at_a_new_position():
    """Layer-0 keys are RoPE(W x) at their position: a block cached at frame positions f.. and
    viewed at p.. (delta p - f) matches keys computed afresh at p.. once rotated by the delta."""
    gen = torch.Generator().manual_seed(3)
    inv = default_inv_freq(64)
    raw = torch.randn(16, 2, 64, generator=gen)  # W x of 16 tokens, before RoPE
    frame = torch.arange(200, 216)
    new = torch.arange(40, 56)
    kc = torch.zeros(2, 16, 2, 64)
    cos, sin = rope_cos_sin(frame, inv)
    kc[1] = rotate(raw, cos[:, None], sin[:, None])  # the master block
    cos, sin = rope_cos_sin(new, inv)
    fresh = rotate(raw, cos[:, None], sin[:, None])  # the same tokens computed at the new place
    src = torch.arange(16, 32)
    delta = (new - frame).to(torch.int32)
    for fn in (key_deviation_torch, key_deviation_triton):
        dev = fn(fresh, kc, src, delta, inv)
        assert dev.max() < 1e-6 * fresh.square().sum(dim=(1, 2)).min()
        wrong = fn(fresh, kc, src, torch.zeros_like(delta), inv)  # forgetting the delta
        assert wrong.min() > 1.0


def test_per_block_sum_groups_tokens_by_block():
    per_token = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    block = torch.tensor([2, 0, 2, 3, 0])
    assert per_block_sum(per_token, block, 5).tolist() == [7.0, 0.0, 4.0, 4.0, 0.0]


# ---------------------------------------------------------------- rotate_copy

@pytest.mark.parametrize("dtype,block_size,heads,dim", [
    (torch.float32, 16, 3, 64), (torch.float16, 16, 2, 128), (torch.bfloat16, 32, 2, 64)])
def test_rotate_copy_triton_matches_twin(dtype, block_size, heads, dim):
    gen = torch.Generator().manual_seed(4)
    nb = 6
    N = 2 * block_size + 5  # two whole blocks plus a partial one
    src_blocks, dst_blocks = [1, 2, 3], [4, 5, 0]
    src = torch.tensor([src_blocks[i // block_size] * block_size + i % block_size for i in range(N)])
    dst = torch.tensor([dst_blocks[i // block_size] * block_size + i % block_size for i in range(N)])
    src[3] = -1
    dst[4] = -1
    delta = torch.full((N,), 1234, dtype=torch.int32)
    delta[block_size:] = -77
    delta[-5:] = 0  # delta 0 must be an exact copy
    kc = poisoned_cache(nb, block_size, heads, dim, dtype)
    vc = poisoned_cache(nb, block_size, heads, dim, dtype)
    for b in src_blocks:
        kc[b] = torch.randn(block_size, heads, dim, generator=gen).to(dtype)
        vc[b] = torch.randn(block_size, heads, dim, generator=gen).to(dtype)
    inv = default_inv_freq(dim)
    ek, ev = kc.clone(), vc.clone()
    rotate_copy_torch(ek, ev, src, dst, delta, inv)
    tk, tv = kc.clone(), vc.clone()
    rotate_copy_triton(tk, tv, src, dst, delta, inv)
    assert torch.equal(tv.view(torch.uint8), ev.view(torch.uint8))  # V is a raw copy
    if dtype == torch.float32:  # cos/sin of the same fp32 angle differ by ~1e-7 between backends
        torch.testing.assert_close(tk, ek, atol=1e-6, rtol=1e-6, equal_nan=True)
    else:  # fp32 rotation, one rounding; 1 ulp because bf16 stores truncate in the interpreter
        assert_within_ulps(tk, ek, dtype)
    exact = dst[-5:]
    assert torch.equal(tk.view(-1, heads, dim)[exact], kc.view(-1, heads, dim)[src[-5:]])


def test_rotate_copy_moves_keys_to_the_new_frame():
    # A copy rotated by delta equals keys computed at the destination positions, up to the
    # fp32 rounding of the rope angle at position ~500 (~3e-5 rad).
    gen = torch.Generator().manual_seed(5)
    inv = default_inv_freq(64)
    raw = torch.randn(16, 2, 64, generator=gen)
    cos, sin = rope_cos_sin(torch.arange(500, 516), inv)
    kc = torch.zeros(3, 16, 2, 64)
    vc = torch.zeros(3, 16, 2, 64)
    kc[1] = rotate(raw, cos[:, None], sin[:, None])
    vc[1] = raw
    cos, sin = rope_cos_sin(torch.arange(20, 36), inv)
    fresh = rotate(raw, cos[:, None], sin[:, None])
    rotate_copy_triton(kc, vc, torch.arange(16, 32), torch.arange(32, 48), torch.full((16,), -480, dtype=torch.int32), inv)
    torch.testing.assert_close(kc[2], fresh, atol=1e-4, rtol=1e-4)
    assert torch.equal(vc[2], raw)


# ---------------------------------------------------------------- dispatch

def test_dispatch_follows_device_then_environment(monkeypatch):
    gen = torch.Generator().manual_seed(6)
    kc = torch.randn(2, 16, 1, 64, generator=gen)
    k_fresh = torch.randn(3, 1, 64, generator=gen)
    args = (k_fresh, kc, torch.tensor([0, 5, 17]), torch.tensor([0, 3, -2], dtype=torch.int32), default_inv_freq(64))
    calls = []
    monkeypatch.setattr("nanodance.kernels.triton_kv.key_deviation_triton", lambda *a: calls.append("triton"))
    monkeypatch.setattr(K, "key_deviation_torch", lambda *a: calls.append("torch"))
    monkeypatch.delenv("NANODANCE_BACKEND", raising=False)
    K.key_deviation(*args)
    monkeypatch.setenv("NANODANCE_BACKEND", "triton")
    K.key_deviation(*args)
    monkeypatch.setenv("NANODANCE_BACKEND", "torch")
    K.key_deviation(*args)
    monkeypatch.setenv("NANODANCE_BACKEND", "auto")
    K.key_deviation(*args)
    assert calls == ["torch", "triton", "torch", "torch"]  # CPU tensors default to torch
    monkeypatch.setenv("NANODANCE_BACKEND", "cuda")
    with pytest.raises(ValueError, match="NANODANCE_BACKEND"):
        K.key_deviation(*args)


def test_forced_triton_backend_runs_the_interpreted_kernels(monkeypatch):
    gen = torch.Generator().manual_seed(7)
    k = torch.randn(5, 2, 64, generator=gen).to(torch.bfloat16)
    v = torch.randn(5, 2, 64, generator=gen).to(torch.bfloat16)
    slots = torch.tensor([0, 3, -1, 17, 31])
    monkeypatch.setenv("NANODANCE_BACKEND", "triton")
    kc, vc = poisoned_cache(2, 16, 2, 64, torch.bfloat16), poisoned_cache(2, 16, 2, 64, torch.bfloat16)
    K.store_kv(k, v, kc, vc, slots)
    monkeypatch.setenv("NANODANCE_BACKEND", "torch")
    ek, ev = poisoned_cache(2, 16, 2, 64, torch.bfloat16), poisoned_cache(2, 16, 2, 64, torch.bfloat16)
    K.store_kv(k, v, ek, ev, slots)
    assert torch.equal(kc.view(torch.int16), ek.view(torch.int16))


def test_compiled_kernels_refuse_cpu_tensors_with_a_clear_error():
    class JITFunction:  # stands in for a kernel compiled for a GPU (TRITON_INTERPRET unset)
        pass

    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        check_launchable(JITFunction(), torch.zeros(1))
