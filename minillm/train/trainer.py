"""The training loop: batches in, a better model (and a run directory) out.

One optimizer step, with ``grad_accum`` micro-batches of ``batch_size`` windows:

    lr = cosine_schedule(step, warmup, steps, lr, min_lr)     a function of the step alone
    for each micro-batch (x, y):                                 (B, T) ids and next-token targets
        loss = cross_entropy(model(x), y)                       mean over B*T positions
        backward(loss / grad_accum)                             gradients ADD UP in p.grad
    check the loss is finite                                    else stop: TrainingDiverged
    clip_grad_norm_(params, clip)                               global L2 norm <= clip; a non-finite
                                                                norm stops too (measured when clip is off)
    optimizer.step(); optimizer.zero_grad()

Dividing each micro-batch loss by ``grad_accum`` makes the summed gradient the
gradient of the mean loss over all ``grad_accum * batch_size`` windows: the
same update as one big batch, in the memory of a small one. (Micro-batches
that count different numbers of targets, as fine-tuning's masked ones do, are
weighted by their share of the step's targets instead: ``micro_batch_weights``.)

Every ``eval_interval`` steps (and at the end) the model is evaluated on the
validation split: mean loss and perplexity exp(loss), without a graph, in
eval mode, on batches drawn from a generator of their own (the same batches
each time), so evaluating never changes what training sees.

The run directory collects everything about a run:

    run_dir/metrics.jsonl      one JSON object per line: {"kind": "train", "step", "loss", "lr", ...}
                               and {"kind": "eval", "step", "val_loss", "val_perplexity"}
    run_dir/checkpoint.json    latest checkpoint's metadata, and checkpoints/step-N.npz its arrays

Checkpoints (checkpoint.py) hold the model, the optimizer state, the step,
the random streams and the data position, so ``Trainer.resume()`` continues
exactly: an interrupted-then-resumed run logs the same losses, bit for bit, as
one that ran straight through. Ctrl-C finishes the current step, saves, and
returns (a second Ctrl-C aborts at once; the previous checkpoint stays valid).
A non-finite loss stops the run before the weights are touched, with the last
good checkpoint left as it was.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from .. import backend, optim, precision
from ..tensor import no_grad
from . import graph_step
from .checkpoint import has_checkpoint, load_checkpoint, read_metadata, restore_checkpoint, save_checkpoint
from ..checks import is_integer

METRICS_FILE = "metrics.jsonl"


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; training stopped before the update."""


@dataclass
class TrainConfig:
    """How to train. Defaults are a small CPU run; every field is JSON-serialisable."""

    steps: int = 1000                  # optimizer steps in the whole run (the schedule's length)
    batch_size: int = 8                # windows per micro-batch
    grad_accum: int = 1                # micro-batches per step: a step sees batch_size * grad_accum windows
    lr: float = 1e-3                   # peak learning rate, reached at the end of warmup
    min_lr: float = 1e-4               # the cosine ends here, at step `steps`
    warmup: int = 100                  # linear warmup steps
    weight_decay: float = 0.1          # AdamW decay for matrices (none for biases, norms, embeddings)
    betas: tuple[float, float] = (0.9, 0.99)
    eps: float = 1e-8
    clip: float | None = 1.0           # global gradient-norm clip (None or 0: no clipping)
    eval_interval: int = 250           # evaluate every this many steps (0: only at the end)
    eval_batches: int | None = 20      # validation batches per evaluation (None: the whole split, in order)
    checkpoint_interval: int = 500     # checkpoint every this many steps (0: only at the end)
    seed: int = 1337                   # seeds the eval batches; minillm train/finetune also seed the model's
                                       # random stream with it (mm.manual_seed: init, dropout); Trainer does not
    device: str = "cpu"                # "cpu", "cuda" or "cuda:N"
    progress: bool = True              # show a tqdm bar
    precision: str = "fp32"            # "fp32", "tf32", "bf16" or "fp16" (mixed precision; GPU only but fp32)
    cuda_graph: bool = False           # GPU: replay each step's forward+backward as one captured CUDA graph

    def __post_init__(self) -> None:
        self.betas = tuple(float(b) for b in self.betas)
        positive = ("steps", "batch_size", "grad_accum")
        for name in positive:
            value = getattr(self, name)
            if not is_integer(value) or value < 1:
                raise ValueError(f"TrainConfig: {name} must be a positive integer, got {value!r}")
        for name in ("warmup", "eval_interval", "checkpoint_interval"):
            value = getattr(self, name)
            if not is_integer(value) or value < 0:
                raise ValueError(f"TrainConfig: {name} must be an integer >= 0, got {value!r}")
        if not self.lr > 0 or not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"TrainConfig: need lr > 0 and 0 <= min_lr <= lr, got lr={self.lr}, min_lr={self.min_lr}")
        if self.eval_batches is not None and self.eval_batches < 1:
            raise ValueError(f"TrainConfig: eval_batches must be >= 1 or None, got {self.eval_batches!r}")
        if self.clip is not None and self.clip < 0:
            raise ValueError(f"TrainConfig: clip must be >= 0 or None, got {self.clip!r}")
        precision.check_precision(self.precision, self.device)
        if self.cuda_graph and backend.parse_device(self.device) == "cpu":
            raise ValueError("TrainConfig: cuda_graph (--cuda-graph) needs a GPU device; a CPU runs no CUDA graphs")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"TrainConfig: unknown field(s) {', '.join(unknown)}")
        return cls(**values)


