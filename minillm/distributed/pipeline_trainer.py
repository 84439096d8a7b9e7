"""Pipeline parallel, part 3: the Trainer on P stages, and checkpoints as one ordinary file.

``PipelineTrainer`` is the single-process ``Trainer`` with two pieces swapped:
the forward/backward of a step runs the pipeline schedule (``PipelineEngine``),
and clipping uses the norm over all stages. The learning-rate schedule, the
divergence checks, evaluation, logging and the loop are the Trainer's. Every
rank draws the same micro-batches from the same data stream (only the first
stage reads the ids, only the last the targets), so a step with
``batch_size`` b and ``grad_accum`` M is the same arithmetic as one process
running b x M windows as M accumulated micro-batches.

Checkpoints. Each stage sends its parameters and AdamW state to the pipeline's
rank 0, which writes one ordinary minillm checkpoint (``save_checkpoint``):
parameter names are the whole model's, and the optimizer state is re-indexed
into the order the single-process optimizer uses. Resuming reads that file on
every rank and keeps the stage's part, so a run saved on 2 stages resumes on
1, or 4, and the other way round. (Several nodes need a shared file system.)
Only rank 0 writes the metrics log.
"""

from __future__ import annotations

import signal
import threading
from types import SimpleNamespace

import numpy as np
from tqdm import tqdm

from .. import backend, optim, precision
from ..train.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from ..train.trainer import Trainer
from .pipeline import check_token_batch
from .schedule import PipelineEngine


class OneWriter:
    """Mixin for a ``Trainer`` run on several ranks: the ranks act as one job.

    - only the rank with ``is_writer`` set touches the metrics log;
    - they refuse to start with different settings (``check_same_settings``);
    - they stop together: a Ctrl-C (or ``request_stop``) on any rank, only
      asks; inside ``fit`` each step ends with the ranks agreeing (an
      all-reduce of the asks over ``job_comm``), so every rank stops after the
      same step and takes part in the final checkpoint, a collective. (Ctrl-C
      on one node's launcher reaches only that node's ranks.)
    """

    is_writer: bool
    job_comm: object  # the communicator spanning every rank of the job

    def _log(self, record) -> None:
        if self.is_writer:
            super()._log(record)

    def _truncate_metrics(self, step: int) -> None:
        if self.is_writer:
            super()._truncate_metrics(step)

    # ------------------------------------------------------------ same settings on every rank
    def check_same_settings(self, model_config, schedule: str) -> None:
        """ValueError on every rank unless all were started with the same model, training options, data
        stream and schedule (the device and the progress bar may differ)."""
        train = {k: v for k, v in self.config.to_dict().items() if k not in ("device", "progress")}
        data = self.data.state_dict() if hasattr(self.data, "state_dict") else None
        self.job_comm.check_same("settings", {"model": model_config.to_dict(), "train": train, "data": data,
                                              "schedule": schedule})

    def fit(self, stop_at: int | None = None):
        """The Trainer's loop, once the ranks agree on where they start (--resume given to some ranks only
        would otherwise meet as mismatched messages a step later)."""
        self.job_comm.check_same("starting steps (--resume on some ranks only?)", {"step": self.step})
        return super().fit(stop_at)

    # ------------------------------------------------------------ Ctrl-C: one decision for the job
    def request_stop(self) -> None:
        """Ask the job to stop: every rank stops after the step at whose end the ranks agree on it."""
        self._stop_asked = True

    def _install_sigint_handler(self):
        self._stop_requested, self._stop_asked, self._agreeing = False, False, True
        if threading.current_thread() is not threading.main_thread():
            return None

        def handler(signum, frame):
            if self._stop_asked:  # the second Ctrl-C: stop now (the peers then fail on the closed connection)
                raise KeyboardInterrupt
            self._stop_asked = True
            tqdm.write("Ctrl-C: finishing this step, then saving and stopping (Ctrl-C again to abort now)")

        return signal.signal(signal.SIGINT, handler)

    def _restore_sigint_handler(self, previous) -> None:
        self._agreeing = False
        super()._restore_sigint_handler(previous)

    def train_step(self):
        result = super().train_step()
        if getattr(self, "_agreeing", False):
            self._stop_requested = self._any_rank_asked_to_stop()
        return result

    def _any_rank_asked_to_stop(self) -> bool:
        """Max over the job of this rank's ask (0 or 1): the same answer on every rank, after the same step."""
        xp = backend.module_for(self.device)
        with backend.device_context(self.device):
            asked = xp.asarray([1.0 if getattr(self, "_stop_asked", False) else 0.0], dtype=np.float32)
            self.job_comm.all_reduce(asked, op="max")
            self.job_comm.synchronize()
            return float(asked[0]) > 0


