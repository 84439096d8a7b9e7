"""``minillm train`` and ``minillm bench train``.

    minillm train                                   # BPE + small GPT on the Python docs, ~5 min on 2 cores
    minillm train --data input.txt --tokenizer bytes --steps 2000 --out runs/mine
    minillm train --resume runs/mine                # continue exactly where it stopped
    minillm bench train                             # tokens/s and peak memory, 6L/6H/384d, T=256, B=8
    minillm bench train --preset gpt2-124m --context 1024 --device cuda

A run directory holds everything needed to resume or sample: ``run.json``
(the data and tokenizer of the run), ``tokenizer.json``, the cached token file
``tokens.bin``, ``metrics.jsonl`` and the latest checkpoint.

Every option defaults to None here and is resolved in :func:`resolve_run`:
a new run starts from :data:`DEFAULT_MODEL` / ``TrainConfig()``'s defaults, a
resumed one from what its run directory saved, and options given on the
command line override either (a resumed model's shape cannot change).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from .. import argtypes, backend
from .checkpoint import CheckpointError, config_differences, has_checkpoint, read_metadata
from .trainer import TrainConfig, Trainer

RUN_FILE = "run.json"
TOKENIZER_FILE = "tokenizer.json"
TOKENS_FILE = "tokens.bin"

# `minillm train` with no arguments: sized to learn visibly on the built-in
# corpus (~130k tokens at bpe:2048) in about five minutes on a 2-core CPU.
DEFAULT_TOKENIZER = "bpe:2048"
DEFAULT_MODEL = dict(n_layer=4, n_head=4, d_model=128, context_length=128, dropout=0.0)
DEFAULT_TRAIN = dict(steps=1500, batch_size=8, lr=2e-3, min_lr=2e-4, warmup=100, eval_interval=250,
                     eval_batches=20, checkpoint_interval=250)
DEFAULT_PROMPTS = ["The ", "If the ", "A "]

# options that say where, how long and how verbosely a run goes, not what a step computes:
# changing them on --resume needs no warning (a new `steps` also stretches the lr schedule)
SAME_RUN_TRAIN_FIELDS = {"steps", "device", "progress", "eval_interval", "eval_batches", "checkpoint_interval"}


# ================================================================ minillm train


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``train`` on the ``minillm`` subparsers object."""
    p = subparsers.add_parser(
        "train", help="train a GPT (default: a small one on the built-in corpus), then print samples",
        description="Train a GPT. With no arguments: a BPE tokenizer and a small GPT on the Python "
                    "reference docs that ship with CPython (about 5 minutes on a 2-core CPU), then samples.")
    data = p.add_argument_group("data")
    data.add_argument("--data", nargs="+", metavar="FILE",
                      help="UTF-8 text files or folders of *.txt (default: the built-in Python docs corpus)")
    data.add_argument("--tokenizer", type=argtypes.tokenizer_spec, metavar="SPEC",
                      help=f"bytes | bpe:N (train one, N tokens) | gpt2:DIR | a tokenizer file "
                           f"(default {DEFAULT_TOKENIZER})")
    data.add_argument("--val-fraction", metavar="X", type=argtypes.probability, help="held-out tail of the tokens (default 0.1)")
    data.add_argument("--stride", metavar="N", type=argtypes.positive_int,
                      help="distance between training windows (default 1: every start position)")

    model = p.add_argument_group("model")
    model.add_argument("--preset", metavar="NAME", type=argtypes.preset, help="a GPTConfig preset (tiny, gpt2-124m, ...); sizes below override it")
    model.add_argument("--n-layer", metavar="N", type=argtypes.positive_int, help=f"blocks (default {DEFAULT_MODEL['n_layer']})")
    model.add_argument("--n-head", metavar="N", type=argtypes.positive_int, help=f"attention heads (default {DEFAULT_MODEL['n_head']})")
    model.add_argument("--d-model", metavar="N", type=argtypes.positive_int, help=f"width (default {DEFAULT_MODEL['d_model']})")
    model.add_argument("--context", metavar="N", type=argtypes.positive_int,
                       help=f"context length, also the training window (default {DEFAULT_MODEL['context_length']})")
    model.add_argument("--dropout", metavar="X", type=argtypes.probability, help="dropout probability (default 0)")

    train = p.add_argument_group("training")
    train.add_argument("--steps", metavar="N", type=argtypes.positive_int, help=f"optimizer steps (default {DEFAULT_TRAIN['steps']})")
    train.add_argument("--batch-size", metavar="N", type=argtypes.positive_int, help=f"windows per micro-batch (default {DEFAULT_TRAIN['batch_size']})")
    train.add_argument("--grad-accum", metavar="N", type=argtypes.positive_int, help="micro-batches per step (default 1)")
    train.add_argument("--lr", metavar="X", type=argtypes.positive_float, help=f"peak learning rate (default {DEFAULT_TRAIN['lr']})")
    train.add_argument("--min-lr", metavar="X", type=argtypes.non_negative_float, help=f"final learning rate (default {DEFAULT_TRAIN['min_lr']})")
    train.add_argument("--warmup", metavar="N", type=argtypes.non_negative_int, help=f"warmup steps (default {DEFAULT_TRAIN['warmup']})")
    train.add_argument("--weight-decay", metavar="X", type=argtypes.non_negative_float, help="AdamW weight decay (default 0.1)")
    train.add_argument("--clip", metavar="X", type=argtypes.non_negative_float, help="gradient-norm clip, 0 = off (default 1.0)")
    train.add_argument("--eval-interval", metavar="N", type=argtypes.non_negative_int, help="steps between evaluations (0: only at the end)")
    train.add_argument("--eval-batches", metavar="N", type=argtypes.positive_int, help="validation batches per evaluation")
    train.add_argument("--checkpoint-interval", metavar="N", type=argtypes.non_negative_int, help="steps between checkpoints (0: only at the end)")
    train.add_argument("--device", metavar="DEVICE", type=argtypes.device, help="cpu, cuda or cuda:N (default cpu)")
    train.add_argument("--seed", metavar="N", type=int, help="random seed (default 1337)")

    run = p.add_argument_group("run directory")
    run.add_argument("--out", metavar="RUN_DIR", help="run directory (default runs/<data name>, numbered if taken)")
    run.add_argument("--resume", nargs="?", const=True, metavar="RUN_DIR",
                     help="continue the run in RUN_DIR (or in --out) from its checkpoint")

    sample = p.add_argument_group("samples printed at the end")
    sample.add_argument("--samples", metavar="N", type=argtypes.non_negative_int, default=3, help="how many (default 3; 0: none)")
    sample.add_argument("--sample-tokens", metavar="N", type=argtypes.positive_int, default=100, help="new tokens per sample (default 100)")
    sample.add_argument("--temperature", metavar="X", type=argtypes.non_negative_float, default=0.8, help="0 = greedy (default 0.8)")
    sample.add_argument("--prompt", action="append", metavar="TEXT",
                        help=f"a prompt (repeatable; default {DEFAULT_PROMPTS})")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run_train)
    return p


