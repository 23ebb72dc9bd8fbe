"""What finding shared spans costs, against the prefill it saves (default model, CPU).

    python bench/auto_shared.py [--agents 8] [--answer-tokens 96] [--filler 256]

Round 1: every agent answers a question (greedy). Round 2: every agent's chat prompt pastes the
others' answers as plain text, as a framework would, with no marking. The engine's output index
holds the round-1 answers plus `--filler` other outputs (the index is bounded at 256 by
default: a full index is the slow case). Measured:
- matching: `engine.find_shared` over every round-2 prompt (what `generate` does before a call),
  the best of --repeats runs;
- prefill: the same prompts prefilled in full (reuse="none", one token sampled), one run;
- what the spans cover: the share of the prompts' tokens found, and of the pasted answers.
The goal (the serving issue): matching at most a few percent of prefill time.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nanodance import LLM, SamplingParams  # noqa: E402

QUESTION = "In two or three sentences: should a small town spend its budget surplus on a library or on roads?"
NAMES = ["Ada", "Ben", "Cy", "Dee", "Eve", "Fay", "Gus", "Hal", "Ivy", "Jo", "Kai", "Lu", "Mo", "Ned", "Oz", "Pia"]


def round_two_prompt(i: int, answers: list[str]) -> list[dict]:
    others = "\n\n".join(f"{NAMES[j]} said: {a}" for j, a in enumerate(answers) if j != i)
    return [{"role": "system", "content": f"You are {NAMES[i]}, a member of the town council."},
            {"role": "user", "content": f"{QUESTION}\n\nThe other council members answered:\n\n{others}\n\n"
                                        f"Considering their views, give your final answer."}]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--agents", type=int, default=8)
    ap.add_argument("--answer-tokens", type=int, default=96)
    ap.add_argument("--filler", type=int, default=256, help="other outputs in the index (it keeps 256)")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    if not 2 <= args.agents <= len(NAMES):
        ap.error(f"--agents must be in 2..{len(NAMES)}")

    llm = LLM(dtype="float32")
    index = llm.engine.output_index
    params = SamplingParams(temperature=0, max_tokens=args.answer_tokens)
    for k in range(args.filler):  # other outputs, indexed first (the round-1 answers are the most recent)
        ids = llm.tokenizer.encode(f"Filler output {k}: the weather on day {k} was mild, with light wind "
                                   f"and a chance of rain in the evening near the river.")
        index.add(SimpleNamespace(request_id=-1 - k, token_ids=ids, stopped_by_token=False))
    first = llm.generate([[{"role": "system", "content": f"You are {NAMES[i]}, a member of the town council."},
                           {"role": "user", "content": QUESTION}] for i in range(args.agents)], params, use_tqdm=False)
    answers = [o.text for o in first]
    prompts = [llm.encode_prompt(round_two_prompt(i, answers)) for i in range(args.agents)]

    best = float("inf")
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        found = [llm.engine.find_shared(ids) for ids in prompts]
        best = min(best, time.perf_counter() - t0)
    covered = sum(sp.length for spans in found for sp in spans)
    pasted = sum(len(o.token_ids) - o.stopped_by_token for o in first) * (args.agents - 1)

    exact = LLM(dtype="float32", reuse="none")
    t0 = time.perf_counter()
    exact.generate(prompts, SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)
    prefill = time.perf_counter() - t0

    total = sum(len(p) for p in prompts)
    print(f"agents {args.agents}, round-2 prompts {total} tokens, index {len(index)} outputs "
          f"(the {args.agents} answers and the newest filler)")
    print("| matching (ms) | prefill, reuse=none (ms) | matching / prefill | spans | tokens found | "
          "of the prompts | of the pasted answers |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| {best * 1e3:.2f} | {prefill * 1e3:.0f} | {best / prefill:.2%} | {sum(map(len, found))} | {covered} | "
          f"{covered / total:.0%} | {covered / max(pasted, 1):.0%} |")
    print(f"goal: matching at most a few percent of prefill: {'met' if best / prefill < 0.05 else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
