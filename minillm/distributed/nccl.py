"""The NCCL backend: the Communicator interface over ``cupy.cuda.nccl.NcclCommunicator``.

Every call is enqueued on the current CUDA stream, ordered with the kernels
around it, and returns at once: a received activation is ready for the next
kernel on that stream without the host waiting. Point-to-point calls go inside
``groupStart()/groupEnd()``; a send and a recv between the same two ranks
must be in one group or they deadlock (``send_recv``).

NCCL has no timeout of its own: a peer that died leaves our kernels spinning
forever. So each call records a CUDA event, and ``synchronize()`` polls those
events, calling ``check_async_error()`` between polls; after ``timeout``
seconds it aborts (``ncclCommAbort``, which frees the spinning kernels) and
raises ``CommError``. The pipeline engine synchronizes once per step, and the
list of pending events is kept short so the host never runs far ahead.

A failure aborts EVERY NCCL communicator of the process (``abort_all``), not
only the one that noticed: they all enqueue on the same CUDA stream, so a
sub-group's kernel left spinning on the dead peer (the tied embedding's
all-reduce behind the pipeline's send) would block every later kernel, and
the interpreter's exit too: CuPy's ``NcclCommunicator.__dealloc__`` calls
``ncclCommDestroy``, which waits for that kernel while holding the GIL.

Two watchmen cover a host blocked where we do not poll (a copy or a
``.item()`` queued behind a send to a dead peer):

- one watchdog thread per process asks every communicator for NCCL's
  asynchronous error and looks at its oldest unfinished call: on an error,
  or past ``timeout + 5`` s, it prints the error, aborts them all (waiting at
  most ``ABORT_WAIT_S``) and exits the process with code 1;
- a thread needs the GIL, and a C call that blocks holding it (a CUDA call
  made without releasing it) would silence that thread. So the watchdog also
  re-arms ``faulthandler.dump_traceback_later`` at every round (a C thread
  that needs no GIL): if the rounds stop for ``timeout + HARD_MARGIN_S`` s,
  every thread's traceback is printed (where it hung) and the process exits
  with code 1. After a failure the same timer bounds the exit itself
  (``EXIT_GRACE_S``): a process whose communication failed has that long to
  print its error and leave.

Sub-groups: the members agree on the split through the rendezvous store and
the first member makes a fresh unique id: the same groups ``ncclCommSplit``
makes (CuPy binds no ``commSplit``), created with ``ncclCommInitRank``.
"""

from __future__ import annotations

import faulthandler
import os
import sys
import threading
import time
import weakref

from .communicator import CommError, Communicator, float_dtype_name

# ncclDataType_t and ncclRedOp_t values from nccl.h (stable since NCCL 2.10)
NCCL_DTYPES = {"int8": 0, "uint8": 1, "int32": 2, "uint32": 3, "int64": 4, "uint64": 5,
               "float16": 6, "float32": 7, "float64": 8, "bfloat16": 9}
NCCL_OPS = {"sum": 0, "max": 2, "avg": 4}
_MAX_PENDING = 32  # events kept before the host waits for the oldest (bounds run-ahead)
WATCH_INTERVAL_S = 1.0   # the watchdog's round
STALL_MARGIN_S = 5.0     # the watchdog acts at timeout + this (synchronize() raises at the timeout first)
HARD_MARGIN_S = 15.0     # no watchdog round for timeout + this: faulthandler dumps the stacks and exits
ABORT_WAIT_S = 10.0      # the watchdog waits this long for ncclCommAbort before exiting anyway
EXIT_GRACE_S = 20.0      # after a failure, the process is ended if it has not exited within this

_live = weakref.WeakSet()  # this process's NCCL communicators that are not aborted (nor garbage)
_state = {"watchdog": None, "failed": False}


def _arm(seconds: float | None) -> None:
    """(Re)start faulthandler's timer: after ``seconds`` without a re-arm, print every thread's stack and
    exit with code 1 (None: stop it). Never raises: without a usable stderr there is no timer."""
    try:
        if seconds is None:
            faulthandler.cancel_dump_traceback_later()
        else:
            faulthandler.dump_traceback_later(seconds, exit=True)
    except Exception:  # noqa: BLE001 - e.g. sys.stderr closed or None
        pass


def abort_all() -> None:
    """Abort every NCCL communicator of this process and bound the time left to exit (see the module doc)."""
    _state["failed"] = True
    _arm(EXIT_GRACE_S)   # if leaving hangs anyway: stacks, exit 1
    for comm in list(_live):
        comm.abort()


def _finished(event) -> bool:
    try:
        return event.done
    except Exception:  # noqa: BLE001 - a broken CUDA context: the main thread meets the error itself
        return True


def _trouble(comms, now: float):
    """(communicator, message) for the first one that NCCL reports an asynchronous error on (a failed peer,
    a broken link) or whose oldest unfinished call is older than its timeout + STALL_MARGIN_S; else None."""
    for comm in comms:
        inner = comm.comm
        try:
            if inner is not None:
                inner.check_async_error()
        except Exception as error:  # noqa: BLE001 - an NcclError
            return comm, f"NCCL reported an error: {error}"
        for event, what, issued in list(comm.pending):
            if now - issued > comm.timeout + STALL_MARGIN_S and not _finished(event):
                return comm, f"NCCL {what} did not complete within {comm.timeout:g} s (a peer died or hangs)"
    return None


