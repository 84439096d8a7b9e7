"""Argument types for the ``minillm`` command line: each parses one value or says clearly why not.

argparse turns an ``ArgumentTypeError`` into ``minillm train: error: argument --steps:
expected a positive integer, got 0``, so every command reports bad values the same way.
"""

from __future__ import annotations

import argparse
import math
from typing import Callable


def _parsed(convert: Callable[[str], float], accept: Callable[[float], bool], expected: str):
    """An argparse type: ``convert`` the text, then ``accept`` the value, else say what was ``expected``."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not accept(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text}")
        return value

    parse.__name__ = expected.replace(" ", "_")
    return parse


positive_int = _parsed(int, lambda v: v >= 1, "a positive integer")
non_negative_int = _parsed(int, lambda v: v >= 0, "an integer >= 0")
positive_float = _parsed(float, lambda v: 0 < v < math.inf, "a positive number")
non_negative_float = _parsed(float, lambda v: 0 <= v < math.inf, "a number >= 0")
probability = _parsed(float, lambda v: 0 <= v < 1, "a probability in [0, 1)")
top_p = _parsed(float, lambda v: 0 < v <= 1, "a number in (0, 1]")


def device(text: str) -> str:
    """cpu | cuda | gpu | cuda:N (whether that GPU exists is checked when it is used)."""
    text = text.strip().lower()
    if text not in ("cpu", "cuda", "gpu") and not (text.startswith("cuda:") and text[5:].isdigit()):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    return text


def tokenizer_spec(text: str) -> str:
    """bytes | bpe:N | gpt2:DIR | PATH (existence of DIR/PATH is checked when it is loaded)."""
    if text.startswith("bpe:"):
        try:
            size = int(text[4:])
        except ValueError:
            raise argparse.ArgumentTypeError(f"bpe:N needs an integer vocabulary size, got {text!r}") from None
        if size < 257:
            raise argparse.ArgumentTypeError(
                f"bpe:{size}: the vocabulary needs the 256 bytes plus <|endoftext|>, so N >= 257")
    elif not text:
        raise argparse.ArgumentTypeError("empty tokenizer spec: use bytes, bpe:N, gpt2:DIR or a file")
    return text


def preset(text: str) -> str:
    """A GPTConfig preset name (or one of its aliases)."""
    from ..models.gpt import PRESET_ALIASES, PRESETS  # noqa: PLC0415

    if text not in PRESETS and text not in PRESET_ALIASES:
        raise argparse.ArgumentTypeError(f"unknown preset {text!r}; choose one of {', '.join(PRESETS)}")
    return text
