"""BPETokenizer: training, encode/decode, special tokens, save/load."""

import json
import random
import re
from collections import Counter

import pytest
import regex
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenizer_helpers import shared_file
from minillm.tokenizer import (
    GPT2_PATTERN,
    BPETokenizer,
    ByteTokenizer,
    TokenizerFileError,
    count_chunks,
    iter_text_files,
    load_tokenizer,
)
from minillm.tokenizer import bpe, parallel
from minillm.tokenizer.pretokenize import (
    GPT2_PATTERN_ASCII,
    GPT2_PATTERN_FAST,
    chunk_finder,
    compile_pattern,
    split_blocks,
)
from minillm.tokenizer.train import learn_merges

SAMPLE = (
    "The quick brown fox jumps over the lazy dog. The dog didn't care; the fox's "
    "jump was 12345 times better than yesterday's.\r\n\r\n  Indented   text\tand tabs.\n"
    "Unicode: naïve café, 日本語, emoji 👍🏽 and e\u0301 combining.\n"
) * 20


# a varied corpus that ships with every CPython: its reference documentation
CORPUS = "".join(sorted(__import__("pydoc_data.topics").topics.topics.values()))[:150_000] + SAMPLE


@pytest.fixture(scope="module")
def trained():
    return BPETokenizer.train(CORPUS, vocab_size=400, special_tokens=["<|endoftext|>", "<|pad|>"], progress=False)


@pytest.fixture(scope="module")
def trained_gpt4():
    return BPETokenizer.train(CORPUS, vocab_size=350, pattern="gpt4", progress=False)


# ------------------------------------------------------------ worked example


def test_wikipedia_example_by_hand():
    # "aaabdaaabac": pairs aa x4, ab x2, bd da ba ac x1 -> merge aa (id 256)
    # "aa a b d aa a b a c": (aa, a) x2 and (a, b) x2 tie -> smaller left id wins: ab (257)
    # "aa ab d aa ab a c": (aa, ab) x2 -> aaab (258)  -- Wikipedia's Z, Y, X = ZY
    tok = BPETokenizer.train("aaabdaaabac", vocab_size=259, progress=False)
    assert tok.merges == [(97, 97), (97, 98), (256, 257)]
    assert tok.vocab[256] == b"aa" and tok.vocab[257] == b"ab" and tok.vocab[258] == b"aaab"
    ids = tok.encode("aaabdaaabac")
    assert ids == [258, ord("d"), 258, ord("a"), ord("c")]
    assert tok.decode(ids) == "aaabdaaabac"
    # encoding new text applies merges by rank: "aab" -> aa b (aa has rank 0), not a ab
    assert tok.encode("aab") == [256, ord("b")]


def test_tie_break_is_highest_count_then_smallest_ids():
    merges, vocab = learn_merges({"ba": 3, "dc": 3, "xy": 1}, vocab_size=258)
    assert [(vocab[a], vocab[b]) for a, b, _ in merges] == [(b"b", b"a"), (b"d", b"c")]


# ------------------------------------------------------------ training


