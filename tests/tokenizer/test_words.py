"""The word-by-word encode (words.py) against independent references: the published GPT-2 pattern
run by ``regex`` and the one-chunk merge loop (``_bpe``), for first-call and warm encodes."""

import itertools
import random

import numpy as np
import pytest
import regex
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenizer_helpers import shared_file
from minillm.tokenizer import GPT2_PATTERN, BPETokenizer, bpe, words
from minillm.tokenizer.words import KeyTable, first_equal, word_keys, word_starts

ADVERSARIAL = [
    "Hello world", " leading space", "trailing space ", "trailing spaces   ", "\n\nnew paragraphs\n\n\nend",
    "a  b   c    d", "tabs\tand\t\tmixed \t \n spaces\x0b\x0cform feed", "\r\nwindows\r\nlines\r\n\r\n",
    "don't I'll we've you're she's 'S 'LL ''s 'd's", "digits 1234567890 3.14 1,000,000 ²³ ٣٤ ½",
    "unicode naïve café 日本語 e\u0301 Ελληνικά", "emoji 👍🏽👩\u200d👩\u200d👧 🎉🎉 x😀y",
    "nbsp\xa0here \u3000ideographic\u2028line\u2029para \u202fnarrow \u205fmath \u1680ogham",
    "\x85next line \x1c\x1d\x1e\x1f separators", "nul\x00in\x00text \x00", " " + "a" * 14, " " + "a" * 15,
    "é" * 7 + "e", "é" * 8, "\n" + " " * 20 + "indented", "https://example.com/a/very/long/path?query=1&x=2",
    "x" * 100, "   \n ", " ", "a", "'", "  '", "\t\t'll", "!!! ??? ... ---", "____init____", "a\u0300\u0301\u0302",
]


def reference(tok, text):
    """The published pattern's chunks, each through the one-chunk merge loop."""
    chunks = regex.findall(GPT2_PATTERN, text)
    ids = {c: tok._bpe(c) for c in set(chunks)}
    return [i for c in chunks for i in ids[c]]


def emptied(tok):
    """``tok`` with empty caches, as after loading (the chunk and word caches start from the vocabulary)."""
    tok._cache = dict(tok._whole_tokens)
    tok._words.clear()
    return tok


@pytest.fixture
def every_length(monkeypatch):
    """Texts of any length go word by word (not only from bpe._WORDS_MIN_CHARS characters)."""
    monkeypatch.setattr(bpe, "_WORDS_MIN_CHARS", 0)


def test_whitespace_table_is_regex_whitespace_over_all_code_points():
    every = "".join(chr(c) for c in range(0x110000) if not 0xD800 <= c < 0xE000)
    spaces = {ord(c) for c in regex.findall(r"\s", every)}
    assert spaces == set(np.flatnonzero(words._IS_SPACE).tolist())
    assert max(spaces) <= words._LAST_SPACE and not words._IS_SPACE[-1]
    for c in map(chr, range(128)):                    # the ASCII path's mask, and the general one
        space = regex.match(r"\s", c) is not None
        assert word_starts("x" + c + "x", ("x" + c + "x").encode()).tolist() == ([0, 1] if space else [0])
        assert word_starts("é" + c + "x", ("é" + c + "x").encode()).tolist() == ([0, 2] if space else [0])


def _words_of(text):
    data = text.encode("utf-8")
    starts = word_starts(text, data).tolist() + [len(data)]
    return [data[a:b].decode("utf-8") for a, b in zip(starts, starts[1:])]


CLASSES = [" ", "\n", "\t", "\xa0", "\x1c", "\x00", "a", "s", "é", "1", "٣", ".", "'", "😀"]


def test_words_and_the_premise_on_every_short_string():
    """Every string of up to 4 characters from one representative per character class: the words are
    those of an independent regex, and the text's chunks are its words' chunks, word after word."""
    pattern, cut = regex.compile(GPT2_PATTERN), regex.compile(r"\s*\S+|\s+")
    for n in range(1, 5):
        for chars in itertools.product(CLASSES, repeat=n):
            text = "".join(chars)
            pieces = _words_of(text)
            assert pieces == cut.findall(text), text
            assert pattern.findall(text) == [c for w in pieces for c in pattern.findall(w)], text


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80) | st.text(alphabet="".join(CLASSES) + "\r\x0b\x85\u3000\u2028'dtlmvreA_-!,", max_size=80))
def test_premise_on_random_text(text):
    pieces = _words_of(text)
    assert "".join(pieces) == text
    assert regex.findall(GPT2_PATTERN, text) == [c for w in pieces for c in regex.findall(GPT2_PATTERN, w)]


