"""A parametric, seeded All-Gather workload generator for multi-agent rounds (docs/results.md says what it measured).

    from bench.workloads import Workload, preset
    wl = Workload(preset("generative-agents", agents=8, rounds=3))
    outputs = {}                                   # (round, agent) -> output of that round
    for r in range(wl.cfg.rounds):
        rp = wl.round_prompts(r, outputs)          # RoundPrompts(agents, prompts, max_tokens)
        outs = llm.run_round(rp.prompts, [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True)
                                          for m in rp.max_tokens])
        outputs.update({(r, a): o for a, o in zip(rp.agents, outs)})

Agent i's prompt in round r (segments for `LLM.run_round`; ChatML markup written as text):

    [static prefix]   "<|im_start|>system\\n" + world rules: the same text for every agent, at
                      position 0 (plain text by default, so prefix caching serves it exactly in
                      every mode but `none`; `prefix_shared=True` wraps it in Shared(...))
    persona           private: name, age, traits, occupation, plan (or a long profile)
    tools             per agent, a header + Shared(tool description) from a shared pool
    history           private: memory lines (appended each round, or resampled), and in
                      append mode the agent's own past outputs (as token ids)
    broadcast         Shared(news / the debate question): one block every agent reads
    gathered outputs  for each source j (fan-out: all, or k neighbours; own output excluded
                      unless asked; in fixed, rotated or shuffled order): a private header
                      "\\n<name j>:" + Shared(output of j in round r-1)
    task tail         private instruction + "<|im_start|>assistant\\n"

Round 0 has no gathered outputs. With `active_fraction < 1` only a seeded subset of agents
runs each round; an agent gathers only outputs of agents that ran in the previous round.
Output lengths are drawn per (round, agent) from `output_tokens` and enforced by the caller
with `SamplingParams(max_tokens=..., ignore_eos=True)`.

Determinism: every draw comes from `random.Random` seeded by a string of (seed, what, round,
agent), so agent i's persona, history, tools and output lengths do not depend on the number of
agents or on call order, and the same config always gives the same prompts (given the same
outputs). Text comes from the built-in word lists below (each word is one token, with its
leading space, for the default SmolLM2 tokenizer), so `*_tokens` sizes are close to token counts.
"""
from __future__ import annotations

import dataclasses
import random
import re
from dataclasses import dataclass, field
from typing import Any

from nanodance import Shared

# ---------------------------------------------------------------------- word source

NOUNS = ("time year people way day man thing woman life child world school state family student group country "
         "problem hand part place case week company system program question work government number night point "
         "home water room mother area money story fact month lot right study book eye job word business issue side "
         "kind head house service friend father power hour game line end member law car city community name team "
         "minute idea kid body information back parent face level office door health person art war history party "
         "result change morning reason research girl moment air teacher force education").split()
VERBS = ("walk talk read write cook bake paint plant build fix clean carry bring visit help meet watch sing play "
         "open close sell buy pay share tell ask answer call move start finish plan learn teach remember").split()
ADJECTIVES = ("old new good great small large big long little young early late important public bad same able "
              "free full special easy clear recent certain personal open red difficult likely short single current "
              "wrong private past fine common poor natural similar hot happy serious ready simple general blue dark "
              "entire close cold final main green nice huge popular traditional").split()
PLACES = ("bakery market river bridge garden park library church station farm shop street field forest hill lake "
          "road village town square harbor kitchen").split()
THINGS = ("table window bread coffee tea letter paper music song dinner lunch breakfast festival meeting plan goal "
          "tree flower dog cat horse bird fish").split()
ADVERBS = "quickly slowly often never always today tomorrow again together alone early later soon already".split()
NAMES = ("Maria John Anna Peter Laura David Sarah Michael Emma James Lucy Thomas Grace Daniel Alice Robert Clara "
         "Henry Julia Samuel Rosa Oliver Nina Victor Adam Sofia Hugo Marco Ivan Paul Eva Leo Ada Carl Iris Max "
         "Vera Tom Ruth Sam Kate Ben Jane Ray Lily Dan Amy").split()
