"""encode_batch over several processes.

Pure-Python BPE holds the GIL, so threads would not help; processes do.
Each worker gets the tokenizer once (inherited by ``fork`` where available,
warm chunk cache included; pickled otherwise) and encodes whole texts.
Results come back as lists of ints (pickled), in input order.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from collections.abc import Sequence

_MIN_PARALLEL_CHARS = 1 << 18  # below this, starting workers costs more than it saves
_worker_tokenizer = None
_worker_special: tuple = ()


def _init_worker(tokenizer, allowed_special, disallowed_special) -> None:
    global _worker_tokenizer, _worker_special
    _worker_tokenizer = tokenizer
    _worker_special = (allowed_special, disallowed_special)


def _encode_one(text: str) -> list[int]:
    return _worker_tokenizer.encode(text, *_worker_special)


def encode_batch(tokenizer, texts: Sequence[str], num_workers: int | None,
                 allowed_special="none_raise", disallowed_special="all") -> list[list[int]]:
    texts = list(texts)
    workers = num_workers if num_workers is not None else (os.cpu_count() or 1)
    workers = min(workers, len(texts))
    if workers <= 1 or (num_workers is None and sum(map(len, texts)) < _MIN_PARALLEL_CHARS):
        return [tokenizer.encode(t, allowed_special, disallowed_special) for t in texts]
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    context = mp.get_context(method)
    chunksize = max(1, len(texts) // (workers * 4))
    with context.Pool(workers, _init_worker, (tokenizer, allowed_special, disallowed_special)) as pool:
        return pool.map(_encode_one, texts, chunksize=chunksize)
