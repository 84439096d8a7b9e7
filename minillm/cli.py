"""The ``minillm`` command (also ``python -m minillm``).

    minillm train                 train a small GPT on the built-in corpus, then sample
    minillm generate              sample from a trained run or a GPT-2 checkpoint
    minillm tokenizer train|encode|decode
    minillm bench tokenizer|train|ops|generate

Each subcommand's arguments and handler live beside the code they drive; this
file only assembles the parser and turns expected failures into one-line
messages instead of tracebacks.
"""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    from .tokenizer.commands import add_tokenizer_bench_arguments, add_tokenizer_parser, run_tokenizer_bench

    parser = argparse.ArgumentParser(prog="minillm", description="A GPT built from scratch on arrays.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    from .generate_commands import add_bench_generate_parser, add_generate_parser
    from .ops_bench import add_bench_ops_parser
    from .train.commands import add_bench_train_parser, add_train_parser

    add_train_parser(commands)

    add_generate_parser(commands)

    add_tokenizer_parser(commands)

    bench = commands.add_parser("bench", help="measure speed and memory (tokenizer, training step, ops)")
    benches = bench.add_subparsers(dest="bench", metavar="WHAT")
    benches.required = True
    tok = benches.add_parser("tokenizer", help="tokenizer encode/train speed and memory")
    add_tokenizer_bench_arguments(tok)
    tok.set_defaults(func=run_tokenizer_bench)
    add_bench_train_parser(benches)
    add_bench_generate_parser(benches)
    add_bench_ops_parser(benches)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .backend import tune_cpu_allocator

    parser = build_parser()
    args = parser.parse_args(argv)
    tune_cpu_allocator()
    try:
        result = args.func(args)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, RuntimeError, TypeError) as error:
        # expected failures (bad arguments, missing files, corrupt checkpoints): one clear line
        print(f"minillm: error: {error}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
