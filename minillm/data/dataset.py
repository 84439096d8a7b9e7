"""From text to training batches: token file, train/val split, windows, batches.

    documents ──encode──> one long 1-D array of token ids ──cache──> tokens.bin (+ tokens.bin.json)
    tokens[:90%] = train, tokens[90%:] = val                     (split by position)
    window i:  input  = tokens[i*stride     : i*stride + T]
               target = tokens[i*stride + 1 : i*stride + T + 1]  (the next token at every position)

A language model learns to predict token t+1 from tokens 0..t, so one window
of T+1 tokens gives T training examples at once: the input is the first T,
the target the last T (the same tokens shifted by one).

The token file is raw uint16 (uint32 when the vocabulary has
more than 65,536 ids), read back with ``np.memmap``: a corpus far larger
than memory costs nothing until batches touch it. Its JSON sidecar names the
tokenizer (a fingerprint of its vocabulary, merges, pattern and special
tokens), the text (a SHA-256), the dtype and the length; when any of them
does not match, the cache is stale and is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
from itertools import chain
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

CACHE_FORMAT = "minillm-tokens"
CACHE_VERSION = 1
END_OF_TEXT = "<|endoftext|>"


# ================================================================ tokens


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype for ids below ``vocab_size``: uint16 up to 65,536 ids, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def tokenizer_fingerprint(tokenizer) -> str:
    """SHA-256 of everything that decides a BPE tokenizer's output: vocabulary,
    merges, pre-tokenization pattern and special tokens."""
    h = hashlib.sha256()
    header = {"pattern": tokenizer.pattern, "special_tokens": sorted(tokenizer.special_tokens.items())}
    h.update(json.dumps(header).encode())
    for token_id, token in sorted(tokenizer.vocab.items()):
        h.update(token_id.to_bytes(4, "little") + len(token).to_bytes(4, "little") + token)
    for left, right in tokenizer.merges:
        h.update(left.to_bytes(4, "little") + right.to_bytes(4, "little"))
    return h.hexdigest()


def _as_documents(texts: str | Sequence[str]) -> list[str]:
    documents = [texts] if isinstance(texts, str) else list(texts)
    if not documents or not all(isinstance(d, str) for d in documents):
        raise TypeError("expected a string or a non-empty sequence of strings (documents)")
    return documents


def encode_documents(texts: str | Sequence[str], tokenizer, num_workers: int | None = None) -> np.ndarray:
    """All documents as one 1-D token array, documents separated by
    ``<|endoftext|>`` when the tokenizer has it (else by the tokens of a blank
    line). Special-token text inside a document is encoded as ordinary text."""
    documents = _as_documents(texts)
    if END_OF_TEXT in tokenizer.special_tokens:
        separator = [tokenizer.special_tokens[END_OF_TEXT]]
    else:
        separator = tokenizer.encode("\n\n", allowed_special="none")
    encoded = tokenizer.encode_batch(documents, num_workers=num_workers, allowed_special="none")
    pieces = chain.from_iterable((separator, ids) if k else (ids,) for k, ids in enumerate(encoded))
    total = sum(map(len, encoded)) + len(separator) * (len(encoded) - 1)
    return np.fromiter(chain.from_iterable(pieces), dtype=token_dtype(tokenizer.vocab_size), count=total)


def _text_sha256(documents: list[str]) -> str:
    h = hashlib.sha256()
    for document in documents:
        data = document.encode("utf-8", "surrogatepass")
        h.update(len(data).to_bytes(8, "little") + data)
    return h.hexdigest()


def cached_tokens(texts: str | Sequence[str], tokenizer, path: str | os.PathLike,
                  num_workers: int | None = None) -> np.ndarray:
    """The tokens of ``texts`` (see :func:`encode_documents`), read from the
    token file ``path`` when it is up to date, else encoded and written there.

    Returns a read-only ``np.memmap``. The sidecar is ``path + ".json"``.
    """
    path = Path(path)
    documents = _as_documents(texts)
    dtype = token_dtype(tokenizer.vocab_size)
    expected = {"format": CACHE_FORMAT, "version": CACHE_VERSION, "tokenizer": tokenizer_fingerprint(tokenizer),
                "vocab_size": tokenizer.vocab_size, "dtype": dtype.name, "text_sha256": _text_sha256(documents)}
    meta = _read_sidecar(path)
    if meta is not None and all(meta.get(k) == v for k, v in expected.items()):
        length = meta.get("length")
        if isinstance(length, int) and length > 0 and path.is_file() and path.stat().st_size == length * dtype.itemsize:
            return np.memmap(path, dtype=dtype, mode="r")  # up to date
    tokens = encode_documents(documents, tokenizer, num_workers)
    if tokens.size == 0:
        raise ValueError("the text encodes to no tokens at all")
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomically(path, tokens.tobytes())
    _write_atomically(_sidecar(path), (json.dumps({**expected, "length": int(tokens.size)}, indent=1) + "\n").encode())
    return np.memmap(path, dtype=dtype, mode="r")


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def _read_sidecar(path: Path) -> dict | None:
    try:
        meta = json.loads(_sidecar(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# ================================================================ windows and batches


class TokenWindows:
    """The (input, target) windows of a 1-D token array: window i starts at
    i * stride and holds ``context_length`` inputs and the same tokens shifted
    by one as targets. ``stride = context_length`` gives non-overlapping
    windows; ``stride = 1`` every possible start.

    >>> w = TokenWindows(np.arange(10), context_length=4, stride=3)
    >>> len(w), w[1]
    (2, (array([3, 4, 5, 6]), array([4, 5, 6, 7])))
    """

    def __init__(self, tokens: np.ndarray, context_length: int, stride: int) -> None:
        if context_length < 1 or stride < 1:
            raise ValueError(f"context_length={context_length} and stride={stride} must be >= 1")
        self.tokens = tokens
        self.context_length = context_length
        self.stride = stride
        extra = len(tokens) - (context_length + 1)  # tokens after the first window
        self._count = extra // stride + 1 if extra >= 0 else 0
        self._offsets = np.arange(context_length + 1)

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        if not -self._count <= index < self._count:
            raise IndexError(f"window {index} out of range ({self._count} windows)")
        inputs, targets = self.batch([index % self._count])
        return inputs[0], targets[0]

    def batch(self, indices) -> tuple[np.ndarray, np.ndarray]:
        """Windows ``indices`` as ``(inputs, targets)``, two int64 arrays (B, T) on the CPU."""
        starts = np.asarray(indices, dtype=np.int64) * self.stride
        rows = np.asarray(self.tokens[starts[:, None] + self._offsets], dtype=np.int64)  # (B, T + 1)
        return np.ascontiguousarray(rows[:, :-1]), np.ascontiguousarray(rows[:, 1:])


class TokenDataset:
    """A token array split by position into train (first ``1 - val_fraction``)
    and val (the rest), each read as :class:`TokenWindows`, with seeded random
    batches for training and a sequential pass for evaluation.

    The batch generator (NumPy PCG64, seeded by ``seed``) is part of the
    dataset's state: ``state_dict()`` is JSON-serialisable, and restoring it
    makes a resumed run draw exactly the batches the first run would have.
    """

    def __init__(self, tokens: np.ndarray, context_length: int, stride: int | None = None,
                 val_fraction: float = 0.1, seed: int = 0) -> None:
        if getattr(tokens, "ndim", None) != 1 or np.dtype(tokens.dtype).kind not in "ui":
            raise TypeError("tokens must be a 1-D integer array")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        self.tokens = tokens
        self.context_length = context_length
        self.stride = context_length if stride is None else stride
        self.val_fraction = val_fraction
        n_val = round(len(tokens) * val_fraction)
        n_train = len(tokens) - n_val
        self.train = TokenWindows(tokens[:n_train], context_length, self.stride)
        self.val = TokenWindows(tokens[n_train:], context_length, self.stride)
        if len(self.train) == 0:
            raise ValueError(f"the train split has {n_train} tokens, too few for one window of "
                             f"context_length + 1 = {context_length + 1}: use more text or a shorter context")
        self.rng = np.random.Generator(np.random.PCG64(seed))

    @classmethod
    def from_texts(cls, texts: str | Sequence[str], tokenizer, context_length: int,
                   cache_path: str | os.PathLike | None = None, num_workers: int | None = None,
                   **options: Any) -> "TokenDataset":
        """Encode ``texts`` (through the token file ``cache_path`` when given) and
        build the dataset; ``options`` are those of the constructor."""
        if cache_path is None:
            tokens = encode_documents(texts, tokenizer, num_workers)
        else:
            tokens = cached_tokens(texts, tokenizer, cache_path, num_workers)
        return cls(tokens, context_length, **options)

    def split(self, name: str) -> TokenWindows:
        """The windows of "train" or "val" (ValueError when the split has none)."""
        if name not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {name!r}")
        windows = self.train if name == "train" else self.val
        if len(windows) == 0:
            raise ValueError(f"the {name} split has {len(windows.tokens)} tokens, too few for one window of "
                             f"context_length + 1 = {self.context_length + 1} (val_fraction={self.val_fraction})")
        return windows

    def get_batch(self, split: str, batch_size: int,
                  rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``batch_size`` windows drawn uniformly (with replacement) from ``split``:
        ``(inputs, targets)``, int64 (B, T) on the CPU. ``rng`` defaults to the
        dataset's own generator (the one saved by ``state_dict``)."""
        windows = self.split(split)
        indices = (rng or self.rng).integers(0, len(windows), size=batch_size)
        return windows.batch(indices)

    def iter_batches(self, split: str, batch_size: int,
                     drop_last: bool = False) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Every window of ``split`` once, in order, ``batch_size`` at a time (for
        evaluation; the last batch is smaller unless ``drop_last``)."""
        windows = self.split(split)
        stop = len(windows) - len(windows) % batch_size if drop_last else len(windows)
        for start in range(0, stop, batch_size):
            yield windows.batch(np.arange(start, min(start + batch_size, stop)))

    def num_batches(self, split: str, batch_size: int, drop_last: bool = False) -> int:
        """How many batches ``iter_batches`` yields."""
        count = len(self.split(split))
        return count // batch_size if drop_last else -(-count // batch_size)

    # ------------------------------------------------------------ resume

    def _layout(self) -> dict[str, Any]:
        return {"num_tokens": len(self.tokens), "context_length": self.context_length, "stride": self.stride,
                "val_fraction": self.val_fraction}

    def state_dict(self) -> dict[str, Any]:
        """The batch generator's state and the dataset layout it belongs to (JSON-serialisable)."""
        return {"rng": self.rng.bit_generator.state, **self._layout()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the batch sequence saved by ``state_dict`` (ValueError if the layout differs)."""
        saved = {k: state.get(k) for k in self._layout()}
        if saved != self._layout():
            raise ValueError(f"data state is for a different dataset: saved {saved}, this one {self._layout()}")
        try:
            np.random.PCG64().state = state["rng"]        # a scratch generator: ours is untouched if it fails
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"data state: the batch generator's state ('rng') is missing or damaged "
                             f"({type(error).__name__}: {error})") from None
        self.rng.bit_generator.state = state["rng"]
