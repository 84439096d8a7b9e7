"""Where a GPU training step spends its time: CUDA events around every op's forward and backward
(per Function class), the optimizer and the gradient clipping, for gpt2-124m B=8 T=1024.

    PYTHONPATH=. python3 benchmarks/profile_gpu_step.py fp32 tf32 bf16

Events sit on the stream between kernels, so each op's figure is the GPU time from its first
kernel to its last. To keep Python's launch time out of those figures, each step starts behind a
spin kernel that holds the GPU for HEAD_START_MS: the host queues the whole forward and backward
meanwhile, and the GPU then runs it back to back, as a replayed CUDA graph would (the clipping and
AdamW after the loss's host read are issued as they come). Without the head start (HEAD_START_MS=0)
the figures include host gaps, as the eager step really runs.
"""

from __future__ import annotations

import collections
import sys

import numpy as np


HEAD_START_MS = float(__import__("os").environ.get("HEAD_START_MS", "400"))


def spin(ms: float) -> None:
    """Hold the GPU for about ``ms`` milliseconds (one thread busy-waiting on the clock)."""
    import cupy

    if ms <= 0:
        return
    kernel = cupy.RawKernel(r"""extern "C" __global__ void spin(long long cycles) {
        const long long start = clock64(); while (clock64() - start < cycles) {} }""", "spin")
    rate_khz = cupy.cuda.Device().attributes["ClockRate"]          # kHz: cycles per millisecond
    kernel((1,), (1,), (np.int64(ms * rate_khz),))


def profile(precision: str, steps: int = 3, batch: int = 8) -> None:
    import cupy

    import minillm as mm
    from minillm import optim
    from minillm.data.dataset import TokenDataset
    from minillm.models import GPT, GPTConfig
    from minillm.tensor import Function
    from minillm.train import TrainConfig, Trainer

    events = []

    def timed(name, method):
        def wrapper(*args, **kwargs):
            start, stop = cupy.cuda.Event(), cupy.cuda.Event()
            start.record()
            out = method(*args, **kwargs)
            stop.record()
            events.append((name, start, stop))
            return out
        return wrapper

    def subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    patched = []
    for cls in set(subclasses(Function)):
        for method in ("forward", "backward"):
            if method in cls.__dict__:
                patched.append((cls, method, cls.__dict__[method]))
                setattr(cls, method, timed(f"{cls.__name__}.{method}", cls.__dict__[method]))
    for cls, method, label in ((optim.AdamW, "step", "AdamW.step"),):
        patched.append((cls, method, cls.__dict__[method]))
        setattr(cls, method, timed(label, cls.__dict__[method]))
    clip = optim.clip_grad_norm_
    import minillm.train.trainer as trainer_module
    trainer_module.optim.clip_grad_norm_ = timed("clip_grad_norm_", clip)
    try:
        config = GPTConfig.from_preset("gpt2-124m")
        mm.manual_seed(0)
        tokens = np.random.default_rng(0).integers(0, config.vocab_size, size=64 * 1024)
        data = TokenDataset(tokens, config.context_length, stride=1, val_fraction=0.0, seed=0)
        trainer = Trainer(GPT(config), TrainConfig(steps=100, batch_size=batch, warmup=0, device="cuda",
                                                  progress=False, precision=precision), data)
        trainer.train_step()
        cupy.cuda.get_current_stream().synchronize()
        totals = collections.Counter()
        step_ms = []
        for _ in range(steps):
            events.clear()
            begin, end = cupy.cuda.Event(), cupy.cuda.Event()
            spin(HEAD_START_MS)
            begin.record()
            trainer.train_step()
            end.record()
            end.synchronize()
            step_ms.append(cupy.cuda.get_elapsed_time(begin, end))
            for name, start, stop in events:
                totals[name] += cupy.cuda.get_elapsed_time(start, stop) / steps
    finally:
        for cls, method, original in patched:
            setattr(cls, method, original)
        trainer_module.optim.clip_grad_norm_ = clip
    step = sum(step_ms) / steps
    behind = f" (GPU time behind a {HEAD_START_MS:.0f} ms head start)" if HEAD_START_MS > 0 else ""
    print(f"== {precision}: {step:.1f} ms/step, {batch * 1024 / step * 1000:,.0f} tokens/s{behind}")
    accounted = 0.0
    for name, ms in totals.most_common():
        if ms >= 0.2:
            print(f"  {name:42s} {ms:7.2f} ms  {100 * ms / step:5.1f}%")
        accounted += ms
    print(f"  {'(ops under 0.2 ms each, summed in the total)':42s}")
    print(f"  {'between ops (host gaps, un-timed work)':42s} {step - accounted:7.2f} ms  {100 * (step - accounted) / step:5.1f}%")


if __name__ == "__main__":
    for precision in sys.argv[1:] or ["fp32", "tf32", "bf16"]:
        profile(precision)
