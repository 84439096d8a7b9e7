"""Pre-tokenization: cutting text into chunks before BPE sees it.

BPE never merges across a chunk boundary. The chunks come from a regex that
keeps letters with letters, digits with digits, punctuation with punctuation,
and glues one leading space to the word after it:

>>> compile_pattern("gpt2").findall("Hello world's 2024!!  ok")
['Hello', ' world', "'s", ' 2024', '!!', ' ', ' ok']

So " world" is one chunk (and becomes one GPT-2 token), and "world" at the
start of a line is a different chunk. The patterns need the ``regex``
package: ``re`` has no ``\\p{L}`` (any letter) or ``\\p{N}`` (any number).

Also here: reading a large corpus in blocks without changing its chunks
(:func:`split_blocks`, :func:`iter_text_files`) and counting the chunks of a
corpus (:func:`count_chunks`), which is the first step of training.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator

import regex

# GPT-2's pattern, as published in its encoder.py.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# GPT-4's (tiktoken cl100k_base): case-insensitive contractions, numbers of at
# most 3 digits, a newline run ends a chunk.
GPT4_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
    r"""|\s*[\r\n]|\s+(?!\S)|\s+"""
)

NAMED_PATTERNS = {"gpt2": GPT2_PATTERN, "gpt4": GPT4_PATTERN}

# The same chunks as GPT2_PATTERN, found ~15% faster: the letters alternative
# (most chunks) is tried first and punctuation before numbers. Reordering is
# exact because these alternatives cannot match at the same position: each
# begins with a letter, "'", a digit or other punctuation (after an optional
# space), and "'" is tried before punctuation as in the original. Training and
# encoding use it; files and error messages keep the published pattern.
GPT2_PATTERN_FAST = r""" ?\p{L}+|'(?:s|t|re|ve|m|ll|d)| ?[^\s\p{L}\p{N}]+| ?\p{N}+|\s+(?!\S)|\s+"""
_FASTER_EQUIVALENT = {GPT2_PATTERN: GPT2_PATTERN_FAST}

# ... and for a text that is all ASCII, the same pattern with the classes
# spelled out (\p{L} = A-Z a-z, \p{N} = 0-9, \s = tab, LF, VT, FF, CR,
# space: what ``regex`` matches among the 128 ASCII characters), which the
# standard ``re`` module runs about twice as fast as ``regex`` runs the
# general pattern.
_ASCII_SPACE = r"\t\n\x0b\x0c\r "
GPT2_PATTERN_ASCII = (
    rf""" ?[A-Za-z]+|'(?:s|t|re|ve|m|ll|d)| ?[^{_ASCII_SPACE}A-Za-z0-9]+| ?[0-9]+"""
    rf"""|[{_ASCII_SPACE}]+(?![^{_ASCII_SPACE}])|[{_ASCII_SPACE}]+"""
)

BLOCK_CHARS = 1 << 20  # about 1 MB of text per block when streaming
_SPACE = regex.compile(r"\s")
_LETTER_OR_DIGIT = regex.compile(r"[\p{L}\p{N}]")


def resolve_pattern(pattern: str) -> str:
    """'gpt2' | 'gpt4' | any regex -> the regex source (checked to compile)."""
    if not isinstance(pattern, str):
        raise TypeError(f"pattern must be 'gpt2', 'gpt4' or a regex string, got {pattern!r}")
    source = NAMED_PATTERNS.get(pattern, pattern)
    try:
        regex.compile(source)
    except regex.error as err:
        raise ValueError(f"invalid pre-tokenization pattern {pattern!r}: {err}") from None
    return source


def compile_pattern(pattern: str) -> regex.Pattern:
    """'gpt2' | 'gpt4' | any regex -> compiled (GPT-2's as GPT2_PATTERN_FAST)."""
    source = resolve_pattern(pattern)
    return regex.compile(_FASTER_EQUIVALENT.get(source, source))


def chunk_finder(pattern: str) -> Callable[[str], list[str]]:
    """The fastest exact ``findall`` for a pattern: for GPT-2's, the ASCII
    spelling with ``re`` when the text is ASCII (``str.isascii`` is O(1):
    Python strings record it), else :func:`compile_pattern`'s."""
    general = compile_pattern(pattern).findall
    if resolve_pattern(pattern) != GPT2_PATTERN:
        return general
    ascii_only = re.compile(GPT2_PATTERN_ASCII).findall

    def findall(text: str) -> list[str]:
        return ascii_only(text) if text.isascii() else general(text)

    return findall


def _is_safe_cut(text: str, i: int) -> bool:
    """True if text[i-1] is "\\n" between two non-space characters.

    No chunk of the GPT-2 or GPT-4 pattern crosses such a point, and how the
    text after it is cut does not depend on the text before it, so cutting
    there gives exactly the chunks of the whole text.
    """
    return (
        2 <= i < len(text)
        and text[i - 1] == "\n"
        and _SPACE.match(text, i - 2) is None
        and _SPACE.match(text, i) is None
    )


