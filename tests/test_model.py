"""The model, its config and its weights, specified against transformers (docs/design.md, "The default model").

What must hold, on tiny random checkpoints of every supported feature (`tiny_checkpoints`:
Llama with default / llama3 / linear RoPE, tied embeddings, Qwen2 biases, Qwen3 q/k norms):
- one ragged forward over a paged KV cache (sequences of different lengths, partially filled
  blocks, shuffled block ids, untouched slots full of NaN) gives, for every token, the logits
  transformers computes for that sequence alone (fp32, 1e-4 absolute);
- so do the steps after it: one decode token per sequence (one of them opening a new block)
  and prefill chunks mixed with decodes;
- `forward(num_layers=i)` is transformers' residual stream entering layer i, and
  `layer_keys(i, ...)` recomputes exactly the keys the forward cached;
- config.json in the transformers 5 style (`rope_parameters`) and the classic style
  (`rope_theta` + `rope_scaling`, old `type` key) give the same frequencies; rope types whose
  frequencies depend on the sequence length, and unknown architectures, raise `ConfigError`
  naming them;
- broken weights raise `ModelLoadError` (of which `ConfigError` is a kind) naming the tensor
  or file: missing tensor, wrong shape, truncated file, no safetensors, index naming a missing
  shard; a sharded checkpoint loads through its index.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from nanodance.attention_metadata import AttentionMetadata, build_metadata
from nanodance.config import ModelConfig, rope_inv_freq
from nanodance.errors import ConfigError, ModelLoadError
from nanodance.model import CausalLM
from nanodance.weights import load_model
from tiny_checkpoints import KINDS, write_tiny_checkpoint

ATOL = 1e-4
BLOCK_SIZE = 16
# Blocks are handed out in this order: sequences get non-contiguous, non-increasing block ids,
# and block 0 (the one the torch path gathers for padding) is in use by a sequence.
FREE_BLOCKS = (7, 2, 11, 0, 5, 9, 3, 10, 1, 6, 4, 8)


# --- a paged KV cache managed by hand --------------------------------------------------------

class HandPagedCache:
    """Block tables from a fixed shuffled free list; each sequence sees one view per block.

    `step(model, [(seq, tokens), ...])` appends the tokens to their sequences (a new sequence
    is the next unused index), allocates blocks as needed, runs one forward over the ragged
    batch and returns the logits of each chunk. Slots nobody wrote hold NaN, so a read outside
    the views shows up in the logits.
    """

    def __init__(self, cfg: ModelConfig, block_size: int = BLOCK_SIZE):
        shape = (len(FREE_BLOCKS), block_size, cfg.num_kv_heads, cfg.head_dim)
        self.kv = [(torch.full(shape, float("nan")), torch.full(shape, float("nan"))) for _ in range(cfg.num_layers)]
        self.block_size = block_size
        self.free = list(FREE_BLOCKS)
        self.tables: list[list[int]] = []
        self.tokens: list[list[int]] = []

    def batch(self, chunks: list[tuple[int, list[int]]]) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """(input_ids int64 [T], positions int64 [T], meta) for the chunks; commits the tokens."""
        bs = self.block_size
        ids, q_pos, slots, rows = [], [], [], []
        for s, toks in chunks:
            if s == len(self.tables):
                self.tables.append([])
                self.tokens.append([])
            table, start = self.tables[s], len(self.tokens[s])
            end = start + len(toks)
            while len(table) * bs < end:
                table.append(self.free.pop(0))
            ids += toks
            q_pos.append(list(range(start, end)))
            slots += [table[p // bs] * bs + p % bs for p in range(start, end)]
            rows.append([(block, 0, min(bs, end - j * bs), j * bs, 0) for j, block in enumerate(table)])
            self.tokens[s] += toks
        meta = build_metadata(rows, q_pos, bs, "cpu", slots)
        positions = torch.tensor([p for ps in q_pos for p in ps], dtype=torch.int64)
        return torch.tensor(ids, dtype=torch.int64), positions, meta

    def step(self, model: CausalLM, chunks: list[tuple[int, list[int]]]) -> list[torch.Tensor]:
        ids, pos, meta = self.batch(chunks)
        with torch.no_grad():
            logits = model.compute_logits(model(ids, pos, meta, self.kv))
        cu = meta.cu_seqlens_q.tolist()
        return [logits[cu[b]:cu[b + 1]] for b in range(len(chunks))]


# --- tiny checkpoints, loaded both ways ------------------------------------------------------

@dataclass
class Tiny:
    kind: str
    folder: Path
    hf: torch.nn.Module
    cfg: ModelConfig
    model: CausalLM

    def hf_logits(self, tokens: list[int]) -> torch.Tensor:
        """transformers' fp32 logits [len(tokens), vocab] for one sequence run alone."""
        with torch.no_grad():
            return self.hf(torch.tensor([tokens])).logits[0].float()


