"""Compile the Triton kernels for a GPU on a machine without one, exactly as they would launch.

    TRITON_INTERPRET=0 python -m nanodance.tools.compile_check [--arch 90] [--arch 80]

The interpreter that runs the CPU tests accepts kernels a GPU compiler rejects (dot tiles under
16, sibling branches binding one name to different types, ...). This tool runs each launcher on
small CPU tensors with its kernel swapped for a recorder, turns every recorded launch into the
signature, specialization (ints equal to 1 become constants, multiples of 16 and pointers get
16-divisibility, as at a real launch) and options Triton would use, compiles it for the target
with the ptxas bundled in the triton wheel, and prints registers and spills per launch. The
tile sizes in `triton_attention.plan_attention` were chosen from this report.
Owns: `record_launches`, `compile_launch`, `ptxas_report`, `representative_launches`, `main`.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass

import torch


@dataclass
class Launch:
    label: str
    kernel: object  # the real triton JITFunction
    args: tuple
    kwargs: dict


class _Recorder:
    """Stands in for a kernel: `kernel[grid](*args, **kwargs)` records instead of launching."""

    def __init__(self, kernel, label, sink):
        self.kernel, self.label, self.sink = kernel, label, sink

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.sink.append(Launch(self.label, self.kernel, args, kwargs))


@contextmanager
def record_launches(module, names: list[str], label: str, sink: list):
    """Swap `module.<name>` kernels for recorders; launchers run on CPU tensors as if on a GPU."""
    saved = {n: getattr(module, n) for n in names + ["check_launchable", "is_interpreted"] if hasattr(module, n)}
    try:
        for n in names:
            setattr(module, n, _Recorder(saved[n], f"{label}", sink))
        if "check_launchable" in saved:
            module.check_launchable = lambda *a, **k: None
        if "is_interpreted" in saved:
            module.is_interpreted = lambda kernel: False  # pick the GPU's dot dtypes
        yield sink
    finally:
        for n, v in saved.items():
            setattr(module, n, v)


_TORCH_TO_TRITON = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int32: "i32",
                    torch.int64: "i64", torch.uint8: "u8", torch.bool: "i1"}


def compile_launch(launch: Launch, arch: int):
    """Compile one recorded launch for sm_<arch>; returns the CompiledKernel (ptx inside)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = launch.kernel
    if type(fn).__name__ != "JITFunction":
        raise RuntimeError("kernels are interpreted: run with TRITON_INTERPRET unset or 0")
    bound = dict(zip(fn.arg_names, launch.args))
    bound.update({k: v for k, v in launch.kwargs.items() if k in fn.arg_names})
    options = {k: v for k, v in launch.kwargs.items() if k not in fn.arg_names}
    sig, consts, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        v = bound[name]
        param = fn.params[i]
        if param.is_constexpr:
            sig[name], consts[name] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            sig[name] = "*" + _TORCH_TO_TRITON[v.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, bool):
            sig[name] = "i1"
        elif isinstance(v, int):
            if v == 1:
                sig[name], consts[name] = "constexpr", 1
            else:
                sig[name] = "i32"
                if v % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, float):
            sig[name] = "fp32"
        else:
            raise TypeError(f"{name}: cannot type {type(v)}")
    src = ASTSource(fn, sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def ptxas_report(compiled, arch: int) -> str:
    """'regs N, spill S bytes' from the bundled ptxas (-v) on the kernel's PTX."""
    import triton

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        r = subprocess.run([ptxas, "-v", f"--gpu-name={gpu}", ptx, "-o", os.path.join(tmp, "k.cubin")],
                           capture_output=True, text=True)
    regs = spill = "?"
    for line in r.stderr.splitlines():
        if "Used" in line and "registers" in line:
            regs = line.split("Used")[1].split("registers")[0].strip()
        if "spill stores" in line:
            spill = line.split("bytes spill stores")[0].split(",")[-1].strip()
    return f"regs {regs:>3}, spill {spill:>4} B"


def representative_launches(quick: bool = False) -> list[Launch]:
    """Launches the engine makes: decode, split-K decode, long and short prefill (bf16), fp32,
    fp16 with head_dim 64 and GQA 3, block size 32, the token-packed path (short views), and
    the KV/diff kernels."""
    from nanodance.attention_metadata import build_metadata
    from nanodance.kernels import triton_attention, triton_kv
    from nanodance.tools.synthetic import default_inv_freq

    sink: list[Launch] = []

    def attention(label, dtype, Hq, Hkv, D, page, seqs, **kw):
        views, q_pos = [], []
        nb = 1
        for kv_len, nq in seqs:
            nv = -(-kv_len // page)
            views.append([(nb + i, 0, min(page, kv_len - i * page), i * page, 0) for i in range(nv)])
            nb += nv
            q_pos.append(list(range(kv_len - nq, kv_len)))
        meta = build_metadata(views, q_pos, page)
        cache = torch.zeros(nb, page, Hkv, D, dtype=dtype)
        q = torch.zeros(meta.q_pos.numel(), Hq, D, dtype=dtype)
        with record_launches(triton_attention, ["_attention_kernel", "_merge_splits_kernel"], label, sink):
            triton_attention.paged_attention_triton(q, cache, cache, meta, default_inv_freq(D), D ** -0.5, **kw)

    bf16 = torch.bfloat16
    attention("decode bf16 G4 D128", bf16, 32, 8, 128, 16, [(300, 1)] * 3)
    attention("prefill bf16 G4 D128 long", bf16, 32, 8, 128, 16, [(200, 200)])
    attention("decode bf16 G4 D128 token-packed", bf16, 32, 8, 128, 16, [(300, 1)] * 3, packed=True)
    attention("prefill bf16 G4 D128 token-packed", bf16, 32, 8, 128, 16, [(200, 200)], packed=True)
    if not quick:
        attention("decode split bf16", bf16, 32, 8, 128, 16, [(3000, 1)], num_splits=4)
        attention("prefill bf16 G1 short", bf16, 8, 8, 128, 16, [(40, 40), (30, 1)])
        attention("decode fp16 G3 D64 P32", torch.float16, 9, 3, 64, 32, [(100, 1)] * 2)
        attention("prefill fp16 G3 D64 P32", torch.float16, 9, 3, 64, 32, [(100, 100)])
        attention("decode fp32", torch.float32, 16, 4, 128, 16, [(100, 1)] * 2)
        attention("prefill fp32", torch.float32, 16, 4, 128, 16, [(100, 100)])
        attention("decode bf16 G8 D96", bf16, 64, 8, 96, 16, [(100, 1)] * 2)
        attention("decode split bf16 token-packed", bf16, 32, 8, 128, 16, [(3000, 1)], num_splits=4, packed=True)
        attention("decode fp32 token-packed", torch.float32, 16, 4, 128, 16, [(100, 1)] * 2, packed=True)
        attention("prefill fp32 token-packed", torch.float32, 16, 4, 128, 16, [(100, 100)], packed=True)
        attention("prefill fp16 G3 D64 P32 token-packed", torch.float16, 9, 3, 64, 32, [(100, 100)],
                  packed=True)
    k = torch.zeros(40, 8, 128, dtype=bf16)
    cache = torch.zeros(8, 16, 8, 128, dtype=bf16)
    slots = torch.arange(40)
    delta = torch.zeros(40, dtype=torch.int32)
    inv = default_inv_freq(128)
    names = ["_store_kv_kernel", "_key_deviation_kernel", "_rotate_copy_kernel"]
    with record_launches(triton_kv, names, "store_kv bf16", sink):
        triton_kv.store_kv_triton(k, k, cache, cache, slots)
    with record_launches(triton_kv, names, "key_deviation bf16", sink):
        triton_kv.key_deviation_triton(k, cache, slots, delta, inv)
    with record_launches(triton_kv, names, "rotate_copy bf16", sink):
        triton_kv.rotate_copy_triton(cache, cache, slots, slots + 64, delta, inv)
    return sink


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, action="append", help="SM version, e.g. 90 (H100), 80 (A100)")
    parser.add_argument("--quick", action="store_true",
                        help="only decode and long prefill (both paths), and the KV kernels")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("compile_check needs the real compiler: unset TRITON_INTERPRET (or set it to 0).")
        return 2
    failures = 0
    for arch in args.arch or [90]:
        for launch in representative_launches(args.quick):
            name = f"{launch.label} [{launch.kernel.__name__}]"
            try:
                report = ptxas_report(compile_launch(launch, arch), arch)
            except Exception as e:  # report every failure, not only the first
                failures += 1
                report = f"FAILED {type(e).__name__}: {str(e).strip().splitlines()[-1][:200]}"
            print(f"sm_{arch}  {name:<60} {report}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
