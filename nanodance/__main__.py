"""Command line: `python -m nanodance prepare [--force]` and `python -m nanodance generate "..."`.

Owns argument parsing only: `prepare` calls nanodance.prepare, `generate` builds an `LLM` and
prints one completion. The engine is imported lazily so that `prepare` works on its own.
"""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return args.run(args)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m nanodance",
                                     description="nanodance: compact LLM inference engine")
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
    generate.set_defaults(run=_generate)
    return parser


def _prepare(args) -> int:
    from nanodance.prepare import PrepareError, prepare_default_model

    try:
        path = prepare_default_model(force=args.force)
    except PrepareError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


def _generate(args) -> int:
    from nanodance import LLM, SamplingParams

    llm_kwargs = {} if args.dtype is None else {"dtype": args.dtype}
    llm = LLM(args.model, **llm_kwargs)
    prompt = [{"role": "user", "content": args.prompt}] if args.chat else args.prompt
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens)
    [output] = llm.generate([prompt], params)
    print(output.text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
