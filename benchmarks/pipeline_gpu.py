"""Pipeline-parallel measurements, one rank per process (run it under ``minillm launch``).

    python -m minillm launch --nproc-per-node 2 -- python benchmarks/pipeline_gpu.py collectives
    python -m minillm launch --nproc-per-node 2 -- python benchmarks/pipeline_gpu.py train --out o.json ...
    python benchmarks/pipeline_gpu.py train --out one.json ...            # one process, no pipeline

``train`` writes, from the rank holding the last stage, a JSON with the losses,
the step times and every rank's peak memory; benchmarks/pipeline_gpu.sh runs
the whole set of 2-GPU measurements and compares them. ``--device cpu`` with a
tiny preset runs the same code on the CPU backend (to debug it before a GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import tracemalloc

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import minillm as mm  # noqa: E402
from minillm import backend  # noqa: E402
from minillm.data.dataset import TokenDataset  # noqa: E402
from minillm.models import GPT, GPTConfig  # noqa: E402
from minillm.train import TrainConfig, Trainer  # noqa: E402


def collectives(args) -> None:
    from minillm.distributed import init_process_group

    group = init_process_group("cpu" if args.device == "cpu" else "nccl", timeout=60)
    comm, r, n = group.comm, group.rank, group.world_size
    xp = backend.module_for(group.device)
    import ml_dtypes

    for dtype in (np.float32, np.float16, ml_dtypes.bfloat16):
        inputs = [np.random.default_rng(10 + k).standard_normal((n * 1024, 256)).astype(dtype) for k in range(n)]
        x = xp.asarray(inputs[r])
        total = sum(i.astype(np.float64) for i in inputs)
        tol = 1e-6 if dtype == np.float32 else 2e-2
        checks = {
            "all_reduce sum": (backend.to_numpy(comm.all_reduce(x.copy(), "sum")), total),
            "all_reduce avg": (backend.to_numpy(comm.all_reduce(x.copy(), "avg")), total / n),
            "all_reduce max": (backend.to_numpy(comm.all_reduce(x.copy(), "max")), np.maximum.reduce(inputs)),
            "reduce_scatter": (backend.to_numpy(comm.reduce_scatter(x.copy())), np.split(total, n)[r]),
            "all_gather": (backend.to_numpy(comm.all_gather(x[:4].copy())), np.concatenate([i[:4] for i in inputs])),
            "broadcast": (backend.to_numpy(comm.broadcast(x.copy(), root=n - 1)), inputs[n - 1]),
        }
        ring = xp.empty_like(x)
        comm.send_recv(x, (r + 1) % n, ring, (r - 1) % n)
        checks["send_recv ring"] = (backend.to_numpy(ring), inputs[(r - 1) % n])
        comm.synchronize()
        for name, (got, want) in checks.items():
            got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
            err = np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30)
            status = "ok" if err <= tol else "FAIL"
            print(f"{status} {np.dtype(dtype).name:9s} {name:15s} max rel err {err:.2e}", flush=True)
            if err > tol:
                raise SystemExit(f"collective {name} {np.dtype(dtype).name} wrong: {err}")
    sub = comm.split(color=0, key=-r)   # one group, order reversed
    y = xp.full(8, float(r + 1), dtype=np.float32)
    sub.all_reduce(y)
    sub.synchronize()
    print(f"split: new rank {sub.rank} of {sub.size}, all_reduce {float(y[0])} (want {n * (n + 1) / 2})")
    if group.device != "cpu":  # bandwidth of a 256 MB all-reduce
        big = xp.ones(64 * 2**20, dtype=np.float32)
        comm.all_reduce(big)
        comm.synchronize()
        start = time.perf_counter()
        for _ in range(5):
            comm.all_reduce(big)
        comm.synchronize()
        print(f"all_reduce 256 MB fp32: {(time.perf_counter() - start) / 5 * 1e3:.2f} ms")
    from minillm.distributed import destroy_process_group

    destroy_process_group()


def _dataset(cfg: GPTConfig) -> TokenDataset:
    rng = np.random.default_rng(0)   # a learnable stream: a repeating phrase with 10% noise
    tokens = np.tile(rng.integers(0, cfg.vocab_size, 997), 400)[:400_000]
    noise = rng.random(tokens.size) < 0.1
    tokens[noise] = rng.integers(0, cfg.vocab_size, noise.sum())
    return TokenDataset(tokens.astype(np.uint32), cfg.context_length, stride=1, val_fraction=0.01, seed=0)


def train(args) -> None:
    overrides = dict(context_length=args.context)
    if args.layers:
        overrides.update(n_layer=args.layers, d_model=args.d_model, n_head=args.heads)
    cfg = GPTConfig.from_preset(args.preset, **overrides)
    distributed = "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1
    if distributed:
        from minillm.distributed import init_process_group

        group = init_process_group("cpu" if args.device == "cpu" else "nccl", timeout=args.timeout)
        device, rank = group.device, group.rank
    else:
        group, device, rank = None, args.device, 0
    tcfg = TrainConfig(steps=args.steps, batch_size=args.batch // args.micro_batches, grad_accum=args.micro_batches,
                       lr=3e-4, min_lr=3e-5, warmup=2, clip=1.0, device=device, progress=False,
                       precision=args.precision, eval_interval=0, checkpoint_interval=0)

    def make_model():
        mm.manual_seed(0)   # on the CPU: the same initial weights on every rank and in the one-process run
        return GPT(cfg, device=None if args.init_cpu else device)

    start = time.perf_counter()
    if group is None:
        from minillm.distributed.pipeline import PipelineStage

        model = make_model()
        whole = PipelineStage(model, 0, 1)   # the whole model as one stage: the same forward

        def loss_fn(m, batch):               # the ids' range checks (one GPU sync each) left out, as the stages do
            with backend.ids_checked_on_host():
                return whole(*batch)[1]

        trainer = Trainer(model, tcfg, _dataset(cfg), run_dir=args.run_dir, loss_fn=loss_fn)
        probe = None
    else:
        from minillm import precision
        from minillm.distributed.pipeline import build_stage, measured_layer_costs
        from minillm.distributed.pipeline_trainer import PipelineTrainer

        costs = None          # as minillm train --pp cuts: on a GPU by measured costs, on the CPU by FLOPs
        if device != "cpu":
            with precision.use_precision(args.precision):
                costs = measured_layer_costs(cfg, device, comm=group.comm, micro_batch=args.batch // args.micro_batches)
        if args.stage_init:   # only this rank's stage, drawn by its GPU: no host-side init of the whole model
            mm.manual_seed(rank)
            stage = build_stage(cfg, group.rank, group.world_size, device=device, own_stream=True, costs=costs)
        else:                 # only this rank's stage held, its weights the one-process run's (the CPU stream's)
            mm.manual_seed(0)
            stage = build_stage(cfg, group.rank, group.world_size, device=None if args.init_cpu else device,
                                costs=costs)
        trainer = PipelineTrainer(stage, tcfg, _dataset(cfg), group.comm, args.schedule, run_dir=args.run_dir)
        probe = StepProbe(trainer.engine, HostStandIn if device == "cpu" else None)
    if args.resume:
        trainer.resume()
    backend.synchronize(device)
    build_s = time.perf_counter() - start
    print(f"built in {build_s:.1f} s: {sum(p.data.size for p in trainer.model.parameters()):,} parameters here",
          flush=True)
    losses, times = [], []
    pool = _pool(device)
    while trainer.step < min(args.steps, args.stop_at or args.steps):
        t0 = time.perf_counter()
        loss, _ = trainer.train_step()
        backend.synchronize(device)
        times.append(time.perf_counter() - t0)
        losses.append(loss)
        print(f"step {trainer.step}: loss {loss:.6f} {times[-1] * 1e3:.0f} ms", flush=True)
        if args.save_every and trainer.step % args.save_every == 0:
            trainer.save()
        if args.kill_rank is not None and rank == args.kill_rank and trainer.step == args.kill_step:
            print(f"rank {rank}: SIGKILL myself at step {trainer.step}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
    record = {"rank": rank, "device": device, "parameters": sum(p.data.size for p in trainer.model.parameters()),
              "pool_peak_gib": pool["peak"] / 2**30 if pool else None, "device_used_gib": _device_used_gib(device)}
    if probe is not None:
        record.update(probe.summary(trainer.optimizer))
        print(f"last step on the GPU (ms from its start): {probe.timeline_text()}", flush=True)
    report = {"losses": losses, "step_s": times, "build_s": build_s, "micro_batches": args.micro_batches,
              "stages": group.world_size if group is not None else 1, "ranks": [record]}
    if group is not None:   # every rank's record to the last stage, which writes the report
        group.store.set(f"report/{rank}", record)
        report["ranks"] = [group.store.get(f"report/{r}") for r in range(group.world_size)]
    if args.out and (group is None or group.rank == group.world_size - 1):
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    print("record:", json.dumps(record), flush=True)
    if group is not None:
        from minillm.distributed import destroy_process_group

        destroy_process_group()


def _pool(device):
    if device == "cpu":
        return None
    import cupy

    pool = cupy.get_default_memory_pool()
    pool.free_all_blocks()   # what building the model left cached is not the training's peak
    state = {"peak": pool.total_bytes()}
    original = pool.malloc

    def tracking_malloc(size):   # the pool's high-water mark: what this process really needed
        block = original(size)
        state["peak"] = max(state["peak"], pool.total_bytes())
        return block

    cupy.cuda.set_allocator(tracking_malloc)
    return state


def _device_used_gib(device):
    """Device memory in use (all of it: the pool, the CUDA context, NCCL's and cuBLAS's buffers)."""
    if device == "cpu":
        return None
    import cupy

    free, total = cupy.cuda.runtime.memGetInfo()
    return (total - free) / 2**30


class StepProbe:
    """What each pipeline step does on this GPU, measured without a host sync.

    Time: CUDA events recorded around every forward, backward and exchange of
    the schedule (on the compute stream, where NCCL runs too), read after the
    step: the GPU time of each, the step's span on the GPU, and the host time
    until the whole schedule was issued (close to the span: the host is the
    bottleneck; far below it: the GPUs are).

    Memory: after every forward and backward, the pool's bytes in use minus
    what the step started with (parameters, optimizer state, the step's
    batches: gradients are None then, ``zero_grad``) minus the gradients
    allocated so far: the activations the schedule keeps alive (and the
    received buffers), without the parameter gradients that 1F1B's early
    backwards allocate and GPipe's all-forward peak does not have yet.
    """

    def __init__(self, engine, cupy=None):
        if cupy is None:
            import cupy
        self.cupy, self.engine = cupy, engine
        self.pool = cupy.get_default_memory_pool()
        self.params = list(engine.stage.parameters())
        self.steps, self.activation_peak, self.static, self.events, self.timeline = [], 0, 0, [], []
        for name in ("forward", "backward", "exchange"):
            setattr(engine, f"_{name}", self._timed(name, getattr(engine, f"_{name}")))
        run, issue_loss = engine.train_step, engine._loss_from_last_stage

        def train_step(batches, checked=False):
            self.static = self.pool.used_bytes()
            self.events, self.issued = [], None
            self.start, host0 = self._event(), time.perf_counter()
            loss = run(batches, checked=checked)      # ends in the loss broadcast's synchronize
            self._collect(time.perf_counter() - host0, (self.issued or time.perf_counter()) - host0)
            return loss

        def loss_from_last_stage(*args):
            self.issued = time.perf_counter()         # the whole schedule is enqueued
            return issue_loss(*args)

        engine.train_step, engine._loss_from_last_stage = train_step, loss_from_last_stage

    def _event(self):
        event = self.cupy.cuda.Event()
        event.record()
        return event

    def _timed(self, kind, fn):
        def timed(*args):
            start = self._event()
            out = fn(*args)
            self.events.append((kind, args[0] if kind != "exchange" else args[2], start, self._event()))
            grads = sum(p.grad.nbytes for p in self.params if p.grad is not None)
            if len(self.steps) >= 1:                  # from step 2: the first step's one-off buffers excluded
                self.activation_peak = max(self.activation_peak, self.pool.used_bytes() - self.static - grads)
            return out
        return timed

    def _collect(self, host_s, issued_s):
        elapsed = self.cupy.cuda.get_elapsed_time
        busy = {"forward": 0.0, "backward": 0.0, "exchange": 0.0}
        timeline = []
        for kind, mb, start, end in self.events:
            end.synchronize()
            busy[kind] += elapsed(start, end)
            timeline.append((kind, mb, elapsed(self.start, start), elapsed(self.start, end)))
        span = max((t[3] for t in timeline), default=0.0)
        self.steps.append({"host_ms": host_s * 1e3, "issued_ms": issued_s * 1e3, "span_ms": span,
                           **{f"{k}_ms": v for k, v in busy.items()}})
        self.timeline = timeline

    def timeline_text(self) -> str:
        names = {"forward": "F", "backward": "B", "exchange": "x"}
        return " ".join(f"{names[k]}{'' if mb is None or mb < 0 else mb}:{a:.1f}-{b:.1f}" for k, mb, a, b in self.timeline)

    def summary(self, optimizer) -> dict:
        later = self.steps[2:] or self.steps   # steps 3.. (the first ones compile and allocate)

        def median(key):
            values = sorted(s[key] for s in later)
            return values[len(values) // 2] if values else None

        optimizer_bytes = sum(v.nbytes for state in optimizer.state.values() for v in state.values()
                              if hasattr(v, "nbytes"))
        span, busy = median("span_ms"), median("forward_ms") + median("backward_ms") if later else None
        return {"stage_blocks": [self.engine.stage.start, self.engine.stage.end],
                "max_in_flight": self.engine.max_in_flight,
                "params_gib": sum(p.data.nbytes for p in self.params) / 2**30,
                "grads_gib": sum(p.data.nbytes for p in self.params if p.requires_grad) / 2**30,
                "optimizer_gib": optimizer_bytes / 2**30,
                "static_gib": self.static / 2**30,
                "activation_peak_gib": self.activation_peak / 2**30,
                "gpu_forward_ms": median("forward_ms"), "gpu_backward_ms": median("backward_ms"),
                "gpu_exchange_ms": median("exchange_ms"), "gpu_span_ms": span,
                "host_issue_ms": median("issued_ms"), "host_step_ms": median("host_ms"),
                "bubble": (1 - busy / span) if span and busy is not None else None}


class HostStandIn:
    """The pieces of CuPy that StepProbe uses, on the host, to rehearse it on the CPU: events read the
    host clock, and the pool's bytes in use are tracemalloc's (NumPy reports its allocations to it)."""

    class cuda:  # noqa: N801 - CuPy's name
        class Event:
            def record(self):
                self.t = time.perf_counter()

            def synchronize(self):
                pass

        @staticmethod
        def get_elapsed_time(start, end):
            return (end.t - start.t) * 1e3

    class _Pool:
        def used_bytes(self):
            return tracemalloc.get_traced_memory()[0]

    @classmethod
    def get_default_memory_pool(cls):
        if not tracemalloc.is_tracing():
            tracemalloc.start()
        return cls._Pool()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    c = sub.add_parser("collectives")
    c.add_argument("--device", default="cuda")
    t = sub.add_parser("train")
    t.add_argument("--preset", default="gpt2-124m")
    t.add_argument("--layers", type=int, default=0, help="override n_layer (with --d-model, --heads)")
    t.add_argument("--d-model", type=int, default=768)
    t.add_argument("--heads", type=int, default=12)
    t.add_argument("--context", type=int, default=1024)
    t.add_argument("--batch", type=int, default=16, help="global batch per step")
    t.add_argument("--micro-batches", type=int, default=8)
    t.add_argument("--schedule", default="1f1b")
    t.add_argument("--steps", type=int, default=20, help="the run's length (the lr schedule's)")
    t.add_argument("--stop-at", type=int, default=0, help="stop after this step (0: at --steps)")
    t.add_argument("--precision", default="fp32")
    t.add_argument("--device", default="cuda")
    t.add_argument("--init-cpu", action="store_true", help="initialise on the CPU (identical weights everywhere)")
    t.add_argument("--stage-init", action="store_true",
                   help="each rank draws only its stage, by its GPU's stream (build_stage(own_stream=True): a 10B model)")
    t.add_argument("--timeout", type=float, default=60)
    t.add_argument("--out")
    t.add_argument("--run-dir")
    t.add_argument("--save-every", type=int, default=0)
    t.add_argument("--resume", action="store_true")
    t.add_argument("--kill-rank", type=int)
    t.add_argument("--kill-step", type=int)
    args = parser.parse_args(argv)
    if getattr(args, "device", "cpu") == "cuda" and "LOCAL_RANK" in os.environ:
        args.device = f"cuda:{os.environ['LOCAL_RANK']}"
    from minillm.distributed.communicator import CommError

    try:
        collectives(args) if args.what == "collectives" else train(args)
    except CommError as error:   # a peer died or hung: one clear line, a non-zero exit
        print(f"minillm: error: {error}", file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
