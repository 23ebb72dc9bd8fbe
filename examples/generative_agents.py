"""A small town of agents in the spirit of Generative Agents (Park et al. 2023), on nanodance.

Eight residents of Willowbrook (personas written below: name, age, traits, occupation, plan)
live through a morning, one round per hour. Each round is one `LLM.run_round`: every agent's
prompt is the town preamble (a `Shared` block, the same in every prompt), its private persona and
memories, then the town digest: what every other resident did last hour, one `Shared` block per
resident, in an order shuffled per agent (seeded), its own action left out. That digest is the
All-Gather step: the same blocks at different positions in every prompt, their KV computed once
for the round and read in place by every agent. A private tail (the hour, the agent's plan) asks
for the next action, in one line (greedy by default; `--temperature` samples, seeded).

Printed: the town log per round, then a per-round KV table (distinct bytes vs what prefix caching
would hold for the same prompts, compression, prefill tokens computed vs reused; see kv_report.py).
The default model (SmolLM2-135M-Instruct) is tiny: expect residents who wander off script.

    python examples/generative_agents.py                      # 8 agents, 4 rounds, tokendance
    python examples/generative_agents.py --agents 4 --rounds 2 --reuse prefix
    python examples/generative_agents.py --compare            # every reuse mode, side by side
"""
from __future__ import annotations

import argparse
import random
import sys
import time

from nanodance import LLM, SamplingParams, Shared

from kv_report import MiB, format_round_table, round_row

MODES = ("none", "prefix", "pic", "tokendance")

TOWN = ("Willowbrook is a small riverside town. On Main Street there is a bakery, a cafe called The Copper "
        "Kettle, a pharmacy, a hardware store and the town hall. There is also a library, a primary school, a "
        "park with a duck pond and a community garden. Everyone in town knows each other. This Saturday the "
        "town holds its harvest festival in the park, and the residents are getting ready for it. Every hour, "
        "each resident decides what to do next. You play one resident: answer in the first person, with one "
        "short sentence that says what you do next.")

TAIL = "\nIt is {time}. Your plan for today: {plan}. What do you do next? Answer in one short sentence."

# name, age, traits, occupation, plan for today, memory, what they do at the first hour
PERSONAS = [
    ("Isabella Rodriguez", 34, "warm, talkative and organized", "owner of The Copper Kettle cafe",
     "organize a pie contest for the festival", "Tom promised to lend you folding tables.",
     "I open the cafe and brew the first pot of coffee."),
    ("Klaus Mueller", 21, "curious, shy and hard-working", "a student writing a paper on small-town life",
     "interview shop owners for your paper", "The library closes early on Fridays.",
     "I read my notes on small-town economies at the library."),
    ("Maria Lopez", 45, "patient, funny and a little chaotic", "the primary school teacher",
     "rehearse the children's choir for the festival", "Two children in the choir have a cold.",
     "I set up the music room for choir practice."),
    ("Tom Moreno", 52, "grumpy, honest and reliable", "owner of the hardware store",
     "build the wooden stage for the festival", "You are short of long nails.",
     "I load planks into my truck behind the hardware store."),
    ("Ayesha Khan", 29, "precise, kind and calm", "the town pharmacist",
     "set up a first-aid tent at the festival", "Maria asked you about cough syrup yesterday.",
     "I count bandages and sunscreen for the first-aid tent."),
    ("Sam Moore", 67, "gentle, forgetful and generous", "a retired gardener who runs the community garden",
     "harvest the pumpkins for the festival", "The biggest pumpkin is behind the shed.",
     "I water the pumpkins in the community garden."),
    ("Jennifer Moore", 63, "artistic, stubborn and cheerful", "a painter and Sam's wife",
     "paint the festival banners", "You ran out of yellow paint last week.",
     "I sketch the festival banner at my kitchen table."),
    ("Carlos Gomez", 38, "ambitious, sociable and impatient", "the mayor of Willowbrook",
     "find volunteers and write the festival speech", "Last year's speech was too long.",
     "I walk to the town hall and read the festival budget."),
    ("Hailey Johnson", 26, "creative, restless and friendly", "a baker at the Main Street bakery",
     "bake two hundred apple tarts", "Isabella wants tarts for the cafe too.",
     "I knead dough for the apple tarts at the bakery."),
    ("Eddy Lin", 19, "energetic, dreamy and musical", "a music student who plays the violin",
     "play the violin on the festival stage", "Maria asked you to join the choir rehearsal.",
     "I practise a folk tune on my violin in the park."),
]


