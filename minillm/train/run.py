"""Run directories of ``minillm train``: resolve what a run is, build it, load it back.

A run directory holds everything needed to resume or sample: ``run.json``
(the data and tokenizer of the run), ``tokenizer.json``, the cached token file
``tokens.bin``, ``metrics.jsonl`` and the latest checkpoint.

:func:`resolve_run` turns the options a user gave (None = not given) into a
:class:`RunPlan`: a new run starts from :data:`DEFAULT_MODEL` /
``TrainConfig()``'s defaults, a resumed one from what its run directory saved,
and given options override either (a resumed model's shape cannot change).
Then, so that a mistake costs nothing: :func:`prepare_run` reads the data and
makes the tokenizer without writing anything; :func:`new_run_directory` creates
the folder and removes it again if the run fails before its first step; and
:func:`start_run` writes the run's files and returns a ready
:class:`~minillm.train.Trainer`. A new run never goes into a folder that holds
another run. ``minillm/commands/train.py`` is the command line around them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from .. import backend
from .checkpoint import CheckpointError, config_differences, has_checkpoint, read_metadata
from .trainer import TrainConfig, Trainer

RUN_FILE = "run.json"
TOKENIZER_FILE = "tokenizer.json"
TOKENS_FILE = "tokens.bin"

# `minillm train` with no arguments: sized to learn visibly on the built-in
# corpus (~130k tokens at bpe:2048) in about three minutes on an idle 2-core CPU (docs/training.md:
# 1500 steps in 155 s, plus the tokenizer; a busy machine takes longer).
DEFAULT_TOKENIZER = "bpe:2048"
DEFAULT_MODEL = dict(n_layer=4, n_head=4, d_model=128, context_length=128, dropout=0.0)
DEFAULT_TRAIN = dict(steps=1500, batch_size=8, lr=2e-3, min_lr=2e-4, warmup=100, eval_interval=250,
                     eval_batches=20, checkpoint_interval=250)
DEFAULT_PROMPTS = ["The ", "If the ", "A "]

# options that say where, how long and how verbosely a run goes, not what a step computes:
# changing them on --resume needs no warning (a new `steps` also stretches the lr schedule)
SAME_RUN_TRAIN_FIELDS = {"steps", "device", "progress", "cuda_graph", "eval_interval", "eval_batches", "checkpoint_interval"}


@dataclasses.dataclass
class RunPlan:
    """Everything ``minillm train`` resolved from the options (and the run directory, on resume)."""

    run_dir: Path
    resume: bool
    data: list[str] | None          # text files, None = the built-in corpus
    tokenizer: str                  # the spec, as given
    val_fraction: float
    stride: int
    model: dict[str, Any]           # GPTConfig fields except vocab_size (the tokenizer decides it)
    train: TrainConfig


def resolve_run(*, out: str | Path | None = None, resume: bool | str | Path | None = None,
                data: list[str] | None = None, tokenizer: str | None = None, val_fraction: float | None = None,
                stride: int | None = None, preset: str | None = None, model: dict[str, Any] | None = None,
                train: dict[str, Any] | None = None) -> RunPlan:
    """New run: defaults + the given options. ``resume`` (True: the run in ``out``; a path: that run):
    the saved run + the options allowed to change. ``model`` / ``train`` hold only the GPTConfig /
    TrainConfig fields the user gave."""
    model, train = dict(model or {}), dict(train or {})
    if resume is not None and resume is not False:
        if resume is True and out is None:
            raise ValueError("--resume needs a run directory: --resume RUN_DIR, or --out RUN_DIR --resume")
        run_dir = Path(out if resume is True else resume)
        if resume is not True and out is not None and Path(out) != run_dir:
            raise ValueError(f"--resume {resume} and --out {out} name different run directories")
        return _resolve_resume(run_dir, data=data, tokenizer=tokenizer, val_fraction=val_fraction, stride=stride,
                               preset=preset, given_model=model, given_train=train)

    run_dir = Path(out) if out else _fresh_run_dir(data)
    check_run_directory(run_dir)
    fields = dict(DEFAULT_MODEL)
    if preset:
        from ..models import GPTConfig  # noqa: PLC0415

        check_model_shape({**GPTConfig.from_preset(preset).to_dict(), **model})
        # the given sizes replace the preset's before the config derives head_dim and n_kv_head from them
        fields = GPTConfig.from_preset(preset, **model).to_dict()
        fields.pop("vocab_size")
    fields.update(model)
    train_fields = {**TrainConfig().to_dict(), **DEFAULT_TRAIN, **train}
    if "warmup" not in train:  # a short run gets a short warmup: at most a tenth of its steps
        train_fields["warmup"] = min(train_fields["warmup"], train_fields["steps"] // 10)
    _settle_final_lr(train_fields, train)
    plan = RunPlan(run_dir, False, [str(Path(f)) for f in data] if data else None,
                   tokenizer or DEFAULT_TOKENIZER, 0.1 if val_fraction is None else val_fraction, stride or 1,
                   fields, TrainConfig.from_dict(train_fields))
    check_model_shape(plan.model)
    check_step_fits_memory(plan)
    return plan


def _resolve_resume(run_dir: Path, *, data, tokenizer, val_fraction, stride, preset, given_model,
                    given_train) -> RunPlan:
    metadata = read_metadata(run_dir)  # CheckpointError (a RuntimeError: one clear line) if absent/corrupt
    try:
        saved = json.loads((run_dir / RUN_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{run_dir / RUN_FILE} is missing or corrupt ({error})") from None
    model = {k: v for k, v in metadata["model_config"].items() if k != "vocab_size"}
    if preset:
        raise ValueError("--preset cannot be combined with --resume: the model's shape comes from the checkpoint")
    changed = config_differences({k: model.get(k) for k in given_model}, given_model)
    if changed:
        raise ValueError(f"cannot change the model when resuming {run_dir}: " + "; ".join(changed))
    given_run = {"data": [str(Path(f)) for f in data] if data is not None else None, "tokenizer": tokenizer,
                 "val_fraction": val_fraction, "stride": stride}
    for key, value in given_run.items():
        if value is not None and value != saved[key]:
            option = "--" + key.replace("_", "-")
            raise ValueError(f"cannot change {option} when resuming {run_dir}: the run used {saved[key]!r}")
    train = {**metadata["train_config"]}
    changed = config_differences({k: train.get(k) for k in given_train if k not in SAME_RUN_TRAIN_FIELDS},
                                 {k: v for k, v in given_train.items() if k not in SAME_RUN_TRAIN_FIELDS})
    if changed:  # allowed (e.g. a lower lr after a divergence), but it is no longer the same run
        _say("note: resuming with changed training options, so the run will differ from an uninterrupted "
             "one: " + "; ".join(changed))
    train.update(given_train)
    _settle_final_lr(train, given_train)
    plan = RunPlan(run_dir, True, saved["data"], saved["tokenizer"], saved["val_fraction"], saved["stride"],
                   model, TrainConfig.from_dict(train))
    check_step_fits_memory(plan)
    return plan


def _settle_final_lr(fields: dict[str, Any], given: dict[str, Any]) -> None:
    """--min-lr not given: at most the lr (a low --lr pulls the final rate down with it); given: not above it."""
    if "min_lr" not in given:
        fields["min_lr"] = min(fields["min_lr"], fields["lr"])
    elif fields["min_lr"] > fields["lr"]:
        raise ValueError(f"--min-lr {fields['min_lr']:g} is above --lr {fields['lr']:g}")


def check_model_shape(model: dict[str, Any]) -> None:
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
    """The run's tokenizer: on resume, read back from the run directory; else built from the spec
    (in memory: :func:`start_run` saves it)."""
    from ..data.dataset import END_OF_TEXT  # noqa: PLC0415
    from ..tokenizer import BPETokenizer, load_tokenizer  # noqa: PLC0415

    if plan.resume:
        return BPETokenizer.load(plan.run_dir / TOKENIZER_FILE)
    if plan.tokenizer.startswith("bpe:"):
        start = time.perf_counter()
        tokenizer = BPETokenizer.train(texts, int(plan.tokenizer[4:]), special_tokens=[END_OF_TEXT],
                                       progress=not quiet)
        _say(f"trained a BPE tokenizer of {tokenizer.vocab_size} tokens in {time.perf_counter() - start:.1f} s")
        return tokenizer
    return load_tokenizer(plan.tokenizer)


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- checks before any work


def check_run_directory(run_dir: Path) -> None:
    """A new run goes into a folder that does not exist yet, or one that holds no run: never appends
    to another run's metrics.jsonl or overwrites its checkpoint."""
    from .trainer import METRICS_FILE  # noqa: PLC0415

    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"--out {run_dir} is a file; a run directory is a folder")
    found = [name for name in (METRICS_FILE, RUN_FILE, "checkpoint.json") if (run_dir / name).exists()]
    if found:
        raise ValueError(f"{run_dir} already holds a run ({', '.join(found)}): add --resume to continue it, "
                         f"or choose another --out")


