"""Layer-split multi-GPU training: process group, communicators, pipeline parallel.

    process_group.py  who am I: RANK/WORLD_SIZE/LOCAL_RANK (torchrun, mpirun, Slurm names)
    rendezvous.py     a TCP store on rank 0 where the ranks meet (the NCCL unique id)
    communicator.py   the Communicator interface every parallel scheme uses
    nccl.py           that interface over cupy.cuda.nccl (the engine)
    cpu.py            the same over sockets between processes (the test transport)

Nothing here is imported by ``import minillm``: the distributed code loads only
when a parallel run asks for it.
"""

from .communicator import CommError, Communicator
from .process_group import (
    ProcessGroup,
    destroy_process_group,
    get_local_rank,
    get_process_group,
    get_rank,
    get_world_size,
    init_process_group,
    read_environment,
)
from .rendezvous import RendezvousError, TCPStore

__all__ = [
    "CommError", "Communicator", "ProcessGroup", "RendezvousError", "TCPStore", "destroy_process_group",
    "get_local_rank", "get_process_group", "get_rank", "get_world_size", "init_process_group", "read_environment",
]
