"""The KV Collector: once per round, a master for every shared block, the recompute choice, and
each agent's plan (docs/design.md, "The flow of one round").

A round goes through the collector in four calls from the round runner; it never calls back:

    to_prefill = collector.begin_round(spans_per_agent, prompts)   # masters: producer outputs, or ids to prefill
    collector.adopt_masters(engine.prefill_masters(to_prefill, leads))   # the engine's own step loop ran them
    plans = collector.plan_round(prompts, spans_per_agent, kept_caches)   # laid out at admission (layout.py)
    collector.end_round(keep_outputs)

Vocabulary: a *segment* is one distinct shared block of the round (key = its token ids); its
*master* (masters.py) is one pooled copy of its K/V; a *plan* (layout.py) says, per agent
position, where its K/V comes from.

With `master="agent"` (the paper's Master) some agents of the round are *reference agents*,
picked greedily like a set cover (`pick_references`): each next pick is the agent whose prompt
holds the most shared tokens that no earlier pick holds, while that is at least
`reference_min_new` of its shared tokens. A reference agent's prompt (all but its last token,
which samples) is prefilled exactly first, as a *carrier*, in the same batch as the standalone
masters; every segment in it that has no master yet gets a master cut out of the carrier's views
(ref-counted, read in place by the others), and the carrier itself becomes the reference agent's
own cache (an `AgentCache` its plan hands over at admission, as a persistent agent's kept cache):
reference agents are exact. Segments no reference holds fall back to the "auto" rule.

The recompute choice is made once per segment (collective) in one reference context, or per
agent (`selection="per_agent"`, and always for `pic`), by one of the schemes:
- "block": the segment's first chunk, then the chunks (segment-relative runs of tokens) with
  the largest key deviation at the check layer, until `ratio` of it is chosen; ratio and chunk
  depend on the segment's length (`EngineConfig.recompute_for`: a long segment's first tokens,
  a short one's first block or its most deviating tokens);
- "first": the first ceil(ratio * len) tokens of the segment (EPIC's LegoLink; no scoring);
- "token": the first token, then the tokens with the largest deviation (CacheBlend); each chosen
  token takes one packed slot of the agent's diff blocks.
Key deviation = sum over heads and dims of (K_fresh - R(delta) K_master)^2 at the check layer,
K_fresh from an exact forward of a scoring agent's prompt through the first `check_layer`
layers (into a scratch cache); the "token-layers" this costs are counted. The scoring agent is
the first agent carrying the segment that is not a reference agent: in a reference agent's own
context an agent master deviates by nothing, and the reference agents need no choice.

The collector owns what it pins: producer outputs kept for the next round (`outputs`) and the
round's standalone and agent masters, and the reference agents' carriers until their plans
hand them over. It releases them itself (`release_outputs`, `end_round`,
`release_idle` under memory pressure).

Shapes: reference forwards take input_ids int64 [T] over a scratch `KVCache` of `check_layer`
layers; deviations come back fp32 per token of the segment. The collector runs no model itself:
all scoring of a round is one `Executor.key_deviations` call (executor.py), which tensor
parallelism replays on every rank.
"""
from __future__ import annotations

import math
from collections import Counter
import time
from dataclasses import dataclass
from typing import Iterator

import torch

from nanodance import kernels
from nanodance.agents import AgentCache
from nanodance.cache import BlockPool, View
from nanodance.engine_config import EngineConfig
from nanodance.executor import DeviationQuery, Executor
from nanodance.layout import AgentPlan, plan_agent
from nanodance.masters import Master
from nanodance.segments import SharedSpan
from nanodance.sequence import Sequence


@dataclass
class CollectorCounters:
    master_prefill_tokens: int = 0  # standalone master tokens computed (all layers)
    producer_masters: int = 0
    standalone_masters: int = 0
    agent_masters: int = 0  # segments whose master is cut from a reference agent's prompt
    reference_agents: int = 0
    reference_prefill_tokens: int = 0  # reference agents' prompt tokens prefilled as carriers (all layers)
    reference_tokens: int = 0  # tokens run through `check_layer` layers for deviation scoring
    reference_token_layers: int = 0
    scored_segments: int = 0
    outputs_released_unused: int = 0  # pinned outputs unpinned once a round's masters were in (none was one)
    seconds: float = 0.0  # collector time, master prefill excluded (the scheduler counts that)


