"""GPT-2's two files (encoder.json, vocab.bpe) when they are truncated, inconsistent or not UTF-8.

The files here are small GPT-2-format files written from a tokenizer trained
in the test (ids 0..N-1, one merge per multi-byte token, as GPT-2's own), so
the tests need no shared data. A loader that silently accepted a truncated
vocab.bpe would encode differently from GPT-2 with no error at all.
"""

import json
import re

import pytest

from minillm.tokenizer import BPETokenizer
from minillm.tokenizer.gpt2 import bytes_to_chars

TEXT = "the theme of the thesis: these three thin things, then the other ones " * 20


@pytest.fixture(scope="module")
def trained():
    return BPETokenizer.train(TEXT, vocab_size=300, special_tokens=["<|endoftext|>"], progress=False)


def encoder_of(tok) -> dict:
    encoder = {bytes_to_chars(b): i for i, b in tok.vocab.items()}
    encoder.update(tok.special_tokens)
    return encoder


def merge_lines(tok) -> list[str]:
    return [f"{bytes_to_chars(tok.vocab[a])} {bytes_to_chars(tok.vocab[b])}" for a, b in tok.merges]


def write(folder, encoder, lines, encoder_bytes=None, bpe_bytes=None):
    (folder / "encoder.json").write_bytes(encoder_bytes or json.dumps(encoder).encode())
    (folder / "vocab.bpe").write_bytes(bpe_bytes or ("#version: 0.2\n" + "".join(f"{m}\n" for m in lines)).encode())
    return folder / "encoder.json", folder / "vocab.bpe"


def test_files_written_like_gpt2s_give_the_trained_tokenizer(tmp_path, trained):
    loaded = BPETokenizer.from_gpt2_files(*write(tmp_path, encoder_of(trained), merge_lines(trained)))
    assert loaded == trained
    assert loaded.encode(TEXT[:200]) == trained.encode(TEXT[:200])


@pytest.mark.parametrize("keep", [0, 20, -1])
def test_a_truncated_vocab_bpe_is_refused(tmp_path, trained, keep):
    """Cut at a line boundary the file still parses; the tokens its lost merges made can never be produced."""
    lines = merge_lines(trained)
    lost = len(lines) - len(lines[:keep])
    with pytest.raises(ValueError, match=rf"encoder\.json has {lost} multi-byte token\(s\) that no merge of "
                                         rf".*vocab\.bpe makes .*truncated"):
        BPETokenizer.from_gpt2_files(*write(tmp_path, encoder_of(trained), lines[:keep]))


def test_a_merge_whose_token_encoder_json_lacks_names_the_line(tmp_path, trained):
    lines = merge_lines(trained)
    left, right = lines[4].split(" ")
    encoder = {text: i for text, i in encoder_of(trained).items() if text != left + right}
    encoder = {text: rank for rank, text in enumerate(sorted(encoder, key=encoder.get))}   # ids 0..N-1 again
    with pytest.raises(ValueError, match=rf"vocab\.bpe:6: merge {re.escape(lines[4])} makes {re.escape(left + right)}, "
                                         rf"which .*encoder\.json lacks"):
        BPETokenizer.from_gpt2_files(*write(tmp_path, encoder, lines))


def test_two_tokens_with_one_id_are_named(tmp_path, trained):
    encoder = encoder_of(trained)
    first, second = list(encoder)[260], list(encoder)[261]
    encoder[second] = encoder[first]
    with pytest.raises(ValueError, match=rf"encoder\.json: {first!r} and {second!r} both have id {encoder[first]}"):
        BPETokenizer.from_gpt2_files(*write(tmp_path, encoder, merge_lines(trained)))


@pytest.mark.parametrize("bad", ["7", 7.0, True, -1, None])
def test_an_id_that_is_not_a_non_negative_integer_is_named(tmp_path, trained, bad):
    encoder = encoder_of(trained)
    token = list(encoder)[270]
    encoder[token] = bad
    with pytest.raises(ValueError, match=rf"encoder\.json: {token!r} has id {bad!r}; ids are integers 0 to "
                                         rf"{len(encoder) - 1} "):
        BPETokenizer.from_gpt2_files(*write(tmp_path, encoder, merge_lines(trained)))


def test_ids_beyond_the_number_of_entries_are_refused_at_once(tmp_path, trained):
    """An id of 10^9 would make the id table a billion entries long (seconds and gigabytes): refused first."""
    encoder = encoder_of(trained)
    token = list(encoder)[270]
    assert encoder[token] == 270
    encoder[token] = 10**9
    with pytest.raises(ValueError, match=rf"{token!r} has id 1000000000; ids are integers 0 to {len(encoder) - 1} .*"
                                         rf"no entry has id 270"):
        BPETokenizer.from_gpt2_files(*write(tmp_path, encoder, merge_lines(trained)))


def test_files_that_are_not_utf8_are_named(tmp_path, trained):
    encoder, lines = encoder_of(trained), merge_lines(trained)
    with pytest.raises(ValueError, match=r"vocab\.bpe, line 2: not UTF-8 text \(byte 0xff at byte offset 14\)"):
        BPETokenizer.from_gpt2_files(*write(tmp_path, encoder, lines, bpe_bytes=b"#version: 0.2\n\xff\xfe\n"))
    with pytest.raises(ValueError, match=r"encoder\.json, line 1: not UTF-8 text \(byte 0xff at byte offset 0\)"):
        BPETokenizer.from_gpt2_files(*write(tmp_path, encoder, lines, encoder_bytes=b"\xff{}"))


def test_a_token_outside_gpt2s_alphabet_names_the_file_and_line(tmp_path, trained):
    encoder, lines = encoder_of(trained), merge_lines(trained)
    encoder["☃x"] = encoder.pop(lines[0].replace(" ", ""))
    with pytest.raises(ValueError, match=r"encoder\.json: entry '☃x' is not a byte-level string: '☃' is not in"):
        BPETokenizer.from_gpt2_files(*write(tmp_path, encoder, lines))
    with pytest.raises(ValueError, match=r"vocab\.bpe:4: '☃' is not a byte-level string: '☃' is not in"):
        BPETokenizer.from_gpt2_files(*write(tmp_path, encoder_of(trained), lines[:2] + ["☃ x"] + lines[2:]))
