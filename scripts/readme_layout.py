"""Regenerate the README's layout table (between the <!-- layout --> markers) from the files' line
counts: `python scripts/readme_layout.py` from the repository root. A new core file gets a row here."""
rows = [
 ("errors.py", "the error hierarchy: every deliberate error is a `NanodanceError` and the built-in that fits"),
 ("config.py", "`ModelConfig`: the part of a Hugging Face `config.json` nanodance reads; RoPE inverse frequencies"),
 ("engine_config.py", "`EngineConfig`: every engine option, validated in one place"),
 ("tokenizer.py", "text <-> token ids, the chat template, an incremental UTF-8-safe decoder"),
 ("segments.py", "`Shared(...)` and the encoding of segment lists and chat messages with shared parts"),
 ("auto_shared.py", "recent outputs indexed by k-grams: shared spans found in prompts nobody marked"),
 ("prompts.py", "prompt validation and encoding for `LLM` calls (all checked before anything is queued)"),
 ("sampling.py", "`SamplingParams` and the batched sampler (exact argmax at temperature 0)"),
 ("cache.py", "the block pool: blocks with `frame0`, `View(block, lo, hi, pos0)`, ref counts, prefix index, invariants"),
 ("sequence.py", "one request: token ids, views, positions still to compute"),
 ("attention_metadata.py", "the contract between a step's batch and the kernels; `build_metadata`, its one builder"),
 ("kernels/torch_ref.py", "the reference semantics and CPU path: KV store, paged attention over views, key deviation, rotate-copy"),
 ("kernels/triton_common.py", "RoPE in fp32 and launch checks shared by the Triton kernels"),
 ("kernels/triton_attention.py", "paged attention over views (GQA packing, query rotation by the view delta, split-K decode)"),
 ("kernels/triton_kv.py", "KV store, key deviation and rotate-copy kernels"),
 ("kernels/__init__.py", "dispatch: Triton on CUDA, the torch twins on CPU (`NANODANCE_BACKEND` forces one)"),
 ("model.py", "the Llama-family decoder (Llama, Qwen2 biases, Qwen3 q/k norms), matching `transformers`"),
 ("weights.py", "loading Hugging Face safetensors (sharded or not) into the model, with shape checks"),
 ("executor.py", "every model forward and KV-tensor operation in one place (replayed on every rank under TP)"),
 ("scheduler.py", "continuous batching: token budget, chunked prefill, prefix matching, preemption, stops"),
 ("runner.py", "one step's chunks -> one forward pass -> sampled tokens (the `sampler` seam)"),
 ("masters.py", "`Master`: the one pooled copy of a shared block's K/V"),
 ("layout.py", "an agent's plan (compute / view / copy runs) and its views at admission; `RoundLayouts`"),
 ("agents.py", "persistent agents' kept caches, their whole lifecycle"),
 ("collector.py", "the KV collector: masters, the recompute choice once per block, per-agent plans"),
 ("progress.py", "the progress bar, in tokens (prefill and decode)"),
 ("engine.py", "`Engine`: `step()` = schedule, run, postprocess; the loop, memory pressure, stats"),
 ("round_stats.py", "per-round accounting: distinct vs dense KV, compression and its bound, prefill work"),
 ("round_runner.py", "one round: masters, plans, the step loop, the accounting"),
 ("llm.py", "`LLM`: the public API, a thin facade"),
 ("serving.py", "`ServingEngine`: an `LLM` on a background thread; admission windows make rounds of requests"),
 ("openai_protocol.py", "the OpenAI wire format: request fields in engine terms, responses and stream chunks"),
 ("server.py", "the OpenAI-compatible HTTP server (FastAPI): routes, waiting, server-sent events, metrics"),
 ("parallel.py", "tensor parallelism: the process group, sharded linears and vocab-parallel embedding"),
 ("tp_protocol.py", "tensor parallelism: the step descriptions rank 0 broadcasts"),
 ("tp_worker.py", "tensor parallelism: a worker rank's loop"),
 ("tp_launch.py", "tensor parallelism: rank 0 starts, drives, watches and stops the workers"),
]
out = ["| file | lines | what it owns |", "|---|---|---|"]
total = kern = 0
for f, what in rows:
    n = sum(1 for _ in open("nanodance/" + f))
    total += n
    if f.startswith("kernels/"):
        kern += n
    out.append(f"| `{f}` | {n} | {what} |")
import glob
allfiles = [p for p in glob.glob("nanodance/*.py") + glob.glob("nanodance/kernels/*.py")]
listed = {"nanodance/" + f for f, _ in rows}
rest = [p for p in allfiles if p not in listed]
restn = sum(sum(1 for _ in open(p)) for p in rest)
total_all = total + restn
out.append("")
out.append(f"{total_all} lines in all: {total_all - kern} for the engine (`__init__.py` and `__main__.py` "
           f"included) and {kern} for the kernels.")
print("\n".join(out))

import re
readme = open("README.md").read()
readme = re.sub(r"<!-- layout -->.*?<!-- /layout -->", lambda m: "<!-- layout -->\n" + "\n".join(out) + "\n<!-- /layout -->", readme, flags=re.S)
open("README.md", "w").write(readme)
