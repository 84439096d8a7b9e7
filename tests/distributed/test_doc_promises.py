"""Promises of docs/distributed.md that no other test held (the audit of 2026-12-01), each written so
that breaking it fails here: tensor parallelism of a Llama-style block (grouped-query attention,
SwiGLU), its clear refusals, a data-parallel run with dropout resuming bit for bit, the documented
defaults, and the whole P x D x T grid through ``minillm launch ... train`` on the CPU transport."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from minillm.distributed.mesh import DeviceMesh, MeshShape
from minillm.distributed.parallel_trainer import ParallelTrainer
from minillm.distributed.spawn import free_port, spawn
from minillm.distributed.tensor_parallel import gpt_shard_specs, shard_gpt
from minillm.models import GPT, GPTConfig
from minillm.train import Trainer

from parallel_helpers import MODEL, max_relative, tiny_run

ROOT = Path(__file__).resolve().parents[2]

# Llama-style: rotary positions, RMSNorm, no biases, SwiGLU (c_fc = [gate | up]), 4 query heads sharing
# 2 key/value heads (c_attn = [q | k | v], 16 + 8 + 8 rows of head_dim 8)
LLAMA = dict(positions="rope", norm="rmsnorm", mlp="swiglu", mlp_hidden=48, bias=False, n_kv_head=2)


class Comm:
    """A stand-in group of two ranks (the checks run before any communication)."""
    rank, size = 0, 2


# ---------------------------------------------------------------- tensor parallel: the refusals


def test_tensor_parallel_refuses_dropout_and_uneven_key_value_heads():
    """distributed.md: "Dropout with --tp is refused"; n_head (and, with GQA, n_kv_head) must divide."""
    with pytest.raises(ValueError, match=r"--tp with dropout > 0 is not supported.*use --dropout 0"):
        shard_gpt(GPT(GPTConfig(**MODEL, dropout=0.1)), Comm())
    with pytest.raises(ValueError, match=r"--tp 2 does not divide n_head=4 and n_kv_head=1"):
        shard_gpt(GPT(GPTConfig(**{**MODEL, **LLAMA, "n_kv_head": 1})), Comm())
    shard_gpt(GPT(GPTConfig(**MODEL, dropout=0.0)), Comm())       # dropout 0: accepted


def test_llama_shard_specs_keep_whole_heads_and_matching_gate_and_up_rows():
    """c_attn's blocks are H·Dh, Hkv·Dh, Hkv·Dh rows; SwiGLU's c_fc is [gate | up], each cut alike."""
    config = GPTConfig(**{**MODEL, **LLAMA})
    specs = gpt_shard_specs(config)
    H, Hkv, Dh, C, hidden = 4, 2, 8, 32, 48
    rows = np.arange((H + 2 * Hkv) * Dh)
    q, k, v = rows[:H * Dh], rows[H * Dh:(H + Hkv) * Dh], rows[(H + Hkv) * Dh:]
    for rank in range(2):                          # rank r: q heads 2r, 2r+1 and kv head r
        expected = np.concatenate([q[rank * 16:(rank + 1) * 16], k[rank * 8:(rank + 1) * 8], v[rank * 8:(rank + 1) * 8]])
        np.testing.assert_array_equal(specs["attn.c_attn.weight"].shard(rows, rank, 2), expected)
        gate_up = np.arange(2 * hidden)
        np.testing.assert_array_equal(specs["mlp.c_fc.weight"].shard(gate_up, rank, 2),
                                      np.r_[rank * 24:(rank + 1) * 24, hidden + rank * 24:hidden + (rank + 1) * 24])
    assert specs["mlp.c_proj.weight"].shard(np.zeros((C, hidden)), 1, 2).shape == (C, 24)


# ---------------------------------------------------------------- tensor parallel: what it saves


def test_parameters_per_rank_at_tp2_by_hand_and_for_gpt2_124m(monkeypatch):
    """"What it saves": the block matrices (and their column-parallel biases) are divided by T; the
    embeddings, norms and row-parallel biases are not. By hand for the test model (C = 32, 4C MLP,
    V = 64, T = 16, 2 blocks), and the doc's figure: gpt2-124m holds 81.9 M of 124.4 M (65.8%) per GPU."""
    from minillm.nn import layers

    C, V, ctx = 32, 64, 16
    whole_block = 2 * 2 * C + (3 * C * C + 3 * C) + (C * C + C) + (4 * C * C + 4 * C) + (4 * C * C + C)
    shard_block = 2 * 2 * C + (3 * C * C + 3 * C) // 2 + (C * C // 2 + C) + (4 * C * C + 4 * C) // 2 + (4 * C * C // 2 + C)
    embeddings = V * C + ctx * C + 2 * C                    # wte, wpe, ln_f
    model = GPT(GPTConfig(**MODEL))
    assert model.num_parameters() == embeddings + 2 * whole_block
    assert shard_gpt(model, Comm()).num_parameters() == embeddings + 2 * shard_block

    monkeypatch.setattr(layers, "discard_normal_draws", lambda count, chunk=None: None)   # placeholders, no draws
    with layers.draws_discarded():
        gpt2 = GPT(GPTConfig.from_preset("gpt2-124m"))
    assert gpt2.num_parameters() == 124_439_808             # "What it sends": 497.8 MB of float32 gradients
    per_gpu = shard_gpt(gpt2, Comm()).num_parameters()
    assert (round(per_gpu / 1e6, 1), round(100 * per_gpu / 124_439_808, 1)) == (81.9, 65.8)