@dataclass
class FitResult:
    """What ``Trainer.fit`` did."""

    step: int                          # the step reached (== config.steps unless stopped early)
    train_loss: float | None           # the loss of the last step
    val_loss: float | None             # the last evaluation's loss (None if there was none)
    interrupted: bool                  # stopped by Ctrl-C (after saving, when there is a run_dir)
    seconds: float                     # wall time of this fit() call
    tokens_per_second: float           # training tokens / seconds (this call's wall time, evaluation included)


class Trainer:
    """Train ``model`` on a ``TokenDataset`` (``minillm.data``).

        trainer = Trainer(model, TrainConfig(steps=2000), dataset, run_dir="runs/shakespeare")
        trainer.resume()          # optional: continue from run_dir's checkpoint, if any
        result = trainer.fit()

    ``data`` needs ``get_batch(split, batch_size, rng=None)``, ``state_dict()``
    and ``load_state_dict()``; ``"val"`` batches are used for evaluation. Data
    read by epochs may have ``epoch_ended()``: true after an epoch's last
    batch, where a step then ends with fewer than ``grad_accum`` micro-batches.
    ``optimizer`` defaults to AdamW over ``optim.weight_decay_groups``.
    ``tokenizer`` (JSON-serialisable: e.g. {"spec": ..., "file": ...}) and
    ``model_config`` (default ``model.config.to_dict()``) go into checkpoints.
    The model is moved to ``config.device``.

    Two hooks let the same loop train other objectives (fine-tuning, DPO):

    - ``loss_fn(model, batch) -> scalar Tensor``: the loss of one micro-batch
      (``batch`` is the tuple ``data.get_batch`` returned, on the device).
      Default: language modelling, ``model(inputs, targets)``'s loss.
    - ``evaluate_fn(model) -> {name: number}``: what an evaluation measures,
      called in eval mode without a graph; each name goes into the eval
      record of metrics.jsonl (``val_loss``, if present, is the run's
      validation loss). Default: ``evaluate()``'s mean validation loss.
    """

    def __init__(self, model, config: TrainConfig, data, run_dir: str | os.PathLike | None = None,
                 optimizer=None, tokenizer: dict[str, Any] | None = None,
                 model_config: dict[str, Any] | None = None, loss_fn=None, evaluate_fn=None) -> None:
        self.config = config
        self.loss_fn = loss_fn if loss_fn is not None else language_model_loss
        self.evaluate_fn = evaluate_fn
        self.device = backend.parse_device(config.device)
        if self.device == "cpu":
            backend.tune_cpu_allocator()  # temporaries reuse warm pages: ~25% faster steps on a CPU
            backend.tune_cpu_threads()    # minillm's own threads share out the work, the BLAS's stay idle
        self.model = model.to(self.device)
        self.data = data
        self.run_dir = Path(run_dir) if run_dir is not None else None
        if optimizer is None:
            groups = optim.weight_decay_groups(model.named_parameters(), config.weight_decay)
            optimizer = optim.AdamW(groups, lr=config.lr, betas=config.betas, eps=config.eps)
        self.optimizer = optimizer
        # fp16 needs loss scaling (its gradients underflow); the other precisions do not
        self.scaler = optim.GradScaler(enabled=config.precision == "fp16")
        self.tokenizer = tokenizer
        if model_config is None and hasattr(model, "config") and hasattr(model.config, "to_dict"):
            model_config = model.config.to_dict()
        self.model_config = model_config or {}
        self.step = 0                  # optimizer steps completed
        self.tokens_seen = 0           # training tokens consumed so far (over resumes too)
        self.train_seconds = 0.0       # training wall time so far (over resumes too)
        self.last_val_loss: float | None = None
        self._stop_requested = False
        self._captured = None           # the CUDA graph of forward+backward (config.cuda_graph), made at step 2
        self._graph_warmed = False      # one eager step first: caches and kernels ready before the capture
        if config.cuda_graph:
            if type(self).forward_backward is not Trainer.forward_backward:
                raise ValueError(f"--cuda-graph works with one GPU and the plain training step, not with "
                                 f"{type(self).__name__} (--pp/--dp/--tp)")
            graph_step.check_graph_capturable(self.model)
        if self.run_dir is not None:
            self.run_dir.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------ one step
    def train_step(self) -> tuple[float, float]:
        """One optimizer step over ``grad_accum`` micro-batches; returns (mean loss, grad norm).

        Raises TrainingDiverged, leaving the weights untouched, when the loss or the gradient norm
        is not finite.
        """
        cfg = self.config
        lr = optim.cosine_schedule(self.step, cfg.warmup, cfg.steps, cfg.lr, cfg.min_lr)
        optim.apply_lr(self.optimizer, lr)
        self.optimizer.zero_grad()
        loss_value = self.forward_backward()
        if not math.isfinite(loss_value):
            self.optimizer.zero_grad()
            raise TrainingDiverged(self._diverged_message(loss_value))
        if self.scaler.unscale_(self.optimizer):        # fp16: a gradient overflowed at this loss scale
            self.optimizer.zero_grad()                  # skip the step, halve the scale (GradScaler)
            self.scaler.update()
            self.step += 1
            return loss_value, math.inf
        # without clipping the norm is still measured (max_norm inf scales nothing): a finite loss can
        # still have an overflowed gradient, and one update with it would poison every weight
        grad_norm = self.clip_gradients(cfg.clip or math.inf)
        if not math.isfinite(grad_norm):
            self.optimizer.zero_grad()
            raise TrainingDiverged(self._diverged_message(loss_value, grad_norm))
        self.optimizer.step()
        self.optimizer.zero_grad()
        if self.scaler.is_enabled():
            self.scaler.update()
        self.step += 1
        return loss_value, grad_norm

    def forward_backward(self) -> float:
        """Gradients of one step's ``grad_accum`` micro-batches, added up in ``p.grad``; the mean loss.

        (Pipeline parallel overrides this and ``clip_gradients``: the rest of the step is the same.)
        """
        cfg = self.config
        batches = []
        for _ in range(cfg.grad_accum):
            batches.append(self.data.get_batch("train", cfg.batch_size))
            if getattr(self.data, "epoch_ended", None) is not None and self.data.epoch_ended():
                break                                  # data by epochs: a step does not run into the next one
        # backward of S · w_k · loss_k (GradScaler.scale's S: 1 unless fp16), w_k micro-batch k's share
        # of the step's counted targets (1 / grad_accum when they hold equally many): the gradients of
        # the micro-batches add up in p.grad to the gradient of the step's mean loss, scaled by S
        weights = micro_batch_weights(self.loss_fn, batches)
        scale = self.scaler.get_scale()
        if cfg.cuda_graph and self._graph_warmed and len(batches) == cfg.grad_accum and len(set(weights)) == 1:
            loss_sum = self._replay_forward_backward(batches, scale * weights[0]) * weights[0]   # the graph sums
        else:
            self._graph_warmed = True
            loss_sum = 0.0
            for batch, weight in zip(batches, weights):
                batch = self._to_device(batch)
                with precision.use_precision(cfg.precision):   # fp32: no change; tf32; bf16/fp16 autocast
                    loss = self.loss_fn(self.model, batch)
                    loss.backward(scale * weight)
                loss_sum = loss_sum + loss.data * weight   # stays on the device: no sync per micro-batch
        self.tokens_seen += sum(batch[0].size for batch in batches)
        return float(loss_sum)                         # the one host sync of the step

    def _replay_forward_backward(self, batches, seed: float):
        """The forward and backward as a replayed CUDA graph (captured at the first call)."""
        batches = graph_step.host_batches(batches)
        if self._captured is not None and not self._captured.reads_current_weights():
            self._captured = None                     # a parameter's array was replaced: capture again
        if self._captured is None:
            vocab_size = getattr(getattr(self.model, "config", None), "vocab_size", None)
            if vocab_size is None:
                raise ValueError("--cuda-graph needs a model with config.vocab_size (to check token ids on the host)")
            self._captured = graph_step.CapturedForwardBackward(self.model, self.loss_fn, batches, self.config.precision,
                                                                vocab_size, self.device)
        return self._captured.replay(batches, seed)

    def graph_memory_bytes(self) -> int:
        """GPU bytes held by the captured step's private pool (0 without --cuda-graph)."""
        return 0 if self._captured is None else self._captured.memory_bytes()

    def clip_gradients(self, max_norm: float) -> float:
        """Clip by the global gradient norm (``max_norm`` inf: only measure it); the norm before."""
        return optim.clip_grad_norm_(self.model.parameters(), max_norm)

    def _diverged_message(self, loss: float, grad_norm: float | None = None) -> str:
        what = f"loss is {loss}" if grad_norm is None else f"gradient norm is {grad_norm} (loss {loss})"
        saved = "no checkpoint was written"
        if self.run_dir is not None and has_checkpoint(self.run_dir):
            saved_step = read_metadata(self.run_dir)["step"]
            saved = f"the last good checkpoint (step {saved_step}) in {self.run_dir} is intact"
        return (f"training diverged at step {self.step + 1}: {what}; stopped before updating the weights, "
                f"{saved}. Try a lower --lr, a longer warmup or gradient clipping.")

    def _to_device(self, batch):
        return tuple(backend.to_device(array, self.device) for array in batch)

    # ------------------------------------------------------------ evaluation
    def evaluate(self, max_batches: int | None = -1, data=None) -> float:
        """Mean validation loss (per token), in eval mode and without a graph.

        ``max_batches`` (default: ``config.eval_batches``): that many random
        batches from a generator seeded by ``config.seed`` (the same batches
        at every call), or None for one pass over the whole split in order.
        ``data``: another dataset's "val" split (e.g. the same tokens cut into
        non-overlapping windows, for a full pass); default the training data's.
        """
        if max_batches == -1:
            max_batches = self.config.eval_batches
        data = self.data if data is None else data
        batch_size = self.config.batch_size
        if max_batches is None:
            batches = data.iter_batches("val", batch_size)
        else:
            rng = np.random.Generator(np.random.PCG64(self.config.seed + 1))
            batches = (data.get_batch("val", batch_size, rng=rng) for _ in range(max_batches))
        was_training = self.model.training
        self.model.eval()
        total, count = 0.0, 0
        try:
            with no_grad():
                for batch in batches:
                    inputs, targets = self._to_device(batch)
                    total = total + self.batch_loss(inputs, targets) * targets.size   # weighted: the last may be smaller
                    count += targets.size
        finally:
            self.model.train(was_training)
        return float(total) / count

    def batch_loss(self, inputs, targets):
        """The mean loss of one evaluation batch (an array on the device, or a number)."""
        _, loss = self.model(inputs, targets)
        return loss.data

    def measure(self) -> dict[str, float]:
        """One evaluation's metrics: ``evaluate_fn(model)`` (eval mode, no graph), else val loss and perplexity.
        Runs in the training precision (``config.precision``)."""
        with precision.use_precision(self.config.precision):
            if self.evaluate_fn is None:
                val_loss = self.evaluate()
                return {"val_loss": val_loss, "val_perplexity": math.exp(min(val_loss, 700.0))}
            was_training = self.model.training
            self.model.eval()
            try:
                with no_grad():
                    metrics = dict(self.evaluate_fn(self.model))
            finally:
                self.model.train(was_training)
            return metrics

    def log_evaluation(self) -> dict[str, float]:
        """Evaluate now, log an eval record at the current step, and return its metrics.

        ``fit`` calls this on schedule; call it before ``fit`` to record where a run starts.
        """
        metrics = self.measure()
        if "val_loss" in metrics:
            self.last_val_loss = metrics["val_loss"]
        self._log({"kind": "eval", "step": self.step, **metrics})
        return metrics

    def has_validation(self) -> bool:
        if self.evaluate_fn is not None:
            return True
        try:
            self.data.split("val")
        except (ValueError, AttributeError):
            return False
        return True

    # ------------------------------------------------------------ the loop
    def fit(self, stop_at: int | None = None) -> FitResult:
        """Train from ``self.step`` to ``config.steps`` (or only up to ``stop_at``, checkpointing there).

        Logs every step to ``metrics.jsonl``, evaluates and checkpoints on
        schedule and at the end. Ctrl-C: finishes the step, saves, returns
        with ``interrupted=True``.
        """
        cfg = self.config
        stop = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
        evaluate = self.has_validation()
        start_time, start_tokens = time.perf_counter(), self.tokens_seen
        train_loss, interrupted = None, False
        self.model.train()
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not cfg.progress, unit="step",
                   dynamic_ncols=True, desc="training")
        previous_handler = self._install_sigint_handler()
        try:
            while self.step < stop:
                if self._stop_requested:
                    interrupted = True
                    break
                step_start = time.perf_counter()
                tokens_before = self.tokens_seen
                train_loss, grad_norm = self.train_step()
                lr = self.optimizer.param_groups[0]["lr"]
                seconds = time.perf_counter() - step_start
                self.train_seconds += seconds
                tokens_per_second = (self.tokens_seen - tokens_before) / max(seconds, 1e-9)
                record = {"kind": "train", "step": self.step, "loss": train_loss, "lr": lr,
                          "grad_norm": grad_norm, "tokens": self.tokens_seen,
                          "tokens_per_s": round(tokens_per_second, 1), "time_s": round(self.train_seconds, 3)}
                self._log(record)
                bar.update(1)
                bar.set_postfix(loss=f"{train_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_second:,.0f}",
                                refresh=False)
                last = self.step == cfg.steps
                if evaluate and (last or (cfg.eval_interval and self.step % cfg.eval_interval == 0)):
                    metrics = self.log_evaluation()
                    if cfg.progress:
                        bar.write(f"step {self.step}: train loss {train_loss:.4f}, " + format_metrics(metrics))
                if last or self.step == stop or (cfg.checkpoint_interval and self.step % cfg.checkpoint_interval == 0):
                    self.save()
            if self._stop_requested and self.step < stop:
                interrupted = True
            if interrupted:
                saved = self.save()
                where = f"; checkpoint at step {self.step} saved to {saved.parent}" if saved else ""
                tqdm.write(f"interrupted at step {self.step}{where}")
        finally:
            self._restore_sigint_handler(previous_handler)
            bar.close()
        seconds = time.perf_counter() - start_time
        tokens = self.tokens_seen - start_tokens
        return FitResult(self.step, train_loss, self.last_val_loss, interrupted, seconds,
                         tokens / max(seconds, 1e-9))

    # ------------------------------------------------------------ Ctrl-C
    def request_stop(self) -> None:
        """Ask ``fit`` to stop after the current step (what the first Ctrl-C does)."""
        self._stop_requested = True

    def _install_sigint_handler(self):
        self._stop_requested = False
        if threading.current_thread() is not threading.main_thread():
            return None  # signals can only be handled on the main thread; Ctrl-C then raises as usual

        def handler(signum, frame):
            if self._stop_requested:  # the second Ctrl-C: stop now
                raise KeyboardInterrupt
            self._stop_requested = True
            tqdm.write("Ctrl-C: finishing this step, then saving and stopping (Ctrl-C again to abort now)")

        return signal.signal(signal.SIGINT, handler)

    @staticmethod
    def _restore_sigint_handler(previous) -> None:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)

    # ------------------------------------------------------------ run directory
    def _log(self, record: dict[str, Any]) -> None:
        if self.run_dir is None:
            return
        with open(self.run_dir / METRICS_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def save(self) -> Path | None:
        """Checkpoint the run now (atomically); returns the metadata path, None without a run_dir."""
        if self.run_dir is None:
            return None
        return save_checkpoint(self.run_dir, model=self.model, optimizer=self.optimizer, **self.checkpoint_fields())

    def checkpoint_fields(self) -> dict[str, Any]:
        """Everything a checkpoint holds besides the model and optimizer (``save_checkpoint``'s keywords)."""
        return dict(
            step=self.step, model_config=self.model_config, train_config=self.config.to_dict(),
            data_state=self.data.state_dict(), tokenizer=self.tokenizer,
            extra={"tokens_seen": self.tokens_seen, "train_seconds": self.train_seconds,
                   "last_val_loss": self.last_val_loss, "grad_scaler": self.scaler.state_dict()},
        )

    def resume(self) -> int:
        """Continue from ``run_dir``'s checkpoint: weights, optimizer, step, random streams, data position.

        The model's config must equal the saved one (CheckpointError names the
        fields). Metrics logged after the checkpoint's step (by a run that went
        on and then crashed) are dropped, so the log reads as one run. Returns
        the step to continue from.
        """
        if self.run_dir is None:
            raise ValueError("resume() needs a run_dir")
        checkpoint = self.load_run_checkpoint()
        restore_checkpoint(checkpoint, self.model, self.optimizer, model_config=self.model_config)
        if checkpoint.metadata.get("data_state") is not None:
            self.data.load_state_dict(checkpoint.metadata["data_state"])
        extra = checkpoint.metadata.get("extra", {})
        self.step = checkpoint.step
        self.tokens_seen = int(extra.get("tokens_seen", 0))
        self.train_seconds = float(extra.get("train_seconds", 0.0))
        self.last_val_loss = extra.get("last_val_loss")
        if self.scaler.is_enabled() and extra.get("grad_scaler", {}).get("enabled"):
            self.scaler.load_state_dict(extra["grad_scaler"])  # fp16 -> fp16: keep the loss scale it found
        self._truncate_metrics(self.step)
        return self.step

    def load_run_checkpoint(self):
        """The checkpoint ``resume`` restores (pipeline parallel: this stage's part of it)."""
        return load_checkpoint(self.run_dir)

    def _truncate_metrics(self, step: int) -> None:
        path = self.run_dir / METRICS_FILE
        if not path.is_file():
            return
        kept = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line)
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by a crash
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        os.replace(tmp, path)