@pytest.fixture(scope="module", params=KINDS)
def tiny(request, tmp_path_factory) -> Tiny:
    folder, hf = write_tiny_checkpoint(tmp_path_factory.mktemp(request.param), request.param, seed=1)
    cfg = ModelConfig.from_folder(folder)
    return Tiny(request.param, folder, hf, cfg, load_model(folder, cfg, torch.float32))


def tokens(n: int, seed: int) -> list[int]:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def assert_logits_match(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


PROMPT_LENGTHS = (5, 17, 32)  # one partial block; one full + one partial; two full blocks


# --- the forward pass ------------------------------------------------------------------------

def test_prefill_of_a_ragged_batch_matches_transformers(tiny):
    prompts = [tokens(n, seed=i) for i, n in enumerate(PROMPT_LENGTHS)]
    cache = HandPagedCache(tiny.cfg)
    outs = cache.step(tiny.model, list(enumerate(prompts)))
    assert cache.tables == [[7], [2, 11], [0, 5]]
    for prompt, out in zip(prompts, outs):
        assert_logits_match(out, tiny.hf_logits(prompt))


def test_decode_step_after_prefill_matches_transformers(tiny):
    prompts = [tokens(n, seed=i) for i, n in enumerate(PROMPT_LENGTHS)]
    cache = HandPagedCache(tiny.cfg)
    cache.step(tiny.model, list(enumerate(prompts)))
    nxt = [[t] for t in tokens(3, seed=10)]
    outs = cache.step(tiny.model, list(enumerate(nxt)))
    assert cache.tables[2] == [0, 5, 9]  # position 32 opened a fresh block
    for prompt, new, out in zip(prompts, nxt, outs):
        assert out.shape[0] == 1
        assert_logits_match(out, tiny.hf_logits(prompt + new)[-1:])


def test_prefill_chunks_mixed_with_decodes_match_transformers(tiny):
    """A long prompt arrives in three chunks (crossing block boundaries) beside short sequences."""
    long, short, late = tokens(40, seed=20), tokens(6, seed=21), tokens(3, seed=22)
    cache = HandPagedCache(tiny.cfg)
    steps = [
        [(0, long[:12]), (1, short)],
        [(1, tokens(1, seed=23)), (0, long[12:30]), (2, late)],  # order differs from seq ids
        [(0, long[30:]), (2, tokens(1, seed=24)), (1, tokens(1, seed=25))],
    ]
    for step in steps:
        outs = cache.step(tiny.model, step)
        for (s, toks), out in zip(step, outs):
            seq = cache.tokens[s]
            assert_logits_match(out, tiny.hf_logits(seq)[len(seq) - len(toks):])
    assert len(cache.tables[0]) == 3


def test_early_exit_returns_the_residual_stream_entering_that_layer(tiny):
    prompt = tokens(17, seed=30)
    with torch.no_grad():
        theirs = tiny.hf(torch.tensor([prompt]), output_hidden_states=True).hidden_states
    for i in range(tiny.cfg.num_layers):
        ids, pos, meta = HandPagedCache(tiny.cfg).batch([(0, prompt)])
        with torch.no_grad():
            ours = tiny.model(ids, pos, meta, HandPagedCache(tiny.cfg).kv, num_layers=i)
        torch.testing.assert_close(ours, theirs[i][0], atol=ATOL, rtol=0)


def test_layer_keys_recompute_the_keys_the_forward_cached(tiny):
    prompt = tokens(20, seed=40)
    cache = HandPagedCache(tiny.cfg)
    ids, pos, meta = cache.batch([(0, prompt)])
    with torch.no_grad():
        tiny.model(ids, pos, meta, cache.kv)
        for i in range(tiny.cfg.num_layers):
            residual = tiny.model(ids, pos, meta, HandPagedCache(tiny.cfg).kv, num_layers=i)
            keys = tiny.model.layer_keys(i, residual, pos)
            cached = cache.kv[i][0].view(-1, tiny.cfg.num_kv_heads, tiny.cfg.head_dim)[meta.slot_mapping]
            torch.testing.assert_close(keys, cached, atol=1e-5, rtol=0)


def test_rope_frequencies_match_transformers(tiny):
    torch.testing.assert_close(tiny.model.inv_freq, tiny.hf.model.rotary_emb.inv_freq.float(), atol=0, rtol=1e-6)


def test_a_bf16_model_keeps_its_rope_frequencies_in_fp32(tiny):
    model = load_model(tiny.folder, tiny.cfg, torch.bfloat16)
    assert model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.inv_freq.dtype == torch.float32
    torch.testing.assert_close(model.inv_freq, tiny.model.inv_freq, atol=0, rtol=0)


def test_tiny_checkpoints_exercise_their_feature(tmp_path):
    """Guards the other tests from passing vacuously (zero biases, unit norms, unscaled rope)."""
    configs = {k: ModelConfig.from_folder(write_tiny_checkpoint(tmp_path / k, k)[0]) for k in KINDS}
    default = rope_inv_freq(configs["llama"])
    for kind in ("llama3", "linear"):
        assert configs[kind].rope_type == kind
        assert not torch.allclose(rope_inv_freq(configs[kind]), default)
    llama3 = rope_inv_freq(configs["llama3"])
    assert (llama3 == default).any() and (llama3 != default).any()  # high frequencies stay, low ones scale
    assert configs["tied"].tie_word_embeddings and "lm_head.weight" not in load_file(tmp_path / "tied" / "model.safetensors")
    qwen2 = load_file(tmp_path / "qwen2" / "model.safetensors")
    assert configs["qwen2"].attention_bias and qwen2["model.layers.0.self_attn.k_proj.bias"].abs().min() > 0
    qwen3 = load_file(tmp_path / "qwen3" / "model.safetensors")
    assert configs["qwen3"].qk_norm and not configs["qwen3"].attention_bias
    assert (qwen3["model.layers.0.self_attn.q_norm.weight"] != 1).all()
    assert configs["qwen3"].num_heads * configs["qwen3"].head_dim != configs["qwen3"].hidden_size


# --- config.json -----------------------------------------------------------------------------

BASE = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "num_attention_heads": 4,
        "num_key_value_heads": 2, "num_hidden_layers": 2, "intermediate_size": 128, "vocab_size": 256, "head_dim": 16}
