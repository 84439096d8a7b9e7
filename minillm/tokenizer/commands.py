"""``minillm tokenizer train|encode|decode`` and ``minillm bench tokenizer``.

``minillm/cli.py`` calls :func:`add_tokenizer_parser` with its subparsers
object and :func:`add_tokenizer_bench_arguments` on the ``bench tokenizer``
parser; handlers are set with ``set_defaults(func=...)`` and run as
``args.func(args)``.

    minillm tokenizer train --input a.txt b.txt --vocab-size 4096 --out tok.json
    echo "Hello world" | minillm tokenizer encode --tokenizer gpt2:../shared/data/gpt2
    echo "15496 995" | minillm tokenizer decode --tokenizer gpt2:../shared/data/gpt2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import BPETokenizer, iter_text_files, load_tokenizer

# ---------------------------------------------------------------- tokenizer


def add_tokenizer_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``tokenizer {train,encode,decode}`` on an argparse subparsers object."""
    parser = subparsers.add_parser("tokenizer", help="train a BPE tokenizer, encode or decode text")
    actions = parser.add_subparsers(dest="tokenizer_command", metavar="{train,encode,decode}")
    actions.required = True

    train = actions.add_parser("train", help="learn a byte-level BPE tokenizer from text files")
    train.add_argument("--input", nargs="+", required=True, metavar="FILE", help="UTF-8 text files (streamed)")
    train.add_argument("--vocab-size", type=int, required=True, help="total tokens, special tokens included")
    train.add_argument("--out", required=True, help="where to write the tokenizer (JSON)")
    train.add_argument("--pattern", default="gpt2", help="'gpt2', 'gpt4' or a regex (default gpt2)")
    train.add_argument("--special-token", action="append", default=[], metavar="TOKEN",
                       help="add a special token, e.g. '<|endoftext|>' (repeatable)")
    train.add_argument("--quiet", action="store_true", help="no progress bars")
    train.set_defaults(func=run_train)

    spec_help = "'bytes', 'gpt2:DIR' (encoder.json + vocab.bpe) or a saved tokenizer file"
    encode = actions.add_parser("encode", help="text (stdin or file) -> token ids")
    encode.add_argument("--tokenizer", required=True, help=spec_help)
    encode.add_argument("input", nargs="?", help="text file (default: stdin)")
    encode.add_argument("--allowed-special", default="none_raise",
                        help="'none_raise' (default), 'none', 'all' or comma-separated special tokens")
    encode.add_argument("--json", action="store_true", help="print a JSON list instead of space-separated ids")
    encode.set_defaults(func=run_encode)

    decode = actions.add_parser("decode", help="token ids (stdin or file; spaces, lines or JSON) -> text")
    decode.add_argument("--tokenizer", required=True, help=spec_help)
    decode.add_argument("input", nargs="?", help="file of ids (default: stdin)")
    decode.set_defaults(func=run_decode)
    return parser


def run_train(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    tok = BPETokenizer.train(
        iter_text_files(args.input), args.vocab_size, pattern=args.pattern,
        special_tokens=args.special_token, progress=not args.quiet,
    )
    tok.save(args.out)
    print(f"trained {tok!r} in {time.perf_counter() - start:.1f} s -> {args.out}", file=sys.stderr)
    return 0


def _read_input(path: str | None) -> str:
    if path is None:
        return sys.stdin.read()
    with open(path, encoding="utf-8", newline="") as f:
        return f.read()


def run_encode(args: argparse.Namespace) -> int:
    tok = load_tokenizer(args.tokenizer)
    allowed = args.allowed_special
    if allowed not in ("none_raise", "none", "all"):
        allowed = {s for s in allowed.split(",") if s}
    ids = tok.encode(_read_input(args.input), allowed_special=allowed)
    print(json.dumps(ids) if args.json else " ".join(map(str, ids)))
    return 0


def run_decode(args: argparse.Namespace) -> int:
    text = _read_input(args.input).strip()
    ids = json.loads(text) if text.startswith("[") else [int(x) for x in text.split()]
    sys.stdout.write(load_tokenizer(args.tokenizer).decode(ids))
    sys.stdout.flush()
    return 0


# ---------------------------------------------------------------- benchmark


def default_data_dir() -> Path:
    """../shared/data next to the project (or the current directory)."""
    for base in (Path.cwd(), Path(__file__).resolve().parents[2]):
        candidate = (base / ".." / "shared" / "data").resolve()
        if candidate.is_dir():
            return candidate
    return (Path.cwd() / ".." / "shared" / "data").resolve()


def add_tokenizer_bench_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--data", type=Path, default=None, help="folder with tinyshakespeare.txt and gpt2/")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes for encode_batch")
    parser.add_argument("--vocab-size", type=int, default=4096, help="vocab for the training benchmark")
    parser.add_argument("--memory-mb", type=int, default=100,
                        help="size of the generated corpus for the peak-memory run (0: skip)")
    parser.add_argument("--repeat", type=int, default=3, help="timed repetitions (best is reported)")
    parser.set_defaults(func=run_tokenizer_bench)
    return parser


