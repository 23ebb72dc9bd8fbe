"""A debate-style All-Gather round: KV footprint, prefill work and fidelity of each reuse mode.

    python bench/rounds.py                       # 16 agents x 128-token answers, 4 default configs
    python bench/rounds.py --agents 8 --answer-tokens 64 --sweep

* Round 0: N agents, each with its own persona (system prompt), answer one question greedily
  (`SamplingParams(temperature=0, max_tokens=--answer-tokens, ignore_eos=True)`, so every
  answer has the same length), through `LLM.run_round` (their outputs can be producer masters).
* Round 1 (measured): agent i's prompt is [persona + question] + for every j != i, in a fixed
  order, [private separator, Shared(r0[j])] + [tail asking for its updated answer], with
  `--round1-tokens` new tokens (default 1: prefill plus the first token).
* Every config gets its own engine (`LLM(reuse=..., ...)`). A pic or tokendance engine with
  producer masters runs round 0 in full (it needs its own outputs' KV) and its round-0 token ids are
  checked equal to the `none` engine's (a warning otherwise: fidelity is then not on identical
  inputs). Every other config runs round 0 with one new token (so its prefix cache is as warm as
  the producer's) and gets the `none` engine's answers as `Shared(token_ids)`: identical inputs
  by construction, and a 16-agent sweep is not dominated by repeating the same decode.
* Per config, from `RoundOutputs.stats` of round 1: distinct KV bytes, compression and its bound,
  prefill tokens computed / recomputed, token-layers (incl. the collector's deviation analysis),
  prefill / round / collector seconds. Fidelity vs `none` on identical inputs: first-token
  agreement and mean KL(none || mode) of the first-token distribution (nats). The logits are
  recorded by a sampler passed to the engine (`LLM(..., sampler=FirstLogprobs())`).
* Configs: none, prefix, pic (0.15, block; producer and standalone masters), tokendance (0.15,
  block; masters producer, auto, standalone, agent), each on a fresh engine (`--main` picks
  some). `--sweep` adds tokendance over ratio {0, 0.05, 0.15, 0.3} x scheme {block, first,
  token} x master {producer, standalone, agent} (`--masters`), and pic at the same ratios
  (block scheme, producer and standalone: CacheBlend prefills its chunks standalone), run on one
  engine per master source (see `run_sweep`), and a trade-off table; `--sweep-only` runs the
  sweep and its reference (none) only.
* `master="agent"` makes some agents references (exact, see nanodance/collector.py): every row
  also reports agreement and KL over the agents that no row made a reference (`agr-nr`, `KL-nr`).

Prints date, machine, a reproduce line; writes bench/out/rounds.json (`--out`) and, with
`--sweep` and matplotlib, bench/out/rounds_sweep.png. `main(argv)` returns 0 (the smoke test).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.throughput import cpu_model  # noqa: E402  (one CPU-name probe for every bench script)

DEFAULT_OUT = ROOT / "bench" / "out" / "rounds.json"

QUESTION = "Should a small city ban private cars from its historic center? Answer in one short paragraph."
PERSONAS = [
    "a traffic engineer who trusts data over opinions",
    "a shop owner worried about losing customers",
    "a retired teacher who walks everywhere",
    "a delivery driver who works long shifts",
    "an environmental activist focused on air quality",
    "a city council member facing re-election",
    "a parent of two young children",
    "a wheelchair user who relies on accessible transport",
    "an economist who studies tourism",
    "a cyclist who commutes every day",
    "a historian who loves old buildings",
    "a taxi company manager",
    "a doctor who treats asthma patients",
    "a skeptical journalist",
    "a young software developer who rents downtown",
    "a farmer who sells produce at the central market",
]
SEPARATOR = "\n\nAnother agent answered:\n"
TAIL = "\n\nConsidering these answers, give your updated answer.<|im_end|>\n<|im_start|>assistant\n"


def head(i: int) -> str:
    persona = PERSONAS[i % len(PERSONAS)] + ("" if i < len(PERSONAS) else f" (agent {i})")
    return f"<|im_start|>system\nYou are {persona}.<|im_end|>\n<|im_start|>user\nQuestion: {QUESTION}\n"


def config_name(c: dict) -> str:
    if c["reuse"] in ("none", "prefix"):
        return c["reuse"]
    name = f"{c['reuse']} r={c['recompute_ratio']:g} {c['recompute_scheme']}"
    if c.get("recompute_chunk"):
        name += f" chunk {c['recompute_chunk']}"
    # pic's master source is named only when it is not the producer's (the main table's pic).
    return name + (f" {c['master']}" if c["reuse"] == "tokendance" or c["master"] != "producer" else "")


MAIN_CONFIGS = [dict(reuse="none"), dict(reuse="prefix"),
                dict(reuse="pic", recompute_ratio=0.15, recompute_scheme="block", master="producer"),
                dict(reuse="pic", recompute_ratio=0.15, recompute_scheme="block", master="standalone"),
                dict(reuse="tokendance", recompute_ratio=0.15, recompute_scheme="block", master="producer"),
                dict(reuse="tokendance", recompute_ratio=0.15, recompute_scheme="block", master="auto"),
                dict(reuse="tokendance", recompute_ratio=0.15, recompute_scheme="block", master="standalone"),
                dict(reuse="tokendance", recompute_ratio=0.15, recompute_scheme="block", master="agent")]
MASTERS = ("producer", "standalone", "agent")  # the sweep's master sources (auto is producer or standalone per length)
SWEEP_RATIOS = (0.0, 0.05, 0.15, 0.3)


def main_key(c: dict) -> str:
    return c["reuse"] + (f":{c['master']}" if "master" in c else "")


def sweep_configs() -> list[dict]:
    out = []
    for r in SWEEP_RATIOS:
        for master in ("producer", "standalone"):  # CacheBlend's own chunks are standalone prefills
            out.append(dict(reuse="pic", recompute_ratio=r, recompute_scheme="block", master=master))
        for scheme in ("block", "first", "token"):
            for master in MASTERS:
                out.append(dict(reuse="tokendance", recompute_ratio=r, recompute_scheme=scheme, master=master))
    return out


def needs_own_answers(cfg: dict) -> bool:
    """Producer masters are the producer's own decode KV: such an engine must answer round 0 itself.
    (`pic` uses the same master source as tokendance, so the two differ only in how they reuse it.)"""
    return cfg["reuse"] in ("pic", "tokendance") and cfg.get("master", "producer") in ("producer", "auto", "agent")


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="bench/rounds.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--agents", type=int, default=16, help="agents per round (default 16)")
    ap.add_argument("--answer-tokens", type=int, default=128, help="round-0 answer length (default 128)")
    ap.add_argument("--round1-tokens", type=int, default=1, help="new tokens in the measured round (default 1)")
    ap.add_argument("--dtype", default="float32", help="model dtype (default float32: bf16 is slow on AVX2 CPUs)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    ap.add_argument("--kv-cache-blocks", type=int, default=None,
                    help="KV pool blocks per engine (default: enough for the whole round at once)")
    ap.add_argument("--sweep", action="store_true",
                    help="also sweep ratio x scheme x master (tokendance) and pic, on shared engines")
    ap.add_argument("--sweep-only", action="store_true", help="the sweep and its reference (none) only")
    ap.add_argument("--main", default=None,
                    help="comma list of main configs as reuse[:master] (e.g. none,tokendance:agent; default: "
                         "all of " + ",".join(main_key(c) for c in MAIN_CONFIGS) + "); none always runs first")
    ap.add_argument("--main-ratio", type=float, default=None,
                    help="recompute_ratio of the main table's pic and tokendance configs (default 0.15)")
    ap.add_argument("--recompute-chunk", type=int, default=None,
                    help="the engine's recompute_chunk for the main table's pic and tokendance configs "
                         "(the block scheme's unit in tokens; default: the block size)")
    ap.add_argument("--masters", default=",".join(MASTERS),
                    help=f"the sweep's master sources (default {','.join(MASTERS)})")
    ap.add_argument("--reference-min-new", type=float, default=None,
                    help="master='agent': the engine's reference_min_new (default: the engine's default)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON results (default {DEFAULT_OUT})")
    args = ap.parse_args(argv)
    if args.agents < 2 or args.answer_tokens < 1 or args.round1_tokens < 1:
        ap.error("--agents must be >= 2, --answer-tokens and --round1-tokens >= 1")
    if args.threads is not None and args.threads < 1:
        ap.error("--threads must be >= 1")
    if args.recompute_chunk is not None and args.recompute_chunk < 1:
        ap.error("--recompute-chunk must be >= 1")
    return args


class FirstLogprobs:
    """A sampler (`LLM(..., sampler=...)`) that records log_softmax of the logits of each
    request's first sampled token, by request id, then samples as usual."""

    def __init__(self):
        self.store: dict[int, torch.Tensor] = {}

    def __call__(self, logits, seqs):
        from nanodance.runner import default_sampler
        for row, seq in zip(logits, seqs):
            if not seq.output_token_ids:
                self.store[seq.seq_id] = torch.log_softmax(row.float(), dim=-1).cpu()
        return default_sampler(logits, seqs)


