"""The Trainer: learning, gradient accumulation, evaluation, exact resume, Ctrl-C, NaN."""

import json
import math
import os
import signal

import numpy as np
import pytest

from minillm import backend, optim
from minillm.train import TrainConfig, Trainer, TrainingDiverged, load_checkpoint, read_metrics

from train_helpers import VOCAB, make_config, make_dataset, make_model, make_trainer


def params(model):
    return {name: backend.to_numpy(value).copy() for name, value in model.state_dict().items()}


def comparable(records):
    """The metrics that must match exactly between runs (times and speeds may differ)."""
    keys = ("kind", "step", "loss", "lr", "grad_norm", "tokens", "val_loss")
    return [{k: r.get(k) for k in keys} for r in records]


# ------------------------------------------------------------------ learning


def test_loss_goes_down_on_a_fixed_seed(tmp_path):
    trainer = make_trainer(tmp_path, steps=80, lr=2e-2, warmup=5, eval_interval=0, eval_batches=5)
    before = trainer.evaluate()
    assert before == pytest.approx(math.log(VOCAB), abs=0.25)  # a fresh model guesses ~uniformly
    result = trainer.fit()
    assert result.step == 80 and not result.interrupted
    # the stream is a repeating phrase with 10% noise: about 0.7 nats of entropy per token
    assert result.val_loss < 1.0 < before
    losses = [r["loss"] for r in read_metrics(tmp_path, "train")]
    assert losses[0] == pytest.approx(math.log(VOCAB), abs=0.25)
    assert np.mean(losses[-10:]) < 1.2


def test_config_is_validated():
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="min_lr"):
        TrainConfig(lr=1e-3, min_lr=1e-2)
    with pytest.raises(ValueError, match="eval_batches"):
        TrainConfig(eval_batches=0)
    with pytest.raises(ValueError, match="unknown field"):
        TrainConfig.from_dict({"stpes": 3})


def test_schedule_and_log(tmp_path):
    trainer = make_trainer(tmp_path, steps=6, warmup=2, lr=1e-2, min_lr=1e-3, eval_interval=3)
    trainer.fit()
    train = read_metrics(tmp_path, "train")
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    # warmup 2 steps to 1e-2, then cosine from 1e-2 (step index 2) to 1e-3 (reached at index 6)
    expected = [1e-2 * (i + 1) / 2 if i < 2 else 1e-3 + 9e-3 * 0.5 * (1 + math.cos(math.pi * (i - 2) / 4))
                for i in range(6)]
    assert [r["lr"] for r in train] == pytest.approx(expected, rel=1e-12)
    assert [r["tokens"] for r in train] == [4 * 16 * k for k in range(1, 7)]
    evals = read_metrics(tmp_path, "eval")
    assert [r["step"] for r in evals] == [3, 6]
    assert evals[-1]["val_perplexity"] == pytest.approx(math.exp(evals[-1]["val_loss"]))


def test_gradient_accumulation_equals_one_big_batch():
    # the dataset's generator draws 4 + 4 windows exactly as it draws 8, so both see the same data
    # plain SGD without clipping, so the parameters move by lr * gradient (Adam would magnify rounding in
    # tiny gradients; and both Adam and clipping to a norm would hide a gradient scaled by a constant)
    def sgd_trainer(**config):
        model = make_model()
        return Trainer(model, make_config(steps=3, clip=None, **config), make_dataset(),
                       optimizer=optim.SGD(model.parameters(), lr=0.1))

    big = sgd_trainer(batch_size=8, grad_accum=1)
    accumulated = sgd_trainer(batch_size=4, grad_accum=2)
    big_losses = [big.train_step()[0] for _ in range(3)]
    accumulated_losses = [accumulated.train_step()[0] for _ in range(3)]
    assert accumulated_losses == pytest.approx(big_losses, rel=1e-5)
    for name, value in params(big.model).items():
        np.testing.assert_allclose(params(accumulated.model)[name], value, rtol=1e-5, atol=1e-7, err_msg=name)


def test_full_evaluation_matches_numpy_cross_entropy():
    trainer = make_trainer(batch_size=5)
    data = trainer.data
    data_windows = data.split("val")
    loss = trainer.evaluate(max_batches=None)  # every val window, in batches of 5 (the last one smaller)
    inputs, targets = data_windows.batch(np.arange(len(data_windows)))
    trainer.model.eval()
    logits = trainer.model(inputs).numpy().astype(np.float64)              # (N, T, V)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    reference = -np.take_along_axis(log_probs, targets[..., None], axis=-1).mean()
    assert len(data_windows) % 5 != 0
    assert loss == pytest.approx(reference, rel=1e-5)


def test_evaluation_does_not_disturb_training():
    plain = make_trainer(steps=5, eval_interval=0)
    evaluated = make_trainer(steps=5, eval_interval=1)
    plain.fit()
    evaluated.fit()
    for name, value in params(plain.model).items():
        np.testing.assert_array_equal(params(evaluated.model)[name], value)


# ------------------------------------------------------------------ resume


