"""Tokenizer figures: encode MB/s with GPT-2's vocabulary on tinyshakespeare
(1 process and encode_batch; the first call of a freshly loaded tokenizer,
empty cache, loading not timed, and the same text again), train time and
bytes/token at vocab 4096, peak memory training on ~100 MB. Run it on an
idle machine: it prints the load average first.

    python benchmarks/bench_tokenizer.py            # same as: minillm bench tokenizer
    python benchmarks/bench_tokenizer.py --memory-mb 0   # skip the 100 MB run
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minillm.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["bench", "tokenizer", *sys.argv[1:]]))