def check_step_fits_memory(plan: RunPlan) -> None:
    """Refuse a step whose logits alone cannot fit in this machine's memory (CPU runs), before any work.

    A lower bound, not an estimate: the int64 inputs and targets (16 bytes a
    position) and the float32 logits with their gradient (8 bytes a position and
    vocabulary entry, the vocabulary at least the 256 bytes) of one micro-batch.
    """
    if plan.train.device != "cpu":
        return
    try:
        physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):   # not POSIX: let the allocation itself fail
        return
    spec = plan.tokenizer
    vocab = int(spec[4:]) if spec.startswith("bpe:") and spec[4:].isdigit() else 256
    positions = plan.train.batch_size * plan.model["context_length"]
    needed = positions * (16 + 8 * vocab)
    if needed > physical:
        raise MemoryError(f"a micro-batch of --batch-size {plan.train.batch_size} x --context "
                          f"{plan.model['context_length']} needs at least {_gib(needed)} for its logits alone, "
                          f"and this machine has {_gib(physical)}")


def _gib(size: float) -> str:
    return f"{size / 2**40:,.1f} TiB" if size >= 2**40 else f"{size / 2**30:,.1f} GiB"


def check_prompts(tokenizer, prompts: list[str], context_length: int) -> None:
    """Every sample prompt fits in the context, checked before training rather than after it."""
    for prompt in prompts:
        n = len(tokenizer.encode(prompt, allowed_special="none"))
        if n > context_length:
            raise ValueError(f"--prompt {prompt!r} is {n} tokens, and the model's context is {context_length}: "
                             f"give a shorter prompt or a larger --context")


