"""nanodance in under 40 lines: generate, one All-Gather round with Shared blocks, stats.

    python examples/quickstart.py        # the bundled SmolLM2-135M-Instruct, offline, CPU
"""
from nanodance import LLM, SamplingParams, Shared

llm = LLM()  # on CPU the default dtype is float32, faster there than bf16
sp = SamplingParams(temperature=0.0, max_tokens=64)

# 1. Plain generation: strings, token ids or chat messages.
[out] = llm.generate([[{"role": "user", "content": "What is the capital of France?"}]], sp)
print("generate:", out.text)

# 2. Round 0: six agents answer privately.
names = ["Ada, a careful engineer", "Bo, a cheerful baker", "Cy, a skeptical judge", "Di, a busy doctor",
         "Ed, a retired sailor", "Flo, a young teacher"]
personas = [f"You are {name}." for name in names]
question = " In three sentences: should our town build a bridge or a ferry, and why?"
r0 = llm.run_round([[{"role": "system", "content": p}, {"role": "user", "content": question}] for p in personas], sp)
for name, o in zip(names, r0):
    print(f"round 0 | {name.split(',')[0]}: {o.text[:90]!r}...")

# 3. Round 1: each agent sees the five others' answers as Shared blocks. Their KV is reused, read
#    in place by attention at each agent's positions; each agent recomputes only a few tokens.
prompts = [[{"role": "system", "content": personas[i]},
            {"role": "user", "content": [question + " The others said:\n"]
             + [Shared(r0[j]) for j in range(6) if j != i] + ["\nYour final answer, in one sentence:"]}]
           for i in range(6)]
r1 = llm.run_round(prompts, sp)
for name, o in zip(names, r1):
    print(f"round 1 | {name.split(',')[0]}: {o.text[:90]!r}")

s = r1.stats
print(f"round 1: {s['prompt_tokens']} prompt tokens, {s['prefill_tokens_computed']} computed, "
      f"{s['prefill_tokens_reused']} reused; KV {s['distinct_kv_bytes'] / 2**20:.1f} MiB distinct vs "
      f"{s['dense_kv_bytes'] / 2**20:.1f} MiB dense ({s['compression']:.2f}x; the agents' private tokens "
      f"allow {s['compression_bound']:.2f}x)")