TRAITS = "kind curious careful cheerful shy proud honest patient stubborn generous quiet brave calm clever".split()
JOBS = ("baker teacher farmer doctor painter student writer nurse carpenter librarian merchant cook gardener "
        "musician fisherman engineer").split()
TOWNS = "Willow Oakridge Riverton Maplewood Stonebridge Ashford".split()
TOOL_NAMES = "calendar map mailbox ledger weather search notes clock".split()

STYLES = ("events", "society", "debate", "stress")
HISTORY_MODES = ("append", "resample", "none")
ORDERS = ("fixed", "rotate", "shuffle")
NEIGHBOURS = ("ring", "random")
BROADCASTS = ("none", "static", "per_round")


def approx_tokens(text: str) -> int:
    """Token estimate for text made of the word lists: words, single digits, punctuation marks."""
    return len(re.findall(r"[A-Za-z]+|\d|[^\sA-Za-z\d]", text))


def _sentence(rng: random.Random) -> str:
    c = rng.choice
    templates = (
        lambda: f"{c(NAMES)} wants to {c(VERBS)} the {c(ADJECTIVES)} {c(NOUNS)} near the {c(PLACES)}.",
        lambda: f"The {c(THINGS)} at the {c(PLACES)} is {c(ADJECTIVES)} {c(ADVERBS)}.",
        lambda: f"{c(NAMES)} and {c(NAMES)} {c(VERBS)} {c(ADVERBS)} at the {c(PLACES)}.",
        lambda: f"People in the {c(PLACES)} talk about the {c(ADJECTIVES)} {c(NOUNS)}.",
        lambda: f"It is {c(ADJECTIVES)} to {c(VERBS)} a {c(THINGS)} in the {c(PLACES)}.",
        lambda: f"Every {c(NOUNS)} the {c(JOBS)} will {c(VERBS)} the {c(THINGS)} {c(ADVERBS)}.",
    )
    return c(templates)()


def _event_line(rng: random.Random, name: str) -> str:
    c = rng.choice
    return (f"- {rng.randint(6, 21):02d}:{rng.choice((0, 15, 30, 45)):02d} {name} went to the {c(PLACES)} to "
            f"{c(VERBS)} the {c(ADJECTIVES)} {c(THINGS)}.")


def _json_line(rng: random.Random, name: str) -> str:
    c = rng.choice
    return (f'{{"day": {rng.randint(1, 30)}, "event": "{name} wants to {c(VERBS)} the {c(THINGS)} at the '
            f'{c(PLACES)}", "mood": "{c(ADJECTIVES)}"}}')


def _fill(rng: random.Random, tokens: int, make, sep: str = " ") -> str:
    """Join pieces from `make(rng)` until about `tokens` tokens (empty for tokens <= 0)."""
    parts, n = [], 0
    while n < tokens:
        piece = make(rng)
        parts.append(piece)
        n += approx_tokens(piece)
    return sep.join(parts)


