"""BPETokenizer.from_hf: tokenizer.json files (Llama-3-style, Qwen-style, GPT-2-style) built from GPT-2's
published files, against a plain re-implementation of the ``tokenizers`` library's byte-level BPE pipeline.

``ReferenceHFTokenizer`` reads the tokenizer.json itself and follows the library's steps literally:
added tokens cut out first (leftmost, longest), the normalizer, the Split regex with "Isolated"
behaviour (matches and the gaps between them are pre-tokens), the byte-level alphabet, then BPE that
merges ONE pair at a time, always the lowest-rank pair and the leftmost on ties (the library's priority
queue), or, with ``ignore_merges``, a pre-token that is in the vocab as a whole. It shares no code with
minillm (its byte alphabet comes from the GPT-2 parity test's reference).
"""

import json
import unicodedata

import pytest
import regex
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tokenizer_helpers import shared_file
from minillm.data.corpus import builtin_corpus
from minillm.tokenizer import BPETokenizer
from test_gpt2 import reference_bytes_to_unicode

LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
EXTRA_TOKENS = [("<|begin_of_text|>", True), ("<|im_start|>", True), ("<think>", False)]


def tokenizer_json(gpt2_dir, style):
    """GPT-2's vocabulary and merges in tokenizer.json form, with a Llama-3, Qwen or GPT-2 pre-tokenizer."""
    vocab = json.loads((gpt2_dir / "encoder.json").read_text(encoding="utf-8"))
    lines = (gpt2_dir / "vocab.bpe").read_text(encoding="utf-8").split("\n")[1:]
    merges = [line for line in lines if line]
    added = [{"id": 50256, "content": "<|endoftext|>", "special": True}]
    added += [{"id": 50257 + k, "content": text, "special": special} for k, (text, special) in enumerate(EXTRA_TOKENS)]
    for token in added:
        token.update(single_word=False, lstrip=False, rstrip=False, normalized=False)
        vocab.setdefault(token["content"], token["id"])
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}
    split = {"type": "Split", "pattern": {"Regex": LLAMA3_REGEX if style == "llama3" else QWEN_REGEX},
             "behavior": "Isolated", "invert": False}
    spec = {"version": "1.0", "added_tokens": added, "normalizer": None, "post_processor": None, "decoder": None,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [split, byte_level]},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                      "ignore_merges": style == "llama3", "vocab": vocab, "merges": merges}}
    if style == "qwen":
        spec["normalizer"] = {"type": "NFC"}
        spec["model"]["merges"] = [line.split(" ") for line in merges]        # the newer [a, b] form
    if style == "gpt2":
        spec["pre_tokenizer"] = dict(byte_level, use_regex=True)
    return spec


class ReferenceHFTokenizer:
    def __init__(self, spec):
        model = spec["model"]
        self.vocab = model["vocab"]
        self.ranks = {tuple(m.split(" ") if isinstance(m, str) else m): r for r, m in enumerate(model["merges"])}
        self.ignore_merges = model.get("ignore_merges", False)
        self.added = sorted((t["content"] for t in spec["added_tokens"]), key=len, reverse=True)
        self.nfc = (spec.get("normalizer") or {}).get("type") == "NFC"
        pre = spec["pre_tokenizer"]
        if pre["type"] == "Sequence":
            self.split = regex.compile(pre["pretokenizers"][0]["pattern"]["Regex"])
        else:                                              # ByteLevel(use_regex=True): GPT-2's regex
            self.split = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
        self.byte_char = reference_bytes_to_unicode()
        self.cache = {}

    def bpe(self, word):
        if self.ignore_merges and word in self.vocab:
            return [self.vocab[word]]
        if word in self.cache:
            return self.cache[word]
        symbols = list(word)
        while len(symbols) > 1:
            best = None
            for i in range(len(symbols) - 1):              # lowest rank, leftmost first
                rank = self.ranks.get((symbols[i], symbols[i + 1]))
                if rank is not None and (best is None or rank < best[0]):
                    best = (rank, i)
            if best is None:
                break
            i = best[1]
            symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
        self.cache[word] = [self.vocab[s] for s in symbols]
        return self.cache[word]

    def pre_tokens(self, text):
        pieces, start = [], 0
        for match in self.split.finditer(text):
            if match.start() > start:
                pieces.append(text[start:match.start()])  # "Isolated": the gaps are pre-tokens too
            pieces.append(match.group())
            start = match.end()
        if start < len(text):
            pieces.append(text[start:])
        return pieces

    def encode(self, text):
        ids, i, plain = [], 0, ""
        while i < len(text):
            added = next((a for a in self.added if text.startswith(a, i)), None)
            if added is None:
                plain += text[i]
                i += 1
                continue
            ids += self.encode_plain(plain)
            ids.append(self.vocab[added])
            plain, i = "", i + len(added)
        return ids + self.encode_plain(plain)

    def encode_plain(self, text):
        if self.nfc:
            text = unicodedata.normalize("NFC", text)
        ids = []
        for piece in self.pre_tokens(text):
            ids += self.bpe("".join(self.byte_char[b] for b in piece.encode("utf-8")))
        return ids


