"""Soak: random rounds, reuse modes and pool sizes for a bounded time, checking that nothing leaks.

    python bench/soak.py                  # 10 minutes
    python bench/soak.py --minutes 1 --seed 3

A tiny random Llama (2 layers, hidden 64, vocab 256, no tokenizer; written to a temporary folder,
no download) is served by a stream of engines, each with a random configuration: reuse mode
(none / prefix / pic / tokendance, with a random recompute ratio, scheme and master source),
block size, pool size (from too small for some requests to roomy), step budget, max_num_seqs and
max_model_len. Each engine runs a session of random rounds: 1-8 agents, some persistent (their
next prompt extends their history), prompts carrying random subsets of the previous round's
outputs and a fresh common block as `Shared`, greedy or seeded sampling, random aborts from the
`on_step` hook, and, between rounds, provoked errors: invalid prompts, sampling params, rounds
and engine options, a broken model folder, a `Shared` output of an engine that is gone, a
failing `on_step` callback, a call made from `on_step`, prompts too long for `max_model_len`
or the pool.

Checked: every provoked error raises the expected class (and leaves the pool as it was, for
invalid requests); the pool's invariants (`LLM.check_invariants`: every ref count equals the
references held) after every engine step and every round; after each session, releasing every
agent and pinned output frees every block (`blocks leaked` counts the ones that stayed) and
resetting the prefix cache empties the pool. Any other exception is an unexpected error.

Prints a progress line every `--progress-seconds` and a final summary: rounds, requests
(finished / aborted / failed for capacity), preemptions, errors provoked and caught by type,
blocks leaked, invariant violations, unexpected errors. Exit code 1 if any block leaked, any
invariant broke, or any unexpected error happened. `main(argv)` returns that code (the smoke
test calls it).
"""
from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import random
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from nanodance import LLM, SamplingParams, Shared  # noqa: E402
from nanodance.errors import CapacityError, ModelLoadError, RequestError  # noqa: E402
from nanodance.segments import output_block_ids  # noqa: E402

VOCAB = 256
MODES = ("none", "prefix", "pic", "tokendance")
FINISH_REASONS = ("stop", "length", "abort", "error")


class InjectedFailure(Exception):
    """Raised by the soak's own `on_step` callback to simulate a failing application."""


# --- the tiny model ------------------------------------------------------------------------------

