"""Decode attention with scattered 1-token patches vs block-aligned recomputes (CPU, torch path).

    python bench/short_views.py [--agents 8] [--context 2048] [--recompute 0.15] [--repeats 20]

Packed diffs make a recomputed token cost one slot, so an agent whose recomputed tokens are
scattered reads its cache through many short views: a view of the master, a 1-token view of its
diff slot, a view of the master again... This measures what that costs one decode step of
attention (one layer; every layer repeats it), against the same agent whose recomputed tokens
come in block-aligned runs (the `block` scheme). Both read the same number of keys; only the
view count differs. The per-step metadata work (the torch path's gather indices, built once per
step and shared by all layers) is timed with it, divided by the model's 30 layers.
Prints one table; the goal is at most 1.3x.
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nanodance.attention_metadata import build_metadata  # noqa: E402
from nanodance.kernels.torch_ref import kv_gather, paged_attention_torch  # noqa: E402
from nanodance.tools.synthetic import default_inv_freq  # noqa: E402

BLOCK, HKV, GROUP, DIM, LAYERS = 16, 3, 3, 64, 30


def agent_views(rng: random.Random, context: int, recompute: float, scattered: bool, first_block: int) -> list:
    """Views over [0, context): master blocks (delta 1000) with `recompute` of the positions in
    packed private slots, scattered one by one or in whole blocks."""
    chosen: set[int] = set()
    if scattered:
        chosen = set(rng.sample(range(context), int(recompute * context)))
    else:
        blocks = rng.sample(range(context // BLOCK), int(recompute * context) // BLOCK)
        chosen = {b * BLOCK + i for b in blocks for i in range(BLOCK)}
    views, pos, diff_block, diff_slot = [], 0, first_block, 0
    master_block = lambda p: 1 + p // BLOCK  # noqa: E731 - blocks 1..context/BLOCK: the masters
    while pos < context:
        if pos in chosen:
            if diff_slot == BLOCK:
                diff_block, diff_slot = diff_block + 1, 0
            views.append((diff_block, diff_slot, diff_slot + 1, pos, pos - (5000 + diff_slot)))
            diff_slot, pos = diff_slot + 1, pos + 1
            continue
        end = pos
        while end < context and end not in chosen and (end == pos or end % BLOCK):
            end += 1
        views.append((master_block(pos), pos % BLOCK, pos % BLOCK + end - pos, pos, 1000))
        pos = end
    return views


def merge_runs(views: list) -> list:
    """Adjacent 1-slot views of consecutive slots and positions become one view (block runs)."""
    out = []
    for v in views:
        if out and out[-1][0] == v[0] and out[-1][2] == v[1] and out[-1][3] + out[-1][2] - out[-1][1] == v[3] \
                and out[-1][4] == v[4]:
            out[-1] = (v[0], out[-1][1], v[2], out[-1][3], v[4])
        else:
            out.append(v)
    return out


def step_timer(views_per_agent: list, context: int):
    """A function that times one decode step of attention (one layer) over these views."""
    gen = torch.Generator().manual_seed(0)
    blocks = 2 + max(v[0] for vs in views_per_agent for v in vs)
    k = torch.randn(blocks, BLOCK, HKV, DIM, generator=gen)
    v = torch.randn(blocks, BLOCK, HKV, DIM, generator=gen)
    q = torch.randn(len(views_per_agent), HKV * GROUP, DIM, generator=gen)
    inv = default_inv_freq(DIM)

    def once() -> float:
        meta = build_metadata(views_per_agent, [[context - 1]] * len(views_per_agent), BLOCK)
        t0 = time.perf_counter()
        kv_gather(meta)
        setup = time.perf_counter() - t0
        t0 = time.perf_counter()
        paged_attention_torch(q, k, v, meta, inv, DIM ** -0.5)
        return setup / LAYERS + time.perf_counter() - t0
    return once


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench/short_views.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--agents", type=int, default=8)
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--recompute", type=float, default=0.15)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rng = random.Random(0)
    first = 2 + args.context // BLOCK
    timers, counts = {}, {}
    for name, scattered in (("block-aligned recompute", False), ("scattered 1-token patches", True)):
        views = [merge_runs(agent_views(rng, args.context, args.recompute, scattered, first))
                 for _ in range(args.agents)]
        timers[name], counts[name] = step_timer(views, args.context), max(len(v) for v in views)
    times: dict[str, list[float]] = {name: [] for name in timers}
    for _ in range(args.repeats):  # alternate, so that noise from other jobs hits both alike
        for name, once in timers.items():
            times[name].append(once())
    rows = {name: (statistics.median(ts), counts[name]) for name, ts in times.items()}
    base = rows["block-aligned recompute"][0]
    print(f"decode attention, torch path, {args.agents} agents x {args.context} keys, {args.recompute:.0%} of them "
          f"recomputed; {torch.get_num_threads()} threads; median of {args.repeats}; per layer incl. 1/{LAYERS} "
          f"of the step's gather setup")
    print(f"{'layout':<28} {'views/agent':>11} {'ms/layer':>9} {'vs aligned':>10}")
    for name, (sec, n) in rows.items():
        print(f"{name:<28} {n:>11} {sec * 1e3:>9.3f} {sec / base:>9.2f}x")
    ratio = rows["scattered 1-token patches"][0] / base
    print(f"goal <= 1.3x: {'met' if ratio <= 1.3 else 'not met'} ({ratio:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
