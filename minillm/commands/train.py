"""``minillm train``: train a GPT (by default a small one on the built-in corpus), then print samples.

    minillm train                                   # BPE + small GPT on the Python docs, ~2 min on 2 idle cores
    minillm train --data input.txt --tokenizer bytes --steps 2000 --out runs/mine
    minillm train --resume runs/mine                # continue exactly where it stopped
    minillm train --arch llama --n-kv-head 2        # the same size, Llama-style: rope, RMSNorm, SwiGLU, GQA

Every option defaults to None here (not given) and is resolved by
:func:`minillm.train.run.resolve_run`: a new run starts from the library's
defaults, a resumed one from what its run directory saved. An option whose
``dest`` is a ``GPTConfig`` or ``TrainConfig`` field name reaches the config
without further code (see :func:`~minillm.commands.common.given_fields`).
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path
from types import SimpleNamespace

from ..train.run import DEFAULT_MODEL, DEFAULT_PROMPTS, DEFAULT_TOKENIZER, DEFAULT_TRAIN, check_prompts, \
    new_run_directory, prepare_run, print_samples, resolve_run, start_run
from . import argtypes
from .common import (add_command, add_config_options, add_cuda_graph_option, add_device_option, add_precision_option,
                     add_schedule_option, add_seed_option, check_schedule, given_fields, say)

ARCHITECTURES = ("gpt2", "llama", "qwen3")


def architecture_fields(name: str) -> dict:
    """The GPTConfig fields that make the decoder a ``--arch`` (the sizes come from the other options)."""
    from ..models import LLAMA_STYLE  # noqa: PLC0415

    if name == "gpt2":
        return dict(positions="learned", norm="layernorm", mlp="gelu", bias=True, qk_norm=False)
    return dict(LLAMA_STYLE, qk_norm=name == "qwen3")


def register(subparsers) -> argparse.ArgumentParser:
    p = add_command(
        subparsers, "train", help="train a GPT (default: a small one on the built-in corpus), then print samples",
        description="Train a GPT. With no arguments: a BPE tokenizer and a small GPT on the Python "
                    "reference docs that ship with CPython (about 2 minutes on an idle 2-core CPU), then samples.")
    data = p.add_argument_group("data")
    data.add_argument("--data", nargs="+", metavar="FILE",
                      help="UTF-8 text files or folders of *.txt (default: the built-in Python docs corpus)")
    data.add_argument("--tokenizer", type=argtypes.tokenizer_spec, metavar="SPEC",
                      help=f"bytes | bpe:N (train one, N tokens) | gpt2:DIR | a tokenizer file "
                           f"(default: {DEFAULT_TOKENIZER})")
    data.add_argument("--val-fraction", metavar="X", type=argtypes.probability,
                      help="held-out tail of the tokens (default: 0.1)")
    data.add_argument("--stride", metavar="N", type=argtypes.positive_int,
                      help="distance between training windows (default: 1, every start position)")

    model = p.add_argument_group("model")
    model.add_argument("--preset", metavar="NAME", type=argtypes.preset,
                       help="a GPTConfig preset (tiny, gpt2-124m, ...); the sizes below override it")
    sizes = {name: DEFAULT_MODEL[name] for name in ("n_layer", "n_head", "d_model", "context_length")}
    add_config_options(model, {**sizes, "dropout": 0},
                       what={"context_length": "context length, also the training window"})
    model.add_argument("--arch", choices=ARCHITECTURES,
                       help="gpt2: learned positions, LayerNorm, GELU MLP, biases; llama: rotary positions, "
                            "RMSNorm, SwiGLU MLP, no biases; qwen3: llama with q/k norm (default: the preset's, "
                            "else gpt2)")
    model.add_argument("--n-kv-head", metavar="N", type=argtypes.positive_int,
                       help="key/value heads, dividing --n-head: grouped-query attention (default: --n-head)")

    train = p.add_argument_group("training")
    add_config_options(train, {
        "steps": DEFAULT_TRAIN["steps"], "batch_size": DEFAULT_TRAIN["batch_size"], "grad_accum": 1,
        "lr": DEFAULT_TRAIN["lr"], "min_lr": f"{DEFAULT_TRAIN['min_lr']}, at most --lr",
        "warmup": f"{DEFAULT_TRAIN['warmup']}, at most a tenth of --steps", "weight_decay": 0.1, "clip": 1.0,
        "eval_interval": DEFAULT_TRAIN["eval_interval"], "eval_batches": DEFAULT_TRAIN["eval_batches"],
        "checkpoint_interval": DEFAULT_TRAIN["checkpoint_interval"]},
        what={"eval_interval": "steps between evaluations, 0 = only at the end",
              "checkpoint_interval": "steps between checkpoints, 0 = only at the end"})
    add_device_option(train, default=None)
    add_precision_option(train, default=None)
    add_cuda_graph_option(train)
    add_seed_option(train, None, "random seed (default: 1337)")

    parallel = p.add_argument_group("parallel training (start the processes with minillm launch)")
    add_config_options(parallel, {"dp": 1, "tp": 1, "pp": 1, "micro_batches": None}, what={
        "dp": "data-parallel replicas, each on its share of every batch; --batch-size stays the global batch",
        "tp": "tensor-parallel ranks splitting every block's attention heads and MLP; T must divide --n-head",
        "pp": "pipeline stages: the blocks cut into P contiguous stages balanced by cost, one per process",
        "micro_batches": "split each step's --batch-size windows into M micro-batches (the pipeline's units; "
                         "the same arithmetic as --batch-size B/M --grad-accum M)"})
    add_schedule_option(parallel, None, "pipeline schedule: all forwards then all backwards, or one-forward-"
                                        "one-backward with at most P micro-batches in flight (default: 1f1b)")

    run = p.add_argument_group("run directory")
    run.add_argument("--out", metavar="RUN_DIR", help="run directory (default: runs/<data name>, numbered if taken)")
    run.add_argument("--resume", nargs="?", const=True, metavar="RUN_DIR",
                     help="continue the run in RUN_DIR (or in --out) from its checkpoint, with the options it "
                          "saved (the defaults above are a new run's); training options given again override them, "
                          "the model's shape and the data cannot change")

    sample = p.add_argument_group("samples printed at the end")
    sample.add_argument("--samples", metavar="N", type=argtypes.non_negative_int, default=3,
                        help="how many, 0 = none (default: 3)")
    sample.add_argument("--sample-tokens", metavar="N", type=argtypes.positive_int, default=100,
                        help="new tokens per sample (default: 100)")
    sample.add_argument("--temperature", metavar="X", type=argtypes.non_negative_float, default=0.8,
                        help="0 = greedy (default: 0.8)")
    sample.add_argument("--prompt", action="append", metavar="TEXT",
                        help=f"a prompt, repeatable (default: {' '.join(repr(p) for p in DEFAULT_PROMPTS)})")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run_train)
    return p


def plan_from_args(args: argparse.Namespace):
    """The :class:`~minillm.train.run.RunPlan` the options describe (shared with commands that train too)."""
    from ..models import GPTConfig  # noqa: PLC0415
    from ..train import TrainConfig  # noqa: PLC0415

    split_micro_batches(args)
    check_schedule(args)
    check_not_a_finetune_run(args.out if args.resume is True else args.resume)
    train = given_fields(args, TrainConfig)
    if getattr(args, "quiet", False):
        train["progress"] = False
    model = {k: v for k, v in given_fields(args, GPTConfig).items() if k != "vocab_size"}
    if getattr(args, "arch", None) is not None:
        model = {**architecture_fields(args.arch), **model}
    return resolve_run(out=args.out, resume=args.resume, data=args.data, tokenizer=args.tokenizer,
                       val_fraction=args.val_fraction, stride=args.stride, preset=args.preset, model=model,
                       train=train)


def check_not_a_finetune_run(run_dir) -> None:
    """--resume of a 'minillm finetune' run: say which command continues it (it has no run.json to resume)."""
    from ..finetune.run import is_finetune_run, read_run_info  # noqa: PLC0415

    if run_dir and is_finetune_run(run_dir):
        task = read_run_info(run_dir)["finetune"]["task"]
        raise ValueError(f"{run_dir} is a fine-tuning run ({task}): continue it with "
                         f"minillm finetune {task} --out {shlex.quote(str(run_dir))} --resume")


def split_micro_batches(args: argparse.Namespace) -> None:
    """--batch-size B --micro-batches M -> B/M windows per micro-batch, M micro-batches per step."""
    micro = getattr(args, "micro_batches", None)
    if micro is None:
        return
    if args.grad_accum is not None:
        raise ValueError("give --micro-batches or --grad-accum, not both (they are the same thing)")
    if args.batch_size is None:
        raise ValueError("--micro-batches needs --batch-size: the global batch it splits")
    if args.batch_size % micro:
        raise ValueError(f"--batch-size {args.batch_size} must be a multiple of --micro-batches {micro}")
    args.batch_size, args.grad_accum = args.batch_size // micro, micro


def join_mesh(args: argparse.Namespace, plan):
    """None for one process; else this rank's ``DeviceMesh`` (sizes checked first), the run's device
    set to this rank's GPU and the run directory agreed on (rank 0's choice)."""
    from ..distributed.mesh import MeshShape, init_mesh  # noqa: PLC0415

    shape = MeshShape(pp=getattr(args, "pp", None) or 1, dp=args.dp or 1, tp=args.tp or 1)
    if shape.size == 1:
        return None
    cfg = plan.train
    if cfg.batch_size % shape.dp:
        raise ValueError(f"each micro-batch of {cfg.batch_size} windows (--batch-size / --micro-batches) is split "
                         f"over the --dp {shape.dp} replicas: it must be a multiple of {shape.dp}")
    if shape.tp > 1:                              # heads that split evenly, no dropout: before any work
        from ..distributed.tensor_parallel import check_tensor_parallel  # noqa: PLC0415

        check_tensor_parallel(SimpleNamespace(**{"n_kv_head": None, "dropout": 0.0, **plan.model}), shape.tp)
    mesh, cfg.device = init_mesh(shape, cfg.device)
    if args.out is None and not plan.resume:
        from ..distributed.parallel_trainer import all_gather_json  # noqa: PLC0415

        plan.run_dir = Path(all_gather_json(mesh.world, str(plan.run_dir), cfg.device)[0])
    if mesh.world.rank != 0:
        cfg.progress = False                      # one progress bar, one writer
    return mesh


def run_train(args: argparse.Namespace) -> int:
    plan = plan_from_args(args)                   # options checked; nothing read or written yet
    mesh = join_mesh(args, plan)                  # a parallel run: this rank's place in the grid
    prepared = prepare_run(plan)                  # data read, tokenizer made; nothing written yet
    prompts = args.prompt or DEFAULT_PROMPTS
    if mesh is not None and args.samples:
        args.samples = 0                          # the model is spread over the ranks: sample from the checkpoint
    if args.samples:
        check_prompts(prepared.tokenizer, prompts, prepared.model_config.context_length)
    if mesh is not None and mesh.world.rank != 0:
        trainer = start_run(prepared, mesh, getattr(args, "schedule", None) or "1f1b")
        return 130 if trainer.fit().interrupted else 0     # the ranks stop together (OneWriter): all say so
    with new_run_directory(plan):                 # a failed start leaves no folder behind
        trainer = start_run(prepared, mesh, getattr(args, "schedule", None) or "1f1b")
        cfg, model = plan.train, trainer.model
        model_config, dataset = model.config, trainer.data
        if plan.resume:
            say(f"resuming {plan.run_dir} at step {trainer.step} of {cfg.steps}")
        tokens_per_step = cfg.batch_size * cfg.grad_accum * model_config.context_length
        say(f"model: {model.num_parameters():,} parameters ({model_config.n_layer} layers, {model_config.n_head} "
            f"heads, d_model {model_config.d_model}, context {model_config.context_length}, vocab "
            f"{model_config.vocab_size}); data: {len(dataset.train.tokens):,} train / {len(dataset.val.tokens):,} "
            f"val tokens; {tokens_per_step:,} tokens per step on {trainer.device}; run dir {plan.run_dir}")
        result = trainer.fit()
    if result.interrupted:
        say(f"stopped at step {result.step}; continue with: minillm train --resume {plan.run_dir}")
        return 130
    val = f", val loss {result.val_loss:.4f}" if result.val_loss is not None else ""
    if result.train_loss is not None:
        say(f"done: step {result.step}, train loss {result.train_loss:.4f}{val}; {result.seconds:.0f} s "
            f"({result.tokens_per_second:,.0f} tokens/s overall); checkpoint in {plan.run_dir}")
    if args.samples:
        print_samples(model, prepared.tokenizer, prompts, args.samples, args.sample_tokens, args.temperature,
                      seed=cfg.seed)
    say(next_steps(plan.run_dir, prompts[0]))
    return 0


def next_steps(run_dir, prompt: str) -> str:
    """Where the metrics are, and the commands to try next (printed at the end of a run)."""
    from ..train.trainer import METRICS_FILE  # noqa: PLC0415

    run = shlex.quote(str(run_dir))
    return (f"metrics: {Path(run_dir) / METRICS_FILE}\n"
            f"plot them:  minillm plot {run}\n"
            f"sample:     minillm generate --run {run} --prompt {shlex.quote(prompt)}")