def _watch_round(now: float | None = None) -> bool:
    """One round of the watchdog; False once the process is failing (the exit timer is armed then)."""
    if _state["failed"]:
        return False
    comms = list(_live)
    if not comms:
        _arm(None)
        return True
    trouble = _trouble(comms, time.monotonic() if now is None else now)
    if trouble is not None:
        comm, message = trouble
        print(f"minillm: error: rank {comm.rank}: {message}; aborting every communicator and exiting",
              file=sys.stderr, flush=True)
        aborting = threading.Thread(target=abort_all, daemon=True, name="nccl-abort")
        aborting.start()
        aborting.join(ABORT_WAIT_S)      # ncclCommAbort frees the GPU; exit even if it does not return
        os._exit(1)
        return False                     # (only where os._exit is replaced, in tests)
    _arm(max(c.timeout for c in comms) + HARD_MARGIN_S)   # the heartbeat
    return True


def _watchdog() -> None:
    while _watch_round():
        time.sleep(WATCH_INTERVAL_S)


def _start_watchdog() -> None:
    thread = _state["watchdog"]
    if thread is None or not thread.is_alive():
        _state["watchdog"] = threading.Thread(target=_watchdog, daemon=True, name="nccl-watchdog")
        _state["watchdog"].start()


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
        _live.add(self)
        _start_watchdog()

    # -------------------------------------------------------------- helpers
    def _dtype(self, array) -> int:
        name = float_dtype_name(array.dtype)
        if name not in NCCL_DTYPES:
            raise TypeError(f"NCCL cannot transfer dtype {array.dtype}")
        return NCCL_DTYPES[name]

    def _stream(self) -> int:
        return self.cupy.cuda.get_current_stream().ptr

    def _alive(self):
        """The NCCL communicator, or CommError when an earlier failure aborted it."""
        if self.comm is None:
            raise CommError(f"rank {self.rank}: the NCCL communicator {self.name!r} was aborted after an earlier "
                            "failure")
        return self.comm

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
                    self._alive().check_async_error()
                except CommError:
                    raise
                except Exception as error:  # an NcclError from a failed peer / network
                    abort_all()
                    raise CommError(f"rank {self.rank}: NCCL reported an error during {what}: {error}") from error
                if time.monotonic() > deadline:
                    abort_all()
                    raise CommError(f"rank {self.rank}: NCCL {what} did not complete within {self.timeout:g} s "
                                    "(a peer died or hangs); every communicator aborted")
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
        self._alive().allReduce(ptr, ptr, array.size, self._dtype(array), NCCL_OPS[op], self._stream())
        self._issued(f"all_reduce({op})")
        return array

    def reduce_scatter(self, array, op: str = "sum"):
        self._check(array, "reduce_scatter")
        self._check_op(op)
        if array.ndim == 0 or array.shape[0] % self.size:
            raise ValueError(f"reduce_scatter: the first axis ({array.shape}) must divide by the group size {self.size}")
        shard = self.cupy.empty((array.shape[0] // self.size,) + array.shape[1:], dtype=array.dtype)
        self._alive().reduceScatter(array.data.ptr, shard.data.ptr, shard.size, self._dtype(array), NCCL_OPS[op],
                                self._stream())
        self._issued("reduce_scatter")
        return shard

    def all_gather(self, shard):
        self._check(shard, "all_gather")
        out = self.cupy.empty((shard.shape[0] * self.size,) + shard.shape[1:], dtype=shard.dtype)
        self._alive().allGather(shard.data.ptr, out.data.ptr, shard.size, self._dtype(shard), self._stream())
        self._issued("all_gather")
        return out

    def broadcast(self, array, root: int = 0):
        self._check(array, "broadcast")
        ptr = array.data.ptr
        self._alive().broadcast(ptr, ptr, array.size, self._dtype(array), root, self._stream())
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
        comm = self._alive()
        self.nccl.groupStart()
        try:
            if send_array is not None:
                comm.send(send_array.data.ptr, send_array.size, self._dtype(send_array), send_peer, stream)
            if recv_out is not None:
                comm.recv(recv_out.data.ptr, recv_out.size, self._dtype(recv_out), recv_peer, stream)
        finally:
            self.nccl.groupEnd()
        self._issued(f"send/recv (to {send_peer}, from {recv_peer})")
        return recv_out

    def barrier(self) -> None:
        self.all_reduce(self.cupy.zeros(1, dtype=self.cupy.float32))
        self.synchronize()

    def abort(self) -> None:
        """``ncclCommAbort``: this communicator's kernels stop; every later call raises CommError."""
        comm, self.comm = getattr(self, "comm", None), None
        _live.discard(self)
        if comm is not None:
            try:
                comm.abort()
            except Exception as error:  # noqa: BLE001 - already failing: say so, keep aborting the others
                print(f"minillm: warning: rank {self.rank}: ncclCommAbort failed: {error}", file=sys.stderr, flush=True)

    def split(self, color, key: int | None = None):
        layout = self._split_layout(color, self.rank if key is None else key)
        if layout is None:
            return None
        name, members, new_rank = layout
        return NCCLCommunicator(new_rank, len(members), self.store, name, self.timeout, self.device)
