"""A fine-tuning run: data, task model and Trainer put together, and its run directory read back.

    model, tokenizer = load_language_model("runs/pydoc")           # any minillm run (or load_pretrained)
    result = finetune(model, tokenizer, FinetuneConfig("classify", "sms.tsv", balance=True),
                      {"batch_size": 8, "lr": 5e-4}, run_dir="runs/spam")
    model, tokenizer, info = load_finetuned("runs/spam")
    model, tokenizer, info = load_from_adapters("runs/spam-lora")      # a LoRA run: its base run + adapters alone

The run directory follows ``minillm train``'s conventions (checkpoint.json +
checkpoints/, metrics.jsonl, tokenizer.json) and adds:

    finetune.json            the FinetuneConfig, the model's GPTConfig, the labels (classify),
                             the split sizes and the LoRA settings: enough to rebuild the model
    adapters.safetensors     with LoRA: the trainable arrays alone (adapters and a head)
    test-responses.json      after SFT: the test instructions with the model's responses

Every split is seeded (``split_seed``) and the Trainer's checkpoints hold the
batch order's position, so ``resume=True`` continues exactly.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..train.checkpoint import has_checkpoint, load_checkpoint, restore_checkpoint
from ..train.trainer import TrainConfig, Trainer
from . import classify as cls
from . import dpo, sft
from .data import DataError, EpochBatches, balance, read_labelled, read_records, split_indices

TASKS = ("classify", "sft", "dpo")
RUN_FILE = "finetune.json"
TOKENIZER_FILE = "tokenizer.json"
ADAPTERS_FILE = "adapters.safetensors"
RESPONSES_FILE = "test-responses.json"
SPLITS = {"classify": (0.7, 0.1, 0.2), "sft": (0.85, 0.05, 0.10), "dpo": (0.85, 0.05, 0.10)}


@dataclass
class FinetuneConfig:
    """What to fine-tune and how (the Trainer's own settings go in a TrainConfig)."""

    task: str                          # "classify", "sft" or "dpo"
    data: str                          # the data file
    epochs: int = 3                    # passes over the training split
    trainable: str = "last-block"      # classify: "head", "last-block" (the book's) or "all"
    balance: bool = False              # classify: undersample every class to the smallest
    read: str = "last"                 # classify: the head reads the last real token, or "end": the book's way
                                       # (every text padded to the longest training text, position -1 read)
    text_column: str = "text"          # classify: the text and label fields of CSV/JSONL/headed TSV data
    label_column: str = "label"
    truncate: bool = False             # cut texts longer than the context instead of stopping with an error
    mask_prompt: bool = False          # sft: no loss on the prompt's tokens
    beta: float = 0.1                  # dpo: how far the policy may move from the reference
    lora_rank: int = 0                 # > 0: train LoRA adapters of this rank instead of the weights
    lora_alpha: float = 16.0           # LoRA's scale is alpha / rank
    lora_dropout: float = 0.0
    split_seed: int = 123              # seeds the balance and the train/val/test split
    max_new_tokens: int = 128          # sft: length limit of the test responses
    base: dict[str, Any] = field(default_factory=dict)   # where the starting model came from (for the record)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if self.read not in cls.READ_CHOICES:
            raise ValueError(f"read must be one of {', '.join(cls.READ_CHOICES)}, got {self.read!r}")
        if self.trainable not in cls.TRAINABLE_CHOICES:
            raise ValueError(f"trainable must be one of {', '.join(cls.TRAINABLE_CHOICES)}, got {self.trainable!r}")
        if self.epochs < 1 or self.lora_rank < 0 or not self.beta > 0 or not self.lora_alpha > 0:
            raise ValueError("need epochs >= 1, lora_rank >= 0, beta > 0 and lora_alpha > 0")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class FinetuneResult:
    run_dir: Path | None
    model: Any                         # the fine-tuned model (a GPT, or a GPTClassifier)
    metrics: dict[str, float]          # the last evaluation
    history: list[dict[str, Any]]      # every evaluation ({"step", metrics...}), in order, as in metrics.jsonl
    seconds: float
    step: int
    interrupted: bool
    responses: list[dict[str, Any]] | None = None


# ================================================================ preparing the data


def prepare_data(config: FinetuneConfig, tokenizer, context_length: int):
    """(EpochBatches, extra) for the task: the seeded splits, collated the task's way.

    ``extra``: the labels (classify) and the test records (sft, for the responses).
    """
    fractions = SPLITS[config.task]
    extra: dict[str, Any] = {}
    if config.task == "classify":
        texts, labels = read_labelled(config.data, config.text_column, config.label_column)
        keep = balance(texts, labels, config.split_seed) if config.balance else list(range(len(texts)))
        names = sorted(set(labels))
        ids = cls.encode_texts(tokenizer, [texts[i] for i in keep], context_length, config.truncate,
                               where=[f"{config.data}, record {i + 1}" for i in keep])
        examples = [(ids[j], names.index(labels[i])) for j, i in enumerate(keep)]
        pad = tokenizer.special_tokens.get("<|endoftext|>", 0)
        padded_length = []      # "end": the longest training text, known once the split is made
        collate = lambda batch: cls.collate_classification(batch, pad, *padded_length)  # noqa: E731
        extra["labels"] = names
    else:
        records = read_records(config.data)
        if config.task == "sft":
            examples = sft.instruction_examples(tokenizer, records, context_length, config.truncate)
            pad = sft.end_of_text_id(tokenizer)
            collate = lambda batch: sft.collate_instructions(batch, pad, config.mask_prompt)  # noqa: E731
        else:
            examples = dpo.preference_examples(tokenizer, records, context_length, config.truncate)
            pad = sft.end_of_text_id(tokenizer)
            collate = lambda batch: dpo.collate_preferences(batch, pad)  # noqa: E731
        kept = [i for i, example in enumerate(examples) if example is not None]   # None: left out (too long)
        extra["left_out"] = len(records) - len(kept)
        extra["records"] = [records[i] for i in kept]
        examples = [examples[i] for i in kept]
    parts = split_indices(len(examples), fractions, config.split_seed)
    if len(parts[0]) == 0:
        raise DataError(f"{config.data}: {len(examples)} record(s) leave no training examples after the split")
    splits = {name: [examples[i] for i in part] for name, part in zip(("train", "val", "test"), parts)}
    if config.task == "classify" and config.read == "end":
        padded_length.append(max(len(ids) for ids, _ in splits["train"]))
        extra["padded_length"] = padded_length[0]
    if config.task == "sft":
        extra["test_records"] = [extra["records"][i] for i in parts[2]]
    extra.pop("records", None)
    return EpochBatches(splits, collate, seed=config.split_seed), extra


# ================================================================ the task model


def build_task_model(gpt, config: FinetuneConfig, num_classes: int | None = None):
    """The model that trains: a GPTClassifier (classify) or the GPT itself, with LoRA and freezing applied."""
    from ..nn.lora import apply_lora  # noqa: PLC0415

    model = cls.GPTClassifier(gpt, num_classes, config.read) if config.task == "classify" else gpt
    if config.task == "classify":
        cls.set_trainable(model, config.trainable)
    if config.lora_rank:
        targets = ("gpt.h.*",) if config.task == "classify" else ("h.*",)
        apply_lora(model, config.lora_rank, config.lora_alpha, config.lora_dropout, targets=targets)
        if config.task == "classify":
            for param in model.head.parameters():        # the new head always trains
                param.requires_grad = True
    return model


def _objective(config: FinetuneConfig, reference, data: EpochBatches, batch_size: int):
    """(loss_fn, evaluate_fn) of the task, for the Trainer (``reference``: DPO's frozen starting model)."""
    if config.task == "classify":
        return cls.classification_loss, lambda m: cls.classification_metrics(m, data, batch_size)
    if config.task == "sft":
        return None, lambda m: sft.language_model_metrics(m, data.iter_batches("val", batch_size))
    objective = dpo.DPOObjective(reference, beta=config.beta)
    held_out = "val" if data.splits.get("val") else "train"
    return objective, lambda m: objective.metrics(m, data.iter_batches(held_out, batch_size))


# ================================================================ the run


def finetune(gpt, tokenizer, config: FinetuneConfig, train: dict[str, Any] | TrainConfig | None = None,
             run_dir: str | os.PathLike | None = None, resume: bool = False,
             evaluate_first: bool = True, say=print) -> FinetuneResult:
    """Fine-tune ``gpt`` (a GPT with its pretrained weights) for ``config.task``; returns the result.

    ``train``: TrainConfig fields (``steps``, ``eval_interval`` and
    ``checkpoint_interval`` default to the epochs: one evaluation and one
    checkpoint per epoch). With ``resume`` the run directory's checkpoint is
    restored first (its finetune.json must match ``config``). ``evaluate_first``
    logs an evaluation at step 0 (where the run starts). After training:
    the adapters file (LoRA) and, for SFT, the test responses.
    """
    run_dir = Path(run_dir) if run_dir is not None else None
    if run_dir is not None and has_checkpoint(run_dir) and not resume:
        raise ValueError(f"{run_dir} already holds a run: resume it, or choose another output directory")
    context = gpt.config.context_length
    data, extra = prepare_data(config, tokenizer, context)
    train = train.to_dict() if isinstance(train, TrainConfig) else dict(train or {})
    batch_size = train.get("batch_size", TrainConfig.batch_size)
    steps_per_epoch = data.steps_per_epoch(batch_size * train.get("grad_accum", 1))
    train.setdefault("steps", config.epochs * steps_per_epoch)
    train.setdefault("eval_interval", steps_per_epoch)
    train.setdefault("checkpoint_interval", steps_per_epoch)
    train.setdefault("warmup", min(TrainConfig.warmup, train["steps"] // 10))
    train_config = TrainConfig.from_dict(train)

    # DPO's reference: a frozen copy of the starting model, taken before any change to it
    reference = copy.deepcopy(gpt) if config.task == "dpo" else None
    model = build_task_model(gpt, config, len(extra.get("labels", ())) or None)
    loss_fn, task_metrics = _objective(config, reference, data, batch_size)
    history: list[dict[str, Any]] = []                # this call's evaluations, in order

    def evaluate_fn(m):
        metrics = task_metrics(m)
        history.append({"step": trainer.step, **metrics})
        return metrics
    info = {"finetune": config.to_dict(), "model_config": gpt.config.to_dict(), "labels": extra.get("labels"),
            "split_sizes": {k: len(v) for k, v in data.splits.items()}, "steps_per_epoch": steps_per_epoch,
            "padded_length": extra.get("padded_length"),
            "trainable_parameters": model.num_parameters(trainable_only=True),
            "total_parameters": model.num_parameters()}
    if config.lora_rank:
        from ..nn.lora import lora_config  # noqa: PLC0415

        info["lora"] = lora_config(model)
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        if resume:
            _check_same_run(run_dir, info)
        else:
            (run_dir / RUN_FILE).write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
            tokenizer.save(run_dir / TOKENIZER_FILE)
    trainer = Trainer(model, train_config, data, run_dir=run_dir, loss_fn=loss_fn, evaluate_fn=evaluate_fn,
                      tokenizer={"spec": "finetune", "file": TOKENIZER_FILE}, model_config=gpt.config.to_dict())
    if resume:
        trainer.resume()
        if trainer.step >= train_config.steps:
            raise ValueError(f"{run_dir} is already at step {trainer.step} of {train_config.steps}: nothing to do")
        say(f"resuming {run_dir} at step {trainer.step} of {train_config.steps}")
    if extra.get("left_out"):
        say(f"note: {extra['left_out']} record(s) left out: their prompt alone fills the context of {context}")
    sizes = ", ".join(f"{k} {v}" for k, v in info["split_sizes"].items())
    say(f"{config.task}: {sizes} examples; {info['trainable_parameters']:,} of {info['total_parameters']:,} "
        f"parameters train; {train_config.steps} steps ({steps_per_epoch} per epoch) on {trainer.device}")
    start = time.perf_counter()
    if evaluate_first and trainer.step == 0:
        say("step 0: " + _format(trainer.log_evaluation()))
    result = trainer.fit()
    seconds = time.perf_counter() - start
    if run_dir is not None:                           # over resumes too: the run's whole record
        history = [{k: v for k, v in r.items() if k != "kind"} for r in _eval_history(run_dir)]
    final = history[-1] if history else {}
    responses = None
    if not result.interrupted and run_dir is not None:
        if config.lora_rank:
            from ..nn.lora import save_adapters  # noqa: PLC0415

            save_adapters(model, run_dir / ADAPTERS_FILE, metadata={"base": json.dumps(config.base)})
        if config.task == "sft" and extra.get("test_records"):
            responses = sft.respond_to_records(model, tokenizer, extra["test_records"], config.max_new_tokens,
                                               progress=train_config.progress)
            (run_dir / RESPONSES_FILE).write_text(json.dumps(responses, indent=1) + "\n", encoding="utf-8")
            say(f"wrote the responses to {len(responses)} test instructions to {run_dir / RESPONSES_FILE}")
    return FinetuneResult(run_dir, model, {k: v for k, v in final.items() if k not in ("kind", "step")},
                          history, seconds, result.step, result.interrupted, responses)


def _format(metrics: dict[str, Any]) -> str:
    from ..train.trainer import format_metrics  # noqa: PLC0415

    return format_metrics({k: v for k, v in metrics.items() if k not in ("kind", "step")})


def _eval_history(run_dir: Path | None) -> list[dict[str, Any]]:
    from ..train.trainer import read_metrics  # noqa: PLC0415

    return read_metrics(run_dir, "eval") if run_dir is not None else []


def _check_same_run(run_dir: Path, info: dict[str, Any]) -> None:
    saved = read_run_info(run_dir)
    for key in ("finetune", "model_config", "labels", "split_sizes"):
        if json.loads(json.dumps(saved.get(key))) != json.loads(json.dumps(info.get(key))):
            raise ValueError(f"cannot resume {run_dir} with different settings: its {key} was {saved.get(key)!r}, "
                             f"now {info.get(key)!r}")


# ================================================================ reading runs back


def read_run_info(run_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a fine-tuning run (no {RUN_FILE})")
    return json.loads(path.read_text(encoding="utf-8"))


def is_finetune_run(run_dir: str | os.PathLike) -> bool:
    return (Path(run_dir) / RUN_FILE).is_file()


def load_finetuned(run_dir: str | os.PathLike, device: str = "cpu"):
    """(model, tokenizer, info) of a fine-tuning run's latest checkpoint, in eval mode.

    The model is rebuilt from finetune.json (a GPTClassifier for classify
    runs, LoRA layers when the run used them) and the checkpoint loaded into it.
    """
    from ..models import GPT, GPTConfig  # noqa: PLC0415
    from ..tokenizer import load_tokenizer  # noqa: PLC0415

    run_dir = Path(run_dir)
    info = read_run_info(run_dir)
    config = FinetuneConfig(**info["finetune"])
    gpt = GPT(GPTConfig.from_dict(info["model_config"]))
    model = build_task_model(gpt, config, len(info["labels"]) if info.get("labels") else None)
    restore_checkpoint(load_checkpoint(run_dir), model, restore_rng=False)
    tokenizer = load_tokenizer(run_dir / TOKENIZER_FILE)
    return model.to(device).eval(), tokenizer, info


def load_from_adapters(run_dir: str | os.PathLike, device: str = "cpu"):
    """(model, tokenizer, info) of a LoRA run rebuilt from its BASE RUN plus its adapters file alone.

    The same model as ``load_finetuned`` gives (the checkpoint holds the whole
    model for exact resuming), but read from what a LoRA run adds to its base:
    a few percent of the weights.
    """
    from ..nn.lora import load_adapters  # noqa: PLC0415

    run_dir = Path(run_dir)
    info = read_run_info(run_dir)
    config = FinetuneConfig(**info["finetune"])
    if not config.lora_rank or "run" not in config.base or config.base.get("random_init"):
        raise ValueError(f"{run_dir} is not a LoRA run on a base run directory")
    gpt, _ = load_language_model(config.base["run"])
    model = cls.GPTClassifier(gpt, len(info["labels"]), config.read) if config.task == "classify" else gpt
    load_adapters(model, run_dir / ADAPTERS_FILE)
    from ..tokenizer import load_tokenizer  # noqa: PLC0415

    return model.to(device).eval(), load_tokenizer(run_dir / TOKENIZER_FILE), info


def load_language_model(run_dir: str | os.PathLike, device: str = "cpu"):
    """(GPT, tokenizer) of any language-model run: ``minillm train``'s, or an SFT/DPO run (LoRA merged in)."""
    from ..nn.lora import lora_layers, merge_lora  # noqa: PLC0415
    from ..train.run import load_run  # noqa: PLC0415

    if not is_finetune_run(run_dir):
        return load_run(run_dir, device)
    model, tokenizer, info = load_finetuned(run_dir, device)
    if info["finetune"]["task"] == "classify":
        raise ValueError(f"{run_dir} is a classifier run; a language model (a 'minillm train', SFT or DPO run) "
                         f"is needed here")
    if lora_layers(model):
        from ..models import GPT  # noqa: PLC0415

        merge_lora(model)
        plain = GPT(model.config)
        plain.load_state_dict({k: v for k, v in model.state_dict().items() if "lora_" not in k})
        model = plain.to(device).eval()
    return model, tokenizer
