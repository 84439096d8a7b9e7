"""TF32 and autocast (minillm/precision.py) and the cuBLAS products (minillm/kernels/matmul.py):
every product that runs reduced is compared with its float32 path, with tolerances argued in each
test. The GPU tests run with ``pytest --device cuda``; the switch's checks run everywhere."""

import numpy as np
import pytest

import minillm as mm
from minillm import functional as F
from minillm.models import GPT, GPTConfig

RNG = np.random.default_rng(3)


pytestmark = pytest.mark.usefixtures("restore_precision")


def relative_error(a, b):
    a, b = (np.asarray(mm.backend.to_numpy(x), dtype=np.float64) for x in (a, b))
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def test_float32_matmul_precision_switch():
    assert mm.get_float32_matmul_precision() == "highest"
    mm.set_float32_matmul_precision("high")
    assert mm.get_float32_matmul_precision() == "high"
    with pytest.raises(ValueError, match="highest"):
        mm.set_float32_matmul_precision("fast")


def test_autocast_products_of_cpu_tensors_are_an_error(device):
    if device != "cpu" or not mm.backend.cuda_available():
        pytest.skip("needs a GPU machine running the CPU tests")
    x = mm.Tensor(np.ones((2, 3), dtype=np.float32))
    with mm.autocast("bf16"), pytest.raises(ValueError, match="GPU only"):
        F.linear(x, x)


@pytest.mark.parametrize("trans_a", [False, True])
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("batch", [(), (3,), (1,)])
def test_gemm_against_numpy(trans_a, trans_b, batch, gpu):
    """The raw cuBLAS wrapper: transposes read in place, broadcast batches (a 2-D b against a
    batched a), alpha, accumulate into out, float64 exactly (to rounding)."""
    import cupy

    from minillm.kernels.matmul import gemm

    a = RNG.standard_normal(batch + ((7, 5) if trans_a else (5, 7)))
    b = RNG.standard_normal((9, 7) if trans_b else (7, 9))
    expected = 0.5 * (a.swapaxes(-1, -2) if trans_a else a) @ (b.T if trans_b else b)
    got = gemm(cupy.asarray(a), cupy.asarray(b), trans_a, trans_b, alpha=0.5)
    np.testing.assert_allclose(cupy.asnumpy(got), expected, rtol=1e-12, atol=1e-12)
    gemm(cupy.asarray(a), cupy.asarray(b), trans_a, trans_b, out=got, accumulate=True)
    np.testing.assert_allclose(cupy.asnumpy(got), 3 * expected, rtol=1e-12, atol=1e-12)
    view = cupy.asarray(RNG.standard_normal((5, 20)))[:, 3:10]          # rows with a stride: no copy needed
    np.testing.assert_allclose(cupy.asnumpy(gemm(view, cupy.asarray(b if not trans_b else b.T))),
                               cupy.asnumpy(view) @ (b if not trans_b else b.T), rtol=1e-12)


def _linear_and_matmul(device, dtype=np.float32, autocast=None):
    x = mm.Tensor(RNG.standard_normal((4, 33, 96)).astype(dtype), requires_grad=True, device=device)
    w = mm.Tensor(RNG.standard_normal((80, 96)).astype(dtype) * 0.1, requires_grad=True, device=device)
    bias = mm.Tensor(RNG.standard_normal(80).astype(dtype), requires_grad=True, device=device)
    m = mm.Tensor(RNG.standard_normal((4, 80, 16)).astype(dtype), requires_grad=True, device=device)
    cot = mm.backend.to_device(RNG.standard_normal((4, 33, 16)).astype(dtype), device)
    if autocast:
        with mm.autocast(autocast):
            out = F.linear(x, w, bias) @ m                 # linear, then a batched matmul
    else:
        out = F.linear(x, w, bias) @ m
    out.backward(cot)
    return out, [x.grad, w.grad, bias.grad, m.grad]


@pytest.mark.parametrize("mode,tolerance", [("tf32", 2e-3), ("bf16", 1.5e-2), ("fp16", 2e-3)])
def test_reduced_linear_and_matmul_close_to_float32(mode, tolerance, gpu):
    """TF32 and fp16 keep 11 significant bits (unit roundoff u = 2^-11 = 4.9e-4), bf16 keeps 8
    (u = 3.9e-3). Rounding both operands of a float32-accumulated product moves it by about
    u·√2 norm-wise on random data; the gradients pass through two such products (x -> linear ->
    matmul), so a few u: 2e-3 for TF32/fp16 and 1.5e-2 for bf16. Outputs, gradients and the
    parameters stay float32 (master weights)."""
    global RNG
    RNG = np.random.default_rng(2)
    exact_out, exact_grads = _linear_and_matmul(gpu)
    RNG = np.random.default_rng(2)
    if mode == "tf32":
        mm.set_float32_matmul_precision("high")
        out, grads = _linear_and_matmul(gpu)
    else:
        out, grads = _linear_and_matmul(gpu, autocast=mode)
    assert out.dtype == np.float32 and all(g.dtype == np.float32 for g in grads)
    assert relative_error(out.data, exact_out.data) < tolerance
    for g, e in zip(grads, exact_grads):
        assert relative_error(g, e) < tolerance
    assert relative_error(out.data, exact_out.data) > 0          # it did run reduced


