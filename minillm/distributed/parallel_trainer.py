"""The training loop on a (pp, dp, tp) mesh of ranks: the ordinary Trainer with its step spread out.

``ParallelTrainer`` is the ``Trainer`` (same loop, learning-rate schedule,
divergence checks, logging, evaluation and checkpoint cadence); it overrides
the hooks the Trainer exposes, each only where the math requires it:

1. the model: this rank's pipeline stage when pp > 1 (``rank_model`` builds
   only it, ``pipeline.build_stage``; a whole GPT given is cut to it), then
   its tensor-parallel shard (``shard_gpt``) when tp > 1;
2. ``forward_backward``: every rank draws the same global batches and keeps
   its data-parallel rows; the micro-batches run through the pipeline schedule
   (pp > 1) or one after the other; gradients are averaged over the dp group
   bucket by bucket (``DataParallel``); the loss returned is the dp mean;
3. ``clip_gradients``: the norm of the WHOLE model's gradient: squares of
   sharded parameters summed over the tp ranks, replicated ones counted once,
   the tied embedding's second copy (last stage) not at all, summed over the
   pp x tp "model-parallel" group;
4. one writer: rank 0 logs metrics and writes the checkpoint, after the state
   (model and AdamW moments) is gathered into one ordinary checkpoint: stages
   to the first stage, then tensor shards joined, so it resumes on any layout;
   every rank's random streams and data position are saved beside it.

``--batch-size`` stays the global batch per micro-batch, so the layout never
changes the math: a pp=2 x dp=2 x tp=2 run takes the same steps as one process.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np

from .. import backend, optim, precision
from ..train.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from ..train.trainer import Trainer
from .data_parallel import DataParallel
from .pipeline import check_token_batch
from .pipeline_trainer import OneWriter, gather_stage_states, stage_slice
from .tensor_parallel import gather_array, shard_array, shard_gpt, shard_spec


class ParallelTrainer(OneWriter, Trainer):
    """``Trainer`` over a ``DeviceMesh``. ``model``: the whole model, built alike (same seed) on every rank,
    or, with pp > 1, this rank's stage of it (``rank_model``: only the stage is ever built)."""

    def __init__(self, model, config, data, mesh, run_dir=None, schedule: str = "1f1b", bucket_mb: float = 25.0,
                 **options):
        self.mesh, self.job_comm = mesh, mesh.world
        P = mesh.shape.pp
        if P * mesh.shape.tp > 1 and config.precision == "fp16":
            raise ValueError("--pp / --tp with fp16 is not supported (the ranks holding parts of one model would "
                             "have to agree on loss scaling); use --precision bf16")
        full_config = model.config
        self._vocab_size = full_config.vocab_size
        if P > 1:
            from .pipeline import PipelineStage, stage_bounds  # noqa: PLC0415

            if not isinstance(model, PipelineStage):
                model = PipelineStage(model, mesh.pp_rank, P, stage_bounds(full_config, P))
            elif (model.stage, model.stages) != (mesh.pp_rank, P):
                raise ValueError(f"the model is stage {model.stage} of {model.stages}, but this rank runs stage "
                                 f"{mesh.pp_rank} of {P}")
        if mesh.shape.tp > 1:
            shard_gpt(model, mesh.tp)                     # this rank's columns / rows of every block (of its stage)
        self._full_config = full_config
        options.setdefault("model_config", full_config.to_dict())
        super().__init__(model, config, data, run_dir=run_dir, **options)
        self.is_writer = mesh.world.rank == 0
        self.check_same_settings(full_config, schedule)
        self.engine = None
        if P > 1:
            from .schedule import PipelineEngine  # noqa: PLC0415

            self.engine = PipelineEngine(self.model, mesh.pp, schedule)
        self.ddp = DataParallel(self.model.parameters(), mesh.dp, bucket_mb) if mesh.shape.dp > 1 else None
        if mesh.dp_rank > 0:                              # replicas draw their own dropout masks
            backend.manual_seed(config.seed + 7919 * mesh.dp_rank)
        self._names = {id(p): name for name, p in self.model.named_parameters()}

    def _spec(self, name: str):
        """How the whole model's parameter ``name`` is cut over the tp group (None: replicated, or tp = 1);
        by name, so that rank 0 also joins the parameters of stages it does not hold."""
        return shard_spec(self._full_config, name) if self.mesh.shape.tp > 1 else None

    # ------------------------------------------------------------ the step
    def forward_backward(self) -> float:
        cfg, ddp = self.config, self.ddp
        batches = [self.data.get_batch("train", cfg.batch_size)     # the global batch, alike on every rank
                   for _ in range(cfg.grad_accum)]
        if self.engine is not None:       # on the host, once: no GPU sync inside the schedule (PipelineStage.forward);
            for inputs, targets in batches:   # the whole global batch, so every rank raises the same error
                check_token_batch(inputs, targets, self._vocab_size)
        self.tokens_seen += sum(batch[0].size for batch in batches)
        batches = [self._to_device(batch if ddp is None else ddp.shard_batch(batch)) for batch in batches]
        with precision.use_precision(cfg.precision):
            if self.engine is not None:
                if ddp is not None:
                    ddp.sync = False          # the schedule interleaves micro-batches: reduce all after it
                loss = self.engine.train_step(batches, checked=True)  # the last stage's mean, on every stage
            else:
                loss_sum = 0.0
                for micro, batch in enumerate(batches):
                    if ddp is not None:
                        ddp.sync = micro == len(batches) - 1         # reduce during the last backward only
                    loss = self.loss_fn(self.model, batch)
                    self.scaler.scale(loss).backward(1.0 / cfg.grad_accum)
                    loss_sum = loss_sum + loss.data
                loss = loss_sum
        if ddp is not None:
            ddp.finish()                                             # .grad = the average over replicas
        return self._mean_over_replicas(loss) / (1 if self.engine is not None else cfg.grad_accum)

    def _mean_over_replicas(self, loss) -> float:
        """The loss averaged over the dp group: the host sync of the step, after NCCL's timeout checks."""
        for comm in (self.mesh.tp, self.mesh.dp):
            comm.synchronize()                   # NCCL: a dead peer raises here, within the timeout
        if self.mesh.dp.size == 1:
            return float(loss)
        value = self._device_array([float(loss) if self.engine is not None else loss])
        self.mesh.dp.all_reduce(value, op="avg")
        self.mesh.dp.synchronize()
        return float(value[0])

    def _device_array(self, values):
        """A small float array on this rank's device (float64 on the CPU, float32 on a GPU) for a collective."""
        xp = backend.module_for(self.device)
        with backend.device_context(self.device):
            dtype = np.float64 if self.device == "cpu" else np.float32
            return xp.ascontiguousarray(xp.stack([xp.asarray(v, dtype=dtype).reshape(()) for v in values]))

    def clip_gradients(self, max_norm: float) -> float:
        """Clip by the global norm of the whole model's gradient (see the module docstring); the norm before."""
        params = list(self.model.parameters())
        if self.mesh.model_parallel.size == 1:
            return optim.clip_grad_norm_(params, max_norm)          # one copy of the model: as one process
        not_counted = {}                                           # parameters another rank counts, by id
        if self.mesh.tp_rank > 0:                                  # (the tied matrix on a last stage at tp
            not_counted.update((id(p), p) for p in params         #  rank > 0 is both: subtracted once)
                               if self._spec(self._names[id(p)]) is None)
        if self.engine is not None and self.engine.tied_comm is not None and self.model.is_last:
            not_counted[id(self.model.wte.weight)] = self.model.wte.weight   # the first stage counts it
        not_counted = [p.grad.reshape(-1) for p in not_counted.values() if p.grad is not None]
        xp = backend.module_for(self.device)

        def whole_model(local_square: float) -> float:
            if not_counted:                                        # one host sync for all of them
                with backend.device_context(self.device):
                    local_square -= float(sum(xp.vdot(g, g) for g in not_counted))
            total = self._device_array([local_square])
            self.mesh.model_parallel.all_reduce(total, op="sum")
            self.mesh.model_parallel.synchronize()
            return float(total[0])

        return optim.clip_grad_norm_(params, max_norm, reduce_total=whole_model)

    def batch_loss(self, inputs, targets):
        if self.engine is not None:
            return self.engine.evaluate_loss(inputs, targets)
        return super().batch_loss(inputs, targets)

    # ------------------------------------------------------------ one writer (OneWriter: the metrics log)
    def full_state(self):
        """(model state, optimizer state) in the single-process layout, on world rank 0 (None elsewhere).

        A collective. Stages first go to the first stage (``gather_stage_states``:
        the pipeline's gather, on the dp-rank-0 replica), still as tensor shards;
        then each sharded array is joined over the tp group.
        """
        tp, device = self.mesh.tp, self.device
        if self.engine is None:
            model_state = self.model.state_dict()
            optimizer_state = self.optimizer.state_dict()
            order = [self._names[id(p)] for group in self.optimizer.param_groups for p in group["params"]]
        else:
            if self.mesh.dp_rank != 0:
                return None
            self._saves = getattr(self, "_saves", 0) + 1
            gathered = gather_stage_states(self.model, self.optimizer, self.mesh.pp, f"mesh-checkpoint{self._saves}")
            if self.mesh.pp_rank != 0:
                return None
            model_state, optimizer_state = gathered
            order = ordinary_parameter_order(model_state)
        model_state = {name: gather_array(value, self._spec(name), tp, device)
                       for name, value in model_state.items()}
        for index, values in optimizer_state["state"].items():
            for key, value in values.items():
                if hasattr(value, "shape") and value.ndim > 0:
                    values[key] = gather_array(value, self._spec(order[int(index)]), tp, device)
        return model_state, optimizer_state

    def rank_states(self) -> list[dict]:
        """Every rank's random streams and data position, in world-rank order (a collective)."""
        mine = {"rng": backend.get_rng_state(), "data": self.data.state_dict()}
        return all_gather_json(self.mesh.world, mine, self.device)

    def save(self):
        if self.run_dir is None:
            return None
        state = self.full_state()
        ranks = self.rank_states()
        path = self.run_dir / "checkpoint.json"
        if self.is_writer:
            model_state, optimizer_state = state
            fields = self.checkpoint_fields()
            fields["rng_state"] = ranks[0]["rng"]
            fields["extra"] = {**fields["extra"], "mesh": vars(self.mesh.shape), "rank_states": ranks}
            path = save_checkpoint(self.run_dir, model=SimpleNamespace(state_dict=lambda: model_state),
                                   optimizer=SimpleNamespace(state_dict=lambda: optimizer_state), **fields)
        self.mesh.world.barrier()                 # nobody runs ahead of a checkpoint being written
        return path

    def load_run_checkpoint(self) -> Checkpoint:
        """The ordinary checkpoint, cut to this rank: its stage's parameters, then its tensor shard."""
        checkpoint = load_checkpoint(self.run_dir)
        if self.engine is not None:
            checkpoint = stage_slice(checkpoint, self.model, self.optimizer)
        tp = self.mesh.tp
        checkpoint.model_state = {name: shard_array(value, self._spec(name), tp.rank, tp.size)
                                  for name, value in checkpoint.model_state.items()}
        if checkpoint.optimizer_state is not None:
            order = [self._names[id(p)] for group in self.optimizer.param_groups for p in group["params"]]
            for index, values in checkpoint.optimizer_state["state"].items():
                for key, value in values.items():
                    if hasattr(value, "shape") and value.ndim > 0:
                        values[key] = shard_array(value, self._spec(order[int(index)]), tp.rank, tp.size)
        return checkpoint

    def resume(self) -> int:
        """Continue from the (ordinary) checkpoint in ``run_dir``, whatever layout wrote it.

        The random streams: each rank's own when the layout is the one that was
        saved; else rank 0's (the Trainer's restore), replicas reseeding theirs.
        """
        step = super().resume()
        extra = self._resumed_extra()
        ranks = extra.get("rank_states")
        if ranks and extra.get("mesh") == vars(self.mesh.shape):
            backend.set_rng_state(ranks[self.mesh.world.rank]["rng"])
        elif self.mesh.dp_rank > 0:
            backend.manual_seed(self.config.seed + 7919 * self.mesh.dp_rank + step)
        return step

    def _resumed_extra(self) -> dict:
        from ..train.checkpoint import read_metadata  # noqa: PLC0415

        return read_metadata(self.run_dir).get("extra", {})


