"""GPT-2 encode speed, minillm next to tiktoken, interleaved in one process.

Both tokenizers are built from the same files, ../shared/data/gpt2/encoder.json
and vocab.bpe (tiktoken through ``data_gym_to_mergeable_bpe_ranks``, with
tiktoken's own GPT-2 pattern), and encode the same text, tinyshakespeare
(1.1 MB) by default, with ``encode(text)`` (both check for special tokens
first). The ids are checked to be identical. Each round:

1. loads a fresh minillm tokenizer (not timed) and times its first
   ``encode``: its caches hold only what loading puts there (the chunk cache:
   every token; the word cache: the tokens that are a word of their own,
   " the"), so every other word is chunked and every chunk that is not itself
   a token goes through the merge loop ("fresh", what ``minillm bench
   tokenizer`` calls the first call);
2. times tiktoken's ``encode`` (it keeps no cache: every call is the same);
3. times minillm's ``encode`` of the same text again ("warm": every word
   of up to 15 bytes is in the word cache, which holds single words, never
   longer text);
4. times tiktoken again;
5. times both on another text of the same words: the text's words (each
   with the whitespace before it) shuffled ("warm, other text": shows that
   the warm figure is not a cache of the text).

The figures are the medians over the rounds, and the ratios minillm / tiktoken
in MB/s (> 1: minillm faster), per round and then the median: a load change
on a shared machine hits both alike. tiktoken comes from a throwaway
environment, never from the project's:

    python3 -m venv /tmp/refenv --system-site-packages   # sees the system numpy, regex, tqdm
    /tmp/refenv/bin/pip install tiktoken torch           # PyPI
    /tmp/refenv/bin/python benchmarks/tokenizer_vs_tiktoken.py               # 7 rounds
    /tmp/refenv/bin/python benchmarks/tokenizer_vs_tiktoken.py --rounds 15 --text other.txt

No network is needed: tiktoken reads the local files (``get_encoding("gpt2")``
would download them).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

try:
    import tiktoken  # noqa: E402
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks  # noqa: E402
except ImportError:  # pragma: no cover
    sys.exit("tokenizer_vs_tiktoken.py needs tiktoken: see this script's docstring for the throwaway venv")

import regex  # noqa: E402

from minillm.tokenizer import load_tokenizer  # noqa: E402

# tiktoken's GPT-2 (r50k) pre-tokenization pattern, as tiktoken_ext/openai_public.py defines it
R50K_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def tiktoken_gpt2(gpt2_dir: Path):
    ranks = data_gym_to_mergeable_bpe_ranks(str(gpt2_dir / "vocab.bpe"), str(gpt2_dir / "encoder.json"))
    return tiktoken.Encoding("gpt2-local", pat_str=R50K_PATTERN, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": 50256})


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main(argv=None) -> int:
    root = Path(__file__).resolve().parents[1]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=root / ".." / "shared" / "data",
                        help="folder with gpt2/ and tinyshakespeare.txt (default ../shared/data)")
    parser.add_argument("--text", type=Path, help="text file to encode (default: DATA/tinyshakespeare.txt)")
    parser.add_argument("--rounds", type=int, default=7, help="rounds (default 7)")
    args = parser.parse_args(argv)

    gpt2_dir = args.data / "gpt2"
    text = (args.text or args.data / "tinyshakespeare.txt").read_text(encoding="utf-8")
    megabytes = len(text.encode("utf-8")) / 1e6
    load = os.getloadavg()
    print(f"text {megabytes:.2f} MB; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; "
          f"{os.cpu_count()} CPUs; tiktoken {tiktoken.__version__}")
    enc = tiktoken_gpt2(gpt2_dir)
    expected = enc.encode(text)
    pieces = regex.findall(r"\s*\S+|\s+", text)                   # words: whitespace, then the rest
    middle = pieces[1:-1]
    random.Random(0).shuffle(middle)
    other = pieces[0] + "".join(middle) + pieces[-1]
    other_expected = enc.encode(other)
    fresh, warm, ref, other_mm, other_ref = [], [], [], [], []
    for _ in range(args.rounds):
        tok = load_tokenizer(f"gpt2:{gpt2_dir}")                  # a fresh tokenizer (see 1. above)
        seconds, ids = timed(lambda: tok.encode(text))
        if ids != expected:
            raise SystemExit("minillm and tiktoken disagree on the ids: the comparison is void")
        fresh.append(seconds)
        ref.append(timed(lambda: enc.encode(text))[0])
        warm.append(timed(lambda: tok.encode(text))[0])
        ref.append(timed(lambda: enc.encode(text))[0])
        seconds, ids = timed(lambda: tok.encode(other))
        if ids != other_expected:
            raise SystemExit("minillm and tiktoken disagree on the shuffled text's ids")
        other_mm.append(seconds)
        other_ref.append(timed(lambda: enc.encode(other))[0])

    def rate(seconds):
        return megabytes / statistics.median(seconds)

    fresh_ratios = [t / f for f, t in zip(fresh, ref[0::2])]           # minillm MB/s / tiktoken MB/s
    warm_ratios = [t / w for w, t in zip(warm, ref[1::2])]
    other_ratios = [t / m for m, t in zip(other_mm, other_ref)]
    print(f"tiktoken encode:             {rate(ref):6.2f} MB/s  ({len(expected):,} tokens, ids identical)")
    print(f"minillm encode, fresh:       {rate(fresh):6.2f} MB/s  ratio {statistics.median(fresh_ratios):.2f}x "
          f"(range {min(fresh_ratios):.2f}-{max(fresh_ratios):.2f})")
    print(f"minillm encode, warm cache:  {rate(warm):6.2f} MB/s  ratio {statistics.median(warm_ratios):.2f}x "
          f"(range {min(warm_ratios):.2f}-{max(warm_ratios):.2f})")
    print(f"minillm, warm, other text:   {rate(other_mm):6.2f} MB/s  ratio {statistics.median(other_ratios):.2f}x "
          f"(range {min(other_ratios):.2f}-{max(other_ratios):.2f}; the same words shuffled, tiktoken "
          f"{rate(other_ref):.2f} MB/s)")
    load = os.getloadavg()
    print(f"load average after {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
