"""Training-step throughput and peak memory (``minillm bench train``)."""

from __future__ import annotations

import os
import sys
import time

import numpy as np

from .. import backend
from ..kernels.matmul import cpu_blas_name

BENCH_DEFAULT = dict(n_layer=6, n_head=6, d_model=384, context_length=256, vocab_size=65)

# Dense peak TFLOP/s from NVIDIA's SXM datasheets (the H100 and H200 share one chip): fp32 on the
# CUDA cores, TF32 and bf16/fp16 on the tensor cores, without structured sparsity. MFU is
# measured against the peak of the precision the products run in.
GPU_PEAK_TFLOPS = {"H100": {"fp32": 66.9, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4},
                   "H200": {"fp32": 66.9, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4}}


def flops_per_token(config, parameters: int) -> float:
    """Training FLOPs per token (forward + backward), as in PaLM's appendix B and nanoGPT:
    6 N for the products with the N weights (N without the position table, which is a lookup;
    the tied token table counts once, as the output layer) plus 12 · layers · d_model · T for the
    attention scores and their use (causal masking not discounted)."""
    n = parameters - config.context_length * config.d_model
    return 6.0 * n + 12.0 * config.n_layer * config.d_model * config.context_length


def gpu_peak_tflops(device: str, precision: str):
    """(GPU name, dense peak TFLOP/s for the precision) or (name, None) for a GPU not in the table."""
    import cupy  # noqa: PLC0415

    name = cupy.cuda.runtime.getDeviceProperties(int(device.split(":")[1]))["name"]
    name = name.decode() if isinstance(name, bytes) else str(name)
    for key, peaks in GPU_PEAK_TFLOPS.items():
        if key in name:
            return name, peaks[precision]
    return name, None


