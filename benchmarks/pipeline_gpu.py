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
        model = make_model()
        trainer = Trainer(model, tcfg, _dataset(cfg), run_dir=args.run_dir)
        engine = None
    else:
        from minillm.distributed.pipeline import build_stage
        from minillm.distributed.pipeline_trainer import PipelineTrainer

        stage = build_stage(make_model, group.rank, group.world_size)
        trainer = PipelineTrainer(stage, tcfg, _dataset(cfg), group.comm, args.schedule, run_dir=args.run_dir)
        engine = trainer.engine
        _watch_activation_memory(engine)
    if args.resume:
        trainer.resume()
    build_s = time.perf_counter() - start
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
    memory = {"rank": rank, "device": device, "pool_peak_gib": pool["peak"] / 2**30 if pool else None,
              "activation_peak_gib": getattr(engine, "activation_peak", 0) / 2**30 if engine else None,
              "max_in_flight": engine.max_in_flight if engine else None,
              "stage_blocks": [engine.stage.start, engine.stage.end] if engine else None,
              "parameters": sum(p.data.size for p in trainer.model.parameters())}
    report = {"losses": losses, "step_s": times, "build_s": build_s, "memory": [memory]}
    if group is not None:   # every rank's memory to the last stage, which writes the report
        group.store.set(f"report/{rank}", memory)
        report["memory"] = [group.store.get(f"report/{r}") for r in range(group.world_size)]
    if args.out and (group is None or group.rank == group.world_size - 1):
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    print("memory:", json.dumps(memory), flush=True)
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


def _watch_activation_memory(engine) -> None:
    """Record, after each forward, the bytes in use above the step's start: what the schedule keeps alive."""
    if engine.device == "cpu":
        engine.activation_peak = 0
        return
    import cupy

    pool = cupy.get_default_memory_pool()
    run, forward = engine.train_step, engine._forward
    engine.activation_peak = 0

    def train_step(batches):
        engine.step_base = pool.used_bytes()
        return run(batches)

    def tracked_forward(mb, x):
        out = forward(mb, x)
        engine.activation_peak = max(engine.activation_peak, pool.used_bytes() - engine.step_base)
        return out

    engine.train_step, engine._forward = train_step, tracked_forward


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
    collectives(args) if args.what == "collectives" else train(args)


if __name__ == "__main__":
    main()
