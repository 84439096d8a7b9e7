"""Properties of the tokenizers that must hold for any text, any id sequence and any training text (Hypothesis).

The references are independent of minillm's encode: ``ReferenceGPT2`` (test_gpt2.py, GPT-2's ``encoder.py``
written out plainly: byte-level strings from its own ``bytes_to_unicode``, the merge-by-rank loop) run on
GPT-2's files, or on files in GPT-2's format written from a trained tokenizer; the decoded bytes are
joined from ``tok.vocab`` and ``tok.special_tokens`` directly; the first merge of a training is worked out
from the byte-pair counts. Examples are few (``max_examples`` 25-40, 200 for the cheap block cuts): the
whole file runs in ~6 s on 2 cores.
"""

import random
import string
import tempfile
from pathlib import Path

import pytest
import regex
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from minillm.tokenizer import BPETokenizer, DisallowedSpecialToken, bpe, iter_text_files, parallel
from minillm.tokenizer.pretokenize import resolve_pattern, split_blocks, split_even
from test_gpt2 import ReferenceGPT2
from test_gpt2_files import encoder_of, merge_lines, write
from test_words import emptied
from tokenizer_helpers import shared_file

SPECIALS = ["<|endoftext|>", "<|pad|>"]
CORPUS = "".join(sorted(__import__("pydoc_data.topics").topics.topics.values()))[:60_000] + (
    "I'm sure it's fine, WE'LL see. They've 12345 items\r\n\r\n\tnaïve café 日本語 👍🏽 e\u0301 ...!!\n") * 30
TOKENIZERS = {
    "gpt2": BPETokenizer.train(CORPUS, 420, special_tokens=SPECIALS, progress=False),
    "gpt4": BPETokenizer.train(CORPUS, 380, pattern="gpt4", special_tokens=SPECIALS, progress=False),
    "bytes": BPETokenizer.bytes(SPECIALS),
}
TRAINED = ["gpt2", "gpt4"]
FEW = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ------------------------------------------------------------ texts

PIECES = [
    "'s", "'S", "'t", "'T", "'re", "'RE", "'Re", "'ve", "'VE", "'m", "'M", "'ll", "'LL", "'lL", "'d", "'D", "'",
    "\r\n", "\r", "\n", "\n\n", "\t", " ", "   ", "\x0b", "\x0c", "\x85", "\u00a0", "\u2028", "\u3000", "\x00",
    "e\u0301", "\u0301", "\u0308\u0323", "\u200d", "👍🏽", "👨\u200d👩\u200d👧", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "𠜎𠜱", "🇫🇷",
    "1", "123", "3.14", "٣٤", "²", "Ⅻ", "!", "...", "—", "«»", "<", "|", ">", "a", "The", " the", "é", "日本", "Ω",
]
RUN_CHARS = [" ", "\t", "\n", "\r\n", "1", "0", "!", ".", "-", "a", "Z", "é", "日", "😀", "'s"]
runs = st.builds(lambda piece, n: piece * n, st.sampled_from(RUN_CHARS), st.integers(1, 150))
texts = st.one_of(
    st.just(""),
    st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=60),         # any but surrogates
    st.text(alphabet=st.characters(min_codepoint=0x10000, exclude_categories=["Cs"]), max_size=15),  # astral
    st.lists(st.sampled_from(PIECES) | runs | st.text(max_size=4), max_size=15).map("".join),
)