def test_word_keys_are_the_bytes_and_the_length():
    text = "ab  cdefghijklmno\n" + "é" * 7 + " z"
    data = text.encode()
    starts = word_starts(text, data)
    lengths = np.diff(starts, append=len(data))
    key0, key1 = word_keys(data, starts, lengths)
    for s, n, k0, k1 in zip(starts.tolist(), lengths.tolist(), key0.tolist(), key1.tolist()):
        if n <= words.MAX_WORD_BYTES:
            word = data[s : s + n] + bytes(16 - n)
            assert k0 == int.from_bytes(word[:8], "little")
            assert k1 == int.from_bytes(word[8:15], "little") | n << 56


def test_gpt2_adversarial_strings_first_call_and_warm(gpt2, every_length):
    tok = emptied(gpt2)
    for text in ADVERSARIAL + ["", "".join(ADVERSARIAL) * 3]:
        expected = reference(tok, text)
        assert tok.encode(text) == expected, text
        assert tok.encode(text) == expected, text
    shuffled = ADVERSARIAL[:]
    random.Random(0).shuffle(shuffled)
    text = " | ".join(shuffled)
    assert emptied(tok).encode(text) == reference(tok, text)


@pytest.mark.parametrize("name", ["tinyshakespeare.txt", "the-verdict.txt"])
def test_gpt2_corpus_first_call_and_warm(gpt2, name):
    text = shared_file(name).read_text(encoding="utf-8")
    tok = emptied(gpt2)
    expected = reference(tok, text)
    assert tok.encode(text) == expected
    assert tok.encode(text) == expected
    assert np.frombuffer(tok._encode_packed(text), dtype=bpe.ID_TYPECODE_NUMPY).tolist() == expected


@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from(ADVERSARIAL + CLASSES), max_size=12).map("".join) | st.text(max_size=60))
def test_gpt2_random_text_first_call_and_warm(gpt2, text):
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(bpe, "_WORDS_MIN_CHARS", 0)
        tok = emptied(gpt2)
        expected = reference(tok, text)
        assert tok.encode(text) == expected
        assert tok.encode(text) == expected


def test_trained_tokenizer_word_by_word(every_length):
    text = shared_file("the-verdict.txt").read_text(encoding="utf-8")
    tok = BPETokenizer.train(text, vocab_size=500, progress=False)
    assert tok._words is not None
    extra = "".join(ADVERSARIAL)
    for t in (text, extra, text + extra):
        assert tok.encode(t) == reference(tok, t)


def test_other_patterns_keep_the_chunk_path():
    tok = BPETokenizer.train("some text to learn from " * 20, vocab_size=270, pattern="gpt4", progress=False)
    assert tok._words is None


def test_the_cache_holds_words_so_a_new_text_of_known_words_needs_no_merging(gpt2, every_length, monkeypatch):
    text = shared_file("the-verdict.txt").read_text(encoding="utf-8")
    tok = emptied(gpt2)
    tok.encode(text)
    pieces = _words_of(text)[1:-1]                           # each: whitespace, then non-whitespace
    random.Random(1).shuffle(pieces)
    other = "".join(pieces)
    assert other != text
    expected = reference(tok, other)

    merged = BPETokenizer._new_word_ids

    def only_long_words(self, data, starts, lengths, key0, key1):   # never cached: chunked every time
        assert (lengths > words.MAX_WORD_BYTES).all(), "a known word was merged again"
        return merged(self, data, starts, lengths, key0, key1)

    monkeypatch.setattr(BPETokenizer, "_new_word_ids", only_long_words)
    assert tok.encode(other) == expected


def test_full_word_cache_is_cleared_and_stays_exact(gpt2, every_length, monkeypatch):
    text = shared_file("the-verdict.txt").read_text(encoding="utf-8")
    tok = emptied(gpt2)
    clears = []
    monkeypatch.setattr(tok._words, "clear", lambda: (clears.append(1), words.WordCache.clear(tok._words)))
    tok._words.limit = 600                                    # less than the text's distinct words
    try:
        pieces = [text[i : i + 3000] for i in range(0, len(text), 3000)] + [text]
        for piece in pieces + pieces:
            assert tok.encode(piece) == reference(tok, piece)
            assert 0 <= tok._words.added() <= 600
        assert len(clears) > 2
        key0, key1 = word_keys(b" the", np.array([0]), np.array([4]))
        assert tok._words.find(key0, key1)[0].all()            # the base (" the" is a token) is kept
    finally:
        tok._words.limit = words.WORD_LIMIT
        monkeypatch.undo()
        emptied(tok)


def _weak_mix(key0, key1):
    """Many different words with one hash: only the first byte counts."""
    return (key0 & np.uint64(0xFF)) * np.uint64(0x9E3779B97F4A7C15)