def naive_merges(chunk_counts, vocab_size):
    """Recount every pair after every merge (minbpe's basic loop), same rules."""
    words = {tuple(c.encode("utf-8")): n for c, n in chunk_counts.items()}
    vocab = {i: bytes([i]) for i in range(256)}
    to_id = {b: i for i, b in vocab.items()}
    merges = []
    while len(vocab) < vocab_size:
        counts = Counter()
        for w, n in words.items():
            for pair in zip(w, w[1:]):
                counts[pair] += n
        if not counts:
            break
        (a, b), _ = min(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        new = to_id.get(vocab[a] + vocab[b])
        if new is None:
            new = len(vocab)
            vocab[new] = vocab[a] + vocab[b]
            to_id[vocab[new]] = new
        merges.append((a, b, new))
        merged = {}
        for w, n in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and w[i] == a and w[i + 1] == b:
                    out.append(new)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            merged[tuple(out)] = merged.get(tuple(out), 0) + n
        words = merged
    return merges, vocab


@pytest.mark.parametrize("vocab_size", [300, 420])
def test_incremental_training_equals_full_recount(vocab_size):
    text = shared_file("the-verdict.txt").read_text(encoding="utf-8")
    counts = count_chunks(text)
    assert learn_merges(counts, vocab_size) == naive_merges(counts, vocab_size)


def test_incremental_training_equals_full_recount_with_duplicate_tokens():
    # "ab"+"c" and "a"+"bc" both spell "abc": the second reuses the first's id
    counts = {"abc": 5, "xbc": 4, "abz": 4, "bcq": 3, "abcab": 1}
    merges, vocab = learn_merges(counts, 270)
    assert (merges, vocab) == naive_merges(counts, 270)
    assert len(set(vocab.values())) == len(vocab)


@settings(max_examples=40, deadline=None)
@given(st.dictionaries(st.text(alphabet="aab bc\u00e9\U0001f600", min_size=1, max_size=12), st.integers(1, 9),
                       max_size=12), st.integers(256, 300))
def test_incremental_training_equals_full_recount_on_random_counts(counts, vocab_size):
    """Ties everywhere (small counts, few letters, multi-byte characters): the heap with lazy deletion picks
    exactly the pair the plain recount picks, merge after merge, duplicate tokens included."""
    assert learn_merges(counts, vocab_size) == naive_merges(counts, vocab_size)


def test_vocab_size_counts_special_tokens(trained):
    assert trained.vocab_size == 400
    assert trained.special_tokens == {"<|endoftext|>": 398, "<|pad|>": 399}
    assert len(trained.vocab) == 398


def test_streaming_sources_give_the_same_tokenizer(tmp_path):
    path = tmp_path / "sample.txt"
    path.write_text(SAMPLE, encoding="utf-8", newline="")
    whole = BPETokenizer.train(SAMPLE, 330, progress=False)
    blocks = BPETokenizer.train(split_blocks(SAMPLE, 500), 330, progress=False)
    streamed = BPETokenizer.train(iter_text_files([path], block_chars=300), 330, progress=False)
    assert whole == blocks == streamed


def test_document_order_does_not_matter():
    docs = SAMPLE.split("\n")
    shuffled = docs[:]
    random.Random(0).shuffle(shuffled)
    assert BPETokenizer.train(docs, 320, progress=False) == BPETokenizer.train(shuffled, 320, progress=False)


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet="ab \n\t\r.é", max_size=300), st.integers(1, 40))
def test_split_blocks_keeps_the_chunks(text, block_chars):
    pattern = regex.compile(GPT2_PATTERN)
    pieces = list(split_blocks(text, block_chars))
    assert "".join(pieces) == text
    assert [c for p in pieces for c in pattern.findall(p)] == pattern.findall(text)


def test_too_small_vocab_is_rejected():
    with pytest.raises(ValueError, match="at least 256"):
        BPETokenizer.train("abc", vocab_size=256, special_tokens=["<|x|>"], progress=False)


def test_training_stops_when_no_pair_is_left():
    tok = BPETokenizer.train("ab ab", vocab_size=1000, progress=False)
    assert tok.vocab_size < 1000
    assert tok.encode("ab ab") == [tok.encode("ab")[0], tok.encode(" ab")[0]]


# ------------------------------------------------------------ round trip

unicode_text = st.one_of(
    st.text(max_size=200),
    st.text(alphabet=st.characters(codec="utf-8"), max_size=100),
    st.text(alphabet="aé日本語👍🏽👨‍👩‍👧\u0301\u0308 \t\r\n\x0b\x0c\x85\u00a0\u2028\u3000'sdt09", max_size=100),
)