# ---------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class WorkloadConfig:
    name: str = "custom"
    agents: int = 8
    rounds: int = 3
    seed: int = 0
    style: str = "events"  # wording: events | society | debate | stress
    prefix_tokens: int = 64  # shared static prefix (world rules) at position 0; 0 = none
    prefix_shared: bool = False  # wrap the static prefix in Shared(...) instead of plain identical text
    persona_tokens: int = 48  # private persona / profile
    history: str = "append"  # append | resample | none
    history_tokens: int = 48  # initial history (append) or the whole history every round (resample)
    history_growth_tokens: int = 24  # new memory lines per round in append mode (plus the own last output)
    fanout: Any = None  # None: all agents; k: k sources each; (lo, hi): k drawn per agent
    neighbours: str = "ring"  # which k: ring (the next k agents) | random (a seeded fixed graph)
    exclude_own: bool = True  # an agent does not gather its own previous output
    order: str = "fixed"  # fixed (by agent index) | rotate (start after oneself) | shuffle (per agent and round)
    output_tokens: tuple[int, int] = (16, 24)  # output length, uniform in [lo, hi] per (round, agent)
    tools: int = 0  # shared tool blocks in the pool
    tool_tokens: int = 64
    tools_per_agent: int = 0
    broadcast: str = "none"  # none | static (same block every round) | per_round
    broadcast_tokens: int = 0
    active_fraction: float = 1.0  # fraction of agents that run each round (seeded subset)
    context: int = 8192  # prompts plus their outputs must fit in this many tokens (checked by the suite)

    def validate(self) -> "WorkloadConfig":
        problems = []
        if self.agents < 1 or self.rounds < 1:
            problems.append("agents and rounds must be >= 1")
        if self.style not in STYLES:
            problems.append(f"style must be one of {STYLES}")
        if self.history not in HISTORY_MODES:
            problems.append(f"history must be one of {HISTORY_MODES}")
        if self.order not in ORDERS:
            problems.append(f"order must be one of {ORDERS}")
        if self.neighbours not in NEIGHBOURS:
            problems.append(f"neighbours must be one of {NEIGHBOURS}")
        if self.broadcast not in BROADCASTS:
            problems.append(f"broadcast must be one of {BROADCASTS}")
        lo, hi = self.output_tokens
        if not 1 <= lo <= hi:
            problems.append("output_tokens must be (lo, hi) with 1 <= lo <= hi")
        if not 0 < self.active_fraction <= 1:
            problems.append("active_fraction must be in (0, 1]")
        if self.tools_per_agent > self.tools:
            problems.append("tools_per_agent cannot exceed tools")
        f = self.fanout
        if f is not None and not (isinstance(f, int) and f >= 0) and not (
                isinstance(f, (tuple, list)) and len(f) == 2 and 0 <= f[0] <= f[1]):
            problems.append("fanout must be None, an int k >= 0 or (lo, hi)")
        if problems:
            raise ValueError(f"workload {self.name!r}: " + "; ".join(problems))
        return self


PRESETS: dict[str, WorkloadConfig] = {
    # Generative Agents (Park et al. 2023): a town; every agent reads everyone's last action.
    "generative-agents": WorkloadConfig(
        name="generative-agents", agents=25, rounds=3, style="events", prefix_tokens=96, persona_tokens=48,
        history="append", history_tokens=48, history_growth_tokens=16, fanout=None, order="shuffle",
        output_tokens=(12, 24)),
    # AgentSociety: long profiles, JSON plans, one broadcast block per round, 2..5 friends, shared tools.
    "agent-society": WorkloadConfig(
        name="agent-society", agents=32, rounds=3, style="society", prefix_tokens=160, persona_tokens=320,
        history="resample", history_tokens=96, fanout=(2, 5), neighbours="random", order="fixed",
        output_tokens=(48, 96), tools=4, tool_tokens=80, tools_per_agent=2, broadcast="per_round",
        broadcast_tokens=128, active_fraction=0.9),
    # Multi-agent debate (Du et al. 2023): the same question, everyone's full answers, fixed order.
    "debate": WorkloadConfig(
        name="debate", agents=6, rounds=3, style="debate", prefix_tokens=48, persona_tokens=24,
        history="append", history_tokens=0, history_growth_tokens=0, fanout=None, order="fixed",
        output_tokens=(96, 128), broadcast="static", broadcast_tokens=48),
    # Stress: many agents, 512-token histories, long outputs, 24 ring neighbours (prompts within 8K).
    "stress": WorkloadConfig(
        name="stress", agents=64, rounds=2, style="stress", prefix_tokens=192, persona_tokens=64,
        history="resample", history_tokens=512, fanout=24, neighbours="ring", order="rotate",
        output_tokens=(128, 256)),
}

PRESET_AGENT_RANGES = {"generative-agents": (25, 25), "agent-society": (16, 64), "debate": (3, 16),
                       "stress": (32, 64)}


