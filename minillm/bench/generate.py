"""Generation tokens/s with and without the KV cache (``minillm bench generate``)."""

from __future__ import annotations

import time

import numpy as np
from tqdm import tqdm

from .. import backend


def measure_generation(preset: str = "gpt2-124m", batch_size: int = 1, new_tokens: int = 256, prompt_len: int = 16,
                       device: str = "cpu", modes: tuple[bool, ...] = (True, False), seed: int = 0,
                       precision: str = "fp32", progress: bool = False) -> dict:
    """Greedy generation from a randomly initialised GPT, timed once per mode (True: with the KV
    cache), in ``precision``; with both modes, also the speed-up and whether both produced the
    same tokens. On a GPU also the peak memory held by arrays. ``progress``: a bar per mode on
    stderr when it is a terminal (its update, once per token, is a counter: the ids are on the
    host already)."""
    from ..precision import use_precision  # noqa: PLC0415

    with use_precision(precision):
        result = _measure_generation(preset, batch_size, new_tokens, prompt_len, device, modes, seed, progress)
    result["precision"] = precision
    return result


def _measure_generation(preset, batch_size, new_tokens, prompt_len, device, modes, seed, progress) -> dict:
    from .. import manual_seed  # noqa: PLC0415
    from ..generate import generate  # noqa: PLC0415
    from ..models import GPT, GPTConfig  # noqa: PLC0415

    device = backend.parse_device(device)
    config = GPTConfig.from_preset(preset)
    manual_seed(seed)
    model = GPT(config, device=device).eval()
    prompt = np.random.default_rng(seed).integers(0, config.vocab_size, (batch_size, prompt_len))
    result = {"preset": preset, "parameters": model.num_parameters(), "device": device,
              "dtype": str(model.wte.weight.dtype), "batch_size": batch_size,
              "prompt_len": prompt_len, "new_tokens": new_tokens}
    outputs = {}
    generate(model, prompt, 2, temperature=0)             # warm-up: BLAS threads, GPU kernels, the pool
    for use_cache in modes:
        name = "cache" if use_cache else "no_cache"
        with tqdm(total=new_tokens, desc="with KV cache" if use_cache else "without cache", unit="token",
                  leave=False, disable=None if progress else True) as bar:
            backend.synchronize(device)
            start = time.perf_counter()
            outputs[name] = generate(model, prompt, new_tokens, temperature=0, use_cache=use_cache,
                                     stream=lambda column: bar.update())
            backend.synchronize(device)
            seconds = time.perf_counter() - start
        result[f"{name}_seconds"] = seconds
        result[f"{name}_tokens_per_s"] = batch_size * new_tokens / seconds
    if device != "cpu":
        import cupy  # noqa: PLC0415

        result["gpu_pool_peak_gib"] = cupy.get_default_memory_pool().total_bytes() / 2**30   # the pool's high mark
    if len(outputs) == 2:
        result["speedup"] = result["cache_tokens_per_s"] / result["no_cache_tokens_per_s"]
        result["same_tokens"] = bool(np.array_equal(outputs["cache"], outputs["no_cache"]))
    return result
