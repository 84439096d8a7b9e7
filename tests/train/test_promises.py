"""The Trainer's documented promises (docs/training.md), each checked so that breaking it fails a test:
AdamW's parameter groups, a non-finite gradient norm, evaluation with dropout on, a second Ctrl-C,
and the fsync order of a checkpoint write."""

import math
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from minillm import backend, optim
from minillm.tensor import Tensor
from minillm.train import TrainingDiverged, load_checkpoint, read_metrics
from minillm.train import checkpoint as checkpoint_module

from train_helpers import make_trainer


def params(model):
    return {name: backend.to_numpy(value).copy() for name, value in model.state_dict().items()}


# ------------------------------------------------------------------ AdamW groups


def expected_decay(name: str) -> bool:
    """docs/training.md, "What not to decay", written out for the GPT's names: only the four
    weight matrices of each block decay; biases, norm gains and both embedding tables do not."""
    return name.endswith(".weight") and name.split(".")[-2] in ("c_attn", "c_proj", "c_fc")


def test_trainer_gives_adamw_groups_without_decay_on_biases_norms_and_embeddings():
    trainer = make_trainer(weight_decay=0.25)
    named = dict(trainer.model.named_parameters())
    by_id = {id(p): name for name, p in named.items()}
    decayed = {by_id[id(p)] for g in trainer.optimizer.param_groups if g["weight_decay"] == 0.25 for p in g["params"]}
    spared = {by_id[id(p)] for g in trainer.optimizer.param_groups if g["weight_decay"] == 0.0 for p in g["params"]}
    assert decayed == {n for n in named if expected_decay(n)}
    assert spared == {n for n in named if not expected_decay(n)}
    assert {"wte.weight", "wpe.weight", "ln_f.weight", "h.0.ln_1.bias", "h.1.mlp.c_fc.bias"} <= spared
    assert sum(len(g["params"]) for g in trainer.optimizer.param_groups) == len(named)


def test_first_adamw_step_matches_numpy_with_decay_only_on_matrices():
    """One real training step against AdamW's first step written in float64 NumPy:
    m̂ = g, v̂ = g², so p1 = p0 (1 − lr·wd) − lr · g / (|g| + eps), wd = 0 for the spared tensors."""
    wd = 0.5
    trainer = make_trainer(weight_decay=wd, warmup=0, lr=1e-2, clip=None)
    model = trainer.model
    before = params(model)
    grads = {}
    real_step = trainer.optimizer.step

    def step_recording_grads():
        grads.update({name: backend.to_numpy(p.grad).astype(np.float64) for name, p in model.named_parameters()})
        real_step()

    trainer.optimizer.step = step_recording_grads
    trainer.train_step()
    lr, eps = trainer.config.lr, trainer.config.eps   # warmup 0: step 0 runs at the peak lr
    for name, after in params(model).items():
        p0, g = before[name].astype(np.float64), grads[name]
        decay = wd if expected_decay(name) else 0.0
        expected = p0 * (1 - lr * decay) - lr * g / (np.abs(g) + eps)
        np.testing.assert_allclose(after, expected, rtol=2e-6, atol=1e-7, err_msg=name)
        if decay:   # the decay term is far above the tolerance: one group for all would show
            assert np.abs(lr * wd * p0).max() > 1e-5


# ------------------------------------------------------------------ a non-finite gradient norm


@pytest.mark.parametrize("clip", [1.0, None])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_gradient_norm_stops_before_the_update(clip, bad, tmp_path, monkeypatch):
    """The loss stays finite; one gradient entry turns nan/inf after backward (as an overflow in a
    backward pass would). Training must stop with a clear message, weights and Adam state untouched."""
    trainer = make_trainer(tmp_path, steps=10, checkpoint_interval=3, clip=clip)
    trainer.fit(stop_at=3)
    target = trainer.model.h[1].mlp.c_fc.weight
    real_backward = Tensor.backward

    def backward_then_poison(self, *args, **kwargs):
        real_backward(self, *args, **kwargs)
        target.grad[0, 0] = bad

    monkeypatch.setattr(Tensor, "backward", backward_then_poison)
    before = params(trainer.model)
    adam_steps = [s["step"] for s in trainer.optimizer.state.values()]
    with pytest.raises(TrainingDiverged) as error:
        trainer.fit()
    message = str(error.value)
    assert f"diverged at step 4: gradient norm is {float(bad)} (loss " in message
    loss = float(message.split("(loss ")[1].split(")")[0])
    assert math.isfinite(loss)
    assert "the last good checkpoint (step 3)" in message and "Try a lower --lr" in message
    for name, value in params(trainer.model).items():
        np.testing.assert_array_equal(value, before[name], err_msg=name)
    assert [s["step"] for s in trainer.optimizer.state.values()] == adam_steps
    assert trainer.step == 3 and load_checkpoint(tmp_path).step == 3
    assert [r["step"] for r in read_metrics(tmp_path, "train")] == [1, 2, 3]


