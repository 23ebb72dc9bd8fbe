"""Tensor parallelism's failures are clear and bounded (CPU, gloo, 2 ranks, a tiny checkpoint).

Specification:
- a worker killed between calls, or in the middle of one (from `on_step`), makes the next call
  raise `WorkerDiedError` (a `NanodanceError`) naming rank 1 and the signal, within seconds, never
  a hang (each test runs under an alarm); every worker is gone afterwards, the block pool holds
  nothing, and later calls raise `TensorParallelError` instead of touching the dead group;
- Ctrl-C in the middle of a call (the ranks are then out of step) shuts the workers down and
  stays a KeyboardInterrupt; later calls raise `TensorParallelError`;
- a checkpoint that cannot be loaded fails the start with its `ModelLoadError`, and no worker
  process nor process group is left behind;
- a garbage-collected LLM shuts its workers down; after `shutdown()` a call raises
  `TensorParallelError`, and a new tensor-parallel LLM can start in the same process;
- impossible splits are refused before any process starts or any weight loads, with the sizes
  that would work in the message: query heads not divisible, KV heads neither divisible nor a
  divisor, intermediate size not divisible, more ranks than GPUs; a size below 1 and an
  already-loaded model are refused too; the command line's `--tensor-parallel-size` gets the
  same refusal, as its one error line.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import multiprocessing
import os
import signal
import time

import pytest
import torch

from nanodance import LLM, SamplingParams
from nanodance.config import ModelConfig
from nanodance.errors import NanodanceError, RequestError, TensorParallelError, WorkerDiedError
from nanodance.executor import Executor
from nanodance.parallel import check_split
from tiny_checkpoints import random_ids, tiny_config, write_tiny_checkpoint

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

DEADLINE_S = 60  # any hang fails the test instead of the suite


@contextlib.contextmanager
def deadline(seconds: int = DEADLINE_S):
    def fire(signum, frame):
        raise TimeoutError(f"tensor-parallel test still running after {seconds} s: a hang")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path, _ = write_tiny_checkpoint(tmp_path_factory.mktemp("llama"), kind="llama", seed=5)
    return path


def start(folder) -> LLM:
    return LLM(folder, dtype="float32", device="cpu", block_size=4, kv_cache_blocks=64, tensor_parallel_size=2)


PROMPTS = [random_ids(12, 1), random_ids(7, 2)]
GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


def assert_down(llm: LLM, workers) -> None:
    assert not any(w.is_alive() for w in workers)
    assert llm.stats()["blocks_used"] == 0
    llm.check_invariants()
    with pytest.raises(TensorParallelError, match="shut down"):
        llm.generate(PROMPTS, GREEDY, use_tqdm=False)


def test_worker_killed_between_calls(folder):
    with deadline():
        llm = start(folder)
        assert len(llm.generate(PROMPTS, GREEDY, use_tqdm=False)[0].token_ids) == 6
        [worker] = llm._tp.processes
        os.kill(worker.pid, signal.SIGKILL)
        worker.join()
        t0 = time.monotonic()
        with pytest.raises(WorkerDiedError, match=r"rank 1 .*SIGKILL") as info:
            llm.generate(PROMPTS, GREEDY, use_tqdm=False)
        assert isinstance(info.value, NanodanceError)
        assert time.monotonic() - t0 < 10
        assert_down(llm, [worker])


def test_worker_killed_during_a_call(folder):
    with deadline():
        llm = start(folder)
        [worker] = llm._tp.processes

        def kill_once(outputs):
            if worker.is_alive():
                os.kill(worker.pid, signal.SIGKILL)  # not joined: the next step races its death

        with pytest.raises(WorkerDiedError, match="rank 1"):
            llm.generate(PROMPTS, GREEDY, use_tqdm=False, on_step=kill_once)
        assert_down(llm, [worker])


def test_ctrl_c_during_a_call_shuts_the_workers_down(folder, monkeypatch):
    with deadline():
        llm = start(folder)
        [worker] = llm._tp.processes
        calls = []

        def interrupted(self, *args):  # rank 0's own forward, after the workers got the step
            calls.append(1)
            raise KeyboardInterrupt

        monkeypatch.setattr(Executor, "forward", interrupted)
        with pytest.raises(KeyboardInterrupt):
            llm.generate(PROMPTS, GREEDY, use_tqdm=False)
        monkeypatch.undo()
        assert calls == [1]
        worker.join(10)
        assert_down(llm, [worker])


def test_garbage_collection_and_shutdown_stop_the_workers(folder):
    with deadline():
        llm = start(folder)
        workers = list(llm._tp.processes)
        del llm
        gc.collect()
        assert [w.exitcode for w in workers] == [0]
        llm = start(folder)  # the process group was left, so a new one can start
        workers = list(llm._tp.processes)
        llm.shutdown()
        assert [w.exitcode for w in workers] == [0]
        with pytest.raises(TensorParallelError, match="shutdown"):
            llm.generate(PROMPTS, GREEDY, use_tqdm=False)


def model_config(**changes) -> ModelConfig:
    """The tiny Llama's config with some of our fields changed (only the split is checked)."""
    return dataclasses.replace(ModelConfig.from_dict(tiny_config("llama").to_dict()), **changes)


