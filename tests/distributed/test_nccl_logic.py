"""The NCCL communicator's host-side logic without a GPU: the timeout polling, the async-error
check and the watchdog, driven by stand-ins for CuPy's events and NCCL's communicator.

(The transfers themselves need GPUs: benchmarks/pipeline_gpu.sh checks every collective on
NCCL against NumPy on two H200s.)"""

import time

import pytest

from minillm.distributed.communicator import CommError
from minillm.distributed.nccl import NCCLCommunicator


class Event:
    def __init__(self, done):
        self.done = done


class Comm:
    def __init__(self, error=None):
        self.error, self.aborted = error, False

    def check_async_error(self):
        if self.error:
            raise RuntimeError(self.error)

    def abort(self):
        self.aborted = True


def _communicator(pending, error=None, timeout=0.3):
    comm = object.__new__(NCCLCommunicator)   # no GPU: only the host-side state
    comm.rank, comm.size, comm.timeout, comm.name = 0, 2, timeout, "world"
    comm.comm, comm.pending = Comm(error), [(event, what, time.monotonic()) for event, what in pending]
    return comm


def test_finished_calls_are_cleared():
    comm = _communicator([(Event(True), "send"), (Event(True), "all_reduce")])
    comm.synchronize()
    assert comm.pending == []


def test_a_call_that_never_finishes_times_out_and_aborts():
    comm = _communicator([(Event(True), "send"), (Event(False), "send/recv (to 1, from None)")])
    inner = comm.comm
    start = time.monotonic()
    with pytest.raises(CommError, match=r"NCCL send/recv \(to 1, from None\) did not complete within 0.3 s"):
        comm.synchronize()
    assert 0.3 <= time.monotonic() - start < 2
    assert inner.aborted and comm.comm is None


def test_an_async_error_aborts_at_once():
    comm = _communicator([(Event(False), "all_reduce(sum)")], error="NCCL_ERROR_REMOTE_ERROR", timeout=30)
    inner = comm.comm
    with pytest.raises(CommError, match="NCCL reported an error during all_reduce"):
        comm.synchronize()
    assert inner.aborted


def test_watchdog_exits_when_the_host_is_stuck_elsewhere(monkeypatch):
    comm = _communicator([(Event(True), "send"), (Event(False), "recv")], timeout=0.1)
    exits = []
    monkeypatch.setattr("minillm.distributed.nccl.time.sleep", lambda s: None)
    monkeypatch.setattr("minillm.distributed.nccl.os._exit", lambda code: exits.append(code) or comm.abort())
    comm.pending[1] = (comm.pending[1][0], "recv", time.monotonic() - 10)   # issued long ago
    comm._watchdog()                    # returns once it has aborted (comm.comm is None)
    assert exits == [1]
