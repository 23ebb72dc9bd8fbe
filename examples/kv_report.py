"""Per-round KV accounting for the examples (generative_agents.py, debate.py): rows and tables.

Every number comes from `RoundOutputs.stats` (see nanodance/round_stats.py), except `prefix*`:
the stats have no "what prefix caching would hold" field, so it is computed here from the
round's own prompt token ids with the rule `reuse="prefix"` follows (chained hashes of full
blocks, at least one token of each prompt computed): one copy of every leading full block that
prompts have in common, plus each prompt's other blocks. It is ideal prefix caching: the real
`prefix` mode holds more in a round where prompts that share a prefix are admitted in the same
step (none of them has published the blocks yet). `--compare` measures the real mode.
"""
from __future__ import annotations

import math

MiB = 2**20


def prefix_equivalent_bytes(outputs, block_size: int, block_bytes: int) -> int:
    """KV bytes ideal prefix caching would hold for these outputs' prompts (see the docstring)."""
    leading: set[int] = set()
    other_blocks = 0
    for out in outputs:
        ids = out.prompt_token_ids
        cacheable = (len(ids) - 1) // block_size  # a prefix hit leaves at least one token to compute
        parent = None
        for b in range(cacheable):
            parent = hash((parent, tuple(ids[b * block_size:(b + 1) * block_size])))
            leading.add(parent)
        other_blocks += math.ceil(len(ids) / block_size) - cacheable
    return (len(leading) + other_blocks) * block_bytes


def round_row(round_index: int, outputs, llm) -> dict:
    """One table row: the round's stats plus the prefix-caching equivalent of its prompts."""
    s = outputs.stats
    return {"round": round_index, "prompt_tokens": s["prompt_tokens"], "distinct": s["distinct_kv_bytes"],
            "prefix_eq": prefix_equivalent_bytes(outputs, llm.pool.block_size, llm.block_bytes),
            "dense": s["dense_kv_bytes"], "compression": s["compression"], "bound": s["compression_bound"],
            "computed": s["prefill_tokens_computed"], "reused": s["prefill_tokens_reused"],
            "recomputed": s["prefill_tokens_recomputed"], "seconds": s["round_seconds"],
            "mirror_slots": s.get("mirror_compression_slots"), "mirror_blocks": s.get("mirror_compression_blocks"),
            "diff_fill": s.get("diff_block_fill", 0.0)}


def _x(value) -> str:
    return "-" if value is None else f"{value:.1f}x"


def format_round_table(rows: list[dict], mode: str) -> str:
    head = (f"{'round':>5} {'prompt tok':>10} {'KV MiB':>7} {'prefix* MiB':>11} {'dense MiB':>9} "
            f"{'vs prefix*':>10} {'compression (bound)':>19} {'computed':>8} {'reused':>6} {'recomputed':>10} "
            f"{'mirror slot/blk':>15} {'diff fill':>9} {'secs':>6}")
    lines = [f"KV per round, reuse={mode}", head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['round']:>5} {r['prompt_tokens']:>10} {r['distinct'] / MiB:>7.1f} "
                     f"{r['prefix_eq'] / MiB:>11.1f} {r['dense'] / MiB:>9.1f} {r['prefix_eq'] / r['distinct']:>9.2f}x "
                     f"{r['compression']:>10.2f}x ({r['bound']:.2f}x) {r['computed']:>8} {r['reused']:>6} "
                     f"{r['recomputed']:>10} {_x(r['mirror_slots']) + ' / ' + _x(r['mirror_blocks']):>15} "
                     f"{r['diff_fill']:>9.0%} {r['seconds']:>6.1f}")
    lines.append(f"{'all':>5} {sum(r['prompt_tokens'] for r in rows):>10} {'':>7} {'':>11} {'':>9} {'':>10} {'':>19} "
                 f"{sum(r['computed'] for r in rows):>8} {sum(r['reused'] for r in rows):>6} "
                 f"{sum(r['recomputed'] for r in rows):>10} {'':>15} {'':>9} {sum(r['seconds'] for r in rows):>6.1f}")
    lines.append("KV MiB: distinct KV blocks the round's prompts use (shared ones once, masters included); dense: "
                 "every prompt in\nits own blocks; prefix*: what ideal prefix caching would hold for the same prompts "
                 "(computed from their\ntoken ids, see kv_report.py); compression = dense / KV (bound: the best "
                 "the agents' private tokens allow);\ncomputed: prefill tokens run (shared blocks' standalone "
                 "masters included); reused: prompt tokens not computed;\nrecomputed: shared-block tokens computed "
                 "again in the agent's context; mirror: shared tokens / diff tokens, shared blocks / diff\nblocks "
                 "(an agent's private blocks holding recomputed tokens, counted whole); diff fill: how full those "
                 "blocks are with them.")
    return "\n".join(lines)