@settings(max_examples=200, deadline=None)
@given(unicode_text)
def test_round_trip_arbitrary_unicode(text):
    for tok in (ROUND_TRIP_TOKENIZERS["gpt2"], ROUND_TRIP_TOKENIZERS["gpt4"], ROUND_TRIP_TOKENIZERS["bytes"]):
        ids = tok.encode(text, allowed_special="none")
        assert tok.decode(ids) == text
        assert tok.decode_bytes(ids) == text.encode("utf-8")
        assert ids == tok.encode_ordinary(text)


ROUND_TRIP_TOKENIZERS = {
    "gpt2": BPETokenizer.train(CORPUS, 500, progress=False),
    "gpt4": BPETokenizer.train(CORPUS, 500, pattern="gpt4", progress=False),
    "bytes": BPETokenizer.bytes(),
}


@pytest.mark.parametrize("text, position", [("a\ud800b", 1), ("\udfff", 0), ("ok then \udc80", 8)])
def test_lone_surrogates_are_rejected_clearly(trained, text, position):
    # docs/tokenizer.md: a ValueError that names the position
    for tok in (trained, BPETokenizer.bytes()):
        with pytest.raises(ValueError, match=rf"(?s)position {position}\b.*surrogate"):
            tok.encode(text)


def test_no_unicode_normalization(trained):
    # docs/tokenizer.md: text is tokenized exactly as given: é and e + combining acute stay different
    composed, decomposed = "caf\u00e9", "cafe\u0301"
    assert trained.encode(composed) != trained.encode(decomposed)
    assert trained.decode_bytes(trained.encode(decomposed)) == decomposed.encode("utf-8")
    assert trained.decode_bytes(trained.encode(composed)) == b"caf\xc3\xa9"


def test_pre_tokenization_patterns_on_hand_worked_examples():
    """docs/tokenizer.md, section 4, worked by hand from the published patterns. GPT-2: the last space before a
    word stays with it ("a   b" -> a, two spaces, " b"), lower-case contractions only, numbers whole, each
    newline of a run before a word on its own. GPT-4: case-insensitive contractions, numbers in groups of at
    most 3 digits, punctuation glued to the newlines after it."""
    gpt2 = ["HE", "'", "LL", " pay", " 12345", ".", "\n", "\n", "x"]
    gpt4 = ["HE", "'LL", " pay", " ", "123", "45", ".\n\n", "x"]
    text = "HE'LL pay 12345.\n\nx"
    for findall in (regex.compile(GPT2_PATTERN).findall, compile_pattern("gpt2").findall, chunk_finder("gpt2")):
        assert findall(text) == gpt2
        assert findall("a   b") == ["a", "  ", " b"]
        assert findall("it's") == ["it", "'s"]
    assert compile_pattern("gpt4").findall(text) == gpt4
    assert compile_pattern("gpt4").findall("it's") == ["it", "'s"]


def test_compresses(trained):
    assert len(trained.encode_ordinary(CORPUS)) < 0.6 * len(CORPUS.encode("utf-8"))


def test_decode_invalid_utf8_gives_replacement_character():
    tok = BPETokenizer.bytes()
    assert tok.decode([0xE6, 0x97]) == "\ufffd"  # first two bytes of a 3-byte character
    assert tok.decode([104, 0xFF, 105]) == "h\ufffdi"
    assert tok.decode_bytes([0xE6, 0x97]) == b"\xe6\x97"


def test_decode_unknown_id_raises(trained):
    for bad in ([trained.vocab_size], [-1], [10**9]):
        with pytest.raises(ValueError, match="not in this tokenizer"):
            trained.decode(bad)


def test_decode_accepts_numpy_arrays(trained):
    np = pytest.importorskip("numpy")
    ids = trained.encode("hello there")
    assert trained.decode(np.array(ids, dtype=np.int64)) == "hello there"


def test_bytes_tokenizer():
    tok = ByteTokenizer(special_tokens=["<|endoftext|>"])
    assert tok.vocab_size == 257
    assert tok.encode("hé") == [104, 195, 169]
    assert tok.encode("a<|endoftext|>", allowed_special="all") == [97, 256]
    assert BPETokenizer.bytes() == load_tokenizer("bytes")


