"""``minillm tokenizer train|encode|decode``.

    minillm tokenizer train --input a.txt b.txt --vocab-size 4096 --out tok.json
    echo "Hello world" | minillm tokenizer encode --tokenizer gpt2:../shared/data/gpt2
    echo "15496 995" | minillm tokenizer decode --tokenizer gpt2:../shared/data/gpt2
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from . import argtypes
from .common import add_command, check_input_files, check_output_file, read_text, say, warn
from ..checks import is_integer

SPEC_HELP = "bytes, gpt2:DIR (encoder.json + vocab.bpe) or a saved tokenizer file"


def register(subparsers) -> argparse.ArgumentParser:
    parser = add_command(subparsers, "tokenizer", help="train a BPE tokenizer, encode or decode text")
    actions = parser.add_subparsers(dest="tokenizer_command", metavar="{train,encode,decode}")
    actions.required = True

    train = add_command(actions, "train", help="learn a byte-level BPE tokenizer from text files")
    train.add_argument("--input", nargs="+", required=True, metavar="FILE", help="UTF-8 text files (streamed)")
    train.add_argument("--vocab-size", metavar="N", type=argtypes.positive_int, required=True,
                       help="total tokens, special tokens included (at least 256 + the special tokens)")
    train.add_argument("--out", metavar="FILE", required=True, help="where to write the tokenizer (JSON)")
    train.add_argument("--pattern", metavar="PATTERN", default="gpt2",
                       help="gpt2, gpt4 or a regular expression (default: gpt2)")
    train.add_argument("--special-token", action="append", default=[], metavar="TOKEN",
                       help="add a special token, e.g. '<|endoftext|>' (repeatable)")
    train.add_argument("--quiet", action="store_true", help="no progress bars")
    train.set_defaults(func=run_train)

    encode = add_command(actions, "encode", help="text (stdin or file) -> token ids")
    encode.add_argument("--tokenizer", metavar="SPEC", required=True, help=SPEC_HELP)
    encode.add_argument("input", metavar="FILE", nargs="?", help="text file (default: stdin)")
    encode.add_argument("--allowed-special", metavar="WHICH", default="none_raise",
                        help="none_raise (refuse special tokens in the text), none (encode them as plain text), "
                             "all, or comma-separated special tokens (default: none_raise)")
    encode.add_argument("--json", action="store_true", help="print a JSON list instead of space-separated ids")
    encode.set_defaults(func=run_encode)

    decode = add_command(actions, "decode", help="token ids (stdin or file; spaces, lines or JSON) -> text")
    decode.add_argument("--tokenizer", metavar="SPEC", required=True, help=SPEC_HELP)
    decode.add_argument("input", metavar="FILE", nargs="?", help="file of ids (default: stdin)")
    decode.set_defaults(func=run_decode)
    return parser


def run_train(args: argparse.Namespace) -> int:
    from ..tokenizer import BPETokenizer, iter_text_files  # noqa: PLC0415

    files = check_input_files(args.input, "--input")
    check_output_file(args.out, "--out", "tokenizer.json")
    if all(f.stat().st_size == 0 for f in files):
        raise ValueError(f"nothing to learn from: {', '.join(map(str, files))} "
                         f"{'is' if len(files) == 1 else 'are'} empty")
    start = time.perf_counter()
    tok = BPETokenizer.train(
        iter_text_files(files), args.vocab_size, pattern=args.pattern,
        special_tokens=args.special_token, progress=not args.quiet,
    )
    tok.save(args.out)
    say(f"trained {tok!r} in {time.perf_counter() - start:.1f} s -> {args.out}")
    if tok.vocab_size < args.vocab_size:
        warn(f"the text has too few distinct pairs to merge: the vocabulary stopped at {tok.vocab_size} tokens "
             f"({len(tok.merges)} merges), not the {args.vocab_size} asked for; more text would reach it")
    return 0


def run_encode(args: argparse.Namespace) -> int:
    from ..tokenizer import DisallowedSpecialToken, load_tokenizer  # noqa: PLC0415

    tok = load_tokenizer(args.tokenizer)
    allowed = args.allowed_special
    if allowed not in ("none_raise", "none", "all"):
        allowed = {s for s in allowed.split(",") if s}
    text = read_text(args.input)
    try:
        ids = tok.encode(text, allowed_special=allowed)
    except DisallowedSpecialToken as error:
        raise ValueError(
            f"the text contains the special token {error.token!r} (at character {error.position}): pass "
            f"--allowed-special all (or --allowed-special '{error.token}') to encode it as that token, or "
            f"--allowed-special none to encode it as plain text") from None
    print(json.dumps(ids) if args.json else " ".join(map(str, ids)))
    return 0


def parse_ids(text: str) -> list[int]:
    """Token ids written as integers separated by spaces or lines, or as a JSON list; ValueError in the
    user's words otherwise."""
    text = text.strip()
    if text.startswith("["):
        try:
            ids = json.loads(text)
        except ValueError:
            raise ValueError(f"the input starts like a JSON list but is not one: {text[:40]!r}") from None
    else:
        ids = text.split()
    parsed = []
    for item in ids:
        if is_integer(item):
            parsed.append(item)
        elif isinstance(item, str) and item.lstrip("-").isdigit():
            parsed.append(int(item))
        else:
            raise ValueError(f"expected token ids (integers, separated by spaces, or a JSON list), got {item!r}")
    return parsed


def run_decode(args: argparse.Namespace) -> int:
    from ..tokenizer import load_tokenizer  # noqa: PLC0415

    tokenizer = load_tokenizer(args.tokenizer)
    ids = parse_ids(read_text(args.input))
    sys.stdout.write(tokenizer.decode(ids))
    sys.stdout.flush()
    return 0