def select_offsets(length: int, ratio: float, chunk: int, scheme: str,
                   deviation: torch.Tensor | None) -> list[int]:
    """Segment offsets to recompute, sorted. `chunk` is the "block" scheme's unit in tokens;
    `deviation` is fp32 [length] (not needed for "first")."""
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
    num_chunks = math.ceil(length / chunk)
    per_chunk = kernels.per_block_sum(deviation, torch.arange(length) // chunk, num_chunks)
    order = [0] + [c for c in torch.argsort(per_chunk[1:], descending=True, stable=True).add(1).tolist()]
    chosen: list[int] = []
    for c in order:
        if len(chosen) >= target:
            break
        chosen.extend(range(c * chunk, min(length, (c + 1) * chunk)))
    return sorted(chosen)


def pick_references(spans_per_agent: list[list[SharedSpan]], lengths: list[int], min_new: float) -> list[int]:
    """Reference agents, greedily: each next one holds the most shared tokens (distinct segments,
    by length) not held by an earlier pick, and only if they are at least `min_new` of its own.

    A span must start before the prompt's last token (a carrier holds all but that one). Only
    segments that two or more agents carry count: a master cut from a reference serves the
    others, and a segment no other agent reads keeps its other source (a lone request that pastes
    an earlier output reads that output's K/V instead of computing it). Agents of independent
    groups share no segment, so every group gets its own references."""
    held = [{s.key: s.length for s in spans if s.start < n - 1} for spans, n in zip(spans_per_agent, lengths)]
    carriers_of = Counter(key for spans in spans_per_agent for key in {s.key for s in spans})
    held = [{key: length for key, length in segs.items() if carriers_of[key] > 1} for segs in held]
    covered: set[tuple] = set()
    picks: list[int] = []
    while True:
        best, best_gain = None, 0
        for a, segs in enumerate(held):
            gain = sum(length for key, length in segs.items() if key not in covered)
            if a not in picks and gain > best_gain and gain >= min_new * sum(segs.values()):
                best, best_gain = a, gain
        if best is None:
            return picks
        picks.append(best)
        covered |= set(held[best])


def needs_scoring(cfg: EngineConfig) -> bool:
    return cfg.recompute_scheme != "first" and 0 < cfg.recompute_ratio < 1


class Collector:
    """Per-engine collector state: pinned producer outputs, the round's masters and plans, counters."""

    def __init__(self, cfg: EngineConfig, executor: Executor, pool: BlockPool):
        self.cfg, self.executor, self.pool = cfg, executor, pool
        self.model_config = executor.model.config
        self.block_size = pool.block_size
        self.counters = CollectorCounters()
        self.outputs: dict[int, Master] = {}  # request id -> its output's KV (producer master candidates)
        self.kept: set[int] = set()  # request ids whose outputs stay pinned across rounds (`keep_outputs`)
        self.round_masters: list[Master] = []  # masters the round holds: standalone, and parts of outputs
        self._masters: dict[tuple, Master] = {}  # segment key -> master, for the round in flight
        self._to_prefill: dict[tuple, int] = {}  # segment key -> sink tokens before it, awaiting prefill
        self._planning = False  # between begin_round and plan_round: no master may be released
        # master="agent": the round's reference agents (indices into begin_round's lists), the
        # segments each one brings a master for, their carriers' prompts, then their caches.
        self.references: list[int] = []
        self._brings: dict[int, list[tuple[int, int, tuple]]] = {}  # agent -> [(start, end, key)]
        self._carrier_ids: list[list[int]] = []
        self.carriers: dict[int, AgentCache] = {}  # agent -> its carrier, until its plan hands it over

    # ------------------------------------------------------------------ producer outputs

    def pin_output(self, seq: Sequence) -> None:
        """Keep the K/V of `seq`'s output (without a final stop token) as next round's master candidate."""
        ids = seq.output_token_ids[:-1] if seq.stopped_by_token else seq.output_token_ids
        master = Master.of_output(seq, tuple(ids))
        if master is None:
            return
        for v in master.views:
            self.pool.ref(v.block)
        self.outputs[seq.seq_id] = master

    def keep_outputs(self, request_ids: set[int]) -> None:
        """Pin these outputs across rounds (a round normally unpins the round before's)."""
        self.kept |= request_ids & set(self.outputs)

    def release_outputs(self, keep: set[int] = frozenset(), forget_kept: bool = False) -> None:
        """Unpin every output not in `keep` (nor kept across rounds, unless `forget_kept`)."""
        if forget_kept:
            self.kept &= set(keep)
        for rid in [r for r in self.outputs if r not in keep and r not in self.kept]:
            self.pool.release(self.outputs.pop(rid).views)

    # ------------------------------------------------------------------ one round

    def begin_round(self, spans_per_agent: list[list[SharedSpan]],
                    prompts: list[list[int]] | None = None) -> list[list[int]]:
        """Find a master for every distinct segment; return the token ids of those to prefill.

        With `master="agent"` (which needs `prompts`), the reference agents' carriers come first:
        each is the agent's prompt but its last token, and brings the masters of the segments in it
        that no earlier reference brings. A segment that is an earlier output pinned here gets it
        as master (`master="producer"`, or "auto"/"agent" below the length threshold). Any other is
        prefilled standalone, behind the sink token when configured; a block first seen at position
        0 is prefilled as it is (then it is exact for every agent that starts with it). The engine
        runs the returned prompts and passes the sequences to `adopt_masters`.
        """
        t0 = time.perf_counter()
        self._planning, self._masters, self._to_prefill = True, {}, {}
        self.references, self._brings, self._carrier_ids, self.carriers = [], {}, [], {}
        if self.cfg.master == "agent" and prompts is not None:
            lengths = [len(p) for p in prompts]
            self.references = pick_references(spans_per_agent, lengths, self.cfg.reference_min_new)
            brought: set[tuple] = set()
            for a in self.references:
                self._brings[a] = []
                for span in spans_per_agent[a]:
                    if span.start < lengths[a] - 1 and span.key not in brought:
                        brought.add(span.key)
                        self._brings[a].append((span.start, min(span.end, lengths[a] - 1), span.key))
                self._carrier_ids.append(list(prompts[a][:-1]))
        brought = {key for spans in self._brings.values() for _, _, key in spans}
        bos = self.model_config.bos_token_id
        for spans in spans_per_agent:
            for span in spans:
                if span.key in self._masters or span.key in self._to_prefill or span.key in brought:
                    continue
                produced = self._producer_master(span) if self.cfg.producer_master_for(span.length) else None
                if produced is not None:
                    self._masters[span.key] = produced
                    self.counters.producer_masters += 1
                else:
                    sink = self.cfg.master_sink and bos is not None and span.start > 0
                    self._to_prefill[span.key] = 1 if sink else 0
        self.counters.seconds += time.perf_counter() - t0
        return self._carrier_ids + [[bos] * skip + list(key) for key, skip in self._to_prefill.items()]

    def _producer_master(self, span: SharedSpan) -> Master | None:
        """The pinned K/V of the output `span` came from, or of the part of it the span covers (a
        span found in a prompt, auto_shared.py, may be part of an output: that part gets its own
        references and is released with the round's masters)."""
        whole = self.outputs.get(span.source.request_id) if span.source is not None else None
        part = whole.part(span.source_offset, span.key) if whole is not None else None
        if part is not None and part is not whole:
            for v in part.views:
                self.pool.ref(v.block)
            self.round_masters.append(part)
        return part

    def adopt_masters(self, seqs: list[Sequence]) -> None:
        """Take over the prefilled sequences' views (in `begin_round`'s order): the reference
        agents' carriers (each becomes its agent's cache; its segments' masters are cut out of it,
        one more reference per block), then the standalone masters, sinks dropped."""
        carriers, seqs = seqs[:len(self.references)], seqs[len(self.references):]
        for a, seq in zip(self.references, carriers):
            carrier = AgentCache(list(seq.prompt_token_ids), list(seq.views), min(seq.exact_prefix_len, seq.num_tokens))
            seq.replace_views([])  # the carrier holds those references now
            # Its last block was allocated whole: the prompt's last position is the agent's to compute.
            carrier.truncate(seq.num_prompt_tokens, self.pool)
            self.carriers[a] = carrier
            for start, end, key in self._brings[a]:
                views = [c for c in (v.clip(start, end) for v in carrier.views) if c is not None]
                for v in views:
                    self.pool.ref(v.block)
                master = Master(key, views, "agent")
                self._masters[key] = master
                self.round_masters.append(master)
                self.counters.agent_masters += 1
            self.counters.reference_agents += 1
            self.counters.reference_prefill_tokens += seq.num_prompt_tokens
        for (key, skip), seq in zip(self._to_prefill.items(), seqs):
            master = Master(key, list(seq.views), "standalone")  # takes over the sequence's references
            seq.replace_views([])
            self.pool.release(master.trim(skip))
            self._masters[key] = master
            self.round_masters.append(master)
            self.counters.standalone_masters += 1
            self.counters.master_prefill_tokens += seq.num_prompt_tokens
        self._to_prefill = {}
        self._release_unused_outputs()

    def _release_unused_outputs(self) -> None:
        """Unpin, now rather than at `end_round`, every pinned output that is no master of this round.

        An output is pinned only so that this round may read it as a producer master. Once every
        segment has its master, an output that is not one (a reference agent's prompt or a
        standalone prefill brings its segment's master, or no prompt pastes it) would otherwise
        sit in the pool for the whole round beside the copy actually read: on the stress preset
        that is an output's worth of blocks per agent. A part of an output serving as a master
        holds its own block references. Outputs kept across rounds (`keep_outputs`) stay."""
        used = {id(m) for m in self._masters.values()}
        for rid in [r for r, m in self.outputs.items() if id(m) not in used and r not in self.kept]:
            self.pool.release(self.outputs.pop(rid).views)
            self.counters.outputs_released_unused += 1

    def plan_round(self, prompts: list[list[int]], spans_per_agent: list[list[SharedSpan]],
                   owns: list[AgentCache | None]) -> list[AgentPlan]:
        """One plan per agent: where each position's K/V comes from (laid out at admission)."""
        t0 = time.perf_counter()
        # Producer masters may lack K/V for their last token: those offsets are always recomputed.
        missing = {key: range(m.num_tokens_with_kv, len(key)) for key, m in self._masters.items()}
        offsets = self._choose(prompts, spans_per_agent)
        plans = []
        for agent, (ids, spans) in enumerate(zip(prompts, spans_per_agent)):
            chosen = {i: sorted(set(offsets[(agent, i)]) | set(missing[s.key])) for i, s in enumerate(spans)}
            # A reference agent's cache is its carrier: exact, every position but the last.
            own = self.carriers.get(agent, owns[agent])
            plans.append(plan_agent(len(ids), spans, self._masters, chosen, self.cfg.dense_copy, own))
        self._planning = False
        self.counters.seconds += time.perf_counter() - t0
        return plans

    def end_round(self, keep_outputs: set[int]) -> None:
        """Release the round's standalone and agent masters, the carriers no plan handed over, and
        every pinned output not in `keep_outputs`."""
        for m in self.round_masters:
            self.pool.release(m.views)
        for carrier in self.carriers.values():
            self.pool.release(carrier.hand_over())
        self.round_masters, self._masters, self._to_prefill, self.carriers = [], {}, {}, {}
        self._planning = False
        self.release_outputs(keep=keep_outputs)

    def release_idle(self, needed: set[int]) -> tuple[int, int]:
        """Memory pressure: release masters and pinned outputs whose id is not in `needed` (those
        unfinished requests' plans use: a running one may still be preempted and laid out again).
        Nothing while the round is being planned. Returns (outputs, masters) released."""
        if self._planning:
            return 0, 0
        idle_outputs = [rid for rid, m in self.outputs.items() if id(m) not in needed]
        idle_masters = [m for m in self.round_masters if id(m) not in needed]
        for rid in idle_outputs:
            self.pool.release(self.outputs.pop(rid).views)
            self.kept.discard(rid)
        for m in idle_masters:
            self.round_masters.remove(m)
            self.pool.release(m.views)
        return len(idle_outputs), len(idle_masters)

    def holders(self) -> Iterator[list[View]]:
        """Views of every pinned output, standalone or agent master and carrier (one reference each)."""
        for m in (*self.outputs.values(), *self.round_masters):
            yield m.views
        for carrier in self.carriers.values():
            yield carrier.views

    # ------------------------------------------------------------------ recompute choice

    def _choose(self, prompts, spans_per_agent) -> dict[tuple[int, int], list[int]]:
        """Recomputed offsets per (agent, span index): once per segment, or per agent."""
        cfg, bs = self.cfg, self.block_size
        if not needs_scoring(cfg):
            return {(a, i): select_offsets(s.length, *cfg.recompute_for(s.length), cfg.recompute_scheme, None)
                    for a, spans in enumerate(spans_per_agent) for i, s in enumerate(spans)}
        # Reference agents read no master (their carrier is exact) and would score agent masters
        # at zero deviation: they are never scored, and need no choice.
        refs = set(self.carriers)
        out: dict[tuple[int, int], list[int]] = {(a, i): [] for a in refs for i in range(len(spans_per_agent[a]))}
        # Which (agent, span) pairs are scored: every pair, or the first occurrence of each segment.
        scored: dict[tuple, tuple[int, int]] = {}
        pairs = []
        for a, spans in enumerate(spans_per_agent):
            if a in refs:
                continue
            for i, s in enumerate(spans):
                if cfg.per_agent_selection or s.key not in scored:
                    scored.setdefault(s.key, (a, i))
                    pairs.append((a, i))
        if not pairs:
            return out
        agents = sorted({a for a, _ in pairs})
        row = {a: k for k, a in enumerate(agents)}
        queries = {pair: self._query(row[pair[0]], spans_per_agent[pair[0]][pair[1]]) for pair in pairs}
        asked = [pair for pair in pairs if queries[pair] is not None]
        devs = self.executor.key_deviations([prompts[a] for a in agents], cfg.check_layer, bs,
                                            [queries[pair] for pair in asked])
        found = dict(zip(asked, devs))
        self.counters.reference_tokens += sum(len(prompts[a]) for a in agents)
        self.counters.reference_token_layers += sum(len(prompts[a]) for a in agents) * max(cfg.check_layer, 1)
        chosen_by_pair = {}
        for a, i in pairs:
            span = spans_per_agent[a][i]
            dev = torch.zeros(span.length, dtype=torch.float32)
            if (a, i) in found:
                dev[:len(found[(a, i)])] = found[(a, i)]
            self.counters.scored_segments += 1
            chosen_by_pair[(a, i)] = select_offsets(span.length, *cfg.recompute_for(span.length),
                                                    cfg.recompute_scheme, dev)
        out.update({(a, i): chosen_by_pair[(a, i) if cfg.per_agent_selection else scored[s.key]]
                    for a, spans in enumerate(spans_per_agent) if a not in refs for i, s in enumerate(spans)})
        return out

    def _query(self, prompt: int, span: SharedSpan) -> DeviationQuery | None:
        """Score `span`'s master keys in prompt `prompt`'s context; None if it has no K/V yet.

        A producer master lacks K/V for its last token (never fed back): those offsets score 0
        and are recomputed anyway.
        """
        master = self._masters[span.key]
        n = master.num_tokens_with_kv
        if not n:
            return None
        src = master.slots(self.block_size)[:n]
        frames = master.key_positions(self.pool)[:n]
        return DeviationQuery(prompt, span.start, tuple(src), tuple(span.start + i - kp for i, kp in enumerate(frames)))