# ---------------------------------------------------------------- tensor parallel: a Llama-style run


def _llama_run(group, shape):
    model, data, config = tiny_run("float64", 12, **LLAMA)
    if shape is None:                                          # the reference: the ordinary Trainer
        trainer = Trainer(model, config, data)
        losses = [trainer.train_step()[0] for _ in range(config.steps)]
        return losses, {name: value.copy() for name, value in model.state_dict().items()}
    trainer = ParallelTrainer(model, config, data, DeviceMesh(group.comm, MeshShape(**shape)))
    losses = [trainer.train_step()[0] for _ in range(config.steps)]
    return losses, trainer.full_state()[0]


def test_tensor_parallel_llama_block_equals_one_process():
    """TP = 2 on a GQA + SwiGLU + RoPE model: 12 AdamW steps (clipping on), losses and every gathered
    parameter as one process (float64; measured 2e-16 / 3e-13). A gate cut apart from its up rows, or
    k/v heads handed to the wrong rank, changes the function at once."""
    ref_losses, ref_params = spawn(_llama_run, 1, args=(None,))[0]
    for losses, params in spawn(_llama_run, 2, args=(dict(tp=2),)):
        assert max_relative(losses, ref_losses) < 1e-10
        assert max_relative(params, ref_params) < 1e-10


# ---------------------------------------------------------------- data parallel: exact resume with dropout


def _dropout_run(group, run_dir, stop, resume):
    model, data, config = tiny_run("float64", 8, dropout=0.2)
    trainer = ParallelTrainer(model, config, data, DeviceMesh(group.comm, MeshShape(dp=group.world_size)),
                              run_dir=run_dir)
    if resume:
        trainer.resume()
    losses = [trainer.train_step()[0] for _ in range(stop - trainer.step)]
    if run_dir is not None and not resume:
        trainer.save()
    return losses, trainer.full_state()[0]


def test_data_parallel_with_dropout_resumes_bit_for_bit_on_the_same_layout(tmp_path):
    """distributed.md "One writer, exact resume": every replica's random stream (its own dropout masks)
    is saved in the checkpoint, so DP = 2 with dropout resumed at step 4 continues bit for bit."""
    straight, _ = spawn(_dropout_run, 2, args=(None, 8, False))[0]
    first, _ = spawn(_dropout_run, 2, args=(tmp_path, 4, False))[0]
    resumed, _ = spawn(_dropout_run, 2, args=(tmp_path, 8, True))[0]
    assert first + resumed == straight                       # exactly: == on float64 losses


# ---------------------------------------------------------------- what each layout sends


