"""The NCCL backend: the Communicator interface over ``cupy.cuda.nccl.NcclCommunicator``.

Every call is enqueued on the current CUDA stream, ordered with the kernels
around it, and returns at once: a received activation is ready for the next
kernel on that stream without the host waiting. Point-to-point calls go inside
``groupStart()/groupEnd()``; a send and a recv between the same two ranks
must be in one group or they deadlock (``send_recv``).

NCCL has no timeout of its own: a peer that died leaves our kernels spinning
forever. So each call records a CUDA event, and ``synchronize()`` polls those
events, calling ``check_async_error()`` between polls; after ``timeout``
seconds it aborts the communicator (which frees the spinning kernels) and
raises ``CommError``. The host can also block elsewhere, in a copy or a
``.item()`` queued behind such a kernel; a watchdog thread catches that case
(oldest call unfinished for timeout + 5 s): it prints the error, aborts and
exits the process with code 1. The pipeline engine synchronizes once per step, and the
list of pending events is kept short so the host never runs far ahead.

Sub-groups: the members agree on the split through the rendezvous store and
the first member makes a fresh unique id: the same groups ``ncclCommSplit``
makes (CuPy binds no ``commSplit``), created with ``ncclCommInitRank``.
"""

from __future__ import annotations

import os
import sys
import threading
import time

from .communicator import CommError, Communicator, float_dtype_name

# ncclDataType_t and ncclRedOp_t values from nccl.h (stable since NCCL 2.10)
NCCL_DTYPES = {"int8": 0, "uint8": 1, "int32": 2, "uint32": 3, "int64": 4, "uint64": 5,
               "float16": 6, "float32": 7, "float64": 8, "bfloat16": 9}
NCCL_OPS = {"sum": 0, "max": 2, "avg": 4}
_MAX_PENDING = 32  # events kept before the host waits for the oldest (bounds run-ahead)


