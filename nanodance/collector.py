"""The KV Collector: once per round, masters for shared blocks, the recompute choice, and
each agent's view layout (DESIGN.md §3.3-§3.4).

Vocabulary:
- a *segment* is one distinct shared block of the round (key = its token ids);
- its *master* is one copy of its K/V in the pool: the previous round's producer's decode KV
  (`master="producer"`, zero prefill) or a standalone prefill (optionally behind a sink token
  that is dropped after). `Master.views` cover the segment's tokens at master positions;
- a *plan* per agent says, for each prompt position, where its K/V comes from: a master view
  (read in place through a rope delta: no copy), a private slot computed in this round's extend
  prefill (private text and recomputed tokens: the mirror's *diff blocks*), or, for the
  `pic` baseline and token-level recompute, a private slot filled by a re-rotated copy of the
  master (`kernels.rotate_copy`) and then partly recomputed.

The recompute choice is made once per segment (collective) in one reference context, or per
agent (`selection="per_agent"`, and always for `pic`), by one of the schemes:
- "block": the segment's first block, then the blocks (segment-relative chunks of block_size
  tokens) with the largest key deviation at the check layer, until `ratio` of it is chosen;
- "first": the first ceil(ratio * len) tokens of the segment (EPIC's LegoLink; no scoring);
- "token": the first token, then the tokens with the largest deviation (CacheBlend); the blocks
  holding them are copied privately, the chosen tokens recomputed in place.
Key deviation = sum over heads and dims of (K_fresh - R(delta) K_master)^2 at the check layer,
K_fresh from an exact forward of the reference agent's prompt through the first `check_layer`
layers (into a scratch cache) — the "token-layers" this costs are counted.

Shapes: reference forwards take input_ids int64 [T] over a scratch `KVCache` of `check_layer`
layers; deviations come back fp32 per token of the segment.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from nanodance import kernels
from nanodance.attention_metadata import AttentionMetadata
from nanodance.cache import BlockPool, KVCache, NoFreeBlocks, View
from nanodance.model import CausalLM
from nanodance.segments import SharedSpan
from nanodance.sequence import Sequence

SCHEMES = ("block", "first", "token")
MASTER_SOURCES = ("producer", "standalone")
SELECTIONS = ("collective", "per_agent")


@dataclass
class Master:
    """One pooled copy of a segment's K/V; holds one reference on each block it views."""

    key: tuple[int, ...]
    views: list[View]  # cover the segment's tokens in order, at master positions
    source: str  # "producer" | "standalone"

    @property
    def start(self) -> int:
        return self.views[0].pos0

    def views_at(self, a: int, b: int, at: int) -> list[View]:
        """Views onto the master's slots of segment offsets [a, b), placed at agent position `at`."""
        out = []
        for v in self.views:
            off0, off1 = v.pos0 - self.start, v.end - self.start
            x, y = max(a, off0), min(b, off1)
            if x < y:
                out.append(View(v.block, v.lo + x - off0, v.lo + y - off0, at + x - a))
        return out

    def slots(self, block_size: int) -> list[int]:
        """Flat pool slot of every segment token, in order."""
        return [v.block * block_size + s for v in self.views for s in range(v.lo, v.hi)]


@dataclass
class Run:
    """Prompt positions [start, end) and where their K/V comes from."""

    start: int
    end: int
    kind: str  # "compute" (private, computed) | "view" (master, in place) | "copy" (private copy of master)
    master: Master | None = None
    offset: int = 0  # segment offset of `start` (view / copy runs)


@dataclass
class AgentCache:
    """A persistent agent's cache kept between rounds: views of positions [0, len(token_ids))."""

    token_ids: list[int]
    views: list[View]  # holds one reference per view
    exact_prefix_len: int

    def truncate(self, n: int, pool: BlockPool) -> None:
        """Keep only positions [0, n): views past it are released, a straddling one narrowed."""
        kept = []
        for v in self.views:
            if v.pos0 >= n:
                pool.unref(v.block)
            else:
                kept.append(View(v.block, v.lo, min(v.hi, v.lo + n - v.pos0), v.pos0))
        self.views, self.token_ids = kept, self.token_ids[:n]
        self.exact_prefix_len = min(self.exact_prefix_len, n)

    def take(self) -> list[View]:
        """Hand the views (and their references) over to the agent's next sequence."""
        views, self.views = self.views, []
        return views


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


