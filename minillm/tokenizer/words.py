"""Encoding a whole text at once in NumPy: the text cut into words, each word's ids from a cache.

GPT-2's pre-tokenization (pretokenize.py) splits the text into chunks; this
module cuts it coarser, into **words**: a run of whitespace (``\\s``, as the
``regex`` package defines it) followed by a run of non-whitespace. Only the
text's first word can lack the whitespace and only its last one the rest::

    "First Citizen:\\n\\nBefore we" -> "First" | " Citizen:" | "\\n\\nBefore" | " we"

**The chunks of a text are the chunks of its words, word after word.** Every
alternative of GPT2_PATTERN matches either whitespace only (``\\s+(?!\\S)``,
``\\s+``) or non-whitespace after at most one leading space (``'s``,
`` ?\\p{L}+``, `` ?\\p{N}+``, `` ?[^\\s\\p{L}\\p{N}]+``; no letter or digit is
whitespace). So no chunk runs from a non-whitespace character into a
whitespace one: a chunk ends where each word ends. And what the pattern
matches inside a word depends on nothing after it: the runs stop at the next
word's whitespace as they would at the end of the text, and the one
look-ahead, ``(?!\\S)``, looks from whitespace at the word's own
non-whitespace (or, for a last word of whitespace only, at the end of the
text, wherever that word is encoded); there is no look-behind, and every
character can start a match, so matching resumes at each word's start as it
would at the start of a text. Hence a word's token ids never depend on its
neighbours. The tests check it on every string of up to 4 characters drawn
from 14 character classes and on random text, and compare whole encodes
(corpora, adversarial strings) with the published pattern's. This holds for
GPT-2's pattern only; other patterns keep the chunk-by-chunk path.

**The cache holds words of at most 15 bytes** (99.9% of tinyshakespeare's
words; longer ones are chunked on every call), each word's ids keyed by the
word itself, bounded to ``WORD_LIMIT`` words (then cleared). Nothing longer
than a word (a line, a paragraph, a whole text) is ever cached, so a new text
made of known words encodes as fast as a repeated one.

Why NumPy: the text's UTF-8 bytes are one array, the word starts are where a
whitespace character follows a non-whitespace one, and each word of up to 15
bytes *is* a pair of 64-bit numbers (its bytes, and its length), which
:class:`KeyTable`, a hash table in NumPy arrays, looks up for all words in a
few vectorized passes. No Python object is made per word; the per-word work
(about 200,000 words in tinyshakespeare) runs in C. Only the words not in the
cache become Python strings, once each, to be chunked and merged.
"""

from __future__ import annotations

import numpy as np
import regex

MAX_WORD_BYTES = 15       # longest cached word: 8 bytes in one key, 7 + the length in the other
WORD_LIMIT = 200_000     # words a WordCache keeps besides its base (GPT-2: 33,012) before it is cleared;
                          # with the base, a table of 2^20 slots (24 MB) + the ids: ~30 MB at most

# _IS_SPACE[c]: code point c is \s for the regex package; no code point above U+3000 is (tested)
_LAST_SPACE = 0x3000
_IS_SPACE = np.zeros(_LAST_SPACE + 2, dtype=bool)
_IS_SPACE[[ord(c) for c in regex.findall(r"\s", "".join(map(chr, range(_LAST_SPACE + 1))))]] = True

_LOW_BYTES = np.array([(1 << (8 * k)) - 1 for k in range(9)], dtype=np.uint64)  # [k]: the low k bytes
_MIX0, _MIX1 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xC2B2AE3D27D4EB4F)   # odd: multiplicative hashing


def word_starts(text: str, data: bytes) -> np.ndarray:
    """Byte offsets in ``data`` (``text`` in UTF-8, not empty) where the words of ``text`` start.

    >>> word_starts("ab  c\\nd", b"ab  c\\nd").tolist()   # "ab" | "  c" | "\\nd"
    [0, 2, 5]
    """
    if text.isascii():  # a byte is a character; \s is 9-13 (tab to carriage return) and 32 (space)
        byte = np.frombuffer(data, dtype=np.uint8)
        space = (byte == 32) | (byte - np.uint8(9) <= 4)   # (uint8 wraps below 9)
    else:
        code = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")
        space = _IS_SPACE[np.minimum(code, _LAST_SPACE + 1)]
    starts = np.flatnonzero(space[1:] & ~space[:-1]) + 1          # whitespace after non-whitespace
    if not text.isascii():  # character index -> byte offset
        utf8_length = 1 + (code >= 0x80).astype(np.int64) + (code >= 0x800) + (code >= 0x10000)
        starts = (np.cumsum(utf8_length) - utf8_length)[starts]
    return np.concatenate((np.zeros(1, dtype=np.int64), starts))