class NCCLCommunicator(Communicator):
    """One rank's NCCL communicator on ``device`` (an int GPU index)."""

    def __init__(self, rank: int, size: int, store, name: str, timeout: float, device: int):
        import cupy  # noqa: PLC0415 (the gpu extra)
        from cupy.cuda import nccl  # noqa: PLC0415

        super().__init__(rank, size, store, name, timeout)
        self.cupy, self.nccl, self.device = cupy, nccl, device
        self.pending: list = []  # (event, what, when issued) in issue order
        if rank == 0:
            store.set(f"{name}/nccl-uid", nccl.get_unique_id())
        uid = store.get(f"{name}/nccl-uid", timeout)
        # NcclCommunicator() blocks until every rank joins, with no timeout: meet in the store first
        store.arrive(f"{name}/nccl-ready", rank)
        store.wait_arrivals(f"{name}/nccl-ready", size, timeout)
        with cupy.cuda.Device(device):
            self.comm = nccl.NcclCommunicator(size, uid, rank)
        threading.Thread(target=self._watchdog, daemon=True, name=f"nccl-watchdog-{name}").start()

    def _watchdog(self) -> None:
        """The host can block where we do not poll (a copy, a ``.item()`` queued behind a send to a dead
        peer): if the oldest pending call stays unfinished past the timeout, say so, abort, and exit."""
        while self.comm is not None:
            time.sleep(1.0)
            unfinished = next(((w, t) for e, w, t in list(self.pending) if not e.done), None)
            if unfinished is None:
                continue
            what, issued = unfinished
            if time.monotonic() - issued > self.timeout + 5.0:
                print(f"minillm: error: rank {self.rank}: NCCL {what} did not complete within {self.timeout:g} s "
                      "(a peer died or hangs); aborting the communicator and exiting", file=sys.stderr, flush=True)
                self.abort()
                os._exit(1)

    # -------------------------------------------------------------- helpers
    def _dtype(self, array) -> int:
        name = float_dtype_name(array.dtype)
        if name not in NCCL_DTYPES:
            raise TypeError(f"NCCL cannot transfer dtype {array.dtype}")
        return NCCL_DTYPES[name]

    def _stream(self) -> int:
        return self.cupy.cuda.get_current_stream().ptr

    def _issued(self, what: str) -> None:
        """Record an event after an enqueued call; wait for old ones so the host stays close."""
        event = self.cupy.cuda.Event(disable_timing=True)
        event.record()
        self.pending.append((event, what, time.monotonic()))
        if len(self.pending) > _MAX_PENDING:
            self._wait(self.pending[: len(self.pending) - _MAX_PENDING])

    def _wait(self, entries) -> None:
        deadline = time.monotonic() + self.timeout
        for event, what, _ in entries:
            while not event.done:
                try:
                    self.comm.check_async_error()
                except Exception as error:  # an NcclError from a failed peer / network
                    self.abort()
                    raise CommError(f"rank {self.rank}: NCCL reported an error during {what}: {error}") from error
                if time.monotonic() > deadline:
                    self.abort()
                    raise CommError(f"rank {self.rank}: NCCL {what} did not complete within {self.timeout:g} s "
                                    "(a peer died or hangs); communicator aborted")
                time.sleep(0.0002)
        done = {id(entry[0]) for entry in entries}
        self.pending = [entry for entry in self.pending if id(entry[0]) not in done]

    def synchronize(self) -> None:
        self._wait(list(self.pending))

    # ------------------------------------------------------------ collectives
    def all_reduce(self, array, op: str = "sum"):
        self._check(array, "all_reduce")
        self._check_op(op)
        ptr = array.data.ptr
        self.comm.allReduce(ptr, ptr, array.size, self._dtype(array), NCCL_OPS[op], self._stream())
        self._issued(f"all_reduce({op})")
        return array

    def reduce_scatter(self, array, op: str = "sum"):
        self._check(array, "reduce_scatter")
        self._check_op(op)
        if array.ndim == 0 or array.shape[0] % self.size:
            raise ValueError(f"reduce_scatter: the first axis ({array.shape}) must divide by the group size {self.size}")
        shard = self.cupy.empty((array.shape[0] // self.size,) + array.shape[1:], dtype=array.dtype)
        self.comm.reduceScatter(array.data.ptr, shard.data.ptr, shard.size, self._dtype(array), NCCL_OPS[op],
                                self._stream())
        self._issued("reduce_scatter")
        return shard

    def all_gather(self, shard):
        self._check(shard, "all_gather")
        out = self.cupy.empty((shard.shape[0] * self.size,) + shard.shape[1:], dtype=shard.dtype)
        self.comm.allGather(shard.data.ptr, out.data.ptr, shard.size, self._dtype(shard), self._stream())
        self._issued("all_gather")
        return out

    def broadcast(self, array, root: int = 0):
        self._check(array, "broadcast")
        ptr = array.data.ptr
        self.comm.broadcast(ptr, ptr, array.size, self._dtype(array), root, self._stream())
        self._issued("broadcast")
        return array

    # ------------------------------------------------------ point to point
    def send(self, array, peer: int) -> None:
        self.send_recv(array, peer, None, None)

    def recv(self, array_out, peer: int):
        return self.send_recv(None, None, array_out, peer)

    def send_recv(self, send_array, send_peer, recv_out, recv_peer):
        """Any of the two may be None; both inside one group so a crossing pair cannot deadlock."""
        stream = self._stream()
        if send_array is not None:
            self._check(send_array, "send")
            self._check_peer(send_peer, "send")
        if recv_out is not None:
            self._check(recv_out, "recv")
            self._check_peer(recv_peer, "recv")
        self.nccl.groupStart()
        try:
            if send_array is not None:
                self.comm.send(send_array.data.ptr, send_array.size, self._dtype(send_array), send_peer, stream)
            if recv_out is not None:
                self.comm.recv(recv_out.data.ptr, recv_out.size, self._dtype(recv_out), recv_peer, stream)
        finally:
            self.nccl.groupEnd()
        self._issued(f"send/recv (to {send_peer}, from {recv_peer})")
        return recv_out

    def barrier(self) -> None:
        self.all_reduce(self.cupy.zeros(1, dtype=self.cupy.float32))
        self.synchronize()

    def abort(self) -> None:
        if getattr(self, "comm", None) is not None:
            self.comm.abort()
            self.comm = None

    def split(self, color, key: int | None = None):
        layout = self._split_layout(color, self.rank if key is None else key)
        if layout is None:
            return None
        name, members, new_rank = layout
        return NCCLCommunicator(new_rank, len(members), self.store, name, self.timeout, self.device)