class PipelineTrainer(OneWriter, Trainer):
    """``Trainer`` for one stage (``PipelineStage``) of a pipeline over ``comm``."""

    def __init__(self, stage, config, data, comm, schedule: str = "1f1b", run_dir=None, tokenizer=None,
                 timeline: bool = False):
        if config.precision == "fp16":
            raise ValueError("--pp with fp16 is not supported (the stages would have to agree on loss scaling); "
                             "use --precision bf16")
        self.comm = self.job_comm = comm
        self.is_writer = comm.rank == 0
        super().__init__(stage, config, data, run_dir=run_dir, tokenizer=tokenizer,
                         model_config=stage.config.to_dict())
        self.check_same_settings(stage.config, schedule)
        self.engine = PipelineEngine(stage, comm, schedule, timeline)
        self._saves = 0

    # ------------------------------------------------------------ the step, split over stages
    def forward_backward(self) -> float:
        cfg = self.config
        batches = [self.data.get_batch("train", cfg.batch_size) for _ in range(cfg.grad_accum)]
        for inputs, targets in batches:   # on the host: no GPU sync inside the schedule (PipelineStage.forward)
            check_token_batch(inputs, targets, self.model.config.vocab_size)
        batches = [self._to_device(batch) for batch in batches]   # all copies before the schedule starts
        with precision.use_precision(cfg.precision):
            loss = self.engine.train_step(batches, checked=True)
        self.tokens_seen += sum(b[0].size for b in batches)
        return loss

    def clip_gradients(self, max_norm: float) -> float:
        return self.engine.clip_grad_norm(max_norm)

    def batch_loss(self, inputs, targets):
        return self.engine.evaluate_loss(inputs, targets)

    # ------------------------------------------------------------ checkpoints
    def save(self):
        """Gather every stage's state on rank 0 and write one ordinary checkpoint there."""
        if self.run_dir is None:
            return None
        self._saves += 1
        gathered = gather_stage_states(self.model, self.optimizer, self.comm, f"checkpoint{self._saves}")
        path = self.run_dir / "checkpoint.json"
        if self.is_writer:
            model_state, optimizer_state = gathered
            path = save_checkpoint(self.run_dir, model=SimpleNamespace(state_dict=lambda: model_state),
                                   optimizer=SimpleNamespace(state_dict=lambda: optimizer_state),
                                   **self.checkpoint_fields())
        self.comm.barrier()  # nobody runs ahead of a checkpoint being written
        return path

    def load_run_checkpoint(self) -> Checkpoint:
        """The whole checkpoint, cut down to this stage's parameters and their optimizer state."""
        return stage_slice(load_checkpoint(self.run_dir), self.model, self.optimizer)


# ---------------------------------------------------------------- state by name

def _group_kinds(named_arrays) -> dict[str, bool]:
    """name -> decayed? (``optim.weight_decay_groups``' rule, asked with a marker decay of 1)."""
    stand_ins = [(name, SimpleNamespace(data=array)) for name, array in named_arrays]
    names = {id(p): name for name, p in stand_ins}
    return {names[id(p)]: group["weight_decay"] == 1.0
            for group in optim.weight_decay_groups(stand_ins, 1.0) for p in group["params"]}


def optimizer_state_by_name(model, optimizer) -> tuple[dict, dict]:
    """(name -> per-parameter state, decayed? -> group hyper-parameters) of ``model``'s optimizer."""
    names = {id(p): name for name, p in model.named_parameters()}
    kinds = _group_kinds((name, p.data) for name, p in model.named_parameters())
    saved = optimizer.state_dict()
    by_name, hyper, index = {}, {}, 0
    for group, saved_group in zip(optimizer.param_groups, saved["param_groups"]):
        for p in group["params"]:
            if index in saved["state"]:
                by_name[names[id(p)]] = saved["state"][index]
            index += 1
        hyper[kinds[names[id(group["params"][0])]]] = {k: v for k, v in saved_group.items() if k != "params"}
    return by_name, hyper


