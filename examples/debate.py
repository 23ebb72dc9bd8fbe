"""Multi-agent debate (Du et al. 2023) on nanodance: agents answer, read each other, answer again.

N agents (different personas, greedy) answer a math word problem. Then, for R rounds, each agent
sees its own previous answer and the others' previous answers, and answers again; the final
answer is a majority vote over the numbers the agents end with. The others' answers (and the
agent's own) are last round's outputs passed as `Shared(output)`: their KV is what the
producers wrote while decoding them (producer masters, no prefill), read in place by every
other agent. All problems' debates run side by side: one `LLM.run_round` per debate round.

The bundled default model (SmolLM2-135M-Instruct) is small and gets most of these wrong; the
accuracy printed is what it is.

    python examples/debate.py                         # 3 agents, 2 debate rounds, 6 problems
    python examples/debate.py --agents 4 --rounds 1 --problems 2 --reuse prefix
"""
from __future__ import annotations

import argparse
import re
import sys
import time
from collections import Counter

from nanodance import LLM, SamplingParams, Shared
from nanodance.segments import output_block_ids

from kv_report import format_round_table, round_row

# (question, answer): written for this example.
PROBLEMS = [
    ("A baker makes 12 muffins in each batch. She bakes 4 batches and sells 30 muffins. "
     "How many muffins are left?", 18),
    ("Tom has 45 marbles. He gives 17 marbles to his sister and then buys 8 more. "
     "How many marbles does Tom have now?", 36),
    ("A train travels at 60 miles per hour for 3 hours. How many miles does it travel?", 180),
    ("A notebook costs 3 dollars and a pen costs 2 dollars. How many dollars do 5 notebooks and "
     "4 pens cost together?", 23),
    ("There are 28 students in a class. The teacher puts them in groups of 4. How many groups are there?", 7),
    ("Anna reads 15 pages every day. How many pages does she read in 2 weeks?", 210),
]
PERSONAS = ["You are a careful math tutor.", "You are a quick-thinking engineer.",
            "You are a skeptical accountant who double-checks every step.", "You are a patient school teacher.",
            "You are a puzzle enthusiast.", "You are a shopkeeper who counts money all day."]
ASK = "\nSolve it step by step in a few short sentences. End with 'Answer: ' and the number."
DEBATE = ("\nUsing the reasoning of the other agents as additional advice, check your solution and theirs "
          "step by step, then give your updated answer. End with 'Answer: ' and the number.")

_NUMBER = r"-?\d[\d,]*(?:\.\d+)?"


def extract_answer(text: str) -> float | None:
    """The number an answer ends with: after the last 'Answer:' if any, else the last number."""
    tagged = re.findall(rf"answer\s*(?:is)?\s*[:=]?\s*\$?\s*({_NUMBER})", text, flags=re.IGNORECASE)
    numbers = tagged or re.findall(_NUMBER, text)
    if not numbers:
        return None
    try:
        return float(numbers[-1].replace(",", "").rstrip("."))
    except ValueError:
        return None