def test_hash_collisions_do_not_change_the_ids(gpt2, every_length, monkeypatch):
    tok = gpt2
    tok._words._base = tuple(a[:500] for a in tok._words._base)  # a small base: probing is slow with this hash
    monkeypatch.setattr(words, "mix", _weak_mix)
    emptied(tok)
    collisions = []

    def counted(key0, key1):
        first, exact = first_equal(key0, key1)
        collisions.append(int((~exact).sum()))
        return first, exact

    monkeypatch.setattr(bpe, "first_equal", counted)
    try:
        text = " ".join(ADVERSARIAL) + " the then there these the thence then"
        expected = reference(tok, text)
        assert tok.encode(text) == expected
        assert tok.encode(text) == expected
        assert collisions[0] > 10
    finally:
        monkeypatch.undo()
        tok._words._base = tok._vocabulary_words()
        emptied(tok)


@pytest.mark.parametrize("hash_function", ["mix", "weak"])
def test_key_table_against_a_dict(hash_function, monkeypatch):
    if hash_function == "weak":
        monkeypatch.setattr(words, "mix", _weak_mix)
    rng = np.random.default_rng(0)
    table, expected = KeyTable(bits=4), {}
    for batch in range(6):                                   # grows from 16 slots
        key0 = rng.integers(0, 300, size=200).astype(np.uint64)
        key1 = rng.integers(0, 3, size=200).astype(np.uint64)
        found = table.find(key0, key1)
        assert found.tolist() == [expected.get(k, -1) for k in zip(key0.tolist(), key1.tolist())]
        new = {k: None for k in zip(key0.tolist(), key1.tolist()) if k not in expected}
        if new:
            k0, k1 = (np.array(c, dtype=np.uint64) for c in zip(*new))
            values = np.arange(len(expected), len(expected) + len(new))
            table.add(k0, k1, values)
            expected.update(zip(new, values.tolist()))
        assert table.count == len(expected)


@pytest.mark.parametrize("hash_function", ["mix", "weak"])
def test_first_equal_against_a_dict(hash_function, monkeypatch):
    if hash_function == "weak":
        monkeypatch.setattr(words, "mix", _weak_mix)
    rng = np.random.default_rng(1)
    key0 = rng.integers(0, 2000, size=3000).astype(np.uint64)
    key1 = rng.integers(0, 2, size=3000).astype(np.uint64)
    first, exact = first_equal(key0, key1)
    seen = {}
    for i, k in enumerate(zip(key0.tolist(), key1.tolist())):
        j = seen.setdefault(k, i)
        if exact[i]:
            assert (key0[first[i]], key1[first[i]]) == (key0[i], key1[i])
            assert first[i] == first[j]                      # equal keys: one representative
        else:
            assert first[i] == i
    if hash_function == "mix":
        assert exact.all() and first.tolist() == [seen[k] for k in zip(key0.tolist(), key1.tolist())]
    else:
        assert not exact.all()


def test_lone_surrogate_in_a_long_text_is_a_clear_error(gpt2):
    text = "hello world " * 1000 + "\ud800 x"
    assert len(text) >= bpe._WORDS_MIN_CHARS
    with pytest.raises(ValueError, match="U\\+D800 at position 12000"):
        gpt2.encode(text)


@pytest.mark.parametrize("line_end", ["\n", "\r\n"])
def test_long_text_in_blocks_equals_the_reference(gpt2, monkeypatch, line_end):
    """Blocks cut after "\\n" between non-space characters, or before "\\r\\n" after a letter or digit (a block
    then starts with whitespace)."""
    text = (shared_file("the-verdict.txt").read_text(encoding="utf-8") + "\n".join(ADVERSARIAL) * 5).replace(
        "\n", line_end)
    monkeypatch.setattr(bpe, "_WORDS_BLOCK_CHARS", 3000)
    blocks = []
    block = BPETokenizer._encode_word_block
    monkeypatch.setattr(BPETokenizer, "_encode_word_block", lambda self, t: (blocks.append(t), block(self, t))[1])
    tok = emptied(gpt2)
    expected = reference(tok, text)
    assert tok.encode(text) == expected
    assert len(blocks) > 1 and "".join(blocks) == text
    assert tok.encode(text) == expected


def test_texts_from_5000_characters_go_word_by_word(gpt2, monkeypatch):
    # docs/tokenizer.md: GPT-2's pattern encodes texts of 5,000 characters or more word by word, shorter ones
    # chunk by chunk; both give the reference ids
    calls = []
    real = gpt2._encode_words
    monkeypatch.setattr(gpt2, "_encode_words", lambda text: calls.append(len(text)) or real(text))
    text = ("First Citizen:\nBefore we proceed any further, hear me speak. " * 100)
    for length in (4_999, 5_000):
        assert gpt2.encode(text[:length]) == reference(gpt2, text[:length])
    assert calls == [5_000]


def test_the_documented_limits():
    # docs/tokenizer.md states these sizes; a change to one of them must change the doc too
    from minillm.tokenizer import parallel, pretokenize  # noqa: PLC0415

    assert (bpe._CACHE_LIMIT, words.WORD_LIMIT, parallel.MIN_PARALLEL_CHARS, pretokenize.BLOCK_CHARS) == \
        (2 ** 19, 200_000, 2 ** 22, 2 ** 20)