# ------------------------------------------------------------ special tokens


def test_special_tokens_follow_tiktoken(trained):
    eot, pad = 398, 399
    text = "hi<|endoftext|>there<|pad|>"
    plain = trained.encode_ordinary("hi") + [eot] + trained.encode_ordinary("there") + [pad]
    assert trained.encode(text, allowed_special="all") == plain
    with pytest.raises(ValueError, match="special token '<\\|endoftext\\|>'"):
        trained.encode(text)  # "none_raise" is the default
    assert trained.encode(text, allowed_special="none") == trained.encode_ordinary(text)
    # a set: those become ids, any other special token in the text raises ...
    with pytest.raises(ValueError, match="<\\|pad\\|>"):
        trained.encode(text, allowed_special={"<|endoftext|>"})
    # ... unless disallowed_special=() makes the others plain text
    mixed = trained.encode(text, allowed_special={"<|endoftext|>"}, disallowed_special=())
    assert mixed == trained.encode_ordinary("hi") + [eot] + trained.encode_ordinary("there<|pad|>")
    assert eot not in trained.encode_ordinary(text)
    with pytest.raises(ValueError, match="not special tokens"):
        trained.encode("x", allowed_special={"<|nope|>"})
    with pytest.raises(ValueError, match="allowed_special"):
        trained.encode("x", allowed_special="everything")


def test_text_without_specials_is_fine_with_default(trained):
    assert trained.decode(trained.encode("plain text < | > ok")) == "plain text < | > ok"


def test_encode_batch_equals_encode(trained):
    texts = [SAMPLE[i : i + 997] for i in range(0, len(SAMPLE), 997)]
    expected = [trained.encode(t) for t in texts]
    assert trained.encode_batch(texts) == expected
    assert trained.encode_batch(texts, num_workers=2) == expected
    assert trained.encode_batch([], num_workers=2) == []


def test_small_batches_stay_in_this_process(trained, monkeypatch):
    def no_pool(*args):
        raise AssertionError("a process pool was started for a small batch")

    monkeypatch.setattr(parallel.mp, "get_context", no_pool)
    assert trained.encode_batch([SAMPLE] * 3, num_workers=2) == [trained.encode(SAMPLE)] * 3


@pytest.mark.parametrize("name", ["trained", "trained_gpt4"])
def test_encode_batch_in_workers_cuts_long_texts_exactly(name, request, monkeypatch):
    tok = request.getfixturevalue(name)
    monkeypatch.setattr(parallel, "MIN_PARALLEL_CHARS", 0)  # use the pool even for this small batch
    long_text = CORPUS[:40_000]  # cut into pieces at line breaks
    shares = parallel._share_out(tok, [long_text], 4, "none_raise", "all")
    assert len(shares) == 4 and all(len(share) == 1 for share in shares)  # cut in 4 pieces
    texts = [long_text, "", "short one", SAMPLE, "x" * 9_000, CORPUS[40_000:50_000]]
    assert tok.encode_batch(texts, num_workers=2) == [tok.encode(t) for t in texts]
    assert tok.encode_batch(["", ""], num_workers=2) == [[], []]
    assert tok.encode_batch([], num_workers=2) == []


def test_encode_batch_in_workers_keeps_special_token_rules(trained, monkeypatch):
    monkeypatch.setattr(parallel, "MIN_PARALLEL_CHARS", 0)
    texts = [SAMPLE + "<|endoftext|>" + SAMPLE, SAMPLE + "<|pad|>", SAMPLE * 3]
    for allowed in ("all", "none", {"<|endoftext|>", "<|pad|>"}):
        expected = [trained.encode(t, allowed_special=allowed) for t in texts]
        assert trained.encode_batch(texts, num_workers=2, allowed_special=allowed) == expected
    with pytest.raises(ValueError, match=rf"'<\|pad\|>' at position {len(SAMPLE)},"):  # as encode says
        trained.encode_batch(texts, num_workers=2, allowed_special={"<|endoftext|>"})
    with pytest.raises(ValueError, match=rf"U\+D800 at position {len(SAMPLE) + 1}:"):
        trained.encode_batch([SAMPLE * 2, SAMPLE + "\n\ud800"], num_workers=2)