# ---------------------------------------------------------------- building the run


@dataclasses.dataclass
class PreparedRun:
    """A run read and checked, with nothing written yet: its texts, tokenizer and model shape."""

    plan: RunPlan
    texts: list[str]
    tokenizer: Any
    model_config: Any


def prepare_run(plan: RunPlan) -> PreparedRun:
    """Read the data and make the tokenizer (train a BPE, or load one), writing nothing to disk."""
    from ..models import GPTConfig  # noqa: PLC0415

    backend.parse_device(plan.train.device)  # fail now, not after the tokenizer, when CUDA is missing
    texts = _read_texts(plan.data)
    tokenizer = _prepare_tokenizer(plan, texts, quiet=not plan.train.progress)
    return PreparedRun(plan, texts, tokenizer, GPTConfig(vocab_size=tokenizer.vocab_size, **plan.model))


@contextlib.contextmanager
def new_run_directory(plan: RunPlan):
    """Create a new run's folder for the block; if the block fails before the run logged a step or
    saved a checkpoint, remove what it created (the folder and its missing parents; in a folder that
    was already there, the files it wrote), so that a failed start leaves nothing behind. The folder
    is held for the block (:func:`hold_run_directory`), a resumed run's too."""
    from .trainer import METRICS_FILE  # noqa: PLC0415

    if plan.resume:
        with hold_run_directory(plan.run_dir):
            yield plan.run_dir
        return
    created = next((d for d in [plan.run_dir, *plan.run_dir.parents][::-1] if not d.exists()), None)
    plan.run_dir.mkdir(parents=True, exist_ok=True)
    with hold_run_directory(plan.run_dir):   # refused: the folder is another run's, so nothing is undone
        check_run_directory(plan.run_dir)    # again: another run may have started, and ended, since the plan
        already_there = set() if created is not None else set(plan.run_dir.iterdir())
        try:
            yield plan.run_dir
        except BaseException:
            metrics = plan.run_dir / METRICS_FILE
            started = has_checkpoint(plan.run_dir) or (metrics.is_file() and metrics.stat().st_size > 0)
            if not started:
                if created is not None:
                    shutil.rmtree(created, ignore_errors=True)
                else:   # the user's own folder stays, without what this run wrote into it (run.json, ...)
                    for entry in set(plan.run_dir.iterdir()) - already_there:
                        shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
            raise


@contextlib.contextmanager
def hold_run_directory(run_dir: Path):
    """Hold the folder ``run_dir`` for one run: an exclusive ``flock`` on the folder itself, so that a
    second run on it (a new run started at the same moment, or a --resume of a run still going)
    stops at once instead of interleaving its metrics and checkpoints with this one's. The kernel
    drops the lock when the process ends, however it ends; no lock file is left behind. Where
    ``flock`` is missing (Windows), nothing is locked."""
    try:
        import fcntl  # noqa: PLC0415
    except ImportError:
        fcntl = None
    if fcntl is None:
        yield
        return
    folder = os.open(run_dir, os.O_RDONLY)
    try:
        try:
            fcntl.flock(folder, fcntl.LOCK_EX | fcntl.LOCK_NB)
            locked = True
        except BlockingIOError:
            raise ValueError(f"{run_dir} is in use by another minillm run: wait until it ends (or stop it), "
                             f"or choose another --out") from None
        except OSError:     # a file system that cannot lock (some network or FUSE mounts): run unlocked
            locked = False
        try:
            yield
        finally:   # unlocked explicitly: a process forked meanwhile shares the lock and may outlive the run
            if locked:
                fcntl.flock(folder, fcntl.LOCK_UN)
    finally:
        os.close(folder)


