"""Per-round accounting: KV footprint (distinct vs dense bytes), prefill work, times.

The footprint is measured on what each agent's prompt actually references once its prefill is
done (its views over prompt positions, recorded by block and allocation serial), plus the
standalone masters the collector made for the round. From those sets:
    distinct_bytes  blocks referenced by anyone, counted once
    shared_bytes    blocks referenced by two or more agents, or by a master
    private_bytes   per agent, blocks only that agent references
    dense_bytes     what every agent's full prompt would take in its own blocks
    compression     dense / distinct
    bound           dense / (private tokens of every agent + each distinct shared block once):
                    the best compression the agents' private tokens allow. Full blocks of the
                    private text before an agent's first shared block that other agents' prompts
                    start with too (a common system prompt) count once, as prefix caching holds them.
Prefill work counts positions computed (all layers) and, as token-layers, the deviation
analysis too (its partial forwards), so modes are compared on work actually run.
"""
from __future__ import annotations

import math
from collections import Counter

from nanodance.cache import chain_hash


class RoundOutputs(list):
    """The outputs of `run_round`, in prompt order, with the round's accounting in `.stats`."""

    def __init__(self, outputs, stats: dict):
        super().__init__(outputs)
        self.stats = stats


def round_stats(*, mode: str, prompt_lens: list[int], private_tokens: list[int], private_heads: list[list[int]],
                distinct_shared_lens: list[int],
                agent_blocks: list[list[tuple[int, int]]], master_blocks: set[tuple[int, int]], block_size: int,
                block_bytes: int, num_layers: int, prefill_tokens_computed: int, reused_tokens: int,
                recomputed_tokens: int, reference_token_layers: int, collector_seconds: float, num_masters: int,
                mirrors: dict, prefill_seconds: float, round_seconds: float) -> dict:
    counts = Counter(b for blocks in agent_blocks for b in set(blocks))
    distinct = set(counts) | master_blocks
    shared = {b for b, c in counts.items() if c > 1} | master_blocks
    private = [len({b for b in set(blocks) if b not in shared}) for blocks in agent_blocks]
    dense_blocks = sum(math.ceil(n / block_size) for n in prompt_lens)
    head_blocks, distinct_head_blocks = _prefix_blocks(private_heads, block_size)
    bound_blocks = distinct_head_blocks + \
        sum(math.ceil((n - h * block_size) / block_size) for n, h in zip(private_tokens, head_blocks)) + \
        sum(math.ceil(n / block_size) for n in distinct_shared_lens)
    n_agents = max(len(agent_blocks), 1)
    return {
        "mode": mode,
        "agents": len(prompt_lens),
        "prompt_tokens": sum(prompt_lens),
        "distinct_kv_bytes": len(distinct) * block_bytes,
        "shared_kv_bytes": len(shared) * block_bytes,
        "private_kv_bytes_mean": sum(private) / n_agents * block_bytes,
        "private_kv_bytes_max": max(private, default=0) * block_bytes,
        "dense_kv_bytes": dense_blocks * block_bytes,
        "compression": dense_blocks / max(len(distinct), 1),
        "compression_bound": dense_blocks / max(bound_blocks, 1),
        "prefill_tokens_computed": prefill_tokens_computed,
        "prefill_tokens_reused": reused_tokens,
        "prefill_tokens_recomputed": recomputed_tokens,
        "prefill_token_layers": prefill_tokens_computed * num_layers + reference_token_layers,
        "collector_seconds": collector_seconds,
        "masters": num_masters,
        **mirrors,
        "prefill_seconds": prefill_seconds,
        "round_seconds": round_seconds,
    }


def _prefix_blocks(heads: list[list[int]], block_size: int) -> tuple[list[int], int]:
    """(full blocks of each head, distinct full-block prefixes over all heads): what ideal prefix
    caching of the heads holds, the common leading blocks once."""
    seen: set[int] = set()
    per_head = []
    for head in heads:
        parent = None
        per_head.append(len(head) // block_size)
        for i in range(per_head[-1]):
            parent = chain_hash(parent, head[i * block_size:(i + 1) * block_size])
            seen.add(parent)
    return per_head, len(seen)