def long_version(text: str) -> str:
    """``text`` repeated, with a word between copies, to at least ``bpe._WORDS_MIN_CHARS`` characters (GPT-2's
    pattern then encodes word by word, words.py, instead of chunk by chunk)."""
    text = text or "x"
    return " ab ".join([text] * (bpe._WORDS_MIN_CHARS // (len(text) + 4) + 1))


def cold(tok: BPETokenizer) -> BPETokenizer:
    """A copy of ``tok`` with empty caches, as just loaded."""
    return BPETokenizer(tok.vocab, tok.merges, tok.pattern, tok.special_tokens)


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """name -> ReferenceGPT2 on the trained tokenizer's GPT-2-format files, with its pattern."""
    out = {}
    for name in TRAINED:
        tok = TOKENIZERS[name]
        ref = ReferenceGPT2(*write(tmp_path_factory.mktemp(name), encoder_of(tok), merge_lines(tok)))
        ref.pat = regex.compile(tok.pattern)
        out[name] = ref
    return out


# ------------------------------------------------------------ round trip and references


@FEW
@given(text=texts)
@pytest.mark.parametrize("name", list(TOKENIZERS))
def test_decode_of_encode_is_the_text(name, text):
    tok = TOKENIZERS[name]
    ids = tok.encode(text, allowed_special="none")
    assert tok.decode(ids) == text
    assert tok.decode_bytes(ids) == text.encode("utf-8")
    assert ids == tok.encode_ordinary(text) == tok.encode(text)      # no special token's text in these texts
    assert all(0 <= i < len(tok.vocab) for i in ids)                  # ordinary ids only
    long = long_version(text)
    assert tok.decode(tok.encode(long)) == long
    assert (tok.encode("") == []) and tok.decode([]) == ""


@FEW
@given(text=texts)
@pytest.mark.parametrize("name", TRAINED)
def test_ids_equal_the_reference_cold_and_warm(name, text, references):
    """Cold (fresh caches) and warm (same text again), short (chunk by chunk) and long (word by word for
    GPT-2's pattern): always the reference's ids."""
    tok, ref = cold(TOKENIZERS[name]), references[name]
    for piece in (text, long_version(text)):
        expected = ref.encode(piece)
        assert tok.encode_ordinary(piece) == expected
        assert tok.encode_ordinary(piece) == expected
        assert TOKENIZERS[name].encode_ordinary(piece) == expected   # caches warmed by every earlier example


@FEW
@given(text=texts, cut=st.integers(0, 10_000))
@pytest.mark.parametrize("name", TRAINED)
def test_encode_is_the_ids_of_its_chunks_one_by_one(name, text, cut):
    """BPE never crosses a chunk of the published pattern: encoding each chunk alone (other cache states,
    other code paths) and joining gives the text's ids; so does cutting the text in two at a chunk boundary,
    whenever the two pieces are chunked as in the whole (the patterns' lookahead ``\\s+(?!\\S)`` can make a
    cut piece end in a longer whitespace chunk: " \\r1" is " ", "\\r", "1" but " \\r" is one chunk)."""
    tok = TOKENIZERS[name]
    chunks = regex.findall(tok.pattern, text)
    ids = tok.encode(text)
    assert ids == [i for chunk in chunks for i in cold(tok).encode(chunk)]
    cut %= len(chunks) + 1
    left, right = "".join(chunks[:cut]), "".join(chunks[cut:])
    if regex.findall(tok.pattern, left) + regex.findall(tok.pattern, right) == chunks:
        assert tok.encode(left) + tok.encode(right) == ids


@pytest.fixture(scope="module")
def gpt2_reference(gpt2_dir):
    return ReferenceGPT2(gpt2_dir / "encoder.json", gpt2_dir / "vocab.bpe")


@pytest.fixture(scope="module")
def shared_texts():
    names = ["the-verdict.txt", "tinyshakespeare.txt", "instruction-data.json"]
    return [shared_file(name).read_text(encoding="utf-8") for name in names]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(which=st.integers(0, 2), start=st.integers(0, 10**7), length=st.sampled_from([0, 1, 50, 800, 4999, 12_000]),
       insert=texts, at=st.integers(0, 10**7))
def test_gpt2_ids_equal_gpt2s_own_algorithm_on_windows_of_shared_texts(gpt2, gpt2_reference, shared_texts, which,
                                                                          start, length, insert, at):
    """Random windows of the shared texts (with a drawn text put in at a random place), encoded by a GPT-2
    tokenizer with empty caches, then again warm: GPT-2's ids from its own files."""
    source = shared_texts[which]
    start %= len(source)
    window = source[start : start + length]
    at %= len(window) + 1
    text = window[:at] + insert + window[at:]
    expected = gpt2_reference.encode(text)
    tok = emptied(gpt2)
    assert tok.encode_ordinary(text) == expected
    assert tok.encode_ordinary(text) == expected
    assert tok.decode(expected) == text


# ------------------------------------------------------------ special tokens

ORDINARY = string.ascii_letters + string.digits + " \n\t'|>!é日👍"     # no "<": no special token across pieces
LONG_ORDINARY = CORPUS[:bpe._WORDS_MIN_CHARS + 500].replace("<", "(")                 # encoded word by word
special_texts = st.lists(st.sampled_from([*SPECIALS, LONG_ORDINARY]) | st.text(alphabet=ORDINARY, max_size=12),
                         max_size=8)


def expected_ids(tok, parts, as_ids):
    """The ids of "".join(parts): the special tokens in ``as_ids`` are ids, every other run of parts text."""
    ids, run = [], ""
    for part in parts:
        if part in as_ids:
            ids += tok.encode_ordinary(run) + [tok.special_tokens[part]]
            run = ""
        else:
            run += part
    return ids + tok.encode_ordinary(run)


def first_special(text, names):
    found = [(text.find(s), s) for s in names if s in text]
    return min(found) if found else None


@settings(max_examples=40, deadline=None)
@given(parts=special_texts)
@pytest.mark.parametrize("name", list(TOKENIZERS))
def test_special_tokens_as_documented(name, parts):
    """docs/tokenizer.md section 5 (tiktoken's rules): "all" -> ids; "none" -> text; the default raises at the
    first special token; a set -> those are ids, another raises, unless disallowed_special=() makes it text."""
    tok = TOKENIZERS[name]
    eot, pad = SPECIALS
    text = "".join(parts)
    ids = tok.encode(text, allowed_special="all")
    assert ids == expected_ids(tok, parts, SPECIALS)
    assert tok.decode(ids) == text
    plain = tok.encode(text, allowed_special="none")
    assert plain == tok.encode_ordinary(text) and not set(plain) & set(tok.special_tokens.values())
    assert tok.decode(plain) == text
    for allowed, raising in (("none_raise", SPECIALS), ({eot}, [pad]), ({pad}, [eot]), (set(SPECIALS), [])):
        as_ids = set() if allowed == "none_raise" else allowed
        first = first_special(text, raising)
        if first is None:
            assert tok.encode(text, allowed_special=allowed) == expected_ids(tok, parts, as_ids)
        else:
            with pytest.raises(DisallowedSpecialToken) as error:
                tok.encode(text, allowed_special=allowed)
            assert (error.value.position, error.value.token) == first
        assert tok.encode(text, allowed_special=allowed, disallowed_special=()) == expected_ids(tok, parts, as_ids)
    for special, i in tok.special_tokens.items():
        assert tok.decode([i]) == special and tok.decode_bytes([i]) == special.encode()


def test_disallowed_special_must_be_all_or_a_collection_of_special_tokens():
    tok = TOKENIZERS["bytes"]
    assert tok.encode("hello", disallowed_special=()) == list(b"hello")
    for wrong in ("none", "nothing", "<|pad|>"):           # a string would be read as its characters
        with pytest.raises(ValueError, match="disallowed_special"):
            tok.encode("hello", disallowed_special=wrong)
    with pytest.raises(ValueError, match=r"not special tokens of this tokenizer: \['<\|nope\|>'\]"):
        tok.encode("hello", disallowed_special={"<|nope|>"})


# ------------------------------------------------------------ training

training_texts = st.one_of(
    st.text(alphabet="ab \n", min_size=1, max_size=200),
    st.text(alphabet="aab  c'sSé日👍\n\r\t1.", min_size=1, max_size=300),
    st.lists(st.sampled_from(PIECES) | runs, min_size=1, max_size=20).map("".join),
)


@FEW
@given(text=training_texts, vocab_size=st.integers(257, 330), n_special=st.integers(0, 1))
def test_vocab_size_is_reached_unless_no_pair_is_left(text, vocab_size, n_special):
    specials = SPECIALS[:n_special]
    tok = BPETokenizer.train(text, vocab_size, special_tokens=specials, progress=False)
    n = len(tok.vocab)
    assert sorted(tok.vocab) == list(range(n))                          # ordinary ids 0..n-1
    assert sorted(tok.special_tokens.values()) == list(range(n, n + n_special))   # then the special tokens
    assert tok.vocab_size == n + n_special <= vocab_size
    if tok.vocab_size < vocab_size:                                     # stopped early: no pair left anywhere
        assert all(len(tok.encode_ordinary(chunk)) == 1 for chunk in regex.findall(tok.pattern, text))


@FEW
@given(docs=st.lists(training_texts, min_size=1, max_size=6), vocab_size=st.integers(260, 320), seed=st.integers())
def test_training_is_deterministic_whatever_the_document_order(docs, vocab_size, seed):
    """Same counts -> same merges; and the first merge is the documented tie-break, worked out here from the
    byte pairs of the chunks: the most frequent pair, then the smallest left byte, then the smallest right."""
    first = BPETokenizer.train(docs, vocab_size, progress=False)
    shuffled = docs[:]
    random.Random(seed).shuffle(shuffled)
    assert BPETokenizer.train(docs, vocab_size, progress=False) == first
    assert BPETokenizer.train(iter(shuffled), vocab_size, progress=False) == first
    pairs = {}
    for doc in docs:
        for chunk in regex.findall(first.pattern, doc):
            data = chunk.encode("utf-8")
            for pair in zip(data, data[1:]):
                pairs[pair] = pairs.get(pair, 0) + 1
    if pairs:
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        assert first.merges[0] == best
    else:
        assert first.merges == []


@FEW
@given(text=training_texts.map(lambda s: (s + "\nword\n") * 3), block_chars=st.integers(1, 40),
       pattern=st.sampled_from(["gpt2", "gpt4"]))
def test_one_string_or_files_read_in_blocks_give_the_same_merges(text, block_chars, pattern):
    """The text as one string, as files (cut at safe line breaks: split_blocks), read back by
    iter_text_files in blocks of ``block_chars``: one tokenizer (CRLF kept as it is)."""
    whole = BPETokenizer.train(text, 300, pattern=pattern, progress=False)
    with tempfile.TemporaryDirectory() as folder:
        paths = []
        for k, piece in enumerate(split_blocks(text, block_chars * 3)):
            paths.append(Path(folder) / f"{k}.txt")
            paths[-1].write_bytes(piece.encode("utf-8"))
        assume(len(paths) > 1 or block_chars < len(text))
        files = BPETokenizer.train(iter_text_files(paths, block_chars=block_chars), 300, pattern=pattern,
                                   progress=False)
    assert files == whole


@FEW
@given(train_text=training_texts, text=texts, vocab_size=st.integers(258, 320),
       pattern=st.sampled_from(["gpt2", "gpt4", r"\S+|\s+"]))
def test_a_saved_and_loaded_tokenizer_gives_the_same_ids(train_text, text, vocab_size, pattern):
    tok = BPETokenizer.train(train_text, vocab_size, pattern=pattern, special_tokens=SPECIALS, progress=False)
    with tempfile.TemporaryDirectory() as folder:
        tok.save(Path(folder) / "tok.json")
        again = BPETokenizer.load(Path(folder) / "tok.json")
    assert again == tok
    for piece in (text, text + SPECIALS[0] + train_text):
        assert again.encode(piece, allowed_special="all") == tok.encode(piece, allowed_special="all")


@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet="ab1 \r\n\t.'\u0301é", max_size=120) | st.lists(
           st.sampled_from(["word", "x1", "é", "\r\n", "\n", "\r", " ", "\t", ".", "'s", "'S", "\u0301"]),
           max_size=40).map("".join),
       block_chars=st.integers(1, 30), pattern=st.sampled_from(["gpt2", "gpt4"]))
