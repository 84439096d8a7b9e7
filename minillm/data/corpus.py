"""Text to train on: the built-in corpus, or your own text files.

The built-in corpus is the Python reference documentation that ships with
every CPython (``pydoc_data.topics``, what ``help("assert")`` shows): about
470,000 characters of English prose mixed with code, on every machine, with
no download. Good for a first model in minutes on a laptop.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable


def builtin_corpus() -> str:
    """The Python reference documentation: every ``pydoc_data.topics`` entry,
    sorted by topic name (deterministic), separated by blank lines."""
    from pydoc_data.topics import topics  # noqa: PLC0415 (a 0.5 MB module: load on demand)

    return "\n\n".join(topics[name].strip("\n") for name in sorted(topics))


def load_texts(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> list[str]:
    """Read UTF-8 text files, one string (document) per file, in the order given.

    ``paths`` is one path or several; a directory stands for the ``*.txt``
    files under it, recursively, sorted by path.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.rglob("*.txt") if p.is_file())
            if not found:
                raise FileNotFoundError(f"{path}: a directory with no *.txt files")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"{path}: no such file or directory")
    texts = []
    for file in files:
        try:
            texts.append(file.read_text(encoding="utf-8"))
        except UnicodeDecodeError as err:
            raise ValueError(f"{file}: not UTF-8 text ({err})") from None
    return texts