def _best_time(fn, repeat: int) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def run_tokenizer_bench(args: argparse.Namespace) -> int:
    data = args.data or default_data_dir()
    text_path, gpt2_dir = data / "tinyshakespeare.txt", data / "gpt2"
    if not text_path.is_file() or not gpt2_dir.is_dir():
        print(f"tokenizer bench needs {text_path} and {gpt2_dir}/ (see ../shared/data/README.md)", file=sys.stderr)
        return 1
    text = text_path.read_text(encoding="utf-8")
    megabytes = len(text.encode("utf-8")) / 1e6
    print(f"tinyshakespeare: {megabytes:.2f} MB, {os.cpu_count()} CPUs, Python {sys.version.split()[0]}")

    # encode, GPT-2's vocabulary. "first call": a fresh tokenizer (empty chunk
    # cache), timed from the call, not the loading; "again": the same text again
    print(f"load average {os.getloadavg()[0]:.1f} (other busy processes slow every figure below)")
    spec = f"gpt2:{gpt2_dir}"
    load_seconds, _ = _best_time(lambda: load_tokenizer(spec), 1)

    def first_call(encode):
        best, result = float("inf"), None
        for _ in range(args.repeat):
            tok = load_tokenizer(spec)
            start = time.perf_counter()
            result = encode(tok)
            best = min(best, time.perf_counter() - start)
        return best, result, tok

    cold, ids, gpt2 = first_call(lambda tok: tok.encode(text))
    warm, _ = _best_time(lambda: gpt2.encode(text), args.repeat)
    print(f"encode (gpt2, 1 process): first call {megabytes / cold:5.2f} MB/s, "
          f"again {megabytes / warm:5.2f} MB/s  ({len(ids):,} tokens; target >= 6 MB/s; "
          f"loading the tokenizer: {load_seconds:.2f} s)")
    batch_cold, batch_ids, gpt2 = first_call(lambda tok: tok.encode_batch([text], num_workers=args.workers))
    batch_warm, _ = _best_time(lambda: gpt2.encode_batch([text], num_workers=args.workers), args.repeat)
    print(f"encode_batch ({args.workers} processes): first call {megabytes / batch_cold:5.2f} MB/s, "
          f"again {megabytes / batch_warm:5.2f} MB/s  (ids identical to encode: {batch_ids == [ids]})")

    # a bigger batch: 8 documents of ~1 MB of generated text (distinct chunks, like new
    # text), each run on a fresh tokenizer: the processes now have enough work to pay off
    with tempfile.TemporaryDirectory() as tmp:
        docs = []
        for seed in range(8):
            path = Path(tmp) / f"doc{seed}.txt"
            generate_corpus(path, 1, text, seed=seed)
            docs.append(path.read_text(encoding="utf-8"))
    docs_mb = sum(len(d.encode("utf-8")) for d in docs) / 1e6
    serial, serial_ids, _ = first_call(lambda tok: [tok.encode(d) for d in docs])
    parallel, parallel_ids, _ = first_call(lambda tok: tok.encode_batch(docs, num_workers=args.workers))
    print(f"8 documents, {docs_mb:.1f} MB, first call: encode one by one {docs_mb / serial:5.2f} MB/s, "
          f"encode_batch ({args.workers} processes) {docs_mb / parallel:5.2f} MB/s  "
          f"(ids identical: {serial_ids == parallel_ids})")

    # train
    seconds, tok = _best_time(
        lambda: BPETokenizer.train(text, args.vocab_size, pattern="gpt2", progress=False), args.repeat)
    n_tokens = len(tok.encode(text))
    print(f"train vocab {args.vocab_size} (gpt2 pattern): {seconds:.2f} s (target <= 3 s), "
          f"{len(text.encode('utf-8')) / n_tokens:.3f} bytes/token (HF: ~3.24)")

    if args.memory_mb > 0:
        _bench_memory(args.memory_mb, data, args.vocab_size)
    return 0


def generate_corpus(path: Path, megabytes: int, source: str, seed: int = 0) -> None:
    """Write about ``megabytes`` MB of text: lines of words drawn from
    ``source``'s words (by frequency) mixed with 5% made-up words and numbers,
    so that the corpus has many distinct chunks, like real text."""
    import random
    from collections import Counter

    rng = random.Random(seed)
    counts = Counter(source.split())
    words, weights = list(counts), list(counts.values())
    letters = "abcdefghijklmnopqrstuvwxyzéàüßøñ"
    invented = ["".join(rng.choices(letters, k=rng.randint(3, 12))) for _ in range(1_000_000)]
    invented += [str(rng.randint(0, 10**6)) for _ in range(200_000)]
    target = megabytes * 1_000_000
    written = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            real = rng.choices(words, weights, k=95_000)
            fake = rng.choices(invented, k=5_000)
            line_words = real + fake
            rng.shuffle(line_words)
            block = "\n".join(" ".join(line_words[i : i + 12]) for i in range(0, len(line_words), 12)) + "\n"
            f.write(block)
            written += len(block.encode("utf-8"))


_MEMORY_CHILD = """
import resource, sys, time
from minillm.tokenizer import BPETokenizer, iter_text_files
start = time.perf_counter()
tok = BPETokenizer.train(iter_text_files([sys.argv[1]]), int(sys.argv[2]), progress=False)
seconds = time.perf_counter() - start
print(seconds, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def _bench_memory(megabytes: int, data: Path, vocab_size: int) -> None:
    source = (data / "tinyshakespeare.txt").read_text(encoding="utf-8")
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        generate_corpus(corpus, megabytes, source)
        size = corpus.stat().st_size / 1e6
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH"), root) if p)
        out = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, str(corpus), str(vocab_size)],
                             env=env, capture_output=True, text=True)
        if out.returncode != 0:
            print(f"memory run failed:\n{out.stderr}", file=sys.stderr)
            return
        seconds, maxrss_kb = out.stdout.split()
        peak_mb = int(maxrss_kb) / 1024  # ru_maxrss is in KiB on Linux
        print(f"train vocab {vocab_size} streaming {size:.0f} MB of generated text: {float(seconds):.0f} s, "
              f"peak memory {peak_mb:,.0f} MiB (target < 2 GB)")


def main(argv: list[str] | None = None) -> int:
    """``python -m minillm.tokenizer.commands`` runs the benchmark."""
    parser = add_tokenizer_bench_arguments(argparse.ArgumentParser(description="tokenizer benchmark"))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
