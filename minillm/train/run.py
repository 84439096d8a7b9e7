"""Run directories of ``minillm train``: resolve what a run is, build it, load it back.

A run directory holds everything needed to resume or sample: ``run.json``
(the data and tokenizer of the run), ``tokenizer.json``, the cached token file
``tokens.bin``, ``metrics.jsonl`` and the latest checkpoint.

:func:`resolve_run` turns the options a user gave (None = not given) into a
:class:`RunPlan`: a new run starts from :data:`DEFAULT_MODEL` /
``TrainConfig()``'s defaults, a resumed one from what its run directory saved,
and given options override either (a resumed model's shape cannot change).
:func:`build_run` then reads the data, makes the tokenizer and returns a ready
:class:`~minillm.train.Trainer`. ``minillm/commands/train.py`` is the command
line around them.
"""

from __future__ import annotations

import dataclasses
import json
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
# corpus (~130k tokens at bpe:2048) in about five minutes on a 2-core CPU.
DEFAULT_TOKENIZER = "bpe:2048"
DEFAULT_MODEL = dict(n_layer=4, n_head=4, d_model=128, context_length=128, dropout=0.0)
DEFAULT_TRAIN = dict(steps=1500, batch_size=8, lr=2e-3, min_lr=2e-4, warmup=100, eval_interval=250,
                     eval_batches=20, checkpoint_interval=250)
DEFAULT_PROMPTS = ["The ", "If the ", "A "]

# options that say where, how long and how verbosely a run goes, not what a step computes:
# changing them on --resume needs no warning (a new `steps` also stretches the lr schedule)
SAME_RUN_TRAIN_FIELDS = {"steps", "device", "progress", "eval_interval", "eval_batches", "checkpoint_interval"}


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
    if has_checkpoint(run_dir):
        raise ValueError(f"{run_dir} already holds a run: add --resume to continue it, or choose another --out")
    fields = dict(DEFAULT_MODEL)
    if preset:
        from ..models import GPTConfig  # noqa: PLC0415

        fields = GPTConfig.from_preset(preset).to_dict()
        fields.pop("vocab_size")
    fields.update(model)
    train_fields = {**TrainConfig().to_dict(), **DEFAULT_TRAIN, **train}
    if "warmup" not in train:  # a short run gets a short warmup: at most a tenth of its steps
        train_fields["warmup"] = min(train_fields["warmup"], train_fields["steps"] // 10)
    plan = RunPlan(run_dir, False, [str(Path(f)) for f in data] if data else None,
                   tokenizer or DEFAULT_TOKENIZER, 0.1 if val_fraction is None else val_fraction, stride or 1,
                   fields, TrainConfig.from_dict(train_fields))
    check_model_shape(plan.model)
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
    return RunPlan(run_dir, True, saved["data"], saved["tokenizer"], saved["val_fraction"], saved["stride"],
                   model, TrainConfig.from_dict(train))


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


def build_run(plan: RunPlan):
    """(trainer, tokenizer) for ``plan``: reads the data, trains or loads the tokenizer, tokenizes
    (cached in ``tokens.bin``), writes ``run.json`` and, on resume, restores the checkpoint."""
    from .. import manual_seed  # noqa: PLC0415
    from ..data.dataset import TokenDataset  # noqa: PLC0415
    from ..models import GPT, GPTConfig  # noqa: PLC0415

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
    return trainer, tokenizer


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
