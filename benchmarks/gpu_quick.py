"""Quick GPU checks in one process (for a short lease): attention and linear micro-benchmarks,
training steps of gpt2-124m at each precision, long-context memory, decoding. Prints one line per
measurement and writes them as JSON lines to $OUT/quick.jsonl (or ./quick.jsonl).

    PYTHONPATH=. python3 benchmarks/gpu_quick.py [section ...]
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback

import numpy as np

OUT = os.environ.get("OUT", ".")
RESULTS = open(os.path.join(OUT, "quick.jsonl"), "a")


def report(**fields):
    print(json.dumps(fields), flush=True)
    RESULTS.write(json.dumps(fields) + "\n")
    RESULTS.flush()


def cuda_time(fn, repeat=10, warmup=2):
    import cupy

    for _ in range(warmup):
        fn()
    start, stop = cupy.cuda.Event(), cupy.cuda.Event()
    start.record()
    for _ in range(repeat):
        fn()
    stop.record()
    stop.synchronize()
    return cupy.cuda.get_elapsed_time(start, stop) / repeat


def attention_micro():
    import minillm as mm
    from minillm import functional as F
    from minillm.ops import attention

    rng = np.random.default_rng(0)
    B, H, T, D = 8, 12, 1024, 64
    q, k, v = (mm.Tensor(rng.standard_normal((B, H, T, D)).astype(np.float32), requires_grad=True, device="cuda")
               for _ in range(3))
    g = mm.backend.to_device(rng.standard_normal((B, H, T, D)).astype(np.float32), "cuda")
    for path in ("scores", "flash"):
        attention.GPU_ATTENTION = path
        for mode in ("fp32", "tf32", "bf16"):
            def fwd():
                with mm.precision.use_precision(mode):
                    return F.scaled_dot_product_attention(q, k, v, causal=True)

            def fwd_bwd():
                fwd().backward(g)

            report(what="attention", path=path, precision=mode, B=B, H=H, T=T, D=D,
                   fwd_ms=cuda_time(fwd), fwd_bwd_ms=cuda_time(fwd_bwd))
    attention.GPU_ATTENTION = "auto"


def linear_micro():
    import minillm as mm
    from minillm import functional as F

    rng = np.random.default_rng(0)
    x = mm.Tensor(rng.standard_normal((8192, 768)).astype(np.float32), requires_grad=True, device="cuda")
    w = mm.Tensor(rng.standard_normal((3072, 768)).astype(np.float32) * 0.02, requires_grad=True, device="cuda")
    b = mm.Tensor(np.zeros(3072, np.float32), requires_grad=True, device="cuda")
    g = mm.backend.to_device(rng.standard_normal((8192, 3072)).astype(np.float32), "cuda")
    flops = 2 * 8192 * 768 * 3072
    for mode in ("fp32", "tf32", "bf16"):
        def fwd():
            with mm.precision.use_precision(mode):
                return F.linear(x, w, b)

        def fwd_bwd():
            fwd().backward(g)

        f, fb = cuda_time(fwd), cuda_time(fwd_bwd)
        report(what="linear 8192x768 @ 768x3072", precision=mode, fwd_ms=f, fwd_bwd_ms=fb,
               fwd_tflops=flops / f / 1e9, bwd_tflops=2 * flops / (fb - f) / 1e9)


def gemm_micro():
    """The linear layer's product alone: which output dtype and compute mode cuBLAS runs fastest."""
    import cupy

    from minillm.kernels.matmul import gemm
    from minillm.precision import bfloat16

    rng = np.random.default_rng(0)
    x32 = cupy.asarray(rng.standard_normal((8192, 768)).astype(np.float32))
    w32 = cupy.asarray(rng.standard_normal((3072, 768)).astype(np.float32))
    xb, wb = x32.astype(bfloat16()), w32.astype(bfloat16())
    flops = 2 * 8192 * 768 * 3072
    cases = {"fp32": lambda: gemm(x32, w32, trans_b=True), "tf32": lambda: gemm(x32, w32, trans_b=True, tf32=True),
             "bf16->fp32": lambda: gemm(xb, wb, trans_b=True, out_dtype=np.float32),
             "bf16->bf16": lambda: gemm(xb, wb, trans_b=True),
             "cast x to bf16": lambda: x32.astype(bfloat16()),
             "cupy.matmul bf16 2-D": lambda: cupy.matmul(xb, wb.T)}
    for name, fn in cases.items():
        ms = cuda_time(fn, repeat=20)
        report(what="gemm 8192x768 @ (3072x768)T", case=name, ms=round(ms, 4), tflops=round(flops / ms / 1e9, 1))


