"""The command line (`python -m nanodance prepare [--force] | generate "..." | serve`), outside the core engine.

Owns argument parsing and how failures are shown: `prepare` calls nanodance.tools.prepare,
`generate` checks the sampling options, then builds an `LLM` and prints one completion, `serve`
runs the OpenAI-compatible server (server.py) with uvicorn. Every
`NanodanceError`, every bad argument and a prompt the model cannot take (an output with
finish_reason "error") print one line, `error: <message>`, to stderr and exit with status 1.
"""
from __future__ import annotations

import argparse
import logging
import sys

from nanodance.engine_config import MASTER_SOURCES, REUSE_MODES
from nanodance.errors import NanodanceError


class _UsageError(Exception):
    """A bad command line, as argparse reports it."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        # argparse would print the whole usage and exit 2; one line and status 1, like every error.
        raise _UsageError(f"{self.prog}: {message}")


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
        return args.run(args)
    except (NanodanceError, _UsageError) as exc:
        return _fail(str(exc))


def _fail(message: str) -> int:
    print("error: " + " ".join(message.split("\n")), file=sys.stderr)
    return 1


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m nanodance", description="nanodance: compact LLM inference engine")
    commands = parser.add_subparsers(dest="command", required=True)

    prepare = commands.add_parser(
        "prepare", help="convert the bundled default model (SmolLM2-135M-Instruct) into the cache")
    prepare.add_argument("--force", action="store_true", help="rebuild even if already prepared")
    prepare.set_defaults(run=_prepare)

    generate = commands.add_parser("generate", help="complete one prompt and print the text")
    generate.add_argument("prompt")
    generate.add_argument("--max-tokens", type=int, default=128)
    generate.add_argument("--temperature", type=float, default=0.0,
                          help="0 (the default) is greedy decoding")
    generate.add_argument("--chat", action=argparse.BooleanOptionalAction, default=True,
                          help="wrap the prompt as a user message in the chat template (default)")
    generate.add_argument("--model", default=None,
                          help="Hugging Face folder; default: the bundled SmolLM2-135M-Instruct")
    generate.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"))
    generate.add_argument("--max-model-len", type=int, default=None,
                          help="longest prompt + completion in tokens; default: the model's")
    generate.add_argument("--kv-cache-blocks", type=int, default=None,
                          help="KV cache size in blocks; default: sized from a memory budget")
    generate.add_argument("--tensor-parallel-size", type=int, default=None,
                          help="split the model over this many GPUs (or CPU processes); default 1")
    generate.set_defaults(run=_generate)

    serve = commands.add_parser("serve", help="serve the OpenAI API (chat and completions) over HTTP")
    serve.add_argument("--model", default=None, help="Hugging Face folder; default: the bundled SmolLM2-135M-Instruct")
    serve.add_argument("--served-model-name", default=None, help="the model id clients send; default: the folder name")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--reuse", default=None, choices=REUSE_MODES,
                       help="KV reuse mode; default: tokendance")
    serve.add_argument("--recompute-ratio", type=float, default=None)
    serve.add_argument("--master", default=None, choices=MASTER_SOURCES,
                       help="where shared K/V comes from; default: agent (docs/usage.md)")
    serve.add_argument("--no-auto-shared", dest="auto_shared", action="store_false",
                       help="do not look for earlier outputs in prompts (only explicitly marked spans are shared)")
    serve.add_argument("--admission-window-ms", type=float, default=20.0,
                       help="how long the first waiting request waits for others to form a round (default 20)")
    serve.add_argument("--max-waiting", type=int, default=1024, help="queued requests before 503s (default 1024)")
    serve.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"))
    serve.add_argument("--max-model-len", type=int, default=None)
    serve.add_argument("--kv-cache-blocks", type=int, default=None)
    serve.add_argument("--max-num-seqs", type=int, default=None)
    serve.add_argument("--tensor-parallel-size", type=int, default=None,
                       help="split the model over this many GPUs (or CPU processes); default 1")
    serve.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    serve.set_defaults(run=_serve)
    return parser


def _prepare(args) -> int:
    from nanodance.tools.prepare import prepare_default_model

    print(prepare_default_model(force=args.force))
    return 0


def _generate(args) -> int:
    from nanodance import LLM, SamplingParams

    # A request that fails is reported below as the one error line; the engine's log line about
    # it would say the same thing twice.
    logging.getLogger("nanodance").setLevel(logging.ERROR)

    # Before the model loads: a typo in an option should not cost a model load to find out.
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens)
    options = {"dtype": args.dtype, "max_model_len": args.max_model_len, "kv_cache_blocks": args.kv_cache_blocks,
               "tensor_parallel_size": args.tensor_parallel_size}
    llm = LLM(args.model, **{k: v for k, v in options.items() if v is not None})
    prompt = [{"role": "user", "content": args.prompt}] if args.chat else args.prompt
    [output] = llm.generate([prompt], params)
    if output.finish_reason == "error":
        return _fail(output.error or "the request failed")
    print(output.text)
    return 0


def _serve(args) -> int:
    try:
        import uvicorn
        from nanodance.server import build_app
    except ImportError as exc:
        return _fail(f"the server needs the [serve] extra ({exc.name} is missing): pip install 'nanodance[serve]'")
    from pathlib import Path

    from nanodance import LLM
    from nanodance.serving import ServingEngine

    if not 0 < args.port < 65536:
        return _fail(f"--port must be in 1..65535, got {args.port}")
    if args.admission_window_ms < 0 or args.max_waiting < 1:
        return _fail("--admission-window-ms must be >= 0 and --max-waiting >= 1")
    options = {"dtype": args.dtype, "max_model_len": args.max_model_len, "kv_cache_blocks": args.kv_cache_blocks,
               "max_num_seqs": args.max_num_seqs, "reuse": args.reuse, "recompute_ratio": args.recompute_ratio,
               "master": args.master, "auto_shared": args.auto_shared,
               "tensor_parallel_size": args.tensor_parallel_size}
    from nanodance.engine_config import EngineConfig
    EngineConfig().with_options(**{k: v for k, v in options.items() if v is not None})  # bad options: before loading
    llm = LLM(args.model, **{k: v for k, v in options.items() if v is not None})
    name = args.served_model_name or Path(llm.model_path).name
    serving = ServingEngine(llm, admission_window=args.admission_window_ms / 1000, max_waiting=args.max_waiting)
    print(f"nanodance: serving {name!r} (reuse={llm.reuse}) at http://{args.host}:{args.port}/v1", file=sys.stderr)
    uvicorn.run(build_app(serving, name), host=args.host, port=args.port, log_level=args.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
