"""nanodance in under 40 lines: generate, one All-Gather round with Shared blocks, stats.

    python examples/quickstart.py        # the bundled SmolLM2-135M-Instruct, offline, CPU
"""
from nanodance import LLM, SamplingParams, Shared

llm = LLM(dtype="float32")  # float32 is the faster dtype on CPUs without native bf16 matmuls
sp = SamplingParams(temperature=0.0, max_tokens=40)

# 1. Plain generation: strings, token ids or chat messages.
[out] = llm.generate([[{"role": "user", "content": "What is the capital of France?"}]], sp)
print("generate:", out.text)

# 2. Round 0: three agents answer privately.
personas = ["You are Ada, a careful engineer.", "You are Bo, a cheerful baker.", "You are Cy, a skeptical judge."]
question = " In one sentence: should our town build a bridge or a ferry?"
r0 = llm.run_round([[{"role": "system", "content": p}, {"role": "user", "content": question}] for p in personas], sp)
for p, o in zip(personas, r0):
    print(f"round 0 | {p.split(',')[0][8:]}: {o.text!r}")

# 3. Round 1: each agent sees the others' answers as Shared blocks. Their KV is reused from the
#    producers (no prefill for them), read in place by attention at each agent's positions.
prompts = [[{"role": "system", "content": personas[i]},
            {"role": "user", "content": [question + " The others said:\n"]
             + [Shared(r0[j]) for j in range(3) if j != i] + ["\nYour final answer, in one sentence:"]}]
           for i in range(3)]
r1 = llm.run_round(prompts, sp)
for p, o in zip(personas, r1):
    print(f"round 1 | {p.split(',')[0][8:]}: {o.text!r}")

s = r1.stats
print(f"round 1: {s['prompt_tokens']} prompt tokens, {s['prefill_tokens_computed']} computed, "
      f"{s['prefill_tokens_reused']} reused; KV {s['distinct_kv_bytes'] / 2**20:.1f} MiB distinct vs "
      f"{s['dense_kv_bytes'] / 2**20:.1f} MiB dense ({s['compression']:.2f}x)")
print("engine:", {k: v for k, v in llm.stats().items() if k in ("blocks_total", "blocks_used", "preemptions")})
