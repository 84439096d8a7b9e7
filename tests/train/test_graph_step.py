"""The captured training step (minillm/train/graph_step.py, ``--cuda-graph``).

On a GPU (``pytest --device cuda``) a run that replays its forward and backward as a CUDA graph is
compared step by step with the same run made uncaptured: the graph runs the same kernels on the same
numbers in the same order, so losses and weights agree to float32 rounding (the tolerances below
allow for cuBLAS picking another algorithm once the capture has given it a fixed workspace). The
checks the capture moves to the host run everywhere.
"""

import math

import numpy as np
import pytest

import minillm as mm
from minillm.train import TrainConfig, Trainer
from minillm.train.graph_step import check_graph_capturable, check_token_batch
from minillm.train.trainer import TrainingDiverged

from train_helpers import VOCAB, make_config, make_dataset, make_model


pytestmark = pytest.mark.usefixtures("restore_precision")


# ------------------------------------------------------------------ everywhere


def test_cuda_graph_needs_a_gpu():
    with pytest.raises(ValueError, match="needs a GPU"):
        TrainConfig(device="cpu", cuda_graph=True)


def test_cuda_graph_refuses_dropout():
    check_graph_capturable(make_model(dropout=0.0))
    with pytest.raises(ValueError, match="--dropout 0"):
        check_graph_capturable(make_model(dropout=0.1))


def test_token_ids_are_checked_on_the_host():
    good = (np.array([[0, VOCAB - 1]]), np.array([[1, -100]]))
    check_token_batch(*good, VOCAB)                               # -100 is cross-entropy's ignore index
    with pytest.raises(ValueError, match=f"token id {VOCAB} is out of range"):
        check_token_batch(np.array([[0, VOCAB]]), good[1], VOCAB)
    with pytest.raises(ValueError, match="token id -100 is out of range"):
        check_token_batch(np.array([[-100, 1]]), good[1], VOCAB)  # inputs have no ignore index
    with pytest.raises(ValueError, match="target id -1 is out of range"):
        check_token_batch(good[0], np.array([[-1, 2]]), VOCAB)