def test_resume_gives_the_same_losses_as_an_uninterrupted_run(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    a = make_trainer(straight, dropout=0.1, steps=12)   # dropout: the random streams must resume too
    a.fit()

    first = make_trainer(split, dropout=0.1, steps=12)
    assert first.fit(stop_at=6).step == 6
    del first
    second = make_trainer(split, model_seed=123, dropout=0.1, steps=12)  # other init: resume overwrites it
    assert second.resume() == 6
    second.fit()

    assert comparable(read_metrics(split)) == comparable(read_metrics(straight))
    for name, value in params(a.model).items():
        np.testing.assert_array_equal(params(second.model)[name], value, err_msg=name)


def during_step(trainer, step: int, event, monkeypatch) -> None:
    """Make ``event()`` happen while step ``step`` (1-based) fetches its training batch."""
    real_get_batch = trainer.data.get_batch

    def get_batch(split, batch_size, rng=None):
        if split == "train" and trainer.step == step - 1:
            event()
        return real_get_batch(split, batch_size, rng)

    monkeypatch.setattr(trainer.data, "get_batch", get_batch)


def test_resume_after_a_crash_drops_the_metrics_logged_after_the_checkpoint(tmp_path, monkeypatch):
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    make_trainer(straight, steps=12, checkpoint_interval=5).fit()

    trainer = make_trainer(crashed, steps=12, checkpoint_interval=5)

    def crash():
        raise OSError("disk on fire")

    during_step(trainer, 8, crash, monkeypatch)
    with pytest.raises(OSError, match="disk on fire"):
        trainer.fit()
    assert [r["step"] for r in read_metrics(crashed, "train")][-1] == 7   # logged past the checkpoint at 5

    resumed = make_trainer(crashed, steps=12, checkpoint_interval=5)
    assert resumed.resume() == 5
    resumed.fit()
    assert comparable(read_metrics(crashed)) == comparable(read_metrics(straight))


def test_ctrl_c_saves_and_resumes_exactly(tmp_path, monkeypatch):
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    make_trainer(straight, steps=10, checkpoint_interval=0).fit()

    trainer = make_trainer(interrupted, steps=10, checkpoint_interval=0)
    # the real signal, handled by the trainer
    during_step(trainer, 4, lambda: os.kill(os.getpid(), signal.SIGINT), monkeypatch)
    result = trainer.fit()
    assert result.interrupted and result.step == 4       # the step in flight was finished
    assert load_checkpoint(interrupted).step == 4
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler   # handler restored

    resumed = make_trainer(interrupted, steps=10, checkpoint_interval=0)
    resumed.resume()
    assert not resumed.fit().interrupted
    assert comparable(read_metrics(interrupted)) == comparable(read_metrics(straight))


# ------------------------------------------------------------------ divergence


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_checkpoint(tmp_path):
    trainer = make_trainer(tmp_path, steps=10, checkpoint_interval=4)
    trainer.fit(stop_at=4)
    saved = load_checkpoint(tmp_path)
    trainer.model.h[0].ln_1.weight.data[0] = np.nan          # poison the model after the checkpoint
    adam_steps = [s["step"] for s in trainer.optimizer.state.values()]
    with pytest.raises(TrainingDiverged, match=r"diverged at step 5: loss is nan.*last good checkpoint \(step 4\)"):
        trainer.fit()
    assert [s["step"] for s in trainer.optimizer.state.values()] == adam_steps   # no update happened
    assert np.isnan(trainer.model.h[0].ln_1.weight.data[0])
    after = load_checkpoint(tmp_path)
    assert after.step == 4
    for name, value in saved.model_state.items():
        np.testing.assert_array_equal(after.model_state[name], value)
        assert np.isfinite(value).all()
    assert json.loads((tmp_path / "checkpoint.json").read_text())["step"] == 4


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_overflow_stops_too():
    trainer = make_trainer(steps=3)
    trainer.model.wpe.weight.data[:] = 3e38   # finite weights whose sums overflow float32
    before = params(trainer.model)
    with pytest.raises(TrainingDiverged, match="diverged at step 1: .*(nan|inf)"):
        trainer.train_step()
    for name, value in params(trainer.model).items():
        np.testing.assert_array_equal(value, before[name])


# ------------------------------------------------------------------ devices


def test_training_and_exact_resume_on_the_device(device, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    make_trainer(straight, steps=6, device=device).fit()
    first = make_trainer(split, steps=6, device=device)
    first.fit(stop_at=3)
    assert backend.device_of(first.model.wte.weight.data) == backend.parse_device(device)
    resumed = make_trainer(split, steps=6, device=device)
    resumed.resume()
    resumed.fit()
    if device == "cpu":
        assert comparable(read_metrics(split)) == comparable(read_metrics(straight))
    else:  # CuPy's scatter-add (embedding backward) uses atomics: sums differ in the last bits run to run
        for a, b in zip(read_metrics(split, "train"), read_metrics(straight, "train"), strict=True):
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["lr"] == b["lr"]
    losses = [r["loss"] for r in read_metrics(straight, "train")]
    assert losses[0] == pytest.approx(math.log(VOCAB), abs=0.25) and all(map(math.isfinite, losses))
