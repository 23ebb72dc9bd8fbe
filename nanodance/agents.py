"""Persistent agents: the caches they keep between rounds, and the whole lifecycle of one.

`run_round(..., agents=[...])` names an agent per prompt. When a named agent's request
finishes, its views over every position that has K/V are kept (`keep`). Its next prompt
takes them out (`take`), narrowed to the tokens the new prompt repeats, and the collector's
layout hands them to the new sequence, whose extend prefill computes only what is new. A
kept cache that the round did not use after all (its request failed before admission) goes
back to its agent (`give_back`); under memory pressure every kept cache is dropped
(`drop_all`): the agents recompute, nothing fails.

    AgentCache(token_ids [n], views covering positions [0, n), exact_prefix_len)

Every kept cache holds one pool reference per view; this module is the only one that takes
or releases them. `holders()` lists them for the pool's invariant check.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable, Iterator

from nanodance.cache import BlockPool, View
from nanodance.sequence import Sequence


@dataclass(eq=False)  # identity: two caches with equal tokens are still two holders
class AgentCache:
    """A persistent agent's cache kept between rounds: views of positions [0, len(token_ids))."""

    token_ids: list[int]
    views: list[View]  # holds one reference per view
    exact_prefix_len: int

    def truncate(self, n: int, pool: BlockPool) -> None:
        """Keep only positions [0, n): views past it are released, a straddling one narrowed."""
        kept = []
        for view in self.views:
            clipped = view.clip(0, n)
            if clipped is None:
                pool.unref(view.block)
            else:
                kept.append(clipped)
        self.views, self.token_ids = kept, self.token_ids[:n]
        self.exact_prefix_len = min(self.exact_prefix_len, n)

    def hand_over(self) -> list[View]:
        """Give the views (and their references) to the agent's next sequence."""
        views, self.views = self.views, []
        return views


class AgentCaches:
    """The kept caches by agent id, and those a call in flight has taken out but not used yet."""

    def __init__(self, pool: BlockPool):
        self.pool = pool
        self._kept: dict[Hashable, AgentCache] = {}
        self._taken: list[AgentCache] = []  # out of `_kept` for the call in flight

    def __len__(self) -> int:
        return len(self._kept)

    def __contains__(self, agent_id: Hashable) -> bool:
        return agent_id in self._kept

    def kept_prefix(self, agent_id: Hashable | None, token_ids: list[int]) -> int:
        """How many leading tokens of `token_ids` the agent's kept cache holds (0 for none)."""
        own = self._kept.get(agent_id) if agent_id is not None else None
        if own is None:
            return 0
        same, limit = 0, min(len(own.token_ids), len(token_ids) - 1)
        while same < limit and own.token_ids[same] == token_ids[same]:
            same += 1
        return same

    def take(self, agent_id: Hashable | None, token_ids: list[int]) -> AgentCache | None:
        """The agent's kept cache narrowed to what `token_ids` repeats, or None (nothing reusable).

        At least one token is always left to compute (it samples). What the new prompt does
        not repeat is released here.
        """
        if agent_id is None or agent_id not in self._kept:
            return None
        same = self.kept_prefix(agent_id, token_ids)
        own = self._kept.pop(agent_id)
        if same == 0:
            self.pool.release(own.hand_over())
            return None
        own.truncate(same, self.pool)
        self._taken.append(own)
        return own

    def give_back(self, agent_id: Hashable, own: AgentCache) -> None:
        """End of a call: a taken cache whose views were never handed over returns to its agent."""
        if own in self._taken:
            self._taken.remove(own)
        if not own.views:
            return
        if agent_id in self._kept:  # the agent finished again meanwhile: the newer cache wins
            self.pool.release(own.hand_over())
        else:
            self._kept[agent_id] = own

    def end_call(self) -> None:
        """Forget the taken caches: by now each was handed over or given back."""
        self._taken = []

    def keep(self, seq: Sequence) -> None:
        """A persistent agent's request finished normally: keep its views over positions with K/V."""
        n = seq.num_tokens - 1  # the last sampled token was never fed back: it has no K/V
        views = [v for v in seq.views if v.pos0 < n]
        for view in views:
            self.pool.ref(view.block)
        own = AgentCache(seq.token_ids[:n], views, seq.exact_prefix_len)
        own.truncate(n, self.pool)
        old = self._kept.pop(seq.agent_id, None)
        if old is not None:
            self.pool.release(old.hand_over())
        self._kept[seq.agent_id] = own

    def release(self, agent_id: Hashable) -> None:
        """Forget one agent's kept cache (its blocks are released)."""
        own = self._kept.pop(agent_id, None)
        if own is not None:
            self.pool.release(own.hand_over())

    def drop_all(self) -> int:
        """Memory pressure: release every kept cache that still holds views; how many were dropped."""
        dropped = [own for own in (*self._kept.values(), *self._taken) if own.views]
        for own in dropped:
            self.pool.release(own.hand_over())
        self._kept.clear()
        return len(dropped)

    def holders(self) -> Iterator[list[View]]:
        """Every kept or taken cache's views (each holds one reference per view)."""
        for own in (*self._kept.values(), *self._taken):
            yield own.views

    def ids(self) -> list[Hashable]:
        return list(self._kept)