def _traffic(group, shape):
    """One step of 2 micro-batches of 8 windows (T = 16, C = 32, V = 64, 2 blocks): every collective and
    point-to-point payload this rank issued, as Counter{(op, shape): calls}."""
    from collections import Counter

    import minillm as mm
    from minillm.distributed.parallel_trainer import rank_model

    mesh = DeviceMesh(group.comm, MeshShape(**shape))
    model, data, config = tiny_run("float64", 2, 8, 2)
    if mesh.shape.pp > 1:
        mm.manual_seed(3)
        model = rank_model(model.config, mesh)
    trainer = ParallelTrainer(model, config, data, mesh)
    log = Counter()
    comms = [mesh.world] + ([trainer.engine.tied_comm] if trainer.engine and trainer.engine.tied_comm else [])
    for comm in comms:
        for op in ("all_reduce", "broadcast", "all_gather"):
            real = getattr(comm, op)
            setattr(comm, op, lambda array, *a, _real=real, _op=op, **k: log.update([(_op, array.shape)])
                    or _real(array, *a, **k))
        real_send_recv = comm.send_recv

        def send_recv(send, send_peer, recv, recv_peer, _real=real_send_recv):
            log.update([("send", send.shape)] if send is not None else [])
            log.update([("recv", recv.shape)] if recv is not None else [])
            return _real(send, send_peer, recv, recv_peer)
        comm.send_recv = send_recv
    trainer.train_step()
    return dict(log)        # a copy: spawn's closing barrier (an all-reduce) must not land in it


def test_tensor_parallel_sends_four_activations_per_block_plus_the_vocabulary_parallel_head():
    """"What it sends" (--tp): per block and forward-backward, 4 all-reduces of a (b, T, C) activation
    (g after attention and after the MLP; f before each in the backward); the vocabulary-parallel head
    adds one more (f before it), its (V, C) gradient and three (b·T,) vectors; the clip one number.
    A replicated head (the same arithmetic, slower) or an extra collective shows here."""
    M, b, T, C, V, L = 2, 8, 16, 32, 64, 2
    for log in spawn(_traffic, 2, args=(dict(tp=2),)):
        assert log == {("all_reduce", (b, T, C)): M * (4 * L + 1), ("all_reduce", (V, C)): M,
                       ("all_reduce", (b * T,)): 3 * M, ("all_reduce", (1,)): 1}


def test_pipeline_sends_one_activation_per_micro_batch_and_boundary():
    """"What a pipeline sends": per micro-batch and boundary, the (b, T, C) residual stream forward and
    its gradient back, and no all-reduce but the tied embedding's (V, C), once per step (with the
    loss broadcast and the clip's norm: one number each)."""
    M, b, T, C, V = 2, 8, 16, 32, 64
    first, last = spawn(_traffic, 2, args=(dict(pp=2),))
    small = {("broadcast", (1,)): 1, ("all_reduce", (1,)): 1, ("all_reduce", (V, C)): 1}
    assert first == {("send", (b, T, C)): M, ("recv", (b, T, C)): M, **small}
    assert last == {("send", (b, T, C)): M, ("recv", (b, T, C)): M, **small}


def _bucket_views(group):
    from minillm.distributed.data_parallel import DataParallel

    model, data, _ = tiny_run()
    ddp = DataParallel(model.parameters(), group.comm, bucket_mb=0.01)
    inputs, targets = ddp.shard_batch(data.get_batch("train", 8))
    model(inputs, targets)[1].backward()
    ddp.finish()
    views = [any(np.shares_memory(p.grad, b.buffer) for b in ddp.buckets) for p in model.parameters()]
    in_buckets = [id(p) for b in ddp.buckets for p in b.params]
    return views, in_buckets == [id(p) for p in reversed(list(model.parameters()))], len(ddp.buckets)


def test_averaged_gradients_are_views_into_the_buckets_in_reverse_parameter_order():
    """"Buckets": grouped in the reverse of the parameter order, and each .grad becomes a view into its
    averaged bucket (no copy back)."""
    for views, reverse_order, buckets in spawn(_bucket_views, 2):
        assert buckets > 3 and reverse_order and all(views)


# ---------------------------------------------------------------- documented defaults