def majority_vote(answers: list[float | None]) -> float | None:
    """The most common answer (None ignored); a tie goes to the one the earliest agent gave."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None
    best = max(counts.values())
    return next(a for a in answers if a is not None and counts[a] == best)


def first_prompt(agent: int, question: str) -> list[dict]:
    return [{"role": "system", "content": PERSONAS[agent % len(PERSONAS)]},
            {"role": "user", "content": question + ASK}]


def shared(out):
    """An earlier answer as a Shared block; an answer with no tokens (an agent that failed or
    stopped at once) cannot be shared, so it is shown as a note instead."""
    return Shared(out) if output_block_ids(out) else "(no answer)"


def debate_prompt(agent: int, question: str, previous: list) -> list[dict]:
    """Round r >= 1: the first turn again, the agent's own last answer, then everyone else's."""
    others = []
    for j, out in enumerate(previous):
        if j != agent:
            others += ["One agent's solution:\n", shared(out), "\n\n"]
    return first_prompt(agent, question) + [
        {"role": "assistant", "content": [shared(previous[agent])]},
        {"role": "user", "content": ["These are the solutions from the other agents:\n\n"] + others + [DEBATE]}]


def fmt(x: float | None) -> str:
    return "-" if x is None else (str(int(x)) if x == int(x) else f"{x:g}")


def run(args) -> dict:
    t0 = time.perf_counter()
    llm = LLM(args.model, dtype=args.dtype, reuse=args.reuse)
    problems = PROBLEMS[:args.problems]
    n = args.agents
    sp = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    answers, votes, rows, outputs = [], [], [], None
    for r in range(args.rounds + 1):
        # One prompt per (problem, agent), problem-major: outputs[p * n + a].
        if r == 0:
            prompts = [first_prompt(a, q) for q, _ in problems for a in range(n)]
        else:
            prompts = [debate_prompt(a, q, outputs[p * n:(p + 1) * n])
                       for p, (q, _) in enumerate(problems) for a in range(n)]
        print(f"round {r}/{args.rounds}: {len(prompts)} prompts ({len(problems)} problems x {n} agents)")
        outputs = llm.run_round(prompts, sp)
        rows.append(round_row(r, outputs, llm))
        got = [[extract_answer(outputs[p * n + a].text) for a in range(n)] for p in range(len(problems))]
        answers.append(got)
        votes.append([majority_vote(g) for g in got])
        for p, (q, truth) in enumerate(problems):
            marks = " ".join(f"{fmt(x)}{'*' if x == truth else ''}" for x in got[p])
            print(f"  problem {p + 1} (answer {truth}): agents {marks} -> vote {fmt(votes[-1][p])}")
    llm.release_round_outputs()
    truths = [t for _, t in problems]
    accuracy = [sum(x == t for g, t in zip(got, truths) for x in g) / (len(truths) * n) for got in answers]
    vote_accuracy = [sum(v == t for v, t in zip(vs, truths)) / len(truths) for vs in votes]
    return {"answers": answers, "votes": votes, "accuracy": accuracy, "vote_accuracy": vote_accuracy,
            "rows": rows, "last_outputs": outputs, "seconds": time.perf_counter() - t0}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--agents", type=int, default=3, help="agents per problem (default 3)")
    p.add_argument("--rounds", type=int, default=2, help="debate rounds after the first answers (default 2)")
    p.add_argument("--problems", type=int, default=len(PROBLEMS), help=f"how many of the {len(PROBLEMS)} problems")
    p.add_argument("--reuse", choices=("none", "prefix", "pic", "tokendance"), default="tokendance")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens per answer (default 128)")
    # float32: on CPUs without native bf16 matmuls (AVX2) it is several times faster than bfloat16.
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--model", default=None, help="a Hugging Face folder (default: bundled SmolLM2-135M-Instruct)")
    args = p.parse_args(argv)
    if args.agents < 2 or args.rounds < 0 or args.max_tokens < 1 or not 1 <= args.problems <= len(PROBLEMS):
        p.error(f"need --agents >= 2, --rounds >= 0, --max-tokens >= 1, 1 <= --problems <= {len(PROBLEMS)}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    res = run(args)
    q, truth = PROBLEMS[0]
    print(f"\nproblem 1, round {args.rounds} answers (truth {truth}): {q}")
    for a in range(args.agents):
        text = " ".join(res["last_outputs"][a].text.split())
        print(f"  agent {a + 1}: {text[:200]}{'...' if len(text) > 200 else ''}")
    print()
    print(f"{'round':>5} {'agent accuracy':>14} {'vote accuracy':>13}")
    for r, (acc, vacc) in enumerate(zip(res["accuracy"], res["vote_accuracy"])):
        print(f"{r:>5} {acc:>14.0%} {vacc:>13.0%}")
    print(f"final (majority vote of round {args.rounds}): {res['vote_accuracy'][-1]:.0%} of {args.problems} problems\n")
    print(format_round_table(res["rows"], args.reuse))
    print(f"wall time: {res['seconds']:.1f} s (model load included)")
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
