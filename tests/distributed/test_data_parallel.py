"""Data parallelism: runs equal to one process, buckets reduced during the backward,
one writer, exact resume, and a killed replica stopping the other."""

import json
import time

import numpy as np
import pytest

import minillm as mm
from minillm.distributed.data_parallel import DataParallel
from minillm.distributed.mesh import DeviceMesh, MeshShape
from minillm.distributed.parallel_trainer import ParallelTrainer
from minillm.distributed.spawn import SpawnError, spawn
from minillm.train.checkpoint import load_checkpoint

from parallel_helpers import max_relative, single_process, tiny_run


def _dp_run(group, dtype="float64", steps=20, batch_size=8, grad_accum=1):
    mesh = DeviceMesh(group.comm, MeshShape(dp=group.world_size))
    model, data, config = tiny_run(dtype, steps, batch_size, grad_accum)
    trainer = ParallelTrainer(model, config, data, mesh)
    losses = [trainer.train_step()[0] for _ in range(config.steps)]
    return losses, trainer.full_state()[0]


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_dp2_equals_one_process_with_the_same_global_batch(grad_accum):
    """float64: losses and every parameter after 20 steps, to 1e-6 relative (in fact ~1e-13)."""
    args = ("float64", 20, 8, grad_accum)
    ref_losses, ref_params = spawn(single_process, 1, args=args)[0]
    for losses, params in spawn(_dp_run, 2, args=args):
        assert max_relative(losses, ref_losses) < 1e-6
        assert max_relative(params, ref_params) < 1e-6


def test_dp2_float32_losses_equal_one_process():
    """In float32 the losses agree to 1e-6 too; parameters only in norm: AdamW divides by sqrt(v),
    so a gradient that is exactly zero in exact arithmetic (the key bias: softmax ignores a shift
    of every score) is pure rounding noise, amplified to +-lr per step in both runs alike."""
    ref_losses, ref_params = spawn(single_process, 1, args=("float32",))[0]
    losses, params = spawn(_dp_run, 2, args=("float32",))[0]
    assert max_relative(losses, ref_losses) < 1e-6
    norm = np.sqrt(sum(((params[k] - ref_params[k]) ** 2).sum() for k in params)
                   / sum((ref_params[k] ** 2).sum() for k in params))
    assert norm < 1e-5


def _overlap(group):
    """With small buckets, the first all-reduce is issued while the backward has not reached the
    embeddings yet; each bucket is reduced exactly once, and finish() leaves the average."""
    comm = group.comm
    model, data, config = tiny_run()
    issued = []
    original = comm.all_reduce

    def recording_all_reduce(array, op="sum"):
        issued.append((model.wpe.weight.grad is None, array.size))   # has the first op's gradient arrived?
        return original(array, op)

    comm.all_reduce = recording_all_reduce
    ddp = DataParallel(model.parameters(), comm, bucket_mb=0.01)
    inputs, targets = ddp.shard_batch(data.get_batch("train", 8))
    _, loss = model(inputs, targets)
    loss.backward()
    ddp.finish()
    comm.all_reduce = original
    mine = {name: p.grad.copy() for name, p in model.named_parameters()}
    everyone = [comm.all_gather(np.ascontiguousarray(g).reshape(-1)) for g in mine.values()]
    return issued, len(ddp.buckets), mine, [e.reshape(comm.size, -1) for e in everyone]


def test_buckets_are_reduced_during_the_backward():
    for issued, buckets, grads, gathered in spawn(_overlap, 2):
        assert len(issued) == buckets > 3
        assert issued[0][0] is True and issued[-1][0] is False   # the first bucket goes before the embeddings' gradient
        for g, both in zip(grads.values(), gathered):
            np.testing.assert_array_equal(both[0], both[1])   # replicas hold the same averaged gradient


def _write_then_resume(group, tmp, stop, dp_then):
    comm = group.comm
    if stop:
        model, data, config = tiny_run()
        ParallelTrainer(model, config, data, DeviceMesh(comm, MeshShape(dp=comm.size)), run_dir=tmp).fit(stop_at=stop)
        return None
    model, data, config = tiny_run()
    trainer = ParallelTrainer(model, config, data, DeviceMesh(comm, MeshShape(dp=dp_then)), run_dir=tmp)
    step = trainer.resume()
    losses = [trainer.train_step()[0] for _ in range(config.steps - step)]
    return losses, trainer.full_state()[0]


def test_one_writer_and_exact_resume_on_dp2_and_on_one_process(tmp_path):
    ref_losses, ref_params = spawn(single_process, 1)[0]
    spawn(_write_then_resume, 2, args=(tmp_path, 10, None))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, 11))   # logged once
    assert max_relative([r["loss"] for r in records if r["kind"] == "train"], ref_losses[:10]) < 1e-6
    extra = load_checkpoint(tmp_path).metadata["extra"]
    assert extra["mesh"] == {"pp": 1, "dp": 2, "tp": 1} and len(extra["rank_states"]) == 2
    assert extra["rank_states"][0]["rng"] != extra["rank_states"][1]["rng"]   # replicas' own dropout streams
    for world in (2, 1):
        losses, params = spawn(_write_then_resume, world, args=(tmp_path, 0, world))[0]
        assert max_relative(losses, ref_losses[10:]) < 1e-6
        assert max_relative(params, ref_params) < 1e-6


def _killed(group):
    import os
    import signal

    model, data, config = tiny_run(steps=50)
    trainer = ParallelTrainer(model, config, data, DeviceMesh(group.comm, MeshShape(dp=2)))
    for step in range(50):
        if group.rank == 1 and step == 3:
            os.kill(os.getpid(), signal.SIGKILL)
        trainer.train_step()


def test_a_killed_replica_stops_the_other_with_a_clear_error():
    start = time.monotonic()
    with pytest.raises(SpawnError, match="rank 1 closed its connection"):
        spawn(_killed, 2, timeout=20, may_die=(1,))
    assert time.monotonic() - start < 20


def test_batch_must_divide_over_replicas():
    class Comm:
        rank, size = 0, 3
    with pytest.raises(ValueError, match="multiple of --dp 3"):
        DataParallel([mm.Tensor(np.ones(2), requires_grad=True)], Comm()).shard_batch((np.zeros((8, 4)),))


def _pipeline_dp_run(group, shape):
    mesh = DeviceMesh(group.comm, MeshShape(**shape))
    model, data, config = tiny_run("float64", 20, 8, 2)     # 2 micro-batches per step through the pipeline
    trainer = ParallelTrainer(model, config, data, mesh)
    losses = [trainer.train_step()[0] for _ in range(config.steps)]
    state = trainer.full_state()                              # on world rank 0 only
    return losses, None if state is None else state[0]


def test_pp2_x_dp2_equals_one_process():
    """4 ranks: 2 stages (1F1B) x 2 replicas, each replica's micro-batches half of the global ones.
    (The pipeline broadcasts the loss as float32, hence 1e-7 rather than 1e-15 on the losses.)"""
    ref_losses, ref_params = spawn(single_process, 1, args=("float64", 20, 8, 2))[0]
    results = spawn(_pipeline_dp_run, 4, args=(dict(pp=2, dp=2),))
    for losses, _ in results:
        assert max_relative(losses, ref_losses) < 1e-6
    assert max_relative(results[0][1], ref_params) < 1e-6
    assert all(params is None for _, params in results[1:])