def test_blocks_have_the_chunks_of_the_whole_text(text, block_chars, pattern):
    """split_blocks (streaming training, long encodes, encode_batch) and iter_text_files cut only where the
    chunks of the pieces are those of the whole text, for both patterns, Windows line ends included."""
    chunks = regex.compile(resolve_pattern(pattern)).findall
    pieces = list(split_blocks(text, block_chars))
    assert "".join(pieces) == text
    assert [c for piece in pieces for c in chunks(piece)] == chunks(text)


@FEW
@given(text=st.lists(st.sampled_from(PIECES) | runs, max_size=80).map("".join), n=st.integers(2, 6),
       name=st.sampled_from(TRAINED))
def test_pieces_for_workers_encode_to_the_ids_of_the_text(text, n, name):
    """encode_batch cuts a long text in pieces with split_even (the same safe cuts): their ids, joined, are
    the text's ids, for both patterns, Windows line ends included."""
    tok = TOKENIZERS[name]
    pieces = split_even(text, n)
    assert "".join(pieces) == text
    assert [i for piece in pieces for i in tok.encode(piece)] == tok.encode(text)


def test_encode_batch_in_workers_on_windows_line_ends(monkeypatch):
    monkeypatch.setattr(parallel, "MIN_PARALLEL_CHARS", 0)
    text = CORPUS.replace("\n", "\r\n")[:30_000]
    tok = TOKENIZERS["gpt4"]
    assert len(parallel._share_out(tok, [text], 2, "none_raise", "all")) == 2         # cut in two
    assert tok.encode_batch([text, "x\r\ny"], num_workers=2) == [tok.encode(text), tok.encode("x\r\ny")]


