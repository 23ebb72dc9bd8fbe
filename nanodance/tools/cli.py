"""The command line (`python -m nanodance prepare [--force] | generate "..."`), outside the core engine.

Owns argument parsing and how failures are shown: `prepare` calls nanodance.tools.prepare,
`generate` checks the sampling options, then builds an `LLM` and prints one completion. Every
`NanodanceError`, every bad argument and a prompt the model cannot take (an output with
finish_reason "error") print one line, `error: <message>`, to stderr and exit with status 1.
"""
from __future__ import annotations

import argparse
import logging
import sys

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


if __name__ == "__main__":
    sys.exit(main())
