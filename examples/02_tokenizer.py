"""Chapter 2: text -> token ids -> text, with byte-level BPE.

Trains a small BPE tokenizer, shows how it cuts a sentence, saves and reloads
it, and (when ../shared/data/gpt2 is present) compares it with GPT-2's own
tokenizer. Runs in a few seconds:

    python examples/02_tokenizer.py
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minillm.tokenizer import BPETokenizer, load_tokenizer  # noqa: E402

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


def training_text() -> tuple[str, str]:
    """Tinyshakespeare when available, else CPython's built-in reference docs."""
    path = DATA / "tinyshakespeare.txt"
    if path.is_file():
        return path.read_text(encoding="utf-8"), "tinyshakespeare"
    from pydoc_data.topics import topics

    return "\n".join(topics[k] for k in sorted(topics)), "pydoc_data.topics"


def show(tok: BPETokenizer, text: str) -> None:
    ids = tok.encode(text, allowed_special="all")
    pieces = [tok.decode_bytes([i]).decode("utf-8", errors="backslashreplace") for i in ids]
    print(f"  {len(text.encode('utf-8'))} bytes -> {len(ids)} tokens: {pieces}")


def main(argv=None) -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args(argv)   # no options; --help
    text, name = training_text()
    print(f"training text: {name}, {len(text):,} characters")

    start = time.perf_counter()
    tok = BPETokenizer.train(text, vocab_size=1024, special_tokens=["<|endoftext|>"], progress=False)
    print(f"trained {tok} in {time.perf_counter() - start:.2f} s")
    print(f"  first merges: {[tok.decode_bytes([a]) + tok.decode_bytes([b]) for a, b in tok.merges[:8]]}")

    sample = "To be, or not to be: that is the question.<|endoftext|>Ünïcödé 👍 too."
    show(tok, sample)
    assert tok.decode(tok.encode(sample, allowed_special="all")) == sample

    ids = tok.encode(text)
    print(f"  compression on the training text: {len(text.encode('utf-8')) / len(ids):.2f} bytes/token")

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tok.json"
        tok.save(path)
        assert BPETokenizer.load(path) == tok
        print(f"saved and reloaded ({path.stat().st_size:,} bytes of readable JSON)")

    chars = BPETokenizer.bytes()
    print("bytes tokenizer (vocab 256):")
    show(chars, "héllo")

    if (DATA / "gpt2" / "vocab.bpe").is_file():
        gpt2 = load_tokenizer(f"gpt2:{DATA / 'gpt2'}")
        print(f"GPT-2: {gpt2}")
        show(gpt2, sample)
        print(f"  'Hello world' -> {gpt2.encode('Hello world')} (GPT-2: [15496, 995])")


if __name__ == "__main__":
    main()