def round0(llm, args, cfg: dict, ref_ids: list[list[int]] | None):
    """Round 0 on `llm`: full answers, or (borrowing `ref_ids`) one token each, which warms the
    prefix cache just the same. Returns (answers to gather as Shared, round-0 ids, texts, seconds)."""
    from nanodance import SamplingParams, Shared
    borrow = ref_ids is not None and not needs_own_answers(cfg)
    sp0 = SamplingParams(temperature=0, max_tokens=1 if borrow else args.answer_tokens, ignore_eos=True)
    t0 = time.perf_counter()
    r0 = llm.run_round([[head(i) + "Give your answer.<|im_end|>\n<|im_start|>assistant\n"]
                        for i in range(args.agents)], sp0, use_tqdm=False)
    seconds = time.perf_counter() - t0
    bad = [o for o in r0 if o.finish_reason == "error"]
    if bad:
        raise RuntimeError(f"{config_name(cfg)}: round 0 failed: {bad[0].error}")
    if borrow:
        return [Shared(ids) for ids in ref_ids], ref_ids, None, seconds
    return [Shared(o) for o in r0], [o.token_ids for o in r0], [o.text for o in r0], seconds


def round1(llm, args, cfg: dict, answers: list) -> dict:
    """The measured round: every agent gathers the others' answers; first-token log-probs captured."""
    from nanodance import SamplingParams
    n = args.agents
    prompts = []
    for i in range(n):
        segs = [head(i) + "Here are the other agents' answers."]
        for j in range(n):
            if j != i:
                segs += [SEPARATOR, answers[j]]
        prompts.append(segs + [TAIL])
    sp1 = SamplingParams(temperature=0, max_tokens=args.round1_tokens, ignore_eos=True)
    r1 = llm.run_round(prompts, sp1, use_tqdm=False)
    logprobs, llm.runner.sampler.store = llm.runner.sampler.store, {}  # this round's only
    bad = [o for o in r1 if o.finish_reason == "error"]
    if bad:
        raise RuntimeError(f"{config_name(cfg)}: round 1 failed: {bad[0].error}")
    return {"config": config_name(cfg), "params": cfg, "round1_prompt_tokens": [o.num_prompt_tokens for o in r1],
            "first_tokens": [o.token_ids[0] for o in r1], "round1_ids": [o.token_ids for o in r1],
            "round1_texts": [o.text for o in r1], "round1_request_ids": [o.request_id for o in r1],
            "logprobs": [logprobs[o.request_id] for o in r1], "stats": r1.stats}