def head_micro(dtypes=("bf16", "fp32", "tf32")):
    """The LM head's three products (y = x Wᵀ, dx = dy W, dW = dyᵀ x) for GPT-2's vocabulary of
    50,257 (rows of dy and y 50,257 elements long: not a multiple of 8) against 50,264 (a multiple
    of 8), in bf16 and in float32 (plain and TF32), and one block's products in bf16, to see what
    the odd leading dimension costs cuBLAS."""
    import cupy

    from minillm.kernels.matmul import gemm
    from minillm.precision import bfloat16

    rng = np.random.default_rng(0)
    n, c = 8192, 768
    for name in dtypes:
        dtype = bfloat16() if name == "bf16" else np.float32
        tf32 = name == "tf32"
        x = cupy.asarray(rng.standard_normal((n, c)).astype(np.float32)).astype(dtype)
        widths = (50257, 50264, 2304, 768, 3072) if name == "bf16" else (50257, 50264)
        for out_features in widths:
            w = cupy.asarray(rng.standard_normal((out_features, c)).astype(np.float32)).astype(dtype)
            dy = cupy.asarray(rng.standard_normal((n, out_features)).astype(np.float32)).astype(dtype)
            flops = 2 * n * c * out_features
            cases = {"y = x Wt": lambda: gemm(x, w, trans_b=True, out_dtype=np.float32, tf32=tf32),
                     "dx = dy W": lambda: gemm(dy, w, out_dtype=np.float32, tf32=tf32),
                     "dW = dyt x": lambda: gemm(dy, x, trans_a=True, out_dtype=np.float32, tf32=tf32)}
            for case, fn in cases.items():
                ms = cuda_time(fn, repeat=5)
                report(what=f"{name} product, out_features {out_features}", case=case, ms=round(ms, 3),
                       tflops=round(flops / ms / 1e9, 1))


def train(modes=("fp32", "tf32", "bf16"), steps=4, warmup=2):
    from minillm.bench.train import measure_train_step
    from minillm.models import GPTConfig

    config = GPTConfig.from_preset("gpt2-124m")
    for mode in modes:
        r = measure_train_step(config, 8, 1, "cuda", steps, warmup, 0, mode)
        report(what="train gpt2-124m B=8 T=1024", precision=mode, tokens_per_s=round(r["tokens_per_s"]),
               ms=round(r["ms_per_step_mean"], 1), peak_gib=round(r["gpu_peak_in_use_gib"], 2),
               pool_gib=round(r["gpu_pool_peak_gib"], 2), mfu=r["mfu"])


def long_context(lengths=(1024, 2048, 4096, 8192)):
    import cupy

    from minillm.bench.train import measure_train_step
    from minillm.models import GPTConfig
    from minillm.ops import attention

    attention.GPU_ATTENTION = "flash"
    for t in lengths:
        cupy.get_default_memory_pool().free_all_blocks()
        config = GPTConfig.from_preset("gpt2-124m")
        config = GPTConfig.from_dict({**config.to_dict(), "context_length": t})
        r = measure_train_step(config, 1, 1, "cuda", 2, 1, 0, "bf16")
        report(what="long context bf16 flash B=1", T=t, tokens_per_s=round(r["tokens_per_s"]),
               peak_gib=round(r["gpu_peak_in_use_gib"], 2))
    attention.GPU_ATTENTION = "auto"


def decode(modes=("fp32", "bf16"), batches=(1, 8)):
    from minillm.bench.generate import measure_generation

    for mode in modes:
        for b in batches:
            r = measure_generation("gpt2-124m", b, 128, 16, "cuda", (True,), 0, mode)
            report(what="decode gpt2-124m 128 tokens", precision=mode, batch=b,
                   tokens_per_s=round(r["cache_tokens_per_s"], 1))


def host(modes=("tf32", "bf16"), repeat=5):
    """Is a training forward + backward host-bound? Time issuing it (no sync inside) against the
    time until the GPU is done: if the host takes as long as the GPU, the GPU waits for Python."""
    import cupy

    import minillm as mm
    from minillm import functional as F
    from minillm.models import GPT, GPTConfig

    config = GPTConfig.from_preset("gpt2-124m")
    mm.manual_seed(0)
    model = GPT(config, device="cuda")
    ids = cupy.asarray(np.random.default_rng(0).integers(0, config.vocab_size, (8, 1025)))
    for mode in modes:
        def step():
            with mm.precision.use_precision(mode):
                loss = F.cross_entropy(model(ids[:, :-1]), ids[:, 1:])
                loss.backward()
            for p in model.parameters():
                p.grad = None
        step()
        cupy.cuda.get_current_stream().synchronize()
        start = time.perf_counter()
        for _ in range(repeat):
            step()
        issued = time.perf_counter() - start
        cupy.cuda.get_current_stream().synchronize()
        done = time.perf_counter() - start
        report(what="host vs GPU, fwd+bwd gpt2-124m B=8 T=1024", precision=mode,
               host_issue_ms=round(1000 * issued / repeat, 1), until_gpu_done_ms=round(1000 * done / repeat, 1))


SECTIONS = {"head": head_micro, "host": host, "attention": attention_micro, "linear": linear_micro, "gemm": gemm_micro,
            "train": train, "long": long_context,
            "decode": decode}

if __name__ == "__main__":
    for name in sys.argv[1:] or list(SECTIONS):
        start = time.time()
        try:
            SECTIONS[name]()
        except Exception:  # keep going: one broken section must not hide the others
            report(what=name, error=traceback.format_exc()[-1500:])
        print(f"[{name}: {time.time() - start:.1f} s]", flush=True)
