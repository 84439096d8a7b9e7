"""Pieces every ``minillm`` subcommand shares: how a parser is made, common options, messages.

A subcommand module calls :func:`add_command` instead of ``subparsers.add_parser``
so that every command formats its help the same way, and uses the option helpers
here (``--device``, ``--json``, ``--run``, ``--seed``) so that an option means the
same thing, with the same metavar and help, wherever it appears.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path
from typing import Any

from . import argtypes


class HelpFormatter(argparse.HelpFormatter):
    """argparse's formatter with wider option columns (long option names fit on one line)."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=32)


def add_command(subparsers, name: str, help: str, description: str | None = None,
                **kwargs) -> argparse.ArgumentParser:
    """``subparsers.add_parser`` with the shared formatter; ``description`` defaults to ``help``."""
    kwargs.setdefault("formatter_class", HelpFormatter)
    return subparsers.add_parser(name, help=help, description=description or help[:1].upper() + help[1:] + ".",
                                 **kwargs)


def add_device_option(parser, default: str | None = "cpu") -> None:
    shown = f" (default: {default})" if default else " (default: cpu)"
    parser.add_argument("--device", metavar="DEVICE", type=argtypes.device, default=default,
                        help=f"cpu, cuda or cuda:N{shown}")


def add_precision_option(parser, default: str | None = "fp32") -> None:
    from ..precision import PRECISIONS  # noqa: PLC0415

    parser.add_argument("--precision", choices=PRECISIONS, default=default,
                        help="fp32; tf32 (float32 products on TF32 tensor cores); bf16 or fp16 (mixed precision: "
                             "products in 16 bits with float32 accumulation, weights, reductions and optimizer "
                             "in float32; fp16 with loss scaling). GPU only, except fp32 (default: fp32)")


def add_cuda_graph_option(parser) -> None:
    parser.add_argument("--cuda-graph", action="store_true", default=None,
                        help="GPU: capture each step's forward and backward once as a CUDA graph and replay it "
                             "(the step is then no longer bound by Python's kernel launches; needs --dropout 0 "
                             "and the same batch shape every step; the first step runs uncaptured)")


def add_json_option(parser, what: str = "print one JSON object instead of text") -> None:
    parser.add_argument("--json", action="store_true", help=what)


def add_seed_option(parser, default: int | None, help: str) -> None:
    parser.add_argument("--seed", metavar="N", type=argtypes.non_negative_int, default=default, help=help)


def add_run_option(parser, required: bool = True,
                   help: str = "a run directory written by `minillm train`") -> None:
    """``--run RUN_DIR``: the run to read a model (and its tokenizer) from."""
    parser.add_argument("--run", metavar="RUN_DIR", required=required, help=help)


# ---------------------------------------------------------------- model, training and parallel options

# GPTConfig / TrainConfig / mesh field -> (option, metavar, type, what it sets): each option defined once, for
# every command that takes it (train, bench train, finetune); the option's ``dest`` is the field's name.
CONFIG_OPTIONS = {
    "n_layer": ("--n-layer", "N", argtypes.positive_int, "blocks"),
    "n_head": ("--n-head", "N", argtypes.positive_int, "attention heads"),
    "d_model": ("--d-model", "N", argtypes.positive_int, "width"),
    "context_length": ("--context", "N", argtypes.positive_int, "sequence length"),
    "vocab_size": ("--vocab-size", "N", argtypes.positive_int, "vocabulary size"),
    "dropout": ("--dropout", "X", argtypes.probability, "dropout probability"),
    "steps": ("--steps", "N", argtypes.positive_int, "optimizer steps"),
    "batch_size": ("--batch-size", "N", argtypes.positive_int, "windows per micro-batch"),
    "grad_accum": ("--grad-accum", "N", argtypes.positive_int, "micro-batches per step"),
    "lr": ("--lr", "X", argtypes.positive_float, "peak learning rate"),
    "min_lr": ("--min-lr", "X", argtypes.non_negative_float, "final learning rate"),
    "warmup": ("--warmup", "N", argtypes.non_negative_int, "warmup steps"),
    "weight_decay": ("--weight-decay", "X", argtypes.non_negative_float, "AdamW weight decay"),
    "clip": ("--clip", "X", argtypes.non_negative_float, "gradient-norm clip, 0 = off"),
    "eval_interval": ("--eval-interval", "N", argtypes.non_negative_int, "steps between evaluations"),
    "eval_batches": ("--eval-batches", "N", argtypes.positive_int, "validation batches per evaluation"),
    "checkpoint_interval": ("--checkpoint-interval", "N", argtypes.non_negative_int, "steps between checkpoints"),
    "dp": ("--dp", "D", argtypes.positive_int, "data-parallel replicas"),
    "tp": ("--tp", "T", argtypes.positive_int, "tensor-parallel ranks"),
    "pp": ("--pp", "P", argtypes.positive_int, "pipeline stages"),
    "micro_batches": ("--micro-batches", "M", argtypes.positive_int, "micro-batches per step"),
}


