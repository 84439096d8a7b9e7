"""The Communicator interface: what every parallel scheme asks of the wire.

Two implementations share it: ``nccl.py`` (GPUs, the engine) and ``cpu.py``
(processes on one machine, the test transport that lets every schedule run in
CI). Arrays are NumPy arrays for the CPU backend and CuPy arrays for NCCL;
float32, float16 and bfloat16 (``ml_dtypes``) buffers are supported.

    all_reduce(x, op)        x <- op over ranks of x, in place    ("sum" | "avg" | "max")
    reduce_scatter(x)        -> shard r of sum over ranks of x    (x.size divisible by size)
    all_gather(shard)        -> concat over ranks of shard        (rank order, flat -> (size*n,))
    broadcast(x, root)       x <- x of rank root, in place
    send(x, peer) / recv(out, peer)   point to point, matched in order per pair
    send_recv(x, peer_to, out, peer_from)  both at once (the pipeline's exchange)
    split(color, key)        -> a Communicator over the ranks with the same color
    barrier(), abort(), rank, size
    check_same(what, settings)        ValueError on every rank unless all passed equal settings

A collective is called by every rank of the communicator, in the same order,
with the same shapes; a point-to-point pair must match (same size and dtype).
Failures surface as ``CommError`` (a peer died, or timed out) within
``timeout`` seconds, naming the peer, never as a silent hang.
"""

from __future__ import annotations

import numpy as np

REDUCE_OPS = ("sum", "avg", "max")


class CommError(RuntimeError):
    """A collective or a point-to-point transfer failed: a peer died, hung or was aborted."""


def float_dtype_name(dtype) -> str:
    """'float32' | 'float16' | 'bfloat16' | ... for any array dtype (ml_dtypes' bfloat16 included)."""
    return np.dtype(dtype).name


SUPPORTED_DTYPES = ("float32", "float16", "bfloat16", "float64", "int32", "int64", "uint8")


