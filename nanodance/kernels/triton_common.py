"""Pieces shared by the Triton kernels: RoPE rotation in fp32 and launch-side facts.

Owns:
    rope_rotate(x1, x2, angle)   jit: rotate-half RoPE on the two halves of the head dim, fp32,
                                 with an explicit range reduction of the angle
    is_interpreted(kernel)       host: does this kernel run under TRITON_INTERPRET=1?
    compute_dtype(...)           host: the dtype tl.dot operands should have
    check_launchable(...)        host: a clear error instead of a Triton crash on CPU tensors

Every kernel splits the head dim into two halves [0, D/2) and [D/2, D): RoPE (Hugging Face
rotate-half layout) pairs element j with element j + D/2, so holding both halves in separate
registers makes a rotation elementwise, with no shuffles or second loads.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# 2*pi split in two parts (Cody-Waite): k * TWO_PI_A is exact in fp32 for |k| < 2**15, so the
# reduced angle stays within ~2e-6 of the exact one for the angles rope deltas produce (|angle|
# up to ~1e5 rad). Reducing first makes cos/sin accurate whether the backend lowers them to
# libdevice or to the hardware's approximate instructions (which degrade far from the origin).
TWO_PI_A: tl.constexpr = tl.constexpr(6.28125)
TWO_PI_B: tl.constexpr = tl.constexpr(1.9353071795864769e-03)
INV_TWO_PI: tl.constexpr = tl.constexpr(0.15915494309189535)


@triton.jit
def rope_rotate(x1, x2, angle):
    """Rotate-half RoPE by `angle` on the two halves of the head dim, in fp32.

    (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin); `angle` (fp32) broadcasts against x1/x2.
    The angle is reduced to [-pi, pi] first. One helper, not three: every jit-helper call costs
    ~2 ms under the interpreter."""
    k = tl.floor(angle * INV_TWO_PI + 0.5)
    r = angle - k * TWO_PI_A
    r = r - k * TWO_PI_B
    cos = tl.cos(r)
    sin = tl.sin(r)
    x1 = x1.to(tl.float32)
    x2 = x2.to(tl.float32)
    return x1 * cos - x2 * sin, x2 * cos + x1 * sin


def is_interpreted(kernel) -> bool:
    """True when `kernel` was decorated while TRITON_INTERPRET=1 (it then runs on CPU tensors)."""
    return type(kernel).__name__ == "InterpretedFunction"


def compute_dtype(dtype: torch.dtype, interpreted: bool):
    """tl dtype for tl.dot operands of a `dtype` computation.

    bf16 is raw uint16 inside the interpreter (numpy has no bf16), so a bf16 dot there multiplies
    integers: interpreted kernels convert bf16 to fp32 right after loading and dot in fp32.
    """
    if dtype == torch.float32 or (dtype == torch.bfloat16 and interpreted):
        return tl.float32
    if dtype == torch.bfloat16:
        return tl.bfloat16
    if dtype == torch.float16:
        return tl.float16
    raise TypeError(f"unsupported dtype for the Triton kernels: {dtype}")


def dot_precision(dot_dtype) -> str:
    """fp32 dots in full precision ("ieee") so fp32 models match the torch twins on a GPU too;
    TF32 would cost ~1e-3 relative error in the scores."""
    return "ieee" if dot_dtype == tl.float32 else "tf32"


def check_launchable(kernel, *tensors: torch.Tensor) -> None:
    """Raise a clear error when Triton cannot launch `kernel` on these tensors."""
    on_cpu = any(not t.is_cuda for t in tensors)
    if on_cpu and not is_interpreted(kernel):
        raise RuntimeError(
            "The Triton kernels got CPU tensors but are compiled for a GPU. To run them on CPU "
            "(slow, for tests) set TRITON_INTERPRET=1 before nanodance's Triton modules are first "
            "imported; otherwise use NANODANCE_BACKEND=torch. "
            f"(TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '<unset>')})")


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))