@pytest.mark.parametrize("line_end", ["\n", "\r\n"])
def test_files_with_either_line_end_are_read_in_blocks(tmp_path, line_end):
    """A file is streamed in blocks of about ``block_chars`` whatever its line ends (was: a file with Windows
    line ends had no place to cut, so it was read whole into one block, and slowly: the buffer was re-scanned
    after each read, quadratic in the file's size, 2.3 s for 8 MB)."""
    text = f"A line that ends in a letter{line_end}a number 42{line_end}a full stop.{line_end}" * 300
    path = tmp_path / "windows.txt"
    path.write_bytes(text.encode("utf-8"))
    blocks = list(iter_text_files([path], block_chars=1000))
    assert "".join(blocks) == text
    assert len(blocks) >= len(text) // 2000 and max(map(len, blocks)) <= 2000
    for pattern in ("gpt2", "gpt4"):
        chunks = regex.compile(resolve_pattern(pattern)).findall
        assert [c for block in blocks for c in chunks(block)] == chunks(text)


# ------------------------------------------------------------ decoding arbitrary ids

HOLE = 7   # ids len(vocab) .. len(vocab) + HOLE - 1 are no token: the special token comes after them
with_hole = BPETokenizer(TOKENIZERS["gpt2"].vocab, TOKENIZERS["gpt2"].merges, TOKENIZERS["gpt2"].pattern,
                         {"<|endoftext|>": len(TOKENIZERS["gpt2"].vocab) + HOLE})


