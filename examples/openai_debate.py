"""A multi-agent debate written the way frameworks write it: one OpenAI chat request per agent
turn, the other agents' answers pasted into the message text, nothing marked as shared.

nanodance recognizes the pasted answers as its own earlier outputs, and the requests of a round,
sent together, are admitted as one round: their KV is shared without any change to the client
but its `base_url`. Each round prints what the server reports: the prompt tokens, how many of
them were reused rather than computed (`usage.prompt_tokens_details.cached_tokens`), and the
round's KV (distinct vs dense: every prompt in its own blocks).

    python examples/openai_debate.py                    # starts a server here (needs the [serve] extra)
    python examples/openai_debate.py --compare          # the same debate under reuse=prefix and none too
    python examples/openai_debate.py --base-url http://127.0.0.1:8000/v1   # a running `nanodance serve`
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import time

import httpx
import openai

QUESTION = ("A baker makes 12 muffins in each batch. She bakes 4 batches and sells 30 muffins. "
            "How many muffins are left? Explain briefly, then give the number.")
NAMES = ["Ada", "Ben", "Cy", "Dee", "Eve", "Fay", "Gus", "Hal"]


def messages(i: int, previous: list[str] | None) -> list[dict]:
    system = {"role": "system", "content": f"You are {NAMES[i]}, a careful math tutor."}
    if previous is None:
        return [system, {"role": "user", "content": QUESTION}]
    others = "\n\n".join(f"{NAMES[j]}: {a}" for j, a in enumerate(previous) if j != i)
    return [system, {"role": "user", "content": f"{QUESTION}\n\nThe other tutors answered:\n\n{others}\n\n"
                                                f"Your previous answer was: {previous[i]}\n\n"
                                                f"Taking their reasoning into account, give your final answer."}]


async def debate(base_url: str, model: str, agents: int, rounds: int, max_tokens: int) -> list[dict]:
    client = openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=600)
    rows, previous = [], None
    for r in range(rounds + 1):
        t0 = time.perf_counter()
        replies = await asyncio.gather(*[client.chat.completions.create(
            model=model, messages=messages(i, previous), temperature=0, max_tokens=max_tokens)
            for i in range(agents)])
        seconds = time.perf_counter() - t0
        previous = [c.choices[0].message.content for c in replies]
        stats = httpx.get(base_url.removesuffix("/v1") + "/stats").json()
        last = stats["rounds"][-1] if stats["rounds"] else {}
        rows.append({"round": r, "prompt": sum(c.usage.prompt_tokens for c in replies),
                     "reused": sum(c.usage.prompt_tokens_details.cached_tokens for c in replies),
                     "kv": last.get("distinct_kv_bytes"), "dense": last.get("dense_kv_bytes"),
                     "agents": last.get("agents"), "seconds": seconds})
    await client.close()
    return rows


def table(rows: list[dict], label: str) -> str:
    lines = [f"{label}", f"{'round':>5} {'prompt tok':>10} {'reused':>7} {'KV MiB':>7} {'dense MiB':>9} "
                         f"{'agents/round':>12} {'secs':>6}"]
    for r in rows:
        kv = "-" if r["kv"] is None else f"{r['kv'] / 2**20:.1f}"
        dense = "-" if r["dense"] is None else f"{r['dense'] / 2**20:.1f}"
        lines.append(f"{r['round']:>5} {r['prompt']:>10} {r['reused']:>7} {kv:>7} {dense:>9} "
                     f"{r['agents'] or '-':>12} {r['seconds']:>6.1f}")
    return "\n".join(lines)


def serve_here(reuse: str):
    """A server on a thread of this process, over the bundled model."""
    from nanodance import LLM
    from nanodance.server import BackgroundServer
    from nanodance.serving import ServingEngine

    return BackgroundServer(ServingEngine(LLM(reuse=reuse), admission_window=0.05), "nanodance-default")


def main(argv: list[str] | None = None) -> dict[str, list[dict]]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--agents", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2, help="debate rounds after the first answers")
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--base-url", default=None, help="a running server's /v1 URL; default: start one here")
    ap.add_argument("--model", default=None, help="with --base-url: the served model id (default: its first)")
    ap.add_argument("--compare", action="store_true", help="also run the debate under reuse=prefix and none")
    args = ap.parse_args(argv)
    if not 2 <= args.agents <= len(NAMES):
        ap.error(f"--agents must be in 2..{len(NAMES)}")
    if args.base_url and args.compare:
        ap.error("--compare starts its own servers; it cannot be used with --base-url")
    results = {}
    if args.base_url:
        model = args.model or httpx.get(args.base_url + "/models").json()["data"][0]["id"]
        results["server"] = asyncio.run(debate(args.base_url, model, args.agents, args.rounds, args.max_tokens))
        print(table(results["server"], f"{args.agents} agents at {args.base_url}"))
        return results
    for reuse in ("tokendance", "prefix", "none") if args.compare else ("tokendance",):
        with serve_here(reuse) as server:
            rows = asyncio.run(debate(server.url + "/v1", "nanodance-default", args.agents, args.rounds,
                                      args.max_tokens))
        results[reuse] = rows
        print(table(rows, f"{args.agents} agents, reuse={reuse} (the client is the same; only the server differs)"))
        print()
    print("reused: prompt tokens whose KV was read, not computed; KV: the round's distinct KV blocks (shared ones "
          "once);\ndense: every prompt in its own blocks. agents/round: requests the server admitted as one round.")
    return results


if __name__ == "__main__":
    main()
    sys.exit(0)