def agent_options(cfg: dict, args) -> dict:
    """`--reference-min-new`, for engines with agent masters."""
    if cfg.get("master") == "agent" and args.reference_min_new is not None:
        return {"reference_min_new": args.reference_min_new}
    return {}


def run_config(cfg: dict, args, folder, kv_blocks: int, ref_ids: list[list[int]] | None = None) -> dict:
    """A fresh engine for `cfg`, rounds 0 and 1. With `ref_ids` (the reference engine's round-0
    answers) and a config that does not need its own answers, `Shared(ref_ids[j])` is gathered."""
    from nanodance import LLM
    t0 = time.perf_counter()
    llm = LLM(folder, dtype=args.dtype, kv_cache_blocks=kv_blocks, sampler=FirstLogprobs(), **cfg,
              **agent_options(cfg, args))
    load_s = time.perf_counter() - t0
    answers, ids, texts, r0_s = round0(llm, args, cfg, ref_ids)
    row = round1(llm, args, cfg, answers)
    row.update(load_seconds=load_s, round0_seconds=r0_s, round0_ids=ids, round0_texts=texts,
               round0_borrowed=texts is None, engine="fresh")
    return row


def run_sweep(args, folder, kv_blocks: int, ref_ids: list[list[int]], masters=MASTERS) -> list[dict]:
    """Every sweep variant on one engine per master source, which answers (or borrows) round 0 once.

    Between round-1 variants the engine is reconfigured (`llm.reconfigure(reuse=..., ...)`), the
    round-0 answers stay pinned (`llm.keep_outputs`: the engine would release them after the
    first round 1) and the prefix cache of free blocks is reset, so every
    variant starts from the same pool state. Sweep rows therefore compute the prompt heads that
    a fresh engine's round 1 takes from the prefix cache: compare their prefill work with each
    other, and the main table's rows with each other. The sweep repeats the main tokendance
    config, a check that a shared engine measures what a fresh one does.
    """
    from nanodance import LLM
    rows = []
    variants = sweep_configs()
    for master in masters:
        group = [c for c in variants if c["master"] == master]
        llm = LLM(folder, dtype=args.dtype, kv_cache_blocks=kv_blocks, reuse="tokendance", master=master,
                  **agent_options(dict(master=master), args),
                  sampler=FirstLogprobs())
        answers, ids, _, r0_s = round0(llm, args, group[0], ref_ids)
        if ids != ref_ids:
            raise RuntimeError(f"sweep ({master} masters): round-0 answers differ from none's")
        round0_outputs = [a.value for a in answers if not isinstance(a.value, list)]  # producer answers
        llm.keep_outputs(round0_outputs)
        for cfg in group:
            llm.reconfigure(reuse=cfg["reuse"], recompute_ratio=cfg["recompute_ratio"],
                            recompute_scheme=cfg["recompute_scheme"])
            llm.reset_prefix_cache()
            t0 = time.perf_counter()
            row = round1(llm, args, cfg, answers)
            row.update(round0_ids=ids, round0_borrowed=not needs_own_answers(cfg), engine=f"shared ({master})",
                       config_seconds=time.perf_counter() - t0)
            llm.release_round_outputs(keep=round0_outputs)  # this variant's outputs go; round 0's stay
            rows.append(row)
            print(f"  sweep {row['config']}: {row['config_seconds']:.1f} s", flush=True)
    return rows