def _cut_at_line_break(text: str, j: int, lo: int) -> int | None:
    """A safe cut at the line break whose "\\n" is text[j] (after ``lo``), or None.

    - After "\\n" between two non-space characters (``_is_safe_cut``): "a\\nb" -> "a\\n" | "b".
    - Before "\\r\\n" that follows a letter or a digit: "a\\r\\nb" -> "a" | "\\r\\nb". Windows line ends
      need this: "\\r" is whitespace, so their "\\n" never sits between non-space characters. No chunk
      runs from a letter or digit into whitespace (GPT-4 glues line ends to punctuation only: ".\\r\\n" is
      one chunk, so a line ending in "." gives no such cut), and the chunks from the "\\r" on do not
      depend on the text before it (the patterns look ahead, never behind).
    """
    if _is_safe_cut(text, j + 1):
        return j + 1
    if j - 1 > lo and text[j - 1] == "\r" and _LETTER_OR_DIGIT.match(text, j - 2):
        return j - 1
    return None


def _find_cut(text: str, target: int, lo: int) -> int | None:
    """The safe cut nearest below ``target`` (else above it), or None."""
    i = text.rfind("\n", lo, target)
    while i > lo:
        cut = _cut_at_line_break(text, i, lo)
        if cut is not None:
            return cut
        i = text.rfind("\n", lo, i)
    i = text.find("\n", target)
    while i != -1:
        cut = _cut_at_line_break(text, i, lo)
        if cut is not None:
            return cut
        i = text.find("\n", i + 1)
    return None


def split_blocks(text: str, block_chars: int = BLOCK_CHARS) -> Iterator[str]:
    """Cut ``text`` into pieces of about ``block_chars`` at safe line breaks.

    For the gpt2 and gpt4 patterns the chunks of the pieces, concatenated,
    are exactly the chunks of ``text``. (A custom pattern may, rarely, cut
    differently at a block boundary; that only matters for training counts.)
    """
    start = 0
    while len(text) - start > block_chars:
        cut = _find_cut(text, start + block_chars, start)
        if cut is None:
            break
        yield text[start:cut]
        start = cut
    if start < len(text):
        yield text[start:]


def split_even(text: str, n: int) -> list[str]:
    """Cut ``text`` into at most ``n`` pieces of about equal length at safe
    line breaks (same guarantee as :func:`split_blocks`); fewer if it has
    fewer safe places to cut.

    >>> split_even("one\\ntwo\\nthree\\nfour", 2)
    ['one\\ntwo\\n', 'three\\nfour']
    """
    pieces, start = [], 0
    for k in range(1, n):
        cut = _find_cut(text, k * len(text) // n, start)
        if cut is not None and cut > start:
            pieces.append(text[start:cut])
            start = cut
    pieces.append(text[start:])
    return pieces


def iter_text_files(
    paths: Iterable[str | os.PathLike], block_chars: int = BLOCK_CHARS
) -> Iterator[str]:
    """Stream UTF-8 files as blocks (see :func:`split_blocks`): memory stays
    at a few blocks whatever the file size. Each file is its own document;
    line endings are kept as they are (``\\r\\n`` stays ``\\r\\n``). A file that is not UTF-8
    raises ValueError naming it."""
    for path in paths:
        with open(path, encoding="utf-8", newline="") as f:
            carry = ""
            while True:
                try:
                    data = f.read(block_chars)
                except UnicodeDecodeError as error:
                    raise ValueError(f"{path}: not UTF-8 text (byte 0x{error.object[error.start]:02x}: "
                                     f"{error.reason}); convert it to UTF-8 first") from None
                if not data:
                    break
                buffer = carry + data
                cut = _find_cut(buffer, max(len(buffer) - 1, 0), 0)
                if cut is None:  # no safe line break yet: keep reading
                    carry = buffer
                    continue
                yield buffer[:cut]
                carry = buffer[cut:]
            if carry:
                yield carry


def count_chunks(
    texts: str | Iterable[str], pattern: str = "gpt2", progress: bool = False
) -> Counter[str]:
    """How often each distinct chunk occurs in a corpus.

    ``texts`` is one string or an iterable of strings (documents, lines or
    blocks, e.g. :func:`iter_text_files`); each item is chunked on its own,
    so only one item is in memory at a time.

    >>> count_chunks("the cat the end")
    Counter({'the': 1, ' cat': 1, ' the': 1, ' end': 1})
    """
    finder = chunk_finder(pattern)
    if isinstance(texts, (bytes, bytearray)) or not isinstance(texts, (str, Iterable)):
        raise TypeError(_not_text(texts))
    pieces = split_blocks(texts) if isinstance(texts, str) else texts
    counts: Counter[str] = Counter()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(desc="counting chunks", unit="char", unit_scale=True)
    for piece in pieces:
        if not isinstance(piece, str):
            raise TypeError(_not_text(piece, "an item of "))
        counts.update(finder(piece))
        if bar is not None:
            bar.update(len(piece))
    if bar is not None:
        bar.close()
    return counts


def _not_text(value, what: str = "") -> str:
    hint = " (decode bytes first)" if isinstance(value, bytes) else ""
    return (f"training text must be a str or an iterable of str (documents, lines or blocks), got "
            f"{what}{type(value).__name__} {value!r:.40}{hint}")
