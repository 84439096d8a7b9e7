"""``minillm generate`` and ``minillm bench generate``.

    minillm generate --run runs/mine --prompt "The "             # a run trained by `minillm train`
    minillm generate --hf-gpt2 gpt2/ --prompt "Hello, I'm a language model,"
    minillm generate --hf-gpt2 gpt2/ --tokenizer gpt2:../shared/data/gpt2 --temperature 0 --prompt "..."
    minillm bench generate                                         # gpt2-124m, batch 1, 256 tokens, CPU
    minillm bench generate --preset gpt2-medium --batch-size 8 --device cuda --cache-only

``generate`` prints the prompt and then each token as soon as it is sampled.
Tokens are byte strings, and a UTF-8 character can span two tokens, so the
bytes go through an incremental UTF-8 decoder that holds back an unfinished
character until its last byte arrives.
"""

from __future__ import annotations

import argparse
import codecs
import json
import sys
import time
from pathlib import Path

import numpy as np

from . import argtypes, backend
from .data.dataset import END_OF_TEXT


# ================================================================ loading models


def load_run(run_dir, device: str = "cpu"):
    """(model, tokenizer) from the latest checkpoint of a ``minillm train`` run directory."""
    from .models import GPT, GPTConfig  # noqa: PLC0415
    from .tokenizer import load_tokenizer  # noqa: PLC0415
    from .train.checkpoint import load_checkpoint, restore_checkpoint  # noqa: PLC0415

    run_dir = Path(run_dir)
    checkpoint = load_checkpoint(run_dir)
    model = GPT(GPTConfig.from_dict(checkpoint.metadata["model_config"]))
    restore_checkpoint(checkpoint, model, restore_rng=False)
    tokenizer_info = checkpoint.metadata.get("tokenizer") or {}
    if "file" not in tokenizer_info:
        raise ValueError(f"{run_dir}: the checkpoint does not name its tokenizer file")
    tokenizer = load_tokenizer(run_dir / tokenizer_info["file"])
    return model.to(device).eval(), tokenizer


def gpt2_tokenizer_spec(directory) -> str:
    """``gpt2:DIR`` when DIR holds GPT-2's tokenizer files (encoder.json + vocab.bpe), else a clear error."""
    directory = Path(directory)
    if (directory / "encoder.json").is_file() and (directory / "vocab.bpe").is_file():
        return f"gpt2:{directory}"
    raise FileNotFoundError(
        f"{directory} has no GPT-2 tokenizer files (encoder.json and vocab.bpe); "
        f"pass --tokenizer gpt2:DIR (a folder with them) or a tokenizer file"
    )


def load_hf(directory, tokenizer_spec: str | None = None, device: str = "cpu"):
    """(model, tokenizer) from a Hugging Face GPT-2 directory; the tokenizer from it or from ``tokenizer_spec``.

    A Hugging Face directory names GPT-2's two tokenizer files vocab.json and
    merges.txt; they are the same files as encoder.json and vocab.bpe.
    """
    from .tokenizer import BPETokenizer, load_tokenizer  # noqa: PLC0415
    from .weights import load_hf_gpt2  # noqa: PLC0415

    directory = Path(directory)
    if tokenizer_spec is not None:
        tokenizer = load_tokenizer(tokenizer_spec)
    elif (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file():
        tokenizer = BPETokenizer.from_gpt2_files(directory / "vocab.json", directory / "merges.txt")
    else:
        tokenizer = load_tokenizer(gpt2_tokenizer_spec(directory))
    model = load_hf_gpt2(directory, device=device)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                         f"{model.config.vocab_size}: they do not belong together")
    return model, tokenizer


# ================================================================ minillm generate


