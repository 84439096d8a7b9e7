"""encode_batch over several processes.

Pure-Python BPE holds the GIL, so threads would not help; processes do.

1. **Share out** the batch in ``num_workers`` parts of about equal length.
   A long text is cut at safe line breaks (:func:`~minillm.tokenizer.
   pretokenize.split_even`, the cuts streaming training uses), where the
   GPT-2 and GPT-4 patterns give exactly the chunks of the whole text, so
   the pieces' ids, joined, are the text's ids. Only texts encoded as
   ordinary text are cut (no special-token text in them, no lone
   surrogate), so special tokens and errors behave exactly as in
   :meth:`BPETokenizer.encode`.
2. **Encode** the parts: the calling process takes the first part itself
   and ``num_workers - 1`` worker processes take the others, at the same
   time. A worker is started with its part in hand: with ``fork`` (Linux)
   it inherits the tokenizer (chunk cache included) and its texts without
   any copying or messages, and starts encoding at once; elsewhere they are
   pickled to it. It sends back one message through a pipe: its ids packed
   as 4-byte ints (``bytes``, pickled as one copy), not lists of Python ints.
   (A ``multiprocessing.Pool`` would send the part through a feeder thread
   that must wait for this process to release the GIL, which its own
   encoding holds for tens of milliseconds at a time.)
3. **Join** each text's pieces in order and unpack them into a list.

A worker costs ~30-40 ms on a 2-core laptop beyond its share of the work:
the fork, and copy-on-write page faults in both processes the first time
each writes to a page they share (~6,500 faults, 15-25 ms, for half of
tinyshakespeare). Below ``MIN_PARALLEL_CHARS`` characters in the whole batch
that is more than the half of the work it saves, so smaller batches are
encoded in this process whatever ``num_workers`` says.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from array import array
from collections.abc import Sequence

import regex

from .bpe import ID_TYPECODE
from .pretokenize import GPT2_PATTERN, GPT4_PATTERN, split_even

MIN_PARALLEL_CHARS = 1 << 22  # 4,194,304 characters in the batch (~280 ms of first-call encoding, ~100 ms warm;
                              # with the word cache, 1.1 MB took 10.0 / 13.0 MB/s in 2 processes against
                              # 15.3 / 48.3 in 1, first call / again, load 1.7)
_CUTTABLE_PATTERNS = (GPT2_PATTERN, GPT4_PATTERN)  # see split_blocks
_SURROGATE = regex.compile("[\ud800-\udfff]")


def _encode_tasks(tokenizer, tasks: list[tuple[bool, str]], special: tuple) -> list[bytes]:
    """Packed ids of each task: ordinary text (maybe a piece of a text) or a
    whole text for :meth:`~BPETokenizer.encode`."""
    return [
        tokenizer._encode_packed(text) if ordinary else array(ID_TYPECODE, tokenizer.encode(text, *special)).tobytes()
        for ordinary, text in tasks
    ]


def _worker(connection, tokenizer, tasks: list[tuple[bool, str]], special: tuple) -> None:
    """A worker process: encode its tasks, send ("ok", packed) or ("error", exception)."""
    try:
        message = ("ok", _encode_tasks(tokenizer, tasks, special))
    except Exception as error:  # noqa: BLE001 (re-raised in the calling process)
        message = ("error", error)
    connection.send(message)
    connection.close()


def _share_out(tokenizer, texts: list[str], parts: int, allowed_special, disallowed_special):
    """``parts`` lists of (text index, (ordinary, text or piece)) of about equal length, in order."""
    allowed, disallowed = tokenizer._special_sets(allowed_special, disallowed_special)
    specials = allowed | disallowed
    cuttable = tokenizer.pattern in _CUTTABLE_PATTERNS
    share = sum(map(len, texts)) / parts
    tasks = []
    for k, text in enumerate(texts):
        ordinary = (
            cuttable
            and not any(s in text for s in specials)
            and (text.isascii() or _SURROGATE.search(text) is None)
        )
        n = round(len(text) / share) if ordinary else 0
        tasks.extend((k, (ordinary, piece)) for piece in (split_even(text, n) if n > 1 else [text]))
    shares, filled = [[] for _ in range(parts)], 0
    for task in tasks:  # consecutive tasks; each goes where its middle character falls
        size = len(task[1][1])
        shares[min(int((filled + size / 2) / share), parts - 1)].append(task)
        filled += size
    return [s for s in shares if s]


def encode_batch(tokenizer, texts: Sequence[str], num_workers: int | None,
                 allowed_special="none_raise", disallowed_special="all") -> list[list[int]]:
    texts = list(texts)
    workers = num_workers if num_workers is not None else (os.cpu_count() or 1)
    total_chars = sum(map(len, texts))
    if workers <= 1 or total_chars < MIN_PARALLEL_CHARS or total_chars == 0:
        return [tokenizer.encode(t, allowed_special, disallowed_special) for t in texts]

    shares = _share_out(tokenizer, texts, workers, allowed_special, disallowed_special)
    special = (allowed_special, disallowed_special)
    context = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    started = []
    try:
        for share in shares[1:]:
            receive, send = context.Pipe(duplex=False)
            process = context.Process(target=_worker, args=(send, tokenizer, [t for _, t in share], special),
                                      daemon=True)
            process.start()
            send.close()  # the worker holds the other copy: recv() sees EOF if it dies
            started.append((process, receive))
        packed = _encode_tasks(tokenizer, [t for _, t in shares[0]], special)  # meanwhile, our own part
        for process, receive in started:
            try:
                status, result = receive.recv()
            except EOFError:
                raise RuntimeError(f"encode_batch worker {process.pid} died (exit code {process.exitcode})") from None
            if status == "error":
                raise result
            packed.extend(result)
    finally:
        for process, receive in started:
            receive.close()
            process.terminate()  # done or no longer needed
            process.join()

    joined = [array(ID_TYPECODE) for _ in texts]
    owners = (k for share in shares for k, _ in share)
    for k, data in zip(owners, packed):
        joined[k].frombytes(data)
    return [ids.tolist() for ids in joined]