def rank_model(config, mesh, device=None, run_precision: str = "fp32"):
    """What this rank of ``mesh`` trains, built from the seed in force: its pipeline stage when pp > 1
    (``build_stage``: only the stage is ever drawn and held, its weights the single-process model's),
    else the whole GPT (tensor parallelism then cuts the whole model's matrices: ``shard_gpt``).
    On a GPU the stages are balanced by costs measured there in the run's ``run_precision``
    (``measured_layer_costs``, agreed over the ranks); on the CPU by FLOPs."""
    if mesh is None or mesh.shape.pp == 1:
        from ..models import GPT  # noqa: PLC0415

        return GPT(config, device=device)
    from .pipeline import build_stage, measured_layer_costs  # noqa: PLC0415

    costs = None
    if backend.parse_device(device) != "cpu":
        with precision.use_precision(run_precision):
            costs = measured_layer_costs(config, device, comm=mesh.world)
    return build_stage(config, mesh.pp_rank, mesh.shape.pp, device=device, costs=costs)


def ordinary_parameter_order(model_state: dict) -> list[str]:
    """Parameter names in the single-process optimizer's index order (``optim.weight_decay_groups``)."""
    stand_ins = [(name, SimpleNamespace(data=array, requires_grad=True)) for name, array in model_state.items()]
    names = {id(p): name for name, p in stand_ins}
    return [names[id(p)] for group in optim.weight_decay_groups(stand_ins, 0.1) for p in group["params"]]


def all_gather_json(comm, value, device: str = "cpu") -> list:
    """Every rank's JSON-serialisable ``value``, in rank order (two all-gathers of bytes)."""
    xp = backend.module_for(device)
    data = np.frombuffer(json.dumps(value).encode(), dtype=np.uint8)
    with backend.device_context(device):
        lengths = backend.to_numpy(comm.all_gather(xp.asarray([data.size], dtype=np.int64)))
        width = int(lengths.max())
        padded = np.zeros(width, dtype=np.uint8)
        padded[:data.size] = data
        everything = backend.to_numpy(comm.all_gather(xp.asarray(padded)))
    return [json.loads(everything[r * width:r * width + int(n)].tobytes()) for r, n in enumerate(lengths)]
