"""Token files (cache, staleness, dtype), windows, splits, batches, resume state, and the corpus."""

import json

import numpy as np
import pytest

from minillm.data import (TokenDataset, TokenWindows, builtin_corpus, cached_tokens, encode_documents,
                          load_texts, token_dtype)
from minillm.data import dataset as dataset_module
from minillm.tokenizer import BPETokenizer


def expected_windows(n, context_length, stride):
    """Brute force: every start s = 0, stride, 2*stride, ... whose window and shifted target fit."""
    return [s for s in range(0, n, stride) if s + context_length + 1 <= n]


# ------------------------------------------------------------ windows


@pytest.mark.parametrize("n, context_length, stride", [(50, 8, 8), (50, 8, 3), (50, 8, 1), (9, 8, 4), (8, 8, 1),
                                                       (100, 1, 7)])
def test_windows_are_shifted_by_one(n, context_length, stride):
    tokens = (np.arange(n) * 7 % 31).astype(np.uint16)  # not simply arange: x+1 must come from the data
    windows = TokenWindows(tokens, context_length, stride)
    starts = expected_windows(n, context_length, stride)
    assert len(windows) == len(starts)
    for i, s in enumerate(starts):
        inputs, targets = windows[i]
        assert inputs.dtype == np.int64 and targets.dtype == np.int64
        assert inputs.tolist() == tokens[s:s + context_length].tolist()
        assert targets.tolist() == tokens[s + 1:s + context_length + 1].tolist()
    with pytest.raises(IndexError):
        windows[len(starts)]


def test_split_by_position():
    tokens = np.arange(1000, dtype=np.uint16)
    data = TokenDataset(tokens, context_length=16, val_fraction=0.1)
    assert data.train.tokens.tolist() == list(range(900))
    assert data.val.tokens.tolist() == list(range(900, 1000))
    assert len(data.train) == len(expected_windows(900, 16, 16)) and len(data.val) == len(expected_windows(100, 16, 16))
    every_start = TokenDataset(tokens, context_length=16, stride=1, val_fraction=0.1)
    train_targets = np.concatenate([y for _, y in every_start.iter_batches("train", 64)])
    assert train_targets.max() == 899  # the last train window ends at the split, none reaches into val
    assert TokenDataset(tokens, 16, val_fraction=0.25).train.tokens.size == 750


def test_too_little_data_is_a_clear_error():
    with pytest.raises(ValueError, match="train split has 9 tokens"):
        TokenDataset(np.arange(10, dtype=np.uint16), context_length=16)
    data = TokenDataset(np.arange(100, dtype=np.uint16), context_length=16, val_fraction=0.0)
    with pytest.raises(ValueError, match="val split has 0 tokens"):
        data.get_batch("val", 2)
    with pytest.raises(ValueError, match="split must be"):
        data.split("test")


# ------------------------------------------------------------ batches


def test_random_batches_are_windows_and_seeded():
    tokens = np.arange(5000, dtype=np.uint16)
    a = TokenDataset(tokens, context_length=32, stride=5, seed=3)
    b = TokenDataset(tokens, context_length=32, stride=5, seed=3)
    c = TokenDataset(tokens, context_length=32, stride=5, seed=4)
    for _ in range(3):
        (xa, ya), (xb, yb), (xc, _) = a.get_batch("train", 6), b.get_batch("train", 6), c.get_batch("train", 6)
        assert xa.shape == ya.shape == (6, 32) and xa.dtype == ya.dtype == np.int64
        assert np.array_equal(xa, xb) and np.array_equal(ya, yb)
        assert not np.array_equal(xa, xc)
        assert np.array_equal(ya, xa + 1)              # targets are the inputs shifted by one
        assert np.all(xa[:, 0] % 5 == 0)               # every row starts on the stride
        assert np.all(ya.max(axis=1) < 4500)           # and lies in the train split
    explicit = a.get_batch("val", 4, rng=np.random.default_rng(0))
    assert np.array_equal(explicit[0], a.get_batch("val", 4, rng=np.random.default_rng(0))[0])


def test_sequential_iteration_covers_every_window_once():
    tokens = np.arange(400, dtype=np.uint16)
    data = TokenDataset(tokens, context_length=10, stride=10, val_fraction=0.0)
    batches = list(data.iter_batches("train", 8))
    starts = expected_windows(400, 10, 10)
    assert [len(x) for x, _ in batches] == [8, 8, 8, 8, 7] == [8] * 4 + [len(starts) - 32]
    assert np.concatenate([x[:, 0] for x, _ in batches]).tolist() == starts
    assert data.num_batches("train", 8) == 5
    assert [len(x) for x, _ in data.iter_batches("train", 8, drop_last=True)] == [8] * 4
    assert data.num_batches("train", 8, drop_last=True) == 4


def test_state_dict_resumes_the_same_batches():
    tokens = np.arange(3000, dtype=np.uint16)
    first = TokenDataset(tokens, context_length=8, seed=11)
    for _ in range(3):
        first.get_batch("train", 4)
    state = json.loads(json.dumps(first.state_dict()))  # must survive JSON
    expected = [first.get_batch("train", 4) for _ in range(3)]
    resumed = TokenDataset(tokens, context_length=8, seed=999)
    resumed.load_state_dict(state)
    for (x, y), (xe, ye) in zip((resumed.get_batch("train", 4) for _ in range(3)), expected):
        assert np.array_equal(x, xe) and np.array_equal(y, ye)
    with pytest.raises(ValueError, match="different dataset"):
        TokenDataset(tokens, context_length=16).load_state_dict(state)