def add_config_options(parser, shown: dict, defaults: dict | None = None, what: dict | None = None) -> None:
    """An option of ``CONFIG_OPTIONS`` per field of ``shown``, in that order; None unless ``defaults`` has a value.

    The help is "<what it sets> (default: <shown[field]>)", in the table's words
    unless ``what`` gives the command's own; a field shown as None takes
    ``what[field]`` as its whole help.

    >>> add_config_options(p, {"batch_size": 8, "grad_accum": 1}, defaults={"batch_size": 8})
    # --batch-size N  windows per micro-batch (default: 8)    -> args.batch_size, 8 when not given
    # --grad-accum N  micro-batches per step (default: 1)     -> args.grad_accum, None when not given
    """
    defaults, what = defaults or {}, what or {}
    for field, default in shown.items():
        option, metavar, kind, words = CONFIG_OPTIONS[field]
        words = what.get(field, words)
        parser.add_argument(option, dest=field, metavar=metavar, type=kind, default=defaults.get(field),
                            help=words if default is None else f"{words} (default: {default})")


def add_schedule_option(parser, default: str | None, help: str) -> None:
    """``--schedule gpipe|1f1b``: the pipeline schedule."""
    parser.add_argument("--schedule", choices=("gpipe", "1f1b"), default=default, help=help)


def check_schedule(args: argparse.Namespace) -> None:
    """--schedule without --pp 2 or more: say it has nothing to schedule, rather than ignore it."""
    if getattr(args, "schedule", None) is not None and (getattr(args, "pp", None) or 1) == 1:
        raise ValueError(f"--schedule {args.schedule} picks a pipeline schedule: it needs --pp 2 or more")


def given_fields(args: argparse.Namespace, config_class) -> dict[str, Any]:
    """The fields of the dataclass ``config_class`` that were given on the command line.

    An option whose ``dest`` is a field name (``--batch-size`` -> ``batch_size``) and whose value
    is not None counts as given, so a new config field only needs an option of the same name.
    """
    return {field.name: getattr(args, field.name) for field in dataclasses.fields(config_class)
            if getattr(args, field.name, None) is not None}


def say(message: str) -> None:
    """A progress or status line for the user: stderr, so that stdout stays the command's output."""
    print(message, file=sys.stderr, flush=True)


def warn(message: str) -> None:
    """Something the user should know that does not stop the command (exit code stays 0)."""
    print(f"minillm: warning: {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- paths, checked before any work


def check_input_files(paths, option: str) -> list[Path]:
    """Each path names an existing file (not a folder): checked before the work starts, in the user's words."""
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            raise IsADirectoryError(21, f"{option} wants text files, and this is a folder "
                                        f"(give the files in it, e.g. {path / '*.txt'})", str(path))
        if not path.is_file():
            raise FileNotFoundError(2, "No such file", str(path))
        files.append(path)
    return files


def read_text(path: str | None) -> str:
    """The whole text of ``path`` (None or ``-``: standard input), as UTF-8, line endings kept.

    Read as bytes and decoded here, so that bytes that are not UTF-8 stop the command with the
    file's name (standard input would otherwise hand them on as lone surrogates, which fail later
    with a codec message about "surrogates not allowed").
    """
    if path is None or path == "-":
        if not hasattr(sys.stdin, "buffer"):    # a text stream already (tests, an embedding program)
            return sys.stdin.read()
        name, data = "standard input", sys.stdin.buffer.read()
    else:
        name, data = path, Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{name}: not UTF-8 text (byte 0x{data[error.start]:02x} at offset {error.start}: "
                         f"{error.reason}); convert it to UTF-8 first") from None


def check_model_directory(path, option: str, run_option: str) -> None:
    """A model folder given with the other kind's option (a minillm run as ``--hf``, a Hugging Face folder
    as ``--run``/``--from``): say so, and which option reads it, instead of failing on a file inside it."""
    folder = Path(path)
    is_run, is_hf = (folder / "checkpoint.json").is_file(), (folder / "config.json").is_file()
    if option.startswith("--hf") and is_run and not is_hf:
        raise ValueError(f"{path} is a minillm run (checkpoint.json, no config.json), not a Hugging Face "
                         f"directory: give it as {run_option} {path}")
    if option == run_option and is_hf and not is_run:
        raise ValueError(f"{path} is a Hugging Face directory (config.json, no checkpoint.json), not a minillm "
                         f"run: give it as --hf {path}")


def check_output_file(path, option: str, example: str = "out.json") -> Path:
    """``path`` can be written as a file: not a folder, and its folder exists (checked before the work)."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(21, f"{option} names a folder; give a file name, e.g. {path / example}", str(path))
    if not path.parent.is_dir():
        raise FileNotFoundError(2, f"No such folder to write {option} into", str(path.parent))
    if not os.access(path.parent, os.W_OK):
        raise PermissionError(13, f"Permission denied: {option} cannot be written into {path.parent}", str(path))
    return path