def token_bytes(tok, i):
    """Independent of decode: the vocabulary's bytes, or a special token's text."""
    specials = {v: k.encode("utf-8") for k, v in tok.special_tokens.items()}
    return tok.vocab[i] if i in tok.vocab else specials[i]


@FEW
@given(data=st.data(), name=st.sampled_from([*TOKENIZERS, "hole"]))
def test_decode_of_any_ids_is_their_bytes_with_replacement_characters(data, name):
    """docs/tokenizer.md: bytes that are not UTF-8 (an id sequence cut inside a character) decode to U+FFFD,
    never an exception; decode_bytes gives the bytes themselves. Re-encoding the text gives the same text."""
    tok = with_hole if name == "hole" else TOKENIZERS[name]
    valid = [*tok.vocab, *tok.special_tokens.values()]
    ids = data.draw(st.lists(st.sampled_from(valid), max_size=30))
    raw = b"".join(token_bytes(tok, i) for i in ids)
    assert tok.decode_bytes(ids) == raw
    text = tok.decode(ids)
    assert text == raw.decode("utf-8", errors="replace")
    assert tok.decode(tok.encode(text, allowed_special="all")) == text


@FEW
@given(data=st.data(), name=st.sampled_from([*TOKENIZERS, "hole"]))
def test_ids_that_are_no_token_are_a_clear_error(data, name):
    tok = with_hole if name == "hole" else TOKENIZERS[name]
    size = tok.vocab_size
    valid = st.sampled_from([*tok.vocab, *tok.special_tokens.values()])
    holes = [i for i in range(len(tok.vocab), size) if i not in tok.special_tokens.values()]
    out_of_range = st.integers(max_value=-1) | st.integers(min_value=size) | st.sampled_from(holes or [-1])
    not_an_int = st.sampled_from([1.0, None, "1", b"1", [1], 2**70 + 0.5])   # (a bool in a list is 0 or 1 to Python)
    bad = data.draw(out_of_range | not_an_int)
    ids = data.draw(st.lists(valid, max_size=5)) + [bad] + data.draw(st.lists(valid | out_of_range, max_size=5))
    if isinstance(bad, int) and not isinstance(bad, bool):
        message = rf"token id {bad} is not in this tokenizer's vocabulary \(ids 0 to {size - 1}\)"
    else:
        message = rf"token ids are integers, got {regex.escape(repr(bad))} \({type(bad).__name__}\)"
    for decode in (tok.decode, tok.decode_bytes):
        with pytest.raises(ValueError, match=message):
            decode(ids)


def test_arrays_of_ids_must_hold_integers():
    """A bool mask or a float array passed by mistake: refused by name (was: a bool array decoded as bytes 0
    and 1, "\\x01\\x00"), checked on the array's dtype, so decoding costs nothing more per id."""
    np = pytest.importorskip("numpy")
    tok = TOKENIZERS["gpt2"]
    ids = tok.encode("hello there")
    for wrong in (np.array([True, False]), np.array(ids, dtype=np.float64), np.array(["104"])):
        for decode in (tok.decode, tok.decode_bytes):
            with pytest.raises(ValueError, match=rf"^token ids are integers, got an array of {wrong.dtype}"):
                decode(wrong)
    for dtype in (np.int16, np.uint16, np.int32, np.uint64):
        assert tok.decode(np.array(ids, dtype=dtype)) == "hello there"


