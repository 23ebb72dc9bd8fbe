"""Tensor parallelism: prefill and decode throughput at TP=1 against TP=N, on whatever devices exist.

    python bench/tp.py                              # default model; TP sizes 1 and the first split that fits
    python bench/tp.py --model PATH --tp 1,2,4 --dtype bfloat16 --batch 32 --prompt-tokens 1024

On CPU, TP ranks are gloo processes sharing the machine's cores: that shows the path works and
what it costs, it is not a speed claim. On a machine with several GPUs (NCCL) it gives the real
numbers. Every row says on what device it ran.

* Prompts: `--batch` prompts of `--prompt-tokens` seeded random token ids (no tokenizer needed).
* Prefill: one `generate` with max_tokens=1 (the prefill plus one sampled token); prefill tokens/s
  = batch x prompt tokens / its time.
* Decode: one `generate` with `--max-tokens`; decode tokens/s = batch x (max_tokens - 1) / (its
  time - the prefill run's time).
* Greedy, `ignore_eos`, the prefix cache reset before every run; one warm-up of each kind per TP
  size, then `--repeats` timed runs, the best counting. `agree`: the fraction of sequences whose
  tokens equal TP=1's.
* One TP size at a time (each LLM is shut down before the next starts).

Prints a table and the command that reproduces it; writes `bench/out/tp.json` (`--out`).
`main(argv)` returns 0 and is what the smoke test in tests/ calls.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

DEFAULT_OUT = ROOT / "bench" / "out" / "tp.json"


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="bench/tp.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=None, help="Hugging Face folder (default: the bundled model)")
    ap.add_argument("--tp", default="auto",
                    help="comma-separated tensor_parallel_size values; 'auto' = 1 and the GPU count on CUDA, "
                         "else 1 and the smallest split the model allows")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16")
    ap.add_argument("--batch", type=int, default=8, help="prompts per run (default 8)")
    ap.add_argument("--prompt-tokens", type=int, default=256, help="tokens per prompt (default 256)")
    ap.add_argument("--max-tokens", type=int, default=32, help="new tokens per prompt in the decode run (>= 2)")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per kind; the best counts")
    ap.add_argument("--kv-cache-blocks", type=int, default=None, help="KV pool per rank (default: 512 MiB)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON results (default {DEFAULT_OUT})")
    args = ap.parse_args(argv)
    if min(args.batch, args.prompt_tokens, args.repeats) < 1 or args.max_tokens < 2:
        ap.error("--batch, --prompt-tokens and --repeats must be >= 1, --max-tokens >= 2")
    return args


def tp_sizes(spec: str, model_config, device: torch.device) -> list[int]:
    from nanodance.errors import RequestError
    from nanodance.parallel import check_split

    if spec != "auto":
        try:
            return [int(x) for x in spec.split(",") if x.strip()]
        except ValueError:
            raise SystemExit(f"--tp must be 'auto' or comma-separated integers, got {spec!r}") from None
    candidates = range(2, model_config.num_heads + 1)
    if device.type == "cuda":
        candidates = [n for n in candidates if n <= torch.cuda.device_count()][::-1]  # as many GPUs as fit
    for n in candidates:
        try:
            check_split(model_config, n, device)
            return [1, n]
        except RequestError:
            continue
    return [1]


def run(llm, prompts: list[list[int]], max_tokens: int) -> tuple[float, list[list[int]]]:
    from nanodance import SamplingParams

    llm.reset_prefix_cache()  # no run may reuse an earlier run's prompt KV
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - t0
    bad = [o for o in outs if o.finish_reason == "error"]
    if bad:
        raise RuntimeError(f"a request failed: {bad[0].error}")
    return seconds, [list(o.token_ids) for o in outs]


def measure(folder: Path, tp: int, args, prompts) -> dict:
    from nanodance import LLM

    options = dict(tensor_parallel_size=tp, dtype=args.dtype, reuse="none")
    if args.device:
        options["device"] = args.device
    if args.kv_cache_blocks:
        options["kv_cache_blocks"] = args.kv_cache_blocks
    t0 = time.perf_counter()
    llm = LLM(folder, **options)
    load = time.perf_counter() - t0
    try:
        run(llm, prompts, 1)  # warm-ups: first-call costs at these shapes
        run(llm, prompts, args.max_tokens)
        prefill = min(run(llm, prompts, 1)[0] for _ in range(args.repeats))
        full, tokens = min(run(llm, prompts, args.max_tokens) for _ in range(args.repeats))
        device = str(llm.device)
    finally:
        llm.shutdown()
    n = len(prompts)
    decode_s = max(full - prefill, 1e-9)
    return {"tp": tp, "device": device, "backend": "nccl" if device.startswith("cuda") and tp > 1 else
            ("gloo" if tp > 1 else "-"), "load_seconds": load, "prefill_seconds": prefill, "full_seconds": full,
            "prefill_tokens_per_s": n * args.prompt_tokens / prefill,
            "decode_tokens_per_s": n * (args.max_tokens - 1) / decode_s, "tokens": tokens}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    from nanodance.config import ModelConfig
    from nanodance.engine_config import EngineConfig

    given_model = args.model
    if args.model is None:
        from nanodance.tools.prepare import default_model_dir
        args.model = default_model_dir()
    mc = ModelConfig.from_folder(args.model)
    device = EngineConfig(device=args.device).torch_device()
    sizes = tp_sizes(args.tp, mc, device)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, mc.vocab_size, (args.batch, args.prompt_tokens), generator=g).tolist()

    rows = [measure(args.model, tp, args, prompts) for tp in sizes]
    base = rows[0]
    for row in rows:
        row["agree"] = sum(a == b for a, b in zip(row["tokens"], base["tokens"])) / len(prompts)
        row["prefill_speedup"] = row["prefill_tokens_per_s"] / base["prefill_tokens_per_s"]
        row["decode_speedup"] = row["decode_tokens_per_s"] / base["decode_tokens_per_s"]

    resolved = ["--model", str(given_model)] if given_model else []  # none: the default model
    resolved += ["--tp", ",".join(map(str, sizes)), "--dtype", args.dtype, "--batch", str(args.batch),
                 "--prompt-tokens", str(args.prompt_tokens), "--max-tokens", str(args.max_tokens),
                 "--repeats", str(args.repeats)]
    if args.device:
        resolved += ["--device", args.device]
    command = "python bench/tp.py " + shlex.join(resolved)
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    meta = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "torch": torch.__version__, "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "threads": torch.get_num_threads(), "gpus": gpus, "command": command, "argv": argv}
    print(f"date {meta['date']}  torch {meta['torch']}  {os.cpu_count()} CPU cores  GPUs {gpus or 'none'}")
    print(f"batch {args.batch} x {args.prompt_tokens} prompt tokens, {args.max_tokens} new tokens, best of "
          f"{args.repeats}")
    header = (f"{'tp':>3}  {'device':<8} {'backend':<7} {'prefill tok/s':>13} {'x':>5} {'decode tok/s':>12} "
              f"{'x':>5} {'agree':>5}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['tp']:>3}  {r['device']:<8} {r['backend']:<7} {r['prefill_tokens_per_s']:>13.1f} "
              f"{r['prefill_speedup']:>5.2f} {r['decode_tokens_per_s']:>12.1f} {r['decode_speedup']:>5.2f} "
              f"{r['agree']:>5.2f}")
    print("x: throughput relative to tp=1; agree: fraction of sequences with tp=1's greedy tokens")
    if device.type != "cuda":
        print("note: CPU ranks are gloo processes sharing this machine's cores: these numbers show the path "
              "works and what it costs, they are not a speed claim")
    print(f"reproduce: {command}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "rows": [{k: v for k, v in r.items() if k != "tokens"}
                                                            for r in rows]}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
