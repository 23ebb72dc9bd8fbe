"""One synchronized round on the engine: masters, plans, the step loop, then the accounting.

    run_round(engine, encoded, params, agent_ids, prompts, use_tqdm, on_step) -> RoundOutputs
    iterate_round(engine, encoded, params, agent_ids, prompts, use_tqdm)
        -> generator: a snapshot (list[RequestOutput]) after every step that ran; returns RoundOutputs

Closing `iterate_round` early aborts the unfinished agents and ends the round as a failure would
(the previous round's outputs that serve as its masters stay pinned for a retry).

Data flows one way (docs/design.md, "The flow of one round"): the prompts' shared spans go to the
collector, which returns the masters to prefill; the engine prefills them with its own step
loop and hands the sequences back; the collector plans every agent; the plans go to the
engine's `RoundLayouts`, which the scheduler asks at admission; the engine steps until every
agent is done. With `master="agent"` the prefilled sequences include the reference agents'
carriers (their prompts but the last token, first in the batch, from a persistent agent's kept
cache when it has one); the round's stats name those agents (`reference_agents`). Afterwards the collector releases the round's standalone masters and the
outputs no later round can use, and kept caches that were never laid out go back to their
agents. `round_stats.py` turns what each agent referenced after its prefill into the round's
accounting.
"""
from __future__ import annotations

import time
from typing import Any, Generator, Hashable

from nanodance.cache import BlockPool
from nanodance.engine import Engine, Prefilled, RequestOutput, StepCallback
from nanodance.layout import AgentPlan, plan_agent
from nanodance.progress import Progress
from nanodance.round_stats import RoundOutputs, round_stats
from nanodance.sampling import SamplingParams
from nanodance.segments import EncodedPrompt, SharedSpan
from nanodance.sequence import Sequence


def run_round(engine: Engine, encoded: list[EncodedPrompt], params: list[SamplingParams],
              agent_ids: list[Hashable | None], prompts: list[Any], use_tqdm: bool = True,
              on_step: StepCallback | None = None, sample_of: list[int | None] | None = None) -> RoundOutputs:
    steps = iterate_round(engine, encoded, params, agent_ids, prompts, use_tqdm, sample_of)
    try:
        while True:
            snapshot = next(steps)
            if on_step is not None:
                on_step(snapshot)
    except StopIteration as done:
        return done.value
    finally:
        steps.close()  # after an exception in on_step: abort the round's unfinished agents


def iterate_round(engine: Engine, encoded: list[EncodedPrompt], params: list[SamplingParams],
                  agent_ids: list[Hashable | None], prompts: list[Any], use_tqdm: bool = True,
                  sample_of: list[int | None] | None = None) -> Generator[list[RequestOutput], None, RoundOutputs]:
    t0 = time.perf_counter()
    collector = engine.collector
    counters_before = _work_counters(engine)
    seqs = [engine.make_sequence(e.token_ids, p, prompt) for e, p, prompt in zip(encoded, params, prompts)]
    for seq, agent in zip(seqs, agent_ids):
        seq.agent_id = agent
        # Its output may be a producer master next round; standalone masters never read it.
        seq.pin_output = engine.cfg.pins_outputs
    for seq, first in zip(seqs, sample_of or []):
        seq.sample_of = seqs[first] if first is not None else None
    valid = [i for i, seq in enumerate(seqs) if engine.capacity_error(seq) is None]
    plans: dict[int, AgentPlan] = {}
    references: list[int] = []  # master="agent": prompt indices of the reference agents
    master_blocks: set = set()
    succeeded = False
    with engine.serving(seqs) as call:
        owns = [engine.agents.take(agent_ids[i], encoded[i].token_ids) for i in valid]
        try:
            if collector is not None:
                to_prefill = collector.begin_round([encoded[i].spans for i in valid],
                                                   [encoded[i].token_ids for i in valid])
                # A persistent reference agent's carrier starts from its kept cache.
                leads = [owns[a] for a in collector.references]
                ran = (engine.prefill_masters(to_prefill, leads=leads) if leads else
                       engine.prefill_masters(to_prefill) if to_prefill else [])
                collector.adopt_masters(ran)
                references = [valid[a] for a in collector.references]
                got = collector.plan_round([encoded[i].token_ids for i in valid], [encoded[i].spans for i in valid],
                                           owns)
                plans = {seqs[i].seq_id: plan for i, plan in zip(valid, got)}
            else:  # no shared blocks to reuse: only persistent agents' kept caches need a layout
                plans = {seqs[i].seq_id: plan_agent(len(encoded[i].token_ids), [], {}, {}, own=own)
                         for i, own in zip(valid, owns) if own is not None}
            engine.layouts.plans = plans
            master_blocks = engine.layouts.master_blocks()
            yield from engine.snapshots(seqs, Progress(seqs, use_tqdm, desc="round"))
            succeeded = True
        finally:
            t_end = time.perf_counter()
            if collector is not None:
                # After a failure the previous round's outputs still pinned (those that are its
                # producer masters) stay usable for a retry.
                keep = {s.seq_id for s in seqs} | (set() if succeeded else set(collector.outputs))
                collector.end_round(keep_outputs=keep)
            for i, own in zip(valid, owns):
                if own is not None:  # never laid out: the kept cache goes back to its agent
                    engine.agents.give_back(agent_ids[i], own)
        prefilled = dict(call.prefilled)
    stats = _account(engine, seqs, encoded, plans, master_blocks, prefilled, counters_before, t0, t_end)
    stats["reference_agents"] = references
    engine.round_history.append(stats)
    return RoundOutputs([engine.output(s) for s in seqs], stats)