def word_keys(data: bytes, starts: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each word of at most MAX_WORD_BYTES bytes as two uint64 that determine it exactly:
    ``key0`` = its bytes 0-7, ``key1`` = its bytes 8-14 and, in the top byte, its length
    (little-endian: byte k of the word is bits 8k to 8k+7). Longer words get keys too but
    they are not exact: callers leave them out."""
    padded = data + bytes(16)
    every = np.ndarray((len(data) + 8,), dtype="<u8", buffer=padded, strides=(1,))  # 8 bytes at each offset
    length = np.minimum(lengths, MAX_WORD_BYTES)
    key0 = every[starts] & _LOW_BYTES[np.minimum(length, 8)]
    key1 = (every[starts + 8] & _LOW_BYTES[np.maximum(length - 8, 0)]) | (length.astype(np.uint64) << np.uint64(56))
    return key0, key1


def mix(key0: np.ndarray, key1: np.ndarray) -> np.ndarray:
    """A 64-bit hash of the key pairs (multiplicative: the high bits are the well-mixed ones)."""
    return (key0 * _MIX0) ^ (key1 * _MIX1)


class KeyTable:
    """A hash table in NumPy arrays: (key0, key1) pairs of uint64 -> int64 values >= 0, for many
    keys at once.

    Open addressing with linear probing: a key lives in the first slot at or after its home
    slot (the top bits of :func:`mix`) that holds it or is empty, and the table is kept at
    most a quarter full, so a search meets an empty slot within a few steps. Each step of
    :meth:`find` and :meth:`add` handles all keys still searching at once.
    """

    def __init__(self, bits: int = 12) -> None:
        self._reset(bits)

    def _reset(self, bits: int) -> None:
        self._bits = bits
        self._key0 = np.zeros(1 << bits, dtype=np.uint64)
        self._key1 = np.zeros(1 << bits, dtype=np.uint64)
        self._value = np.full(1 << bits, -1, dtype=np.int64)   # -1: an empty slot
        self.count = 0

    def _home(self, key0: np.ndarray, key1: np.ndarray) -> np.ndarray:
        return (mix(key0, key1) >> np.uint64(64 - self._bits)).astype(np.int64)

    def find(self, key0: np.ndarray, key1: np.ndarray) -> np.ndarray:
        """The value of each key, -1 where it is absent. The first step covers all keys, later
        ones only those that met another key (``todo``, with their next slots)."""
        mask = (1 << self._bits) - 1
        slot = self._home(key0, key1)
        value = self._value[slot]
        hit = (self._key0[slot] == key0) & (self._key1[slot] == key1) & (value >= 0)
        found = np.where(hit, value, -1)
        todo = np.flatnonzero((value >= 0) & ~hit)
        slot = slot[todo]
        while todo.size:
            slot = (slot + 1) & mask
            value = self._value[slot]
            hit = (self._key0[slot] == key0[todo]) & (self._key1[slot] == key1[todo]) & (value >= 0)
            found[todo[hit]] = value[hit]
            on = (value >= 0) & ~hit
            todo, slot = todo[on], slot[on]
        return found

    def add(self, key0: np.ndarray, key1: np.ndarray, values: np.ndarray) -> None:
        """Insert keys that are distinct and absent, with their values (distinct, >= 0)."""
        needed = self._bits
        while 4 * (self.count + key0.size) > 1 << needed:   # a quarter full at most
            needed += 1
        if needed > self._bits:  # grow: insert everything again in a larger table
            kept = self._value >= 0
            old = self._key0[kept], self._key1[kept], self._value[kept]
            self._reset(needed)
            self.add(*old)
        mask = (1 << self._bits) - 1
        slot = self._home(key0, key1)
        todo = np.arange(key0.size)
        while todo.size:
            empty = self._value[slot] < 0
            claim, where = todo[empty], slot[empty]
            self._value[where] = values[claim]          # several claims on one slot: one lands
            won = self._value[where] == values[claim]
            self._key0[where[won]], self._key1[where[won]] = key0[claim[won]], key1[claim[won]]
            self.count += int(won.sum())
            lost = np.ones(todo.size, dtype=bool)       # the others try the next slot
            lost[np.flatnonzero(empty)[won]] = False
            todo, slot = todo[lost], (slot[lost] + 1) & mask


def first_equal(key0: np.ndarray, key1: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(first, exact)``: for each key pair, the index of a pair equal to it (the same index for
    all equal pairs: sorting by :func:`mix` brings them together, the smallest index of each run
    of equal hashes is taken), and whether that pair is really equal; where it is not (two pairs
    with one hash: about one chance in 2**64 per pair), ``first`` is the pair itself.

    >>> first_equal(np.array([5, 7, 5], dtype=np.uint64), np.array([1, 1, 1], dtype=np.uint64))[0].tolist()
    [0, 1, 0]
    """
    n = key0.size
    if not n:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=bool)
    hashes = mix(key0, key1)
    order = np.argsort(hashes)
    run = np.flatnonzero(np.concatenate(([True], hashes[order][1:] != hashes[order][:-1])))  # starts of runs
    first = np.empty(n, dtype=np.int64)
    first[order] = np.repeat(np.minimum.reduceat(order, run), np.diff(run, append=n))
    exact = (key0[first] == key0) & (key1[first] == key1)
    first[~exact] = np.flatnonzero(~exact)
    return first, exact


