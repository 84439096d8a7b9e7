"""PyTorch eager and Hugging Face ``generate`` against minillm on the same GPU, in one process.

Training: gpt2-124m (transformers' GPT2LMHeadModel, randomly initialised; its default attention is SDPA),
B=8, T=1024, AdamW, at fp32, TF32 and bf16 autocast; tokens/s and peak memory
(``torch.cuda.max_memory_allocated``), then ``minillm bench train``'s measurement at fp32,
tf32 and bf16 (peak = bytes held by live CuPy arrays, the same notion). Decoding: batch 1 and
8, 16-token prompt, 128 new tokens, greedy, with the KV cache: HF ``generate`` at fp32 and
bf16 against ``minillm bench generate``'s. Needs torch and transformers (the GPU machine has
them); they are never imported by minillm itself.

    PYTHONPATH=. python3 benchmarks/torch_gpu_compare.py [--steps N] [--skip-torch] [--skip-minillm]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

B, T, NEW, PROMPT = 8, 1024, 128, 16


def torch_train(precision: str, steps: int, warmup: int = 3) -> dict:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    torch.backends.cudnn.allow_tf32 = precision == "tf32"
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_positions=T)).cuda().train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)
    ids = torch.randint(0, 50257, (B, T), device="cuda")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16")

    def step():
        with autocast:
            loss = model(ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    result = {"framework": "torch", "what": "train", "precision": precision,
              "tokens_per_s": B * T * steps / seconds, "peak_gib": torch.cuda.max_memory_allocated() / 2**30}
    del model, opt
    torch.cuda.empty_cache()
    return result


def torch_generate(precision: str, batch: int) -> dict:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model = GPT2LMHeadModel(GPT2Config()).cuda().eval().to(dtype)
    ids = torch.randint(0, 50257, (batch, PROMPT), device="cuda")
    kwargs = dict(max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=50256, use_cache=True)
    with torch.no_grad():
        model.generate(ids, **{**kwargs, "max_new_tokens": 4, "min_new_tokens": 4})
        torch.cuda.synchronize()
        start = time.perf_counter()
        model.generate(ids, **kwargs)
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    del model
    torch.cuda.empty_cache()
    return {"framework": "hf", "what": "generate", "precision": precision, "batch": batch,
            "tokens_per_s": batch * NEW / seconds}


def minillm_train(precision: str, steps: int, cuda_graph: bool = False) -> dict:
    import cupy

    from minillm.bench.train import measure_train_step
    from minillm.models import GPTConfig

    cupy.get_default_memory_pool().free_all_blocks()
    r = measure_train_step(GPTConfig.from_preset("gpt2-124m"), B, 1, "cuda", steps, 2, 0, precision,
                           cuda_graph=cuda_graph)
    return {"framework": "minillm" + (" graph" if cuda_graph else ""), "what": "train", "precision": precision,
            "tokens_per_s": r["tokens_per_s"],
            "peak_gib": r["gpu_peak_in_use_gib"], "mfu": r["mfu"], "peak_tflops": r["peak_tflops"]}


def minillm_generate(precision: str, batch: int) -> dict:
    from minillm.bench.generate import measure_generation

    r = measure_generation("gpt2-124m", batch, NEW, PROMPT, "cuda", (True,), 0, precision)
    return {"framework": "minillm", "what": "generate", "precision": precision, "batch": batch,
            "tokens_per_s": r["cache_tokens_per_s"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="timed training steps per run (default: 10)")
    parser.add_argument("--skip-torch", action="store_true", help="only minillm")
    parser.add_argument("--skip-minillm", action="store_true", help="only PyTorch / transformers")
    parser.add_argument("--train", default="fp32,tf32,bf16", help="precisions to train (default: fp32,tf32,bf16)")
    parser.add_argument("--generate", default="fp32,bf16", help="precisions to decode (default: fp32,bf16)")
    parser.add_argument("--cuda-graph", default="both", choices=["off", "on", "both"],
                        help="minillm training steps uncaptured, as a replayed CUDA graph (--cuda-graph), or both "
                             "(default: both)")
    args = parser.parse_args()
    out = open(os.path.join(os.environ.get("OUT", "."), "compare.jsonl"), "a")
    rows = []

    def record(result):
        rows.append(result)
        out.write(json.dumps(result) + "\n")
        out.flush()
        print(json.dumps(result), flush=True)

    jobs = []
    for p in filter(None, args.train.split(",")):
        if not args.skip_torch:
            jobs.append(lambda p=p: torch_train(p, args.steps))
    for p in filter(None, args.generate.split(",")):
        for b in (1, 8):
            if not args.skip_torch:
                jobs.append(lambda p=p, b=b: torch_generate(p, b))
    for p in filter(None, args.train.split(",")):
        if not args.skip_minillm:
            for graph in {"off": (False,), "on": (True,), "both": (False, True)}[args.cuda_graph]:
                jobs.append(lambda p=p, graph=graph: minillm_train(p, args.steps, graph))
    for p in filter(None, args.generate.split(",")):
        for b in (1, 8):
            if not args.skip_minillm:
                jobs.append(lambda p=p, b=b: minillm_generate(p, b))
    for job in jobs:
        try:
            record(job())
        except Exception as error:  # one failure must not hide the other figures
            record({"error": repr(error)[:500]})
    print("\n| what | precision | PyTorch / HF | minillm | ratio |")
    print("|---|---|---|---|---|")
    for what, key in (("train", None), ("generate", 1), ("generate", 8)):
        for p in ("fp32", "tf32", "bf16"):
            pick = [r for r in rows if r.get("what") == what and r.get("precision") == p
                    and (key is None or r.get("batch") == key)]
            ref = next((r for r in pick if r["framework"] in ("torch", "hf")), None)
            for ours in [r for r in pick if r["framework"].startswith("minillm")] or [None]:
                if ref is None and ours is None:
                    continue
                fmt = lambda r: "—" if r is None else f"{r['tokens_per_s']:,.0f} tok/s" + (
                    f", {r['peak_gib']:.1f} GiB" if "peak_gib" in r else "")
                ratio = f"{ours['tokens_per_s'] / ref['tokens_per_s']:.2f}×" if ref and ours else "—"
                label = (what if key is None else f"{what} batch {key}") + (
                    " (CUDA graph)" if ours and ours["framework"].endswith("graph") else "")
                print(f"| {label} | {p} | {fmt(ref)} | {fmt(ours)} | {ratio} |")


if __name__ == "__main__":
    main()