# ------------------------------------------------------------ text that is not text


@settings(max_examples=40, deadline=None)
@given(parts=special_texts, at=st.integers(0, 10**6), surrogate=st.integers(0xD800, 0xDFFF),
       name=st.sampled_from(list(TOKENIZERS)), long=st.booleans())
def test_a_lone_surrogate_is_named_at_its_position_in_the_whole_text(parts, at, surrogate, name, long):
    """docs/tokenizer.md: encode raises a ValueError naming the position, in the text as given: also after a
    special token (was: the position in the piece after it) and with the bytes tokenizer (was: Python's
    UnicodeEncodeError, "can't encode character ... in position")."""
    tok = TOKENIZERS[name]
    text = "".join(parts) + ("x" * bpe._WORDS_MIN_CHARS if long else "")
    at %= len(text) + 1
    if any(s in text[max(at - 20, 0) : at + 20] for s in SPECIALS):
        at = len(text)                                   # not inside a special token
    text = text[:at] + chr(surrogate) + text[at:]
    for allowed in ("all", "none"):
        with pytest.raises(ValueError, match=rf"^cannot encode U\+{surrogate:04X} at position {at}: a lone surrogate"):
            tok.encode(text, allowed_special=allowed)


def test_training_text_must_be_text():
    for wrong in (b"bytes are not text", ["a list", b"with bytes"], [["nested"]], 12):
        with pytest.raises(TypeError, match="^training text must be a str or an iterable of str"):
            BPETokenizer.train(wrong, 300, progress=False)
    with pytest.raises(ValueError, match=r"^training text: cannot encode U\+DC80 .* lone surrogate"):
        BPETokenizer.train(["fine text", "bad \udc80 here"], 300, progress=False)


# ------------------------------------------------------------ long chunks


@settings(max_examples=25, deadline=None)
@given(piece=st.sampled_from(["a", "ab", "=", "1", "é", "日本", "😀", "abc", "xyzzy"]),
       n=st.integers(1, 3 * bpe._LONG_CHUNK_CHARS), tail=st.text(alphabet="abcxyz=1", max_size=40),
       name=st.sampled_from(TRAINED))
def test_long_chunks_go_through_the_numpy_merge_loop_with_the_same_ids(piece, n, tail, name, references):
    """A chunk of ``_LONG_CHUNK_CHARS`` characters or more ("=" * 100000, a long run of letters) is merged by
    ``_bpe_many``, whose rounds merge every occurrence at once, never by the one-chunk loop, which is
    quadratic in the chunk's length (80,000 letters "abab..." took 4.9 s with GPT-2, 4.4 ms now); the ids
    are the reference's either way. Also without a pattern (the whole text is one chunk)."""
    text = (piece * n)[: 3 * bpe._LONG_CHUNK_CHARS] + tail
    tok = cold(TOKENIZERS[name])
    loop = tok._bpe

    def short_only(chunk):
        assert len(chunk) < bpe._LONG_CHUNK_CHARS, f"the one-chunk loop got a chunk of {len(chunk)} characters"
        return loop(chunk)

    tok._bpe = short_only
    assert tok.encode(text) == references[name].encode(text)
    whole = BPETokenizer(tok.vocab, tok.merges, pattern=None)
    expected = loop(text)                                # the one-chunk loop on the whole text
    whole._bpe = short_only
    assert whole.encode(text) == expected


def test_special_tokens_given_as_one_string_are_refused():
    """special_tokens="<|endoftext|>" was read as its characters: 10 special tokens "<", "|", "e", ..., so
    encode("hello", allowed_special="all") made "e" a special token."""
    for build in (lambda s: BPETokenizer.train("hello there", 300, special_tokens=s, progress=False),
                  BPETokenizer.bytes):
        with pytest.raises(TypeError, match=r"^special_tokens must be a list of strings, e\.g\. \['<\|endoftext\|>'\]"):
            build("<|endoftext|>")
        assert list(build(["<|endoftext|>", "<|endoftext|>"]).special_tokens) == ["<|endoftext|>"]
    with pytest.raises(TypeError, match=r"^pattern must be 'gpt2', 'gpt4' or a regex string, got None"):
        BPETokenizer.train("hello there", 300, pattern=None, progress=False)
