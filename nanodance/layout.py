"""An agent's layout: for every prompt position, where its K/V comes from (docs/design.md).

The collector decides per round *what* each agent reuses; this module turns that into the
agent's *views*, once, when the scheduler admits its request.

    plan_agent(n, spans, masters, offsets, ...) -> AgentPlan   positions -> runs
    lay_out(seq, plan, pool, executor) -> bool                  runs -> views (+ copies, run by the executor)
    RoundLayouts: the plans of the call in flight by sequence id; the scheduler's LayoutSource

A run is a range of prompt positions with one source:
- "view": a master's slots, read in place at this agent's positions through the view's rope
  delta. No copy, one reference per block.
- "compute": private slots filled by this round's extend prefill. Private text, recomputed
  chunks of shared blocks (the mirror's diff), a persistent agent's kept cache.
- "copy": private slots filled now by re-rotating the master's K/V (`kernels.rotate_copy`):
  the `pic` baseline, partly recomputed after.

Private slots are packed (`_Packer`): every computed or copied run takes the next free slots of
the agent's last private block, whatever its position. The frame rule still holds: the key in
slot s of a block framed at frame0 is rotated at frame0 + s, so each view over packed slots has
a well-defined rope delta and attention reads it like a master view.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from nanodance.agents import AgentCache
from nanodance.cache import BlockPool, View
from nanodance.errors import NoFreeBlocks
from nanodance.executor import Executor
from nanodance.masters import Master
from nanodance.segments import SharedSpan
from nanodance.sequence import Sequence


@dataclass
class Run:
    """Prompt positions [start, end) and where their K/V comes from."""

    start: int
    end: int
    kind: str  # "compute" (private, computed) | "view" (master, in place) | "copy" (private copy of master)
    master: Master | None = None
    offset: int = 0  # segment offset of `start` (view / copy runs)


@dataclass
class AgentPlan:
    runs: list[Run]
    recompute: list[int]  # positions inside shared spans that are recomputed
    prefix_len: int  # leading positions that are exact (prefix-cacheable)
    own: AgentCache | None = None  # positions [0, len(own.token_ids)) come from the agent's kept cache

    @property
    def computed_positions(self) -> list[int]:
        pos = [p for r in self.runs if r.kind == "compute" for p in range(r.start, r.end)]
        return sorted(set(pos) | set(self.recompute))


def plan_agent(n: int, spans: list[SharedSpan], masters: dict[tuple, Master],
               offsets: dict[int, list[int]], dense_copy: bool = False,
               own: AgentCache | None = None) -> AgentPlan:
    """Lay out one agent's prompt of `n` tokens: `offsets[i]` are span i's recomputed offsets.

    With `own` (a persistent agent whose prompt extends its kept cache), positions before
    len(own.token_ids) come from that cache; should it be gone (after a preemption) they are
    computed, so the plan always covers every position.
    """
    runs: list[Run] = []
    recompute: list[int] = []
    cursor = len(own.token_ids) if own is not None else 0
    if cursor:
        runs.append(Run(0, cursor, "compute"))
    def private(a, b):
        if a < b:
            runs.append(Run(a, b, "compute"))

    laid_out = []
    for i, span in enumerate(spans):  # i indexes `offsets`: skipped spans keep their numbers
        if span.start < cursor:
            continue  # inside the kept cache
        laid_out.append(span)
        private(cursor, span.start)
        master = masters[span.key]
        chosen = set(offsets.get(i, []))
        if span.end == n:
            chosen.add(span.length - 1)  # the last prompt token is always computed: it samples
        recompute.extend(span.start + o for o in sorted(chosen))
        if dense_copy:
            runs.append(Run(span.start, span.end, "copy", master, 0))
        else:
            # Maximal runs of recomputed offsets become private "compute" runs (packed into the
            # agent's diff blocks), the rest views of the master, read in place.
            o = 0
            while o < span.length:
                kind = "compute" if o in chosen else "view"
                e = o
                while e < span.length and (e in chosen) == (kind == "compute"):
                    e += 1
                runs.append(Run(span.start + o, span.start + e, kind, master if kind == "view" else None, o))
                o = e
        cursor = span.end
    private(cursor, n)
    prefix_len = laid_out[0].start if laid_out else n
    if own is not None:
        prefix_len = min(prefix_len, own.exact_prefix_len)
    return AgentPlan(runs, sorted(set(recompute)), prefix_len, own)


def lay_out(seq: Sequence, plan: AgentPlan, pool: BlockPool, executor: Executor) -> bool:
    """Give `seq` its views per `plan` (ref masters, allocate private blocks, copy); False if the pool is short.

    Cached blocks of the exact leading private prefix are reused first (prefix caching).
    On failure everything taken is given back and the sequence is untouched.
    """
    bs = pool.block_size
    seq.exact_prefix_len = min(seq.exact_prefix_len, plan.prefix_len)
    if plan.own is not None:  # a persistent agent's kept cache: its views come first, refs handed over
        for v in plan.own.hand_over():
            seq.add_view(v)
    else:
        seq.take_cached_prefix(pool)
    cached = seq.covered
    copies: list[tuple[int, int, int]] = []  # (src slot, dst slot, delta)
    packer = _Packer(pool)
    try:
        for run in plan.runs:
            start = max(run.start, seq.covered)
            if start >= run.end:
                continue  # served by the prefix cache
            if run.kind == "view":
                for v in run.master.views_at(run.offset + start - run.start, run.offset + run.end - run.start, start):
                    pool.ref(v.block)
                    seq.add_view(v)
                continue
            views = packer.place(seq, start, run.end)
            if run.kind == "copy":
                copies += _copies(run, views, pool)
        last = seq.views[-1] if seq.views else None
        if last is not None and last.block == packer.block:
            # The prompt ends in our last private block: let decode fill the rest of it.
            seq.replace_views(seq.views[:-1] + [View(last.block, last.lo, bs, last.pos0)])
    except NoFreeBlocks:
        pool.release(seq.views)
        seq.replace_views([])
        seq.block_hashes, seq.num_hashed_blocks = [], 0
        return False
    if copies:
        src_slots = torch.tensor([c[0] for c in copies], dtype=torch.int64, device=executor.device)
        dst_slots = torch.tensor([c[1] for c in copies], dtype=torch.int64, device=executor.device)
        delta = torch.tensor([c[2] for c in copies], dtype=torch.int32, device=executor.device)
        executor.rotate_copy(src_slots, dst_slots, delta)
    n = seq.num_prompt_tokens
    computed = [p for p in plan.computed_positions if p >= cached]
    seq.pending = computed + list(range(n, seq.num_tokens))
    seq.reused_positions = n - len([p for p in computed if p < n])
    return True


class _Packer:
    """Private slots for one agent's computed runs, packed densely in the blocks it allocates.

    A run continues in the last private block's next free slot, whatever its position, and opens
    a new block (framed at the run's position) only when that block is full. A token written to a
    slot is rotated at the slot's frame position (`frame0 + slot`, see runner.py), so the view
    over it reads it through its delta like any master view: packing costs no exactness, and an
    agent's private K/V takes about ceil(private tokens / block_size) blocks.
    """

    def __init__(self, pool: BlockPool):
        self.pool = pool
        self.block: int | None = None  # the last block allocated here
        self.next_slot = 0

    def place(self, seq: Sequence, start: int, end: int) -> list[View]:
        """Give `seq` views over fresh private slots for positions [start, end); returns them.

        Each view is added as soon as its reference is taken, so a pool that runs dry midway
        leaves nothing that `seq.views` does not hold (the caller releases those)."""
        bs = self.pool.block_size
        views, pos = [], start
        while pos < end:
            if self.block is not None and self.next_slot < bs:
                self.pool.ref(self.block)
            else:
                self.block, self.next_slot = self.pool.allocate(frame0=pos), 0
            length = min(bs - self.next_slot, end - pos)
            views.append(View(self.block, self.next_slot, self.next_slot + length, pos))
            seq.add_view(views[-1])
            self.next_slot += length
            pos += length
        return views


def _copies(run: Run, views: list[View], pool: BlockPool) -> list[tuple[int, int, int]]:
    """(src slot, dst slot, rope delta) re-rotating the master's keys to the frames of `views`'s slots.

    A producer's last token has no K/V: it is recomputed, not copied.
    """
    bs = pool.block_size
    src, src_frames = run.master.slots(bs), run.master.key_positions(pool)
    out = []
    for v in views:
        for j in range(v.length):
            off = run.offset + v.pos0 + j - run.start
            if off < len(src):
                dst_frame = pool.blocks[v.block].frame0 + v.lo + j
                out.append((src[off], v.block * bs + v.lo + j, dst_frame - src_frames[off]))
    return out


class RoundLayouts:
    """The plans of the call in flight, by sequence id: what the scheduler asks at admission."""

    def __init__(self, pool: BlockPool, executor: Executor):
        self.pool, self.executor = pool, executor
        self.plans: dict[int, AgentPlan] = {}

    def lay_out(self, seq: Sequence) -> bool | None:
        """The scheduler's `LayoutSource`: lay out a round request's views by its plan, if it has one."""
        plan = self.plans.get(seq.seq_id)
        if plan is None:
            return None
        return lay_out(seq, plan, self.pool, self.executor)

    def masters_needed(self, unfinished: set[int]) -> set[int]:
        """ids of the masters that the plans of unfinished requests read."""
        return {id(r.master) for sid, plan in self.plans.items() if sid in unfinished
                for r in plan.runs if r.master is not None}

    def master_blocks(self) -> set[tuple[int, int]]:
        """(block, allocation serial) of every master block the plans read."""
        return {(v.block, self.pool.blocks[v.block].serial) for plan in self.plans.values()
                for r in plan.runs if r.master is not None for v in r.master.views}
