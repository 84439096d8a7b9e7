"""Tokenizer figures (``minillm bench tokenizer``): encode MB/s with GPT-2's vocabulary on
tinyshakespeare (1 process and encode_batch; the first call of a freshly loaded tokenizer, caches
holding only vocabulary tokens, loading not timed, and the same text again), train time and bytes/token at vocab 4096, and
peak memory training on ~100 MB of generated text. Run it on an idle machine: it prints the load
average first.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..tokenizer import BPETokenizer, load_tokenizer


def default_data_dir() -> Path:
    """../shared/data next to the project (or the current directory)."""
    for base in (Path.cwd(), Path(__file__).resolve().parents[2]):
        candidate = (base / ".." / "shared" / "data").resolve()
        if candidate.is_dir():
            return candidate
    return (Path.cwd() / ".." / "shared" / "data").resolve()


def _best_time(fn, repeat: int) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def run_tokenizer_bench(data: Path | None = None, workers: int | None = None, vocab_size: int = 4096,
                        memory_mb: int = 100, repeat: int = 3) -> int:
    """Print the tokenizer figures (see the module docstring); FileNotFoundError if the data is missing."""
    data = Path(data) if data is not None else default_data_dir()
    workers = workers or os.cpu_count() or 1
    text_path, gpt2_dir = data / "tinyshakespeare.txt", data / "gpt2"
    if not text_path.is_file() or not gpt2_dir.is_dir():
        missing = text_path if not text_path.is_file() else gpt2_dir
        raise FileNotFoundError(2, f"No such file or directory; the tokenizer bench needs {text_path.name} and "
                                   f"{gpt2_dir.name}/ in --data (see ../shared/data/README.md)", str(missing))
    text = text_path.read_text(encoding="utf-8")
    megabytes = len(text.encode("utf-8")) / 1e6
    print(f"tinyshakespeare: {megabytes:.2f} MB, {os.cpu_count()} CPUs, Python {sys.version.split()[0]}")

    # encode, GPT-2's vocabulary. "first call": a fresh tokenizer (its chunk and word
    # caches hold only vocabulary tokens), timed from the call, not the loading; "again":
    # the same text again (the word cache holds single words, never a whole text)
    print(f"load average {os.getloadavg()[0]:.1f} (other busy processes slow every figure below)")
    spec = f"gpt2:{gpt2_dir}"
    load_seconds, _ = _best_time(lambda: load_tokenizer(spec), 1)

    def first_call(encode):
        best, result = float("inf"), None
        for _ in range(repeat):
            tok = load_tokenizer(spec)
            start = time.perf_counter()
            result = encode(tok)
            best = min(best, time.perf_counter() - start)
        return best, result, tok

    cold, ids, gpt2 = first_call(lambda tok: tok.encode(text))
    warm, _ = _best_time(lambda: gpt2.encode(text), repeat)
    print(f"encode (gpt2, 1 process): first call {megabytes / cold:5.2f} MB/s, "
          f"again {megabytes / warm:5.2f} MB/s  ({len(ids):,} tokens; target >= 6 MB/s; "
          f"loading the tokenizer: {load_seconds:.2f} s)")
    batch_cold, batch_ids, gpt2 = first_call(lambda tok: tok.encode_batch([text], num_workers=workers))
    batch_warm, _ = _best_time(lambda: gpt2.encode_batch([text], num_workers=workers), repeat)
    print(f"encode_batch ({workers} processes): first call {megabytes / batch_cold:5.2f} MB/s, "
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
    parallel, parallel_ids, _ = first_call(lambda tok: tok.encode_batch(docs, num_workers=workers))
    print(f"8 documents, {docs_mb:.1f} MB, first call: encode one by one {docs_mb / serial:5.2f} MB/s, "
          f"encode_batch ({workers} processes) {docs_mb / parallel:5.2f} MB/s  "
          f"(ids identical: {serial_ids == parallel_ids})")

    # train
    seconds, tok = _best_time(
        lambda: BPETokenizer.train(text, vocab_size, pattern="gpt2", progress=False), repeat)
    n_tokens = len(tok.encode(text))
    print(f"train vocab {vocab_size} (gpt2 pattern): {seconds:.2f} s (target <= 3 s), "
          f"{len(text.encode('utf-8')) / n_tokens:.3f} bytes/token (HF: ~3.24)")

    if memory_mb > 0:
        _bench_memory(memory_mb, data, vocab_size)
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