@pytest.mark.parametrize("changes,world,problem,sizes", [
    (dict(), 3, "does not divide the model's 4 attention heads", "[1, 2, 4]"),
    (dict(num_heads=6, num_kv_heads=3, intermediate_size=192), 2, "neither divides the model's 3 KV heads",
     "[1, 3, 6]"),
    (dict(intermediate_size=130), 4, "does not divide the model's intermediate size 130", "[1, 2]"),
])
def test_bad_splits_are_refused_with_the_sizes_that_work(changes, world, problem, sizes):
    with pytest.raises(RequestError, match=problem) as info:
        check_split(model_config(**changes), world, torch.device("cpu"))
    assert str(info.value).endswith(f"this model splits over tensor_parallel_size in {sizes}")


def test_splits_that_work():
    cfg = model_config()  # 4 query heads, 2 KV heads, intermediate 128
    for world in (1, 2, 4):  # 4 ranks: each KV head replicated on two
        check_split(cfg, world, torch.device("cpu"))


@pytest.mark.skipif(torch.cuda.device_count() >= 2, reason="needs fewer than 2 GPUs")
def test_more_ranks_than_gpus_is_refused():
    with pytest.raises(RequestError, match=r"needs GPUs 0\.\.1, but \d+ are visible"):
        check_split(model_config(), 2, torch.device("cuda"))


def test_refused_before_anything_starts(tmp_path, folder):
    # A folder with a config.json and no weights: the refusal must come before loading them.
    cfg = tiny_config("llama").to_dict()
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(RequestError, match="attention heads"):
        LLM(tmp_path, device="cpu", tensor_parallel_size=3)
    with pytest.raises(RequestError, match="must be a positive int"):
        LLM(tmp_path, device="cpu", tensor_parallel_size=0)
    assert multiprocessing.active_children() == []
    assert not torch.distributed.is_initialized()
    from nanodance.weights import load_model
    loaded = load_model(folder, ModelConfig.from_folder(folder), torch.float32)
    with pytest.raises(RequestError, match="needs a model folder"):
        LLM(loaded, tokenizer=None, tensor_parallel_size=2)


def test_the_command_line_flag_reaches_the_split_check(tmp_path, capsys):
    from nanodance.tools.cli import main

    (tmp_path / "config.json").write_text(json.dumps(tiny_config("llama").to_dict()))
    assert main(["generate", "hi", "--model", str(tmp_path), "--tensor-parallel-size", "3"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: tensor_parallel_size=3 does not divide the model's 4 attention heads")


def test_a_broken_checkpoint_fails_the_start_and_leaves_nothing_running(tmp_path, folder):
    from safetensors.torch import load_file, save_file

    from nanodance.errors import ModelLoadError

    broken = tmp_path / "broken"
    broken.mkdir()
    for f in folder.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    tensors = load_file(broken / "model.safetensors")
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, broken / "model.safetensors")
    with deadline():
        with pytest.raises(ModelLoadError, match="down_proj"):
            start(broken)
    assert multiprocessing.active_children() == []
    assert not torch.distributed.is_initialized()