def fidelity(row: dict, ref: dict) -> tuple[float, float, float, list[float]]:
    """(first-token agreement, exact-match rate of the round-1 outputs, mean KL, KL per agent) vs ref."""
    n = len(ref["first_tokens"])
    agree = sum(a == b for a, b in zip(row["first_tokens"], ref["first_tokens"])) / n
    exact = sum(a == b for a, b in zip(row["round1_ids"], ref["round1_ids"])) / n
    kls = [float((p.exp() * (p - q)).sum()) for p, q in zip(ref["logprobs"], row["logprobs"])]
    return agree, exact, sum(kls) / len(kls), kls


def print_table(rows: list[dict]) -> None:
    header = (f"{'config':<36} {'KV MiB':>7} {'compr':>6} {'bound':>6} {'computed':>8} {'recomp':>6} "
              f"{'tok-layers':>10} {'prefill s':>9} {'round s':>8} {'coll s':>7} {'agree':>6} {'exact':>6} {'KL':>7} "
              f"{'agr-nr':>6} {'KL-nr':>7}")
    print(header)
    print("-" * len(header))
    for r in rows:
        s = r["stats"]
        print(f"{r['config']:<36} {s['distinct_kv_bytes'] / 2**20:>7.1f} {s['compression']:>6.2f} "
              f"{s['compression_bound']:>6.2f} {s['prefill_tokens_computed']:>8} {s['prefill_tokens_recomputed']:>6} "
              f"{s['prefill_token_layers']:>10} {s['prefill_seconds']:>9.2f} {s['round_seconds']:>8.2f} "
              f"{s['collector_seconds']:>7.2f} {r['agree']:>6.2f} {r['exact']:>6.2f} {r['kl']:>7.4f} "
              f"{r['agree_nonref']:>6.2f} {r['kl_nonref']:>7.4f}")