STYLES = ("llama3", "qwen", "gpt2")


@pytest.fixture(scope="module")
def built(gpt2_dir, tmp_path_factory):
    """style -> (minillm tokenizer from the written tokenizer.json, reference)."""
    out = {}
    for style in STYLES:
        spec = tokenizer_json(gpt2_dir, style)
        path = tmp_path_factory.mktemp(style) / "tokenizer.json"
        path.write_text(json.dumps(spec), encoding="utf-8")
        out[style] = (BPETokenizer.from_hf(path), ReferenceHFTokenizer(spec))
    return out


SAMPLES = [
    "Hello world! It's 2024: I'LL say 12345 things,\n\n  indented\tand\r\nCRLF.",
    "café déjà vu — naïve coöperation; e\u0301 (decomposed) and ｆｕｌｌ width, 東京 123年",
    "<|begin_of_text|>system<|im_start|>user\n<think>hmm</think> done<|endoftext|>",
    "emoji 🙂🙃 and numbers 3.14159 2,000,000 and 'quotes' \"double\"   trailing   ",
]


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("text", SAMPLES)
def test_samples_match_the_reference(built, style, text):
    tok, reference = built[style]
    ids = tok.encode(text, allowed_special="all")
    assert ids == reference.encode(text)
    normal = unicodedata.normalize("NFC", text) if style == "qwen" else text
    assert tok.decode(ids) == normal


@pytest.mark.parametrize("style", STYLES)
def test_builtin_corpus_matches_the_reference(built, style):
    """The project's own text (the Python documentation: prose and code), 120,000 characters."""
    text = builtin_corpus()[:120_000]
    tok, reference = built[style]
    ids = tok.encode(text, allowed_special="all")
    assert ids == reference.encode(text)
    assert tok.decode(ids) == text


def test_styles_differ_where_their_regexes_do(built):
    """Llama 3 splits digits in threes, Qwen one by one, GPT-2 keeps runs: the pattern really is read."""
    counts = {style: len(built[style][0].encode(" 1234567")) for style in STYLES}
    assert counts == {"qwen": 8, "llama3": 4, "gpt2": 3}     # " ", 1…7 | " ", 123, 456, 7 | " 123", 45, 67


def test_gpt2_style_equals_from_gpt2_files(built, gpt2):
    text = shared_file("the-verdict.txt").read_text(encoding="utf-8")
    assert built["gpt2"][0].encode(text) == gpt2.encode(text)


def test_added_tokens_are_special_tokens(built):
    tok = built["llama3"][0]
    assert tok.special_tokens == {"<|endoftext|>": 50256, "<|begin_of_text|>": 50257, "<|im_start|>": 50258,
                                  "<think>": 50259}
    assert tok.vocab_size == 50260
    with pytest.raises(ValueError, match="special token"):
        tok.encode("a <think> b")                          # the default refuses, as for every BPETokenizer


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=60))
def test_arbitrary_unicode_matches_the_reference(built, text):
    for style in STYLES:
        tok, reference = built[style]
        assert tok.encode(text, allowed_special="all") == reference.encode(text)


@pytest.mark.parametrize("change, message", [
    (lambda s: s["model"].update(type="WordPiece"), "not a BPE tokenizer.json"),
    (lambda s: s["model"].update(byte_fallback=True), "byte_fallback=True"),
    (lambda s: s.update(normalizer={"type": "Lowercase"}), "normalizer 'Lowercase'"),
    (lambda s: s["added_tokens"][1].update(lstrip=True), "'<|begin_of_text|>' with lstrip"),
    (lambda s: s["pre_tokenizer"]["pretokenizers"].insert(0, {"type": "Digits"}), "pre-tokenizer 'Digits'"),
    (lambda s: s["pre_tokenizer"]["pretokenizers"][0].update(behavior="Removed"), "behavior='Removed'"),
    (lambda s: s["pre_tokenizer"]["pretokenizers"][1].update(add_prefix_space=True), "add_prefix_space"),
    (lambda s: s["model"]["merges"].append("Ġ zzzzzz"), "not in the vocab"),
])
def test_unsupported_files_are_refused_by_name(gpt2_dir, tmp_path, change, message):
    spec = tokenizer_json(gpt2_dir, "llama3")
    change(spec)
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(spec), encoding="utf-8")
    with pytest.raises(ValueError, match=regex.escape(message)):
        BPETokenizer.from_hf(path)