def preset(name: str, **overrides) -> WorkloadConfig:
    """A preset's config with `overrides` (any WorkloadConfig field) applied."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides).validate()


# ---------------------------------------------------------------------- the generator


@dataclass
class RoundPrompts:
    round: int
    agents: list[int]  # which agents run this round (prompt order)
    prompts: list[list]  # segments per agent: str / token ids (private) and Shared(...)
    max_tokens: list[int]  # output length per agent
    sources: list[list[int]] = field(default_factory=list)  # whose outputs each agent gathered, in order


@dataclass
class SyntheticOutput:
    """Stands in for a `RequestOutput` where no engine ran (tests, prompt-length checks)."""

    token_ids: list[int]
    request_id: int = -1
    finish_reason: str = "length"
    stopped_by_token: bool = False
    text: str = ""


class Workload:
    def __init__(self, cfg: WorkloadConfig):
        self.cfg = cfg.validate()
        n = cfg.agents
        self.names = [self._name(i) for i in range(n)]
        self.personas = [self._persona(i) for i in range(n)]
        self.prefix = self._prefix() if cfg.prefix_tokens > 0 else ""
        self.tool_texts = [self._tool(t) for t in range(cfg.tools)]
        self.agent_tools = [sorted(self._rng("tools", i).sample(range(cfg.tools), cfg.tools_per_agent))
                            for i in range(n)]
        self.fanout_sets = [self._fanout_set(i) for i in range(n)]

    # ------------------------------------------------------------------ seeded pieces

    def _rng(self, *what) -> random.Random:
        return random.Random("|".join(map(str, (self.cfg.seed,) + what)))

    def _name(self, i: int) -> str:
        base = NAMES[i % len(NAMES)]
        return base if i < len(NAMES) else f"{base} {i // len(NAMES) + 1}"

    def _prefix(self) -> str:
        cfg, rng = self.cfg, self._rng("prefix")
        town = rng.choice(TOWNS)
        intro = {"events": f"You live in the town of {town}. The town has these places and habits.",
                 "society": f"You are a citizen of {town}, a simulated society. Rules of the society follow.",
                 "debate": "You take part in a debate with other agents. Give clear and short reasons.",
                 "stress": f"This is a long shared context about {town} for a many-agent simulation."}[cfg.style]
        body = _fill(rng, cfg.prefix_tokens - approx_tokens(intro) - 4, _sentence)
        return f"<|im_start|>system\n{intro} {body}\n"

    def _persona(self, i: int) -> str:
        cfg, rng = self.cfg, self._rng("persona", i)
        name = self.names[i]
        head = (f"You are {name}, {rng.randint(18, 80)} years old, {rng.choice(TRAITS)} and {rng.choice(TRAITS)}, "
                f"working as a {rng.choice(JOBS)}.")
        if cfg.style == "society":
            keys = ("home", "work", "income", "family", "hobby", "health", "friends", "fear", "dream")
            lines = [f"{k}: the {rng.choice(ADJECTIVES)} {rng.choice(THINGS)} at the {rng.choice(PLACES)}"
                     for k in keys]
            head = head + "\nProfile:\n" + "\n".join(lines)
        elif cfg.style == "debate":
            return f"You are a {rng.choice(TRAITS)} {rng.choice(JOBS)} named {name}."
        rest = _fill(rng, cfg.persona_tokens - approx_tokens(head), _sentence)
        return f"{head} {rest}".strip()

    def _tool(self, t: int) -> str:
        rng = self._rng("tool", t)
        head = f"Tool {TOOL_NAMES[t % len(TOOL_NAMES)]}: use it to {rng.choice(VERBS)} a {rng.choice(THINGS)}."
        return f"{head} {_fill(rng, self.cfg.tool_tokens - approx_tokens(head), _sentence)}"

    def _fanout_set(self, i: int) -> list[int]:
        cfg, n = self.cfg, self.cfg.agents
        others = [j for j in range(n) if j != i]
        f = cfg.fanout
        if f is None:
            k = len(others)
        elif isinstance(f, int):
            k = min(f, len(others))
        else:
            k = min(self._rng("k", i).randint(f[0], f[1]), len(others))
        if cfg.neighbours == "ring" or k == len(others):
            chosen = [(i + 1 + d) % n for d in range(k)]
        else:
            chosen = self._rng("friends", i).sample(others, k)
        return sorted(chosen)

    def _memory(self, rng: random.Random, i: int, tokens: int) -> str:
        make = {"events": lambda g: _event_line(g, self.names[i]),
                "society": lambda g: _json_line(g, self.names[i])}.get(self.cfg.style, _sentence)
        return _fill(rng, tokens, make, sep="\n")

    def _broadcast(self, r: int) -> str:
        cfg = self.cfg
        rng = self._rng("broadcast", 0 if cfg.broadcast == "static" else r)
        if cfg.style == "debate":
            head = (f"Question: should the town {rng.choice(VERBS)} the {rng.choice(ADJECTIVES)} "
                    f"{rng.choice(THINGS)} at the {rng.choice(PLACES)}? Facts:")
        else:
            head = f"News of day {r + 1}:"
        return f"{head} {_fill(rng, cfg.broadcast_tokens - approx_tokens(head), _sentence)}"

    # ------------------------------------------------------------------ per round

    def active(self, r: int) -> list[int]:
        """Agents that run in round r (sorted)."""
        n, f = self.cfg.agents, self.cfg.active_fraction
        if f >= 1:
            return list(range(n))
        return sorted(self._rng("active", r).sample(range(n), max(1, round(f * n))))

    def output_tokens(self, r: int, i: int) -> int:
        lo, hi = self.cfg.output_tokens
        return self._rng("length", r, i).randint(lo, hi)

    def sources(self, r: int, i: int) -> list[int]:
        """Whose round r-1 outputs agent i gathers in round r, in prompt order."""
        if r == 0:
            return []
        ran = set(self.active(r - 1))
        pool = [j for j in self.fanout_sets[i] if j in ran]
        if not self.cfg.exclude_own and i in ran:
            pool = sorted(pool + [i])
        order = self.cfg.order
        if order == "rotate":
            n = self.cfg.agents
            pool.sort(key=lambda j: (j - i - 1) % n)
        elif order == "shuffle":
            self._rng("order", r, i).shuffle(pool)
        return pool

    def history(self, r: int, i: int, outputs: dict) -> list:
        """Agent i's private history segments in round r (text and its own past output ids)."""
        cfg = self.cfg
        if cfg.history == "none":
            return []
        if cfg.history == "resample":
            text = self._memory(self._rng("history", r, i), i, cfg.history_tokens)
            return [f"\nMemories:\n{text}"] if text else []
        segs = []
        first = self._memory(self._rng("history", 0, i), i, cfg.history_tokens)
        if first:
            segs.append(f"\nMemories:\n{first}")
        for past in range(r):
            own = outputs.get((past, i))
            if own is not None:
                ids = _block_ids(own)
                if ids:
                    segs += [f"\nIn round {past + 1} I said:", ids]
            grown = self._memory(self._rng("history", past + 1, i), i, cfg.history_growth_tokens)
            if grown:
                segs.append("\n" + grown)
        return segs

    def task(self, r: int) -> str:
        return {"events": "Describe your next action in one short line.",
                "society": 'Reply with your plan for today as JSON: {"goal": ..., "steps": [...]}.',
                "debate": ("Give your answer with your reasons." if r == 0 else
                           "Considering the other answers, give your updated answer."),
                "stress": "Summarize what you will do next and why."}[self.cfg.style]

    def prompt(self, r: int, i: int, outputs: dict) -> tuple[list, list[int]]:
        """(segments, sources) of agent i in round r; `outputs[(r - 1, j)]` must hold each source's output."""
        cfg = self.cfg
        segs: list = []
        if self.prefix:
            segs.append(Shared(self.prefix) if cfg.prefix_shared else self.prefix)
            segs.append(self.personas[i] + "\n")
        else:
            segs.append("<|im_start|>system\n" + self.personas[i] + "\n")
        for t in self.agent_tools[i]:
            segs += [f"\nYou may use tool {t + 1}:\n", Shared(self.tool_texts[t])]
        segs += self.history(r, i, outputs)
        segs.append(f"<|im_end|>\n<|im_start|>user\nRound {r + 1}.")
        if cfg.broadcast != "none":
            segs += ["\n", Shared(self._broadcast(r))]
        sources = self.sources(r, i)
        if sources:
            segs.append({"events": "\nWhat the others did:", "society": "\nYour friends' plans:",
                         "debate": "\nThe other agents answered:", "stress": "\nThe others wrote:"}[cfg.style])
            for j in sources:
                segs += [f"\n{self.names[j]}:", Shared(outputs[(r - 1, j)])]
        segs.append(f"\n\n{self.task(r)}<|im_end|>\n<|im_start|>assistant\n")
        return _merge_text(segs), sources

    def round_prompts(self, r: int, outputs: dict) -> RoundPrompts:
        """Every active agent's prompt for round r; `outputs` maps (round, agent) to earlier outputs."""
        if not 0 <= r < self.cfg.rounds:
            raise ValueError(f"round {r} outside [0, {self.cfg.rounds})")
        agents = self.active(r)
        built = [self.prompt(r, i, outputs) for i in agents]
        return RoundPrompts(r, agents, [p for p, _ in built], [self.output_tokens(r, i) for i in agents],
                            [s for _, s in built])

    def describe(self) -> str:
        c = self.cfg
        fan = "all" if c.fanout is None else (f"k={c.fanout}" if isinstance(c.fanout, int) else
                                              f"k={c.fanout[0]}..{c.fanout[1]}")
        return (f"{c.name}: N={c.agents} R={c.rounds} seed={c.seed} style={c.style} prefix~{c.prefix_tokens} "
                f"persona~{c.persona_tokens} history={c.history}~{c.history_tokens}"
                f"{f'+{c.history_growth_tokens}/round' if c.history == 'append' else ''} fan-out={fan}"
                f"{f' ({c.neighbours})' if c.fanout is not None else ''} own={'excluded' if c.exclude_own else 'kept'} "
                f"order={c.order} outputs={c.output_tokens[0]}..{c.output_tokens[1]} tools={c.tools}"
                f"x{c.tool_tokens}/{c.tools_per_agent} each broadcast={c.broadcast}~{c.broadcast_tokens} "
                f"active={c.active_fraction:g}")


