"""GPT-2's byte-level alphabet and its two published files.

GPT-2 writes every token as a *string of printable characters*, one character
per byte, so that its files (``encoder.json``, ``vocab.bpe``) are plain text.
The map from the 256 byte values to those characters is fixed:

- the printable Latin-1 bytes map to themselves:
  ``!``..``~`` (33-126), ``¡``..``¬`` (161-172), ``®``..``ÿ`` (174-255);
- the other 68 bytes (controls, space, DEL, NBSP, soft hyphen) map, in byte
  order, to ``chr(256)``, ``chr(257)``, ... so space (32, the 33rd such
  byte) becomes ``chr(256 + 32) == "Ġ"`` and newline (10) becomes ``"Ċ"``.

>>> BYTE_TO_CHAR[ord(" ")], BYTE_TO_CHAR[ord("\\n")], BYTE_TO_CHAR[ord("a")]
('Ġ', 'Ċ', 'a')
>>> chars_to_bytes("Ġhello")
b' hello'

``vocab.bpe`` starts with a version line, then one merge per line, highest
priority first: two byte-level strings separated by one space (the alphabet
has no whitespace character, so the split is unambiguous). ``encoder.json``
maps each byte-level string to its id; ``<|endoftext|>`` is 50256 and is the
only entry that is a special token rather than bytes.

This module only reads files; building the tokenizer is
:meth:`minillm.tokenizer.BPETokenizer.from_gpt2_files`.
"""

from __future__ import annotations

import json
from pathlib import Path
from ..checks import is_integer

GPT2_SPECIAL_TOKENS = ("<|endoftext|>",)


def bytes_to_unicode() -> dict[int, str]:
    """The byte -> printable character map of GPT-2 (see the module docstring)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table = {b: chr(b) for b in printable}
    n = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + n)
            n += 1
    return dict(sorted(table.items()))


BYTE_TO_CHAR: dict[int, str] = bytes_to_unicode()
CHAR_TO_BYTE: dict[str, int] = {c: b for b, c in BYTE_TO_CHAR.items()}


def bytes_to_chars(data: bytes) -> str:
    """b' hi' -> 'Ġhi' (the printable spelling of arbitrary bytes)."""
    return "".join(BYTE_TO_CHAR[b] for b in data)


def chars_to_bytes(text: str) -> bytes:
    """'Ġhi' -> b' hi'. Raises ValueError on a character outside the alphabet."""
    try:
        return bytes(CHAR_TO_BYTE[c] for c in text)
    except KeyError as err:
        raise ValueError(
            f"{text!r} is not a byte-level string: {err.args[0]!r} is not in "
            "GPT-2's 256-character alphabet"
        ) from None


def read_vocab_bpe(path: str | Path) -> list[tuple[bytes, bytes]]:
    """The merges of a ``vocab.bpe`` file, in priority order, as byte pairs.

    >>> # "#version: 0.2\\nĠ t\\n..." -> [(b' ', b't'), ...]
    """
    lines = read_utf8(path).split("\n")
    if not lines or not lines[0].startswith("#version"):
        raise ValueError(f"{path}: not a GPT-2 vocab.bpe file (no '#version' first line)")
    merges = []
    for lineno, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        parts = line.split(" ")
        if len(parts) != 2 or not parts[0] or not parts[1]:
            raise ValueError(f"{path}:{lineno}: expected two tokens separated by a space, got {line!r}")
        try:
            merges.append((chars_to_bytes(parts[0]), chars_to_bytes(parts[1])))
        except ValueError as err:
            raise ValueError(f"{path}:{lineno}: {err}") from None
    return merges


def read_encoder_json(path: str | Path) -> tuple[dict[bytes, int], dict[str, int]]:
    """``encoder.json`` split into (byte tokens -> id, special tokens -> id).

    Checked: the N entries have the ids 0 to N-1, each once (as GPT-2's file
    does), so that a corrupt id can neither alias two tokens nor make the id
    table absurdly long.
    """
    try:
        encoder = json.loads(read_utf8(path))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not a GPT-2 encoder.json file ({err})") from None
    if not isinstance(encoder, dict):
        raise ValueError(f"{path}: not a GPT-2 encoder.json file (expected a JSON object)")
    tokens: dict[bytes, int] = {}
    special: dict[str, int] = {}
    owner: dict[int, str] = {}                                   # id -> the entry that has it
    for text, idx in encoder.items():
        if not is_integer(idx) or not 0 <= idx < len(encoder):
            ids = {i for i in encoder.values() if is_integer(i)}
            gap = next((i for i in range(len(encoder)) if i not in ids), None)
            raise ValueError(f"{path}: {text!r} has id {idx!r}; ids are integers 0 to {len(encoder) - 1} "
                             f"(one per entry)" + (f", and no entry has id {gap}" if gap is not None else ""))
        if idx in owner:
            raise ValueError(f"{path}: {owner[idx]!r} and {text!r} both have id {idx}")
        owner[idx] = text
        if text in GPT2_SPECIAL_TOKENS:
            special[text] = idx
            continue
        try:
            tokens[chars_to_bytes(text)] = idx
        except ValueError as err:
            raise ValueError(f"{path}: entry {err}") from None
    return tokens, special


def read_utf8(path: str | Path, error: type[ValueError] = ValueError) -> str:
    """The text of a file that must be UTF-8 (a leading byte-order mark is dropped); if it is not, an
    ``error`` naming the file, the line and the first bad byte (for any text file minillm reads)."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise error(f"{path}, line {line}: not UTF-8 text (byte 0x{data[err.start]:02x} at byte offset "
                    f"{err.start}); save it as UTF-8") from None
