"""BPETokenizer: byte-level BPE over regex chunks (GPT-2's scheme).

Encoding a text takes three steps:

1. **Split** it into chunks with the pre-tokenization regex
   (``"Hello world"`` -> ``["Hello", " world"]``, see pretokenize.py).
2. **Whole tokens first**: a chunk whose text is itself a token (" the",
   " and", "ing", ...) is that token: one dict lookup (tiktoken's shortcut).
3. Otherwise **bytes then merges**: the chunk becomes its UTF-8 bytes, one
   token id per byte, then repeatedly the adjacent pair with the best
   (lowest) merge rank is replaced everywhere by the merged token, until no
   pair of the chunk has a rank. This is exactly GPT-2's ``encoder.py``.

Step 2 is exact, not an approximation, because every token is the BPE of
its own bytes: BPE training creates a token by merging two neighbours, and
encoding the token's bytes alone replays the merges that built it. This
holds for every tokenizer :meth:`BPETokenizer.train` makes and for GPT-2's
50,256 tokens (the tests check both, token by token, with the merge loop).

Decoding joins the bytes of the tokens and decodes UTF-8 (a cut inside a
multi-byte character gives U+FFFD, never an exception).

Worked example with the Wikipedia merges (a + a -> "aa", a + b -> "ab",
"aa" + "ab" -> "aaab"), learned from "aaabdaaabac":

>>> tok = BPETokenizer.train("aaabdaaabac", vocab_size=259, progress=False)
>>> ids = tok.encode("aaabdaaabac")
>>> ids, [tok.decode([i]) for i in ids]
([258, 100, 258, 97, 99], ['aaab', 'd', 'aaab', 'a', 'c'])

Why it is fast in pure Python: ``_cache`` maps chunk text -> its ids,
packed as 4-byte unsigned ints (``array("I")``). It starts as the
vocabulary itself (every token's text -> its id: step 2) and keeps the
merge loop's result for each other distinct chunk (most chunks repeat:
" the", ",", "\\n"). So encoding a text is one regex ``findall``, one
dict lookup per chunk, one ``b"".join`` and one ``array.tolist()``, all
loops in C; the merge loop runs only for chunks that are not tokens and
were never seen before (7,400 of tinyshakespeare's 298,000 chunks), and
for many such chunks at once it runs on all of them side by side in NumPy
(``_bpe_many``: ~2.4x faster than the loop chunk by chunk).

With GPT-2's pattern, a text of ``_WORDS_MIN_CHARS`` characters or more
skips even the per-chunk work: it is cut into words (whitespace, then
non-whitespace; no chunk crosses a word boundary, words.py proves it) and
every word's ids come from a cache of words, all words at once in NumPy
(``_encode_words``: ~200,000 words of tinyshakespeare, no Python object
made per word). Only the words not cached yet become strings and go the
chunk way above, once per distinct word (``_new_word_ids``).

Not handled: normalization (NFC etc.: text is encoded as given), lone
surrogates (they are not text and cannot be UTF-8: ValueError), and chunks
across special tokens (text is split at allowed special tokens first).
"""

from __future__ import annotations

import json
import os
from array import array
from collections.abc import Iterable, Sequence
from itertools import chain, islice, repeat
from pathlib import Path

import numpy as np
import regex

from .gpt2 import bytes_to_chars, chars_to_bytes, read_encoder_json, read_vocab_bpe
from .pretokenize import GPT2_PATTERN, chunk_finder, count_chunks, resolve_pattern, split_blocks
from .train import learn_merges
from .words import MAX_WORD_BYTES, KeyTable, WordCache, first_equal, gather, word_keys, word_starts

FORMAT_NAME = "minillm-bpe-tokenizer"
FORMAT_VERSION = 1
_NO_RANK = 1 << 62  # larger than any merge rank
_CACHE_LIMIT = 1 << 19  # distinct chunks kept in the encode cache
_BATCH_MIN_CHUNKS = 64  # from this many new chunks, all of them go through one NumPy merge loop
_LONG_CHUNK_CHARS = 2048  # and so does any new chunk this long: the one-chunk loop is quadratic in its length
_ONE_WORD = regex.compile(r"\s+\S+").fullmatch  # whitespace, then non-whitespace
_WORDS_MIN_CHARS = 5000  # from this many characters, GPT-2's pattern encodes word by word (words.py; below
                         # it the NumPy calls' fixed cost, ~50 us, outweighs the gain: measured crossover)
_WORDS_BLOCK_CHARS = 1 << 21  # longer texts go word by word in blocks of about this many characters
ID_TYPECODE = "I" if array("I").itemsize == 4 else "L"  # packed ids: 4-byte unsigned ints
ID_TYPECODE_NUMPY, ID_BYTES = np.dtype(np.uint32), 4      # the same, for NumPy


class TokenizerFileError(ValueError):
    """A file is not a (readable) minillm tokenizer file."""


class DisallowedSpecialToken(ValueError):
    """``encode`` met a special token's text that it was not allowed to encode (see ``allowed_special``)."""

    def __init__(self, token: str, position: int) -> None:
        self.token, self.position = token, position
        super().__init__(
            f"text contains the special token {token!r} at position {position}, which is not allowed. "
            f"Pass allowed_special={{{token!r}}} (or 'all') to encode it as a special token, or "
            f"allowed_special='none' to encode it as ordinary text.")