def hour(r: int) -> str:
    h = 8 + r
    return f"{(h - 1) % 12 + 1}:00 {'AM' if h < 12 else 'PM'}"


def agent_prompt(i: int, events: list[str], memories: list[str], r: int, rng: random.Random) -> list[dict]:
    """Chat messages for agent i in round r: Shared preamble, private persona and memories, Shared digest."""
    name, age, traits, job, plan, _, _ = PERSONAS[i]
    persona = f"\n\nYou are {name}, {age}, {job}. You are {traits}."
    others = [j for j in range(len(events)) if j != i]
    rng.shuffle(others)  # the All-Gather step: the same blocks, in each agent's own order
    remembered = "\n".join(f"- {m}" for m in memories)
    digest = [f"Your memories:\n{remembered}\n\nWhat the others did at {hour(r - 1)}:\n"]
    digest += [Shared(events[j]) for j in others]  # back to back: no private gap between blocks
    digest.append(TAIL.format(time=hour(r), plan=plan))
    return [{"role": "system", "content": [Shared(TOWN), persona]}, {"role": "user", "content": digest}]


def one_line(text: str) -> str:
    """The action in an output: its first non-empty line, without a list dash."""
    lines = [ln.strip().lstrip("-* ").strip() for ln in text.splitlines()]
    return next((ln for ln in lines if ln), "")


def simulate(args, reuse: str) -> tuple[list[list[str]], list[dict], float]:
    """Run the town under one reuse mode: (log[hour][agent], per-round KV rows, wall seconds)."""
    t0 = time.perf_counter()
    llm = LLM(args.model, dtype=args.dtype, reuse=reuse, seed=args.seed, block_size=args.block_size,
              recompute_scheme=args.recompute_scheme, recompute_ratio=args.recompute_ratio)
    n = args.agents
    log = [[PERSONAS[i][6] for i in range(n)]]  # the first hour is written by us
    memories = [[PERSONAS[i][5], f"At {hour(-1)}: {PERSONAS[i][6]}"] for i in range(n)]
    rngs = [random.Random(args.seed * 1000 + i) for i in range(n)]
    print(f"[{reuse}] {hour(-1)}  (written)")
    for i in range(n):
        print(f"    {PERSONAS[i][0]:<19} {log[0][i]}")
    rows = []
    for r in range(args.rounds):
        # The app formats each event line itself, so the blocks are text: the collector prefills
        # each once per round (a standalone master) for all agents. debate.py shares raw outputs.
        events = [f"- {PERSONAS[i][0]}: {log[-1][i]}\n" for i in range(n)]
        prompts = [agent_prompt(i, events, memories[i][:1] + memories[i][1:][-2:], r, rngs[i]) for i in range(n)]
        params = [SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens, stop=["\n"],
                                 seed=args.seed * 1000 + r * 100 + i) for i in range(n)]
        outs = llm.run_round(prompts, params)
        rows.append(round_row(r, outs, llm))
        log.append([one_line(o.text) or "(does nothing)" for o in outs])
        print(f"[{reuse}] {hour(r)}  (round {r + 1}/{args.rounds}, {outs.stats['round_seconds']:.1f} s)")
        for i, line in enumerate(log[-1]):
            print(f"    {PERSONAS[i][0]:<19} {line}")
            memories[i].append(f"At {hour(r)}: {line}")
    llm.release_round_outputs()
    return log, rows, time.perf_counter() - t0