@pytest.mark.parametrize("mode", ["tf32", "bf16", "fp16"])
def test_gpt_training_step_in_reduced_precision(mode, gpu):
    """A whole GPT forward + backward: loss within 1% of float32 (the loss averages many
    logits, each off by a few u), gradients norm-wise within 5e-2 (bf16)."""
    cfg = GPTConfig(vocab_size=97, context_length=32, n_layer=2, n_head=4, d_model=64, dropout=0.0)
    ids = RNG.integers(0, 97, size=(4, 33))

    def step(autocast=None):
        mm.manual_seed(0)
        model = GPT(cfg).to(gpu)
        x, y = ids[:, :-1], ids[:, 1:]
        if autocast:
            with mm.autocast(autocast):
                loss = F.cross_entropy(model(x), y)
        else:
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        grads = np.concatenate([mm.backend.to_numpy(p.grad).ravel() for p in model.parameters()])
        return loss.item(), grads

    exact_loss, exact_grads = step()
    if mode == "tf32":
        mm.set_float32_matmul_precision("high")
        loss, grads = step()
    else:
        loss, grads = step(mode)
    assert abs(loss - exact_loss) < 0.01 * exact_loss
    assert relative_error(grads, exact_grads) < (5e-2 if mode == "bf16" else 1e-2)


def test_precision_option_is_fp32_only_on_the_cpu():
    from minillm.train import TrainConfig

    with pytest.raises(ValueError, match="needs a GPU"):
        TrainConfig(precision="bf16", device="cpu")
    with pytest.raises(ValueError, match="one of"):
        TrainConfig(precision="int8", device="cpu")
    assert TrainConfig(precision="fp32", device="cpu").precision == "fp32"


@pytest.mark.parametrize("mode", ["bf16", "fp16"])
def test_trainer_in_mixed_precision_learns_keeps_fp32_weights_and_resumes_in_fp32(mode, gpu, tmp_path):
    """A repeating sequence is easy to learn: the loss must fall by half in 40 steps of bf16/fp16;
    the parameters stay float32, the fp16 loss scale goes into the checkpoint, and an fp32 run
    resumes from the mixed-precision checkpoint."""
    from minillm.data.dataset import TokenDataset
    from minillm.train import TrainConfig, Trainer

    tokens = np.tile(np.arange(16), 200)
    data = TokenDataset(tokens, 16, stride=1, val_fraction=0.1, seed=0)
    cfg = GPTConfig(vocab_size=16, context_length=16, n_layer=1, n_head=2, d_model=32, dropout=0.0)

    def trainer(steps, precision):
        train_cfg = TrainConfig(steps=steps, batch_size=8, lr=1e-2, min_lr=1e-3, warmup=0, device=gpu,
                                progress=False, precision=precision, eval_interval=0, checkpoint_interval=0)
        return Trainer(GPT(cfg), train_cfg, data, run_dir=tmp_path)

    run = trainer(40, mode)
    first, _ = run.train_step()
    result = run.fit()
    assert result.train_loss < 0.5 * first
    assert all(p.dtype == np.float32 for p in run.model.parameters())
    assert run.scaler.is_enabled() == (mode == "fp16")
    resumed = trainer(41, "fp32")
    assert resumed.resume() == 40
    loss, _ = resumed.train_step()
    assert abs(loss - result.train_loss) < 0.5 * result.train_loss


@pytest.mark.parametrize("argv", [["train", "--precision", "bf16", "--steps", "1"],
                                  ["bench", "train", "--precision", "tf32"],
                                  ["bench", "generate", "--precision", "fp16"]])
def test_commands_refuse_reduced_precision_on_the_cpu(argv, capsys):
    from minillm.cli import main

    assert main(argv) == 2
    assert "needs a GPU" in capsys.readouterr().err


@pytest.mark.parametrize("out_features", [13, 16])
@pytest.mark.parametrize("reduced,tolerance", [("bf16", 1.5e-2), ("fp16", 2e-3), ("tf32", 2e-3)])
def test_autocast_linear_of_any_width(out_features, reduced, tolerance, gpu):
    """A tensor-core linear layer (16-bit, or TF32) whose width is not a multiple of 8 multiplies
    with zero-padded rows (kernels/matmul.py, tensor_core_width): output, dx, dW and db equal the
    float32 layer's within the rounding of the operands (u = 2^-8 bf16, 2^-11 fp16 and TF32, a
    few u through a product), and the padding shows only in where the output's rows start (16
    apart for 13 columns)."""
    import cupy

    x0, w0, b0 = RNG.standard_normal((4, 6, 40)), RNG.standard_normal((out_features, 40)) * 0.2, RNG.standard_normal(out_features)
    cotangent = RNG.standard_normal((4, 6, out_features)).astype(np.float32)
    results = []
    for mode in (None, reduced):
        x, w, b = (mm.Tensor(a.astype(np.float32), requires_grad=True, device=gpu) for a in (x0, w0, b0))
        if mode is None:
            y = F.linear(x, w, b)
        else:
            with mm.precision.use_precision(mode):
                y = F.linear(x, w, b)
                y.backward(cupy.asarray(cotangent))      # TF32 is read when each product runs
            padded = -(-out_features // 8) * 8
            assert y.data.strides[-2] == padded * 4
        if mode is None:
            y.backward(cupy.asarray(cotangent))
        assert w.grad.shape == (out_features, 40) and y.shape == (4, 6, out_features)
        results.append([mm.backend.to_numpy(a) for a in (y.data, x.grad, w.grad, b.grad)])
    for name, a, e in zip(("y", "dx", "dW", "db"), results[1], results[0]):
        assert relative_error(a, e) < tolerance, name
