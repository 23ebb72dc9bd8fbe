"""Loading a Hugging Face folder's safetensors into `CausalLM`, fusing projections on the way.

Owns: finding the shards (`model.safetensors`, or `model.safetensors.index.json` and the
files it names, or every `*.safetensors`), mapping Hugging Face names onto our modules
(q/k/v -> `qkv_proj`, gate/up -> `gate_up_proj`), the table of expected Hugging Face tensor
names and shapes (`expected_shapes`) and the checks against it, and clear
errors for a missing, truncated or mis-shaped tensor. Tensors are read one at a time and cast
to the target dtype, so peak memory is about one model plus one tensor.

Under tensor parallelism (`tp`, parallel.py) each rank reads only its shard of each tensor, as a
slice of the file (`safe_open(...).get_slice(name)[rows]`): its q/k/v heads and gate/up rows
(column-parallel), its o_proj and down_proj columns (row-parallel), its vocabulary rows; norms
are read whole. No rank materializes the full model.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from nanodance.config import ModelConfig
from nanodance.errors import ModelLoadError
from nanodance.model import CausalLM
from nanodance.parallel import SINGLE, TensorParallel

# Hugging Face per-layer name -> (our parameter, which slice of the fused tensor)
_FUSED = {
    "self_attn.q_proj": ("self_attn.qkv_proj", 0),
    "self_attn.k_proj": ("self_attn.qkv_proj", 1),
    "self_attn.v_proj": ("self_attn.qkv_proj", 2),
    "mlp.gate_proj": ("mlp.gate_up_proj", 0),
    "mlp.up_proj": ("mlp.gate_up_proj", 1),
}


def safetensors_files(folder: Path) -> list[Path]:
    """The weight files of a folder, in a stable order."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ModelLoadError(f"{index} is not a valid safetensors index ({e})") from None
        files = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelLoadError(f"{index} names shards that are not in {folder}: {missing}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"no *.safetensors weights in {folder}")
    return files


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every Hugging Face tensor name the model needs, with its shape (`[out, in]` for weights).

    `lm_head.weight` only when the embeddings are untied; q/k/v biases for Qwen2, q/k norms
    for Qwen3. The default-model converter (tools/prepare.py) checks its output against this too.
    """
    H, D, I = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    q, kv = cfg.num_heads * D, cfg.num_kv_heads * D
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, H), "model.norm.weight": (H,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, H)
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
            p + "self_attn.q_proj.weight": (q, H), p + "self_attn.k_proj.weight": (kv, H),
            p + "self_attn.v_proj.weight": (kv, H), p + "self_attn.o_proj.weight": (H, q),
            p + "mlp.gate_proj.weight": (I, H), p + "mlp.up_proj.weight": (I, H), p + "mlp.down_proj.weight": (H, I),
        })
        if cfg.attention_bias:
            shapes.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                           p + "self_attn.v_proj.bias": (kv,)})
        if cfg.qk_norm:
            shapes.update({p + "self_attn.q_norm.weight": (D,), p + "self_attn.k_norm.weight": (D,)})
    return shapes


def _target(name: str, model: CausalLM) -> tuple[torch.Tensor, slice | None]:
    """Our parameter for a Hugging Face tensor name, and the rows of it the tensor fills."""
    params = dict(model.named_parameters())
    if name == "lm_head.weight":
        return params["lm_head.weight"], None
    local = name.removeprefix("model.")
    for hf, (ours, part) in _FUSED.items():
        if f".{hf}." in f".{local}":
            layer_prefix, suffix = local.split(hf)
            fused = params[layer_prefix + ours + suffix]
            if ours.endswith("qkv_proj"):
                attn = model.layers[int(layer_prefix.split(".")[1])].self_attn
                bounds = [0, attn.q_size, attn.q_size + attn.kv_size, attn.q_size + 2 * attn.kv_size]
            else:
                n = model.layers[int(layer_prefix.split(".")[1])].mlp.intermediate_size
                bounds = [0, n, 2 * n]
            return fused, slice(bounds[part], bounds[part + 1])
    return params[local], None


def shard_index(name: str, cfg: ModelConfig, tp: TensorParallel) -> tuple[slice, ...] | None:
    """The part of Hugging Face tensor `name` that rank `tp.rank` holds (None: all of it).

    Column-parallel tensors are cut by rows (output features, biases too), row-parallel ones by
    columns; each head's rows stay together, so a fused qkv shard is this rank's q, k and v heads.
    """
    if not tp.active:
        return None
    D = cfg.head_dim

    def heads(r: range) -> slice:
        return slice(r.start * D, r.stop * D)

    def part(r: range) -> slice:
        return slice(r.start, r.stop)

    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        return (part(tp.vocab(cfg.vocab_size)),)
    for suffix, index in ((".self_attn.q_proj.", (heads(tp.q_heads(cfg)),)),
                          (".self_attn.k_proj.", (heads(tp.kv_heads(cfg)),)),
                          (".self_attn.v_proj.", (heads(tp.kv_heads(cfg)),)),
                          (".mlp.gate_proj.", (part(tp.split(cfg.intermediate_size)),)),
                          (".mlp.up_proj.", (part(tp.split(cfg.intermediate_size)),)),
                          (".self_attn.o_proj.", (slice(None), heads(tp.q_heads(cfg)))),
                          (".mlp.down_proj.", (slice(None), part(tp.split(cfg.intermediate_size)))),):
        if suffix in name:
            return index
    return None


def load_model(folder: str | Path, cfg: ModelConfig, dtype: torch.dtype, device: str | torch.device = "cpu",
               tp: TensorParallel = SINGLE) -> CausalLM:
    """Build `CausalLM` for `cfg` (this rank's shard under `tp`) and fill it from the folder's safetensors."""
    from safetensors import SafetensorError, safe_open

    folder = Path(folder)
    with torch.device("meta"):
        model = CausalLM(cfg, tp)
    model = model.to_empty(device=device).to(dtype)
    model.inv_freq = _rope_buffer(cfg, device)
    expected = expected_shapes(cfg)
    seen: set[str] = set()
    with torch.no_grad():
        for path in safetensors_files(folder):
            try:
                handle = safe_open(str(path), framework="pt", device="cpu")
            except (SafetensorError, OSError, ValueError) as e:
                raise ModelLoadError(f"cannot read {path}: {e} (a corrupt or truncated download?)") from None
            with handle as f:
                for name in f.keys():
                    if name not in expected:
                        continue  # e.g. rotary inv_freq buffers some checkpoints carry
                    index = shard_index(name, cfg, tp)
                    try:
                        if index is None:
                            tensor = f.get_tensor(name)
                            shape = tuple(tensor.shape)
                        else:  # read this rank's rows or columns only, after checking the whole shape
                            part = f.get_slice(name)
                            shape = tuple(part.get_shape())
                    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
                        raise ModelLoadError(f"cannot read tensor {name!r} from {path}: {e}") from None
                    if shape != expected[name]:
                        raise ModelLoadError(
                            f"tensor {name!r} in {path.name} has shape {shape}, but config.json "
                            f"implies {expected[name]}: the weights do not belong to this config")
                    if index is not None:
                        try:
                            tensor = part[index]
                        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
                            raise ModelLoadError(f"cannot read tensor {name!r} from {path}: {e}") from None
                    param, rows = _target(name, model)
                    (param if rows is None else param[rows]).copy_(tensor.to(dtype))
                    seen.add(name)
    missing = sorted(set(expected) - seen)
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ModelLoadError(f"{folder} lacks tensors the config requires: {missing[:5]}{more}")
    return model.eval()


def _rope_buffer(cfg: ModelConfig, device) -> torch.Tensor:
    from nanodance.config import rope_inv_freq
    return rope_inv_freq(cfg).to(device)