# ------------------------------------------------------------------ evaluation and the random streams


def test_evaluation_with_dropout_on_does_not_change_training(tmp_path):
    """With dropout, every training step draws masks from the model's random stream; an evaluation
    that drew from it too (a forward pass left in training mode, a stray draw) would shift every
    later mask, and the losses would differ."""
    runs = {}
    for name, interval in (("rare", 0), ("every step", 1)):
        trainer = make_trainer(tmp_path / str(interval), dropout=0.3, steps=6, eval_interval=interval,
                               checkpoint_interval=0)
        trainer.fit()
        runs[name] = ([r["loss"] for r in read_metrics(trainer.run_dir, "train")], params(trainer.model))
        assert len(read_metrics(trainer.run_dir, "eval")) == (1 if interval == 0 else 6)
    assert runs["every step"][0] == runs["rare"][0]                       # bit for bit
    for name, value in runs["rare"][1].items():
        np.testing.assert_array_equal(runs["every step"][1][name], value, err_msg=name)
    no_dropout = make_trainer(steps=6, eval_interval=0)
    assert [no_dropout.train_step()[0] for _ in range(6)] != runs["rare"][0]   # the masks are really drawn


# ------------------------------------------------------------------ a second Ctrl-C


def test_second_ctrl_c_stops_at_once_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """Two real SIGINTs during a step that would last 30 s: the first only asks for a stop, the
    second raises KeyboardInterrupt at once: the step is not finished and nothing is saved."""
    trainer = make_trainer(tmp_path, steps=10, checkpoint_interval=2, eval_interval=0)
    real_get_batch = trainer.data.get_batch
    saves = []
    real_save = trainer.save
    monkeypatch.setattr(trainer, "save", lambda: saves.append(trainer.step) or real_save())

    def get_batch(split, batch_size, rng=None):
        if split == "train" and trainer.step == 3:           # step 4: Ctrl-C, Ctrl-C, then a long wait
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)                                  # two separate deliveries, not one coalesced
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(30)
        return real_get_batch(split, batch_size, rng)

    monkeypatch.setattr(trainer.data, "get_batch", get_batch)
    start = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    assert time.perf_counter() - start < 10                   # the 30 s sleep was cut short
    assert trainer.step == 3 and saves == [2]                 # step 4 never finished, no save after it
    assert load_checkpoint(tmp_path).step == 2                # the previous checkpoint, intact
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


# ------------------------------------------------------------------ fsync before the commit rename


def test_checkpoint_fsyncs_arrays_and_directory_before_the_commit_rename(tmp_path, monkeypatch):
    """docs/training.md §8: arrays -> .tmp, fsync, rename; the directory entry made durable; then
    metadata -> .tmp, fsync, rename over checkpoint.json (the commit); then the run directory."""
    trainer = make_trainer(tmp_path, steps=2)
    trainer.train_step()
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def name_of(fd):
        """The path (relative to the run directory) that the descriptor's file or folder has now."""
        inode = os.fstat(fd).st_ino
        for folder, subfolders, files in os.walk(tmp_path):
            for path in [folder] + [os.path.join(folder, name) for name in subfolders + files]:
                if os.stat(path).st_ino == inode:
                    return os.path.relpath(path, tmp_path)
        return f"inode {inode} outside the run directory"

    def fsync(fd):
        events.append(("fsync", name_of(fd)))
        real_fsync(fd)

    def replace(src, dst, *args, **kwargs):
        events.append(("replace", os.path.relpath(src, tmp_path), os.path.relpath(dst, tmp_path)))
        real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module.os, "fsync", fsync)
    monkeypatch.setattr(checkpoint_module.os, "replace", replace)
    trainer.save()
    arrays = "checkpoints/step-000001.npz"
    assert events == [
        ("fsync", arrays + ".tmp"),                      # 1. the arrays' bytes are on disk ...
        ("replace", arrays + ".tmp", arrays),            #    ... before their name appears
        ("fsync", "checkpoints"),                        #    ... and the name itself is durable
        ("fsync", "checkpoint.json.tmp"),                # 2. the metadata's bytes ...
        ("replace", "checkpoint.json.tmp", "checkpoint.json"),   # ... then the commit
        ("fsync", "."),                                  #    ... made durable
    ]
    assert load_checkpoint(tmp_path).step == 1


