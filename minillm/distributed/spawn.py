"""Run a function on N local ranks and collect what each returns (tests, examples, notebooks).

    results = spawn(fn, world_size=2, args=(...,))   # fn(group, *args) on every rank
    results[r]                                       # what rank r returned

Each rank is a forked process with RANK / WORLD_SIZE / LOCAL_RANK /
MASTER_ADDR / MASTER_PORT set, in which ``init_process_group(backend)`` has
already run; ``fn`` receives the ``ProcessGroup``. If any rank raises, the
others are stopped and ``SpawnError`` carries that rank's traceback. For
real runs use ``minillm launch`` (one fresh interpreter per rank, output
prefixed with the rank); this helper is the in-process way to do the same.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import random
import socket
import time
import traceback


class SpawnError(RuntimeError):
    """A spawned rank failed; the message holds its traceback."""


def free_port() -> int:
    """A TCP port that was free a moment ago (for MASTER_PORT), chosen below the kernel's ephemeral range.

    Between this call and rank 0's bind the port stands unused; a port the kernel
    hands out by itself (``bind(0)``, an outgoing connection: the CPU transport
    makes dozens) comes from the ephemeral range, so a port below it cannot be
    taken that way in the meantime. Random, so that concurrent jobs rarely try the same one.
    """
    low = _ephemeral_range_start()
    chooser = random.Random(os.urandom(8))
    for _ in range(100):
        port = chooser.randrange(10_000, max(10_001, low))
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:   # all tried were taken: any free one
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ephemeral_range_start() -> int:
    """The first port the kernel hands out by itself (Linux: /proc; elsewhere IANA's 49152)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 49152


def _rank_main(fn, rank, world_size, port, backend, timeout, args, results):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        from .process_group import destroy_process_group, init_process_group  # noqa: PLC0415

        group = init_process_group(backend, timeout=timeout)
        value = fn(group, *args)
        results.put((rank, True, value))
        try:
            group.comm.barrier()  # keep our sockets open until every rank has its answer
        except Exception:  # noqa: BLE001 - a peer that died on purpose (fault tests)
            pass
        destroy_process_group()
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises
        results.put((rank, False, traceback.format_exc()))
        code = 1
    else:
        code = 0
    results.close()
    results.join_thread()  # flush the queue's feeder thread before leaving without cleanup
    os._exit(code)


def spawn(fn, world_size: int, args: tuple = (), backend: str = "cpu", timeout: float = 30.0,
          may_die: tuple = ()) -> list:
    """``fn(group, *args)`` on ``world_size`` forked ranks; their return values in rank order.

    Ranks listed in ``may_die`` are allowed to exit without an answer (fault
    tests kill them on purpose); their entry in the result is None.
    """
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    port = free_port()
    processes = [context.Process(target=_rank_main, args=(fn, r, world_size, port, backend, timeout, args, results))
                 for r in range(world_size)]
    for process in processes:
        process.start()
    values, failures, answered = {}, [], False
    deadline = time.monotonic() + timeout + 30
    try:
        while len(values) + len(failures) < world_size and not failures:
            try:
                rank, ok, value = results.get(timeout=0.2)
                (values.__setitem__(rank, value) if ok else failures.append((rank, value)))
                continue
            except queue.Empty:
                pass
            for rank, process in enumerate(processes):  # a rank that vanished without a word
                if rank not in values and process.exitcode is not None and process.exitcode != 0:
                    time.sleep(0.2)
                    if not results.empty():
                        break
                    if rank in may_die:
                        values[rank] = None
                    else:
                        failures.append((rank, f"exited with code {process.exitcode} without a result"))
            if time.monotonic() > deadline:
                missing = sorted(set(range(world_size)) - set(values))
                raise SpawnError(f"ranks {missing} gave no result within {timeout + 30:g} s")
        answered = not failures
    finally:   # every rank answered: let them leave; else (a failure, Ctrl-C here) stop them now
        for process in processes:
            process.join(timeout=timeout if answered else 0)
            if process.is_alive():
                process.kill()
                process.join()
    if failures:
        rank, trace = failures[0]
        raise SpawnError(f"rank {rank} failed:\n{trace}")
    return [values[r] for r in range(world_size)]
