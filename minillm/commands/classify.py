"""``minillm classify``: label texts with a run of ``minillm finetune classify``.

    minillm classify --run runs/spam messages.txt          # one text per line -> one label per line
    echo "WINNER!! Claim your prize now" | minillm classify --run runs/spam -

Texts longer than the model's context keep their first context-length tokens
(a note on stderr says how many were cut). An empty line gets a label too, so
output line i always answers input line i.
"""

from __future__ import annotations

import argparse
import sys

from .. import backend
from . import argtypes
from .common import add_command, add_device_option, read_text, say


def register(subparsers) -> argparse.ArgumentParser:
    p = add_command(subparsers, "classify", help="label texts (one per line) with a fine-tuned classifier run",
                    description="Print one predicted label per input line, using a run written by "
                                "'minillm finetune classify'.")
    p.add_argument("--run", metavar="RUN_DIR", required=True, help="a run written by 'minillm finetune classify'")
    p.add_argument("input", metavar="FILE", nargs="?", default="-",
                   help="UTF-8 text, one text per line; - or nothing reads standard input")
    p.add_argument("--batch-size", metavar="N", type=argtypes.positive_int, default=32,
                   help="texts per forward pass (default: 32)")
    add_device_option(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run_classify)
    return p


def run_classify(args: argparse.Namespace, out=None) -> int:
    from ..finetune import collate_classification  # noqa: PLC0415
    from ..finetune.classify import encode_texts, predict  # noqa: PLC0415
    from ..finetune.run import load_finetuned  # noqa: PLC0415

    out = out or sys.stdout
    device = backend.parse_device(args.device)
    model, tokenizer, info = load_finetuned(args.run, device)
    if info["finetune"]["task"] != "classify":
        raise ValueError(f"{args.run} is a {info['finetune']['task']} run; 'minillm classify' needs a "
                         f"'minillm finetune classify' run")
    labels = info["labels"]
    lines = read_text(args.input).splitlines()
    context = model.config.context_length
    encoded = encode_texts(tokenizer, lines, context, truncate=True)
    cut = sum(len(tokenizer.encode(line, allowed_special="none")) > context for line in lines)
    if cut:
        say(f"note: {cut} text(s) longer than the context of {context} tokens were cut to their first {context}")
    pad = tokenizer.special_tokens.get("<|endoftext|>", 0)
    length = info.get("padded_length")       # a run that reads the padded end: pad as in training
    batches = (collate_classification([(ids, 0) for ids in encoded[i:i + args.batch_size]], pad, length)
               for i in range(0, len(encoded), args.batch_size))
    if encoded:
        from tqdm import tqdm  # noqa: PLC0415

        batches = tqdm(batches, total=-(-len(encoded) // args.batch_size), desc="classify", unit="batch",
                       disable=args.quiet, dynamic_ncols=True)
        predicted, _ = predict(model, batches)
        for index in predicted:
            out.write(labels[int(index)] + "\n")
    out.flush()
    return 0