# ------------------------------------------------------------------ evaluation batches (§7)


def record_evaluation_batches(trainer, monkeypatch):
    """Every batch ``trainer.evaluate`` scores, as (inputs, targets) NumPy copies, in order."""
    seen = []
    real_batch_loss = trainer.batch_loss

    def batch_loss(inputs, targets):
        seen.append((backend.to_numpy(inputs).copy(), backend.to_numpy(targets).copy()))
        return real_batch_loss(inputs, targets)

    monkeypatch.setattr(trainer, "batch_loss", batch_loss)
    return seen


def numpy_cross_entropy(model, batches):
    """The mean next-token cross-entropy over every position of ``batches``, from the model's logits in NumPy."""
    model.eval()
    total, count = 0.0, 0
    for inputs, targets in batches:
        logits = backend.to_numpy(model(inputs).data).astype(np.float64)      # (B, T, V)
        shifted = logits - logits.max(axis=-1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
        total -= np.take_along_axis(log_probs, targets[..., None], axis=-1).sum()
        count += targets.size
    model.train()
    return total / count


def test_evaluation_scores_the_same_k_batches_every_time_and_another_datasets_split(monkeypatch):
    """§7: eval_batches = k is k batches of the validation split, the same k at every evaluation (the
    curve shows the model changing, not the sample); evaluate(max_batches=None, data=other) walks
    every window of the other dataset's validation split once."""
    from minillm.data.dataset import TokenDataset

    trainer = make_trainer(steps=4, eval_batches=3, batch_size=4)
    seen = record_evaluation_batches(trainer, monkeypatch)
    first = trainer.evaluate()
    batches = list(seen)
    assert len(batches) == 3 and len({x.tobytes() for x, _ in batches}) == 3   # 3 different random batches
    val = trainer.data.split("val").tokens
    for inputs, targets in batches:                        # windows of the validation split
        for x, y in zip(inputs, targets):
            window = np.r_[x, y[-1]]
            assert np.array_equal(y[:-1], x[1:]) and any(np.array_equal(val[s:s + 17], window)
                                                         for s in range(len(val) - 16))
    assert first == pytest.approx(numpy_cross_entropy(trainer.model, batches), rel=1e-5)
    trainer.train_step()
    seen.clear()
    trainer.evaluate()
    assert len(seen) == 3 and all(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
                                  for a, b in zip(seen, batches))   # the same batches after training

    other = TokenDataset(np.arange(200, dtype=np.uint16) % 32, 16, stride=16, val_fraction=0.5)   # 100 val tokens
    seen.clear()
    loss = trainer.evaluate(max_batches=None, data=other)
    starts = range(0, (100 - 16 - 1) // 16 * 16 + 1, 16)  # (n - T - 1) // stride + 1 = 6 windows
    windows = [other.split("val").tokens[s:s + 17] for s in starts]
    assert [len(x) for x, _ in seen] == [4, 2]             # batch 4, then the last smaller one
    np.testing.assert_array_equal(np.concatenate([x for x, _ in seen]), np.array([w[:16] for w in windows]))
    np.testing.assert_array_equal(np.concatenate([y for _, y in seen]), np.array([w[1:] for w in windows]))
    assert loss == pytest.approx(numpy_cross_entropy(trainer.model, seen), rel=1e-5)


# ------------------------------------------------------------------ AdamW allocates nothing per step (§2)


def test_adamw_step_on_the_cpu_allocates_nothing_after_the_first():
    """§2 "Implementation": in-place passes through one shared scratch buffer, nothing allocated per
    step. Traced over two later steps (one parameter above the threads' block size, one at it, one
    small), the peak stays far below one parameter's bytes; a temporary per pass would hold one."""
    import tracemalloc

    from minillm.ops.common import CPU_BLOCK_ELEMENTS as N
    from minillm.tensor import Tensor as T

    rng = np.random.default_rng(0)
    params = [T(rng.standard_normal(n).astype(np.float32), requires_grad=True) for n in (4 * N + 7, N, 1000)]
    opt = optim.AdamW(params, lr=1e-2)
    for p in params:
        p.grad = rng.standard_normal(p.shape).astype(np.float32)
    opt.step()                                             # the first step makes the moments and the scratch
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        opt.step()
        opt.step()
        held, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak - start < 4 * N // 8, peak - start         # < 64 kB; one block's temporary is 512 kB
    # still held: the split's bookkeeping (Python objects, no array; ~3 kB with 2 threads, ~4.3 kB with 8,
    # flat after a few steps) is far below any per-step array (one block: 512 kB)
    assert held - start < 16 * 1024, held - start


# ------------------------------------------------------------------ `minillm train` with no arguments (§10)


def test_default_run_is_the_documented_small_gpt_in_numbered_run_directories(tmp_path, monkeypatch):
    """§10: no arguments = the built-in corpus, a BPE tokenizer of 2,048 tokens, 4 layers, 4 heads,
    d_model 128, context 128, in runs/pydoc, then runs/pydoc-2, ...; AdamW's own default decay 0.01 (§2)."""
    import inspect

    from minillm.train.run import resolve_run

    monkeypatch.chdir(tmp_path)
    plan = resolve_run()
    assert plan.data is None and plan.tokenizer == "bpe:2048" and plan.run_dir == Path("runs/pydoc")
    assert {k: plan.model[k] for k in ("n_layer", "n_head", "d_model", "context_length")} == dict(
        n_layer=4, n_head=4, d_model=128, context_length=128)
    assert plan.train.steps == 1500                        # §10's measured row: "1500 steps"
    from minillm.cli import build_parser

    assert build_parser().parse_args(["train"]).samples == 3   # "then it prints three samples"
    for taken, expected in (("runs/pydoc", "runs/pydoc-2"), ("runs/pydoc-2", "runs/pydoc-3")):
        (tmp_path / taken).mkdir(parents=True)
        assert resolve_run().run_dir == Path(expected)
    assert inspect.signature(optim.AdamW).parameters["weight_decay"].default == 0.01


def test_bench_train_defaults_are_the_documented_cpu_reference():
    """§10: `minillm bench train` defaults to 6 layers, 6 heads, d_model 384, context 256, batch 8, vocab 65."""
    from minillm.bench.train import BENCH_DEFAULT
    from minillm.cli import build_parser

    assert BENCH_DEFAULT == dict(n_layer=6, n_head=6, d_model=384, context_length=256, vocab_size=65)
    args = build_parser().parse_args(["bench", "train"])
    assert (args.batch_size, args.grad_accum, args.preset) == (8, 1, None)
    assert all(getattr(args, name) is None for name in ("n_layer", "n_head", "d_model", "context_length"))


# ------------------------------------------------------------------ the metrics log (§5)


def test_metrics_lines_hold_the_documented_fields(tmp_path):
    """§5: every step appends {"kind": "train", step, loss, lr, grad_norm, tokens, tokens_per_s, time_s};
    every evaluation {"kind": "eval", step, val_loss, val_perplexity = exp(val_loss)}."""
    make_trainer(tmp_path, steps=2, eval_interval=2, clip=None).fit()
    train, evals = read_metrics(tmp_path, "train"), read_metrics(tmp_path, "eval")
    assert [sorted(r) for r in train] == [sorted(["kind", "step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s",
                                                  "time_s"])] * 2
    assert [sorted(r) for r in evals] == [sorted(["kind", "step", "val_loss", "val_perplexity"])]
    assert evals[0]["val_perplexity"] == pytest.approx(math.exp(evals[0]["val_loss"]))
    assert all(r["grad_norm"] > 0 and r["tokens_per_s"] > 0 for r in train) and train[1]["time_s"] >= train[0]["time_s"]


def test_fit_returns_the_documented_result(tmp_path):
    """§5: fit() returns FitResult(step, train_loss, val_loss, interrupted, seconds, tokens_per_second):
    the last step's loss and the last evaluation's, as logged."""
    result = make_trainer(tmp_path, steps=3, eval_interval=2, batch_size=4).fit()
    train, evals = read_metrics(tmp_path, "train"), read_metrics(tmp_path, "eval")
    assert (result.step, result.interrupted) == (3, False) and [r["step"] for r in evals] == [2, 3]
    assert result.train_loss == train[-1]["loss"] != train[0]["loss"]
    assert result.val_loss == evals[-1]["val_loss"] != evals[0]["val_loss"]
    assert result.seconds >= train[-1]["time_s"]          # the call's wall time: training, evaluation, saving
    assert result.tokens_per_second == pytest.approx(3 * 4 * 16 / result.seconds, rel=1e-9)   # 3 steps of 4 x 16