# ------------------------------------------------------------ fast paths


@pytest.mark.parametrize("name", ["trained", "trained_gpt4"])
def test_every_trained_token_is_the_bpe_of_its_own_bytes(name, request):
    """What makes the whole-token shortcut of encode exact (see bpe.py)."""
    tok = request.getfixturevalue(name)
    whole = {i: data.decode("utf-8") for i, data in tok.vocab.items() if _is_utf8(data)}
    assert len(whole) > 200  # the 128 ASCII bytes and most merged tokens
    assert all(tok._bpe(s) == [i] for i, s in whole.items())


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


@settings(max_examples=25, deadline=None)
@given(st.text(alphabet="aab  c'sé日\n", min_size=1, max_size=300), st.integers(260, 330))
def test_tokens_of_random_trainings_are_the_bpe_of_their_bytes(text, vocab_size):
    tok = BPETokenizer.train(text, vocab_size, progress=False)
    whole = {i: data.decode("utf-8") for i, data in tok.vocab.items() if _is_utf8(data)}
    assert all(tok._bpe(s) == [i] for i, s in whole.items())


@pytest.mark.parametrize("name", ["trained", "trained_gpt4"])
def test_cold_encode_equals_the_merge_loop_on_every_chunk(name, request):
    trained = request.getfixturevalue(name)
    fresh = BPETokenizer(trained.vocab, trained.merges, trained.pattern)  # empty chunk cache
    published = regex.compile(trained.pattern).findall(CORPUS)
    assert fresh.encode(CORPUS) == [i for chunk in published for i in fresh._bpe(chunk)]


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=60) | st.text(alphabet=" \t\n\r\x0b\u00a0\u3000'sdtmlvreA1²٣_-!.,é日\u0301", max_size=60))
def test_fast_gpt2_pattern_finds_the_published_chunks(text):
    assert compile_pattern("gpt2").findall(text) == regex.findall(GPT2_PATTERN, text)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(max_codepoint=127), max_size=60)
       | st.text(alphabet=" \t\n\r\x0b\x0c\x1c\x1f\x85'sdtmlvreA1_-!.,", max_size=60))
def test_ascii_gpt2_pattern_finds_the_published_chunks_in_ascii_text(text):
    if text.isascii():
        assert re.findall(GPT2_PATTERN_ASCII, text) == regex.findall(GPT2_PATTERN, text)
    assert chunk_finder("gpt2")(text) == regex.findall(GPT2_PATTERN, text)


def test_fast_gpt2_patterns_on_a_real_corpus():
    assert compile_pattern("gpt2").pattern == GPT2_PATTERN_FAST
    assert regex.findall(GPT2_PATTERN_FAST, CORPUS) == regex.findall(GPT2_PATTERN, CORPUS)
    ascii_part = "".join(c for c in CORPUS if c.isascii())
    assert len(ascii_part) > 100_000 and not CORPUS.isascii()
    assert re.findall(GPT2_PATTERN_ASCII, ascii_part) == regex.findall(GPT2_PATTERN, ascii_part)
    assert chunk_finder("gpt2")(CORPUS) == regex.findall(GPT2_PATTERN, CORPUS)


def test_full_chunk_cache_is_cleared_but_results_stay_exact(trained, monkeypatch):
    fresh = BPETokenizer(trained.vocab, trained.merges, trained.pattern)
    monkeypatch.setattr(bpe, "_CACHE_LIMIT", len(fresh._whole_tokens) + 50)
    texts = [CORPUS[k : k + 20_000] for k in range(0, len(CORPUS), 20_000)]
    assert [fresh.encode(t) for t in texts] == [trained.encode(t) for t in texts]
    assert len(fresh._cache) <= bpe._CACHE_LIMIT
    assert fresh._whole_tokens.items() <= fresh._cache.items()  # the vocabulary is kept