class Communicator:
    """Base class: argument checks and the split bookkeeping both backends share.

    ``store`` is the rendezvous ``TCPStore``; ``name`` is a unique prefix for
    this communicator's keys in it; ``timeout`` bounds every wait (seconds).
    """

    def __init__(self, rank: int, size: int, store, name: str, timeout: float):
        self.rank, self.size = rank, size
        self.store, self.name, self.timeout = store, name, float(timeout)
        self._splits = 0
        self._checks = 0

    # ---------------------------------------------------------------- checks
    def _check(self, array, what: str) -> None:
        if float_dtype_name(array.dtype) not in SUPPORTED_DTYPES:
            raise TypeError(f"{what}: unsupported dtype {array.dtype} (use one of {', '.join(SUPPORTED_DTYPES)})")
        if not array.flags.c_contiguous:
            raise ValueError(f"{what}: the buffer must be C-contiguous (call .copy() / ascontiguousarray first)")

    def _check_op(self, op: str) -> None:
        if op not in REDUCE_OPS:
            raise ValueError(f"all_reduce: op must be one of {REDUCE_OPS}, got {op!r}")

    def _check_peer(self, peer: int, what: str) -> None:
        if not 0 <= peer < self.size or peer == self.rank:
            raise ValueError(f"{what}: peer {peer} is not another rank of this communicator (size {self.size})")

    # ------------------------------------------------------------ interface
    def all_reduce(self, array, op: str = "sum"):
        raise NotImplementedError

    def reduce_scatter(self, array):
        raise NotImplementedError

    def all_gather(self, shard):
        raise NotImplementedError

    def broadcast(self, array, root: int = 0):
        raise NotImplementedError

    def send(self, array, peer: int) -> None:
        raise NotImplementedError

    def recv(self, array_out, peer: int):
        raise NotImplementedError

    def send_recv(self, send_array, send_peer: int, recv_out, recv_peer: int):
        """Send to one peer and receive from one (possibly the same) peer without deadlock."""
        raise NotImplementedError

    def barrier(self) -> None:
        raise NotImplementedError

    def abort(self) -> None:
        raise NotImplementedError

    def synchronize(self) -> None:
        """Wait until every operation issued so far has completed (a no-op where calls are blocking)."""

    # ------------------------------------------------------------ agreement
    def check_same(self, what: str, settings: dict) -> None:
        """A collective: raise ValueError, on every rank alike, unless every rank passed equal ``settings``.

        Ranks started with different options (another seed, model size or
        layout on one node) would otherwise train something that is neither run,
        without a word, or fail later with an error far from the cause. Goes
        through the store (any picklable dict, no device buffers). ``settings``
        maps names to values, or to dicts of them (reported as ``outer.inner``).
        """
        tag = f"{self.name}/same{self._checks}"
        self._checks += 1
        self.store.arrive(tag, self.rank, settings)
        posted = self.store.wait_arrivals(tag, self.size, self.timeout)
        differences = settings_differences(posted)
        if differences:
            self.store.arrive(f"{tag}/read", self.rank)
            if self.rank == 0:   # the store lives on rank 0: keep it up until every rank has read the answer
                self.store.wait_arrivals(f"{tag}/read", self.size, self.timeout)
            raise ValueError(f"the ranks were started with different {what}: {'; '.join(differences)} "
                             "(start every rank with the same options)")

    # ---------------------------------------------------------------- split
    def _split_layout(self, color, key: int):
        """Agree on sub-groups through the store, as MPI_Comm_split / ncclCommSplit define them.

        Every rank posts (color, key); the members of a color are ordered by
        (key, old rank). Returns (the new communicator's name, the members' old
        ranks in new-rank order, this rank's new rank), or None for color None.
        """
        tag = f"{self.name}/split{self._splits}"
        self._splits += 1
        self.store.arrive(tag, self.rank, (color, int(key)))
        posted = self.store.wait_arrivals(tag, self.size, self.timeout)
        if color is None:
            return None
        members = sorted((k, r) for r, (c, k) in enumerate(posted) if c == color)
        members = [r for _, r in members]
        return f"{tag}/color{color}", members, members.index(self.rank)

    def split(self, color, key: int | None = None) -> "Communicator | None":
        """Sub-communicator of the ranks sharing ``color`` (None: take part in no group)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rank={self.rank}, size={self.size}, name={self.name!r})"


_UNSET = object()


def settings_differences(posted: list[dict], limit: int = 5) -> list[str]:
    """``"name: value on ranks a, b / value on rank c"`` for each setting that differs between the ranks' dicts.

    >>> settings_differences([{"seed": 1, "model": {"n_layer": 2}}, {"seed": 2, "model": {"n_layer": 2}}])
    ['seed: 1 on rank 0 / 2 on rank 1']
    """
    flat = [_flatten(settings) for settings in posted]
    lines = []
    for name in sorted(set().union(*flat)):
        values = [one.get(name, _UNSET) for one in flat]
        if all(value == values[0] for value in values):
            continue
        groups: dict[str, list[int]] = {}
        for rank, value in enumerate(values):
            shown = "(unset)" if value is _UNSET else repr(value) if isinstance(value, str) else str(value)
            long = [v for v in groups if v.startswith("<value ")]
            if len(shown) > 60:   # a random generator's state, say: only whether it differs matters
                shown = next((v for v, r in groups.items() if values[r[0]] == value), f"<value {len(long) + 1}>")
            groups.setdefault(shown, []).append(rank)
        lines.append(f"{name}: " + " / ".join(f"{shown} on rank{'s' if len(ranks) > 1 else ''} "
                                             f"{', '.join(map(str, ranks))}" for shown, ranks in groups.items()))
    return lines[:limit] + ([f"and {len(lines) - limit} more"] if len(lines) > limit else [])


def _flatten(settings: dict, prefix: str = "") -> dict:
    flat = {}
    for name, value in settings.items():
        if isinstance(value, dict) and prefix == "":
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[prefix + name] = value
    return flat