# ------------------------------------------------------------ encoding and the token file


def test_documents_are_separated_by_end_of_text_or_a_blank_line():
    with_eot = BPETokenizer.bytes(special_tokens=["<|endoftext|>"])
    assert encode_documents(["ab", "c<|endoftext|>"], with_eot).tolist() == [97, 98, 256, 99] + list(b"<|endoftext|>")
    assert encode_documents(["ab", "c"], BPETokenizer.bytes()).tolist() == [97, 98, 10, 10, 99]
    assert encode_documents("ab", BPETokenizer.bytes()).dtype == np.uint16


def test_token_dtype():
    assert token_dtype(256) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32 and token_dtype(200_000) == np.uint32


def test_cache_is_built_then_reused(tmp_path, monkeypatch):
    tok = BPETokenizer.bytes()
    path = tmp_path / "cache" / "tokens.bin"
    tokens = cached_tokens(["hello", "world"], tok, path)
    assert isinstance(tokens, np.memmap) and tokens.dtype == np.uint16
    assert tokens.tolist() == list(b"hello\n\nworld")
    assert path.stat().st_size == 12 * 2
    meta = json.loads((tmp_path / "cache" / "tokens.bin.json").read_text())
    assert meta["length"] == 12 and meta["dtype"] == "uint16" and meta["vocab_size"] == 256

    def must_not_encode(*args, **kwargs):
        raise AssertionError("an up-to-date cache was re-encoded")

    monkeypatch.setattr(dataset_module, "encode_documents", must_not_encode)
    assert cached_tokens(["hello", "world"], tok, path).tolist() == list(b"hello\n\nworld")


def test_stale_cache_is_rebuilt(tmp_path):
    path = tmp_path / "tokens.bin"
    text = "the cat sat on the mat. " * 20
    byte_tok = BPETokenizer.bytes()
    assert len(cached_tokens(text, byte_tok, path)) == len(text)
    bpe = BPETokenizer.train(text, vocab_size=270, progress=False)  # another tokenizer
    rebuilt = cached_tokens(text, bpe, path)
    assert rebuilt.tolist() == bpe.encode(text) and len(rebuilt) < len(text)
    assert cached_tokens("other text", bpe, path).tolist() == bpe.encode("other text")  # another text
    with open(path, "ab") as f:  # a damaged file (length no longer matches the sidecar)
        f.write(b"\0\0")
    assert cached_tokens("other text", bpe, path).tolist() == bpe.encode("other text")
    (tmp_path / "tokens.bin.json").write_text("{not json")
    assert cached_tokens("other text", bpe, path).tolist() == bpe.encode("other text")


def test_large_vocabulary_uses_uint32(tmp_path):
    big = BPETokenizer({i: bytes([i]) for i in range(256)}, [], None, {"<|endoftext|>": 70_000})
    tokens = cached_tokens(["a", "b"], big, tmp_path / "tokens.bin")
    assert tokens.dtype == np.uint32 and tokens.tolist() == [97, 70_000, 98]
    assert np.fromfile(tmp_path / "tokens.bin", dtype=np.uint32).tolist() == [97, 70_000, 98]


def test_dataset_from_texts_through_the_cache(tmp_path):
    text = builtin_corpus()[:20_000]
    data = TokenDataset.from_texts(text, BPETokenizer.bytes(), context_length=64, cache_path=tmp_path / "t.bin")
    assert isinstance(data.tokens, np.memmap) and len(data.tokens) == len(text.encode())
    x, y = data.get_batch("train", 2)
    assert x.shape == (2, 64)


# ------------------------------------------------------------ corpus


def test_builtin_corpus_is_the_python_docs_in_topic_order():
    from pydoc_data.topics import topics

    text = builtin_corpus()
    assert text == builtin_corpus() and len(text) > 100_000
    position = 0
    for name in sorted(topics):  # each topic, in name order, then a blank line
        body = topics[name].strip("\n")
        assert text.startswith(body, position), name
        position += len(body) + 2
        assert text[position - 2:position] in ("\n\n", "")
    assert position - 2 == len(text)
    assert 'The "assert" statement' in text


def test_load_texts(tmp_path):
    (tmp_path / "b.txt").write_text("second", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.txt").write_text("nested é", encoding="utf-8")
    (tmp_path / "skip.md").write_text("not text", encoding="utf-8")
    assert load_texts(tmp_path) == ["second", "nested é"]  # sorted by path: b.txt < sub/a.txt
    assert load_texts([tmp_path / "sub" / "a.txt", tmp_path / "b.txt"]) == ["nested é", "second"]
    with pytest.raises(FileNotFoundError):
        load_texts(tmp_path / "missing.txt")
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe\xfa")
    with pytest.raises(ValueError, match="not UTF-8"):
        load_texts(tmp_path / "bad.txt")


@pytest.mark.parametrize("change", [lambda s: s.pop("rng"), lambda s: s.update(rng="x"),
                                    lambda s: s.update(rng={"bit_generator": "PCG64", "state": 1})])
def test_a_damaged_data_state_is_a_clear_error(change):
    """A checkpoint's data_state with the right layout but a damaged generator state: one ValueError, and
    the dataset's generator is left as it was (not a KeyError, nor NumPy's "state must be a dict")."""
    data = TokenDataset(np.arange(100), context_length=8)
    state = data.state_dict()
    change(state)
    before = data.rng.bit_generator.state
    with pytest.raises(ValueError, match=r"data state: the batch generator's state \('rng'\) is missing or damaged"):
        data.load_state_dict(state)
    assert data.rng.bit_generator.state == before
