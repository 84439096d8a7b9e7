"""``minillm bench tokenizer|train|generate|ops``: speed and memory, measured by ``minillm.bench``.

    minillm bench train                             # tokens/s and peak memory, 6L/6H/384d, T=256, B=8
    minillm bench train --preset gpt2-124m --context 1024 --device cuda
    minillm bench generate                          # gpt2-124m, batch 1, 256 tokens, CPU
    minillm bench generate --preset gpt2-medium --batch-size 8 --device cuda --cache-only
    minillm bench ops --case attention --repeat 10
    minillm bench tokenizer --memory-mb 0
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
from pathlib import Path

from . import argtypes
from ..precision import check_precision
from .common import (HelpFormatter, add_command, add_config_options, add_cuda_graph_option, add_device_option,
                     add_json_option,
                     add_precision_option, add_schedule_option, add_seed_option, check_output_file,
                     check_schedule)

MODEL_SIZES = ("n_layer", "n_head", "d_model", "context_length", "vocab_size")  # over the preset's


def register(subparsers) -> argparse.ArgumentParser:
    bench = add_command(subparsers, "bench", help="measure speed and memory (tokenizer, training step, generation, ops)")
    benches = bench.add_subparsers(dest="bench", metavar="WHAT")
    benches.required = True
    _register_tokenizer(benches)
    _register_train(benches)
    _register_generate(benches)
    _register_ops(benches)
    return bench


# ---------------------------------------------------------------- bench tokenizer


def _register_tokenizer(benches) -> None:
    p = add_command(benches, "tokenizer", help="tokenizer encode/train speed and memory on tinyshakespeare")
    p.add_argument("--data", metavar="DIR", type=Path, default=None,
                   help="folder with tinyshakespeare.txt and gpt2/ (default: ../shared/data)")
    p.add_argument("--workers", metavar="N", type=argtypes.positive_int, default=os.cpu_count() or 1,
                   help="processes for encode_batch (default: the number of CPUs)")
    p.add_argument("--vocab-size", metavar="N", type=argtypes.positive_int, default=4096,
                   help="vocabulary of the training benchmark (default: 4096)")
    p.add_argument("--memory-mb", metavar="N", type=argtypes.non_negative_int, default=100,
                   help="size of the generated corpus for the peak-memory run, 0 = skip (default: 100)")
    p.add_argument("--repeat", metavar="N", type=argtypes.positive_int, default=3,
                   help="timed repetitions; the best is reported (default: 3)")
    p.set_defaults(func=run_bench_tokenizer)


def run_bench_tokenizer(args: argparse.Namespace) -> int:
    from ..bench.tokenizer import run_tokenizer_bench  # noqa: PLC0415

    return run_tokenizer_bench(args.data, args.workers, args.vocab_size, args.memory_mb, args.repeat)


# ---------------------------------------------------------------- bench train


def _register_train(benches) -> None:
    from ..bench.train import BENCH_DEFAULT  # noqa: PLC0415

    d = BENCH_DEFAULT
    p = add_command(
        benches, "train", help="training-step throughput (tokens/s) and peak memory",
        description=f"Time full training steps (forward, backward, clip, AdamW) on random tokens. "
                    f"Default: {d['n_layer']} layers, {d['n_head']} heads, {d['d_model']} dims, context "
                    f"{d['context_length']}, batch 8, vocab {d['vocab_size']}, fp32 (the CPU figure in the "
                    f"README); --preset gpt2-124m --device cuda for the GPU one.")
    p.add_argument("--preset", metavar="NAME", type=argtypes.preset,
                   help="a GPTConfig preset; the sizes below override it")
    add_config_options(p, {name: f"{d[name]}, or the preset's" for name in MODEL_SIZES})
    add_config_options(p, {"batch_size": 8, "grad_accum": 1, "dropout": 0},
                       defaults={"batch_size": 8, "grad_accum": 1, "dropout": 0.0})
    add_device_option(p)
    add_precision_option(p)
    add_cuda_graph_option(p)
    add_config_options(p, {"steps": 10, "warmup": 2}, defaults={"steps": 10, "warmup": 2},
                       what={"steps": "timed steps", "warmup": "untimed steps first"})
    add_seed_option(p, 0, "seeds the weights and the random tokens (default: 0)")
    add_config_options(p, {"dp": None, "tp": None, "pp": None, "micro_batches": None},
                       defaults={"dp": 1, "tp": 1, "pp": 1},
                       what={"dp": "data-parallel replicas; --batch-size is then the global batch (run under "
                                   "minillm launch; default: 1)",
                             "tp": "tensor-parallel ranks splitting every block's heads and MLP (run under minillm "
                                   "launch; default: 1)",
                             "pp": "pipeline stages (run under minillm launch; default: 1)",
                             "micro_batches": "split --batch-size into M micro-batches (the pipeline's units; "
                                              "instead of --grad-accum)"})
    add_schedule_option(p, None, "pipeline schedule (default: 1f1b)")
    p.add_argument("--timeline", metavar="FILE",
                   help="with --pp: draw one step's schedule as run (forward, backward, send/recv, idle per stage) "
                        "into a PNG or SVG (needs matplotlib) and print the measured bubble")
    add_json_option(p)
    p.set_defaults(func=run_bench_train)


def run_bench_train(args: argparse.Namespace) -> int:
    from ..bench.train import BENCH_DEFAULT, measure_train_step  # noqa: PLC0415
    from ..models import GPTConfig  # noqa: PLC0415
    from ..train.run import check_model_shape  # noqa: PLC0415

    given = {name: getattr(args, name) for name in MODEL_SIZES if getattr(args, name) is not None}
    given["dropout"] = args.dropout
    if args.preset is None:
        check_model_shape({**BENCH_DEFAULT, **given})
        config = GPTConfig.from_dict({**BENCH_DEFAULT, **given})
    else:   # the given sizes replace the preset's before the config derives head_dim and n_kv_head from them
        check_model_shape({**GPTConfig.from_preset(args.preset).to_dict(), **given})
        config = GPTConfig.from_preset(args.preset, **given)
    check_precision(args.precision, args.device)
    from ..distributed.mesh import MeshShape  # noqa: PLC0415

    shape = MeshShape(pp=getattr(args, "pp", None) or 1, dp=args.dp, tp=args.tp)
    check_schedule(args)
    if args.micro_batches is not None:        # --batch-size B --micro-batches M: M micro-batches of B/M
        if args.grad_accum != 1 or args.batch_size % args.micro_batches:
            raise ValueError(f"--micro-batches {args.micro_batches} must divide --batch-size {args.batch_size} "
                             "(and replaces --grad-accum)")
        args.batch_size, args.grad_accum = args.batch_size // args.micro_batches, args.micro_batches
    if args.batch_size % shape.dp:
        raise ValueError(f"--batch-size {args.batch_size} (the global batch) must be a multiple of --dp {shape.dp}")
    if args.timeline and shape.pp == 1:
        raise ValueError("--timeline draws a pipeline schedule: give --pp 2 or more (under minillm launch)")
    if args.timeline:
        check_timeline_file(args.timeline)
    result = measure_train_step(config, args.batch_size, args.grad_accum, args.device, args.steps, args.warmup,
                                args.seed, args.precision, mesh_shape=shape, schedule=args.schedule or "1f1b",
                                timeline=bool(args.timeline), cuda_graph=bool(args.cuda_graph))
    if result.get("rank", 0) != 0:
        return 0                                  # one report, from rank 0
    if args.json:
        print(json.dumps(result))
        return 0
    c, B = config, args.batch_size
    print(f"train step: {c.n_layer} layers, {c.n_head} heads, d_model {c.d_model}, context {c.context_length}, "
          f"vocab {c.vocab_size}, batch {B} x {args.grad_accum}, {result['precision']}, {result['device']}, "
          f"{'CUDA graph, ' if result['cuda_graph'] else ''}"
          f"{result['parameters']:,} parameters"
          f"{', products on ' + result['cpu_blas'] if result['device'] == 'cpu' else ''}")
    print(f"  {result['tokens_per_s']:,.0f} tokens/s  ({result['ms_per_step_mean']:.1f} ms/step mean, "
          f"{result['ms_per_step_min']:.1f} min, over {args.steps} steps after {args.warmup} warmup)")
    print(f"  peak RSS {result['peak_rss_mib']:,.0f} MiB (process; {result['rss_before_model_mib']:,.0f} MiB "
          f"before the model was built)")
    if "gpu_peak_in_use_gib" in result:
        print(f"  peak GPU memory {result['gpu_peak_in_use_gib']:.2f} GiB in use by arrays, "
              f"{result['gpu_pool_peak_gib']:.2f} GiB held by CuPy's memory pool")
        peak = (f"MFU {100 * result['mfu']:.1f}% of the {result['precision']} dense peak "
                f"{result['peak_tflops']:.0f} TFLOP/s of the {result['gpu']}" if result["mfu"] is not None
                else f"no {result['precision']} peak known for the {result['gpu']}")
        print(f"  {result['model_tflops']:.1f} model TFLOP/s (6N + 12 L d T per token); {peak}")
    if "mesh" in result:
        m = result["mesh"]
        print(f"  mesh pp={m['pp']} x dp={m['dp']} x tp={m['tp']} ({len(result['ranks'])} ranks; tokens/s of the "
              f"whole job, batch {B} x {args.grad_accum} global)")
        for rank, r in enumerate(result["ranks"]):
            memory = (f", peak GPU memory {r['gpu_peak_in_use_gib']:.2f} GiB" if r["gpu_peak_in_use_gib"] is not None
                      else f", peak RSS {r['peak_rss_mib']:,.0f} MiB")
            print(f"  rank {rank}: {r['parameters']:,} parameters ({r['parameter_bytes'] / 2**20:,.1f} MiB){memory}")
    if args.timeline:
        from ..distributed.timeline import bubble_fraction, draw_timeline, ideal_bubble  # noqa: PLC0415

        by_stage = {}
        for entry in result["timeline"]:          # the first replica's row of each stage
            by_stage.setdefault(entry["stage"], entry["events"])
        stages = [by_stage[s] for s in sorted(by_stage)]
        measured = sum(bubble_fraction(e) for e in stages) / len(stages)
        written = draw_timeline(stages, args.timeline, f"{args.schedule or '1f1b'}, P={shape.pp}, M={args.grad_accum}")
        print(f"  bubble: measured idle share {measured:.3f} (mean over stages; {', '.join(f'{bubble_fraction(e):.3f}' for e in stages)}) "
              f"vs (P-1)/(M+P-1) = {ideal_bubble(shape.pp, args.grad_accum):.3f}; timeline in {written}")
    return 0


def check_timeline_file(path: str) -> None:
    """The file --timeline names can be drawn (PNG or SVG, matplotlib there) and written: checked before the
    measurement, by the rank that draws it (world rank 0; the others may run on hosts without the folder)."""
    from ..distributed.process_group import read_environment  # noqa: PLC0415
    from ..plot import FORMATS  # noqa: PLC0415

    if Path(path).suffix.lower() not in FORMATS:
        raise ValueError(f"--timeline {path}: the timeline is drawn as PNG or SVG, so the name must end in .png or .svg")
    if read_environment().rank != 0:
        return
    check_output_file(path, "--timeline", "timeline.png")
    if importlib.util.find_spec("matplotlib") is None:
        raise RuntimeError("--timeline needs matplotlib: pip install 'minillm[plot]' (or pip install matplotlib)")


# ---------------------------------------------------------------- bench generate


def _register_generate(benches) -> None:
    p = add_command(
        benches, "generate", help="generation tokens/s, with and without the KV cache",
        description="Generate from a randomly initialised GPT (greedy, so both ways produce the same "
                    "tokens) and report tokens/s with the KV cache, without it, and the speed-up.")
    p.add_argument("--preset", metavar="NAME", type=argtypes.preset, default="gpt2-124m",
                   help="a GPTConfig preset (default: gpt2-124m)")
    p.add_argument("--batch-size", metavar="N", type=argtypes.positive_int, default=1,
                   help="rows generated at once (default: 1)")
    p.add_argument("--new-tokens", metavar="N", type=argtypes.positive_int, default=256,
                   help="tokens generated per row (default: 256)")
    p.add_argument("--prompt-len", metavar="N", type=argtypes.positive_int, default=16,
                   help="prompt length in tokens (default: 16)")
    add_device_option(p)
    add_precision_option(p)
    which = p.add_mutually_exclusive_group()
    which.add_argument("--no-cache", action="store_true", help="measure only generation without the cache")
    which.add_argument("--cache-only", action="store_true", help="measure only generation with the cache")
    add_seed_option(p, 0, "seeds the weights and the prompt (default: 0)")
    add_json_option(p)
    p.set_defaults(func=run_bench_generate)


def run_bench_generate(args: argparse.Namespace) -> int:
    from ..bench.generate import measure_generation  # noqa: PLC0415
    from ..models import GPTConfig  # noqa: PLC0415

    config = GPTConfig.from_preset(args.preset)
    if args.prompt_len > config.context_length:
        raise ValueError(f"--prompt-len {args.prompt_len} is more than {args.preset}'s context length "
                         f"{config.context_length}")
    check_precision(args.precision, args.device)
    modes = (True,) if args.cache_only else (False,) if args.no_cache else (True, False)
    result = measure_generation(args.preset, args.batch_size, args.new_tokens, args.prompt_len, args.device, modes,
                                args.seed, args.precision, progress=True)   # a bar on a terminal's stderr
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{args.preset} ({result['parameters']:,} parameters, {result['precision']}) on {result['device']}: "
          f"batch {args.batch_size}, prompt {args.prompt_len}, {args.new_tokens} new tokens, greedy")
    for name, label in (("cache", "with KV cache"), ("no_cache", "without cache")):
        if f"{name}_seconds" in result:
            print(f"  {label:14s} {result[f'{name}_tokens_per_s']:10.1f} tokens/s "
                  f"({result[f'{name}_seconds']:.2f} s)")
    if "speedup" in result:
        print(f"  speed-up       {result['speedup']:10.1f}x   (same tokens: {result['same_tokens']})")
    return 0


# ---------------------------------------------------------------- bench ops


def _register_ops(benches) -> None:
    from ..bench import ops  # noqa: PLC0415

    p = add_command(benches, "ops", help="fused ops vs their compositions (time, peak memory)",
                    description=OPS_DESCRIPTION, formatter_class=_RawDescriptionFormatter)
    p.add_argument("--case", action="append", choices=list(ops.CASES), metavar="CASE",
                   help=f"one of {', '.join(ops.CASES)}; repeatable (default: all)")
    add_device_option(p)
    p.add_argument("--repeat", metavar="N", type=argtypes.positive_int, default=5,
                   help="timed runs per block; the best is reported (default: 5)")
    p.add_argument("--memory", action="store_true", help="also measure peak memory (fresh process per variant)")
    add_json_option(p, "also print the results as JSON")
    p.set_defaults(func=run_bench_ops)


OPS_DESCRIPTION = """\
Fused ops against their compositions, forward + backward, float32, GPT-2-124M sizes:

    layer_norm     x (8192, 768), weight and bias (768,)
    cross_entropy  logits (8192, 50257), int targets (8192,)   (~6.6 GB of RAM for the composed run)
    gelu           x (8192, 3072), approximate="tanh"
    attention      q, k, v (8, 12, 256, 64), causal