def add_generate_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``generate`` on the ``minillm`` command."""
    p = subparsers.add_parser(
        "generate", help="sample text from a trained run or a GPT-2 checkpoint",
        description="Continue a prompt, printing tokens as they are produced. The model comes from a "
                    "`minillm train` run directory (--run) or a Hugging Face GPT-2 directory (--hf-gpt2: "
                    "config.json + model.safetensors).")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", metavar="RUN_DIR", help="a run directory written by `minillm train`")
    source.add_argument("--hf-gpt2", metavar="DIR", help="a Hugging Face GPT-2 directory")
    p.add_argument("--tokenizer", metavar="SPEC",
                   help="for --hf-gpt2: gpt2:DIR (encoder.json + vocab.bpe) or a tokenizer file; default: "
                        "the tokenizer files in the model's directory")
    p.add_argument("--prompt", help=f"the text to continue (default: start from {END_OF_TEXT}, if the "
                                    f"tokenizer has it)")
    p.add_argument("--max-new-tokens", type=argtypes.non_negative_int, default=100,
                   help="tokens to generate (default 100; fewer if the context is shorter)")
    p.add_argument("--temperature", type=argtypes.non_negative_float, default=1.0, help="0 = greedy (default 1.0)")
    p.add_argument("--top-k", type=argtypes.non_negative_int, default=50, help="sample among the k most likely (0 = off; default 50)")
    p.add_argument("--top-p", type=argtypes.top_p, default=None, help="nucleus sampling mass in (0, 1] (default off)")
    p.add_argument("--seed", type=int, default=None, help="makes sampling reproducible, on any device")
    p.add_argument("--device", type=argtypes.device, default="cpu")
    p.add_argument("--ignore-eos", action="store_true", help=f"do not stop at {END_OF_TEXT}")
    p.add_argument("--no-cache", action="store_true", help="rerun the whole sequence every step (slow reference)")
    p.set_defaults(func=run_generate)
    return p


def run_generate(args: argparse.Namespace, out=None) -> int:
    from .generate import generate  # noqa: PLC0415

    out = out or sys.stdout
    device = backend.parse_device(args.device)
    if args.run is not None:
        if args.tokenizer is not None:
            raise ValueError("--tokenizer is for --hf-gpt2; a run directory brings its own tokenizer")
        model, tokenizer = load_run(args.run, device)
    else:
        model, tokenizer = load_hf(args.hf_gpt2, args.tokenizer, device)

    eos_id = tokenizer.special_tokens.get(END_OF_TEXT)
    if args.prompt:
        ids = tokenizer.encode(args.prompt, allowed_special="all")
    elif eos_id is not None:
        ids = [eos_id]                       # GPT-2's convention for an unconditional sample
    else:
        raise ValueError(f"give a --prompt (this tokenizer has no {END_OF_TEXT} to start from)")
    context = model.config.context_length
    if len(ids) >= context:
        raise ValueError(f"the prompt is {len(ids)} tokens; the model's context is {context}")
    max_new = min(args.max_new_tokens, context - len(ids))
    if max_new < args.max_new_tokens:
        print(f"(generating {max_new} tokens: the context holds {context})", file=sys.stderr)

    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    out.write(args.prompt or "")
    out.flush()

    def show(column: np.ndarray) -> None:
        token = int(column[0])
        if token != eos_id:
            out.write(decoder.decode(tokenizer.token_bytes(token)))
            out.flush()

    start = time.perf_counter()
    result = generate(model, np.asarray([ids]), max_new, temperature=args.temperature,
                      top_k=args.top_k or None, top_p=args.top_p,
                      eos_id=None if args.ignore_eos else eos_id, seed=args.seed,
                      use_cache=not args.no_cache, stream=show)
    seconds = time.perf_counter() - start
    out.write(decoder.decode(b"", final=True) + "\n")
    out.flush()
    produced = result.shape[1] - len(ids)
    print(f"[{produced} tokens in {seconds:.2f} s, {produced / max(seconds, 1e-9):.1f} tokens/s on {device}]",
          file=sys.stderr)
    return 0


# ================================================================ minillm bench generate


def add_bench_generate_parser(bench_subparsers) -> argparse.ArgumentParser:
    """Register ``bench generate`` (tokens/s with and without the KV cache) on ``minillm bench``."""
    p = bench_subparsers.add_parser(
        "generate", help="generation tokens/s, with and without the KV cache",
        description="Generate from a randomly initialised GPT (greedy, so both ways produce the same "
                    "tokens) and report tokens/s with the KV cache, without it, and the speed-up.")
    p.add_argument("--preset", type=argtypes.preset, default="gpt2-124m", help="a GPTConfig preset (default gpt2-124m)")
    p.add_argument("--batch-size", type=argtypes.positive_int, default=1)
    p.add_argument("--new-tokens", type=argtypes.positive_int, default=256, help="tokens generated per row (default 256)")
    p.add_argument("--prompt-len", type=argtypes.positive_int, default=16, help="prompt length (default 16)")
    p.add_argument("--device", type=argtypes.device, default="cpu")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--no-cache", action="store_true", help="measure only generation without the cache")
    which.add_argument("--cache-only", action="store_true", help="measure only generation with the cache")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(func=run_bench_generate)
    return p


def run_bench_generate(args: argparse.Namespace) -> int:
    from . import manual_seed  # noqa: PLC0415
    from .generate import generate  # noqa: PLC0415
    from .models import GPT, GPTConfig  # noqa: PLC0415

    device = backend.parse_device(args.device)
    config = GPTConfig.from_preset(args.preset)
    total = args.prompt_len + args.new_tokens
    if total > config.context_length:
        raise ValueError(f"--prompt-len {args.prompt_len} + --new-tokens {args.new_tokens} = {total} exceeds "
                         f"{args.preset}'s context_length={config.context_length}")
    manual_seed(args.seed)
    model = GPT(config, device=device).eval()
    prompt = np.random.default_rng(args.seed).integers(0, config.vocab_size, (args.batch_size, args.prompt_len))
    modes = [True] if args.cache_only else [False] if args.no_cache else [True, False]

    result = {"preset": args.preset, "parameters": model.num_parameters(), "device": device,
              "dtype": str(model.wte.weight.dtype), "batch_size": args.batch_size,
              "prompt_len": args.prompt_len, "new_tokens": args.new_tokens}
    outputs = {}
    generate(model, prompt, 2, temperature=0)             # warm-up: BLAS threads, GPU kernels, the pool
    for use_cache in modes:
        name = "cache" if use_cache else "no_cache"
        backend.synchronize(device)
        start = time.perf_counter()
        outputs[name] = generate(model, prompt, args.new_tokens, temperature=0, use_cache=use_cache)
        backend.synchronize(device)
        seconds = time.perf_counter() - start
        result[f"{name}_seconds"] = seconds
        result[f"{name}_tokens_per_s"] = args.batch_size * args.new_tokens / seconds
    if len(outputs) == 2:
        result["speedup"] = result["cache_tokens_per_s"] / result["no_cache_tokens_per_s"]
        result["same_tokens"] = bool(np.array_equal(outputs["cache"], outputs["no_cache"]))

    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{args.preset} ({result['parameters']:,} parameters, {result['dtype']}) on {device}: "
          f"batch {args.batch_size}, prompt {args.prompt_len}, {args.new_tokens} new tokens, greedy")
    for name, label in (("cache", "with KV cache"), ("no_cache", "without cache")):
        if f"{name}_seconds" in result:
            print(f"  {label:14s} {result[f'{name}_tokens_per_s']:10.1f} tokens/s "
                  f"({result[f'{name}_seconds']:.2f} s)")
    if "speedup" in result:
        print(f"  speed-up       {result['speedup']:10.1f}x   (same tokens: {result['same_tokens']})")
    return 0
