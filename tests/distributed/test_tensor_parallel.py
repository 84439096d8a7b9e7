"""Tensor parallelism: the f/g ops (gradcheck through the CPU transport), the shard layout,
and whole runs equal to one process (TP=2, TP x DP = 2 x 2), gathered into ordinary checkpoints."""

import numpy as np
import pytest

import minillm as mm
from minillm import functional as F
from minillm.distributed.mesh import DeviceMesh, MeshShape
from minillm.distributed.parallel_trainer import ParallelTrainer
from minillm.distributed.spawn import SpawnError, spawn
from minillm.distributed.tensor_parallel import (
    ShardSpec, copy_to_tensor_parallel, gpt_shard_specs, reduce_from_tensor_parallel, shard_gpt, vocab_parallel_head,
    vocab_range)
from minillm.models import GPT, GPTConfig

from parallel_helpers import MODEL, max_relative, single_process, tiny_run


# ---------------------------------------------------------------- the shard layout


def test_qkv_shard_keeps_whole_heads_of_q_k_and_v():
    """Rank r's c_attn rows are heads r·H/T.. of q, then the same heads of k, then of v."""
    H, Dh, C, T = 4, 3, 12, 2
    full = np.arange(3 * H * Dh * C, dtype=np.float64).reshape(3 * H * Dh, C)
    spec = ShardSpec(axis=0, blocks=(H, H, H))
    head_rows = lambda which, heads: np.concatenate([np.arange(Dh) + (which * H + h) * Dh for h in heads])
    for rank in range(T):
        heads = range(rank * H // T, (rank + 1) * H // T)
        expected = full[np.concatenate([head_rows(w, heads) for w in range(3)])]
        np.testing.assert_array_equal(spec.shard(full, rank, T), expected)
    np.testing.assert_array_equal(spec.join([spec.shard(full, r, T) for r in range(T)]), full)


@pytest.mark.parametrize("spec", [ShardSpec(0), ShardSpec(1), ShardSpec(0, (4, 2, 2)), ShardSpec(0, (1, 1))])
def test_shard_then_join_is_the_identity(spec):
    full = np.random.default_rng(1).standard_normal((16, 8))
    for size in (1, 2, 4):
        np.testing.assert_array_equal(spec.join([spec.shard(full, r, size) for r in range(size)]), full)


def test_heads_must_divide_tp_clearly():
    class Comm:
        rank, size = 0, 3
    model = GPT(GPTConfig(**MODEL))
    with pytest.raises(ValueError, match="--tp 3 does not divide n_head=4"):
        shard_gpt(model, Comm())


def test_gpt_shard_specs_cover_the_four_matrices():
    specs = gpt_shard_specs(GPTConfig(**MODEL))
    assert specs["attn.c_attn.weight"].blocks == (4, 4, 4) and specs["attn.c_proj.weight"].axis == 1
    assert "attn.c_proj.bias" not in specs and "mlp.c_proj.bias" not in specs   # added once, after g


# ---------------------------------------------------------------- f and g through the transport


def _gradcheck_f_g(group, planted=None):
    """y = g( tanh(f(x) @ W_rᵀ) @ V_rᵀ ): one rank's columns, the MLP pattern; W_r, V_r differ per rank.

    The function (replicated x -> replicated y) is sum over ranks; gradcheck's
    perturbations are the same on every rank, so central differences see the
    whole sum while backward sees only this rank's path, unless f all-reduces.
    """
    comm = group.comm
    rng = np.random.default_rng(10 + comm.rank)
    W = mm.Tensor(rng.standard_normal((3, 4)))                      # (C/T, C) this rank's rows
    V = mm.Tensor(rng.standard_normal((4, 3)))                      # (C, C/T) this rank's columns
    x = mm.Tensor(np.random.default_rng(0).standard_normal((2, 4)), requires_grad=True)  # replicated

    def fn(x):
        h = F.linear(copy_to_tensor_parallel(x, comm), W).tanh()  # (2, C/T)
        return reduce_from_tensor_parallel(F.linear(h, V), comm)  # (2, C), the sum over ranks

    # the forward equals the unsharded computation
    Ws = comm.all_gather(W.data)                                    # (T·C/T, C)
    Vs = comm.all_gather(np.ascontiguousarray(V.data.T)).T          # (C, T·C/T)
    full = np.tanh(x.data @ Ws.T) @ Vs.T
    np.testing.assert_allclose(fn(x).data, full, rtol=1e-12)
    return mm.gradcheck(fn, x)


def test_f_and_g_pass_gradcheck_through_the_cpu_transport():
    assert spawn(_gradcheck_f_g, 2) == [True, True]


def _gradcheck_g_alone(group):
    """g then replicated work then a per-rank weight: L = sum_r <c_r, tanh(g(x_r))> seen per rank."""
    comm = group.comm
    x = mm.Tensor(np.random.default_rng(20 + comm.rank).standard_normal((3,)), requires_grad=True)
    fn = lambda x: reduce_from_tensor_parallel(x * 1.0, comm).tanh()
    out = fn(x)
    out.backward(np.ones(3))
    # every rank's x_r enters the sum once: d/dx_r sum(tanh(Σ x)) = 1 - tanh², the same on every rank
    total = comm.all_reduce(x.data.copy())
    np.testing.assert_allclose(x.grad, 1 - np.tanh(total) ** 2, rtol=1e-12)
    return True


def test_g_backward_is_the_identity():
    assert spawn(_gradcheck_g_alone, 2) == [True, True]


def test_vocab_ranges_tile_the_vocabulary():
    for vocab, size in [(50257, 2), (7, 3), (64, 4)]:
        ranges = [vocab_range(vocab, r, size) for r in range(size)]
        assert ranges[0][0] == 0 and ranges[-1][1] == vocab
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        assert max(e - s for s, e in ranges) - min(e - s for s, e in ranges) <= 1
    assert vocab_range(50257, 0, 2) == (0, 25129)


def _vocab_parallel_loss(group):
    """The head + loss split by vocabulary (7 classes over 2 ranks: 4 + 3) against F.cross_entropy on
    the whole logits, with an ignored row; gradcheck through the transport for x and the weight."""
    comm = group.comm
    rng = np.random.default_rng(0)                                  # the same on every rank: replicated inputs
    x = mm.Tensor(rng.standard_normal((2, 3, 4)), requires_grad=True)
    weight = mm.Tensor(rng.standard_normal((7, 4)), requires_grad=True)
    targets = np.array([[0, 6, 3], [-100, 4, 2]])
    logits, loss = vocab_parallel_head(x, weight, targets, comm)
    start, end = vocab_range(7, comm.rank, comm.size)
    full = F.linear(mm.Tensor(x.data), mm.Tensor(weight.data))
    np.testing.assert_allclose(logits.data, full.data[..., start:end], rtol=1e-12)
    expected = F.cross_entropy(full, targets)
    np.testing.assert_allclose(loss.data, expected.data, rtol=1e-12)
    return mm.gradcheck(lambda x, w: vocab_parallel_head(x, w, targets, comm)[1], x, weight)


def test_vocab_parallel_cross_entropy_equals_the_whole_one_and_passes_gradcheck():
    assert spawn(_vocab_parallel_loss, 2) == [True, True]


# ---------------------------------------------------------------- whole runs


def _parallel_run(group, shape, dtype="float64", **options):
    mesh = DeviceMesh(group.comm, MeshShape(**shape))
    model, data, config = tiny_run(dtype, **options)
    trainer = ParallelTrainer(model, config, data, mesh)
    losses = [trainer.train_step()[0] for _ in range(config.steps)]
    state, _ = trainer.full_state()
    return losses, state


@pytest.mark.parametrize("shape, world", [(dict(tp=2), 2), (dict(tp=2, dp=2), 4)], ids=["tp2", "tp2xdp2"])
def test_tensor_parallel_run_equals_one_process(shape, world):
    """20 AdamW steps (clipping on): losses and every parameter, gathered, as one process (float64)."""
    ref_losses, ref_params = spawn(single_process, 1)[0]
    results = spawn(_parallel_run, world, args=(shape,))
    for losses, params in results:
        assert max_relative(losses, ref_losses) < 1e-6
        assert max_relative(params, ref_params) < 1e-6
        assert params["h.0.attn.c_attn.weight"].shape == ref_params["h.0.attn.c_attn.weight"].shape


def _save_then_resume(group, tmp, shape_a, shape_b):
    """Run 10 steps on layout A and checkpoint; a fresh trainer on layout B resumes and runs to 20."""
    from minillm.distributed.process_group import get_process_group  # noqa: F401

    comm = group.comm
    if shape_a is not None:
        mesh_a = DeviceMesh(comm, MeshShape(**shape_a))
        model, data, config = tiny_run()
        ParallelTrainer(model, config, data, mesh_a, run_dir=tmp).fit(stop_at=10)
    comm.barrier()
    mesh_b = DeviceMesh(comm, MeshShape(**shape_b))
    model, data, config = tiny_run()
    trainer = ParallelTrainer(model, config, data, mesh_b, run_dir=tmp)
    assert trainer.resume() == 10
    losses = [trainer.train_step()[0] for _ in range(10)]
    return losses, trainer.full_state()[0]


def test_checkpoint_is_ordinary_and_resumes_on_another_layout(tmp_path):
    """TP x DP writes one ordinary checkpoint (read by the plain loader, full shapes); TP=2 alone,
    and a single process, resume it and take the same steps as an uninterrupted run."""
    from minillm.train.checkpoint import load_checkpoint

    ref_losses, ref_params = spawn(single_process, 1)[0]
    losses, params = spawn(_save_then_resume, 4, args=(tmp_path, dict(tp=2, dp=2), dict(tp=2, dp=2)))[0]
    assert max_relative(losses, ref_losses[10:]) < 1e-6 and max_relative(params, ref_params) < 1e-6
    saved = load_checkpoint(tmp_path)
    assert saved.model_state["h.1.mlp.c_fc.weight"].shape == (128, 32)
    from minillm import optim
    full = GPT(GPTConfig(**MODEL))
    order = [p for group in optim.weight_decay_groups(full.named_parameters(), 0.1) for p in group["params"]]
    for index, p in enumerate(order):                  # AdamW's moments have the full shapes too
        assert saved.optimizer_state["state"][index]["exp_avg_sq"].shape == p.shape
    losses, params = spawn(_save_then_resume, 2, args=(tmp_path, None, dict(tp=2)))[0]
    assert max_relative(losses, ref_losses[10:]) < 1e-6 and max_relative(params, ref_params) < 1e-6
    losses, params = spawn(_save_then_resume, 1, args=(tmp_path, None, dict()))[0]
    assert max_relative(losses, ref_losses[10:]) < 1e-6 and max_relative(params, ref_params) < 1e-6


def _killed(group, victim_step):
    import os
    import signal

    mesh = DeviceMesh(group.comm, MeshShape(tp=2))
    model, data, config = tiny_run(steps=50)
    trainer = ParallelTrainer(model, config, data, mesh)
    for step in range(50):
        if group.rank == 1 and step == victim_step:
            os.kill(os.getpid(), signal.SIGKILL)
        trainer.train_step()


def test_a_killed_tensor_parallel_rank_stops_the_other_with_a_clear_error():
    import time

    start = time.monotonic()
    with pytest.raises(SpawnError, match="rank 1 closed its connection"):
        spawn(_killed, 2, args=(3,), timeout=20, may_die=(1,))
    assert time.monotonic() - start < 20
