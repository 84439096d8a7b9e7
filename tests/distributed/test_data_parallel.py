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


# ---------------------------------------------------------------- through the command line and the launcher

import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from minillm.distributed.spawn import free_port  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def _minillm(*argv, timeout=120):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "minillm", *map(str, argv)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


def test_minillm_train_dp2_under_launch_logs_the_single_process_losses(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 300, encoding="utf-8")
    common = ["--data", text, "--tokenizer", "bytes", "--n-layer", "1", "--n-head", "2", "--d-model", "32",
              "--context", "16", "--batch-size", "4", "--steps", "6", "--eval-interval", "3", "--eval-batches", "1",
              "--samples", "0", "--quiet", "--device", "cpu"]
    one = _minillm("train", *common, "--out", tmp_path / "one")
    assert one.returncode == 0, one.stderr
    two = _minillm("launch", "--nproc-per-node", 2, "--device", "cpu", "--master-port", free_port(), "--",
                   "train", *common, "--dp", 2, "--out", tmp_path / "two")
    assert two.returncode == 0, two.stdout + two.stderr
    read = lambda run: [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
    a, b = read("one"), read("two")
    assert [r["step"] for r in a] == [r["step"] for r in b]            # one writer: each record once
    values = lambda records: [r.get("loss", r.get("val_loss")) for r in records]
    assert max_relative(values(b), values(a)) < 1e-6


KILL_SCRIPT = """
import os, signal, sys
sys.path.insert(0, {tests!r})
from parallel_helpers import tiny_run
from minillm.distributed.mesh import MeshShape, init_mesh
from minillm.distributed.parallel_trainer import ParallelTrainer
mesh, device = init_mesh(MeshShape({layout}), "cpu", timeout=10)
model, data, config = tiny_run(steps=50)
trainer = ParallelTrainer(model, config, data, mesh)
for step in range(50):
    if mesh.world.rank == 1 and step == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    trainer.train_step()
"""


@pytest.mark.parametrize("layout", ["dp=2", "tp=2"])
def test_a_killed_rank_makes_the_launcher_exit_non_zero(tmp_path, layout):
    script = tmp_path / "run.py"
    script.write_text(KILL_SCRIPT.format(tests=str(Path(__file__).parent), layout=layout))
    start = time.monotonic()
    result = _minillm("launch", "--nproc-per-node", 2, "--device", "cpu", "--master-port", free_port(), "--",
                      sys.executable, script, timeout=60)
    assert result.returncode != 0
    assert time.monotonic() - start < 30
    # whichever comes first: rank 0's clear error, or the launcher seeing rank 1 die and stopping rank 0
    assert ("[rank 0] minillm.distributed.communicator.CommError: rank 0: rank 1 closed its connection" in result.stdout
            or "[launch] rank 1 exited with code -9" in result.stdout), result.stdout[-2000:]