Each variant runs in blocks of one warm-up and --repeat timed runs, two blocks each, fused and
composed taking turns (so both see the same drift in machine load); the figures are the best
wall-clock time of each. With --memory, the peak memory of one forward + backward is measured for
each variant in a fresh process: on the CPU with tracemalloc, on a GPU as the growth of CuPy's
memory pool; both net of the inputs.

    minillm bench ops                              # CPU: all four cases
    minillm bench ops --case attention --repeat 10
    minillm bench ops --device cuda --memory
"""


class _RawDescriptionFormatter(argparse.RawDescriptionHelpFormatter, HelpFormatter):
    """Keeps the line breaks of a long description (the case table of ``bench ops``)."""


def run_bench_ops(args: argparse.Namespace) -> int:
    from .. import backend  # noqa: PLC0415
    from ..bench.ops import CASES, peak_memory, time_case  # noqa: PLC0415

    device = backend.parse_device(args.device)
    backend.tune_cpu_allocator()
    results = []
    print(f"fused vs composed, forward + backward, float32, best of {args.repeat}, on {device}")
    for name in args.case or list(CASES):
        result = time_case(name, device, args.repeat)
        line = (f"  {name:<14} fused {result['fused_ms']:8.1f} ms   composed {result['composed_ms']:8.1f} ms"
                f"   speed-up {result['speedup']:.2f}x")
        if args.memory:
            result["fused_peak_mib"] = peak_memory(name, "fused", device) / 2**20
            result["composed_peak_mib"] = peak_memory(name, "composed", device) / 2**20
            line += f"   peak {result['fused_peak_mib']:.0f} vs {result['composed_peak_mib']:.0f} MiB"
        print(line, flush=True)
        results.append(result)
    if args.json:
        print(json.dumps(results))
    return 0