def language_model_loss(model, batch):
    """The default objective: mean next-token cross-entropy, ``model(inputs, targets)``'s loss."""
    inputs, targets = batch
    _, loss = model(inputs, targets)
    return loss


def micro_batch_weights(loss_fn, batches) -> list[float]:
    """Each micro-batch's share w_k of a step's mean loss: n_k / Σ n, n_k the terms its loss averages.

    A micro-batch's loss is a mean over its n_k counted terms; the step's loss is
    the mean over all of them, L = Σ_k n_k · loss_k / Σ_k n_k = Σ_k w_k · loss_k, so
    backward(w_k · loss_k) per micro-batch adds up to the gradient of one batch
    holding them all. Language modelling (the default ``loss_fn``, and SFT with
    it) counts the targets that are not ``ignore_index`` (-100): with masked
    prompts and padding, micro-batches hold different numbers. Any other loss
    counts the rows of ``batch[0]`` (classification: examples; DPO: 2 per pair),
    which differ only at the end of an epoch. Equal counts give exactly
    1 / len(batches) each (n / (K·n) is rounded as 1 / K is).
    """
    if loss_fn is language_model_loss:
        counts = [int(np.count_nonzero(backend.to_numpy(batch[1]) != -100)) for batch in batches]
    else:
        counts = [len(batch[0]) for batch in batches]
    total = sum(counts)
    if total == 0:                    # nothing counts anywhere (the loss is NaN and the step stops)
        return [1.0 / len(batches)] * len(batches)
    return [count / total for count in counts]


def format_metrics(metrics: dict[str, float]) -> str:
    """``val loss 2.3456, val_acc 0.9100``: an evaluation as one line (perplexity left out)."""
    parts = []
    for name, value in metrics.items():
        if name == "val_perplexity":
            continue
        label = "val loss" if name == "val_loss" else name
        parts.append(f"{label} {value:.4f}" if isinstance(value, float) else f"{label} {value}")
    return ", ".join(parts)


def read_metrics(run_dir: str | os.PathLike, kind: str | None = None) -> list[dict[str, Any]]:
    """The records of ``run_dir/metrics.jsonl`` (only those of ``kind``, "train" or "eval", if given)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r for r in records if kind is None or r.get("kind") == kind]
