"""Who am I in this job? The process group, read from the environment.

Any launcher can start minillm's ranks, because each reads its place from the
variables the common launchers set:

    torchrun / minillm launch   RANK  WORLD_SIZE  LOCAL_RANK
    Open MPI (mpirun)           OMPI_COMM_WORLD_RANK  OMPI_COMM_WORLD_SIZE  OMPI_COMM_WORLD_LOCAL_RANK
    Slurm (srun)                SLURM_PROCID  SLURM_NTASKS  SLURM_LOCALID

plus ``MASTER_ADDR`` / ``MASTER_PORT``: where rank 0's rendezvous store
listens (default 127.0.0.1:29500). With no variables at all a process is rank
0 of 1. ``init_process_group`` meets the other ranks there and builds the world
communicator: NCCL on ``cuda:LOCAL_RANK``, or the CPU test transport.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .communicator import Communicator
from .rendezvous import RendezvousError, TCPStore

_SOURCES = (  # (rank, world size, local rank) variable names, in order of preference
    ("RANK", "WORLD_SIZE", "LOCAL_RANK"),
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
    ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"),
)
DEFAULT_PORT = 29500


@dataclass(frozen=True)
class Environment:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = DEFAULT_PORT


def _int(env, name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise ValueError(f"environment variable {name}={env[name]!r} is not an integer") from None


def read_environment(env=None) -> Environment:
    """The first launcher's variables found in ``env`` (default os.environ), checked for sense.

    A launcher sets its rank and world-size variables together: one without the
    other is a broken environment, an error rather than a quiet run of one process.
    """
    env = os.environ if env is None else env
    rank, world_size, local_rank = 0, 1, 0
    for rank_name, size_name, local_name in _SOURCES:
        if rank_name in env and size_name in env:
            rank, world_size = _int(env, rank_name), _int(env, size_name)
            if world_size < 1 or not 0 <= rank < world_size:
                raise ValueError(f"rank {rank} is not in a world of size {world_size} ({rank_name}={env[rank_name]}, "
                                 f"{size_name}={env[size_name]}): check the launcher's variables")
            local_rank = _int(env, local_name) if local_name in env else 0
            if not 0 <= local_rank < world_size:
                raise ValueError(f"{local_name}={local_rank} must be in 0..{world_size - 1} ({size_name}={world_size})")
            break
    else:
        for rank_name, size_name, _ in _SOURCES[:2]:   # Slurm's names alone: inside an allocation, not a job step
            for present, absent in ((rank_name, size_name), (size_name, rank_name)):
                if present in env and absent not in env:
                    raise ValueError(f"{present} is set but {absent} is not: a launcher sets both "
                                     "(unset the stray variable, or start the ranks with minillm launch)")
    port = _int(env, "MASTER_PORT") if "MASTER_PORT" in env else DEFAULT_PORT
    if not 1 <= port <= 65535:
        raise ValueError(f"MASTER_PORT={port} must be a port number, 1..65535")
    return Environment(rank, world_size, local_rank, env.get("MASTER_ADDR", "127.0.0.1"), port)


@dataclass
class ProcessGroup:
    """This process's place in the job and its world communicator."""

    rank: int
    world_size: int
    local_rank: int
    backend: str  # "nccl" | "cpu"
    device: str  # "cuda:N" | "cpu"
    comm: Communicator
    store: TCPStore

    def destroy(self) -> None:
        """Leave the job. Rank 0 hosts the store, so it waits (up to the timeout) for every rank to leave."""
        self.store.arrive("exit", self.rank)
        if self.rank == 0:
            try:
                self.store.wait_arrivals("exit", self.world_size)
            except RendezvousError:
                pass  # a rank that died: nothing left to wait for
        self.store.close()


_group: ProcessGroup | None = None


def init_process_group(backend: str = "nccl", timeout: float = 60.0, env=None) -> ProcessGroup:
    """Meet the other ranks at MASTER_ADDR:MASTER_PORT and build the world communicator.

    ``timeout`` (seconds) bounds every later wait too: a rank that dies or hangs
    makes the others raise ``CommError`` within it.
    """
    global _group
    if backend not in ("nccl", "cpu"):
        raise ValueError(f"backend must be 'nccl' or 'cpu', got {backend!r}")
    if timeout <= 0:
        raise ValueError(f"timeout must be positive, got {timeout}")
    if _group is not None:
        raise RuntimeError(f"this process already joined a job as rank {_group.rank} of {_group.world_size}: "
                           "call destroy_process_group() first")
    where = read_environment(env)
    store = TCPStore(where.master_addr, where.master_port, is_server=where.rank == 0, timeout=timeout)
    store.arrive("init", where.rank, where.local_rank)
    store.wait_arrivals("init", where.world_size, timeout)
    if backend == "cpu":
        from .cpu import CPUCommunicator  # noqa: PLC0415

        loopback = where.master_addr in ("127.0.0.1", "localhost")
        comm = CPUCommunicator.create(where.rank, where.world_size, store, timeout, "127.0.0.1" if loopback else "")
        device = "cpu"
    else:
        from .. import backend as array_backend  # noqa: PLC0415
        from .nccl import NCCLCommunicator  # noqa: PLC0415

        count = array_backend.cuda_device_count()
        if where.local_rank >= count:
            raise ValueError(f"rank {where.rank} has LOCAL_RANK {where.local_rank} but this node shows {count} GPU(s): "
                             "start at most one process per GPU (check CUDA_VISIBLE_DEVICES)")
        array_backend.module_for(f"cuda:{where.local_rank}").cuda.Device(where.local_rank).use()
        comm = NCCLCommunicator(where.rank, where.world_size, store, "world", timeout, where.local_rank)
        device = f"cuda:{where.local_rank}"
    _group = ProcessGroup(where.rank, where.world_size, where.local_rank, backend, device, comm, store)
    return _group


def get_process_group() -> ProcessGroup | None:
    return _group


def destroy_process_group() -> None:
    global _group
    if _group is not None:
        _group.destroy()
        _group = None


def get_rank() -> int:
    return _group.rank if _group is not None else read_environment().rank


def get_world_size() -> int:
    return _group.world_size if _group is not None else read_environment().world_size


def get_local_rank() -> int:
    return _group.local_rank if _group is not None else read_environment().local_rank
