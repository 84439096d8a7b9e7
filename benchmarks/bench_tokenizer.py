"""Tokenizer figures: encode MB/s (1 process, encode_batch), train time and
bytes/token at vocab 4096, peak memory training on ~100 MB.

    python benchmarks/bench_tokenizer.py            # same as: minillm bench tokenizer
    python benchmarks/bench_tokenizer.py --memory-mb 0   # skip the 100 MB run
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minillm.tokenizer.commands import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
