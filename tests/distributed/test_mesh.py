"""The (pp, dp, tp) grid: coordinates, and the groups split from the world on real ranks."""

import numpy as np
import pytest

import minillm as mm
from minillm.distributed.mesh import DeviceMesh, MeshShape
from minillm.distributed.parallel_trainer import ParallelTrainer, rank_model
from minillm.distributed.spawn import spawn

from parallel_helpers import max_relative, single_process, tiny_run


def test_coordinates_tp_fastest_then_dp_then_pp():
    shape = MeshShape(pp=2, dp=2, tp=2)
    assert [shape.coords(r) for r in range(8)] == [
        (0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1), (1, 0, 0), (1, 0, 1), (1, 1, 0), (1, 1, 1)]
    assert all(shape.rank(*shape.coords(r)) == r for r in range(8))
    assert shape.group_ranks("tp", 5) == [4, 5]
    assert shape.group_ranks("dp", 5) == [5, 7]
    assert shape.group_ranks("pp", 5) == [1, 5]
    odd = MeshShape(pp=3, dp=1, tp=2)
    assert odd.group_ranks("pp", 3) == [1, 3, 5] and odd.group_ranks("tp", 3) == [2, 3]


def test_bad_shapes_are_clear_errors():
    with pytest.raises(ValueError, match="--tp must be a positive integer"):
        MeshShape(tp=0)

    class World:
        rank, size = 0, 6
    with pytest.raises(ValueError, match="needs 8 processes, but the world has 6"):
        DeviceMesh(World(), MeshShape(2, 2, 2))


def _groups(group, shape):
    mesh = DeviceMesh(group.comm, MeshShape(**shape))
    out = {}
    for axis in ("tp", "dp", "pp", "model_parallel"):
        comm = getattr(mesh, axis)
        members = comm.all_gather(np.array([group.rank], dtype=np.int64))   # world ranks, group-rank order
        out[axis] = members.tolist()
    out["coords"] = (mesh.pp_rank, mesh.dp_rank, mesh.tp_rank)
    out["neighbours"] = (mesh.prev_stage, mesh.next_stage)
    return out


def test_groups_of_a_2x2x2_mesh_on_8_ranks():
    shape = MeshShape(pp=2, dp=2, tp=2)
    results = spawn(_groups, 8, args=(vars(shape),))
    for rank, got in enumerate(results):
        assert got["coords"] == shape.coords(rank)
        for axis in ("tp", "dp", "pp"):
            assert got[axis] == shape.group_ranks(axis, rank), (rank, axis)
        p, d, t = shape.coords(rank)
        assert got["model_parallel"] == [shape.rank(pp, d, tp) for pp in range(2) for tp in range(2)]
        assert got["neighbours"] == ((None, 1) if p == 0 else (0, None))


def _three_d(group, tmp, stop):
    world = group.world_size
    shape = MeshShape(pp=2, dp=2, tp=2) if world == 8 else MeshShape()
    model, data, config = tiny_run("float64", 20, 8, 2)
    mesh = DeviceMesh(group.comm, shape)
    if world == 8:                  # only this rank's stage built (then sharded), from tiny_run's seed
        mm.manual_seed(3)
        model = rank_model(model.config, mesh)
    trainer = ParallelTrainer(model, config, data, mesh, run_dir=tmp)
    if world == 1:
        trainer.resume()
    losses = [trainer.train_step()[0] for _ in range(stop - trainer.step)]
    if world == 8:
        trainer.save()
    state = trainer.full_state()
    return losses, None if state is None else state[0]


def test_pp2_x_dp2_x_tp2_on_8_ranks_equals_one_process_and_resumes_on_one(tmp_path):
    """The whole grid: 20 steps on 8 ranks like one process; its checkpoint (one ordinary file,
    written at step 10) resumed by a single process continues identically. float64: the parameters
    to 1e-10 (measured 3e-13: only the order of additions differs; a float32 rounding anywhere would
    show as 1e-7 or more); the losses to 1e-7, as the pipeline broadcasts the loss in float32."""
    ref_losses, ref_params = spawn(single_process, 1, args=("float64", 20, 8, 2))[0]
    results = spawn(_three_d, 8, args=(tmp_path, 10), timeout=60)
    assert max_relative(results[0][0], ref_losses[:10]) < 1e-7
    losses, params = spawn(_three_d, 1, args=(tmp_path, 20))[0]
    assert max_relative(losses, ref_losses[10:]) < 1e-7
    assert max_relative(params, ref_params) < 1e-10


def _bad_token_step(group, grad_accum):
    """One --pp 2 step (``grad_accum`` micro-batches) on tokens holding the id 64, vocabulary 64: what each rank raises."""
    from minillm.data.dataset import TokenDataset

    model, _, config = tiny_run("float64", 2, 4, grad_accum)
    tokens = np.zeros(512, dtype=np.int64)
    tokens[100:] = 64
    trainer = ParallelTrainer(model, config, TokenDataset(tokens, 16, stride=1, seed=5),
                              DeviceMesh(group.comm, MeshShape(pp=2)))
    try:
        trainer.train_step()
    except ValueError as error:                         # (an IndexError from the first stage's embedding,
        return str(error)                               #  or a hang on the last stage, would fail the test)
    return None


def test_bad_token_id_in_a_pp_run_is_one_clear_error_on_every_rank():
    """The ids are checked on the host before the schedule (it then skips the device-side checks):
    every stage raises the same ValueError, rather than the first stage alone while the last one waits."""
    messages = spawn(_bad_token_step, 2, args=(2,), timeout=30)
    assert messages == ["token id 64 is out of range for a vocabulary of 64"] * 2
