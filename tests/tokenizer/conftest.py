"""Shared fixtures for the tokenizer tests: where ../shared/data is, GPT-2."""

from pathlib import Path

import pytest

SHARED_DATA = (Path(__file__).resolve().parents[2] / ".." / "shared" / "data").resolve()


def shared_file(name: str) -> Path:
    """A file of ../shared/data, or skip the test (with the reason) if absent."""
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"{path} not found (shared test data is not part of the repository)")
    return path


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
