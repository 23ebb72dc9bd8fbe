"""CPU generation throughput: nanodance against Hugging Face `transformers` on the same model.

Both engines load the bundled default model (SmolLM2-135M-Instruct, the folder from
`nanodance.tools.prepare.default_model_dir()`) in the same dtype and decode the same chat prompts
greedily, with the same number of new tokens per prompt:

    python bench/throughput.py                                  # bf16, batch 1 and 16, 64 tokens
    python bench/throughput.py --dtype float32 --threads 2 --repeats 5

* Prompts: 16 short user questions, rendered once with nanodance's chat template
  (`Tokenizer.encode_chat`), so both engines get identical token ids. Batch b takes the first b
  prompts (cycling past 16).
* nanodance: one `LLM.generate` call with all b prompts as token ids,
  `SamplingParams(temperature=0, max_tokens=N, ignore_eos=True)`. The prefix cache is reset
  before every run, so no run reuses an earlier run's prompt KV (sharing inside one call, e.g.
  the common system prompt, is the engine's own and counts).
* transformers: `AutoModelForCausalLM.from_pretrained(folder, dtype=...)`, one `.generate` call
  per batch, left padding with an attention mask, `pad_token_id=2`, `do_sample=False`,
  `max_new_tokens=min_new_tokens=N`.
* Timing: one warm-up run per engine and batch size (same prompts, `--warmup-tokens` new tokens,
  default 8: enough to pay first-call costs, cheap enough to keep the default run under ~5 min on
  2 cores), then `--repeats` timed runs alternating (ours, theirs, ours, theirs, ...) so machine
  noise hits both; the best run counts. Model loading is not timed (it is in the JSON).
* `--profile N` adds a cProfile of one nanodance run at the first batch size (top N by tottime).
* `agree`: the fraction of sequences whose greedy tokens are identical in both engines, compared
  up to the first end-of-sequence token of either. (Past an EOS they differ by design:
  `ignore_eos` lets nanodance pick EOS and go on, `min_new_tokens` forbids EOS in transformers.)
  The JSON also has the full-length agreement and the mean common prefix length.

Prints one table plus the date, versions, thread count, CPU model, load average and the command
line that reproduces the run; writes everything to `bench/out/throughput.json` (`--out`).
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

DEFAULT_OUT = ROOT / "bench" / "out" / "throughput.json"
PAD_TOKEN_ID = 2
DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32}

QUESTIONS = [
    "What is the capital of France?",
    "Explain photosynthesis in two sentences.",
    "Write a haiku about the sea.",
    "How do I reverse a list in Python?",
    "Why is the sky blue?",
    "Give me three tips for better sleep.",
    "What is the difference between a virus and a bacterium?",
    "Summarize the plot of Romeo and Juliet.",
    "How many legs does a spider have?",
    "Translate 'good morning' into Spanish and German.",
    "What causes the seasons on Earth?",
    "Suggest a name for a friendly robot.",
    "What is 17 times 23?",
    "Describe a cat to someone who has never seen one.",
    "What are the main ingredients of a pancake?",
    "Why do we need to drink water?",
]


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="bench/throughput.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES), help="model dtype for both engines")
    ap.add_argument("--batch-sizes", default="1,16", help="comma-separated batch sizes (default 1,16)")
    ap.add_argument("--max-tokens", type=int, default=64, help="new tokens per prompt (default 64)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per engine and batch; best counts")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    ap.add_argument("--warmup-tokens", type=int, default=8,
                    help="new tokens of the warm-up run (same prompts and batch; default 8, 0 = --max-tokens)")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="after the table, cProfile one nanodance run at the first batch size and print the "
                         "top N functions by own time (tottime)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON results (default {DEFAULT_OUT})")
    args = ap.parse_args(argv)
    try:
        args.batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    except ValueError:
        ap.error(f"--batch-sizes must be comma-separated integers, got {args.batch_sizes!r}")
    if not args.batch_sizes or min(args.batch_sizes) < 1:
        ap.error("--batch-sizes needs positive integers")
    if args.max_tokens < 1 or args.repeats < 1 or (args.threads is not None and args.threads < 1):
        ap.error("--max-tokens, --repeats and --threads must be >= 1")
    if args.warmup_tokens < 0 or args.profile < 0:
        ap.error("--warmup-tokens and --profile must be >= 0")
    args.warmup_tokens = min(args.warmup_tokens or args.max_tokens, args.max_tokens)
    return args


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def eos_index(ids: list[int], eos: set[int]) -> int:
    """Index of the first end-of-sequence token in `ids` (len(ids) if none)."""
    return next((i for i, t in enumerate(ids) if t in eos), len(ids))


def agree_before_eos(a: list[int], b: list[int], eos: set[int]) -> bool:
    """Identical up to the first EOS of either sequence (the EOS position itself excluded)."""
    n = min(eos_index(a, eos), eos_index(b, eos))
    return a[:n] == b[:n]


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class Ours:
    name = "nanodance"

    def __init__(self, folder: Path, dtype: str):
        from nanodance import LLM
        self.llm = LLM(folder, dtype=dtype)

    def run(self, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
        from nanodance import SamplingParams
        self.llm.reset_prefix_cache()  # no run may reuse an earlier run's prompt KV
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        self.cached_prompt_tokens = sum(o.num_cached_tokens for o in outs)
        bad = [o for o in outs if o.finish_reason == "error"]
        if bad:
            raise RuntimeError(f"nanodance request failed: {bad[0].error}")
        return [list(o.token_ids) for o in outs]


class Theirs:
    name = "transformers"

    def __init__(self, folder: Path, dtype: str):
        from transformers import AutoModelForCausalLM
        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=DTYPES[dtype]).eval()

    def run(self, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), PAD_TOKEN_ID, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        with torch.inference_mode():
            out = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_tokens,
                                      min_new_tokens=max_tokens, do_sample=False, pad_token_id=PAD_TOKEN_ID)
        return out[:, width:].tolist()


def timed(engine, prompts: list[list[int]], max_tokens: int) -> tuple[float, list[list[int]]]:
    t0 = time.perf_counter()
    tokens = engine.run(prompts, max_tokens)
    return time.perf_counter() - t0, tokens


def profile(engine, prompts: list[list[int]], max_tokens: int, top: int) -> str:
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    engine.run(prompts, max_tokens)
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).strip_dirs().sort_stats("tottime").print_stats(top)
    text = buf.getvalue().strip()
    print(text)
    return text


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()

    import transformers
    transformers.utils.logging.disable_progress_bar()

    from nanodance.tools.prepare import default_model_dir
    from nanodance.tokenizer import Tokenizer

    load_before = loadavg()
    folder = default_model_dir()
    tok = Tokenizer.from_folder(folder)
    eos = set(tok.eos_token_ids) | {PAD_TOKEN_ID}
    rendered = [tok.encode_chat([{"role": "user", "content": q}]) for q in QUESTIONS]

    t0 = time.perf_counter()
    engines = [Ours(folder, args.dtype)]
    load_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    engines.append(Theirs(folder, args.dtype))
    load_theirs = time.perf_counter() - t0

    rows, runs = [], []
    for b in args.batch_sizes:
        prompts = [rendered[i % len(rendered)] for i in range(b)]
        outputs, times = {}, {e.name: [] for e in engines}
        for e in engines:  # warm-up: first-call costs (kernel selection, allocator) at this batch's shapes
            timed(e, prompts, args.warmup_tokens)
        for r in range(args.repeats):
            for e in engines:  # ours, theirs, ours, theirs, ...
                secs, outputs[e.name] = timed(e, prompts, args.max_tokens)
                times[e.name].append(secs)
                runs.append({"batch": b, "engine": e.name, "repeat": r, "seconds": secs})
        ours, theirs = outputs["nanodance"], outputs["transformers"]
        full = sum(a == t for a, t in zip(ours, theirs)) / b
        pre_eos = sum(agree_before_eos(a, t, eos) for a, t in zip(ours, theirs)) / b
        prefix = sum(common_prefix(a, t) for a, t in zip(ours, theirs)) / b
        tps = {}
        for e in engines:
            n_tok = sum(len(t) for t in outputs[e.name])
            best = min(times[e.name])
            tps[e.name] = n_tok / best
            rows.append({"batch": b, "engine": e.name, "tokens": n_tok, "seconds": best,
                         "tokens_per_s": n_tok / best, "all_seconds": times[e.name],
                         "prompt_tokens": sum(len(p) for p in prompts),
                         "agree": pre_eos, "agree_full_length": full, "mean_common_prefix": prefix})
        rows[-len(engines)]["cached_prompt_tokens"] = engines[0].cached_prompt_tokens
        for row in rows[-len(engines):]:
            row["ratio"] = tps["nanodance"] / tps["transformers"]

    load_after = loadavg()
    resolved = ["--dtype", args.dtype, "--batch-sizes", ",".join(map(str, args.batch_sizes)),
                "--max-tokens", str(args.max_tokens), "--repeats", str(args.repeats), "--threads", str(threads),
                "--warmup-tokens", str(args.warmup_tokens)]
    command = "python bench/throughput.py " + shlex.join(resolved)
    meta = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
        "threads": threads, "cpu": cpu_model(), "cpu_count": os.cpu_count(), "loadavg_before": load_before,
        "loadavg_after": load_after, "dtype": args.dtype, "max_tokens": args.max_tokens, "repeats": args.repeats,
        "warmup_tokens": args.warmup_tokens,
        "model_dir": str(folder), "hf_attn_implementation": getattr(engines[1].model.config, "_attn_implementation", None),
        "load_seconds": {"nanodance": load_ours, "transformers": load_theirs}, "command": command,
        "argv": argv,
    }

    print(f"date {meta['date']}  torch {meta['torch']}  transformers {meta['transformers']}  threads {threads}  "
          f"cpu {meta['cpu']} ({meta['cpu_count']} cores)")
    print(f"dtype {args.dtype}  max_tokens {args.max_tokens}  best of {args.repeats}  "
          f"load avg before {load_before} after {load_after}")
    header = f"{'batch':>5}  {'engine':<12} {'tokens':>7} {'seconds':>8} {'tokens/s':>9} {'ratio':>6} {'agree':>6}"
    print(header)
    print("-" * len(header))
    for row in rows:
        print(f"{row['batch']:>5}  {row['engine']:<12} {row['tokens']:>7} {row['seconds']:>8.3f} "
              f"{row['tokens_per_s']:>9.1f} {row['ratio']:>6.2f} {row['agree']:>6.2f}")
    print("ratio: nanodance tokens/s / transformers tokens/s; agree: fraction of identical greedy sequences "
          "(up to the first EOS)")
    print(f"reproduce: {command}")

    result = {"meta": meta, "rows": rows, "runs": runs}
    if args.profile:
        b = args.batch_sizes[0]
        prompts = [rendered[i % len(rendered)] for i in range(b)]
        print(f"\ncProfile of one nanodance run, batch {b}, {args.max_tokens} tokens (top {args.profile} by tottime):")
        result["profile"] = profile(engines[0], prompts, args.max_tokens, args.profile)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