def start_run(prepared: PreparedRun, mesh=None, schedule: str = "1f1b") -> Trainer:
    """The trainer of a prepared run, inside :func:`new_run_directory`: saves the tokenizer, tokenizes
    (cached in ``tokens.bin``), writes ``run.json``; on resume, restores the checkpoint instead.

    With a ``mesh`` (``distributed.DeviceMesh``: a parallel run, every rank calls this) the trainer
    is a ``ParallelTrainer`` and only world rank 0 writes files; the others tokenize in memory.
    """
    from .. import manual_seed  # noqa: PLC0415
    from ..data.dataset import TokenDataset  # noqa: PLC0415
    from ..models import GPT  # noqa: PLC0415

    plan, cfg = prepared.plan, prepared.plan.train
    writer = mesh is None or mesh.world.rank == 0
    if not plan.resume and writer:
        prepared.tokenizer.save(plan.run_dir / TOKENIZER_FILE)
    dataset = TokenDataset.from_texts(prepared.texts, prepared.tokenizer, prepared.model_config.context_length,
                                      cache_path=plan.run_dir / TOKENS_FILE if writer else None, stride=plan.stride,
                                      val_fraction=plan.val_fraction, seed=cfg.seed)
    if not plan.resume and writer:
        run_info = {"data": plan.data, "tokenizer": plan.tokenizer, "val_fraction": plan.val_fraction,
                    "stride": plan.stride}
        (plan.run_dir / RUN_FILE).write_text(json.dumps(run_info, indent=1) + "\n", encoding="utf-8")

    manual_seed(cfg.seed)
    tokenizer = {"spec": plan.tokenizer, "file": TOKENIZER_FILE}
    if mesh is None:
        model = GPT(prepared.model_config)
        trainer = Trainer(model, cfg, dataset, run_dir=plan.run_dir, tokenizer=tokenizer)
    else:
        from ..distributed.parallel_trainer import ParallelTrainer, rank_model  # noqa: PLC0415

        model = rank_model(prepared.model_config, mesh, cfg.device, cfg.precision)   # --pp: only this stage
        trainer = ParallelTrainer(model, cfg, dataset, mesh, run_dir=plan.run_dir, schedule=schedule,
                                  tokenizer=tokenizer)
    if plan.resume:
        trainer.resume()
        if trainer.step >= cfg.steps:
            raise ValueError(f"{plan.run_dir} is already at step {trainer.step} (--steps {cfg.steps}): "
                             f"pass a larger --steps to train further")
    return trainer


def load_run(run_dir, device: str = "cpu"):
    """(model, tokenizer) from the latest checkpoint of a ``minillm train`` run directory."""
    from ..models import GPT, GPTConfig  # noqa: PLC0415
    from ..tokenizer import load_tokenizer  # noqa: PLC0415
    from .checkpoint import load_checkpoint, restore_checkpoint  # noqa: PLC0415

    run_dir = Path(run_dir)
    checkpoint = load_checkpoint(run_dir)
    model = GPT(GPTConfig.from_dict(checkpoint.metadata["model_config"]))
    restore_checkpoint(checkpoint, model, restore_rng=False)
    tokenizer_info = checkpoint.metadata.get("tokenizer") or {}
    if "file" not in tokenizer_info:
        raise ValueError(f"{run_dir}: the checkpoint does not name its tokenizer file")
    tokenizer = load_tokenizer(run_dir / tokenizer_info["file"])
    return model.to(device).eval(), tokenizer


def print_samples(model, tokenizer, prompts: list[str], count: int, max_new_tokens: int,
                  temperature: float, seed: int = 0) -> list[str]:
    """Print ``count`` continuations (prompts used in turn) and return them.

    Sampling is ``model.generate`` (minillm.generate): temperature, top-k 50.
    """
    texts = []
    for k in range(count):
        prompt = prompts[k % len(prompts)]
        ids = tokenizer.encode(prompt, allowed_special="none") or [0]
        check_prompts(tokenizer, [prompt], model.config.context_length)
        out = model.generate(np.asarray([ids]), max_new_tokens=max_new_tokens,   # slides past the context
                             temperature=temperature, top_k=50, seed=seed + k)
        text = tokenizer.decode(out[0].tolist())
        texts.append(text)
        print(f"--- sample {k + 1} ---\n{text}\n", flush=True)
    return texts