@dataclasses.dataclass
class RunPlan:
    """Everything ``minillm train`` resolved from the arguments (and the run directory, on --resume)."""

    run_dir: Path
    resume: bool
    data: list[str] | None          # text files, None = the built-in corpus
    tokenizer: str                  # the spec, as given
    val_fraction: float
    stride: int
    model: dict[str, Any]           # GPTConfig fields except vocab_size (the tokenizer decides it)
    train: TrainConfig


def resolve_run(args: argparse.Namespace) -> RunPlan:
    """New run: defaults + options. ``--resume``: the saved run + the options allowed to change."""
    if args.resume is not None:
        if args.resume is True and args.out is None:
            raise ValueError("--resume needs a run directory: --resume RUN_DIR, or --out RUN_DIR --resume")
        run_dir = Path(args.out if args.resume is True else args.resume)
        if args.resume is not True and args.out is not None and Path(args.out) != run_dir:
            raise ValueError(f"--resume {args.resume} and --out {args.out} name different run directories")
        return _resolve_resume(args, run_dir)

    run_dir = Path(args.out) if args.out else _fresh_run_dir(args.data)
    if has_checkpoint(run_dir):
        raise ValueError(f"{run_dir} already holds a run: add --resume to continue it, or choose another --out")
    model = dict(DEFAULT_MODEL)
    if args.preset:
        from ..models import GPTConfig  # noqa: PLC0415

        model = GPTConfig.from_preset(args.preset).to_dict()
        model.pop("vocab_size")
    model.update(_given_model_fields(args))
    train = {**TrainConfig().to_dict(), **DEFAULT_TRAIN, **_given_train_fields(args)}
    if args.warmup is None:  # a short run gets a short warmup: at most a tenth of its steps
        train["warmup"] = min(train["warmup"], train["steps"] // 10)
    plan = RunPlan(run_dir, False, [str(Path(f)) for f in args.data] if args.data else None,
                   args.tokenizer or DEFAULT_TOKENIZER,
                   0.1 if args.val_fraction is None else args.val_fraction, args.stride or 1,
                   model, TrainConfig.from_dict(train))
    _check_model_shape(plan.model)
    return plan


def _resolve_resume(args: argparse.Namespace, run_dir: Path) -> RunPlan:
    metadata = read_metadata(run_dir)  # CheckpointError (a RuntimeError: one clear line) if absent/corrupt
    try:
        saved = json.loads((run_dir / RUN_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{run_dir / RUN_FILE} is missing or corrupt ({error})") from None
    model = {k: v for k, v in metadata["model_config"].items() if k != "vocab_size"}
    given = _given_model_fields(args)
    if args.preset:
        raise ValueError("--preset cannot be combined with --resume: the model's shape comes from the checkpoint")
    changed = config_differences({k: model[k] for k in given}, given)
    if changed:
        raise ValueError(f"cannot change the model when resuming {run_dir}: " + "; ".join(changed))
    for option, key in (("--data", "data"), ("--tokenizer", "tokenizer"), ("--val-fraction", "val_fraction"),
                        ("--stride", "stride")):
        value = getattr(args, key)
        if value is not None and (value if key != "data" else [str(Path(f)) for f in value]) != saved[key]:
            raise ValueError(f"cannot change {option} when resuming {run_dir}: the run used {saved[key]!r}")
    train = {**metadata["train_config"]}
    given = _given_train_fields(args)
    changed = config_differences({k: train.get(k) for k in given if k not in SAME_RUN_TRAIN_FIELDS},
                                 {k: v for k, v in given.items() if k not in SAME_RUN_TRAIN_FIELDS})
    if changed:  # allowed (e.g. a lower lr after a divergence), but it is no longer the same run
        _say("note: resuming with changed training options, so the run will differ from an uninterrupted "
             "one: " + "; ".join(changed))
    train.update(given)
    return RunPlan(run_dir, True, saved["data"], saved["tokenizer"], saved["val_fraction"], saved["stride"],
                   model, TrainConfig.from_dict(train))


def _given_model_fields(args) -> dict[str, Any]:
    names = {"n_layer": "n_layer", "n_head": "n_head", "d_model": "d_model", "context": "context_length",
             "dropout": "dropout"}
    return {field: getattr(args, arg) for arg, field in names.items() if getattr(args, arg) is not None}


def _given_train_fields(args) -> dict[str, Any]:
    names = ["steps", "batch_size", "grad_accum", "lr", "min_lr", "warmup", "weight_decay", "clip",
             "eval_interval", "eval_batches", "checkpoint_interval", "device", "seed"]
    given = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    if args.quiet:
        given["progress"] = False
    return given


def _check_model_shape(model: dict[str, Any]) -> None:
    if model["d_model"] % model["n_head"]:
        raise ValueError(f"--d-model {model['d_model']} must be divisible by --n-head {model['n_head']} "
                         f"(each head gets d_model / n_head dimensions)")


def _fresh_run_dir(data: list[str] | None) -> Path:
    name = "pydoc" if not data else Path(data[0]).stem or "run"
    candidate, number = Path("runs") / name, 1
    while candidate.exists():
        number += 1
        candidate = Path("runs") / f"{name}-{number}"
    return candidate


def _read_texts(data: list[str] | None) -> list[str]:
    from ..data.corpus import builtin_corpus, load_texts  # noqa: PLC0415

    return [builtin_corpus()] if data is None else load_texts(data)


def _prepare_tokenizer(plan: RunPlan, texts: list[str], quiet: bool):
    """The run's tokenizer: read back from the run directory, else built from the spec and saved there."""
    from ..data.dataset import END_OF_TEXT  # noqa: PLC0415
    from ..tokenizer import BPETokenizer, load_tokenizer  # noqa: PLC0415

    path = plan.run_dir / TOKENIZER_FILE
    if path.is_file():
        return BPETokenizer.load(path)
    if plan.tokenizer.startswith("bpe:"):
        start = time.perf_counter()
        tokenizer = BPETokenizer.train(texts, int(plan.tokenizer[4:]), special_tokens=[END_OF_TEXT],
                                       progress=not quiet)
        _say(f"trained a BPE tokenizer of {tokenizer.vocab_size} tokens in {time.perf_counter() - start:.1f} s")
    else:
        tokenizer = load_tokenizer(plan.tokenizer)
    tokenizer.save(path)
    return tokenizer


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_train(args: argparse.Namespace) -> int:
    from .. import manual_seed  # noqa: PLC0415
    from ..data.dataset import TokenDataset  # noqa: PLC0415
    from ..models import GPT, GPTConfig  # noqa: PLC0415

    plan = resolve_run(args)
    cfg = plan.train
    backend.parse_device(cfg.device)  # fail now, not after the tokenizer, when CUDA is missing
    plan.run_dir.mkdir(parents=True, exist_ok=True)
    texts = _read_texts(plan.data)
    tokenizer = _prepare_tokenizer(plan, texts, quiet=not cfg.progress)
    model_config = GPTConfig(vocab_size=tokenizer.vocab_size, **plan.model)
    dataset = TokenDataset.from_texts(texts, tokenizer, model_config.context_length,
                                      cache_path=plan.run_dir / TOKENS_FILE, stride=plan.stride,
                                      val_fraction=plan.val_fraction, seed=cfg.seed)
    if not plan.resume:
        run_info = {"data": plan.data, "tokenizer": plan.tokenizer, "val_fraction": plan.val_fraction,
                    "stride": plan.stride}
        (plan.run_dir / RUN_FILE).write_text(json.dumps(run_info, indent=1) + "\n", encoding="utf-8")

    manual_seed(cfg.seed)
    model = GPT(model_config)
    trainer = Trainer(model, cfg, dataset, run_dir=plan.run_dir,
                      tokenizer={"spec": plan.tokenizer, "file": TOKENIZER_FILE})
    if plan.resume:
        trainer.resume()
        if trainer.step >= cfg.steps:
            raise ValueError(f"{plan.run_dir} is already at step {trainer.step} (--steps {cfg.steps}): "
                             f"pass a larger --steps to train further")
        _say(f"resuming {plan.run_dir} at step {trainer.step} of {cfg.steps}")
    tokens_per_step = cfg.batch_size * cfg.grad_accum * model_config.context_length
    _say(f"model: {model.num_parameters():,} parameters ({model_config.n_layer} layers, {model_config.n_head} heads, "
         f"d_model {model_config.d_model}, context {model_config.context_length}, vocab {model_config.vocab_size}); "
         f"data: {len(dataset.train.tokens):,} train / {len(dataset.val.tokens):,} val tokens; "
         f"{tokens_per_step:,} tokens per step on {trainer.device}; run dir {plan.run_dir}")
    result = trainer.fit()
    if result.interrupted:
        _say(f"stopped at step {result.step}; continue with: minillm train --resume {plan.run_dir}")
        return 130
    val = f", val loss {result.val_loss:.4f}" if result.val_loss is not None else ""
    if result.train_loss is not None:
        _say(f"done: step {result.step}, train loss {result.train_loss:.4f}{val}; {result.seconds:.0f} s "
             f"({result.tokens_per_second:,.0f} tokens/s overall); checkpoint in {plan.run_dir}")
    if args.samples:
        print_samples(model, tokenizer, args.prompt or DEFAULT_PROMPTS, args.samples, args.sample_tokens,
                      args.temperature, seed=cfg.seed)
    return 0


def print_samples(model, tokenizer, prompts: list[str], count: int, max_new_tokens: int,
                  temperature: float, seed: int = 0) -> list[str]:
    """Print ``count`` continuations (prompts used in turn) and return them.

    Sampling is ``model.generate`` (minillm.generate): temperature, top-k 50.
    """
    texts = []
    for k in range(count):
        prompt = prompts[k % len(prompts)]
        ids = tokenizer.encode(prompt, allowed_special="none") or [0]
        room = model.config.context_length - len(ids)
        if room < 1:
            raise ValueError(f"prompt {prompt!r} is {len(ids)} tokens, the model's context is "
                             f"{model.config.context_length}")
        out = model.generate(np.asarray([ids]), max_new_tokens=min(max_new_tokens, room),
                             temperature=temperature, top_k=50, seed=seed + k)
        text = tokenizer.decode(out[0].tolist())
        texts.append(text)
        print(f"--- sample {k + 1} ---\n{text}\n", flush=True)
    return texts


# ================================================================ minillm bench train


BENCH_DEFAULT = dict(n_layer=6, n_head=6, d_model=384, context_length=256, vocab_size=65)


def add_bench_train_parser(bench_subparsers) -> argparse.ArgumentParser:
    """Register ``bench train`` (training-step throughput and peak memory) on ``minillm bench``."""
    p = bench_subparsers.add_parser(
        "train", help="training-step throughput (tokens/s) and peak memory",
        description="Time full training steps (forward, backward, clip, AdamW) on random tokens. "
                    "Default: 6 layers, 6 heads, 384 dims, context 256, batch 8, vocab 65, fp32 "
                    "(the CPU figure in the README); --preset gpt2-124m --device cuda for the GPU one.")
    p.add_argument("--preset", metavar="NAME", type=argtypes.preset, help="a GPTConfig preset; the sizes below override it")
    p.add_argument("--n-layer", metavar="N", type=argtypes.positive_int)
    p.add_argument("--n-head", metavar="N", type=argtypes.positive_int)
    p.add_argument("--d-model", metavar="N", type=argtypes.positive_int)
    p.add_argument("--context", metavar="N", type=argtypes.positive_int, help="sequence length (default 256, or the preset's)")
    p.add_argument("--vocab-size", metavar="N", type=argtypes.positive_int, help="default 65, or the preset's")
    p.add_argument("--batch-size", metavar="N", type=argtypes.positive_int, default=8)
    p.add_argument("--grad-accum", metavar="N", type=argtypes.positive_int, default=1)
    p.add_argument("--dropout", metavar="X", type=argtypes.probability, default=0.0)
    p.add_argument("--device", metavar="DEVICE", type=argtypes.device, default="cpu")
    p.add_argument("--steps", metavar="N", type=argtypes.positive_int, default=10, help="timed steps (default 10)")
    p.add_argument("--warmup", metavar="N", type=argtypes.non_negative_int, default=2, help="untimed steps first (default 2)")
    p.add_argument("--seed", metavar="N", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(func=run_bench_train)
    return p


def run_bench_train(args: argparse.Namespace) -> int:
    from .. import manual_seed  # noqa: PLC0415
    from ..data.dataset import TokenDataset  # noqa: PLC0415
    from ..models import GPT, GPTConfig  # noqa: PLC0415

    device = backend.parse_device(args.device)
    fields = dict(BENCH_DEFAULT) if args.preset is None else GPTConfig.from_preset(args.preset).to_dict()
    for arg, field in (("n_layer", "n_layer"), ("n_head", "n_head"), ("d_model", "d_model"),
                       ("context", "context_length"), ("vocab_size", "vocab_size")):
        if getattr(args, arg) is not None:
            fields[field] = getattr(args, arg)
    fields["dropout"] = args.dropout
    _check_model_shape(fields)
    config = GPTConfig.from_dict(fields)
    rss_before = _peak_rss_bytes()

    manual_seed(args.seed)
    T, B = config.context_length, args.batch_size
    tokens = np.random.default_rng(args.seed).integers(0, config.vocab_size, size=max(16 * T, 4096),
                                                       dtype=np.int64)
    dataset = TokenDataset(tokens, T, stride=1, val_fraction=0.0, seed=args.seed)
    model = GPT(config)
    train_cfg = TrainConfig(steps=args.warmup + args.steps + 1, batch_size=B, grad_accum=args.grad_accum,
                            warmup=0, device=device, progress=False)
    trainer = Trainer(model, train_cfg, dataset)
    pool = None
    if device != "cpu":
        import cupy  # noqa: PLC0415

        pool = cupy.get_default_memory_pool()
    for _ in range(args.warmup):
        trainer.train_step()
    backend.synchronize(device)
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        trainer.train_step()
        backend.synchronize(device)
        times.append(time.perf_counter() - start)
    tokens_per_step = B * args.grad_accum * T
    total = sum(times)
    result = {
        "config": config.to_dict(), "batch_size": B, "grad_accum": args.grad_accum, "device": device,
        "dtype": str(backend.get_default_dtype()), "parameters": model.num_parameters(),
        "steps": args.steps, "tokens_per_s": tokens_per_step * args.steps / total,
        "ms_per_step_mean": 1000 * total / args.steps, "ms_per_step_min": 1000 * min(times),
        "peak_rss_mib": _peak_rss_bytes() / 2**20, "rss_before_model_mib": rss_before / 2**20,
        "threads_hint": os.environ.get("OPENBLAS_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS") or "default",
    }
    if pool is not None:
        result["gpu_pool_peak_gib"] = pool.total_bytes() / 2**30  # the pool keeps freed blocks: its size is the peak
        result["gpu_peak_in_use_gib"] = _gpu_peak_in_use(trainer, pool) / 2**30
    if args.json:
        print(json.dumps(result))
        return 0
    c = config
    print(f"train step: {c.n_layer} layers, {c.n_head} heads, d_model {c.d_model}, context {c.context_length}, "
          f"vocab {c.vocab_size}, batch {B} x {args.grad_accum}, {result['dtype']}, {device}, "
          f"{result['parameters']:,} parameters")
    print(f"  {result['tokens_per_s']:,.0f} tokens/s  ({result['ms_per_step_mean']:.1f} ms/step mean, "
          f"{result['ms_per_step_min']:.1f} min, over {args.steps} steps after {args.warmup} warmup)")
    print(f"  peak RSS {result['peak_rss_mib']:,.0f} MiB (process; {result['rss_before_model_mib']:,.0f} MiB "
          f"before the model was built)")
    if pool is not None:
        print(f"  peak GPU memory {result['gpu_peak_in_use_gib']:.2f} GiB in use by arrays, "
              f"{result['gpu_pool_peak_gib']:.2f} GiB held by CuPy's memory pool")
    return 0


def _gpu_peak_in_use(trainer: Trainer, pool) -> int:
    """Most bytes held by live arrays during one more (untimed) step, like PyTorch's max_memory_allocated.

    The pool's size is only an upper bound (it keeps freed blocks for reuse), so
    this step runs through an allocator that records ``pool.used_bytes()`` after
    every allocation.
    """
    import cupy  # noqa: PLC0415

    peak = pool.used_bytes()

    def recording_malloc(size):
        nonlocal peak
        memory = pool.malloc(size)
        peak = max(peak, pool.used_bytes())
        return memory

    cupy.cuda.set_allocator(recording_malloc)
    try:
        trainer.train_step()
        backend.synchronize(trainer.device)
    finally:
        cupy.cuda.set_allocator(pool.malloc)
    return peak


def _peak_rss_bytes() -> int:
    """This process's peak resident memory (ru_maxrss: KiB on Linux, bytes on macOS; 0 on Windows)."""
    try:
        import resource  # noqa: PLC0415 (POSIX only)
    except ImportError:
        return 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024
