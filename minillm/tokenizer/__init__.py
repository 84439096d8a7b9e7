"""Byte-level BPE tokenization: text -> token ids -> text.

>>> from minillm.tokenizer import BPETokenizer
>>> tok = BPETokenizer.train(text, vocab_size=4096, pattern="gpt2")      # doctest: +SKIP
>>> gpt2 = BPETokenizer.from_gpt2_files("encoder.json", "vocab.bpe")      # doctest: +SKIP
>>> BPETokenizer.bytes().encode("hi")
[104, 105]

Layers, each one idea: gpt2.py (the byte-level alphabet, GPT-2's files),
pretokenize.py (regex chunks, streaming), train.py (learning merges),
bpe.py (the tokenizer), parallel.py (encode_batch); the command line is
minillm/commands/tokenizer.py.
Independent of the tensor engine: it needs only ``regex`` and ``tqdm``.
"""

from __future__ import annotations

import os
from pathlib import Path

from .bpe import BPETokenizer, DisallowedSpecialToken, TokenizerFileError
from .gpt2 import bytes_to_unicode
from .pretokenize import GPT2_PATTERN, GPT4_PATTERN, count_chunks, iter_text_files

__all__ = [
    "BPETokenizer",
    "TokenizerFileError",
    "DisallowedSpecialToken",
    "ByteTokenizer",
    "load_tokenizer",
    "bytes_to_unicode",
    "count_chunks",
    "iter_text_files",
    "GPT2_PATTERN",
    "GPT4_PATTERN",
]


def ByteTokenizer(special_tokens=()) -> BPETokenizer:  # noqa: N802 (reads like a class)
    """The 256-token byte tokenizer; same as ``BPETokenizer.bytes()``."""
    return BPETokenizer.bytes(special_tokens)


def load_tokenizer(spec: str | os.PathLike) -> BPETokenizer:
    """A tokenizer from a short spec:

    - ``"bytes"``: the byte tokenizer (vocab 256);
    - ``"gpt2:DIR"``: GPT-2's, from DIR/encoder.json and DIR/vocab.bpe;
    - anything else: a path to a file written by ``BPETokenizer.save``.

    (Training needs text, so "train a new one" is ``BPETokenizer.train``.)
    """
    spec = os.fspath(spec)
    if spec == "bytes":
        return BPETokenizer.bytes()
    if spec.startswith("gpt2:"):
        folder = Path(spec[len("gpt2:"):])
        encoder, merges = folder / "encoder.json", folder / "vocab.bpe"
        for f in (encoder, merges):
            if not f.is_file():
                raise FileNotFoundError(f"{spec!r}: {f} not found (expected GPT-2's encoder.json and vocab.bpe)")
        return BPETokenizer.from_gpt2_files(encoder, merges)
    if Path(spec).is_dir():    # e.g. a run directory: say which file in it is meant
        folder = Path(spec)
        hint = (f"give the tokenizer file in it, {folder / 'tokenizer.json'}"
                if (folder / "tokenizer.json").is_file() else
                f"for GPT-2's encoder.json and vocab.bpe in it, use gpt2:{spec}"
                if (folder / "encoder.json").is_file() else "give a tokenizer file (or 'bytes' or 'gpt2:DIR')")
        raise IsADirectoryError(f"tokenizer {spec!r} is a folder: {hint}")
    if not Path(spec).is_file():
        raise FileNotFoundError(f"tokenizer {spec!r}: no such file (or use 'bytes' or 'gpt2:DIR')")
    return BPETokenizer.load(spec)
