"""The training loop on a mesh of ranks: data and tensor parallel around the ordinary Trainer.

``ParallelTrainer`` is the ``Trainer`` (same loop, schedule, logging, eval and
checkpoint cadence) with five things changed, each where the math requires it:

1. the model is this rank's tensor-parallel shard (``shard_gpt``) when tp > 1;
2. every rank draws the same global batch and keeps its data-parallel rows;
   gradients are averaged over the dp group bucket by bucket (``DataParallel``);
3. the logged loss is the mean over the dp group (every replica saw other rows);
4. the gradient norm for clipping is the norm of the WHOLE model: squares of
   sharded parameters summed over the tp ranks, replicated ones counted once;
5. one writer: rank 0 logs metrics and writes the checkpoint, after the
   sharded state (model and AdamW moments) is gathered into one ordinary
   checkpoint, which resumes on any layout (1 process, or any dp x tp); the
   random-stream state of every rank is saved beside it.

``--batch-size`` stays the global batch per micro-batch, so the layout never
changes the math: a dp=2 x tp=2 run takes the same steps as one process.
"""

from __future__ import annotations

import json
import math

import numpy as np

from .. import backend, optim
from ..train.checkpoint import load_checkpoint, restore_checkpoint, save_checkpoint
from ..train.trainer import Trainer, TrainingDiverged
from .data_parallel import DataParallel
from .tensor_parallel import gather_array, shard_array, shard_gpt


