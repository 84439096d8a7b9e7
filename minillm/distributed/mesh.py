"""The device mesh: world ranks laid out as a (pp, dp, tp) grid, and every group derived from it.

With P pipeline stages, D data-parallel replicas and T tensor-parallel shards,
P·D·T = world size and rank r sits at grid coordinates (p, d, t):

    r = (p · D + d) · T + t                      tp varies fastest, then dp, then pp

so the T ranks of one tensor-parallel group are consecutive (on one node, over
NVLink: TP talks every layer), and pipeline stages are furthest apart (PP sends
one activation per micro-batch). Example, P = D = T = 2 (8 ranks):

    rank:      0  1  2  3  4  5  6  7
    (p,d,t):  000 001 010 011 100 101 110 111
    tp groups: {0,1} {2,3} {4,5} {6,7}       same (p, d)
    dp groups: {0,2} {1,3} {4,6} {5,7}       same (p, t)
    pp groups: {0,4} {1,5} {2,6} {3,7}       same (d, t): a rank's stage neighbours
    model-parallel groups: {0,1,4,5} {2,3,6,7}   same d: one whole model (gradient norm)

Each group is one ``world.split(color, key)`` (MPI_Comm_split / ncclCommSplit):
the ranks that share a color form the group, ordered by key. Every rank makes
the same four calls in the same order, as a collective must.
"""

from __future__ import annotations

from dataclasses import dataclass
from ..checks import is_integer


@dataclass(frozen=True)
class MeshShape:
    """How many ranks along each axis: pipeline stages, data replicas, tensor shards."""

    pp: int = 1
    dp: int = 1
    tp: int = 1

    def __post_init__(self) -> None:
        for axis in ("pp", "dp", "tp"):
            value = getattr(self, axis)
            if not is_integer(value) or value < 1:
                raise ValueError(f"--{axis} must be a positive integer, got {value!r}")

    @property
    def size(self) -> int:
        return self.pp * self.dp * self.tp

    def coords(self, rank: int) -> tuple[int, int, int]:
        """World rank -> (pp, dp, tp) coordinates."""
        if not 0 <= rank < self.size:
            raise ValueError(f"rank {rank} is outside a mesh of {self.size} ranks")
        t = rank % self.tp
        d = rank // self.tp % self.dp
        p = rank // (self.tp * self.dp)
        return p, d, t

    def rank(self, pp: int, dp: int, tp: int) -> int:
        """(pp, dp, tp) coordinates -> world rank."""
        return (pp * self.dp + dp) * self.tp + tp

    def group_ranks(self, axis: str, rank: int) -> list[int]:
        """The world ranks of ``rank``'s group along ``axis`` ("pp" | "dp" | "tp"), in group-rank order."""
        p, d, t = self.coords(rank)
        if axis == "tp":
            return [self.rank(p, d, k) for k in range(self.tp)]
        if axis == "dp":
            return [self.rank(p, k, t) for k in range(self.dp)]
        if axis == "pp":
            return [self.rank(k, d, t) for k in range(self.pp)]
        raise ValueError(f"axis must be 'pp', 'dp' or 'tp', got {axis!r}")

    def __str__(self) -> str:
        return f"pp={self.pp} x dp={self.dp} x tp={self.tp}"


class DeviceMesh:
    """This rank's place in the grid and its four groups (communicators).

        mesh = DeviceMesh(world, MeshShape(pp=2, dp=2, tp=2))
        mesh.tp, mesh.dp, mesh.pp          # Communicators along each axis
        mesh.model_parallel                 # the pp x tp ranks holding one copy of the model
        mesh.pp_rank, mesh.dp_rank, mesh.tp_rank
        mesh.prev_stage, mesh.next_stage    # pipeline neighbours, as ranks of mesh.pp (None at the ends)

    A group spanning the whole world is the world communicator itself (no split).
    """

    def __init__(self, world, shape: MeshShape):
        if shape.size != world.size:
            raise ValueError(
                f"the mesh {shape} needs {shape.size} processes, but the world has {world.size}: "
                f"launch pp * dp * tp processes (e.g. minillm launch --nproc-per-node {shape.size} ...)"
            )
        world.check_same("parallel layouts", vars(shape))   # the splits below would not match
        self.world, self.shape = world, shape
        self.pp_rank, self.dp_rank, self.tp_rank = shape.coords(world.rank)
        p, d, t = self.pp_rank, self.dp_rank, self.tp_rank
        P, D, T = shape.pp, shape.dp, shape.tp
        #                                    color: the coordinates the group shares   key: position in it
        self.tp = self._group(T, color=p * D + d, key=t)
        self.dp = self._group(D, color=p * T + t, key=d)
        self.pp = self._group(P, color=d * T + t, key=p)
        self.model_parallel = self._group(P * T, color=d, key=p * T + t)

    def _group(self, size: int, color: int, key: int):
        if size == self.world.size:
            return self.world  # every rank in one group: the world already is it (all ranks skip alike)
        return self.world.split(color, key)

    # ---------------------------------------------------------------- pipeline
    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.shape.pp - 1

    @property
    def prev_stage(self) -> int | None:
        """The previous stage's rank in ``self.pp`` (None on the first stage)."""
        return None if self.is_first_stage else self.pp_rank - 1

    @property
    def next_stage(self) -> int | None:
        """The next stage's rank in ``self.pp`` (None on the last stage)."""
        return None if self.is_last_stage else self.pp_rank + 1

    def __repr__(self) -> str:
        return (f"DeviceMesh({self.shape}, rank {self.world.rank} at "
                f"(pp={self.pp_rank}, dp={self.dp_rank}, tp={self.tp_rank}))")


def init_mesh(shape: MeshShape, device: str = "cpu", timeout: float = 60.0) -> tuple[DeviceMesh, str]:
    """Join the job a launcher started (``minillm launch``, torchrun, mpirun, srun) as the grid ``shape``.

    Returns (the mesh, this rank's device: "cuda:LOCAL_RANK" with NCCL, "cpu"
    with the CPU transport). The job must have exactly pp·dp·tp processes.
    """
    import os  # noqa: PLC0415

    from .process_group import get_process_group, init_process_group, read_environment  # noqa: PLC0415

    kind = "cpu" if device == "cpu" else "cuda"
    launched = os.environ.get("MINILLM_LAUNCH_DEVICE")   # minillm launch --device: what the ranks were started for
    if launched is not None and launched != kind:
        raise ValueError(f"minillm launch --device {launched} started this rank, but the run asks for --device "
                         f"{device}: give both the same device (minillm launch --device {kind} ... -- ... "
                         f"--device {device}, or --device {launched} after the --)")
    world = read_environment().world_size
    if world != shape.size:
        raise ValueError(
            f"--pp {shape.pp} x --dp {shape.dp} x --tp {shape.tp} needs {shape.size} processes, but this job has "
            f"{world}: start it with minillm launch --nproc-per-node {shape.size}"
            + (" --device cpu -- ... --device cpu" if device == "cpu" else " -- ...")
        )
    group = get_process_group() or init_process_group("cpu" if device == "cpu" else "nccl", timeout=timeout)
    return DeviceMesh(group.comm, shape), group.device
