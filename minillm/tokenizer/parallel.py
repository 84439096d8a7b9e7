"""encode_batch over several processes.

Pure-Python BPE holds the GIL, so threads would not help; processes do.

1. **Cut** the batch into a few tasks per worker (``PIECES_PER_WORKER``):
   short texts are tasks as they are; a long text is cut at safe line breaks
   (:func:`~minillm.tokenizer.pretokenize.split_blocks`, the cuts streaming
   training uses), where the GPT-2 and GPT-4 patterns give exactly the chunks
   of the whole text, so the pieces' ids, joined, are the text's ids.
   Only texts encoded as ordinary text are cut (no special-token text in
   them, no lone surrogate), so special tokens and errors behave exactly as
   in :meth:`BPETokenizer.encode`.
2. **Encode** the tasks in a pool of processes. With ``fork`` (Linux) the
   workers inherit the tokenizer, chunk cache included, without copying it;
   elsewhere it is pickled once per worker. Only the text goes out, and ids
   come back packed as 4-byte ints (``bytes``, one memcpy to pickle) rather
   than as a list of Python ints.
3. **Join** each text's pieces in order and unpack them into a list.

Starting the workers costs ~30-50 ms on a 2-core laptop; below
``MIN_PARALLEL_CHARS`` of text in the whole batch that is more than it saves,
so small batches are encoded in this process whatever ``num_workers`` says.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from array import array
from collections.abc import Sequence

import regex

from .bpe import ID_TYPECODE
from .pretokenize import GPT2_PATTERN, GPT4_PATTERN, split_blocks

MIN_PARALLEL_CHARS = 1 << 18  # ~256 K characters in the batch (about 45 ms of encoding)
PIECES_PER_WORKER = 2  # a few, so a worker that finishes early takes another
_CUTTABLE_PATTERNS = (GPT2_PATTERN, GPT4_PATTERN)  # see split_blocks
_SURROGATE = regex.compile("[\ud800-\udfff]")

_worker_tokenizer = None
_worker_special: tuple = ()


def _init_worker(tokenizer, allowed_special, disallowed_special) -> None:
    global _worker_tokenizer, _worker_special
    _worker_tokenizer = tokenizer
    _worker_special = (allowed_special, disallowed_special)


def _encode_task(task: tuple[bool, str]) -> bytes:
    """Packed ids of one task: ordinary text (maybe a piece) or a whole text."""
    ordinary, text = task
    if ordinary:
        return _worker_tokenizer._encode_packed(text)
    return array(ID_TYPECODE, _worker_tokenizer.encode(text, *_worker_special)).tobytes()


def _tasks(tokenizer, texts: list[str], piece_chars: int, allowed_special, disallowed_special):
    """(text index, (ordinary, text or piece)) for every task, in order."""
    allowed, disallowed = tokenizer._special_sets(allowed_special, disallowed_special)
    specials = allowed | disallowed
    cuttable = tokenizer.pattern in _CUTTABLE_PATTERNS
    for k, text in enumerate(texts):
        ordinary = (
            cuttable
            and not any(s in text for s in specials)
            and (text.isascii() or _SURROGATE.search(text) is None)
        )
        if ordinary and len(text) > piece_chars:
            for piece in split_blocks(text, piece_chars):
                yield k, (True, piece)
        else:
            yield k, (ordinary, text)


def encode_batch(tokenizer, texts: Sequence[str], num_workers: int | None,
                 allowed_special="none_raise", disallowed_special="all") -> list[list[int]]:
    texts = list(texts)
    workers = num_workers if num_workers is not None else (os.cpu_count() or 1)
    total_chars = sum(map(len, texts))
    if workers <= 1 or total_chars < MIN_PARALLEL_CHARS:
        return [tokenizer.encode(t, allowed_special, disallowed_special) for t in texts]

    piece_chars = total_chars // (workers * PIECES_PER_WORKER) + 1
    owners, tasks = zip(*_tasks(tokenizer, texts, piece_chars, allowed_special, disallowed_special))
    if len(tasks) == 1:  # one text that cannot be cut
        return [tokenizer.encode(texts[0], allowed_special, disallowed_special)]
    workers = min(workers, len(tasks))
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    with mp.get_context(method).Pool(
        workers, _init_worker, (tokenizer, allowed_special, disallowed_special)
    ) as pool:
        packed = pool.map(_encode_task, tasks, chunksize=max(1, len(tasks) // (workers * 4)))

    joined = [array(ID_TYPECODE) for _ in texts]
    for k, data in zip(owners, packed):
        joined[k].frombytes(data)
    return [ids.tolist() for ids in joined]
