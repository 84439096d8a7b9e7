"""Damaged Hugging Face tokenizer.json files: a ValueError naming the file and the entry, not an
AttributeError/KeyError from inside the reader. The file is written from a tokenizer trained here."""

import copy
import json

import pytest

from minillm.tokenizer import BPETokenizer
from minillm.tokenizer.gpt2 import bytes_to_chars

TEXT = "the theme of the thesis: these three thin things, then the other ones " * 20


@pytest.fixture(scope="module")
def spec():
    tok = BPETokenizer.train(TEXT, vocab_size=300, special_tokens=["<|endoftext|>"], progress=False)
    vocab = {bytes_to_chars(b): i for i, b in tok.vocab.items()}
    eot = tok.special_tokens["<|endoftext|>"]
    vocab["<|endoftext|>"] = eot
    return {"model": {"type": "BPE", "vocab": vocab,
                      "merges": [f"{bytes_to_chars(tok.vocab[a])} {bytes_to_chars(tok.vocab[b])}" for a, b in tok.merges]},
            "normalizer": None, "added_tokens": [{"id": eot, "content": "<|endoftext|>", "special": True}],
            "pre_tokenizer": {"type": "ByteLevel", "use_regex": True, "add_prefix_space": False}}, tok


def write(tmp_path, spec):
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    return tmp_path / "tokenizer.json"


def test_the_file_gives_the_trained_tokenizer(tmp_path, spec):
    data, tok = spec
    assert BPETokenizer.from_hf(write(tmp_path, data)).encode(TEXT[:100]) == tok.encode(TEXT[:100])


@pytest.mark.parametrize("change, message", [
    (lambda s: s["model"].update(vocab=[1, 2]), r"'model'\.'vocab' must be an object \{token: id\}, got list"),
    (lambda s: s["model"]["vocab"].update({"Ġthe": "5"}), r"vocab entry 'Ġthe' has id '5', not a non-negative integer"),
    (lambda s: s["model"]["vocab"].update({"Ġthe": -3}), r"vocab entry 'Ġthe' has id -3, not a non-negative integer"),
    (lambda s: s["added_tokens"][0].pop("id"), r"added token 0 needs a 'content' string and an 'id' integer, got "),
    (lambda s: s.update(added_tokens=["<|endoftext|>"]), r"added token 0 needs a 'content' string and an 'id' integer"),
    (lambda s: s.update(added_tokens={"a": 1}), r"'added_tokens' must be a list, got dict"),
    (lambda s: s.update(normalizer="NFC"), r"'normalizer' must be an object or null, got 'NFC'"),
    (lambda s: s.update(pre_tokenizer="ByteLevel"), r"'pre_tokenizer' must be an object or null, got 'ByteLevel'"),
    (lambda s: s.update(pre_tokenizer={"type": "Sequence", "pretokenizers": ["ByteLevel"]}),
     r"pre-tokenizer step 'ByteLevel' is not an object"),
])
def test_damaged_entries_are_named(tmp_path, spec, change, message):
    data = copy.deepcopy(spec[0])
    change(data)
    with pytest.raises(ValueError, match=r"tokenizer\.json: " + message):
        BPETokenizer.from_hf(write(tmp_path, data))


def test_a_file_that_is_not_utf8_is_named(tmp_path):
    (tmp_path / "tokenizer.json").write_bytes(b'{"model": "\xff"}')
    with pytest.raises(ValueError, match=r"tokenizer\.json, line 1: not UTF-8 text \(byte 0xff at byte offset 11\)"):
        BPETokenizer.from_hf(tmp_path / "tokenizer.json")