def _block_ids(output) -> list[int]:
    ids = list(output.token_ids)
    if ids and getattr(output, "stopped_by_token", False):
        ids = ids[:-1]
    return ids


def _merge_text(segs: list) -> list:
    """Join adjacent private strings (fewer segments; each segment is tokenized on its own)."""
    out: list = []
    for s in segs:
        if isinstance(s, str) and out and isinstance(out[-1], str):
            out[-1] += s
        else:
            out.append(s)
    return out


def synthetic_round_outputs(wl: Workload, r: int, token: int = 1000, longest: bool = False) -> dict:
    """Outputs of round r as `SyntheticOutput`s of their drawn length (or the preset's longest)."""
    hi = wl.cfg.output_tokens[1]
    return {(r, i): SyntheticOutput([token + (i % 100)] * (hi if longest else wl.output_tokens(r, i)), i)
            for i in wl.active(r)}


def prompt_lengths(wl: Workload, tokenizer, longest: bool = True) -> list[tuple[int, int, int, int]]:
    """(round, agent, prompt tokens, prompt + max_tokens) for every prompt of the run, with
    synthetic outputs (of the longest allowed length by default: the worst case)."""
    from nanodance.segments import encode_segments
    outputs: dict = {}
    rows = []
    for r in range(wl.cfg.rounds):
        rp = wl.round_prompts(r, outputs)
        for a, p, m in zip(rp.agents, rp.prompts, rp.max_tokens):
            n = len(encode_segments(p, tokenizer).token_ids)
            rows.append((r, a, n, n + (wl.cfg.output_tokens[1] if longest else m)))
        outputs.update(synthetic_round_outputs(wl, r, longest=longest))
    return rows