ROPES = {
    "default": {"rope_type": "default"},
    "linear": {"rope_type": "linear", "factor": 4.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64},
}


def classic_style(rope: dict, theta: float = 5e5) -> dict:
    return {**BASE, "rope_theta": theta, "rope_scaling": None if rope["rope_type"] == "default" else rope}


def parameters_style(rope: dict, theta: float = 5e5) -> dict:
    return {**BASE, "rope_parameters": {"rope_theta": theta, **rope}}


@pytest.mark.parametrize("rope", ROPES)
def test_both_config_styles_give_the_same_rope(rope):
    classic = ModelConfig.from_dict(classic_style(ROPES[rope]))
    modern = ModelConfig.from_dict(parameters_style(ROPES[rope]))
    assert classic == modern
    assert classic.rope_theta == 5e5 and classic.rope_type == rope
    torch.testing.assert_close(rope_inv_freq(classic), rope_inv_freq(modern), atol=0, rtol=0)


def test_old_type_key_of_rope_scaling_is_understood():
    old = ModelConfig.from_dict({**BASE, "rope_theta": 5e5, "rope_scaling": {"type": "linear", "factor": 4.0}})
    assert old == ModelConfig.from_dict(classic_style(ROPES["linear"]))


def test_rope_frequencies_follow_the_config():
    default = rope_inv_freq(ModelConfig.from_dict(classic_style(ROPES["default"])))
    assert default.dtype == torch.float32 and default.shape == (8,)
    torch.testing.assert_close(default, 5e5 ** -(torch.arange(0, 16, 2) / 16), atol=0, rtol=1e-6)
    linear = rope_inv_freq(ModelConfig.from_dict(classic_style(ROPES["linear"])))
    torch.testing.assert_close(linear, default / 4, atol=0, rtol=1e-6)