# ------------------------------------------------------------ save / load


@pytest.mark.parametrize("name", ["trained", "trained_gpt4"])
def test_save_load_round_trips_exactly(name, request, tmp_path):
    tok = request.getfixturevalue(name)
    path = tmp_path / "tok.json"
    tok.save(path)
    again = BPETokenizer.load(path)
    assert again == tok
    assert again.merges == tok.merges and again.vocab == tok.vocab
    assert again.pattern == tok.pattern and again.special_tokens == tok.special_tokens
    assert again.encode(SAMPLE, allowed_special="all") == tok.encode(SAMPLE, allowed_special="all")
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["format"] == "minillm-bpe-tokenizer" and data["version"] == 1
    assert load_tokenizer(path) == tok


def test_bytes_tokenizer_save_load(tmp_path):
    tok = BPETokenizer.bytes(["<|endoftext|>"])
    tok.save(tmp_path / "b.json")
    assert BPETokenizer.load(tmp_path / "b.json") == tok


def test_saved_file_is_human_readable(trained, tmp_path):
    trained.save(tmp_path / "tok.json")
    text = (tmp_path / "tok.json").read_text(encoding="utf-8")
    assert '"Ġ' in text  # spaces are spelled Ġ, as in GPT-2's files
    assert text.count("\n") > len(trained.merges)  # one entry per line


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "not valid JSON"),
        ("", "not valid JSON"),
        ('{"format": "minillm-bpe-tokenizer", "version": 99}', "version 99"),
        ('{"!": 0, "<|endoftext|>": 50256}', "from_gpt2_files"),
        ('{"version": "1.0", "model": {"type": "BPE"}, "pre_tokenizer": null}', r"Hugging Face tokenizer\.json: use "
         r"BPETokenizer\.from_hf"),
        ("[1, 2, 3]", "not a minillm tokenizer file"),
        ('{"format": "minillm-bpe-tokenizer", "version": 1}', "corrupt"),
    ],
)
def test_load_rejects_foreign_or_corrupt_files(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(TokenizerFileError, match=message):
        BPETokenizer.load(path)


def test_load_rejects_truncated_and_tampered_files(trained, tmp_path):
    path = tmp_path / "tok.json"
    trained.save(path)
    text = path.read_text(encoding="utf-8")
    (tmp_path / "cut.json").write_text(text[: len(text) // 2], encoding="utf-8")
    with pytest.raises(TokenizerFileError):
        BPETokenizer.load(tmp_path / "cut.json")
    data = json.loads(text)
    data["merges"][3] = "Ġ zzzz"
    (tmp_path / "tampered.json").write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(TokenizerFileError, match="corrupt"):
        BPETokenizer.load(tmp_path / "tampered.json")
    (tmp_path / "binary.json").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    with pytest.raises(TokenizerFileError):
        BPETokenizer.load(tmp_path / "binary.json")


def test_load_tokenizer_missing_file_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="bytes"):
        load_tokenizer(tmp_path / "nope.json")
    with pytest.raises(FileNotFoundError, match="encoder.json"):
        load_tokenizer(f"gpt2:{tmp_path}")


def test_encode_batch_with_spawned_workers(trained, monkeypatch):
    """macOS and Windows start workers with spawn: the tokenizer is pickled."""
    monkeypatch.setattr(parallel, "MIN_PARALLEL_CHARS", 0)
    monkeypatch.setattr(parallel.mp, "get_all_start_methods", lambda: ["spawn"])
    texts = [SAMPLE, SAMPLE.upper(), "<|endoftext|> as text"]
    assert trained.encode_batch(texts, num_workers=2, allowed_special="none") == [
        trained.encode(t, allowed_special="none") for t in texts
    ]