def print_tradeoff(rows: list[dict], none_layers: int) -> None:
    print("\ntrade-off (sorted by KL): recomputed fraction = recomputed / shared tokens; "
          "token-layers relative to none")
    header = (f"{'config':<36} {'KL':>7} {'KL-nr':>7} {'agree':>6} {'recomp frac':>11} {'tok-layers':>10} {'rel':>6} "
              f"{'compr':>6}")
    print(header)
    print("-" * len(header))
    for r in sorted(rows, key=lambda r: r["kl"]):
        s = r["stats"]
        print(f"{r['config']:<36} {r['kl']:>7.4f} {r['kl_nonref']:>7.4f} {r['agree']:>6.2f} {r['recomputed_fraction']:>11.3f} "
              f"{s['prefill_token_layers']:>10} {s['prefill_token_layers'] / max(none_layers, 1):>6.3f} "
              f"{s['compression']:>6.2f}")


def plot(rows: list[dict], none_layers: int, path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(8, 5))
    groups: dict[str, list] = {}
    for r in rows:
        p = r["params"]
        if p["reuse"] in ("pic", "tokendance"):
            key = f"{p['reuse']} {p['recompute_scheme']}" + (f" {p['master']}" if p["reuse"] == "tokendance" else "")
            groups.setdefault(key, []).append(r)
    for key, rs in groups.items():
        rs = sorted(rs, key=lambda r: r["params"]["recompute_ratio"])
        ax.plot([r["stats"]["prefill_token_layers"] / none_layers for r in rs], [r["kl"] for r in rs], "o-",
                label=key)
    for r in rows:
        if r["params"]["reuse"] in ("none", "prefix"):
            ax.plot([r["stats"]["prefill_token_layers"] / none_layers], [r["kl"]], "k*", ms=10)
            ax.annotate(r["config"], (r["stats"]["prefill_token_layers"] / none_layers, r["kl"]))
    ax.set_xlabel("prefill token-layers / none")
    ax.set_ylabel("first-token KL(none || mode), nats")
    ax.set_title("debate round 1: fidelity vs prefill work (points: ratio 0, .05, .15, .3)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    from nanodance.tools.prepare import default_model_dir
    folder = default_model_dir()

    n, block = args.agents, 16
    # Enough for every round-1 prompt at once without sharing, plus the pinned round-0 outputs.
    per_prompt = 64 + n * (args.answer_tokens + 8) + 32
    kv_blocks = args.kv_cache_blocks or n * (math.ceil(per_prompt / block) + 2) + n * (args.answer_tokens // block + 4)

    t_start = time.perf_counter()
    rows = []
    wanted = None if args.main is None else set(args.main.split(",")) | {"none"}
    main_configs = [c for c in MAIN_CONFIGS if wanted is None or main_key(c) in wanted]
    if args.main_ratio is not None:
        main_configs = [dict(c, recompute_ratio=args.main_ratio) if "recompute_ratio" in c else c for c in main_configs]
    if args.recompute_chunk is not None:
        main_configs = [dict(c, recompute_chunk=args.recompute_chunk) if "recompute_ratio" in c else c
                        for c in main_configs]
    for cfg in main_configs[:1] if args.sweep_only else main_configs:
        t0 = time.perf_counter()
        rows.append(run_config(cfg, args, folder, kv_blocks, rows[0]["round0_ids"] if rows else None))
        rows[-1]["config_seconds"] = time.perf_counter() - t0
        print(f"  {rows[-1]['config']}: {rows[-1]['config_seconds']:.1f} s "
              f"(load {rows[-1]['load_seconds']:.1f}, round 0 {rows[-1]['round0_seconds']:.1f}, "
              f"round 1 {rows[-1]['stats']['round_seconds']:.1f})", flush=True)
    if args.sweep or args.sweep_only:
        rows += run_sweep(args, folder, kv_blocks, rows[0]["round0_ids"], tuple(args.masters.split(",")))
    total_s = time.perf_counter() - t_start

    ref = rows[0]
    warnings = []
    for r in rows:
        r["round0_identical"] = r["round0_ids"] == ref["round0_ids"]
        if not r["round0_identical"]:
            diff = sum(a != b for a, b in zip(r["round0_ids"], ref["round0_ids"]))
            warnings.append(f"WARNING: {r['config']}: round-0 token ids differ from none's for {diff}/{n} agents: "
                            f"round-1 fidelity is not on identical inputs")
        r["agree"], r["exact"], r["kl"], r["kl_per_agent"] = fidelity(r, ref)
    # Reference agents (master="agent") are exact: means over all agents would flatter that
    # source, so every row also reports its means over the agents no row made a reference.
    refs = sorted({a for r in rows for a in r["stats"].get("reference_agents", [])})
    others = [a for a in range(n) if a not in refs]
    for r in rows:
        r["reference_agents"] = refs
        r["kl_nonref"] = sum(r["kl_per_agent"][a] for a in others) / max(len(others), 1)
        r["agree_nonref"] = sum(r["first_tokens"][a] == ref["first_tokens"][a] for a in others) / max(len(others), 1)
        shared = sum(len(ids) for ids in r["round0_ids"]) * (n - 1)  # shared tokens over all prompts
        r["recomputed_fraction"] = r["stats"]["prefill_tokens_recomputed"] / max(shared, 1)
    none_layers = ref["stats"]["prefill_token_layers"]

    resolved = ["--agents", str(n), "--answer-tokens", str(args.answer_tokens), "--round1-tokens",
                str(args.round1_tokens), "--dtype", args.dtype, "--threads", str(threads)]
    if args.kv_cache_blocks:
        resolved += ["--kv-cache-blocks", str(args.kv_cache_blocks)]
    if args.sweep or args.sweep_only:
        resolved.append("--sweep-only" if args.sweep_only else "--sweep")
        if args.masters != ",".join(MASTERS):
            resolved += ["--masters", args.masters]
    if args.main is not None:
        resolved += ["--main", args.main]
    if args.reference_min_new is not None:
        resolved += ["--reference-min-new", str(args.reference_min_new)]
    if args.main_ratio is not None:
        resolved += ["--main-ratio", str(args.main_ratio)]
    if args.recompute_chunk is not None:
        resolved += ["--recompute-chunk", str(args.recompute_chunk)]
    command = "python bench/rounds.py " + shlex.join(resolved)
    meta = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "torch": torch.__version__,
            "python": platform.python_version(), "threads": threads, "cpu": cpu_model(), "cpu_count": os.cpu_count(),
            "dtype": args.dtype, "agents": n, "answer_tokens": args.answer_tokens,
            "round1_tokens": args.round1_tokens, "kv_cache_blocks": kv_blocks, "model_dir": str(folder),
            "question": QUESTION, "total_seconds": total_s, "command": command, "argv": argv}

    print(f"date {meta['date']}  torch {meta['torch']}  threads {threads}  cpu {meta['cpu']} "
          f"({meta['cpu_count']} cores)")
    print(f"dtype {args.dtype}  agents {n}  answer tokens {args.answer_tokens}  round-1 prompt tokens "
          f"{min(ref['round1_prompt_tokens'])}-{max(ref['round1_prompt_tokens'])}  round-1 new tokens "
          f"{args.round1_tokens}  kv blocks {kv_blocks}  total {total_s:.1f} s")
    for w in warnings:
        print(w)
    main_rows = [r for r in rows if r["engine"] == "fresh"]
    sweep_rows = [r for r in rows if r["engine"] != "fresh"]
    print_table(main_rows)
    print("KV MiB: distinct KV referenced by the round; compr: dense / distinct; bound: best compression the "
          "private tokens allow; tok-layers: prefill positions x layers + collector analysis; agree / KL: "
          "first token vs none (KL(none || mode), nats, mean over agents); exact: whole round-1 output equal "
          "to none's; agr-nr / KL-nr: the same over the agents that no row made a reference agent "
          f"(reference agents: {ref['reference_agents']})")
    if sweep_rows:
        print("\nsweep (one engine per master source, prefix cache reset before each variant):")
        print_table(sweep_rows)
        print_tradeoff(sweep_rows, none_layers)
    print(f"reproduce: {command}")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    for r in rows:
        del r["logprobs"]
    result = {"meta": meta, "warnings": warnings, "rows": rows}
    if sweep_rows and plot(main_rows[:2] + sweep_rows, none_layers, args.out.with_name(args.out.stem + "_sweep.png")):
        result["plot"] = str(args.out.with_name(args.out.stem + "_sweep.png"))
        print(f"wrote {result['plot']}")
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
