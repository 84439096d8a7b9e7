"""GPT-2 parity: the fast tokenizer against GPT-2's own algorithm.

``ReferenceGPT2`` below is OpenAI's ``encoder.py`` (2019) written out plainly:
byte-level strings, a ``bpe_ranks`` dict of string pairs, and the loop "merge
the lowest-rank pair everywhere until none is left". It shares no code with
minillm (not even the byte alphabet), so agreement means the fast path is
GPT-2, token for token. Its results are cached per distinct chunk, as in the
original, which keeps all of tinyshakespeare to a couple of seconds.
"""

import json

import pytest
import regex
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tokenizer_helpers import shared_file
from minillm.tokenizer import BPETokenizer, load_tokenizer
from minillm.tokenizer.gpt2 import bytes_to_unicode

GPT2_REGEX = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def reference_bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


class ReferenceGPT2:
    def __init__(self, encoder_path, vocab_path):
        with open(encoder_path, encoding="utf-8") as f:
            self.encoder = json.load(f)
        with open(vocab_path, encoding="utf-8") as f:
            bpe_data = f.read()
        merges = [tuple(line.split()) for line in bpe_data.split("\n")[1:-1]]
        self.bpe_ranks = dict(zip(merges, range(len(merges))))
        self.byte_encoder = reference_bytes_to_unicode()
        self.pat = regex.compile(GPT2_REGEX)
        self.cache = {}

    def bpe(self, token):
        if token in self.cache:
            return self.cache[token]
        word = tuple(token)
        pairs = set(zip(word, word[1:]))
        if not pairs:
            return token
        while True:
            bigram = min(pairs, key=lambda pair: self.bpe_ranks.get(pair, float("inf")))
            if bigram not in self.bpe_ranks:
                break
            first, second = bigram
            new_word = []
            i = 0
            while i < len(word):
                try:
                    j = word.index(first, i)
                except ValueError:
                    new_word.extend(word[i:])
                    break
                new_word.extend(word[i:j])
                i = j
                if word[i] == first and i < len(word) - 1 and word[i + 1] == second:
                    new_word.append(first + second)
                    i += 2
                else:
                    new_word.append(word[i])
                    i += 1
            word = tuple(new_word)
            if len(word) == 1:
                break
            pairs = set(zip(word, word[1:]))
        word = " ".join(word)
        self.cache[token] = word
        return word

    def encode(self, text):
        bpe_tokens = []
        for token in regex.findall(self.pat, text):
            token = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
            bpe_tokens.extend(self.encoder[bpe_token] for bpe_token in self.bpe(token).split(" "))
        return bpe_tokens


@pytest.fixture(scope="module")
def reference(gpt2_dir):
    return ReferenceGPT2(gpt2_dir / "encoder.json", gpt2_dir / "vocab.bpe")


def test_byte_alphabet_matches_gpt2():
    assert bytes_to_unicode() == reference_bytes_to_unicode()


def test_vocab_and_special_token(gpt2):
    assert gpt2.vocab_size == 50257
    assert gpt2.special_tokens == {"<|endoftext|>": 50256}
    assert len(gpt2.merges) == 50000
    assert gpt2.encode("<|endoftext|>", allowed_special="all") == [50256]
    assert gpt2.encode("Hello world") == [15496, 995]


def test_every_gpt2_token_is_gpt2s_bpe_of_its_own_bytes(reference):
    """Makes encode's whole-token shortcut exact for GPT-2 (see bpe.py)."""
    tokens = [t for t in reference.encoder if t != "<|endoftext|>"]
    assert len(tokens) == 50256
    assert [t for t in tokens if reference.bpe(t) != t] == []


def test_merge_loop_gives_every_gpt2_token_from_its_bytes(gpt2):
    """The merge loop alone (no shortcut, no cache) on each token's text."""
    whole = {}
    for i, data in gpt2.vocab.items():
        try:
            whole[i] = data.decode("utf-8")
        except UnicodeDecodeError:
            pass
    assert len(whole) > 49_000
    assert [i for i, s in whole.items() if gpt2._bpe(s) != [i]] == []