@dataclass
class CollectorCounters:
    master_prefill_tokens: int = 0  # standalone master tokens computed (all layers)
    producer_masters: int = 0
    standalone_masters: int = 0
    reference_tokens: int = 0  # tokens run through `check_layer` layers for deviation scoring
    reference_token_layers: int = 0
    scored_segments: int = 0
    seconds: float = 0.0


@dataclass
class CollectorConfig:
    recompute_ratio: float = 0.15
    scheme: str = "block"
    master: str = "producer"
    master_sink: bool = True
    check_layer: int = 1
    selection: str = "collective"
    dense_copy: bool = False  # the `pic` baseline: every shared token copied into private blocks


def select_offsets(length: int, ratio: float, scheme: str, block_size: int,
                   deviation: torch.Tensor | None) -> list[int]:
    """Segment offsets to recompute, sorted. `deviation` is fp32 [length] (not needed for "first")."""
    target = math.ceil(ratio * length - 1e-9)
    if target <= 0:
        return []
    if target >= length:
        return list(range(length))
    if scheme == "first":
        return list(range(target))
    assert deviation is not None, "this scheme needs key deviations"
    if scheme == "token":
        rest = torch.argsort(deviation[1:], descending=True, stable=True) + 1
        return sorted([0] + rest[:target - 1].tolist())
    num_chunks = math.ceil(length / block_size)
    per_chunk = kernels.per_block_sum(deviation, torch.arange(length) // block_size, num_chunks)
    order = [0] + [c for c in torch.argsort(per_chunk[1:], descending=True, stable=True).add(1).tolist()]
    chosen: list[int] = []
    for c in order:
        if len(chosen) >= target:
            break
        chosen.extend(range(c * block_size, min(length, (c + 1) * block_size)))
    return sorted(chosen)


def needs_scoring(cfg: CollectorConfig) -> bool:
    return cfg.scheme != "first" and 0 < cfg.recompute_ratio < 1


def plan_agent(n: int, spans: list[SharedSpan], masters: dict[tuple, Master],
               offsets: dict[int, list[int]], cfg: CollectorConfig, block_size: int,
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
    spans = [s for s in spans if s.start >= cursor]

    def private(a, b):
        if a < b:
            runs.append(Run(a, b, "compute"))

    for i, span in enumerate(spans):
        private(cursor, span.start)
        master = masters[span.key]
        chosen = set(offsets.get(i, []))
        if span.end == n:
            chosen.add(span.length - 1)  # the last prompt token is always computed: it samples
        recompute.extend(span.start + o for o in sorted(chosen))
        if cfg.dense_copy:
            runs.append(Run(span.start, span.end, "copy", master, 0))
        elif cfg.scheme == "token":
            # Chunks holding a recomputed token are copied privately; the rest is viewed in place.
            chunks = {o // block_size for o in chosen}
            for c in range(math.ceil(span.length / block_size)):
                a, b = c * block_size, min(span.length, (c + 1) * block_size)
                _append(runs, Run(span.start + a, span.start + b, "copy" if c in chunks else "view", master, a))
        else:
            # Maximal runs of recomputed offsets become private "compute" runs, the rest views.
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
    prefix_len = spans[0].start if spans else n
    if own is not None:
        prefix_len = min(prefix_len, own.exact_prefix_len)
    return AgentPlan(runs, sorted(set(recompute)), prefix_len, own)


def _append(runs: list[Run], run: Run) -> None:
    last = runs[-1] if runs else None
    if last and last.kind == run.kind and last.master is run.master and last.end == run.start \
            and last.offset + (last.end - last.start) == run.offset:
        last.end = run.end
    else:
        runs.append(run)


def materialize(seq: Sequence, plan: AgentPlan, pool: BlockPool, kv: KVCache, inv_freq: torch.Tensor,
                match_prefix) -> bool:
    """Give `seq` its views per `plan` (ref masters, allocate private blocks, copy); False if the pool is short.

    `match_prefix(seq)` reuses cached blocks of the exact leading private prefix first.
    On failure everything taken is given back and the sequence is untouched.
    """
    bs = pool.block_size
    seq.exact_prefix_len = min(seq.exact_prefix_len, plan.prefix_len)
    if plan.own is not None:  # a persistent agent's kept cache: its views come first, refs handed over
        for v in plan.own.take():
            seq.add_view(v)
    else:
        match_prefix(seq)
    cached = seq.covered
    copies: list[tuple[int, int, int]] = []  # (src slot, dst slot, delta)
    last_own: tuple[int, int] | None = None  # (block, frame0) of the last private block allocated here
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
            src = run.master.slots(bs) if run.kind == "copy" else None
            pos = start
            while pos < run.end:
                if last_own is not None and last_own[1] <= pos < last_own[1] + bs:
                    # Still inside the frame of our last private block: use its free slots
                    # (slot = position - frame0 keeps the delta 0) instead of a new block.
                    block, lo = last_own[0], pos - last_own[1]
                    pool.ref(block)
                else:
                    block, lo = pool.allocate(frame0=pos), 0
                    last_own = (block, pos)
                length = min(bs - lo, run.end - pos)
                seq.add_view(View(block, lo, lo + length, pos))
                if src is not None:
                    for j in range(length):
                        off = run.offset + pos + j - run.start
                        if off < len(src):  # a producer's last token has no K/V: it is recomputed
                            copies.append((src[off], block * bs + lo + j, pos + j - (run.master.start + off)))
                pos += length
        last = seq.views[-1] if seq.views else None
        if last is not None and last_own is not None and last.block == last_own[0]:
            # The prompt ends in our private block: let decode fill the rest of it.
            seq.replace_views(seq.views[:-1] + [View(last.block, last.lo, bs, last.pos0)])
    except NoFreeBlocks:
        pool.release(seq.views)
        seq.replace_views([])
        seq.block_hashes, seq.num_hashed_blocks = [], 0
        return False
    if copies:
        src_slots = torch.tensor([c[0] for c in copies], dtype=torch.int64, device=kv.layers[0][0].device)
        dst_slots = torch.tensor([c[1] for c in copies], dtype=torch.int64, device=src_slots.device)
        delta = torch.tensor([c[2] for c in copies], dtype=torch.int32, device=src_slots.device)
        for k_cache, v_cache in kv.layers:
            kernels.rotate_copy(k_cache, v_cache, src_slots, dst_slots, delta, inv_freq)
    n = seq.num_prompt_tokens
    computed = [p for p in plan.computed_positions if p >= cached]
    seq.pending = computed + list(range(n, seq.num_tokens))
    seq.reused_positions = n - len([p for p in computed if p < n])
    return True


@torch.inference_mode()
def reference_keys(model: CausalLM, prompts: list[list[int]], check_layer: int, block_size: int,
                   dtype: torch.dtype, device) -> list[torch.Tensor]:
    """Exact keys [n_i, Hkv, D] of layer `check_layer` for each prompt, from one batched forward
    of the first `check_layer` layers over a scratch cache (the pool is not touched)."""
    cfg = model.config
    lens = [len(p) for p in prompts]
    blocks_each = [math.ceil(n / block_size) for n in lens]
    scratch = KVCache.allocate(max(check_layer, 1), sum(blocks_each), block_size, cfg.num_kv_heads, cfg.head_dim,
                               dtype, device)
    views, slots, first = [], [], 0
    for n, nb in zip(lens, blocks_each):
        views.append([(first + j, 0, min(block_size, n - j * block_size), j * block_size, 0) for j in range(nb)])
        slots.extend(first * block_size + p for p in range(n))
        first += nb
    max_v = max(blocks_each)
    vt = torch.zeros(len(prompts), max_v, 5, dtype=torch.int32)
    for b, rows in enumerate(views):
        vt[b, :len(rows)] = torch.tensor(rows, dtype=torch.int32)
    positions = torch.cat([torch.arange(n) for n in lens]).to(device)
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0).tolist()), dtype=torch.int32, device=device)
    meta = AttentionMetadata(cu_seqlens_q=cu, q_pos=positions.to(torch.int32), slot_mapping=torch.tensor(slots, device=device),
                             views=vt.to(device), num_views=torch.tensor([len(v) for v in views], dtype=torch.int32, device=device),
                             max_seqlen_q=max(lens), max_views=max_v, max_kv_len=max(lens), block_size=block_size)
    ids = torch.tensor([t for p in prompts for t in p], dtype=torch.int64, device=device)
    hidden = model(ids, positions, meta, scratch.layers, num_layers=check_layer)
    keys = model.layer_keys(check_layer, hidden, positions)
    return list(keys.split(lens))


