"""``minillm generate``: continue a prompt with a trained run or a GPT-2 checkpoint.

    minillm generate --run runs/mine --prompt "The "             # a run trained by `minillm train`
    minillm generate --hf-gpt2 gpt2/ --prompt "Hello, I'm a language model,"
    minillm generate --hf-gpt2 gpt2/ --tokenizer gpt2:../shared/data/gpt2 --temperature 0 --prompt "..."
    minillm generate --hf Qwen3-0.6B/ --prompt "The capital of France is"   # gpt2, llama or qwen3

It prints the prompt and then each token as soon as it is sampled. Tokens are
byte strings, and a UTF-8 character can span two tokens, so the bytes go
through an incremental UTF-8 decoder that holds back an unfinished character
until its last byte arrives.
"""

from __future__ import annotations

import argparse
import codecs
import sys
import time

import numpy as np

from .. import backend
from ..data.dataset import END_OF_TEXT
from . import argtypes
from .common import add_command, add_device_option, add_precision_option, add_seed_option, check_model_directory


def register(subparsers) -> argparse.ArgumentParser:
    p = add_command(
        subparsers, "generate", help="sample text from a trained run or a Hugging Face checkpoint",
        description="Continue a prompt, printing tokens as they are produced. The model comes from a "
                    "'minillm train' run directory (--run) or a Hugging Face directory (config.json + "
                    "model.safetensors): --hf for gpt2, llama or qwen3, --hf-gpt2 for GPT-2 only.")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", metavar="RUN_DIR", help="a run directory written by 'minillm train'")
    source.add_argument("--hf", metavar="DIR",
                        help="a Hugging Face model directory, model_type gpt2, llama or qwen3 (config.json + "
                             "model.safetensors or a sharded index; its tokenizer.json is used)")
    source.add_argument("--hf-gpt2", metavar="DIR", help="a Hugging Face GPT-2 directory (--hf accepting only gpt2)")
    p.add_argument("--tokenizer", metavar="SPEC",
                   help="for --hf/--hf-gpt2: gpt2:DIR (encoder.json + vocab.bpe) or a tokenizer file "
                        "(default: the tokenizer files in the model's directory)")
    p.add_argument("--prompt", metavar="TEXT",
                   help=f"the text to continue (default: start from {END_OF_TEXT}, if the tokenizer has it)")
    p.add_argument("--instruction", metavar="TEXT",
                   help="for an instruction-tuned run (minillm finetune sft): wrap TEXT in the Alpaca prompt "
                        "and print only the response")
    p.add_argument("--input", metavar="TEXT", help="the optional input that goes with --instruction")
    p.add_argument("--max-new-tokens", metavar="N", type=argtypes.non_negative_int, default=100,
                   help="tokens to generate; past the context length the model sees a sliding window of the latest "
                        "tokens (default: 100)")
    p.add_argument("--temperature", metavar="X", type=argtypes.non_negative_float, default=1.0,
                   help="0 = greedy (default: 1.0)")
    p.add_argument("--top-k", metavar="K", type=argtypes.non_negative_int, default=50,
                   help="sample among the K most likely, 0 = off (default: 50)")
    p.add_argument("--top-p", metavar="P", type=argtypes.top_p, default=None,
                   help="nucleus sampling mass in (0, 1] (default: off)")
    add_seed_option(p, None, "makes sampling reproducible, on any device (default: a fresh random seed)")
    add_device_option(p)
    add_precision_option(p)
    p.add_argument("--ignore-eos", action="store_true", help=f"do not stop at {END_OF_TEXT}")
    p.add_argument("--no-cache", action="store_true", help="rerun the whole sequence every step (slow reference)")
    p.set_defaults(func=run_generate)
    return p


def load_model(args: argparse.Namespace, device: str):
    """(model, tokenizer) from --run, --hf or --hf-gpt2."""
    option, path = next((o, p) for o, p in (("--run", args.run), ("--hf", args.hf), ("--hf-gpt2", args.hf_gpt2))
                        if p is not None)
    check_model_directory(path, option, "--run")
    if args.run is not None:
        from ..finetune import load_language_model  # noqa: PLC0415 (a train run, or an SFT/DPO run)

        if args.tokenizer is not None:
            raise ValueError("--tokenizer is for --hf/--hf-gpt2; a run directory brings its own tokenizer")
        return load_language_model(args.run, device)
    from ..weights.pretrained import load_pretrained  # noqa: PLC0415

    if args.hf is not None:
        return load_pretrained(args.hf, args.tokenizer, device, model_types=None)
    return load_pretrained(args.hf_gpt2, args.tokenizer, device)


def run_generate(args: argparse.Namespace, out=None) -> int:
    from ..generate import generate  # noqa: PLC0415

    from ..precision import check_precision, use_precision  # noqa: PLC0415

    out = out or sys.stdout
    device = backend.parse_device(args.device)
    check_precision(args.precision, device)
    model, tokenizer = load_model(args, device)

    eos_id = tokenizer.special_tokens.get(END_OF_TEXT)
    if args.hf is not None:                  # a Hugging Face model stops at its own end token
        from ..weights.pretrained import config_eos_id  # noqa: PLC0415

        eos_id = config_eos_id(args.hf) if config_eos_id(args.hf) is not None else eos_id
    shown = args.prompt or ""
    if args.instruction is not None:
        from ..finetune.sft import format_prompt  # noqa: PLC0415

        if args.prompt is not None:
            raise ValueError("--instruction and --prompt exclude each other")
        ids = tokenizer.encode(format_prompt(args.instruction, args.input or ""), allowed_special="none")
        shown = ""                           # the response alone
    elif args.input is not None:
        raise ValueError("--input goes with --instruction")
    elif args.prompt:
        ids = tokenizer.encode(args.prompt, allowed_special="all")
    elif eos_id is not None:
        ids = [eos_id]                       # GPT-2's convention for an unconditional sample
    else:
        raise ValueError(f"give a --prompt (this tokenizer has no {END_OF_TEXT} to start from)")
    context = model.config.context_length
    if len(ids) > context:
        raise ValueError(f"the prompt is {len(ids)} tokens, more than the model's context of {context}: "
                         f"shorten it")
    max_new = args.max_new_tokens                # past the context, the window slides (minillm.generate)

    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    out.write(shown)
    out.flush()

    def show(column: np.ndarray) -> None:
        token = int(column[0])
        if token != eos_id:
            out.write(decoder.decode(tokenizer.token_bytes(token)))
            out.flush()

    start = time.perf_counter()
    with use_precision(args.precision):
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
