"""The ``minillm`` command (also ``python -m minillm``).

    minillm train                 train a small GPT on the built-in corpus, then sample
    minillm generate              sample from a trained run or a Hugging Face checkpoint
    minillm tokenizer train|encode|decode
    minillm bench tokenizer|train|generate|ops
    minillm plot RUN_DIR...         training curves of runs, into a PNG or SVG
    minillm finetune classify|sft|dpo   post-train a run; minillm classify labels texts with one
    minillm launch --nproc-per-node N -- COMMAND   one process per GPU (pipeline-parallel training)

Each subcommand lives in ``minillm/commands/NAME.py``, whose ``register(subparsers)``
adds its parser with ``set_defaults(func=handler)``. This file only assembles
them and is the one place that turns expected failures into one line on stderr
and an exit code, instead of a traceback:

    exit 2    bad input: ValueError, TypeError, a corrupt or missing checkpoint (RuntimeError),
              a path that is missing, a folder where a file was expected (or the reverse),
              an existing file, no permission  (argparse's usage errors exit 2 too)
    exit 1    the machine said no: out of memory, any other OS error (disk full, I/O error)
    exit 130  interrupted (Ctrl-C)
    exit 141  the reader of our output went away (``minillm generate ... | head -1``): quietly,
              like a program killed by SIGPIPE

Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from .commands import bench, classify, finetune, generate, launch, plot, tokenizer, train

COMMANDS = [train, generate, tokenizer, bench, plot, finetune, classify, launch]

# an OSError of these kinds means the user named the wrong path: a usage problem (exit 2)
PATH_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError, FileExistsError, PermissionError)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="minillm", description="A GPT built from scratch on arrays.")
    parser.add_argument("--version", action="version", version=f"minillm {__version__}",
                        help="print the version and exit")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for command in COMMANDS:
        command.register(subparsers)
    return parser


def describe_os_error(error: OSError) -> str:
    """``PATH: what went wrong`` in plain words (no ``[Errno 2]``)."""
    if error.filename is None or error.strerror is None:
        return str(error)
    reason = error.strerror[:1].lower() + error.strerror[1:]
    target = f" -> {error.filename2}" if error.filename2 is not None else ""
    return f"{error.filename}{target}: {reason}"


def describe_memory_error(error: MemoryError) -> str:
    detail = str(error).strip()   # NumPy: "Unable to allocate 3.1 TiB for an array with shape (...) ..."
    detail = f" ({detail[:1].lower() + detail[1:]})" if detail else ""
    return (f"out of memory{detail}; try a smaller --batch-size, --context or model")


def main(argv: list[str] | None = None) -> int:
    from .backend import tune_cpu_allocator

    args = build_parser().parse_args(argv)
    tune_cpu_allocator()
    try:
        with warnings.catch_warnings():
            # a run that diverges overflows on its way to the one-line "training diverged" error; NumPy's
            # warnings about it would print our source lines first
            warnings.filterwarnings("ignore", r"(overflow|invalid value|divide by zero) encountered", RuntimeWarning)
            result = args.func(args)
        sys.stdout.flush()        # a closed pipe shows up here, not at interpreter exit
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        _silence_stdout()
        return 141
    except MemoryError as error:
        return _fail(describe_memory_error(error), 1)
    except PATH_ERRORS as error:
        return _fail(describe_os_error(error), 2)
    except OSError as error:
        return _fail(describe_os_error(error), 1)
    except (ValueError, TypeError, RuntimeError) as error:
        # expected failures (bad arguments, missing files, corrupt checkpoints): one clear line
        return _fail(str(error), 2)
    return int(result or 0)


def _fail(message: str, code: int) -> int:
    print(f"minillm: error: {message}", file=sys.stderr)
    return code


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that Python's final flush does not fail again on the closed pipe
    (as the Python docs advise for SIGPIPE)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # stdout is not a real file (tests): nothing to flush
        pass


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
