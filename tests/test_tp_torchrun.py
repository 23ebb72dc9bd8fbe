"""The torchrun launch (`env://`): the path that spans nodes, run here on one machine (CPU, gloo).

Specification: two processes started by `torch.distributed.run` both run the same script; in
rank 1, `LLM(..., tensor_parallel_size=2)` serves rank 0 and then exits the process (status 0,
nothing after it runs); rank 0 gets one device's greedy tokens and shuts the group down; the
launcher exits 0. (Two nodes are the same code with other MASTER_ADDR/--node-rank values; not
tested here.)
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tiny_checkpoints import write_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import os, sys
from nanodance import LLM, SamplingParams
if __name__ == "__main__":
    options = dict(dtype="float32", device="cpu", kv_cache_blocks=64)
    llm = LLM(sys.argv[1], tensor_parallel_size=2, **options)
    print("after LLM() on rank", os.environ["RANK"], flush=True)  # rank 1 never gets here
    prompts = [[5, 6, 7, 8, 9], [20, 30, 40]]
    sp = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    two = [o.token_ids for o in llm.generate(prompts, sp, use_tqdm=False)]
    llm.shutdown()
    one = [o.token_ids for o in LLM(sys.argv[1], **options).generate(prompts, sp, use_tqdm=False)]
    print("same tokens as one device:", two == one, flush=True)
"""


def test_torchrun_launch_on_one_machine(tmp_path):
    folder, _ = write_tiny_checkpoint(tmp_path / "llama", kind="llama", seed=9)
    script = tmp_path / "agents.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--master-port", "0", "--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:0",
                           str(script), str(folder)],
                          capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert [line for line in lines if line.startswith("after LLM()")] == ["after LLM() on rank 0"]
    assert "same tokens as one device: True" in lines