@pytest.mark.parametrize("style", [classic_style, parameters_style])
@pytest.mark.parametrize("rope_type", ["yarn", "dynamic", "longrope"])
def test_rope_types_that_depend_on_sequence_length_are_rejected(style, rope_type):
    with pytest.raises(ConfigError, match=rope_type):
        ModelConfig.from_dict(style({"rope_type": rope_type, "factor": 4.0, "original_max_position_embeddings": 64}))


def test_unknown_architecture_is_rejected_by_name():
    with pytest.raises(ConfigError, match="GPT2LMHeadModel"):
        ModelConfig.from_dict({**BASE, "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})


def test_model_type_stands_in_for_missing_architectures():
    cfg = ModelConfig.from_dict({**{k: v for k, v in BASE.items() if k != "architectures"}, "model_type": "qwen2"})
    assert cfg.arch == "qwen2" and cfg.attention_bias


def test_missing_required_key_is_named():
    with pytest.raises(ConfigError, match="intermediate_size"):
        ModelConfig.from_dict({k: v for k, v in BASE.items() if k != "intermediate_size"})


def test_config_errors_are_model_load_errors(tmp_path):
    assert issubclass(ConfigError, ModelLoadError) and issubclass(ModelLoadError, ValueError)
    with pytest.raises(ConfigError, match="config.json"):
        ModelConfig.from_folder(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="JSON"):
        ModelConfig.from_folder(tmp_path)


def test_config_reads_what_the_checkpoint_declares(tmp_path):
    cfg = ModelConfig.from_folder(write_tiny_checkpoint(tmp_path, "qwen3")[0])
    assert (cfg.arch, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == ("qwen3", 3, 4, 2, 32)
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size) == (64, 128, 256)
    assert cfg.rope_theta == 1e6 and cfg.rope_type == "default" and cfg.eos_token_ids == (2,)


# --- loading weights -------------------------------------------------------------------------

def load(folder: Path) -> CausalLM:
    return load_model(folder, ModelConfig.from_folder(folder), torch.float32)


def rewrite(folder: Path, edit) -> None:
    """Load model.safetensors, apply `edit` to the dict of tensors, save it back."""
    path = folder / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_sharded_checkpoint_loads_through_its_index(tmp_path):
    folder, hf = write_tiny_checkpoint(tmp_path, "llama3", shards=True, seed=3)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    cfg = ModelConfig.from_folder(folder)
    tiny = Tiny("llama3", folder, hf, cfg, load_model(folder, cfg, torch.float32))
    prompt = tokens(21, seed=50)
    (out,) = HandPagedCache(cfg).step(tiny.model, [(0, prompt)])
    assert_logits_match(out, tiny.hf_logits(prompt))


def test_index_naming_a_missing_shard_is_an_error(tmp_path):
    folder, _ = write_tiny_checkpoint(tmp_path, "llama", shards=True)
    shard = sorted(folder.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(ModelLoadError, match=shard.name):
        load(folder)


@pytest.mark.parametrize("kind,name", [
    ("llama", "lm_head.weight"),
    ("llama", "model.layers.1.self_attn.v_proj.weight"),
    ("llama", "model.norm.weight"),
    ("qwen2", "model.layers.0.self_attn.k_proj.bias"),
    ("qwen3", "model.layers.2.self_attn.q_norm.weight"),
])
def test_missing_tensor_is_named(tmp_path, kind, name):
    folder, _ = write_tiny_checkpoint(tmp_path, kind)
    rewrite(folder, lambda t: t.pop(name))
    with pytest.raises(ModelLoadError, match=name.replace(".", r"\.")):
        load(folder)


def test_tensor_of_the_wrong_shape_is_named(tmp_path):
    folder, _ = write_tiny_checkpoint(tmp_path, "llama")
    name = "model.layers.0.self_attn.k_proj.weight"
    rewrite(folder, lambda t: t.update({name: torch.zeros(64, 64)}))  # a q-sized k: MHA weights, GQA config
    with pytest.raises(ModelLoadError, match=name.replace(".", r"\.")) as err:
        load(folder)
    assert "(64, 64)" in str(err.value) and "(32, 64)" in str(err.value)


def test_weights_of_another_config_are_rejected(tmp_path):
    folder, _ = write_tiny_checkpoint(tmp_path, "llama")
    raw = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**raw, "intermediate_size": 96}))
    with pytest.raises(ModelLoadError, match=r"mlp\.(gate|up|down)_proj\.weight"):
        load(folder)