class WordCache:
    """Words (as :func:`word_keys`) -> their token ids, all ids end to end in one array.

    A word's value in the :class:`KeyTable` is where its ids start in ``ids``, times 64, plus
    how many there are (a word of at most 15 bytes has at most 15 tokens), so one lookup
    gives both. The cache starts with, and is cleared back to, the ``base`` words
    (``key0``, ``key1``, one id each): the tokens that are a word of their own (" the",
    " and"), as the chunk cache starts with the vocabulary. ``ids`` is replaced, never
    changed in place, so an array taken before :meth:`add` keeps what the spans taken with
    it point at.
    """

    def __init__(self, base: tuple[np.ndarray, np.ndarray, np.ndarray], limit: int = WORD_LIMIT) -> None:
        self.limit = limit          # words kept besides the base
        self._base = base
        self.clear()

    def clear(self) -> None:
        self._table = KeyTable()
        self.ids = np.empty(0, dtype=np.uint32)
        key0, key1, ids = self._base
        self._add(key0, key1, ids, np.arange(key0.size), np.ones(key0.size, dtype=np.int64))

    def __len__(self) -> int:
        return self._table.count

    def added(self) -> int:
        """How many words were added since the cache was (re)filled with the base."""
        return len(self) - self._base[0].size

    def find(self, key0: np.ndarray, key1: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(found, start, count): found[i] says whether word i is cached; its ids are then
        ``self.ids[start[i] : start[i] + count[i]]`` (start and count mean nothing elsewhere)."""
        value = self._table.find(key0, key1)
        return value >= 0, value >> 6, value & 63

    def add(self, key0, key1, ids: np.ndarray, start: np.ndarray, count: np.ndarray) -> None:
        """Cache new distinct words: word i's ids are ``ids[start[i] : start[i] + count[i]]``.
        When that makes more than ``limit`` words besides the base, the cache is cleared back
        to the base first; more than ``limit`` new words at once are not cached at all (and the
        cache is left as it is)."""
        if self.added() + key0.size > self.limit:
            if key0.size > self.limit:
                return
            self.clear()
        self._add(key0, key1, ids, start, count)

    def _add(self, key0, key1, ids, start, count) -> None:
        where = self.ids.size + np.cumsum(count) - count                   # their starts in self.ids
        self._table.add(key0, key1, where << 6 | count)
        self.ids = np.concatenate((self.ids, gather(ids, start, count).astype(self.ids.dtype)))


def gather(source: np.ndarray, start: np.ndarray, count: np.ndarray) -> np.ndarray:
    """``concatenate([source[s : s + c] for s, c in zip(start, count)])`` without the loop.

    >>> gather(np.arange(10), np.array([7, 0, 5]), np.array([2, 1, 0])).tolist()
    [7, 8, 0]
    """
    total = int(count.sum())
    begins = np.cumsum(count) - count                      # where each span begins in the output
    return source[np.repeat(start - begins, count) + np.arange(total)]
