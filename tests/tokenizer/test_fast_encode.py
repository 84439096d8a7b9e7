"""The fast encode paths against the readable ones: the merge loop run on many chunks at once
(``_bpe_many``) against the one-chunk merge loop (``_bpe``), and first-call encodes against it."""

import random
from array import array

import pytest

from minillm.tokenizer import BPETokenizer
from minillm.tokenizer.bpe import ID_TYPECODE

from tokenizer_helpers import shared_file


def _loop(tok, chunks):
    return [array(ID_TYPECODE, tok._bpe(c)).tobytes() for c in chunks]


@pytest.fixture(scope="module")
def repeats():
    """Merges of equal neighbours: "aa", "aaaa", "bb", so overlapping pairs occur in runs."""
    return BPETokenizer.train("aaaa bb aaaaaaa bbb " * 20 + "ab ba aab", vocab_size=262, progress=False)


def test_runs_of_one_pair_merge_leftmost_first(repeats):
    chunks = ["a" * n for n in range(1, 12)] + ["b" * n for n in range(1, 8)] + ["abab", "baaab", " aaa"]
    assert repeats._bpe_many(chunks) == _loop(repeats, chunks)


def test_many_chunks_equal_the_loop_on_random_words(repeats):
    rng = random.Random(0)
    trained = BPETokenizer.train(shared_file("the-verdict.txt").read_text(encoding="utf-8"), vocab_size=600,
                                 progress=False)
    for tok, alphabet in ((repeats, "ab "), (trained, "etaoinshrdlu ,.'\né")):
        chunks = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 14))) for _ in range(3000)]
        assert tok._bpe_many(chunks) == _loop(tok, chunks)


def test_gpt2_many_chunks_equal_the_loop_on_a_corpus(gpt2):
    text = shared_file("tinyshakespeare.txt").read_text(encoding="utf-8")
    chunks = sorted(set(gpt2._split(text)))
    assert gpt2._bpe_many(chunks) == _loop(gpt2, chunks)


def test_first_call_encode_equals_the_loop_chunk_by_chunk(gpt2_dir):
    text = shared_file("the-verdict.txt").read_text(encoding="utf-8") + " naïve café — 1234567 \t\n  x"
    fresh = BPETokenizer.from_gpt2_files(gpt2_dir / "encoder.json", gpt2_dir / "vocab.bpe")
    expected = [i for chunk in fresh._split(text) for i in fresh._bpe(chunk)]
    assert fresh.encode(text) == expected
    assert fresh.encode(text) == expected       # and again, from the cache