@pytest.mark.parametrize("name", ["the-verdict.txt", "tinyshakespeare.txt"])
def test_ids_equal_reference_on_shared_texts(gpt2_dir, reference, name):
    text = shared_file(name).read_text(encoding="utf-8")
    cold = BPETokenizer.from_gpt2_files(gpt2_dir / "encoder.json", gpt2_dir / "vocab.bpe")  # empty cache
    ids = cold.encode(text)
    assert ids == reference.encode(text)
    assert cold.decode(ids) == text
    if name == "tinyshakespeare.txt":  # large enough for worker processes, cut into pieces
        fresh = BPETokenizer.from_gpt2_files(gpt2_dir / "encoder.json", gpt2_dir / "vocab.bpe")
        assert fresh.encode_batch([text, "tail"], num_workers=2) == [ids, reference.encode("tail")]


def test_instruction_data_equals_reference(gpt2, reference):
    records = json.loads(shared_file("instruction-data.json").read_text(encoding="utf-8"))
    text = "\n\n".join(" ".join(r.values()) for r in records[:300])
    assert gpt2.encode(text) == reference.encode(text)


UNICODE_SAMPLES = [
    "", " ", "\n", "\r\n\r\n", "   leading and trailing   ", "tabs\tand\x0bvertical\x0cfeeds",
    "I'm you're they've we'll he'd IT'S Don't", "123 4567 3.14159 1e10 ٣٤٥ Ⅻ",
    "naïve café — “quotes” …", "e\u0301 a\u0308 (combining marks)", "日本語のテキスト、中文文本。",
    "emoji 👍🏽 👨‍👩‍👧‍👦 🇫🇷", "nbsp\u00a0here\u2028line\u2029para\x85next", "\x00\x01\x7f control",
    "    indented\n        code()\n", "a" * 3000,
]


@pytest.mark.parametrize("text", UNICODE_SAMPLES)
def test_samples_equal_reference(gpt2, reference, text):
    assert gpt2.encode(text) == reference.encode(text)
    assert gpt2.decode(gpt2.encode(text)) == text


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=80) | st.text(alphabet=" \t\n\r'sdtmlvre0123aé日👍\u0301", max_size=40))
def test_generated_unicode_equals_reference(gpt2, reference, text):
    assert gpt2.encode_ordinary(text) == reference.encode(text)
    assert gpt2.decode(gpt2.encode_ordinary(text)) == text


def test_load_tokenizer_gpt2_spec(gpt2_dir, gpt2):
    assert load_tokenizer(f"gpt2:{gpt2_dir}") == gpt2


def test_gpt2_save_load_round_trip(gpt2, tmp_path):
    path = tmp_path / "gpt2.json"
    gpt2.save(path)
    again = BPETokenizer.load(path)
    assert again == gpt2
    text = "Hello, world! <|endoftext|> and more"
    assert again.encode(text, allowed_special="all") == gpt2.encode(text, allowed_special="all")


def test_encoder_json_is_not_a_tokenizer_file(gpt2_dir):
    from minillm.tokenizer import TokenizerFileError

    with pytest.raises(TokenizerFileError, match="from_gpt2_files"):
        BPETokenizer.load(gpt2_dir / "encoder.json")


def test_tinyshakespeare_chunk_figures(gpt2):
    """docs/tokenizer.md: tinyshakespeare is 297,833 chunks, 15,057 distinct; 7,657 of the distinct ones and
    91% of all chunks are whole GPT-2 tokens (the shortcut that skips the merge loop)."""
    from minillm.tokenizer import count_chunks  # noqa: PLC0415

    counts = count_chunks(shared_file("tinyshakespeare.txt").read_text(encoding="utf-8"))
    assert (sum(counts.values()), len(counts)) == (297_833, 15_057)
    tokens = set(gpt2.vocab.values())                                        # token bytes
    whole = [chunk for chunk in counts if chunk.encode("utf-8") in tokens]
    assert len(whole) == 7_657
    assert round(sum(counts[chunk] for chunk in whole) / sum(counts.values()), 2) == 0.91