@pytest.mark.parametrize("keep", [0.5, 0.999, 100])
def test_truncated_safetensors_file_is_named(tmp_path, keep):
    folder, _ = write_tiny_checkpoint(tmp_path, "llama")
    path = folder / "model.safetensors"
    size = os.path.getsize(path)
    os.truncate(path, int(size * keep) if keep < 1 else keep)  # cut in the data, or in the header
    with pytest.raises(ModelLoadError, match="model.safetensors"):
        load(folder)


def test_folder_without_safetensors_is_an_error(tmp_path):
    folder, hf = write_tiny_checkpoint(tmp_path, "llama")
    (folder / "model.safetensors").unlink()
    torch.save(hf.state_dict(), folder / "pytorch_model.bin")  # a format nanodance does not read
    with pytest.raises(ModelLoadError, match="safetensors"):
        load(folder)


# Features of these architectures that nanodance does not implement. Either answer is right:
# refuse the checkpoint (ModelLoadError), or run it with transformers' logits; loading it and
# answering wrongly is not.
@pytest.mark.parametrize("kind,overrides", [
    pytest.param("llama", {"attention_bias": True}, id="llama-attention_bias-has-o_proj-bias"),
    pytest.param("llama", {"mlp_bias": True}, id="llama-mlp_bias"),
    pytest.param("qwen3", {"attention_bias": True}, id="qwen3-attention_bias-has-o_proj-bias"),
    pytest.param("qwen2", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 0},
                 id="qwen2-sliding-window"),
])
def test_unimplemented_features_are_refused_rather_than_ignored(tmp_path, kind, overrides):
    folder, hf = write_tiny_checkpoint(tmp_path, kind, **overrides)
    try:
        model = load(folder)
    except ModelLoadError:
        return
    prompt = tokens(33, seed=60)
    (out,) = HandPagedCache(model.config).step(model, [(0, prompt)])
    with torch.no_grad():
        assert_logits_match(out, hf(torch.tensor([prompt])).logits[0])
