"""Where ../shared/data is, for the tokenizer tests (a module of its own: test files import it by a
name no other test folder uses, unlike ``conftest``)."""

from pathlib import Path

import pytest

SHARED_DATA = (Path(__file__).resolve().parents[2] / ".." / "shared" / "data").resolve()


def shared_file(name: str) -> Path:
    """A file of ../shared/data, or skip the test (with the reason) if absent."""
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"{path} not found (shared test data is not part of the repository)")
    return path
