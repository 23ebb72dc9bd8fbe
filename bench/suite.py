"""The All-Gather benchmark suite: every reuse mode on a workload preset, side by side.

    python bench/suite.py --preset debate --agents 6 --output-tokens 24:32
    python bench/suite.py --preset generative-agents --agents 8 --agents-sweep 2,4,8 --ratios 0,0.05,0.15,0.3
    python bench/suite.py --preset stress --dry-run --budgets 3000,6000,12000 --configs prefix,tokendance:first:0.02
    python bench/suite.py --replot bench/out/suite/stress-dry.json        # goals and plots again, no runs

Other flags: `--last-round-tokens` (shorter outputs in the last round: nobody gathers them),
`--block-size`, `--tag` (output file suffix), `--dtype`, `--threads`, `--kv-cache-blocks`.

Workloads come from `bench/workloads.py` (presets generative-agents, agent-society, debate,
stress; `--agents`, `--rounds`, `--output-tokens`, `--seed` override them). Every config
(`none`, `prefix`, `pic`, `tokendance` at the engine defaults, plus `--configs` / `--ratios`
variants) gets its own engine and runs every round of the workload. Outputs have fixed lengths
(`SamplingParams(temperature=0, max_tokens=L, ignore_eos=True)` with L drawn per agent).

Sections (each printed as a table, all written to `<out>/<preset>[-dry].json`):
1. Main comparison at N agents, on the last (largest) round: distinct KV per agent, private KV
   per agent, compression (dense / distinct) and its bound, mirror compression, prefill tokens
   computed, prefill token-layers (incl. the collector's analysis), prefill and round seconds,
   fidelity vs `none`. Whole-run totals are in the JSON.
   * Mirror compression = a mirror's full shared bytes / its diff bytes, summed over the agents
     of the round; the full shared bytes are the blocks the agent's shared spans would fill
     densely (ceil(len / block) per span). Packed diffs put recomputed tokens in the next free
     slots of an agent's private blocks, beside its private text, so there are three measures:
       `mirror`  the engine's per-block mirror compression: shared blocks / `diff_blocks`, the
                 distinct private blocks holding any recomputed token, counted whole;
       `phys`    the same from the suite's own view of the agents' prefill layouts (it must agree);
       `slots`   shared tokens / privately held shared-span tokens (per slot).
     `pic` holds every shared token privately (1 per slot); none/prefix have no mirrors.
   * Fidelity is measured on identical inputs in every round by teacher forcing: the `none`
     engine runs first and freely (greedy); every other engine is fed none's tokens as its
     outputs (its runner's sampled tokens are replaced), while its own greedy choice at every
     step is recorded. So later rounds see exactly none's outputs (and producer masters hold
     K/V of those tokens, computed in that engine's own caches), and "exact" (all greedy choices
     of an agent's output equal none's) is exactly whether a free-running greedy engine would
     have reproduced none's output given the same input. Reported over the All-Gather rounds
     (round >= 1): first-token agreement, exact-match rate, mean first-token KL(none || mode) in
     nats (the helpers of `bench/rounds.py`). Round 0 (and per-round values) are in the JSON.
     `agr-nr` / `KL-nr`: the same over the (round, agent) pairs that no config made a
     reference agent (`master="agent"`: those are exact, and would flatter it).
2. `--ratios`: tokendance at each recompute ratio (for each `--schemes`) and pic at each ratio:
   fidelity and mirror compression vs recompute ratio.
3. `--agents-sweep`: every config at each N: distinct KV, prefill and round seconds of the last
   round (the round latency as N grows).
4. Concurrency (`--budgets`, KV pool sizes in blocks): for each budget and config, the largest
   N whose whole run completes with no preemption and with every active agent of each round
   resident at once (peak running == agents), found by doubling then binary search (it assumes
   that serving N implies serving fewer). Probe engines get `max_num_seqs` above N and a token
   budget of 2^20 so only KV memory limits residency; a probe stops at its first preemption.
5. Goals (the paper's figures): >= 2.7x agents served vs prefix at equal KV; >= 17.5x mirror
   compression (stress) at a ratio whose KL is no worse than pic's default, with the whole-cache
   per-agent reduction vs prefix and its bound beside it; >= 1.9x faster prefill than pic.

`--dry-run` (for presets too slow on CPU): the real allocator, scheduler, collector and pool
build every cache and count every block, but no real model math runs: a tiny random
Llama config (2 layers, the default model's tokenizer and block size, context 8192) stands in,
passed to `LLM` as an already-built model (`DryModel`): its forward returns zeros, every token
is forced to a seeded synthetic one, and the collector's reference keys are seeded random keys. With ignore_eos every output has its drawn length, so
block counts do not depend on the model (up to +-1 block where the deviation ranking picks a
segment's short last chunk, and real outputs that happen to be identical would dedupe). KV
bytes are scaled to the default model at `--dtype`. No wall times and no fidelity are printed.

Plots (matplotlib, optional) go to `--out` (default bench/out/suite/): KV bytes vs agents,
agents served vs KV budget, prefill time vs agents, fidelity vs recompute ratio.
`main(argv)` returns 0 (the smoke test runs it in dry-run on a tiny config).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import random
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.rounds import cpu_model, fidelity  # noqa: E402
from bench.workloads import PRESETS, Workload, preset, prompt_lengths  # noqa: E402

DEFAULT_OUT = ROOT / "bench" / "out" / "suite"
MODES = ("none", "prefix", "pic", "tokendance")
DRY_BANNER = ("DRY RUN: accounting only. The real allocator, scheduler and collector build every cache, but a "
              "tiny random model stands in and no real model math runs; block counts are exact for fixed-length "
              "outputs. No wall times, no fidelity.")
KL_TOLERANCE = 1e-3  # nats: "no worse than pic" allows this much noise
GOALS = {"agents_vs_prefix": 2.7, "mirror_compression": 17.5, "prefill_speedup_vs_pic": 1.9}


# ---------------------------------------------------------------------- configs


@dataclass(frozen=True)
class Config:
    """One engine configuration: a reuse mode and, for pic/tokendance, the recompute choice."""

    reuse: str
    scheme: str = "block"
    ratio: float = 0.15
    master: str = "producer"
    chunk: int | None = None  # the block scheme's unit in long blocks, in tokens (None: the engine's default)
    short: float | None = None  # short_recompute_ratio (None: the engine's default)

    @property
    def label(self) -> str:
        if self.reuse in ("none", "prefix"):
            return self.reuse
        default = (self.scheme, self.ratio, self.master, self.chunk, self.short) == ("block", 0.15, "producer", None,
                                                                                      None)
        if default:
            return self.reuse
        name = f"{'td' if self.reuse == 'tokendance' else 'pic'} {self.scheme} {self.ratio:g}"
        name += "" if self.master == "producer" else f" {self.master}"
        name += "" if self.chunk is None else f" chunk {self.chunk}"
        return name + ("" if self.short is None else f" short {self.short:g}")

    def engine_kwargs(self) -> dict:
        kw = {"reuse": self.reuse}
        if self.reuse in ("pic", "tokendance"):
            kw.update(recompute_ratio=self.ratio, recompute_scheme=self.scheme, master=self.master)
            if self.chunk is not None:
                kw.update(recompute_chunk=self.chunk)
            if self.short is not None:
                kw.update(short_recompute_ratio=self.short)
        return kw


def parse_config(text: str) -> Config:
    """'none' | 'prefix' | 'pic|tokendance[:scheme[:ratio[:master[:chunk[:short]]]]]' (chunk: the
    block scheme's unit in long blocks, in tokens; short: short_recompute_ratio)."""
    parts = text.strip().split(":")
    if parts[0] not in MODES:
        raise ValueError(f"config {text!r}: mode must be one of {MODES}")
    if parts[0] in ("none", "prefix"):
        return Config(parts[0])
    scheme = parts[1] if len(parts) > 1 and parts[1] else "block"
    ratio = float(parts[2]) if len(parts) > 2 else 0.15
    master = parts[3] if len(parts) > 3 else "producer"
    chunk = int(parts[4]) if len(parts) > 4 and parts[4] else None
    if chunk is not None and chunk < 1:
        raise ValueError(f"config {text!r}: chunk must be >= 1")
    short = float(parts[5]) if len(parts) > 5 else None
    if short is not None and not 0 <= short <= 1:
        raise ValueError(f"config {text!r}: short must be in [0, 1]")
    return Config(parts[0], scheme, ratio, master, chunk, short)


# ---------------------------------------------------------------------- backends


def _write_tiny_model(folder: Path, source: Path, context: int) -> Path:
    """A tiny random Llama with the default model's tokenizer (the dry-run stand-in)."""
    from safetensors.torch import save_file
    H, L, nh, nkv, D, inter = 32, 2, 2, 1, 16, 64
    cfg = json.loads((source / "config.json").read_text())
    vocab = cfg["vocab_size"]
    cfg.update({"hidden_size": H, "intermediate_size": inter, "num_hidden_layers": L, "num_attention_heads": nh,
                "num_key_value_heads": nkv, "head_dim": D, "max_position_embeddings": context,
                "tie_word_embeddings": True, "torch_dtype": "float32"})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    g = torch.Generator().manual_seed(0)
    w = {"model.embed_tokens.weight": torch.randn(vocab, H, generator=g) * 0.1, "model.norm.weight": torch.ones(H)}
    for i in range(L):
        p = f"model.layers.{i}."
        for name, shape in (("self_attn.q_proj", (nh * D, H)), ("self_attn.k_proj", (nkv * D, H)),
                            ("self_attn.v_proj", (nkv * D, H)), ("self_attn.o_proj", (H, nh * D)),
                            ("mlp.gate_proj", (inter, H)), ("mlp.up_proj", (inter, H)), ("mlp.down_proj", (H, inter))):
            w[p + name + ".weight"] = torch.randn(*shape, generator=g) * 0.1
        w[p + "input_layernorm.weight"] = torch.ones(H)
        w[p + "post_attention_layernorm.weight"] = torch.ones(H)
    save_file(w, str(folder / "model.safetensors"))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        if (source / name).is_file():
            shutil.copy(source / name, folder / name)
    return folder


class DryModel:
    """Builds the dry run's stand-in model: the tiny config, and no model math at all."""

    @staticmethod
    def make(config, seed: int = 1234):
        from nanodance.model import CausalLM

        class _Dry(CausalLM):
            """Zero hidden states and logits (the driver forces every token; nothing reads the KV),
            and seeded random keys for the collector's deviation scoring, one prompt at a time."""

            def __init__(self):
                super().__init__(config)
                self.keys = torch.Generator().manual_seed(seed)
                self.lens: list[int] = []

            def forward(self, input_ids, positions, meta, kv_caches, num_layers=None):
                self.lens = (meta.cu_seqlens_q[1:] - meta.cu_seqlens_q[:-1]).tolist()
                return torch.zeros(input_ids.shape[0], config.hidden_size)

            def compute_logits(self, hidden):
                return torch.zeros(hidden.shape[0], config.vocab_size)

            def layer_keys(self, layer_index, hidden, positions):
                return torch.cat([torch.randn(n, config.num_kv_heads, config.head_dim, generator=self.keys)
                                  for n in self.lens])

        return _Dry()


class Backend:
    """Makes engines: the real default model (loaded once, shared by every engine: weights are
    only read), or (dry run) a fresh tiny stand-in per engine."""

    def __init__(self, dry: bool, dtype: str, model: Path | None = None, block_size: int = 16):
        from nanodance import EngineConfig
        from nanodance.cache import KVCache
        from nanodance.config import ModelConfig
        from nanodance.tokenizer import Tokenizer
        from nanodance.tools.prepare import default_model_dir
        self.dry, self.dtype = dry, dtype
        self.real_folder = Path(model) if model else default_model_dir()
        real = ModelConfig.from_folder(self.real_folder)
        self.real_config = real
        self.block_size = block_size
        self.torch_dtype = EngineConfig(dtype=dtype).torch_dtype()
        self.real_block_bytes = KVCache.bytes_per_block(real.num_layers, self.block_size, real.num_kv_heads,
                                                        real.head_dim, self.torch_dtype)
        self.context = real.max_position_embeddings
        self.tokenizer = Tokenizer.from_folder(self.real_folder)
        self._tmp = None
        self._model = None
        if dry:
            self._tmp = tempfile.TemporaryDirectory(prefix="nanodance-dry-")
            self.dry_config = ModelConfig.from_folder(_write_tiny_model(Path(self._tmp.name), self.real_folder,
                                                                        self.context))

    def model(self):
        from nanodance import EngineConfig
        if self.dry:
            return DryModel.make(self.dry_config)
        if self._model is None:
            from nanodance.weights import load_model
            device = EngineConfig(dtype=self.dtype).torch_device()  # cuda when there is one, as LLM() picks
            self._model = load_model(self.real_folder, self.real_config, self.torch_dtype, device)
        return self._model

    def make(self, cfg: Config, kv_blocks: int, max_num_seqs: int, max_batched: int, sampler):
        from nanodance import LLM
        return LLM(self.model(), tokenizer=self.tokenizer, sampler=sampler, block_size=self.block_size,
                   kv_cache_blocks=kv_blocks, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_batched,
                   **cfg.engine_kwargs())

    def close(self):
        if self._tmp is not None:
            self._tmp.cleanup()


def synthetic_tokens(seed: int, r: int, agent: int, n: int) -> list[int]:
    """Dry-run outputs: seeded ordinary-word token ids (never special, distinct between agents)."""
    rng = random.Random(f"{seed}|tokens|{r}|{agent}")
    return [rng.randrange(1000, 40000) for _ in range(n)]


# ---------------------------------------------------------------------- driving one engine


class ProbeFailed(Exception):
    """A concurrency probe stopped early: a preemption, or an agent that was never resident."""


@dataclass
class RoundRecord:
    round: int
    agents: list[int]
    stats: dict
    preemptions: int
    peak_running: int
    outputs: dict  # agent -> output token ids (what the engine emitted: forced ones when forced)
    choices: dict  # agent -> the engine's own greedy token at each output step (real runs)
    first_logprobs: dict  # agent -> log-softmax of the first sampled token's logits (real runs)
    mirror: dict  # shared / diff accounting of the round's mirrors
    seconds: float
    block_bytes: int  # the engine's bytes per block (the tiny model's in a dry run)


class Driver:
    """Drives one engine through its public seams: a sampler (forces tokens, records the engine's
    own choices and first-token log-probs) and `on_step` (residency, probes, prefill views)."""

    def __init__(self, backend: Backend, probe: bool = False, capture: bool = False):
        self.llm = None
        self.backend, self.probe, self.capture = backend, probe, capture
        self.agent_of: dict[int, int] = {}  # id(prompt segments) -> agent
        self.forced: dict[int, list[int]] | None = None
        self.choices: dict[int, dict[int, int]] = {}
        self.first_lp: dict[int, torch.Tensor] = {}
        self.peak = 0
        self.prefill_views: dict[int, list] = {}
        self.master_blocks: set[int] | None = None
        self.failed = False  # a probe raised ProbeFailed: the engine is being torn down, stay quiet
        self._preemptions = 0
        self._finished: set[int] = set()

    # -------------------------------------------------------------- seams

    def _agent(self, prompt) -> int | None:
        return self.agent_of.get(id(prompt)) if prompt is not None else None

    def sample(self, logits, seqs):
        """The engine's sampler: its own greedy choice is recorded, then replaced by the forced token."""
        from nanodance.runner import default_sampler
        tokens = [None] * len(seqs) if self.backend.dry else default_sampler(logits, seqs)
        for k, seq in enumerate(seqs):
            agent, step = self._agent(seq.prompt), len(seq.output_token_ids)
            if agent is None:
                continue
            if self.capture and step == 0 and not self.backend.dry:
                self.first_lp[agent] = torch.log_softmax(logits[k].float(), dim=-1).cpu()
            if tokens[k] is not None:
                self.choices.setdefault(agent, {})[step] = tokens[k]
            if self.forced is not None:
                tokens[k] = self.forced[agent][step]
        return tokens

    def on_step(self, outputs):
        """After every step: peak residency, probe failures, and each agent's views at prefill."""
        llm = self.llm
        newly = [o for o in outputs if o.finish_reason is not None and o.request_id not in self._finished]
        self._finished.update(o.request_id for o in newly)
        # Running after `schedule` = running now + those this step finished (failed and aborted
        # requests finish without running a step).
        ran = [o for o in newly if o.finish_reason in ("stop", "length")]
        running = sum(1 for s in llm.scheduler.running if not s.prefill_only) + len(ran)
        self.peak = max(self.peak, running)
        if self.master_blocks is None and llm.collector is not None:
            # Masters only: the collector also holds reference agents' carriers (their own caches).
            c = llm.collector
            self.master_blocks = {v.block for m in (*c.outputs.values(), *c.round_masters) for v in m.views}
        for o in outputs:
            agent = self._agent(o.prompt)
            record = llm.engine.call.prefilled.get(o.request_id)
            if agent is not None and record is not None and agent not in self.prefill_views:
                self.prefill_views[agent] = list(record.views)
        if not self.probe or self.failed:
            return
        if llm.scheduler.counters.preemptions > self._preemptions:
            self.failed = True
            raise ProbeFailed("preempted")
        if any(self._agent(o.prompt) is not None for o in newly):
            never = [s for s in llm.scheduler.waiting if self._agent(s.prompt) is not None and s.num_preemptions == 0]
            if never:
                self.failed = True
                raise ProbeFailed("an agent finished before every agent was resident")

    # -------------------------------------------------------------- rounds

    def run_round(self, wl: Workload, r: int, outputs: dict, forced: dict[int, list[int]] | None,
                  max_tokens: int | None = None) -> RoundRecord:
        """Round r of `wl`; `max_tokens` overrides every agent's output length (the last round)."""
        from nanodance import SamplingParams
        from nanodance.segments import encode_segments
        llm = self.llm
        rp = wl.round_prompts(r, outputs)
        if max_tokens is not None:
            rp.max_tokens = [max_tokens] * len(rp.agents)
        self.agent_of = {id(p): a for a, p in zip(rp.agents, rp.prompts)}
        self.forced = forced
        if self.backend.dry and forced is None:
            self.forced = {a: synthetic_tokens(wl.cfg.seed, r, a, m) for a, m in zip(rp.agents, rp.max_tokens)}
        self.choices, self.first_lp, self.peak = {}, {}, 0
        self.prefill_views, self.master_blocks, self._finished = {}, None, set()
        params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in rp.max_tokens]
        pre = self._preemptions = llm.scheduler.counters.preemptions
        t0 = time.perf_counter()
        outs = llm.run_round(rp.prompts, params, use_tqdm=False, on_step=self.on_step)
        seconds = time.perf_counter() - t0
        bad = [o for o in outs if o.finish_reason == "error"]
        if bad:
            raise RuntimeError(f"round {r}: {len(bad)} requests failed: {bad[0].error}")
        for a, o in zip(rp.agents, outs):
            outputs[(r, a)] = o
        enc = {a: encode_segments(p, llm.tokenizer) for a, p in zip(rp.agents, rp.prompts)}
        return RoundRecord(
            round=r, agents=rp.agents, stats=dict(outs.stats), preemptions=llm.scheduler.counters.preemptions - pre,
            peak_running=self.peak, outputs={a: list(o.token_ids) for a, o in zip(rp.agents, outs)},
            choices={a: [c[k] for k in sorted(c)] for a, c in self.choices.items()},
            first_logprobs=dict(self.first_lp), mirror=self._mirror_accounting(enc), seconds=seconds,
            block_bytes=llm.block_bytes)

    def _mirror_accounting(self, encoded: dict) -> dict:
        """Mirror sizes (shared spans vs their privately held part) and the footprint bound.

        The bound is the fewest blocks the round's prompts could occupy: the exact common
        leading prefix (full blocks, before any shared span) once, every agent's other private
        tokens densely, every distinct shared span once. (The engine's `compression_bound`
        counts the common prefix once per agent, so prefix caching can beat it.)
        """
        bs = self.llm.pool.block_size
        masters = self.master_blocks or set()
        shared_tokens = shared_blocks = diff_slots = diff_phys = 0
        ids = [e.token_ids for e in encoded.values()]
        common = min((len(x) for x in ids), default=0)
        for x in ids[1:]:
            common = min(common, next((k for k, (a, b) in enumerate(zip(ids[0], x)) if a != b), len(x)))
        first_span = min((e.spans[0].start for e in encoded.values() if e.spans), default=common)
        prefix = (min(common, first_span) // bs) * bs if len(ids) > 1 else 0
        distinct = {s.key: s.length for e in encoded.values() for s in e.spans}
        bound = prefix // bs + sum(math.ceil(n / bs) for n in distinct.values())
        for agent, e in encoded.items():
            spans = e.spans
            bound += math.ceil((len(e.token_ids) - prefix - sum(s.length for s in spans)) / bs)
            views = self.prefill_views.get(agent, [])  # in position order, as are the spans
            private_blocks = set()
            first = 0
            for s in spans:
                shared_tokens += s.length
                shared_blocks += math.ceil(s.length / bs)
                while first < len(views) and views[first].end <= s.start:
                    first += 1
                k = first
                while k < len(views) and views[k].pos0 < s.end:
                    v = views[k]
                    x, y = max(s.start, v.pos0), min(s.end, v.end)
                    if x < y and v.block not in masters:
                        diff_slots += y - x
                        private_blocks.add(v.block)
                    k += 1
            diff_phys += len(private_blocks)
        return {"shared_tokens": shared_tokens, "shared_blocks": shared_blocks, "diff_slots": diff_slots,
                "diff_phys_blocks": diff_phys, "bound_blocks": bound, "common_prefix_blocks": prefix // bs}


def run_workload(backend: Backend, cfg: Config, wl: Workload, kv_blocks: int, max_batched: int,
                 reference: list[RoundRecord] | None = None, probe: bool = False,
                 capture: bool = False, last_round_tokens: int | None = None) -> list[RoundRecord]:
    """Every round of `wl` on a fresh engine; forced to `reference`'s outputs when given.

    `last_round_tokens` shortens the outputs of the last round (no later round gathers them)."""
    driver = Driver(backend, probe=probe, capture=capture)
    llm = driver.llm = backend.make(cfg, kv_blocks, max(64, wl.cfg.agents + 8), max_batched, sampler=driver.sample)
    outputs: dict = {}
    records = []
    for r in range(wl.cfg.rounds):
        forced = reference[r].outputs if reference is not None else None
        last = r == wl.cfg.rounds - 1 and r > 0
        records.append(driver.run_round(wl, r, outputs, forced, last_round_tokens if last else None))
    llm.release_round_outputs()
    return records


def kv_blocks_needed(wl: Workload, tokenizer, block_size: int) -> int:
    """A pool that holds the largest round densely, plus pinned outputs and shared blocks."""
    rows = prompt_lengths(wl, tokenizer, longest=True)
    hi = wl.cfg.output_tokens[1]
    worst = 0
    for r in range(wl.cfg.rounds):
        dense = sum(math.ceil(total / block_size) + 2 for rr, _, _, total in rows if rr == r)
        worst = max(worst, dense)
    extra = wl.cfg.agents * (math.ceil(hi / block_size) + 2) + wl.cfg.tools * (math.ceil(wl.cfg.tool_tokens / block_size) + 2)
    extra += 2 * (math.ceil(wl.cfg.broadcast_tokens / block_size) + 2)
    return int(worst * 1.1) + extra + 64


# ---------------------------------------------------------------------- summarizing


def summarize(records: list[RoundRecord], backend: Backend, ref: list[RoundRecord] | None) -> dict:
    """One config's row: the last round's accounting, whole-run totals, fidelity over rounds >= 1."""
    last = records[-1]
    s = last.stats
    n = max(s["agents"], 1)
    bb = last.block_bytes
    scale = backend.real_block_bytes / bb
    m = last.mirror
    row = {
        "agents": s["agents"], "prompt_tokens": s["prompt_tokens"],
        "distinct_blocks": s["distinct_kv_bytes"] // bb,
        "kv_bytes_per_agent": s["distinct_kv_bytes"] * scale / n,
        "private_bytes_per_agent": s["private_kv_bytes_mean"] * scale,
        "distinct_kv_bytes": s["distinct_kv_bytes"] * scale,
        "dense_kv_bytes": s["dense_kv_bytes"] * scale,
        "compression": s["compression"], "compression_bound": s["dense_kv_bytes"] / bb / max(m["bound_blocks"], 1),
        "engine_compression_bound": s["compression_bound"], "bound_blocks": m["bound_blocks"],
        "mirror": s["mirror_compression_blocks"],
        "mirror_phys": m["shared_blocks"] / m["diff_phys_blocks"] if m["diff_phys_blocks"] else None,
        "mirror_slots": m["shared_tokens"] / m["diff_slots"] if m["diff_slots"] else None,
        "diff_blocks": s["diff_blocks"], "mirror_accounting": m,
        "prefill_tokens_computed": s["prefill_tokens_computed"], "prefill_tokens_recomputed":
            s["prefill_tokens_recomputed"], "prefill_token_layers": s["prefill_token_layers"],
        "prefill_seconds": s["prefill_seconds"], "round_seconds": s["round_seconds"],
        "collector_seconds": s["collector_seconds"],
        "run_prefill_tokens_computed": sum(r.stats["prefill_tokens_computed"] for r in records),
        "run_seconds": sum(r.seconds for r in records),
        "preemptions": sum(r.preemptions for r in records),
    }
    if ref is not None and not backend.dry:
        row.update(fidelity_rows(records, ref))
    return row


def fidelity_rows(records: list[RoundRecord], ref: list[RoundRecord]) -> dict:
    """Fidelity vs the reference over rounds >= 1 (and per round), on identical inputs."""
    def pack(recs, use_choices):
        firsts, ids, lps = [], [], []
        for rec in recs:
            for a in rec.agents:
                seq = rec.choices.get(a, []) if use_choices else rec.outputs[a]
                firsts.append(seq[0] if seq else None)
                ids.append(seq)
                lps.append(rec.first_logprobs[a])
        return {"first_tokens": firsts, "round1_ids": ids, "logprobs": lps}

    out = {}
    per_round = []
    for rec, rrec in zip(records, ref):
        agree, exact, kl, _ = fidelity(pack([rec], True), pack([rrec], False))
        per_round.append({"round": rec.round, "agree": agree, "exact": exact, "kl": max(kl, 0.0)})
    gather = [(a, b) for a, b in zip(records, ref) if a.round >= 1] or list(zip(records, ref))
    mine, theirs = pack([a for a, _ in gather], True), pack([b for _, b in gather], False)
    agree, exact, kl, kls = fidelity(mine, theirs)
    out.update(agree=agree, exact=exact, kl=max(kl, 0.0), fidelity_per_round=per_round)  # -0.0 from rounding
    # [round, agent, first token agrees, KL] per gathered request: for means over a subset of agents.
    pairs = [(rec.round, a) for rec, _ in gather for a in rec.agents]
    out["fidelity_per_agent"] = [[r, a, mine["first_tokens"][k] == theirs["first_tokens"][k], kls[k]]
                                 for k, (r, a) in enumerate(pairs)]
    return out


def nonref_fidelity(results: dict) -> None:
    """Reference agents (master="agent") are exact, so means over all agents flatter that source:
    add to every row its agreement and KL over the (round, agent) pairs no row made a reference."""
    refs = {(rd["round"], a) for r in results.values() for rd in r["rounds"] for a in rd.get("reference_agents", [])}
    for r in results.values():
        kept = [x for x in r.get("fidelity_per_agent", []) if (x[0], x[1]) not in refs]
        r["reference_pairs"] = sorted(refs)
        r["agree_nonref"] = sum(x[2] for x in kept) / len(kept) if kept else None
        r["kl_nonref"] = max(sum(x[3] for x in kept) / len(kept), 0.0) if kept else None


# ---------------------------------------------------------------------- sections


def fmt(x, spec=".2f", none="-"):
    return none if x is None else format(x, spec)


def run_configs(backend, configs, wl, kv_blocks, max_batched, log, capture=True, ref=None, last_round_tokens=None):
    """Run each config on `wl`; none first, it is the fidelity reference (or `ref`, none's records).

    Returns (rows by label, the reference records)."""
    results = {}
    ordered = sorted(configs, key=lambda c: c.reuse != "none")
    for cfg in ordered:
        t0 = time.perf_counter()
        forced = ref if (not backend.dry and cfg.reuse != "none") else None
        recs = run_workload(backend, cfg, wl, kv_blocks, max_batched, reference=forced,
                            capture=capture and not backend.dry, last_round_tokens=last_round_tokens)
        if cfg.reuse == "none" and ref is None:
            ref = recs
        row = summarize(recs, backend, ref if capture else None)
        row["config"], row["params"] = cfg.label, cfg.__dict__.copy()
        row["rounds"] = [{"round": r.round, "agents": len(r.agents), "stats": r.stats,
                          "preemptions": r.preemptions, "peak_running": r.peak_running, "mirror": r.mirror,
                          "reference_agents": [r.agents[i] for i in r.stats.get("reference_agents", [])],
                          "seconds": None if backend.dry else r.seconds} for r in recs]
        row["wall_seconds"] = time.perf_counter() - t0
        results[cfg.label] = row
        log(f"  {wl.cfg.name} N={wl.cfg.agents} {cfg.label}: "
            + ("done" if backend.dry else f"{row['wall_seconds']:.1f} s (last round {row['round_seconds']:.1f} s)"))
    nonref_fidelity(results)
    return results, ref


def print_main(results: dict, dry: bool, title: str) -> None:
    print(f"\n{title}")
    cols = [("config", 26, "s"), ("KV/agent MiB", 12, ".2f"), ("priv MiB", 8, ".2f"), ("compr", 6, ".2f"),
            ("bound", 6, ".2f"), ("mirror", 6, ".1f"), ("phys", 5, ".1f"), ("slots", 6, ".1f"),
            ("computed", 8, "d"), ("tok-layers", 10, "d")]
    if not dry:
        cols += [("prefill s", 9, ".2f"), ("round s", 8, ".2f"), ("agree", 6, ".2f"), ("exact", 6, ".2f"),
                 ("KL", 7, ".4f"), ("agr-nr", 6, ".2f"), ("KL-nr", 7, ".4f")]
    cols += [("preempt", 7, "d")]
    header = " ".join(f"{c:>{w}}" if i else f"{c:<{w}}" for i, (c, w, _) in enumerate(cols))
    print(header)
    print("-" * len(header))
    for label, r in results.items():
        vals = [label, r["kv_bytes_per_agent"] / 2**20, r["private_bytes_per_agent"] / 2**20, r["compression"],
                r["compression_bound"], r["mirror"], r["mirror_phys"] if r["params"]["reuse"] in ("pic", "tokendance") else None,
                r["mirror_slots"] if r["params"]["reuse"] in ("pic", "tokendance") else None,
                r["prefill_tokens_computed"], r["prefill_token_layers"]]
        if not dry:
            vals += [r["prefill_seconds"], r["round_seconds"], r.get("agree"), r.get("exact"), r.get("kl"),
                     r.get("agree_nonref"), r.get("kl_nonref")]
        vals += [r["preemptions"]]
        cells = []
        for i, ((c, w, spec), v) in enumerate(zip(cols, vals)):
            if i == 0:
                cells.append(f"{v:<{w}}")
            else:
                cells.append(f"{fmt(v, spec):>{w}}")
        print(" ".join(cells))


def concurrency(backend, configs, base_cfg, budgets, cap, max_batched, log) -> dict:
    """{label: {budget: (served N, probes)}} by doubling then binary search over N."""
    out: dict = {}
    for cfg in configs:
        out[cfg.label] = {}
        for budget in budgets:
            cache: dict[int, tuple[bool, str]] = {}

            def served(n: int) -> bool:
                if n not in cache:
                    wl = Workload(preset(base_cfg.name, **{**_overrides(base_cfg), "agents": n}))
                    try:
                        recs = run_workload(backend, cfg, wl, budget, max_batched, probe=True)
                        ok = all(r.preemptions == 0 and r.peak_running == len(r.agents) for r in recs)
                        cache[n] = (ok, "ok" if ok else "not resident")
                    except ProbeFailed as e:
                        cache[n] = (False, str(e))
                    except Exception as e:  # noqa: BLE001 - capacity errors, requests that cannot fit
                        cache[n] = (False, f"{type(e).__name__}: {str(e)[:80]}")
                return cache[n][0]

            best = _largest_served(served, cap)
            out[cfg.label][budget] = {"served": best, "probes": {n: why for n, (_, why) in sorted(cache.items())}}
            log(f"  concurrency {cfg.label} budget {budget}: {best} agents ({len(cache)} probes)")
    return out


def _largest_served(served, cap: int) -> int:
    lo, hi = 0, None  # served(lo) holds (0 trivially); served(hi) fails
    n = 1
    while n <= cap:
        if served(n):
            lo = n
            n *= 2
        else:
            hi = n
            break
    if hi is None:
        if lo < cap and served(cap):
            return cap
        hi = min(cap, n) if lo < cap else cap + 1
        if lo == cap:
            return cap
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if served(mid):
            lo = mid
        else:
            hi = mid
    return lo


def _overrides(cfg) -> dict:
    """The fields of `cfg` that differ from its preset (so probes at other N keep them)."""
    base = PRESETS[cfg.name]
    return {k: getattr(cfg, k) for k in cfg.__dataclass_fields__ if getattr(cfg, k) != getattr(base, k)}


# ---------------------------------------------------------------------- plots


def make_plots(result: dict, folder: Path, stem: str) -> list[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    dry = result["meta"]["dry_run"]
    tag = " (dry run: accounting)" if dry else ""
    sweep = result.get("agents_sweep") or {}
    if sweep:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for label, points in sweep.items():
            ns = sorted(points, key=int)
            ax.plot([int(n) for n in ns], [points[n]["distinct_kv_bytes"] / 2**20 for n in ns], "o-", label=label)
        ax.set_xlabel("agents")
        ax.set_ylabel("distinct KV of the last round, MiB")
        ax.set_title(f"{result['meta']['preset']}: KV bytes vs agents{tag}")
        ax.legend(fontsize=8)
        written.append(_save(fig, plt, folder / f"{stem}_kv_vs_agents.png"))
        if not dry:
            fig, ax = plt.subplots(figsize=(7, 4.5))
            for label, points in sweep.items():
                ns = sorted(points, key=int)
                ax.plot([int(n) for n in ns], [points[n]["prefill_seconds"] for n in ns], "o-", label=label)
            ax.set_xlabel("agents")
            ax.set_ylabel("prefill seconds of the last round")
            ax.set_title(f"{result['meta']['preset']}: prefill time vs agents")
            ax.legend(fontsize=8)
            written.append(_save(fig, plt, folder / f"{stem}_prefill_vs_agents.png"))
    conc = result.get("concurrency") or {}
    if conc:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for label, by_budget in conc.items():
            bs = sorted(by_budget, key=int)
            ax.plot([int(b) * result["meta"]["real_block_bytes"] / 2**30 for b in bs],
                    [by_budget[b]["served"] for b in bs], "o-", label=label)
        ax.set_xlabel(f"KV budget, GiB of the default model at {result['meta']['dtype']}")
        ax.set_ylabel("agents served (no preemption, all resident)")
        ax.set_title(f"{result['meta']['preset']}: agents served vs KV budget{tag}")
        ax.legend(fontsize=8)
        written.append(_save(fig, plt, folder / f"{stem}_served_vs_budget.png"))
    ratios = {k: r for k, r in {**result["main"], **(result.get("ratio_sweep") or {})}.items()
              if r["params"]["reuse"] in ("pic", "tokendance") and r.get("kl") is not None}
    if len(ratios) > 2 and not dry:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        groups: dict[str, list] = {}
        for label, row in ratios.items():
            p = row["params"]
            groups.setdefault(f"{p['reuse']} {p['scheme']}" + (f" {p['master']}" if p["master"] != "producer" else ""),
                              []).append(row)
        for (key, rows), style in zip(groups.items(), ("o-", "s--", "^:", "d-.", "v-", "x--")):
            rows.sort(key=lambda r: r["params"]["ratio"])
            ax.plot([r["params"]["ratio"] for r in rows], [r["kl"] for r in rows], style, label=key, ms=8, alpha=0.8)
        ax.set_xlabel("recompute ratio")
        ax.set_ylabel("first-token KL(none || config), nats (rounds >= 1)")
        ax.set_title(f"{result['meta']['preset']}: fidelity vs recompute ratio")
        ax.legend(fontsize=8)
        written.append(_save(fig, plt, folder / f"{stem}_fidelity_vs_ratio.png"))
    return written


def _save(fig, plt, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


# ---------------------------------------------------------------------- goals


def goals(result: dict) -> list[str]:
    lines = []
    main = result["main"]
    td_labels = [k for k, r in {**main, **(result.get("ratio_sweep") or {})}.items()
                 if r["params"]["reuse"] == "tokendance"]
    conc = result.get("concurrency") or {}
    if "prefix" in conc:
        for label in [k for k in conc if conc[k] and k != "prefix" and k != "none"]:
            parts = []
            for b, v in conc[label].items():
                p = conc["prefix"].get(b, {}).get("served", 0)
                parts.append(f"{b} blocks: {v['served']} vs {p} ({v['served'] / p:.2f}x)" if p else
                             f"{b} blocks: {v['served']} vs {p}")
            best = max((v["served"] / conc["prefix"][b]["served"] for b, v in conc[label].items()
                        if conc["prefix"].get(b, {}).get("served")), default=0)
            lines.append(f"agents served vs prefix at equal KV, {label}: {'; '.join(parts)} -> best {best:.2f}x "
                         f"(goal >= {GOALS['agents_vs_prefix']}x: {'MET' if best >= GOALS['agents_vs_prefix'] else 'not met'})")
    else:
        lines.append("agents served vs prefix: not measured in this run (use --budgets)")
    rows = {**main, **(result.get("ratio_sweep") or {})}
    pic_default = main.get("pic")
    prefix = main.get("prefix")
    for label in td_labels:
        r = rows[label]
        if r["mirror"] is None:
            continue
        fid = ""
        if pic_default is not None and r.get("kl") is not None and pic_default.get("kl") is not None:
            ok = r["kl"] <= pic_default["kl"] + KL_TOLERANCE
            fid = f", KL {r['kl']:.4f} vs pic default {pic_default['kl']:.4f} ({'no worse' if ok else 'WORSE'})"
        elif result["meta"]["dry_run"]:
            fid = ", fidelity not measured (dry run)"
        red = ""
        if prefix is not None:
            red_v = prefix["distinct_kv_bytes"] / r["distinct_kv_bytes"]
            bound = prefix["distinct_blocks"] / max(r["bound_blocks"], 1e-9)
            red = f"; whole-cache per-agent reduction vs prefix {red_v:.2f}x (bound {bound:.2f}x)"
        met = r["mirror"] >= GOALS["mirror_compression"]
        verdict = ("the goal is for the stress preset" if result["meta"]["preset"] != "stress" else
                   f"goal >= {GOALS['mirror_compression']}x: {'MET' if met else 'not met'}")
        lines.append(f"mirror compression {label}: {r['mirror']:.1f}x (phys {fmt(r['mirror_phys'], '.1f')}x, slots "
                     f"{fmt(r['mirror_slots'], '.1f')}x){fid}{red} ({verdict})")
    if not result["meta"]["dry_run"] and pic_default is not None:
        for label in td_labels:
            r = rows[label]
            sp = pic_default["prefill_seconds"] / max(r["prefill_seconds"], 1e-9)
            work = pic_default["prefill_token_layers"] / max(r["prefill_token_layers"], 1)
            lines.append(f"prefill speedup vs pic, {label}: {sp:.2f}x ({pic_default['prefill_seconds']:.2f} s vs "
                         f"{r['prefill_seconds']:.2f} s; pic / config token-layers {work:.2f}) (goal >= "
                         f"{GOALS['prefill_speedup_vs_pic']}x: {'MET' if sp >= GOALS['prefill_speedup_vs_pic'] else 'not met'})")
    elif result["meta"]["dry_run"]:
        lines.append("prefill speed vs pic: not measured (dry run: no wall times)")
    return lines


# ---------------------------------------------------------------------- main


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="bench/suite.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="debate", choices=sorted(PRESETS))
    ap.add_argument("--agents", type=int, default=None, help="agents (default: the preset's)")
    ap.add_argument("--rounds", type=int, default=None, help="rounds (default: the preset's)")
    ap.add_argument("--output-tokens", default=None, help="output length LO:HI or N (default: the preset's)")
    ap.add_argument("--last-round-tokens", type=int, default=None,
                    help="output length of the last round (nobody gathers it; fidelity is over these tokens)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--configs", default="none,prefix,pic,tokendance",
                    help="comma list: none | prefix | pic[:scheme:ratio] | tokendance[:scheme:ratio[:master]]")
    ap.add_argument("--ratios", default="", help="recompute ratios to sweep (tokendance per --schemes, and pic)")
    ap.add_argument("--schemes", default="block", help="tokendance schemes for --ratios (block,first,token)")
    ap.add_argument("--agents-sweep", default="", help="comma list of N: KV and latency vs agents")
    ap.add_argument("--budgets", default="", help="comma list of KV budgets in blocks: concurrency search")
    ap.add_argument("--max-agents", type=int, default=256, help="upper end of the concurrency search")
    ap.add_argument("--dry-run", action="store_true", help="accounting only (see the module docstring)")
    ap.add_argument("--dtype", default="float32", help="model dtype of real runs; KV bytes use it (default float32)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--kv-cache-blocks", type=int, default=None, help="pool of the main runs (default: ample)")
    ap.add_argument("--block-size", type=int, default=16, help="KV block size in tokens (default 16)")
    ap.add_argument("--max-batched-tokens", type=int, default=2048, help="token budget per step of the main runs")
    ap.add_argument("--replot", type=Path, default=None, help="only redo goals and plots from a result JSON")
    ap.add_argument("--tag", default="", help="suffix of the output file names (several runs of one preset)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"folder for JSON and plots (default {DEFAULT_OUT})")
    args = ap.parse_args(argv)
    try:
        args.config_list = [parse_config(c) for c in args.configs.split(",") if c.strip()]
        args.ratio_list = [float(x) for x in args.ratios.split(",") if x.strip()]
        args.sweep_list = sorted({int(x) for x in args.agents_sweep.split(",") if x.strip()})
        args.budget_list = sorted({int(x) for x in args.budgets.split(",") if x.strip()})
        args.scheme_list = [s.strip() for s in args.schemes.split(",") if s.strip()]
        if args.output_tokens:
            lo, _, hi = args.output_tokens.partition(":")
            args.output_range = (int(lo), int(hi or lo))
        else:
            args.output_range = None
    except ValueError as e:
        ap.error(str(e))
    if not args.config_list:
        ap.error("--configs is empty")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.replot is not None:
        return replot(args.replot)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    overrides = {"seed": args.seed}
    if args.agents:
        overrides["agents"] = args.agents
    if args.rounds:
        overrides["rounds"] = args.rounds
    if args.output_range:
        overrides["output_tokens"] = args.output_range
    wl_cfg = preset(args.preset, **overrides)
    wl = Workload(wl_cfg)
    backend = Backend(args.dry_run, args.dtype, block_size=args.block_size)
    t_start = time.perf_counter()
    dry = args.dry_run

    def log(msg):
        print(msg, flush=True)

    if dry:
        log(DRY_BANNER)
    lengths = prompt_lengths(wl, backend.tokenizer, longest=True)
    too_long = [x for x in lengths if x[3] > backend.context]
    if too_long:
        raise SystemExit(f"{len(too_long)} prompts (+ outputs) exceed the context of {backend.context} tokens, "
                         f"e.g. round {too_long[0][0]} agent {too_long[0][1]}: {too_long[0][3]}")
    kv_blocks = args.kv_cache_blocks or kv_blocks_needed(wl, backend.tokenizer, backend.block_size)
    log(f"workload {wl.describe()}")
    with contextlib.ExitStack() as stack:
        stack.callback(backend.close)
        lrt = args.last_round_tokens
        main_rows, ref = run_configs(backend, args.config_list, wl, kv_blocks, args.max_batched_tokens, log,
                                     last_round_tokens=lrt)
        ratio_rows = {}
        if args.ratio_list:
            sweep_cfgs = []
            for ratio in args.ratio_list:
                for scheme in args.scheme_list:
                    sweep_cfgs.append(Config("tokendance", scheme, ratio))
                sweep_cfgs.append(Config("pic", "block", ratio))
            todo = [c for c in sweep_cfgs if c.label not in main_rows]
            if ref is None and not dry:
                todo = [Config("none")] + todo  # the fidelity reference
            got, ref = run_configs(backend, todo, wl, kv_blocks, args.max_batched_tokens, log, ref=ref,
                                   last_round_tokens=lrt)
            # A sweep point that is a main config reuses its run (same engine settings).
            for c in sweep_cfgs:
                ratio_rows[c.label] = main_rows.get(c.label) or got[c.label]
        sweep: dict = {}
        for n in args.sweep_list:
            if n == wl_cfg.agents:
                rows = main_rows
            else:
                wl_n = Workload(preset(args.preset, **{**overrides, "agents": n}))
                kv_n = args.kv_cache_blocks or kv_blocks_needed(wl_n, backend.tokenizer, backend.block_size)
                rows, _ = run_configs(backend, args.config_list, wl_n, kv_n, args.max_batched_tokens, log,
                                      capture=False, last_round_tokens=lrt)
            for label, r in rows.items():
                sweep.setdefault(label, {})[str(n)] = {
                    k: r[k] for k in ("distinct_kv_bytes", "kv_bytes_per_agent", "compression", "prefill_seconds",
                                      "round_seconds", "prefill_tokens_computed", "prefill_token_layers")}
                if dry:
                    sweep[label][str(n)].update(prefill_seconds=None, round_seconds=None)
        conc = {}
        if args.budget_list:
            conc = concurrency(backend, args.config_list, wl_cfg, args.budget_list, args.max_agents, 1 << 20, log)
    total_s = time.perf_counter() - t_start

    command = "python bench/suite.py " + shlex.join(argv)
    meta = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "torch": torch.__version__,
            "python": platform.python_version(), "threads": torch.get_num_threads(), "cpu": cpu_model(),
            "cpu_count": os.cpu_count(), "dtype": args.dtype, "dry_run": dry, "preset": args.preset,
            "workload": wl.describe(), "workload_config": {k: getattr(wl_cfg, k) for k in wl_cfg.__dataclass_fields__},
            "kv_cache_blocks": kv_blocks, "real_block_bytes": backend.real_block_bytes,
            "max_batched_tokens": args.max_batched_tokens, "last_round_tokens": args.last_round_tokens,
            "block_size": args.block_size, "total_seconds": total_s, "command": command}
    if dry:
        for rows in (main_rows, ratio_rows):
            for r in rows.values():
                for k in ("prefill_seconds", "round_seconds", "collector_seconds", "run_seconds", "wall_seconds"):
                    r[k] = None
    result = {"meta": meta, "main": main_rows, "ratio_sweep": ratio_rows, "agents_sweep": sweep,
              "concurrency": {label: {str(b): v for b, v in d.items()} for label, d in conc.items()}}

    print()
    if dry:
        print(DRY_BANNER)
    print(f"date {meta['date']}  cpu {meta['cpu']} ({meta['cpu_count']} cores, {meta['threads']} threads)  "
          f"torch {meta['torch']}  dtype {args.dtype}" + ("" if dry else f"  total {total_s:.1f} s"))
    print(f"command: {command}")
    print(f"workload: {wl.describe()}" + (f"; last round outputs {args.last_round_tokens} tokens"
                                           if args.last_round_tokens else ""))
    print(f"KV pool of the main runs: {kv_blocks} blocks; KV bytes are the default model's at {args.dtype} "
          f"({backend.real_block_bytes} bytes per {backend.block_size}-token block)")
    print_main(main_rows, dry, f"1. every config at N={wl_cfg.agents}, last round (round {wl_cfg.rounds})")
    print("KV/agent: distinct KV of the round / agents; priv: blocks only that agent references; compr: dense / "
          "distinct; bound: best compression the private tokens allow; mirror/phys/slots: mirror compression "
          "(engine diff blocks / whole private blocks / tokens); computed: prefill positions; tok-layers: "
          "positions x layers + collector analysis" + ("" if dry else "; agree/exact/KL: fidelity vs none over "
                                                       "rounds >= 1, teacher-forced to none's outputs"))
    if ratio_rows:
        print_main(ratio_rows, dry, "2. recompute ratio sweep (last round)")
    if sweep:
        print("\n3. agents sweep (last round): distinct KV MiB" + ("" if dry else " / prefill s / round s"))
        ns = sorted({int(n) for pts in sweep.values() for n in pts})
        print(f"{'config':<26} " + " ".join(f"{'N=' + str(n):>20}" for n in ns))
        for label, pts in sweep.items():
            cells = []
            for n in ns:
                p = pts.get(str(n))
                if p is None:
                    cells.append(f"{'-':>20}")
                elif dry:
                    cells.append(f"{p['distinct_kv_bytes'] / 2**20:>20.1f}")
                else:
                    cells.append(f"{p['distinct_kv_bytes'] / 2**20:>7.1f}/{p['prefill_seconds']:>5.1f}/"
                                 f"{p['round_seconds']:>5.1f}".rjust(20))
            print(f"{label:<26} " + " ".join(cells))
    if conc:
        print(f"\n4. concurrency: largest N served in every round without preemption, all agents resident "
              f"(rounds {wl_cfg.rounds})")
        budgets = args.budget_list
        print(f"{'config':<26} " + " ".join(f"{str(b) + ' blk':>12}" for b in budgets))
        print(f"{'(GiB)':<26} " + " ".join(f"{b * backend.real_block_bytes / 2**30:>12.2f}" for b in budgets))
        for label, d in conc.items():
            print(f"{label:<26} " + " ".join(f"{d[b]['served']:>12}" for b in budgets))
    print("\n5. goals")
    for line in goals(result):
        print("  " + line)
    stem = args.preset + ("-dry" if dry else "") + (f"-{args.tag}" if args.tag else "")
    plots = make_plots(result, args.out, stem)
    result["plots"] = plots
    for p in plots:
        print(f"wrote {p}")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{stem}.json"
    path.write_text(json.dumps(result, indent=1, default=_json_default) + "\n")
    print(f"wrote {path}")
    if dry:
        print(DRY_BANNER)
    return 0


def replot(path: Path) -> int:
    """Goals and plots again from a JSON this script wrote (no engine runs)."""
    result = json.loads(path.read_text())
    print(f"{path}: {result['meta']['command']} ({result['meta']['date']})")
    for line in goals(result):
        print("  " + line)
    for p in make_plots(result, path.parent, path.stem):
        print(f"wrote {p}")
    return 0


def _json_default(x):
    if isinstance(x, torch.Tensor):
        return None
    if isinstance(x, (set, tuple)):
        return list(x)
    return str(x)


if __name__ == "__main__":
    sys.exit(main())