def test_train_command_refuses_cuda_graph_on_a_cpu(tmp_path, capsys):
    from minillm.cli import main

    assert main(["train", "--cuda-graph", "--steps", "2", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs a GPU" in err[0]
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ on a GPU


def _run(device, steps, cuda_graph, **config):
    trainer = Trainer(make_model(seed=1), make_config(steps=steps, device=device, cuda_graph=cuda_graph,
                                                      eval_interval=0, checkpoint_interval=0, **config),
                      make_dataset())
    losses = [trainer.train_step()[0] for _ in range(steps)]
    weights = {name: mm.backend.to_numpy(p.data).astype(np.float64) for name, p in trainer.model.named_parameters()}
    return trainer, losses, weights


@pytest.mark.parametrize("precision,grad_accum", [("fp32", 1), ("fp32", 2), ("tf32", 1), ("bf16", 2), ("fp16", 1)])
def test_captured_steps_equal_uncaptured_steps(gpu, precision, grad_accum):
    steps = 6
    captured, graph_losses, graph_weights = _run(gpu, steps, True, precision=precision, grad_accum=grad_accum)
    _, losses, weights = _run(gpu, steps, False, precision=precision, grad_accum=grad_accum)
    assert captured._captured is not None                  # steps 2.. replayed the graph
    # the same kernels on the same numbers: float32 rounding apart (cuBLAS may choose another
    # algorithm once the capture has set its workspace). Weights get 1e-3: Adam divides each step by
    # sqrt(v), so where a gradient is pure rounding noise (the key bias: softmax ignores a shift of
    # every score in a row, so its true gradient is 0) rounding differences become whole lr-sized
    # steps, ~1e-4 of the bias after 6 steps here (measured on an H200)
    np.testing.assert_allclose(graph_losses, losses, rtol=1e-5)
    for name, value in weights.items():
        error = np.linalg.norm(graph_weights[name] - value) / max(np.linalg.norm(value), 1e-12)
        assert error < 1e-3, f"{name}: relative difference {error:.2e} after {steps} steps"
    # and the run learned something (the comparison is not between two runs that did nothing)
    assert graph_losses[-1] < graph_losses[0]


def test_captured_gradients_are_the_uncaptured_ones(gpu):
    """After a replay every parameter's .grad holds this step's gradient (fixed arrays, re-attached)."""
    trainer = Trainer(make_model(seed=2), make_config(device=gpu, cuda_graph=True, clip=None), make_dataset())
    trainer.train_step()                                    # eager
    trainer.train_step()                                    # captured and replayed
    batches = [trainer.data.get_batch("train", 4)]
    reference = Trainer(make_model(seed=2), make_config(device=gpu), make_dataset())
    for p, q in zip(reference.model.parameters(), trainer.model.parameters()):
        p.data[...] = q.data
    trainer.optimizer.zero_grad()
    reference.optimizer.zero_grad()
    loss = trainer._replay_forward_backward(batches, 1.0)
    inputs, targets = (mm.backend.to_device(a, gpu) for a in batches[0])
    _, expected = reference.model(inputs, targets)
    expected.backward()
    assert math.isclose(float(loss), float(expected.data), rel_tol=1e-6)
    for p, q in zip(reference.model.parameters(), trainer.model.parameters()):
        np.testing.assert_allclose(mm.backend.to_numpy(q.grad), mm.backend.to_numpy(p.grad), rtol=1e-4, atol=1e-6)


def test_captured_step_checks_ids_and_shapes(gpu):
    trainer = Trainer(make_model(), make_config(device=gpu, cuda_graph=True), make_dataset())
    trainer.train_step()
    trainer.train_step()
    good = trainer.data.get_batch("train", 4)
    bad = (good[0].copy(), good[1])
    bad[0][0, 0] = VOCAB
    before = [mm.backend.to_numpy(p.data).copy() for p in trainer.model.parameters()]
    with pytest.raises(ValueError, match=f"token id {VOCAB} is out of range"):
        trainer._replay_forward_backward([bad], 1.0)
    with pytest.raises(ValueError, match="shapes of the first"):
        trainer._replay_forward_backward([(good[0][:2], good[1][:2])], 1.0)
    for a, p in zip(before, trainer.model.parameters()):
        np.testing.assert_array_equal(a, mm.backend.to_numpy(p.data))


def test_captured_step_stops_before_updating_on_a_non_finite_loss(gpu):
    trainer = Trainer(make_model(), make_config(device=gpu, cuda_graph=True), make_dataset())
    trainer.train_step()
    trainer.train_step()
    first = next(iter(trainer.model.parameters()))
    first.data[0] = np.nan                                 # in place: the graph reads this array
    before = [mm.backend.to_numpy(p.data).copy() for p in trainer.model.parameters()]
    with pytest.raises(TrainingDiverged):
        trainer.train_step()
    for a, p in zip(before, trainer.model.parameters()):
        np.testing.assert_array_equal(a, mm.backend.to_numpy(p.data))


def test_cuda_graph_is_refused_for_dropout_on_a_gpu(gpu):
    with pytest.raises(ValueError, match="--dropout 0"):
        Trainer(make_model(dropout=0.1), make_config(device=gpu, cuda_graph=True), make_dataset())


def test_replaced_weight_arrays_are_captured_again(gpu):
    """A parameter given a new array after the capture (a checkpoint loaded into fresh arrays) is
    read by the next step: the trainer captures again instead of replaying the old arrays."""
    trainer = Trainer(make_model(seed=3), make_config(device=gpu, cuda_graph=True, clip=None), make_dataset())
    trainer.train_step()
    trainer.train_step()
    first = trainer._captured
    reference = Trainer(make_model(seed=3), make_config(device=gpu, clip=None), make_dataset())
    for p, q in zip(reference.model.parameters(), trainer.model.parameters()):
        q.data = q.data * 0.5                       # new arrays
        p.data[...] = q.data
    batches = [trainer.data.get_batch("train", 4)]
    trainer.optimizer.zero_grad()
    loss = trainer._replay_forward_backward(batches, 1.0)
    assert trainer._captured is not first
    inputs, targets = (mm.backend.to_device(a, gpu) for a in batches[0])
    _, expected = reference.model(inputs, targets)
    assert math.isclose(float(loss), float(expected.data), rel_tol=1e-6)