def format_compare(results: dict) -> str:
    """One block per metric, a column per mode."""
    modes = list(results)
    metrics = [("KV MiB (distinct)", lambda r: f"{r['distinct'] / MiB:.1f}"),
               ("compression", lambda r: f"{r['compression']:.2f}x"),
               ("prefill tokens computed", lambda r: str(r["computed"])),
               ("prefill tokens reused", lambda r: str(r["reused"])),
               ("round seconds", lambda r: f"{r['seconds']:.1f}")]
    out = []
    for title, cell in metrics:
        out.append(f"{title:<24}" + "".join(f"{m:>12}" for m in modes))
        for k in range(len(results[modes[0]][1])):
            out.append(f"{'  round ' + str(k):<24}" + "".join(f"{cell(results[m][1][k]):>12}" for m in modes))
    log0 = results[modes[0]][0]
    out.append(f"{'actions equal to ' + modes[0]:<24}" + "".join(f"{m:>12}" for m in modes))
    for k in range(1, len(log0)):
        same = [sum(a == b for a, b in zip(results[m][0][k], log0[k])) for m in modes]
        out.append(f"{'  round ' + str(k - 1):<24}" + "".join(f"{s:>9}/{len(log0[k]):<2}" for s in same))
    out.append(f"{'wall seconds (all)':<24}" + "".join(f"{results[m][2]:>12.1f}" for m in modes))
    out.append(f"(actions equal to {modes[0]}: agents whose action line is the same as in {modes[0]}; round 0 inputs "
               f"are the same in every mode, later rounds' inputs differ once an action does)")
    return "\n".join(out)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--agents", type=int, default=8, help=f"residents, 2..{len(PERSONAS)} (default 8)")
    p.add_argument("--rounds", type=int, default=4, help="hours to simulate (default 4)")
    p.add_argument("--reuse", choices=MODES, default="tokendance")
    p.add_argument("--compare", action="store_true", help="run every reuse mode and print them side by side")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens per action (default 32)")
    # float32: on CPUs without native bf16 matmuls (AVX2) it is several times faster than bfloat16.
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    # Event lines are ~25 tokens: the engine's default recomputes the first 16 tokens of a block
    # that short, most of it. The town instead recomputes the first 5% of each event's tokens
    # ("first", 2 tokens) on 8-token blocks, which holds 1.5x less KV than ideal prefix caching
    # (docs/results.md, "The examples"). The price is fidelity: on the generative-agents preset,
    # recomputing a few tokens of each short event gave 3-4x the KL of the default's 16.
    p.add_argument("--block-size", type=int, default=8, help="KV block size in tokens (default 8)")
    p.add_argument("--recompute-scheme", choices=("block", "first", "token"), default="first")
    p.add_argument("--recompute-ratio", type=float, default=0.05,
                   help="share of each shared event recomputed per agent (default 0.05)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); >0 samples, seeded")
    p.add_argument("--seed", type=int, default=0, help="digest order and sampling seed")
    p.add_argument("--model", default=None, help="a Hugging Face folder (default: bundled SmolLM2-135M-Instruct)")
    args = p.parse_args(argv)
    if not 2 <= args.agents <= len(PERSONAS):
        p.error(f"--agents must be between 2 and {len(PERSONAS)}")
    if args.rounds < 1 or args.max_tokens < 1:
        p.error("--rounds and --max-tokens must be >= 1")
    if not 0 <= args.recompute_ratio <= 1:
        p.error("--recompute-ratio must be in [0, 1]")
    return args


def main(argv=None) -> dict:
    """Run the town; returns {mode: (log, rows, wall seconds)} (log[0] holds the written first hour)."""
    args = parse_args(argv)
    results = {}
    for mode in (MODES if args.compare else (args.reuse,)):
        results[mode] = simulate(args, mode)
        print()
        print(format_round_table(results[mode][1], mode))
        print(f"wall time, reuse={mode}: {results[mode][2]:.1f} s (model load included)\n")
    if args.compare:
        print(format_compare(results))
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