def assemble_optimizer_state(model_state: dict, by_name: dict, hyper: dict) -> dict:
    """``Optimizer.state_dict()`` layout for a model whose parameters are ``model_state`` (in order)."""
    kinds = _group_kinds(model_state.items())
    state, groups, index = {}, [], 0
    for decayed in (True, False):  # weight_decay_groups' order: decayed first
        names = [n for n in model_state if kinds.get(n) is decayed]
        if not names:
            continue
        indices = []
        for name in names:
            if name in by_name:
                state[index] = by_name[name]
            indices.append(index)
            index += 1
        groups.append({**hyper[decayed], "params": indices})
    return {"state": state, "param_groups": groups}


def _owned(stage):
    """(name, parameter) this stage contributes to the checkpoint: all but the last stage's tied copy."""
    duplicate = {id(p) for p in stage.tied_parameters()} if stage.is_last and not stage.is_first else set()
    return [(n, p) for n, p in stage.named_parameters() if id(p) not in duplicate]


def gather_stage_states(stage, optimizer, comm, tag: str):
    """On rank 0: (whole model_state, whole optimizer state) as NumPy; None elsewhere.

    Each rank posts the list of its arrays (name, shape, dtype) and small
    scalars in the rendezvous store, then sends the arrays in that order.
    """
    by_name, hyper = optimizer_state_by_name(stage, optimizer)
    owned = _owned(stage)
    arrays, scalars = [], {}
    for name, p in owned:
        arrays.append((f"model/{name}", p.data))
        for field, value in by_name.get(name, {}).items():
            if hasattr(value, "shape") and getattr(value, "ndim", 0) > 0:
                arrays.append((f"optim/{name}/{field}", value))
            else:
                scalars[(name, field)] = value
    manifest = ([(key, tuple(a.shape), a.dtype.str) for key, a in arrays], scalars, hyper)
    if comm.rank != 0:
        comm.store.set(f"{comm.name}/{tag}/rank{comm.rank}", manifest)
        xp = backend.array_module(next(iter(stage.parameters())).data)
        for _, array in arrays:
            comm.send(xp.ascontiguousarray(xp.asarray(array)), 0)  # optimizer snapshots are NumPy: to the device
        comm.synchronize()
        return None
    model_state, states, all_hyper = {}, {}, {}
    xp = backend.array_module(next(iter(stage.parameters())).data)
    for rank in range(comm.size):
        if rank == 0:
            received = [(key, backend.to_numpy(a)) for key, a in arrays]
            rank_scalars, rank_hyper = scalars, hyper
        else:
            entries, rank_scalars, rank_hyper = comm.store.get(f"{comm.name}/{tag}/rank{rank}")
            received = []
            for key, shape, dtype in entries:
                buffer = xp.empty(shape, dtype=dtype)
                comm.recv(buffer, rank)
                received.append((key, buffer))
            comm.synchronize()
            received = [(key, backend.to_numpy(b)) for key, b in received]
        for key, array in received:
            kind, rest = key.split("/", 1)
            if kind == "model":
                model_state[rest] = array
            else:
                name, field = rest.rsplit("/", 1)
                states.setdefault(name, {})[field] = array
        for (name, field), value in rank_scalars.items():
            states.setdefault(name, {})[field] = value
        for decayed, values in rank_hyper.items():
            all_hyper.setdefault(decayed, values)
    return model_state, assemble_optimizer_state(model_state, states, all_hyper)


def stage_slice(checkpoint: Checkpoint, stage, optimizer) -> Checkpoint:
    """A whole-model checkpoint cut down to ``stage``'s parameters and optimizer state."""
    names = [n for n, _ in stage.named_parameters()]
    model_state = {n: checkpoint.model_state[n] for n in names if n in checkpoint.model_state}
    optimizer_state = None
    if checkpoint.optimizer_state is not None:
        whole = checkpoint.optimizer_state
        kinds = _group_kinds(checkpoint.model_state.items())
        ordered = [n for decayed in (True, False) for n in checkpoint.model_state if kinds[n] is decayed]
        by_name = {ordered[i]: s for i, s in whole["state"].items()}
        hyper = {}
        for group in whole["param_groups"]:
            hyper[kinds[ordered[group["params"][0]]]] = {k: v for k, v in group.items() if k != "params"}
        stage_arrays = {n: p.data for n, p in stage.named_parameters()}
        optimizer_state = assemble_optimizer_state(stage_arrays, by_name, hyper)
    return Checkpoint(checkpoint.metadata, model_state, optimizer_state, checkpoint.path)