def _work_counters(engine: Engine) -> tuple[int, int, float]:
    """(prefill tokens computed, reference token-layers, collector seconds) so far."""
    cc = engine.collector.counters if engine.collector is not None else None
    return (engine.scheduler.counters.prefill_tokens_computed, cc.reference_token_layers if cc else 0,
            cc.seconds if cc else 0.0)


def _account(engine: Engine, seqs: list[Sequence], encoded: list[EncodedPrompt], plans: dict[int, AgentPlan],
             master_blocks: set, prefilled: dict, before: tuple[int, int, float], t0: float, t_end: float) -> dict:
    """The round's accounting over the agents whose prompt was prefilled (round_stats.py)."""
    done = [(s, e) for s, e in zip(seqs, encoded) if s.seq_id in prefilled]
    bs = engine.pool.block_size
    after = _work_counters(engine)
    used_plans = list(plans.values())
    return round_stats(
        mode=engine.cfg.reuse, prompt_lens=[s.num_prompt_tokens for s, _ in done],
        private_tokens=[len(e.token_ids) - sum(sp.length for sp in e.spans) for _, e in done],
        private_heads=[e.token_ids[:min((sp.start for sp in e.spans), default=len(e.token_ids))] for _, e in done],
        distinct_shared_lens=list({span.key: span.length for e in encoded for span in e.spans}.values()),
        agent_blocks=[prefilled[s.seq_id].blocks for s, _ in done], master_blocks=master_blocks,
        block_size=bs, block_bytes=engine.block_bytes, num_layers=engine.model_config.num_layers,
        prefill_tokens_computed=after[0] - before[0],
        reused_tokens=sum(prefilled[s.seq_id].reused for s, _ in done),
        recomputed_tokens=sum(len(p.recompute) for p in used_plans),
        reference_token_layers=after[1] - before[1],
        collector_seconds=after[2] - before[2],
        num_masters=len({id(r.master) for p in used_plans for r in p.runs if r.master is not None}),
        # Modes without a collector hold shared blocks like private text: they have no mirrors.
        mirrors=_mirrors([(prefilled[s.seq_id], e.spans if engine.collector else []) for s, e in done],
                         master_blocks, engine.pool),
        prefill_seconds=max((prefilled[s.seq_id].seconds for s, _ in done), default=t0) - t0,
        round_seconds=t_end - t0)


def _mirrors(agents: list[tuple[Prefilled, list[SharedSpan]]], master_blocks: set, pool: BlockPool) -> dict:
    """Each agent's mirror of the shared blocks it reads: its *diff* is the shared positions it
    holds in private slots (recomputed or copied) rather than in a master's.

    Per slot: shared tokens / diff tokens. Per block: shared blocks (ceil(span / block_size)
    per span) / diff blocks, the distinct private blocks holding any diff token, counted whole
    because memory is allocated in blocks; `diff_block_fill` is how full those blocks are with
    diff tokens (the rest holds the agent's private text or is free)."""
    bs = pool.block_size
    shared_tokens = shared_blocks = diff_tokens = diff_blocks = 0
    for record, spans in agents:
        private = [v for v, b in zip(record.views, record.blocks) if b not in master_blocks]
        blocks = set()
        for span in spans:
            shared_tokens += span.length
            shared_blocks += -(-span.length // bs)
            for v in private:
                inside = v.clip(span.start, span.end)
                if inside is not None:
                    diff_tokens += inside.length
                    blocks.add(v.block)
        diff_blocks += len(blocks)
    return {
        "shared_tokens": shared_tokens, "diff_tokens": diff_tokens, "diff_blocks": diff_blocks,
        "diff_block_fill": diff_tokens / (diff_blocks * bs) if diff_blocks else 0.0,
        "mirror_compression_slots": shared_tokens / diff_tokens if diff_tokens else None,
        "mirror_compression_blocks": shared_blocks / diff_blocks if diff_blocks else None,
    }
