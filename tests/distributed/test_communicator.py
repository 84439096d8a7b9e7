"""The CPU backend's collectives against NumPy references, on 2 and 4 forked ranks.

Each rank builds its input from (seed, rank), so every rank (and the test) can
compute every other rank's input and the exact expected result.
"""

import socket

import numpy as np
import pytest

from minillm.distributed import CommError, read_environment
from minillm.distributed.spawn import SpawnError, spawn

try:
    import ml_dtypes
except ImportError:  # bf16 cases skip
    ml_dtypes = None

DTYPES = ["float32", "float16", "bfloat16"]


def _dtype(name):
    if name == "bfloat16":
        if ml_dtypes is None:
            pytest.skip("ml_dtypes is not installed")
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _input(rank, shape, dtype):
    return np.random.default_rng(100 + rank).standard_normal(shape).astype(dtype)


def _reference_sum(world, shape, dtype):
    total = _input(0, shape, dtype).copy()
    for r in range(1, world):
        total += _input(r, shape, dtype)
    return total


def _collectives(group, dtype):
    comm, rank, size = group.comm, group.rank, group.world_size
    shape = (size * 3, 5)
    out = {}
    x = _input(rank, shape, dtype)
    out["sum"] = comm.all_reduce(x.copy(), op="sum")
    out["avg"] = comm.all_reduce(x.copy(), op="avg")
    out["max"] = comm.all_reduce(x.copy(), op="max")
    out["reduce_scatter"] = comm.reduce_scatter(x.copy())
    out["all_gather"] = comm.all_gather(x[:2].copy())
    b = x.copy()
    out["broadcast"] = comm.broadcast(b, root=size - 1)
    # a ring: each sends to the next and receives from the previous, at once
    ring = np.empty_like(x)
    comm.send_recv(x, (rank + 1) % size, ring, (rank - 1) % size)
    out["ring"] = ring
    comm.barrier()
    return out


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("dtype_name", DTYPES)
def test_collectives_match_numpy(world, dtype_name):
    dtype = _dtype(dtype_name)
    results = spawn(_collectives, world, args=(dtype,))
    shape = (world * 3, 5)
    inputs = [_input(r, shape, dtype) for r in range(world)]
    total = _reference_sum(world, shape, dtype)
    rows = shape[0] // world
    for rank, out in enumerate(results):
        # every rank sums in rank order, so the result is exactly the sequential sum
        np.testing.assert_array_equal(out["sum"], total)
        np.testing.assert_array_equal(out["avg"], total / np.asarray(world, dtype))
        np.testing.assert_array_equal(out["max"], np.maximum.reduce(inputs))
        np.testing.assert_array_equal(out["reduce_scatter"], total[rank * rows:(rank + 1) * rows])
        np.testing.assert_array_equal(out["all_gather"], np.concatenate([x[:2] for x in inputs]))
        np.testing.assert_array_equal(out["broadcast"], inputs[world - 1])
        np.testing.assert_array_equal(out["ring"], inputs[(rank - 1) % world])
        assert out["sum"].dtype == dtype


def _split_sums(group):
    comm = group.comm
    # 4 ranks -> colors by parity; the key reverses the order inside each group
    sub = comm.split(color=group.rank % 2, key=-group.rank)
    x = np.full(3, float(group.rank + 1), np.float32)
    sub.all_reduce(x)
    none = comm.split(color=None if group.rank == 0 else 1)
    return sub.rank, sub.size, x, none is None


def test_split_makes_subgroups_ordered_by_key():
    results = spawn(_split_sums, 4)
    # colour 0: ranks {0, 2}; colour 1: ranks {1, 3}; key -rank puts the higher rank first
    assert [(r[0], r[1]) for r in results] == [(1, 2), (1, 2), (0, 2), (0, 2)]
    np.testing.assert_array_equal(results[0][2], np.full(3, 1.0 + 3.0))
    np.testing.assert_array_equal(results[1][2], np.full(3, 2.0 + 4.0))
    assert [r[3] for r in results] == [True, False, False, False]


def _point_to_point_in_order(group):
    comm = group.comm
    if group.rank == 0:
        for k in range(5):
            comm.send(np.full((4, 2), k, np.float32), peer=1)
        return None
    received = []
    for _ in range(5):
        out = np.empty((4, 2), np.float32)
        received.append(comm.recv(out, peer=0)[0, 0])
    return received


def test_send_recv_keeps_order():
    assert spawn(_point_to_point_in_order, 2)[1] == [0, 1, 2, 3, 4]


def _dead_peer(group):
    import os
    import time

    if group.rank == 1:
        os._exit(7)  # dies without a word
    start = time.monotonic()
    try:
        group.comm.recv(np.empty(4, np.float32), peer=1)
    except CommError as error:
        return str(error), time.monotonic() - start
    return "no error", 0.0


def test_dead_peer_is_a_clear_error_quickly():
    # (rank 0 then waits out the timeout for rank 1 to leave its store: a short one keeps the test short)
    message, seconds = spawn(_dead_peer, 2, may_die=(1,), timeout=8)[0]
    assert message.startswith("rank 0: rank 1 closed its connection") and "it exited, crashed or was killed" in message
    assert seconds < 4  # the closed socket is seen at once, not after the timeout


def _silent_peer(group):
    import time

    if group.rank == 1:
        time.sleep(4)
        return None
    try:
        group.comm.recv(np.empty(4, np.float32), peer=1)
    except CommError as error:
        return str(error)
    return "no error"


def test_hung_peer_times_out():
    message = spawn(_silent_peer, 2, timeout=1.5)[0]
    assert "timed out after 1.5 s waiting for rank 1" in message


def _mismatched(group):
    if group.rank == 0:
        group.comm.send(np.zeros(3, np.float32), 1)
        return None
    group.comm.recv(np.zeros(4, np.float32), 0)


def test_mismatched_sizes_fail_loudly():
    with pytest.raises(SpawnError, match="send and recv disagree"):
        spawn(_mismatched, 2)


def test_environment_variables_of_each_launcher():
    assert read_environment({}).world_size == 1
    torchrun = read_environment({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "node0",
                                 "MASTER_PORT": "1234"})
    assert (torchrun.rank, torchrun.world_size, torchrun.local_rank, torchrun.master_addr, torchrun.master_port) == (
        3, 4, 1, "node0", 1234)
    mpi = read_environment({"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "8",
                            "OMPI_COMM_WORLD_LOCAL_RANK": "2"})
    assert (mpi.rank, mpi.world_size, mpi.local_rank) == (2, 8, 2)
    slurm = read_environment({"SLURM_PROCID": "5", "SLURM_NTASKS": "6", "SLURM_LOCALID": "1"})
    assert (slurm.rank, slurm.world_size, slurm.local_rank) == (5, 6, 1)
    with pytest.raises(ValueError, match="rank 4 is not in a world of size 4"):
        read_environment({"RANK": "4", "WORLD_SIZE": "4"})


def test_free_port_is_below_the_ephemeral_range_and_free():
    """MASTER_PORT candidates come from below the ports the kernel hands out by itself (which the CPU
    transport's many sockets take), so none of those can grab one before rank 0 binds it."""
    from minillm.distributed import spawn as spawn_module

    low = spawn_module._ephemeral_range_start()
    ports = [spawn_module.free_port() for _ in range(20)]
    assert all(10_000 <= port < low for port in ports), (low, ports)
    assert len(set(ports)) > 1                                   # random: concurrent jobs rarely collide
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", ports[0]))                       # free when handed out
