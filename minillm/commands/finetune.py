"""``minillm finetune classify|sft|dpo``: post-train a run (or a GPT-2 checkpoint) on your data.

    minillm finetune classify --data sms.tsv --from runs/pydoc --out runs/spam --balance --truncate
    minillm finetune classify --data sms.tsv --from runs/pydoc --out runs/spam-lora --lora-rank 16 --balance --truncate
    minillm finetune sft --data instruction-data.json --from runs/pydoc --out runs/sft --truncate
    minillm finetune dpo --data instruction-data-with-preference.json --from runs/sft --out runs/dpo --truncate
    minillm finetune sft --data instruction-data.json --hf gpt2/ --out runs/gpt2-sft --device cuda
    minillm finetune classify --out runs/spam --resume          # continue an interrupted run exactly

The work is :func:`minillm.finetune.finetune` on the same Trainer as
``minillm train``: checkpoints each epoch, metrics.jsonl, a progress bar,
Ctrl-C saves and stops. ``minillm classify --run RUN_DIR`` then labels texts;
``minillm generate --run SFT_RUN --instruction "..."`` answers instructions.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
from pathlib import Path

from .. import backend
from . import argtypes
from .common import add_command, add_config_options, add_device_option, add_seed_option, check_model_directory, say

# per task: (learning rate, epochs) that work for the small default model (see docs/finetuning.md)
TASK_DEFAULTS = {"classify": (5e-4, 5), "sft": (5e-4, 3), "dpo": (1e-4, 1)}
TRAIN_FIELDS = ("batch_size", "grad_accum", "lr", "min_lr", "warmup", "weight_decay", "clip", "seed",
                "eval_interval", "checkpoint_interval")


def register(subparsers) -> argparse.ArgumentParser:
    p = add_command(subparsers, "finetune", help="fine-tune a run: classify, instruction tuning (sft) or dpo",
                    description="Post-train a language model: a classifier (classify), instruction tuning "
                                "(sft) or preference tuning (dpo). The model comes from a 'minillm train' or "
                                "fine-tuning run (--from) or a Hugging Face directory (--hf).")
    tasks = p.add_subparsers(dest="task", metavar="TASK")
    tasks.required = True
    helps = {"classify": "a classifier: label<TAB>text lines, CSV with a header, or JSONL {text, label}",
             "sft": "instruction tuning on {instruction, input, output} records (Alpaca prompt)",
             "dpo": "preference tuning on {instruction, input, chosen, rejected} records"}
    for task in ("classify", "sft", "dpo"):
        t = add_command(tasks, task, help=helps[task])
        _add_common(t, task)
        own = t.add_argument_group(f"{task} options")
        if task == "classify":
            own.add_argument("--trainable", choices=("head", "last-block", "all"), default=None,
                           help="what trains: the new head, the last block + final norm + head (default), or all")
            own.add_argument("--read", choices=("last", "end"), default=None,
                             help="the hidden state the head reads: the last real token of each text (default), "
                                  "or 'end', the book's way: every text padded to the longest training text, "
                                  "the final position read")
            own.add_argument("--balance", action="store_true",
                           help="undersample every class to the size of the smallest (seeded)")
            own.add_argument("--text-column", metavar="NAME", default="text", help="text field of CSV/JSONL (default: text)")
            own.add_argument("--label-column", metavar="NAME", default="label",
                           help="label field of CSV/JSONL (default: label)")
        if task == "sft":
            own.add_argument("--mask-prompt", action="store_true", help="no loss on the prompt's tokens (response only)")
            own.add_argument("--max-new-tokens", metavar="N", type=argtypes.positive_int, default=None,
                           help="length limit of the responses to the test instructions (default: 128)")
        if task == "dpo":
            own.add_argument("--beta", metavar="X", type=argtypes.positive_float, default=None,
                           help="DPO's beta: small lets the policy move further from the reference (default: 0.1)")
        t.set_defaults(func=run_finetune)
    return p


def _add_common(p: argparse.ArgumentParser, task: str) -> None:
    lr, epochs = TASK_DEFAULTS[task]
    source = p.add_argument_group("data and model")
    source.add_argument("--data", metavar="FILE", help="the data file (.tsv, .csv, .jsonl or .json)")
    source.add_argument("--out", metavar="RUN_DIR", required=True, help="the run directory to write (or resume)")
    start = source.add_mutually_exclusive_group()
    start.add_argument("--from", dest="from_run", metavar="RUN_DIR",
                       help="start from this run: 'minillm train', sft or dpo (LoRA adapters merged in)")
    start.add_argument("--hf", metavar="DIR", help="start from a Hugging Face directory: gpt2, llama or qwen3 "
                                                    "(config.json + model.safetensors + tokenizer files)")
    source.add_argument("--tokenizer", metavar="SPEC", help="for --hf: gpt2:DIR or a tokenizer file "
                                                             "(default: the tokenizer in the model's directory)")
    source.add_argument("--random-init", action="store_true",
                        help="keep the architecture and tokenizer of --from/--hf but start from random weights "
                             "(a baseline without pretraining)")
    source.add_argument("--truncate", action="store_true",
                        help="cut texts longer than the model's context instead of stopping with an error")
    source.add_argument("--split-seed", metavar="N", type=argtypes.non_negative_int, default=None,
                        help="seeds the (balance and) train/val/test split and each epoch's batch order "
                             "(default: 123)")

    lora = p.add_argument_group("LoRA (instead of training the weights)")
    lora.add_argument("--lora-rank", metavar="R", type=argtypes.non_negative_int, default=None,
                      help="train rank-R adapters on every Linear of the blocks, the base frozen (default: 0, off)")
    lora.add_argument("--lora-alpha", metavar="A", type=argtypes.positive_float, default=None,
                      help="LoRA scale alpha (the update is alpha/R * B A; default: 16)")
    lora.add_argument("--lora-dropout", metavar="X", type=argtypes.probability, default=None,
                      help="dropout on the adapters' input (default: 0)")

    train = p.add_argument_group("training")
    train.add_argument("--epochs", metavar="N", type=argtypes.positive_int, default=None,
                       help=f"passes over the training split (default: {epochs})")
    add_config_options(train, {
        "batch_size": 8, "grad_accum": 1, "lr": f"{lr:g}", "min_lr": "lr / 10",
        "warmup": "a tenth of the steps, at most 100", "weight_decay": 0.1, "clip": 1.0,
        "eval_interval": "once per epoch", "checkpoint_interval": "once per epoch"},
        what={"batch_size": "examples per micro-batch", "min_lr": "final learning rate of the cosine"})
    add_device_option(train, default=None)
    add_seed_option(train, None, "seeds the new head, LoRA's A and dropout (default: 1337)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its checkpoint, with the settings it was started with")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


# ================================================================ running


def run_finetune(args: argparse.Namespace) -> int:
    from .. import manual_seed  # noqa: PLC0415
    from ..finetune import FinetuneConfig, finetune  # noqa: PLC0415
    from ..finetune.run import read_run_info  # noqa: PLC0415
    from ..train.checkpoint import read_metadata  # noqa: PLC0415

    out = Path(args.out)
    if args.resume:
        info = read_run_info(out)
        if info["finetune"]["task"] != args.task:
            raise ValueError(f"{out} is a {info['finetune']['task']} run, not {args.task}")
        config = FinetuneConfig(**info["finetune"])
        train = dict(read_metadata(out)["train_config"])
        if args.device is not None:
            train["device"] = args.device
        base = config.base
    else:
        config, train = _new_run(args)
        base = config.base
    train["progress"] = not args.quiet
    device = backend.parse_device(train.get("device", "cpu"))   # fails now when CUDA is missing
    gpt, tokenizer = _load_base(base, device)
    manual_seed(train.get("seed", 1337))
    if base.get("random_init"):
        from ..models import GPT  # noqa: PLC0415

        gpt = GPT(gpt.config)
    with _held_run_directory(out):
        result = finetune(gpt, tokenizer, config, train, run_dir=out, resume=args.resume, say=say)
    if result.interrupted:
        say(f"stopped at step {result.step}; continue with: minillm finetune {args.task} --out {out} --resume")
        return 130
    summary = ", ".join(f"{k} {v:.4f}" for k, v in result.metrics.items() if isinstance(v, float)
                        and k != "val_perplexity")
    say(f"done: step {result.step} in {result.seconds:.0f} s; {summary}; run in {out}")
    return 0


@contextlib.contextmanager
def _held_run_directory(out: Path):
    """--out held for the run (no second run writes into it meanwhile); created here so that it can
    be held, and removed again if the run fails before writing anything into it."""
    from ..train.run import hold_run_directory  # noqa: PLC0415

    created = next((d for d in [out, *out.parents][::-1] if not d.exists()), None)
    out.mkdir(parents=True, exist_ok=True)
    with hold_run_directory(out):                 # refused: another run's folder, so nothing is undone
        try:
            yield
        except BaseException:
            if created is not None and not any(out.iterdir()):
                shutil.rmtree(created, ignore_errors=True)
            raise


def _new_run(args: argparse.Namespace):
    from ..finetune import FinetuneConfig  # noqa: PLC0415
    from ..train.checkpoint import has_checkpoint  # noqa: PLC0415

    if args.data is None:
        raise ValueError("--data FILE is required (the records to fine-tune on)")
    if Path(args.data).is_dir():
        raise IsADirectoryError(21, "--data wants a data file (.tsv, .csv, .jsonl or .json), and this is a folder",
                                str(args.data))
    if not Path(args.data).is_file():
        raise FileNotFoundError(f"no data file {args.data!r}")
    if args.from_run is None and args.hf is None:
        raise ValueError("say where to start: --from RUN_DIR (e.g. a 'minillm train' run) or --hf DIR")
    if args.tokenizer is not None and args.hf is None:
        raise ValueError("--tokenizer is for --hf; a run directory brings its own tokenizer")
    check_model_directory(args.from_run or args.hf, "--from" if args.from_run else "--hf", "--from")
    if has_checkpoint(args.out):
        raise ValueError(f"{args.out} already holds a run: add --resume to continue it, or choose another --out")
    lr, epochs = TASK_DEFAULTS[args.task]
    base = {"run": args.from_run} if args.from_run else {"hf": args.hf, "tokenizer": args.tokenizer}
    if args.random_init:
        base["random_init"] = True
    fields = dict(task=args.task, data=str(args.data), base=base, truncate=args.truncate,
                  epochs=args.epochs or epochs)
    optional = {"split_seed": args.split_seed, "lora_rank": args.lora_rank, "lora_alpha": args.lora_alpha,
                "lora_dropout": args.lora_dropout, "trainable": getattr(args, "trainable", None),
                "beta": getattr(args, "beta", None), "max_new_tokens": getattr(args, "max_new_tokens", None),
                "read": getattr(args, "read", None)}
    fields.update({k: v for k, v in optional.items() if v is not None})
    if getattr(args, "balance", False):
        fields["balance"] = True
    if getattr(args, "mask_prompt", False):
        fields["mask_prompt"] = True
    if args.lora_rank and getattr(args, "trainable", None):
        raise ValueError("--trainable and --lora-rank exclude each other: with LoRA the adapters and the head train")
    if args.task == "classify":
        fields.update(text_column=args.text_column, label_column=args.label_column)
    config = FinetuneConfig(**fields)
    train = {name: getattr(args, name) for name in TRAIN_FIELDS if getattr(args, name, None) is not None}
    train.setdefault("lr", lr)
    train.setdefault("min_lr", train["lr"] / 10)
    if train["min_lr"] > train["lr"]:
        raise ValueError(f"--min-lr {train['min_lr']} is above --lr {train['lr']}")
    train["device"] = args.device or "cpu"
    return config, train


def _load_base(base: dict, device: str):
    """(GPT, tokenizer) where the run starts: a run directory or a Hugging Face directory."""
    if "run" in base:
        from ..finetune import load_language_model  # noqa: PLC0415

        return load_language_model(base["run"], device)
    from ..weights.pretrained import load_pretrained  # noqa: PLC0415

    return load_pretrained(base["hf"], base.get("tokenizer"), device, model_types=None)   # gpt2, llama, qwen3
