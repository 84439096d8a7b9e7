"""Shared fixtures for the tokenizer tests: GPT-2's tokenizer from ../shared/data."""

from pathlib import Path

import pytest

from tokenizer_helpers import shared_file


@pytest.fixture(scope="session")
def gpt2_dir() -> Path:
    folder = shared_file("gpt2")
    for name in ("encoder.json", "vocab.bpe"):
        shared_file(f"gpt2/{name}")
    return folder


@pytest.fixture(scope="session")
def gpt2(gpt2_dir):
    from minillm.tokenizer import BPETokenizer

    return BPETokenizer.from_gpt2_files(gpt2_dir / "encoder.json", gpt2_dir / "vocab.bpe")
