"""Learning BPE merges from chunk counts, with incremental pair counts.

The textbook loop (minbpe's ``basic.py``) recounts every adjacent pair of
the whole corpus after each merge: O(corpus x merges). Two facts make it fast:

1. **Work on distinct chunks, weighted by frequency.** Tinyshakespeare has
   297,833 chunks but only 15,057 distinct ones; " the" is counted once with
   weight 5,000-odd instead of 5,000 times.
2. **Update counts incrementally.** A merge of (a, b) only changes the
   chunks that contain a next to b. We keep ``where[pair]`` = the chunks that
   contain the pair, and for just those chunks subtract the counts of their
   old pairs and add the counts of their new ones. All other counts stay.

The most frequent pair comes from a heap of ``(-count, left_id, right_id)``
entries. When a count drops, its entry is left in the heap ("lazy deletion")
and fixed when it reaches the top; when a count grows, a new entry is pushed.

**Tie-breaking (deterministic):** the pair with the highest count wins; among
equal counts, the pair with the smallest left id, then the smallest right id.
Ids of trained tokenizers are byte values (0-255) for single bytes and
256, 257, ... in the order tokens are created, so the result depends only on
the chunk counts, never on the order the corpus was read in.

**Duplicate tokens:** two different merges can spell the same bytes
("ab" + "c" and "a" + "bc"). The second one reuses the first one's id (as
Hugging Face's trainer does), so every token's bytes are distinct; it is
still a merge (it has a rank) but does not use up vocabulary.

Worked example (``aaabdaaabac``, the Wikipedia example, as one chunk):

>>> merges, vocab = learn_merges({"aaabdaaabac": 1}, vocab_size=259)
>>> [(vocab[a], vocab[b], vocab[new]) for a, b, new in merges]
[(b'a', b'a', b'aa'), (b'a', b'b', b'ab'), (b'aa', b'ab', b'aaab')]

exactly Wikipedia's Z = aa, Y = ab, X = ZY. After "aa" both ("aa", "a") and
("a", "b") occur twice; the tie goes to the smaller left id (97 < 256).

Not handled here: chunking (see pretokenize.py), special tokens (added by
the tokenizer after training).
"""

from __future__ import annotations

import heapq
from collections import defaultdict
from collections.abc import Mapping


def merge_pair(ids: list[int], left: int, right: int, new: int) -> list[int] | None:
    """Replace every non-overlapping (left, right), left to right, by ``new``.

    Returns None when the pair does not occur (so callers can skip work).

    >>> merge_pair([1, 1, 1, 2], 1, 1, 9)
    [9, 1, 2]
    >>> merge_pair([1, 2], 2, 1, 9) is None
    True
    """
    out: list[int] = []
    i, n = 0, len(ids)
    found = False
    while i < n:
        try:
            j = ids.index(left, i)
        except ValueError:
            break
        if j + 1 < n and ids[j + 1] == right:
            out.extend(ids[i:j])
            out.append(new)
            i = j + 2
            found = True
        else:
            out.extend(ids[i : j + 1])
            i = j + 1
    if not found:
        return None
    out.extend(ids[i:])
    return out


def learn_merges(
    chunk_counts: Mapping[str, int],
    vocab_size: int,
    progress: bool = False,
) -> tuple[list[tuple[int, int, int]], dict[int, bytes]]:
    """Learn merges until the vocabulary has ``vocab_size`` tokens.

    Returns (merges, vocab): merges as (left_id, right_id, new_id) in the
    order learned (= priority order for encoding), vocab as id -> bytes with
    the 256 single bytes as ids 0-255. Stops early if no pair is left.
    """
    if vocab_size < 256:
        raise ValueError(f"vocab_size must be at least 256 (the byte alphabet), got {vocab_size}")
    vocab: dict[int, bytes] = {i: bytes([i]) for i in range(256)}
    bytes_to_id: dict[bytes, int] = {b: i for i, b in vocab.items()}

    # Distinct chunks as lists of byte ids, with their frequency. Chunks of
    # one byte have no pair and are left out.
    words: list[list[int]] = []
    weights: list[int] = []
    for chunk, count in chunk_counts.items():
        ids = list(chunk.encode("utf-8"))
        if len(ids) > 1:
            words.append(ids)
            weights.append(count)

    pair_counts: dict[tuple[int, int], int] = defaultdict(int)
    where: dict[tuple[int, int], set[int]] = defaultdict(set)
    for wi, (ids, w) in enumerate(zip(words, weights)):
        for pair in zip(ids, ids[1:]):
            pair_counts[pair] += w
            where[pair].add(wi)
    heap = [(-c, a, b) for (a, b), c in pair_counts.items()]
    heapq.heapify(heap)

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=vocab_size - 256, desc="bpe merges", unit="token")
    merges: list[tuple[int, int, int]] = []
    while len(vocab) < vocab_size and heap:
        neg, a, b = heapq.heappop(heap)
        count = pair_counts.get((a, b), 0)
        if count != -neg:  # stale entry: re-queue with its true count
            if 0 < count < -neg:
                heapq.heappush(heap, (-count, a, b))
            continue
        merged = vocab[a] + vocab[b]
        new = bytes_to_id.get(merged)
        if new is None:
            new = len(vocab)
            vocab[new] = merged
            bytes_to_id[merged] = new
            if bar is not None:
                bar.update(1)
        merges.append((a, b, new))
        _apply_merge(words, weights, pair_counts, where, heap, a, b, new)
    if bar is not None:
        bar.close()
    return merges, vocab


def _apply_merge(words, weights, pair_counts, where, heap, a: int, b: int, new: int) -> None:
    """Merge (a, b) -> new in every chunk that has it; update counts and heap."""
    delta: dict[tuple[int, int], int] = defaultdict(int)
    for wi in where.pop((a, b)):
        old = words[wi]
        merged = merge_pair(old, a, b, new)
        if merged is None:  # the pair left this chunk in an earlier merge
            continue
        words[wi] = merged
        w = weights[wi]
        for pair in zip(old, old[1:]):
            delta[pair] -= w
        for pair in zip(merged, merged[1:]):
            delta[pair] += w
            if new in pair:
                where[pair].add(wi)
    for pair, d in delta.items():
        if d:
            c = pair_counts[pair] + d
            pair_counts[pair] = c
            if d > 0:
                heapq.heappush(heap, (-c, pair[0], pair[1]))
    pair_counts.pop((a, b), None)
