"""The NCCL communicator's host-side logic without a GPU: the timeout polling, the async-error
check, aborting every communicator of the process, the watchdog and its faulthandler timer,
driven by stand-ins for CuPy's events and NCCL's communicator.

(The transfers themselves need GPUs: benchmarks/pipeline_gpu.sh checks every collective on
NCCL against NumPy on two H200s.)"""

import subprocess
import sys
import time
import weakref

import pytest

from minillm.distributed import nccl
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


class FaultHandler:
    """Records what the module asks of ``faulthandler`` (the real one would end the test process)."""

    def __init__(self):
        self.calls = []

    def dump_traceback_later(self, timeout, exit=False):
        self.calls.append(("arm", timeout, exit))

    def cancel_dump_traceback_later(self):
        self.calls.append(("cancel",))


@pytest.fixture
def process(monkeypatch):
    """A clean process-wide state: no live communicators, not failing, faulthandler recorded."""
    handler = FaultHandler()
    monkeypatch.setattr(nccl, "faulthandler", handler)
    monkeypatch.setattr(nccl, "_live", weakref.WeakSet())
    monkeypatch.setattr(nccl, "_state", {"watchdog": None, "failed": False})
    return handler


def _communicator(pending, error=None, timeout=0.3, name="world"):
    comm = object.__new__(NCCLCommunicator)   # no GPU: only the host-side state
    comm.rank, comm.size, comm.timeout, comm.name = 0, 2, timeout, name
    comm.comm, comm.pending = Comm(error), [(event, what, time.monotonic()) for event, what in pending]
    nccl._live.add(comm)
    return comm


def test_finished_calls_are_cleared(process):
    comm = _communicator([(Event(True), "send"), (Event(True), "all_reduce")])
    comm.synchronize()
    assert comm.pending == []


def test_a_call_that_never_finishes_times_out_and_aborts_every_communicator(process):
    world = _communicator([(Event(True), "send"), (Event(False), "send/recv (to 1, from None)")])
    tied = _communicator([(Event(False), "all_reduce(sum)")], name="tied")   # queued behind it, same stream
    inner = world.comm, tied.comm
    start = time.monotonic()
    with pytest.raises(CommError, match=r"NCCL send/recv \(to 1, from None\) did not complete within 0.3 s"):
        world.synchronize()
    assert 0.3 <= time.monotonic() - start < 2
    assert all(c.aborted for c in inner) and world.comm is None and tied.comm is None and not nccl._live
    assert process.calls == [("arm", nccl.EXIT_GRACE_S, True)]      # the exit itself is bounded
    with pytest.raises(CommError, match="'tied' was aborted after an earlier failure"):
        tied.synchronize()                                          # no call reaches an aborted NCCL comm


def test_an_async_error_aborts_at_once(process):
    comm = _communicator([(Event(False), "all_reduce(sum)")], error="NCCL_ERROR_REMOTE_ERROR", timeout=30)
    other = _communicator([], name="tied")
    inner = comm.comm, other.comm
    with pytest.raises(CommError, match="NCCL reported an error during all_reduce"):
        comm.synchronize()
    assert all(c.aborted for c in inner)


def test_watchdog_aborts_all_and_exits_when_the_host_is_stuck_elsewhere(process, monkeypatch, capsys):
    world = _communicator([(Event(True), "send"), (Event(False), "recv")], timeout=0.1)
    tied = _communicator([(Event(False), "all_reduce(sum)")], name="tied")
    inner = world.comm, tied.comm
    exits = []
    monkeypatch.setattr("minillm.distributed.nccl.os._exit", exits.append)
    world.pending[1] = (world.pending[1][0], "recv", time.monotonic() - 10)   # issued long ago
    assert nccl._watch_round() is False
    assert exits == [1] and all(c.aborted for c in inner) and not nccl._live
    assert "rank 0: NCCL recv did not complete within 0.1 s" in capsys.readouterr().err


def test_watchdog_exits_on_an_async_error_at_once(process, monkeypatch, capsys):
    quiet = _communicator([(Event(False), "send")], timeout=60)                     # recent: no stall
    failing = _communicator([], error="NCCL_ERROR_REMOTE_ERROR", name="tied")
    inner = quiet.comm, failing.comm
    exits = []
    monkeypatch.setattr("minillm.distributed.nccl.os._exit", exits.append)
    assert nccl._watch_round() is False
    assert exits == [1] and all(c.aborted for c in inner)
    assert "NCCL reported an error: NCCL_ERROR_REMOTE_ERROR; aborting every communicator" in capsys.readouterr().err


def test_watchdog_round_rearms_the_hard_timer_while_all_is_well(process):
    assert nccl._watch_round() is True                               # nothing to watch: no timer
    assert process.calls == [("cancel",)]
    kept = [_communicator([(Event(False), "send")], timeout=7),     # unfinished, but recent
            _communicator([], timeout=3, name="tied")]               # (the registry holds weak references)
    assert nccl._watch_round() is True
    assert process.calls[-1] == ("arm", 7 + nccl.HARD_MARGIN_S, True)
    nccl.abort_all()
    assert all(c.comm is None for c in kept)
    calls = len(process.calls)
    assert nccl._watch_round() is False and len(process.calls) == calls   # failing: the exit timer stays


HOLD_THE_GIL = "re.match(r'(a+)+$', 'a' * 64 + 'b')"   # catastrophic backtracking: C code that keeps the GIL


@pytest.mark.parametrize("how", ["heartbeat", "after a failure"])
def test_a_process_blocked_with_the_gil_held_still_exits(how):
    """The watchdog thread cannot run while a C call holds the GIL; faulthandler's C thread ends the process."""
    arm = ("nccl.HARD_MARGIN_S = 1.0\n"
           "class Comm: timeout, pending, rank, comm = 0.5, [], 0, None\n"
           "comm = Comm()\nnccl._live.add(comm)\n"
           "nccl._watch_round()\n") if how == "heartbeat" else "nccl.EXIT_GRACE_S = 1.5\nnccl.abort_all()\n"
    code = ("import re\nfrom minillm.distributed import nccl\n" + arm +
            f"print('blocking', flush=True)\n{HOLD_THE_GIL}\nprint('not reached', flush=True)\n")
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stderr
    assert done.stdout.strip() == "blocking" and "Timeout" in done.stderr and "<string>" in done.stderr
    assert time.monotonic() - start < 30