class ParallelTrainer(Trainer):
    """``Trainer`` over a ``DeviceMesh`` (see the module docstring); ``model`` is the full model, seeded alike."""

    def __init__(self, model, config, data, mesh, run_dir=None, bucket_mb: float = 25.0, **options):
        if mesh.shape.pp > 1:
            raise ValueError("ParallelTrainer runs data and tensor parallelism; pipeline stages (--pp) "
                             "are run by the pipeline trainer")
        self.mesh = mesh
        if mesh.shape.tp > 1:
            shard_gpt(model, mesh.tp)                   # this rank's columns / rows of every block
        super().__init__(model, config, data, run_dir=run_dir, **options)
        self.is_writer = mesh.world.rank == 0
        self.ddp = DataParallel(self.model.parameters(), mesh.dp, bucket_mb) if mesh.shape.dp > 1 else None
        if mesh.dp_rank > 0:                            # replicas draw their own dropout masks
            backend.manual_seed(config.seed + 7919 * mesh.dp_rank)
        self._names = {id(p): name for name, p in self.model.named_parameters()}
        self._specs = getattr(self.model, "shard_specs", {})      # name -> ShardSpec (sharded parameters only)

    # ------------------------------------------------------------ one step
    def train_step(self) -> tuple[float, float | None]:
        cfg, model = self.config, self.model
        lr = optim.cosine_schedule(self.step, cfg.warmup, cfg.steps, cfg.lr, cfg.min_lr)
        optim.apply_lr(self.optimizer, lr)
        self.optimizer.zero_grad()
        loss_sum = 0.0
        for micro in range(cfg.grad_accum):
            batch = self.data.get_batch("train", cfg.batch_size)     # the global batch, alike on every rank
            self.tokens_seen += batch[0].size
            if self.ddp is not None:
                batch = self.ddp.shard_batch(batch)                   # this replica's rows
                self.ddp.sync = micro == cfg.grad_accum - 1           # reduce once, after the last backward
            loss = self.loss_fn(model, self._to_device(batch))
            loss.backward(1.0 / cfg.grad_accum)
            loss_sum = loss_sum + loss.data
        if self.ddp is not None:
            self.ddp.finish()                                         # .grad = the average over replicas
        loss_value = self._mean_over_replicas(loss_sum) / cfg.grad_accum
        if not math.isfinite(loss_value):
            self.optimizer.zero_grad()
            raise TrainingDiverged(self._diverged_message(loss_value))
        grad_norm = self.clip_grad_norm_(cfg.clip or math.inf)
        if not math.isfinite(grad_norm):
            self.optimizer.zero_grad()
            raise TrainingDiverged(self._diverged_message(loss_value, grad_norm))
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.step += 1
        return loss_value, grad_norm

    def _mean_over_replicas(self, loss_sum) -> float:
        """The step's loss averaged over the dp group (the one host sync of the step)."""
        for comm in (self.mesh.tp, self.mesh.dp):
            comm.synchronize()                   # NCCL: a dead peer raises here, within the timeout
        if self.mesh.dp.size == 1:
            return float(loss_sum)
        xp = backend.module_for(self.device)
        with backend.device_context(self.device):
            value = xp.asarray(loss_sum, dtype=np.float64 if self.device == "cpu" else np.float32).reshape(1)
            value = xp.ascontiguousarray(value)
            self.mesh.dp.all_reduce(value, op="avg")
            self.mesh.dp.synchronize()
            return float(value[0])

    def clip_grad_norm_(self, max_norm: float) -> float:
        """Clip by the global norm of the whole model's gradient; returns it (before clipping).

            ||g||² = Σ_{sharded p} Σ_tp-ranks ||g_p,r||²  +  Σ_{replicated p} ||g_p||²  (counted on tp rank 0)

        summed by one all-reduce over the model-parallel group. A model on one
        rank (dp only) clips exactly as the single-process Trainer does.
        """
        params = list(self.model.parameters())
        if self.mesh.model_parallel.size == 1:
            return optim.clip_grad_norm_(params, max_norm)
        sharded = [p for p in params if self._names[id(p)] in self._specs]
        replicated = [p for p in params if self._names[id(p)] not in self._specs]
        squares = optim.clip_grad_norm_(sharded, math.inf) ** 2
        if self.mesh.tp_rank == 0:
            squares += optim.clip_grad_norm_(replicated, math.inf) ** 2
        xp = backend.module_for(self.device)
        with backend.device_context(self.device):
            total = xp.asarray([squares], dtype=np.float64 if self.device == "cpu" else np.float32)
            self.mesh.model_parallel.all_reduce(total, op="sum")
            self.mesh.model_parallel.synchronize()
            norm = math.sqrt(float(total[0]))
        if math.isfinite(norm) and norm > max_norm:
            scale = max_norm / (norm + 1e-6)
            with backend.device_context(self.device):
                for p in params:
                    if p.grad is not None:
                        p.grad *= scale
        return norm

    # ------------------------------------------------------------ one writer
    def _log(self, record) -> None:
        if self.is_writer:
            super()._log(record)

    def _truncate_metrics(self, step: int) -> None:
        if self.is_writer:
            super()._truncate_metrics(step)

    def full_state(self):
        """(model state, optimizer state) gathered into the single-process layout (a collective)."""
        tp = self.mesh.tp
        model_state = {name: gather_array(value, self._specs.get(name), tp, self.device)
                       for name, value in self.model.state_dict().items()}
        optimizer_state = self.optimizer.state_dict()
        index_names = [self._names[id(p)] for group in self.optimizer.param_groups for p in group["params"]]
        for index, values in optimizer_state["state"].items():
            for key, value in values.items():
                if hasattr(value, "shape") and value.ndim > 0:
                    values[key] = gather_array(value, self._specs.get(index_names[index]), tp, self.device)
        return model_state, optimizer_state

    def rank_states(self) -> list[dict]:
        """Every rank's random streams and data position, in world-rank order (a collective)."""
        mine = {"rng": backend.get_rng_state(), "data": self.data.state_dict()}
        return all_gather_json(self.mesh.world, mine, self.device)

    def save(self):
        if self.run_dir is None:
            return None
        model_state, optimizer_state = self.full_state()
        ranks = self.rank_states()
        if not self.is_writer:
            return None
        return save_checkpoint(
            self.run_dir, model=_Snapshot(model_state), optimizer=_Snapshot(optimizer_state), step=self.step,
            model_config=self.model_config, train_config=self.config.to_dict(),
            data_state=self.data.state_dict(), tokenizer=self.tokenizer, rng_state=ranks[0]["rng"],
            extra={"tokens_seen": self.tokens_seen, "train_seconds": self.train_seconds,
                   "last_val_loss": self.last_val_loss, "mesh": vars(self.mesh.shape), "rank_states": ranks},
        )

    def resume(self) -> int:
        """Continue from the (ordinary) checkpoint in ``run_dir``, whatever layout wrote it.

        Each rank shards the full arrays for itself. The random streams: each
        rank's own when the layout is the one that was saved, else rank 0's.
        """
        if self.run_dir is None:
            raise ValueError("resume() needs a run_dir")
        checkpoint = load_checkpoint(self.run_dir)
        tp = self.mesh.tp
        checkpoint.model_state = {name: shard_array(value, self._specs.get(name), tp.rank, tp.size)
                                  for name, value in checkpoint.model_state.items()}
        if checkpoint.optimizer_state is not None:
            index_names = [self._names[id(p)] for group in self.optimizer.param_groups for p in group["params"]]
            for index, values in checkpoint.optimizer_state["state"].items():
                for key, value in values.items():
                    if hasattr(value, "shape") and value.ndim > 0:
                        values[key] = shard_array(value, self._specs.get(index_names[int(index)]), tp.rank, tp.size)
        restore_checkpoint(checkpoint, self.model, self.optimizer, model_config=self.model_config)
        extra = checkpoint.metadata.get("extra", {})
        ranks = extra.get("rank_states")
        if ranks and extra.get("mesh") == vars(self.mesh.shape):
            backend.set_rng_state(ranks[self.mesh.world.rank]["rng"])
        elif self.mesh.dp_rank > 0:                     # another layout: replicas reseed their dropout streams
            backend.manual_seed(self.config.seed + 7919 * self.mesh.dp_rank + self.step)
        if checkpoint.metadata.get("data_state") is not None:
            self.data.load_state_dict(checkpoint.metadata["data_state"])
        self.step = checkpoint.step
        self.tokens_seen = int(extra.get("tokens_seen", 0))
        self.train_seconds = float(extra.get("train_seconds", 0.0))
        self.last_val_loss = extra.get("last_val_loss")
        self._truncate_metrics(self.step)
        return self.step


class _Snapshot:
    """Stands in for a module / optimizer whose ``state_dict()`` was gathered already."""

    def __init__(self, state):
        self._state = state

    def state_dict(self):
        return self._state


def all_gather_json(comm, value, device: str = "cpu") -> list:
    """Every rank's JSON-serialisable ``value``, in rank order (two all-gathers of bytes)."""
    xp = backend.module_for(device)
    data = np.frombuffer(json.dumps(value).encode(), dtype=np.uint8)
    with backend.device_context(device):
        lengths = comm.all_gather(xp.asarray([data.size], dtype=np.int64))
        lengths = backend.to_numpy(lengths)
        padded = np.zeros(int(lengths.max()), dtype=np.uint8)
        padded[:data.size] = data
        everything = backend.to_numpy(comm.all_gather(xp.asarray(padded)))
    width = int(lengths.max())
    return [json.loads(everything[r * width:r * width + int(n)].tobytes()) for r, n in enumerate(lengths)]
