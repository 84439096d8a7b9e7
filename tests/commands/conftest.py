"""Fixtures of the command-line tests (helpers to call: ``cli_helpers.py``)."""

import pytest


@pytest.fixture
def text_file(tmp_path):
    """A small UTF-8 corpus file (1,720 characters) to train on."""
    path = tmp_path / "corpus.txt"
    path.write_text("To be, or not to be, that is the question.\n" * 40, encoding="utf-8")
    return path