def span_deviation(k_fresh: torch.Tensor, span: SharedSpan, master: Master, kv: KVCache, check_layer: int,
                   block_size: int, inv_freq: torch.Tensor) -> torch.Tensor:
    """Per-token key deviation fp32 [span.length] of the master's keys placed at the span's positions."""
    device = k_fresh.device
    src = torch.tensor(master.slots(block_size), dtype=torch.int64, device=device)
    delta = torch.full((span.length,), span.start - master.start, dtype=torch.int32, device=device)
    k_cache = kv.layers[check_layer][0]
    return kernels.key_deviation(k_fresh[span.start:span.end], k_cache, src, delta, inv_freq)


class Collector:
    """Per-engine collector state: config, pinned producer outputs, counters.

    `prepare_round` turns a round's encoded prompts into one `AgentPlan` per agent, creating
    masters as needed; `run_masters(seqs)` is the engine's callback that prefills standalone
    master sequences (`prefill_only`) through the normal scheduler, batched.
    """

    def __init__(self, cfg: CollectorConfig, model: CausalLM, pool: BlockPool, kv: KVCache, dtype, device):
        if cfg.scheme not in SCHEMES:
            raise ValueError(f"unknown recompute scheme {cfg.scheme!r}; choose one of {SCHEMES}")
        if cfg.master not in MASTER_SOURCES:
            raise ValueError(f"unknown master source {cfg.master!r}; choose one of {MASTER_SOURCES}")
        if cfg.selection not in SELECTIONS:
            raise ValueError(f"unknown selection {cfg.selection!r}; choose one of {SELECTIONS}")
        if not 0 <= cfg.recompute_ratio <= 1:
            raise ValueError(f"recompute_ratio must be in [0, 1], got {cfg.recompute_ratio!r}")
        if not 0 <= cfg.check_layer < model.config.num_layers:
            raise ValueError(f"check_layer must be in [0, {model.config.num_layers}), got {cfg.check_layer}")
        self.cfg, self.model, self.pool, self.kv = cfg, model, pool, kv
        self.dtype, self.device = dtype, device
        self.block_size = pool.block_size
        self.counters = CollectorCounters()
        self.outputs: dict[int, Master] = {}  # request id -> its output's KV (producer master candidates)
        self.round_masters: list[Master] = []  # standalone masters of the current round

    # ------------------------------------------------------------------ producer outputs

    def pin_output(self, seq: Sequence, key: tuple[int, ...]) -> None:
        """Keep the K/V of `seq`'s output tokens `key` (those that have K/V) as a master candidate."""
        start = seq.num_prompt_tokens
        end = start + len(key)
        if not key or end > seq.num_tokens - 1:
            # The last sampled token was never fed back: it has no K/V. A block that includes it
            # gets a master of all but that token, and the agent computes the rest.
            end = min(end, seq.num_tokens - 1)
        views = []
        for v in seq.views:
            x, y = max(start, v.pos0), min(end, v.end)
            if x < y:
                views.append(View(v.block, v.lo + x - v.pos0, v.lo + y - v.pos0, x))
        if not views:
            return
        for v in views:
            self.pool.ref(v.block)
        self.outputs[seq.seq_id] = Master(key, views, "producer")

    def release_outputs(self, keep: set[int] = frozenset()) -> None:
        for rid in [r for r in self.outputs if r not in keep]:
            self.pool.release(self.outputs.pop(rid).views)

    def release_round(self) -> None:
        for m in self.round_masters:
            self.pool.release(m.views)
        self.round_masters = []

    # ------------------------------------------------------------------ one round

    def prepare_round(self, prompts: list, spans_per_agent: list[list[SharedSpan]], run_masters,
                      owns: list[AgentCache | None]) -> list[AgentPlan]:
        import time
        t0 = time.perf_counter()
        cfg, bs = self.cfg, self.block_size
        masters: dict[tuple, Master] = {}
        standalone: dict[tuple, SharedSpan] = {}
        for spans in spans_per_agent:
            for span in spans:
                if span.key in masters or span.key in standalone:
                    continue
                produced = self.outputs.get(span.source.request_id) if span.source is not None else None
                if cfg.master == "producer" and produced is not None and produced.key == span.key:
                    masters[span.key] = produced
                    self.counters.producer_masters += 1
                else:
                    standalone[span.key] = span
        t_masters = time.perf_counter()
        if standalone:
            bos = self.model.config.bos_token_id
            # A block first seen at position 0 is prefilled as it is (then it is exact for every
            # agent that starts with it); elsewhere behind the sink token, when configured.
            sinks = {key: [bos] if cfg.master_sink and bos is not None and span.start > 0 else []
                     for key, span in standalone.items()}
            seqs = run_masters([sinks[key] + list(key) for key in standalone])
            for key, seq in zip(standalone, seqs):
                master = Master(key, list(seq.views), "standalone")  # takes over the sequence's references
                self.pool.release(_trim_master(master, len(sinks[key]), len(key)))
                masters[key] = master
                self.round_masters.append(master)
                self.counters.standalone_masters += 1
                self.counters.master_prefill_tokens += seq.num_prompt_tokens
        t_after_masters = time.perf_counter()
        # Producer masters may lack K/V for their last token: those offsets are always recomputed.
        missing = {key: list(range(len(m.slots(bs)), len(key))) for key, m in masters.items()}
        offsets = self._choose(prompts, spans_per_agent, masters)
        plans = []
        for agent, (ids, spans) in enumerate(zip(prompts, spans_per_agent)):
            chosen = {i: sorted(set(offsets[(agent, i)]) | set(missing[s.key])) for i, s in enumerate(spans)}
            plans.append(plan_agent(len(ids), spans, masters, chosen, cfg, bs, owns[agent]))
        # Master prefill is counted as prefill work by the scheduler; the collector's own time excludes it.
        self.counters.seconds += (time.perf_counter() - t0) - (t_after_masters - t_masters)
        return plans

    def _choose(self, prompts, spans_per_agent, masters) -> dict[tuple[int, int], list[int]]:
        """Recomputed offsets per (agent, span index): once per segment, or per agent."""
        cfg, bs = self.cfg, self.block_size
        result: dict[tuple[int, int], list[int]] = {}
        if not needs_scoring(cfg):
            for a, spans in enumerate(spans_per_agent):
                for i, s in enumerate(spans):
                    result[(a, i)] = select_offsets(s.length, cfg.recompute_ratio, cfg.scheme, bs, None)
            return result
        per_agent = cfg.selection == "per_agent" or cfg.dense_copy
        # Which (agent, span) pairs are scored: every pair, or the first occurrence of each segment.
        scored: dict[tuple, tuple[int, int]] = {}
        pairs = []
        for a, spans in enumerate(spans_per_agent):
            for i, s in enumerate(spans):
                if per_agent or s.key not in scored:
                    scored.setdefault(s.key, (a, i))
                    pairs.append((a, i))
        if not pairs:
            return result
        agents = sorted({a for a, _ in pairs})
        keys = reference_keys(self.model, [prompts[a] for a in agents], cfg.check_layer, bs, self.dtype, self.device)
        self.counters.reference_tokens += sum(len(prompts[a]) for a in agents)
        self.counters.reference_token_layers += sum(len(prompts[a]) for a in agents) * max(cfg.check_layer, 1)
        fresh = dict(zip(agents, keys))
        chosen_by_pair = {}
        for a, i in pairs:
            span = spans_per_agent[a][i]
            master = masters[span.key]
            n_have = len(master.slots(bs))
            dev = torch.zeros(span.length, dtype=torch.float32)
            if n_have:
                part = SharedSpan(span.start, span.start + n_have, span.key[:n_have])
                dev[:n_have] = span_deviation(fresh[a], part, master, self.kv, cfg.check_layer, bs,
                                              self.model.inv_freq).cpu()
            chosen_by_pair[(a, i)] = select_offsets(span.length, cfg.recompute_ratio, cfg.scheme, bs, dev)
            self.counters.scored_segments += 1
        for a, spans in enumerate(spans_per_agent):
            for i, s in enumerate(spans):
                result[(a, i)] = chosen_by_pair[(a, i) if per_agent else scored[s.key]]
        return result


def _trim_master(master: Master, skip: int, length: int) -> list[View]:
    """Narrow a standalone master's sequence views to the segment (the sink slot dropped).

    Each kept view carries over the sequence's reference on its block; the views returned
    (blocks outside the segment) still hold theirs and must be released by the caller.
    """
    start = master.views[0].pos0 + skip
    narrowed, dropped = [], []
    for v in master.views:
        x, y = max(start, v.pos0), min(start + length, v.end)
        if x < y:
            narrowed.append(View(v.block, v.lo + x - v.pos0, v.lo + y - v.pos0, x))
        else:
            dropped.append(v)
    master.views = narrowed
    return dropped