def measure_train_step(config, batch_size: int = 8, grad_accum: int = 1, device: str = "cpu", steps: int = 10,
                       warmup: int = 2, seed: int = 0, precision: str = "fp32", mesh_shape=None,
                       schedule: str = "1f1b", timeline: bool = False, cuda_graph: bool = False) -> dict:
    """Time ``steps`` full training steps (forward, backward, clip, AdamW) on random tokens, after
    ``warmup`` untimed ones, in ``precision`` (fp32, tf32, bf16, fp16); returns tokens/s, ms per
    step, peak memory and, on a GPU, MFU as a dict.

    ``mesh_shape`` (a ``distributed.MeshShape``, in a job started by ``minillm launch``): the
    step runs on the (pp, dp, tp) mesh (``ParallelTrainer``), ``batch_size`` is the global
    batch, tokens/s counts the whole job's tokens and every rank's peak memory is listed.
    With pp > 1, ``schedule`` is the pipeline's; ``timeline`` runs one more (untimed) step
    recording every stage's actions: ``result["timeline"]`` lists each rank's events.
    ``cuda_graph``: the forward and backward replayed as a captured CUDA graph (the first warmup
    step runs uncaptured, the second captures); peak memory then includes the graph's own pool."""
    from .. import manual_seed  # noqa: PLC0415
    from ..data.dataset import TokenDataset  # noqa: PLC0415
    from ..models import GPT  # noqa: PLC0415
    from ..models.gpt import gpt_num_parameters  # noqa: PLC0415
    from ..train import TrainConfig, Trainer  # noqa: PLC0415

    device = backend.parse_device(device)
    if cuda_graph:
        warmup = max(warmup, 2)          # one eager step, then the one that captures the graph
    rss_before = peak_rss_bytes()
    manual_seed(seed)
    T, B = config.context_length, batch_size
    tokens = np.random.default_rng(seed).integers(0, config.vocab_size, size=max(16 * T, 4096), dtype=np.int64)
    dataset = TokenDataset(tokens, T, stride=1, val_fraction=0.0, seed=seed)
    mesh = None
    if mesh_shape is not None and mesh_shape.size > 1:
        from ..distributed.mesh import init_mesh  # noqa: PLC0415

        mesh, device = init_mesh(mesh_shape, device)
    if mesh is None:
        model = GPT(config)
    else:
        from ..distributed.parallel_trainer import rank_model  # noqa: PLC0415

        model = rank_model(config, mesh, device, precision)   # --pp: only this rank's stage is built
    parameters = gpt_num_parameters(config)        # the whole model's (MFU counts its FLOPs per token)
    train_cfg = TrainConfig(steps=warmup + steps + 1, batch_size=B, grad_accum=grad_accum, warmup=0, device=device,
                            progress=False, precision=precision, cuda_graph=cuda_graph)
    if mesh is None:
        trainer = Trainer(model, train_cfg, dataset)
    else:
        from ..distributed.parallel_trainer import ParallelTrainer  # noqa: PLC0415

        trainer = ParallelTrainer(model, train_cfg, dataset, mesh, schedule=schedule)
    pool = None
    if device != "cpu":
        import cupy  # noqa: PLC0415

        pool = cupy.get_default_memory_pool()
    for _ in range(warmup):
        trainer.train_step()
    backend.synchronize(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        trainer.train_step()
        backend.synchronize(device)
        times.append(time.perf_counter() - start)
    tokens_per_step = B * grad_accum * T
    total = sum(times)
    result = {
        "config": config.to_dict(), "batch_size": B, "grad_accum": grad_accum, "device": device,
        "dtype": str(backend.get_default_dtype()), "precision": precision, "parameters": parameters,
        "cuda_graph": cuda_graph,
        "steps": steps, "warmup": warmup, "tokens_per_s": tokens_per_step * steps / total,
        "ms_per_step_mean": 1000 * total / steps, "ms_per_step_min": 1000 * min(times),
        "peak_rss_mib": peak_rss_bytes() / 2**20, "rss_before_model_mib": rss_before / 2**20,
        "threads_hint": os.environ.get("OPENBLAS_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS") or "default",
        "cpu_blas": cpu_blas_name(),                        # the library of the CPU's large products
    }
    if pool is not None:
        graph = trainer.graph_memory_bytes() if hasattr(trainer, "graph_memory_bytes") else 0   # the graph's own pool
        result["gpu_pool_peak_gib"] = (pool.total_bytes() + graph) / 2**30  # pools keep freed blocks: their size is the peak
        result["gpu_peak_in_use_gib"] = (_gpu_peak_in_use(trainer, pool) + graph) / 2**30
        gpus = 1 if mesh is None else mesh.world.size
        achieved = flops_per_token(config, parameters) * result["tokens_per_s"] / 1e12 / gpus   # per GPU
        name, peak = gpu_peak_tflops(device, precision)
        result.update(gpu=name, model_tflops=achieved, peak_tflops=peak, mfu=achieved / peak if peak else None)
    if mesh is not None:
        from ..distributed.parallel_trainer import all_gather_json  # noqa: PLC0415

        mine = {"parameters": sum(p.data.size for p in trainer.model.parameters()),
                "parameter_bytes": sum(p.data.nbytes for p in trainer.model.parameters()),
                "gpu_peak_in_use_gib": result.get("gpu_peak_in_use_gib"), "peak_rss_mib": result["peak_rss_mib"]}
        result.update(mesh=vars(mesh.shape), rank=mesh.world.rank, ranks=all_gather_json(mesh.world, mine, device))
        engine = getattr(trainer, "engine", None)
        if timeline and engine is not None:
            engine.timeline = True
            trainer.train_step()
            engine.timeline = False
            result["timeline"] = all_gather_json(mesh.world, {"stage": engine.stage.stage, "events": engine.events},
                                                 device)
    return result


def _gpu_peak_in_use(trainer, pool) -> int:
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


def peak_rss_bytes() -> int:
    """This process's peak resident memory (ru_maxrss: KiB on Linux, bytes on macOS; 0 on Windows)."""
    try:
        import resource  # noqa: PLC0415 (POSIX only)
    except ImportError:
        return 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024