def write_tiny_llama(folder: Path, seed: int) -> Path:
    """A random Llama checkpoint (config.json + model.safetensors), without transformers."""
    hidden, layers, heads, kv_heads, head_dim, inter = 64, 2, 4, 2, 16, 128
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
              "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
              "head_dim": head_dim, "intermediate_size": inter, "vocab_size": VOCAB, "rms_norm_eps": 1e-6,
              "rope_theta": 10000.0, "max_position_embeddings": 1024, "bos_token_id": 1, "eos_token_id": 2,
              "tie_word_embeddings": False}
    g = torch.Generator().manual_seed(seed)

    def matrix(rows, cols):
        return 0.15 * torch.randn(rows, cols, generator=g)

    def norm():
        return 1.0 + 0.3 * (2 * torch.rand(hidden, generator=g) - 1)

    tensors = {"model.embed_tokens.weight": matrix(VOCAB, hidden), "model.norm.weight": norm(),
               "lm_head.weight": matrix(VOCAB, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors.update({
            p + "input_layernorm.weight": norm(), p + "post_attention_layernorm.weight": norm(),
            p + "self_attn.q_proj.weight": matrix(heads * head_dim, hidden),
            p + "self_attn.k_proj.weight": matrix(kv_heads * head_dim, hidden),
            p + "self_attn.v_proj.weight": matrix(kv_heads * head_dim, hidden),
            p + "self_attn.o_proj.weight": matrix(hidden, heads * head_dim),
            p + "mlp.gate_proj.weight": matrix(inter, hidden), p + "mlp.up_proj.weight": matrix(inter, hidden),
            p + "mlp.down_proj.weight": matrix(hidden, inter)})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


# --- bookkeeping ----------------------------------------------------------------------------------

class Tally:
    def __init__(self):
        self.rounds = self.requests = self.finished = self.aborted = self.failed = self.preemptions = 0
        self.engines = collections.Counter()  # reuse mode -> engines built
        self.caught = collections.Counter()  # error class -> count
        self.caught_kinds = collections.Counter()  # "Class: what was provoked" -> count
        self.leaked = 0
        self.violations = 0
        self.unexpected = 0
        self.degraded = collections.Counter()  # kept caches dropped, outputs unpinned

    def catch(self, exc: BaseException, kind: str) -> None:
        name = type(exc).__name__
        self.caught[name] += 1
        self.caught_kinds[f"{name}: {kind}"] += 1

    def line(self, elapsed: float) -> str:
        return (f"[{elapsed:6.0f} s] rounds {self.rounds}  requests {self.requests}  errors caught "
                f"{sum(self.caught.values())}  leaked {self.leaked}  violations {self.violations}  "
                f"unexpected {self.unexpected}")

    def summary(self, elapsed: float, seed: int) -> str:
        modes = ", ".join(f"{m} {self.engines[m]}" for m in MODES)
        caught = ", ".join(f"{k} {v}" for k, v in sorted(self.caught.items())) or "none"
        kinds = "\n".join(f"    {v:6d}  {k}" for k, v in sorted(self.caught_kinds.items()))
        return (f"soak summary ({elapsed / 60:.1f} min, seed {seed}):\n"
                f"  rounds run: {self.rounds} on {sum(self.engines.values())} engines ({modes})\n"
                f"  requests: {self.requests} ({self.finished} finished, {self.aborted} aborted, "
                f"{self.failed} failed for capacity); preemptions: {self.preemptions}\n"
                f"  degraded under pressure: {self.degraded['kept_caches_dropped']} kept caches dropped, "
                f"{self.degraded['outputs_unpinned']} pinned outputs released\n"
                f"  errors provoked and caught: {sum(self.caught.values())} ({caught})\n{kinds}\n"
                f"  blocks leaked: {self.leaked}\n"
                f"  invariant violations: {self.violations}\n"
                f"  unexpected errors: {self.unexpected}")


class Violation(Exception):
    """An invariant broke (wraps the AssertionError from check_invariants or our own checks)."""


def check_pool(llm: LLM) -> None:
    try:
        llm.check_invariants()
        stats = llm.stats()
        assert stats["blocks_used"] + stats["blocks_free"] == stats["blocks_total"], "used + free != total"
    except AssertionError as e:
        raise Violation(str(e)) from e


# --- one engine's session ---------------------------------------------------------------------------

class Session:
    """One engine with a random configuration, driven through random rounds and provoked errors."""

    def __init__(self, rng: random.Random, folder: Path, broken_folder: Path, tally: Tally, foreign):
        self.rng, self.folder, self.broken, self.tally = rng, folder, broken_folder, tally
        self.foreign = foreign  # an output of an earlier engine (maybe collected by now)
        mode = rng.choice(MODES)
        block = rng.choice([4, 8, 16])
        pool_tokens = rng.choice([48, 96, 160, 256, 512, 2048])
        self.config = dict(reuse=mode, block_size=block, kv_cache_blocks=max(2, pool_tokens // block),
                           max_num_seqs=rng.choice([2, 4, 64]), max_num_batched_tokens=rng.choice([8, 32, 2048]),
                           max_model_len=rng.choice([None, 128, 512]))
        if mode in ("pic", "tokendance"):
            self.config.update(recompute_ratio=rng.choice([0.0, 0.15, 0.5, 1.0]),
                               recompute_scheme=rng.choice(["block", "first", "token"]),
                               master=rng.choice(["producer", "standalone"]), master_sink=rng.random() < 0.7)
        self.llm = LLM(folder, dtype="float32", device="cpu", **self.config)
        tally.engines[mode] += 1
        self.personas = [self.ids(rng.randint(1, 24)) for _ in range(8)]
        self.prev: list = []
        self.history: dict[str, list[int]] = {}
        self.last_output = None

    def ids(self, n: int) -> list[int]:
        return [self.rng.randrange(3, VOCAB) for _ in range(n)]

    def params(self) -> SamplingParams:
        rng = self.rng
        max_tokens = rng.randint(1, 24)
        if rng.random() < 0.7:
            return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=rng.random() < 0.8)
        return SamplingParams(temperature=1.0, top_p=rng.choice([1.0, 0.9]), top_k=rng.choice([-1, 20]),
                              max_tokens=max_tokens, seed=rng.randrange(1000))

    def on_step(self, abort_p: float, fail_at: int | None):
        llm, rng, steps = self.llm, self.rng, [0]

        def hook(outputs):
            steps[0] += 1
            check_pool(llm)
            if fail_at is not None and steps[0] == fail_at:
                raise InjectedFailure(f"the application's callback failed at step {fail_at}")
            for out in outputs:
                if out.finish_reason is None and rng.random() < abort_p:
                    llm.abort(out.request_id)
        return hook

    def run_round(self) -> None:
        rng, llm, tally = self.rng, self.llm, self.tally
        n = rng.randint(1, 8)
        common = Shared(self.ids(rng.randint(1, 40))) if rng.random() < 0.5 else None
        prompts, names = [], []
        for i in range(n):
            name = f"agent{i}" if rng.random() < 0.4 else None
            if name is not None and len(self.history.get(name, [])) > 160:
                llm.release_agent(name)  # long enough: start over
                self.history.pop(name)
            parts = [self.history.get(name) or self.personas[i]]
            others = [o for o in self.prev if output_block_ids(o)]  # Shared() refuses empty outputs
            parts += [Shared(o) for o in rng.sample(others, k=rng.randint(0, min(3, len(others))))]
            if common is not None and rng.random() < 0.7:
                parts.append(common)
            parts.append(self.ids(rng.randint(1, 6)))
            prompts.append(parts)
            names.append(name)
        params = [self.params() for _ in range(n)] if rng.random() < 0.5 else self.params()
        abort_p = rng.choice([0.0, 0.0, 0.01, 0.05])
        fail_at = rng.randint(1, 6) if rng.random() < 0.05 else None
        try:
            outs = llm.run_round(prompts, params, agents=names, use_tqdm=False, on_step=self.on_step(abort_p, fail_at))
        except InjectedFailure as e:
            tally.catch(e, "on_step raised mid-round (the call is aborted)")
            check_pool(llm)
            self.prev = []
            return
        except CapacityError as e:
            tally.catch(e, "a shared block too big to prefill beside the pool's other holders")
            check_pool(llm)
            self.prev = []
            return
        tally.rounds += 1
        tally.requests += n
        for name, out in zip(names, outs):
            assert out.finish_reason in FINISH_REASONS, out.finish_reason
            assert all(0 <= t < VOCAB for t in out.token_ids)
            tally.finished += out.finish_reason in ("stop", "length")
            tally.aborted += out.finish_reason == "abort"
            tally.failed += out.finish_reason == "error"
            if out.finish_reason == "error":
                assert out.error, "a failed request must say why"
            if name is not None and out.finish_reason in ("stop", "length"):
                self.history[name] = out.prompt_token_ids + out.token_ids
            elif name is not None:
                self.history.pop(name, None)
        self.prev = list(outs)
        self.last_output = outs[0]
        check_pool(llm)

    def provoke(self) -> None:
        """One invalid call; it must raise the expected class and leave the pool as it was."""
        rng, llm = self.rng, self.llm
        p = self.personas[0]
        cases = [
            (RequestError, "empty prompt", lambda: llm.generate([p, []], use_tqdm=False)),
            (RequestError, "token id outside the vocabulary", lambda: llm.generate([p + [VOCAB + 5]], use_tqdm=False)),
            (RequestError, "text prompt without a tokenizer", lambda: llm.generate(["hello"], use_tqdm=False)),
            (RequestError, "empty round", lambda: llm.run_round([], use_tqdm=False)),
            (RequestError, "Shared of an unsupported type", lambda: Shared(3.5)),
            (RequestError, "a segment of an unsupported type", lambda: llm.run_round([[p, {"x": 1}]], use_tqdm=False)),
            (RequestError, "duplicate persistent agent ids",
             lambda: llm.run_round([[p], [p]], agents=["dup", "dup"], use_tqdm=False)),
            (RequestError, "negative temperature", lambda: SamplingParams(temperature=-1)),
            (RequestError, "top_p outside (0, 1]", lambda: SamplingParams(top_p=0)),
            (RequestError, "top_k 0", lambda: SamplingParams(top_k=0)),
            (RequestError, "max_tokens < 1", lambda: SamplingParams(max_tokens=0)),
            (RequestError, "stop of the wrong type", lambda: SamplingParams(stop=7)),
            (RequestError, "sampling params changed after construction", lambda: llm.generate([p], self.changed())),
            (RequestError, "recompute_ratio outside [0, 1]",
             lambda: LLM(self.folder, dtype="float32", device="cpu", reuse="tokendance", recompute_ratio=1.5,
                         kv_cache_blocks=4)),
            (RequestError, "unknown reuse mode", lambda: LLM(self.folder, dtype="float32", device="cpu",
                                                             reuse="everything")),
            (ModelLoadError, "missing model folder", lambda: LLM(self.folder / "missing", device="cpu")),
            (ModelLoadError, "truncated safetensors", lambda: LLM(self.broken, device="cpu", kv_cache_blocks=4)),
            (RequestError, "a call made from on_step", self.reentrant_call),
        ]
        if self.foreign is not None:
            cases.append((RequestError, "Shared output of another engine",
                          lambda: llm.run_round([[p, Shared(self.foreign)]], use_tqdm=False)))
        expected, kind, call = rng.choice(cases)
        used, refs = llm.pool.num_used, [b.ref_count for b in llm.pool.blocks]
        try:
            call()
        except expected as e:
            if not str(e):
                raise AssertionError(f"{kind}: {type(e).__name__} without a message") from e
            self.tally.catch(e, kind)
        else:
            raise AssertionError(f"{kind}: no {expected.__name__} was raised")
        if kind != "a call made from on_step":
            if llm.pool.num_used != used or [b.ref_count for b in llm.pool.blocks] != refs:
                raise Violation(f"{kind}: the refused call changed the pool")
        check_pool(llm)

    def changed(self) -> SamplingParams:
        sp = SamplingParams(temperature=0.0, max_tokens=2)
        sp.top_p = 2.0
        return sp

    def reentrant_call(self) -> None:
        llm, caught = self.llm, []

        def hook(outputs):
            try:
                llm.generate([self.personas[1]], use_tqdm=False)
            except RequestError as e:
                caught.append(e)
                raise

        try:
            llm.generate([self.personas[0]], SamplingParams(temperature=0, max_tokens=2), use_tqdm=False, on_step=hook)
        except RequestError:
            if not caught:
                raise AssertionError("the nested call's RequestError did not come from on_step") from None
            raise

    def too_long(self) -> None:
        """A request longer than max_model_len / the pool fails alone; its companion completes."""
        llm = self.llm
        limit = min(llm.max_model_len, llm.pool.num_blocks * llm.pool.block_size)
        outs = llm.generate([self.ids(limit + 1), self.personas[2]], SamplingParams(temperature=0, max_tokens=3),
                            use_tqdm=False)
        if outs[0].finish_reason != "error" or not outs[0].error:
            raise AssertionError("a prompt longer than the engine's limit did not fail")
        self.tally.catch(CapacityError(outs[0].error), "prompt longer than max_model_len or the pool (fails alone)")
        self.tally.requests += 2
        self.tally.failed += 1
        self.tally.finished += outs[1].finish_reason in ("stop", "length")
        check_pool(llm)

    def close(self) -> None:
        """Release every agent and pinned output: no block may stay referenced."""
        llm = self.llm
        for name in list(self.history):
            llm.release_agent(name)
        for name in llm.agents.ids():
            llm.release_agent(name)
        llm.release_round_outputs()
        self.tally.leaked += llm.pool.num_used
        stats = llm.stats()
        self.tally.preemptions += stats["preemptions"]
        self.tally.degraded["kept_caches_dropped"] += stats["kept_caches_dropped"]
        self.tally.degraded["outputs_unpinned"] += stats["outputs_unpinned"]
        llm.reset_prefix_cache()
        if llm.pool.num_free != llm.pool.num_blocks:
            raise Violation(f"after release and reset, {llm.pool.num_blocks - llm.pool.num_free} blocks are not free")
        check_pool(llm)


# --- main ---------------------------------------------------------------------------------------

def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="bench/soak.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0, help="how long to run (default 10)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random workload (default 0)")
    ap.add_argument("--progress-seconds", type=float, default=30.0, help="seconds between progress lines")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else list(argv))
    # The engine warns on every degradation and failed request; the summary counts them instead.
    engine_logger = logging.getLogger("nanodance")
    level, threads = engine_logger.level, torch.get_num_threads()
    engine_logger.setLevel(logging.ERROR)
    torch.set_num_threads(1)
    try:
        return _soak(args)
    finally:
        engine_logger.setLevel(level)
        torch.set_num_threads(threads)


def _soak(args: argparse.Namespace) -> int:
    rng = random.Random(args.seed)
    tally = Tally()
    start = time.perf_counter()
    deadline = start + 60 * args.minutes
    next_progress = start + args.progress_seconds
    print(f"soak: {args.minutes:g} min, seed {args.seed}, torch {torch.__version__}, pid {os.getpid()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="nanodance-soak-") as tmp:
        folder = write_tiny_llama(Path(tmp) / "model", seed=args.seed)
        broken = Path(tmp) / "broken"
        shutil.copytree(folder, broken)
        weights = broken / "model.safetensors"
        os.truncate(weights, os.path.getsize(weights) // 2)
        foreign = None
        while time.perf_counter() < deadline:
            session = None
            try:
                session = Session(rng, folder, broken, tally, foreign)
                session.provoke()  # at least one per session, whatever the rolls below
                for _ in range(rng.randint(3, 12)):
                    if time.perf_counter() >= deadline:
                        break
                    roll = rng.random()
                    if roll < 0.15:
                        session.provoke()
                    elif roll < 0.2:
                        session.too_long()
                    else:
                        session.run_round()
                    if time.perf_counter() >= next_progress:
                        print(tally.line(time.perf_counter() - start), flush=True)
                        next_progress += args.progress_seconds
                session.close()
                foreign = session.last_output or foreign  # its engine is dropped: Shared(it) must be refused
            except Violation as e:
                tally.violations += 1
                print(f"INVARIANT VIOLATION ({session.config if session else '?'}): {e}", flush=True)
            except Exception as e:  # noqa: BLE001 - anything else is a bug the soak exists to find
                tally.unexpected += 1
                print(f"UNEXPECTED {type(e).__name__} ({session.config if session else '?'}): {e}", flush=True)
                traceback.print_exc()
    elapsed = time.perf_counter() - start
    print(tally.summary(elapsed, args.seed), flush=True)
    return 1 if tally.leaked or tally.violations or tally.unexpected else 0


if __name__ == "__main__":
    sys.exit(main())