def test_documented_defaults():
    import inspect

    from minillm.distributed import init_process_group, nccl
    from minillm.distributed.data_parallel import DataParallel
    from minillm.nn import layers

    from minillm.distributed.mesh import init_mesh

    for join in (init_process_group, init_mesh):                                       # "Faults": what
        assert inspect.signature(join).parameters["timeout"].default == 60             # minillm train uses
    assert nccl.EXIT_GRACE_S == 20                                                     # "bounds the exit (20 s)"
    for cls in (DataParallel, ParallelTrainer):                                       # "~25 MB buckets"
        assert inspect.signature(cls).parameters["bucket_mb"].default == 25
    assert layers.DISCARD_CHUNK == 2 ** 20 and 4 * layers.DISCARD_CHUNK == 4 * 2 ** 20   # "chunks of 2^20 (4 MiB)"


# ---------------------------------------------------------------- --pp: each rank builds only its stage


def test_rank_model_builds_only_the_stage_never_the_whole_gpt(monkeypatch):
    """`minillm train --pp`, `bench train --pp` and ParallelTrainer build through ``rank_model``: with
    pp > 1 it must never construct the whole GPT (whose weights a rank would hold, however briefly), and
    the stage it returns holds its own parameters only, equal to GPT(config)'s from the same seed."""
    from types import SimpleNamespace

    import minillm as mm
    from minillm.distributed.parallel_trainer import rank_model

    config = GPTConfig(**{**MODEL, "n_layer": 4})
    mm.manual_seed(3)
    whole = {name: p.data.copy() for name, p in GPT(config).named_parameters()}

    def no_whole_model(self, *args, **kwargs):
        raise AssertionError("the whole GPT was built")

    monkeypatch.setattr(GPT, "__init__", no_whole_model)
    mesh = SimpleNamespace(shape=MeshShape(pp=2, tp=2), pp_rank=1)
    mm.manual_seed(3)
    stage = rank_model(config, mesh)
    names = [name for name, _ in stage.named_parameters()]
    assert "wpe.weight" not in names and "h.0.attn.c_attn.weight" not in names and "h.3.mlp.c_fc.weight" in names
    for name, p in stage.named_parameters():
        np.testing.assert_array_equal(p.data, whole[name], err_msg=name)


# ---------------------------------------------------------------- the grid through the command line


def _minillm(*argv, nproc=None):
    prefix = ["launch", "--nproc-per-node", nproc, "--device", "cpu", "--master-port", free_port(), "--"] if nproc else []
    result = subprocess.run([sys.executable, "-m", "minillm", *map(str, prefix), *map(str, argv)], capture_output=True,
                            text=True, timeout=180, env={**os.environ, "PYTHONPATH": str(ROOT), "OPENBLAS_NUM_THREADS": "1"},
                            cwd=ROOT)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    return result


def test_launch_train_pp2_dp2_tp2_logs_the_single_process_losses_and_generates(tmp_path, capsys):
    """distributed.md: `minillm launch --nproc-per-node 8 --device cpu -- train --pp 2 --dp 2 --tp 2
    --micro-batches 2 ...` logs one process's losses (float32, with evaluation: measured <= 1.5e-7), its
    checkpoint is one ordinary file, and `minillm generate --run DIR` samples from it on one process."""
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 300, encoding="utf-8")
    common = ["--data", text, "--tokenizer", "bytes", "--n-layer", 2, "--n-head", 2, "--d-model", 32, "--context", 16,
              "--batch-size", 8, "--steps", 10, "--eval-interval", 5, "--eval-batches", 1, "--samples", 0, "--quiet",
              "--device", "cpu"]
    _minillm("train", *common, "--grad-accum", 2, "--batch-size", 4, "--out", tmp_path / "one")
    _minillm("train", *common, "--pp", 2, "--dp", 2, "--tp", 2, "--micro-batches", 2, "--out", tmp_path / "grid",
             nproc=8)
    read = lambda run: [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    one, grid = read("one"), read("grid")
    assert [(r["kind"], r["step"]) for r in grid] == [(r["kind"], r["step"]) for r in one]   # one writer
    assert sum(r["kind"] == "eval" for r in one) == 2
    values = lambda records: [r.get("loss", r.get("val_loss")) for r in records]  # noqa: E731
    assert max_relative(values(grid), values(one)) < 5e-7
    from minillm.cli import main

    assert main(["generate", "--run", str(tmp_path / "grid"), "--prompt", "the ", "--max-new-tokens", "5",
                 "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("the ")