class BPETokenizer:
    """A byte-level BPE tokenizer: ``vocab`` + ranked ``merges`` + ``pattern``.

    Build one with :meth:`train`, :meth:`load`, :meth:`from_gpt2_files` or
    :meth:`bytes`; the constructor is the low-level form they share:

    - ``vocab``: id -> bytes of every ordinary token; it must contain the 256
      single bytes, and no two tokens may have the same bytes.
    - ``merges``: (left_id, right_id) pairs, highest priority first; the
      merged token is the one whose bytes are left + right.
    - ``pattern``: the pre-tokenization regex (None: the whole text is one
      chunk, fine without merges, i.e. for the bytes tokenizer).
    Every token must be the BPE of its own bytes (see the module docstring;
    true of trained tokenizers and GPT-2's). A hand-made vocabulary that
    breaks this would encode such a token's text as the token.
    - ``special_tokens``: e.g. {"<|endoftext|>": 50256}; never produced by
      merges, only by :meth:`encode` when allowed.
    """

    def __init__(
        self,
        vocab: dict[int, bytes],
        merges: Sequence[tuple[int, int]],
        pattern: str | None = GPT2_PATTERN,
        special_tokens: dict[str, int] | None = None,
    ) -> None:
        special_tokens = dict(special_tokens or {})
        _check_vocab(vocab, special_tokens)
        self._vocab = dict(sorted(vocab.items()))
        self._bytes_to_id = {b: i for i, b in self._vocab.items()}
        self._byte_ids = [self._bytes_to_id[bytes([b])] for b in range(256)]
        self._bytes_are_ids = self._byte_ids == list(range(256))
        # bytes -> ids in C with bytes.translate (GPT-2 permutes ids 0-255)
        self._byte_table = bytes(self._byte_ids) if sorted(self._byte_ids) == list(range(256)) else None
        self.pattern = pattern
        self._split = chunk_finder(pattern) if pattern is not None else None
        self.special_tokens = special_tokens

        # merges -> rank lookups for the encode loop
        self._merges: list[tuple[int, int]] = []
        self._ranks: dict[tuple[int, int], int] = {}
        self._merged_ids: list[int] = []
        for rank, (a, b) in enumerate(merges):
            if a not in self._vocab or b not in self._vocab:
                raise ValueError(f"merge {rank} ({a}, {b}) uses an id that is not in the vocabulary")
            new = self._bytes_to_id.get(self._vocab[a] + self._vocab[b])
            if new is None:
                raise ValueError(
                    f"merge {rank} ({a}, {b}) makes {self._vocab[a] + self._vocab[b]!r}, "
                    "which is not in the vocabulary"
                )
            self._merges.append((a, b))
            self._ranks.setdefault((a, b), rank)
            self._merged_ids.append(new)

        # the same ranks in a NumPy hash table, for the merge loop that runs on many chunks at
        # once (_bpe_many): pair (a, b) -> rank, for all pairs of a round in one lookup
        pairs = np.array(list(self._ranks), dtype=np.uint64).reshape(-1, 2)
        self._pair_table = KeyTable()
        self._pair_table.add(pairs[:, 0].copy(), pairs[:, 1].copy(),
                             np.fromiter(self._ranks.values(), dtype=np.int64, count=len(self._ranks)))
        self._merged_id_array = np.array(self._merged_ids, dtype=np.int64)
        self._byte_id_array = np.array(self._byte_ids, dtype=np.int64)
        self._byte_pair_ranks = np.full((256, 256), _NO_RANK, dtype=np.int64)   # [byte x, byte y] -> rank
        for (a, b), rank in self._ranks.items():
            if len(self._vocab[a]) == 1 and len(self._vocab[b]) == 1:
                self._byte_pair_ranks[self._vocab[a][0], self._vocab[b][0]] = rank

        size = max(chain(self._vocab, special_tokens.values())) + 1
        self._id_to_bytes: list[bytes | None] = [None] * size
        for i, b in self._vocab.items():
            self._id_to_bytes[i] = b
        for s, i in special_tokens.items():
            self._id_to_bytes[i] = s.encode("utf-8")
        # the vocabulary by text (tokens that are whole UTF-8 characters): the
        # starting content of the chunk cache, restored when it is cleared
        self._whole_tokens: dict[str, bytes] = {}
        for i, b in self._vocab.items():
            try:
                self._whole_tokens[b.decode("utf-8")] = array(ID_TYPECODE, [i]).tobytes()
            except UnicodeDecodeError:  # part of a character: never a whole chunk
                pass
        self._cache: dict[str, bytes] = dict(self._whole_tokens)  # chunk -> packed ids
        self._words = WordCache(self._vocabulary_words()) if pattern == GPT2_PATTERN else None  # words.py
        self._special_regexes: dict[frozenset[str], regex.Pattern] = {}

    def _vocabulary_words(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The tokens that are a word of their own (whitespace, then non-whitespace, one chunk:
        " the", "\n\n#"), as (key0, key1, id) arrays: the word cache's starting content."""
        words = [t for t in self._whole_tokens if len(t.encode("utf-8")) <= MAX_WORD_BYTES and _ONE_WORD(t)]
        one_chunk = set(self._split("".join(words)))           # words end to end: a text of these words
        words = [w for w in words if w in one_chunk]
        text = "".join(words)
        data = text.encode("utf-8")
        starts = word_starts(text, data) if data else np.zeros(0, dtype=np.int64)
        key0, key1 = word_keys(data, starts, np.diff(starts, append=len(data)))
        return key0, key1, np.frombuffer(b"".join(map(self._whole_tokens.__getitem__, words)), dtype=ID_TYPECODE_NUMPY)

    # ------------------------------------------------------------ building

    @classmethod
    def train(
        cls,
        text_or_iterable: str | Iterable[str],
        vocab_size: int,
        pattern: str = "gpt2",
        special_tokens: Iterable[str] = (),
        progress: bool = True,
    ) -> BPETokenizer:
        """Learn a tokenizer of ``vocab_size`` tokens from text.

        ``text_or_iterable``: one string, or an iterable of strings
        (documents, lines, or blocks from
        :func:`~minillm.tokenizer.iter_text_files`) that is read once, one
        item at a time: the corpus is never held in memory whole, only the
        count of each distinct chunk. ``pattern``: "gpt2", "gpt4" or a regex.
        ``vocab_size`` counts everything: 256 bytes + merges + special tokens
        (special tokens take the last ids). See train.py for the algorithm
        and its tie-breaking rule.
        """
        special_tokens = _special_token_list(special_tokens)
        n_ordinary = vocab_size - len(special_tokens)
        if n_ordinary < 256:
            raise ValueError(
                f"vocab_size={vocab_size} leaves {n_ordinary} ordinary tokens; "
                "at least 256 (the byte alphabet) are needed"
            )
        source = resolve_pattern(pattern)
        counts = count_chunks(text_or_iterable, source, progress=progress)
        try:
            merges, vocab = learn_merges(counts, n_ordinary, progress=progress)
        except UnicodeEncodeError as error:  # a chunk with a lone surrogate
            raise ValueError(f"training text: {_surrogate_error(error.object, in_chunk=True)}") from None
        del counts
        first_special = len(vocab)
        specials = {s: first_special + k for k, s in enumerate(special_tokens)}
        return cls(vocab, [(a, b) for a, b, _ in merges], source, specials)

    @classmethod
    def bytes(cls, special_tokens: Iterable[str] = ()) -> BPETokenizer:
        """The 256-token byte tokenizer (no merges): id = byte value.

        For character-level runs: ``encode("hé") == [104, 195, 169]``.
        Special tokens, if any, get ids 256, 257, ...
        """
        specials = {s: 256 + k for k, s in enumerate(_special_token_list(special_tokens))}
        return cls({i: bytes([i]) for i in range(256)}, [], None, specials)

    @classmethod
    def from_gpt2_files(cls, encoder_json: str | os.PathLike, vocab_bpe: str | os.PathLike) -> BPETokenizer:
        """GPT-2's own tokenizer from its published ``encoder.json`` and
        ``vocab.bpe``: same ids, token for token; ``<|endoftext|>`` = 50256.

        The two files must agree as GPT-2's do: every merge joins two tokens
        of encoder.json into a third, and every token longer than one byte is
        made by a merge. A vocab.bpe cut short at a line end still parses, so
        this last check is what catches it (the tokens of its lost merges
        could never be produced: a different tokenizer, silently).
        """
        tokens, specials = read_encoder_json(encoder_json)
        vocab = {i: b for b, i in tokens.items()}
        merges, made = [], set()
        for lineno, (left, right) in enumerate(read_vocab_bpe(vocab_bpe), start=2):
            if left not in tokens or right not in tokens:
                raise ValueError(f"{vocab_bpe}:{lineno}: merge uses a token missing from {encoder_json}")
            if left + right not in tokens:
                raise ValueError(f"{vocab_bpe}:{lineno}: merge {bytes_to_chars(left)} {bytes_to_chars(right)} makes "
                                 f"{bytes_to_chars(left + right)}, which {encoder_json} lacks (are the two files "
                                 f"from different tokenizers?)")
            merges.append((tokens[left], tokens[right]))
            made.add(left + right)
        unmade = sorted((b for b in tokens if len(b) > 1 and b not in made), key=tokens.__getitem__)
        if unmade:
            examples = ", ".join(bytes_to_chars(b) for b in unmade[:3])
            raise ValueError(f"{encoder_json} has {len(unmade)} multi-byte token(s) that no merge of {vocab_bpe} makes "
                             f"(e.g. {examples}): {vocab_bpe} is truncated ({len(merges)} merges), or the two files "
                             f"belong to different tokenizers")
        return cls(vocab, merges, GPT2_PATTERN, specials)

    @classmethod
    def from_hf(cls, tokenizer_json: str | os.PathLike) -> BPETokenizer:
        """A Hugging Face byte-level BPE ``tokenizer.json`` (GPT-2, Llama 3, Qwen): ``encode(text,
        allowed_special="all")`` gives the ``tokenizers`` library's ids, token for token (see hf.py)."""
        from .hf import read_tokenizer_json  # noqa: PLC0415 (hf builds on this module)

        return read_tokenizer_json(tokenizer_json)

    # ------------------------------------------------------------ encoding

    @property
    def vocab_size(self) -> int:
        """One more than the largest id (ordinary and special tokens)."""
        return len(self._id_to_bytes)

    @property
    def vocab(self) -> dict[int, bytes]:
        """id -> bytes of the ordinary tokens (a copy)."""
        return dict(self._vocab)

    @property
    def merges(self) -> list[tuple[int, int]]:
        """The merges as (left_id, right_id), highest priority first (a copy)."""
        return list(self._merges)

    def _bpe(self, chunk: str) -> list[int]:
        """The token ids of one chunk: bytes, then lowest-rank merges first.

        ``ranks`` holds the rank of each adjacent pair and is patched around
        each merge (only the two neighbouring pairs change), instead of
        recomputing every pair after every merge. The merged pair's new
        neighbours cannot have its rank, so once the leftmost occurrence is
        merged the next ``index`` finds the next non-overlapping one.

        >>> tok = BPETokenizer.train("aaabdaaabac", 259, progress=False)
        >>> tok._bpe("aaab")   # a a a b -> aa a b -> aa ab -> aaab
        [258]
        """
        data = chunk.encode("utf-8")  # UnicodeEncodeError on a lone surrogate
        if self._byte_table is not None:
            ids = list(data.translate(self._byte_table))
        else:
            ids = [self._byte_ids[b] for b in data]
        if len(ids) < 2:
            return ids
        rank_of, merged_ids, no_rank = self._ranks.get, self._merged_ids, _NO_RANK  # locals: faster
        ranks = list(map(rank_of, zip(ids, islice(ids, 1, None)), repeat(no_rank)))  # ranks[i]: pair (i, i+1)
        while True:
            rank = min(ranks)
            if rank == no_rank:
                return ids
            new = merged_ids[rank]
            i = ranks.index(rank)
            while True:  # every occurrence, left to right, as GPT-2 does
                ids[i] = new
                del ids[i + 1], ranks[i]
                if i > 0:
                    ranks[i - 1] = rank_of((ids[i - 1], new), no_rank)
                if i < len(ranks):
                    ranks[i] = rank_of((new, ids[i + 1]), no_rank)
                if rank not in ranks:
                    break
                i = ranks.index(rank, i)
            if not ranks:
                return ids

    def _bpe_many(self, chunks: Sequence[str]) -> list[bytes]:
        """``_bpe`` of many chunks at once, each result packed as ``array(ID_TYPECODE)`` bytes.

        The same merges, run on all chunks side by side with NumPy instead of one
        chunk at a time in Python: the chunks' ids lie end to end in one array
        (``word`` tells which chunk each position belongs to) and each round makes,
        in every chunk that still has a ranked pair, the merge ``_bpe`` would make
        next: its lowest-ranked pair, at every (non-overlapping, leftmost first)
        occurrence. A chunk with no ranked pair left is set aside; rounds go on
        until none is left, at most the longest chunk's length. Exactly
        ``_bpe``'s result for each chunk (tested): what a chunk's merges are
        depends on that chunk alone.

        >>> tok = BPETokenizer.train("aaabdaaabac", 259, progress=False)
        >>> [array(ID_TYPECODE, b).tolist() for b in tok._bpe_many(["aaab", "ac", "a"])]
        [[258], [97, 99], [97]]
        """
        encoded = list(map(str.encode, chunks))        # UTF-8; UnicodeEncodeError on a lone surrogate
        lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
        word = np.repeat(np.arange(len(chunks)), lengths)                            # (N,) chunk of each id
        # the first round's pairs are all pairs of bytes: looked up in a 256 x 256 table
        data = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        rank = np.full(data.size, _NO_RANK, dtype=np.int64)                          # (N,) rank of (j, j + 1)
        rank[:-1] = np.where(word[:-1] == word[1:], self._byte_pair_ranks[data[:-1], data[1:]], _NO_RANK)
        ids = self._byte_id_array[data]                                              # (N,) all chunks' ids
        done_ids, done_word = [], []                                                 # chunks with no merge left
        while ids.size:
            starts = np.flatnonzero(np.concatenate(([True], word[1:] != word[:-1])))   # each chunk's first id
            counts = np.diff(np.append(starts, ids.size))
            best = np.repeat(np.minimum.reduceat(rank, starts), counts)              # (N,) its chunk's next merge
            finished = best == _NO_RANK                                              # ids of finished chunks
            done_ids.append(ids[finished])
            done_word.append(word[finished])
            hit = (rank == best) & ~finished
            at = np.flatnonzero(hit)                                                 # left ids of the merges
            if np.any(at[1:] == at[:-1] + 1):   # "a a a" with merge (a, a): only the 1st, 3rd, ... of a run
                run_start = np.concatenate(([True], at[1:] != at[:-1] + 1))
                first = np.maximum.accumulate(np.where(run_start, np.arange(at.size), 0))
                at = at[(np.arange(at.size) - first) % 2 == 0]
            ids[at] = self._merged_id_array[rank[at]]                                # the left id becomes the merge
            keep = ~finished
            keep[at + 1] = False                                                     # the right one goes
            merged = (np.cumsum(keep) - 1)[at]                                       # where the merges are now
            ids, word, rank = ids[keep], word[keep], rank[keep]
            if not ids.size:
                break
            changed = np.concatenate((merged - 1, merged))                          # their pairs, both sides
            changed = changed[(changed >= 0) & (changed < ids.size - 1)]
            rank[changed] = self._pair_rank_array(ids, word, changed)
            rank[-1] = _NO_RANK                                                      # the last id starts no pair
        word = np.concatenate(done_word)
        order = np.argsort(word, kind="stable")                                      # chunk by chunk, ids in order
        packed = np.concatenate(done_ids)[order].astype(ID_TYPECODE_NUMPY).tobytes()
        ends = np.cumsum(np.bincount(word, minlength=len(chunks)) * ID_BYTES).tolist()
        return [packed[start:end] for start, end in zip([0] + ends[:-1], ends)]

    def _pair_rank_array(self, ids, word, at):
        """Ranks of the pairs (ids[j], ids[j + 1]) for j in ``at`` (no rank across chunks)."""
        rank = self._pair_table.find(ids[at].astype(np.uint64), ids[at + 1].astype(np.uint64))
        return np.where((rank >= 0) & (word[at] == word[at + 1]), rank, _NO_RANK)

    def encode_ordinary(self, text: str) -> list[int]:
        """Token ids of ``text``, special-token strings included as plain text."""
        _check_text(text)
        if self._split is None:
            try:
                if self._bytes_are_ids and not self._merges:
                    return list(text.encode("utf-8"))
                if len(text) >= _LONG_CHUNK_CHARS:
                    return array(ID_TYPECODE, self._bpe_many([text])[0]).tolist()
                return self._bpe(text)
            except UnicodeEncodeError:
                raise _surrogate_error(text) from None
        if self._words is not None and len(text) >= _WORDS_MIN_CHARS:
            try:
                return self._encode_words(text).tolist()
            except UnicodeEncodeError:
                raise _surrogate_error(text) from None
        return array(ID_TYPECODE, self._encode_packed(text)).tolist()

    def _encode_packed(self, text: str) -> bytes:
        """encode_ordinary's ids packed as ``array(ID_TYPECODE)`` bytes (needs a pattern)."""
        try:
            if self._words is not None and len(text) >= _WORDS_MIN_CHARS:
                return self._encode_words(text).tobytes()
            chunks = self._split(text)
            try:  # the common case: every chunk is a token or was seen before
                return b"".join(map(self._cache.__getitem__, chunks))
            except KeyError:
                return b"".join(map(self._chunk_lookup(chunks).__getitem__, chunks))
        except UnicodeEncodeError:
            raise _surrogate_error(text) from None

    def _chunk_lookup(self, chunks: Sequence[str]) -> dict[str, bytes]:
        """A dict with every one of ``chunks`` -> its packed ids: the chunk cache, once the
        chunks it lacks are merged (all at once by ``_bpe_many`` when there are many) and added
        (a full cache is cleared to the vocabulary first; the new chunks are then returned
        beside it)."""
        cache = self._cache
        new_chunks = list(set(chunks).difference(cache))
        if not new_chunks:
            return cache
        if len(new_chunks) >= _BATCH_MIN_CHUNKS:
            fresh = dict(zip(new_chunks, self._bpe_many(new_chunks)))
        else:
            fresh = {c: array(ID_TYPECODE, self._bpe(c)).tobytes() for c in new_chunks if len(c) < _LONG_CHUNK_CHARS}
            if len(fresh) < len(new_chunks):
                long = [c for c in new_chunks if len(c) >= _LONG_CHUNK_CHARS]
                fresh.update(zip(long, self._bpe_many(long)))
        lookup = cache
        if len(cache) + len(fresh) > _CACHE_LIMIT:  # full: forget merge results, keep the vocabulary
            lookup = {**cache, **fresh}
            cache.clear()
            cache.update(self._whole_tokens)
            if len(cache) + len(fresh) > _CACHE_LIMIT:
                fresh = {}
        cache.update(fresh)
        return lookup

    def _encode_words(self, text: str) -> np.ndarray:
        """encode_ordinary's ids as a uint32 array, word by word (GPT-2's pattern; words.py
        says why that is exact). A long text goes in blocks of about ``_WORDS_BLOCK_CHARS``
        cut at safe line breaks (``split_blocks``: the blocks' chunks are the text's), so
        the arrays per call stay bounded and each block finds the words of the blocks
        before it in the cache."""
        if len(text) <= _WORDS_BLOCK_CHARS:
            return self._encode_word_block(text)
        return np.concatenate([self._encode_word_block(block) for block in split_blocks(text, _WORDS_BLOCK_CHARS)])

    def _encode_word_block(self, text: str) -> np.ndarray:
        """_encode_words for one block: each word's ids from the word cache, the words it
        lacks through ``_new_word_ids``."""
        data = text.encode("utf-8")  # UnicodeEncodeError on a lone surrogate
        if not data:
            return np.empty(0, dtype=ID_TYPECODE_NUMPY)
        starts = word_starts(text, data)                                  # (W,) byte offsets
        lengths = np.diff(starts, append=len(data))                       # (W,) bytes
        key0, key1 = word_keys(data, starts, lengths)
        source = self._words.ids                                          # taken before any add
        found, start, count = self._words.find(key0, key1)               # word i: source[start : start + count]
        missing = np.flatnonzero(~found | (lengths > MAX_WORD_BYTES))     # long words are never cached
        if missing.size:
            ids, new_start, new_count = self._new_word_ids(
                data, starts[missing], lengths[missing], key0[missing], key1[missing])
            start[missing] = source.size + new_start
            count[missing] = new_count
            source = np.concatenate((source, ids))
        return gather(source, start, count)

    def _new_word_ids(self, data: bytes, starts, lengths, key0, key1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Ids of words that are not in the word cache, as ``(ids, start, count)``: word i's are
        ``ids[start[i] : start[i] + count[i]]``. Each distinct word is chunked once, and the short
        ones are added to the word cache.

        Equal words share one representative (:func:`~.words.first_equal`; long words are each
        their own). The representatives, end to end in text order, are a text whose chunks are
        theirs (the first word of the text, the only one that can lack leading whitespace,
        stays first; a last word of whitespace only stays last): it is chunked in one
        ``findall``, its chunks get their ids from the chunk cache and ``_bpe_many``, and each
        word takes the ids of the chunks that end inside it.
        """
        n = starts.size
        short = np.flatnonzero(lengths <= MAX_WORD_BYTES)
        rep = np.arange(n)                                                # [i]: whose ids word i takes
        rep[short], exact = first_equal(key0[short], key1[short])
        rep[short] = short[rep[short]]
        cacheable = np.zeros(n, dtype=bool)                               # distinct short words
        cacheable[short] = exact
        is_rep = rep == np.arange(n)
        reps = np.flatnonzero(is_rep)                                     # (R,) in text order
        words = gather(np.frombuffer(data, dtype=np.uint8), starts[reps], lengths[reps])
        text = words.tobytes().decode("utf-8")
        chunks = self._split(text)
        lookup = self._chunk_lookup(chunks)
        packed = list(map(lookup.__getitem__, chunks))
        ids = np.frombuffer(b"".join(packed), dtype=ID_TYPECODE_NUMPY)
        chunk_end = np.cumsum(np.fromiter(map(len, chunks), dtype=np.int64, count=len(chunks)))  # in characters
        if text.isascii():
            word_chars = lengths[reps]
        else:  # characters = bytes that do not continue a character (10xxxxxx)
            starts_here = (words & 0xC0) != 0x80
            word_chars = np.add.reduceat(starts_here.astype(np.int64), np.cumsum(lengths[reps]) - lengths[reps])
        word_end = np.cumsum(word_chars)
        last = np.searchsorted(chunk_end, word_end)                       # (R,) the chunk that ends each word
        if not np.array_equal(chunk_end[np.minimum(last, chunk_end.size - 1)], word_end):
            raise AssertionError("a chunk crosses a word boundary: words.py's premise fails (a bug)")
        token_end = np.cumsum(np.fromiter(map(len, packed), dtype=np.int64, count=len(packed)) // ID_BYTES)
        rep_end = token_end[last]
        rep_start = rep_end - np.diff(rep_end, prepend=0)
        rep_count = rep_end - rep_start

        cached = np.flatnonzero(cacheable[reps])                          # (index into reps)
        self._words.add(key0[reps[cached]], key1[reps[cached]], ids, rep_start[cached], rep_count[cached])

        rank = (np.cumsum(is_rep) - 1)[rep]                               # [i]: its representative's index in reps
        return ids, rep_start[rank], rep_count[rank]

    def encode(
        self,
        text: str,
        allowed_special: str | Iterable[str] = "none_raise",
        disallowed_special: str | Iterable[str] = "all",
    ) -> list[int]:
        """Token ids of ``text``, with tiktoken's rules for special tokens.

        ``allowed_special``:

        - ``"none_raise"`` (default): no special tokens; ValueError if the
          text contains one (a user typing "<|endoftext|>" must not end
          your document);
        - ``"none"``: no special tokens; their text is encoded as ordinary
          text (same as tiktoken's ``disallowed_special=()``);
        - ``"all"``: every special token's text becomes its id;
        - a set of names: those become ids; any other special token in the
          text raises, unless ``disallowed_special=()`` (then it is text).

        >>> tok = BPETokenizer.bytes(special_tokens=["<|eot|>"])
        >>> tok.encode("a<|eot|>", allowed_special="all")
        [97, 256]
        """
        _check_text(text)
        allowed, disallowed = self._special_sets(allowed_special, disallowed_special)
        if disallowed and any(s in text for s in disallowed):  # `in` is a fast C scan
            match = self._special_regex(disallowed).search(text)
            if match:
                raise DisallowedSpecialToken(match.group(), match.start())
        if not any(s in text for s in allowed):
            return self.encode_ordinary(text)
        ids: list[int] = []
        start = 0
        try:
            for match in self._special_regex(allowed).finditer(text):
                ids.extend(self.encode_ordinary(text[start : match.start()]))
                ids.append(self.special_tokens[match.group()])
                start = match.end()
            ids.extend(self.encode_ordinary(text[start:]))
        except ValueError:  # a lone surrogate: say where it is in the whole text, not in the piece
            if regex.search("[\ud800-\udfff]", text) is None:
                raise
            raise _surrogate_error(text) from None
        return ids

    def encode_batch(
        self,
        texts: Sequence[str],
        num_workers: int | None = None,
        allowed_special: str | Iterable[str] = "none_raise",
        disallowed_special: str | Iterable[str] = "all",
    ) -> list[list[int]]:
        """``[encode(t) for t in texts]``, spread over ``num_workers``
        processes (default: one per CPU). Long texts are cut into pieces at
        safe line breaks, so even one big text is shared out; the ids are
        exactly those of :meth:`encode`. Batches under
        ``parallel.MIN_PARALLEL_CHARS`` characters run in this process, where
        starting workers would cost more than it saves (see parallel.py)."""
        from .parallel import encode_batch

        return encode_batch(self, texts, num_workers, allowed_special, disallowed_special)

    def _special_sets(self, allowed_special, disallowed_special) -> tuple[frozenset[str], frozenset[str]]:
        everything = frozenset(self.special_tokens)
        if allowed_special == "none":
            return frozenset(), frozenset()
        if allowed_special == "none_raise":
            allowed = frozenset()
        elif allowed_special == "all":
            allowed = everything
        elif isinstance(allowed_special, str):
            raise ValueError(
                f"allowed_special must be 'none_raise', 'none', 'all' or a set of special tokens, "
                f"got {allowed_special!r}"
            )
        else:
            allowed = frozenset(allowed_special)
            unknown = allowed - everything
            if unknown:
                raise ValueError(f"not special tokens of this tokenizer: {sorted(unknown)}")
        if disallowed_special == "all":
            return allowed, everything - allowed
        if isinstance(disallowed_special, str):  # would be read as a set of its characters
            raise ValueError(f"disallowed_special must be 'all' or a set of special tokens (() for none), "
                             f"got {disallowed_special!r}")
        disallowed = frozenset(disallowed_special)
        unknown = disallowed - everything
        if unknown:
            raise ValueError(f"not special tokens of this tokenizer: {sorted(unknown)} (in disallowed_special)")
        return allowed, disallowed - allowed

    def _special_regex(self, names: frozenset[str]) -> regex.Pattern:
        pattern = self._special_regexes.get(names)
        if pattern is None:  # longest first, so "<|a|>b" wins over its prefix "<|a|>"
            alternatives = sorted(names, key=lambda s: (-len(s), s))
            pattern = regex.compile("|".join(regex.escape(s) for s in alternatives))
            self._special_regexes[names] = pattern
        return pattern

    # ------------------------------------------------------------ decoding

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The bytes of the tokens, concatenated (special tokens as their text)."""
        if isinstance(ids, (str, bytes)):
            raise TypeError(f"decode takes a sequence of integer token ids, got a {type(ids).__name__}: {ids[:40]!r}")
        if hasattr(ids, "tolist"):  # a NumPy array
            if getattr(ids, "dtype", None) is not None and ids.dtype.kind not in "iu":  # a bool mask, floats
                raise ValueError(f"token ids are integers, got an array of {ids.dtype}")
            ids = ids.tolist()
        ids = list(ids)
        table = self._id_to_bytes
        try:
            if ids and min(ids) < 0:
                raise IndexError
            return b"".join(map(table.__getitem__, ids))
        except (IndexError, TypeError):
            raise ValueError(_bad_id_message(ids, table)) from None

    def decode(self, ids: Iterable[int]) -> str:
        """Text of the tokens; bytes that are not valid UTF-8 become U+FFFD.

        >>> BPETokenizer.bytes().decode([104, 195])   # "h" + half of "é"
        'h\\ufffd'
        """
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        return self.decode_bytes([token_id])

    # ------------------------------------------------------------ files

    def save(self, path: str | os.PathLike) -> None:
        """Write a human-readable JSON file (GPT-2's two files in one)::

            {"format": "minillm-bpe-tokenizer", "version": 1,
             "pattern": "...", "special_tokens": {"<|endoftext|>": 50256},
             "vocab": {"!": 0, ..., "Ġt": 256, ...},    # byte-level spelling -> id
             "merges": ["Ġ t", ...]}                   # priority order

        Tokens are spelled in GPT-2's byte-level alphabet (space is "Ġ",
        newline "Ċ"), so every token is a printable string on one line.
        """
        data = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "pattern": self.pattern,
            "special_tokens": self.special_tokens,
            "vocab": {bytes_to_chars(b): i for i, b in self._vocab.items()},
            "merges": [
                f"{bytes_to_chars(self._vocab[a])} {bytes_to_chars(self._vocab[b])}" for a, b in self._merges
            ],
        }
        text = json.dumps(data, ensure_ascii=False, indent=1)
        tmp = Path(f"{path}.tmp")
        tmp.write_text(text + "\n", encoding="utf-8")
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> BPETokenizer:
        """Read a file written by :meth:`save`; TokenizerFileError if it is
        not one (corrupt, truncated, foreign, or from a newer version)."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise TokenizerFileError(f"{path}: not a minillm tokenizer file (not valid JSON: {err})") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
            hint = ""
            if isinstance(data, dict) and "<|endoftext|>" in data:
                hint = " It looks like GPT-2's encoder.json: use BPETokenizer.from_gpt2_files or 'gpt2:DIR'."
            elif isinstance(data, dict) and "model" in data:
                hint = " It looks like a Hugging Face tokenizer.json: use BPETokenizer.from_hf."
            raise TokenizerFileError(f"{path}: not a minillm tokenizer file (no format {FORMAT_NAME!r}).{hint}")
        version = data.get("version")
        if version != FORMAT_VERSION:
            raise TokenizerFileError(
                f"{path}: tokenizer file version {version!r}; this minillm reads version {FORMAT_VERSION}"
            )
        try:
            vocab = {int(i): chars_to_bytes(s) for s, i in data["vocab"].items()}
            if len(vocab) != len(data["vocab"]):
                raise ValueError("two tokens share an id")
            to_id = {b: i for i, b in vocab.items()}
            merges = []
            for k, line in enumerate(data["merges"]):
                left, right = line.split(" ")
                merges.append((to_id[chars_to_bytes(left)], to_id[chars_to_bytes(right)]))
            specials = {str(s): int(i) for s, i in data["special_tokens"].items()}
            return cls(vocab, merges, data["pattern"], specials)
        except (KeyError, ValueError, TypeError, AttributeError) as err:
            raise TokenizerFileError(f"{path}: corrupt minillm tokenizer file ({type(err).__name__}: {err})") from None

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, BPETokenizer):
            return NotImplemented
        return (
            self._vocab == other._vocab
            and self._merges == other._merges
            and self.pattern == other.pattern
            and self.special_tokens == other.special_tokens
        )

    def __repr__(self) -> str:
        return (
            f"BPETokenizer(vocab_size={self.vocab_size}, merges={len(self._merges)}, "
            f"special_tokens={list(self.special_tokens)})"
        )

    def __getstate__(self) -> dict:
        # compiled regexes and the cache are rebuilt rather than pickled
        return {"vocab": self._vocab, "merges": self._merges, "pattern": self.pattern,
                "special_tokens": self.special_tokens}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["vocab"], state["merges"], state["pattern"], state["special_tokens"])


def _check_vocab(vocab: dict[int, bytes], special_tokens: dict[str, int]) -> None:
    if len(set(vocab.values())) != len(vocab):
        raise ValueError("two tokens of the vocabulary have the same bytes")
    values = set(vocab.values())
    missing = [b for b in range(256) if bytes([b]) not in values]
    if missing:
        raise ValueError(f"the vocabulary lacks single-byte tokens, e.g. {bytes(missing[:5])!r}")
    ids = list(vocab) + list(special_tokens.values())
    if any(not isinstance(i, int) or i < 0 for i in ids):
        raise ValueError("token ids must be non-negative integers")
    if len(set(ids)) != len(ids):
        raise ValueError("special token ids collide with each other or with the vocabulary")
    if any(not s for s in special_tokens):
        raise ValueError("a special token cannot be the empty string")


def _special_token_list(special_tokens: Iterable[str]) -> list[str]:
    """The special tokens, each once, in order; one string is refused (it would be read as its characters)."""
    if isinstance(special_tokens, str):
        raise TypeError(f"special_tokens must be a list of strings, e.g. [{special_tokens!r}], not one string "
                        f"(it would be read as {len(special_tokens)} one-character tokens)")
    return list(dict.fromkeys(special_tokens))


def _surrogate_error(text: str, in_chunk: bool = False) -> ValueError:
    match = regex.search("[\ud800-\udfff]", text)
    where = "a lone surrogate" if match is None else f"U+{ord(match.group()):04X} " + (
        f"in the chunk {text!r}" if in_chunk else f"at position {match.start()}")
    return ValueError(
        f"cannot encode {where}: a lone surrogate is not a "
        "character and has no UTF-8 bytes (was the text decoded with errors='surrogateescape' "
        "or built from UTF-16 halves?)"
    )


def _check_text(text) -> None:
    if not isinstance(text, str):
        raise TypeError(f"encode takes a str of text, got {type(text).__name__} {text!r:.40}"
                        + (" (decode turns ids into text)" if isinstance(text, (int, list, tuple)) else ""))


def _bad_id_message(ids: list, table: list) -> str:
    """Why ``ids`` cannot be decoded: the first one that is not an integer, or not in the vocabulary."""
    for i in ids:
        if isinstance(i, bool) or not hasattr(i, "__index__"):
            return f"token ids are integers, got {i!r} ({type(i).__name__})"
        if not 0 <= i < len(table) or table[i] is None:
            return f"token id {i} is not in this tokenizer's vocabulary (ids 0 to {len(table) - 1})"
    return "these token ids cannot be decoded"
