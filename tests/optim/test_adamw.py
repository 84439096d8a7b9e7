"""AdamW against a plain NumPy transcription of the published algorithm, its state
round trip, parameter-group handling, and the weight-decay grouping rule."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import minillm as mm
from minillm import backend, optim


def adamw_reference(param, grads, lrs, betas, eps, weight_decay):
    """Loshchilov & Hutter's AdamW as PyTorch writes it, in float64, step by step (t = 1, 2, ...)."""
    beta1, beta2 = betas
    p = np.array(param, dtype=np.float64)
    m, v = np.zeros_like(p), np.zeros_like(p)
    for t, (g, lr) in enumerate(zip(grads, lrs), start=1):
        g = np.asarray(g, dtype=np.float64)
        p = p - lr * weight_decay * p
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        m_hat = m / (1 - beta1**t)
        v_hat = v / (1 - beta2**t)
        p = p - lr * m_hat / (np.sqrt(v_hat) + eps)
    return p


def make_param(array, device, dtype):
    return mm.Tensor(np.array(array, dtype=dtype), requires_grad=True, device=device)  # a copy: updated in place


def set_grad(p, g):
    p.grad = backend.to_device(np.asarray(g, dtype=p.dtype), p.device)


@pytest.mark.parametrize("dtype, rtol, atol", [(np.float64, 1e-12, 1e-14), (np.float32, 2e-5, 1e-6)])
def test_matches_reference_with_two_groups(device, dtype, rtol, atol, cpu_path):
    rng = np.random.default_rng(0)
    init_a, init_b = rng.standard_normal((4, 3)), rng.standard_normal(5)
    grads_a = [rng.standard_normal((4, 3)) for _ in range(6)]
    grads_b = [rng.standard_normal(5) * 10.0 ** k for k in range(-3, 3)]  # very different scales
    a, b = make_param(init_a, device, dtype), make_param(init_b, device, dtype)
    opt = optim.AdamW([{"params": [a], "lr": 0.05, "weight_decay": 0.1},
                       {"params": [b], "betas": (0.8, 0.99)}],
                      lr=0.01, eps=1e-6, weight_decay=0.0)
    for ga, gb in zip(grads_a, grads_b):
        set_grad(a, ga)
        set_grad(b, gb)
        opt.step()
    assert a.dtype == dtype and b.dtype == dtype
    np.testing.assert_allclose(a.numpy(), adamw_reference(init_a, grads_a, [0.05] * 6, (0.9, 0.999), 1e-6, 0.1),
                               rtol=rtol, atol=atol)
    np.testing.assert_allclose(b.numpy(), adamw_reference(init_b, grads_b, [0.01] * 6, (0.8, 0.99), 1e-6, 0.0),
                               rtol=rtol, atol=atol)


@settings(max_examples=25, deadline=None)
@given(beta1=st.floats(0.0, 0.99), beta2=st.floats(0.5, 0.9999), eps=st.sampled_from([1e-8, 1e-6, 1e-3]),
       weight_decay=st.floats(0.0, 0.5), seed=st.integers(0, 2**16))
def test_matches_reference_any_hyperparameters(beta1, beta2, eps, weight_decay, seed, cpu_path):
    rng = np.random.default_rng(seed)
    init = rng.standard_normal((3, 4))
    grads = [rng.standard_normal((3, 4)) for _ in range(4)]
    lrs = [0.1, 0.03, 0.2, 0.001]  # changed between steps, as a schedule does
    p = make_param(init, "cpu", np.float64)
    opt = optim.AdamW([p], lr=lrs[0], betas=(beta1, beta2), eps=eps, weight_decay=weight_decay)
    for g, lr in zip(grads, lrs):
        optim.apply_lr(opt, lr)
        set_grad(p, g)
        opt.step()
    expected = adamw_reference(init, grads, lrs, (beta1, beta2), eps, weight_decay)
    np.testing.assert_allclose(p.data, expected, rtol=1e-10, atol=1e-12)


def test_updates_in_place_and_keeps_float32(device):
    p = make_param(np.ones((8, 8)), device, np.float32)
    opt = optim.AdamW([p], lr=1e-2, weight_decay=0.1)
    data = p.data
    set_grad(p, np.full((8, 8), 0.5))
    opt.step()
    state = opt.state[id(p)]
    m, v = state["exp_avg"], state["exp_avg_sq"]
    set_grad(p, np.full((8, 8), -0.5))
    opt.step()
    assert p.data is data
    assert state["exp_avg"] is m and state["exp_avg_sq"] is v
    assert p.data.dtype == np.float32 and m.dtype == np.float32 and v.dtype == np.float32
    assert state["step"] == 2


def test_skips_parameters_without_grad(device):
    a, b = make_param(np.ones(3), device, np.float32), make_param(np.ones(3), device, np.float32)
    opt = optim.AdamW([a, b], lr=0.1, weight_decay=0.5)
    set_grad(a, np.ones(3))
    opt.step()
    assert np.array_equal(b.numpy(), np.ones(3, np.float32))  # not even decayed
    assert id(b) not in opt.state and opt.state[id(a)]["step"] == 1
    opt.zero_grad()
    assert a.grad is None and b.grad is None


def test_state_dict_round_trip_continues_identically(device):
    rng = np.random.default_rng(1)
    inits = [rng.standard_normal((5, 4)), rng.standard_normal(4)]
    grads = [[rng.standard_normal(x.shape) for x in inits] for _ in range(6)]

    def fresh():
        params = [make_param(x, device, np.float32) for x in inits]
        return params, optim.AdamW([{"params": params[:1]}, {"params": params[1:], "weight_decay": 0.0}],
                                   lr=0.02, weight_decay=0.05)

    params_a, opt_a = fresh()
    for step_grads in grads[:3]:
        for p, g in zip(params_a, step_grads):
            set_grad(p, g)
        opt_a.step()
    saved = opt_a.state_dict()
    assert all(isinstance(v, np.ndarray) for s in saved["state"].values() for k, v in s.items() if k != "step")
    exp_avg_saved = saved["state"][0]["exp_avg"].copy()

    params_b, opt_b = fresh()
    for p, q in zip(params_b, params_a):
        p.data[...] = q.data
    opt_b.param_groups[0]["lr"] = 123.0  # restored from the state dict
    opt_b.load_state_dict(saved)
    assert opt_b.param_groups[0]["lr"] == 0.02
    for step_grads in grads[3:]:
        for params in (params_a, params_b):
            for p, g in zip(params, step_grads):
                set_grad(p, g)
        opt_a.step()
        opt_b.step()
    for p, q in zip(params_a, params_b):
        assert np.array_equal(p.numpy(), q.numpy())
    assert np.array_equal(saved["state"][0]["exp_avg"], exp_avg_saved)  # a snapshot, not a view
    assert backend.device_of(opt_b.state[id(params_b[0])]["exp_avg"]) == params_b[0].device


def test_load_state_dict_rejects_a_mismatch():
    a, b = make_param(np.ones((2, 3)), "cpu", np.float32), make_param(np.ones(3), "cpu", np.float32)
    opt = optim.AdamW([a, b])
    set_grad(a, np.ones((2, 3)))
    set_grad(b, np.ones(3))
    opt.step()
    saved = opt.state_dict()
    with pytest.raises(ValueError, match="1 parameter group.*has 2"):
        optim.AdamW([{"params": [a]}, {"params": [b]}]).load_state_dict(saved)
    with pytest.raises(ValueError, match="2 parameter.*has 1"):
        optim.AdamW([a]).load_state_dict(saved)
    c = make_param(np.ones((3, 2)), "cpu", np.float32)
    with pytest.raises(ValueError, match=r"shape \(2, 3\).*shape \(3, 2\)"):
        optim.AdamW([c, b]).load_state_dict(saved)


def test_constructor_errors():
    p = make_param(np.ones(2), "cpu", np.float32)
    with pytest.raises(ValueError, match="empty"):
        optim.AdamW([])
    with pytest.raises(ValueError, match="twice"):
        optim.AdamW([{"params": [p]}, {"params": [p]}])
    with pytest.raises(ValueError, match="unknown hyper-parameter"):
        optim.AdamW([{"params": [p], "weight_dacay": 0.1}])
    with pytest.raises(TypeError, match="named_parameters"):
        optim.AdamW([("w", p)])
    with pytest.raises(ValueError, match="does not match"):
        opt = optim.AdamW([p])
        p.grad = np.ones(3, np.float32)
        opt.step()


def test_minimises_a_quadratic_through_autograd():
    target = np.array([1.0, -2.0, 3.0], dtype=np.float32)
    x = mm.Tensor(np.zeros(3, np.float32), requires_grad=True)
    opt = optim.AdamW([x], lr=0.1, weight_decay=0.0)
    for _ in range(300):
        opt.zero_grad()
        ((x - target) * (x - target)).sum().backward()
        opt.step()
    np.testing.assert_allclose(x.numpy(), target, atol=1e-2)


def test_fused_gpu_kernel_equals_numpy_path(gpu):
    from minillm.kernels.optim import adamw_update_

    rng = np.random.default_rng(2)
    p, g, m = (rng.standard_normal((64, 33)).astype(np.float32) for _ in range(3))
    v = np.abs(rng.standard_normal((64, 33))).astype(np.float32)
    on_gpu = [backend.to_device(x, gpu) for x in (p, g, m, v)]
    hyper = dict(beta1=0.9, beta2=0.95, step_size=3e-3, eps_hat=1e-8, decay=0.999)
    adamw_update_(on_gpu[0], on_gpu[1], on_gpu[2], on_gpu[3], **hyper)
    from minillm.optim.adamw import _adamw_passes      # the CPU's passes, on the same arrays

    _adamw_passes(p, g, m, v, np.empty_like(p), **hyper)
    for gpu_array, cpu_array in zip((on_gpu[0], on_gpu[2], on_gpu[3]), (p, m, v)):
        np.testing.assert_allclose(backend.to_numpy(gpu_array), cpu_array, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------ weight_decay_groups


def test_weight_decay_groups_rule():
    def t(*shape):
        return mm.Tensor(np.zeros(shape, np.float32), requires_grad=True)

    wte, wpe, fc_w, fc_b, ln_w, tok_emb = t(10, 4), t(8, 4), t(4, 16), t(16), t(4), t(10, 4)
    frozen = mm.Tensor(np.zeros((4, 4), np.float32))
    named = [("wte.weight", wte), ("wpe.weight", wpe), ("h.0.mlp.c_fc.weight", fc_w),
             ("h.0.mlp.c_fc.bias", fc_b), ("h.0.ln_1.weight", ln_w), ("Token_Embedding.weight", tok_emb),
             ("lm_head.weight", wte), ("frozen.weight", frozen)]  # lm_head tied to wte
    groups = optim.weight_decay_groups(named, weight_decay=0.1)
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert [id(p) for p in groups[0]["params"]] == [id(fc_w)]
    assert [id(p) for p in groups[1]["params"]] == [id(x) for x in (wte, wpe, fc_b, ln_w, tok_emb)]
    opt = optim.AdamW(groups, lr=1e-3)  # AdamW takes the groups as they are
    assert opt.param_groups[0]["weight_decay"] == 0.1 and opt.param_groups[1]["weight_decay"] == 0.0


def test_weight_decay_groups_drops_an_empty_group():
    bias = mm.Tensor(np.zeros(3, np.float32), requires_grad=True)
    groups = optim.weight_decay_groups([("fc.bias", bias)], 0.1)
    assert len(groups) == 1 and groups[0]["weight_decay"] == 0.0


# ------------------------------------------------------------ one launch per bucket (multi-tensor AdamW)

AWKWARD_SHAPES = [(1,), (65_535,), (65_536,), (65_537,), (3, 5), (0,)]  # around the 65,536-element chunk


def test_buckets_by_device_dtype_step():
    from minillm.optim.adamw import buckets_by_device_dtype_step

    def four(n, dtype):
        return tuple(np.zeros(n, dtype) for _ in range(4))

    a, b, c, d = four(3, np.float32), four(2, np.float32), four(5, np.float32), four(4, np.float64)
    buckets = buckets_by_device_dtype_step([(3, *a), (2, *b), (3, *c), (3, *d)])
    assert list(buckets) == [("cpu", np.dtype(np.float32), 3), ("cpu", np.dtype(np.float32), 2),
                             ("cpu", np.dtype(np.float64), 3)]
    for key, members in zip(buckets, ([a, c], [b], [d])):
        columns = buckets[key]
        assert len(columns) == 4  # params, grads, exp_avgs, exp_avg_sqs
        for k, column in enumerate(columns):
            assert [id(x) for x in column] == [id(m[k]) for m in members]  # the arrays themselves, in order
    assert buckets_by_device_dtype_step([]) == {}


def test_multi_tensor_table_layout():
    """The chunk map, worked by hand for CHUNK = 65,536 (objects with .size and .data.ptr stand in for CuPy arrays)."""
    from types import SimpleNamespace

    from minillm.kernels import optim as kernels

    def fake(ptr, size):
        return SimpleNamespace(size=size, data=SimpleNamespace(ptr=ptr))

    sizes = [1, 65_536, 65_537, 0, 15, 131_073]
    params = [fake(1000 + i, n) for i, n in enumerate(sizes)]
    grads = [fake(2000 + i, n) for i, n in enumerate(sizes)]
    table, n_chunks = kernels._multi_tensor_table([params, grads])
    assert n_chunks == 1 + 1 + 2 + 0 + 1 + 3
    n = len(sizes)
    assert table.dtype == np.int64 and len(table) == 2 * n + n + 2 * n_chunks
    assert list(table[:n]) == [1000 + i for i in range(n)]
    assert list(table[n:2 * n]) == [2000 + i for i in range(n)]
    assert list(table[2 * n:3 * n]) == sizes
    assert list(table[3 * n:3 * n + n_chunks]) == [0, 1, 2, 2, 4, 5, 5, 5]          # chunk's tensor
    assert list(table[3 * n + n_chunks:]) == [0, 0, 0, 65_536, 0, 0, 65_536, 131_072]  # chunk's start
    with pytest.raises(ValueError, match="one size"):  # a grad that does not fit its parameter
        kernels._multi_tensor_table([params, grads[:-1] + [fake(0, 7)]])
    with pytest.raises(ValueError, match="one size"):
        kernels._multi_tensor_table([params, grads[:-1]])


def test_buckets_of_awkward_sizes_and_a_missed_step_match_reference(device, monkeypatch):
    """Two groups (decay, no decay) of awkward sizes, in each one parameter without a gradient at
    step 2 (its t lags by one from then on: a bucket of its own). Every parameter follows the
    reference over its own steps; on a GPU each bucket is one multi-tensor launch."""
    from minillm.optim import adamw as adamw_module

    launches = []
    real_multi_adamw = adamw_module.multi_adamw_
    monkeypatch.setattr(adamw_module, "multi_adamw_",
                        lambda *args: (launches.append(len(args[0])), real_multi_adamw(*args)))
    rng = np.random.default_rng(4)
    inits = [rng.standard_normal(shape) for shape in AWKWARD_SHAPES + [(7,), (2, 3)]]
    params = [make_param(x, device, np.float32) for x in inits]
    decayed, not_decayed = params[:4], params[4:]   # (1,) (65535,) (65536,) (65537,) | (3,5) (0,) (7,) (2,3)
    missing = {1: {id(params[2]), id(params[6])}}  # step index 1: these two have no gradient
    opt = optim.AdamW([{"params": decayed, "weight_decay": 0.1}, {"params": not_decayed, "weight_decay": 0.0}],
                      lr=0.01, betas=(0.9, 0.95), eps=1e-8)
    grads_seen = [[] for _ in params]
    for step in range(4):
        for k, p in enumerate(params):
            if id(p) in missing.get(step, ()):
                p.grad = None
                continue
            g = rng.standard_normal(p.shape)
            grads_seen[k].append(g)
            set_grad(p, g)
        opt.step()
    for k, p in enumerate(params):
        assert opt.state[id(p)]["step"] == len(grads_seen[k]) == (3 if k in (2, 6) else 4)
        wd = 0.1 if k < 4 else 0.0
        expected = adamw_reference(inits[k], grads_seen[k], [0.01] * len(grads_seen[k]), (0.9, 0.95), 1e-8, wd)
        assert p.data.dtype == np.float32 and p.shape == inits[k].shape
        np.testing.assert_allclose(p.numpy(), expected, rtol=2e-5, atol=1e-6, err_msg=f"parameter {k}")
    if device == "cpu":
        assert launches == []  # NumPy parameters never reach the GPU kernel
    else:
        # step 1: one bucket per group; step 2: params 2 and 6 skip; steps 3-4: t = 3/4 and t = 2/3 split each group
        assert launches == [4, 4, 3, 3, 3, 1, 3, 1, 3, 1, 3, 1]


def test_non_contiguous_bucket_falls_back_to_per_parameter_kernel(gpu, monkeypatch):
    from minillm.optim import adamw as adamw_module

    launches = []
    monkeypatch.setattr(adamw_module, "multi_adamw_", lambda *args: launches.append(args))
    rng = np.random.default_rng(5)
    init_t, init_c = rng.standard_normal((6, 4)), rng.standard_normal(9)
    transposed = mm.Tensor(backend.to_device(init_t.astype(np.float32), gpu).T, requires_grad=True)
    contiguous = make_param(init_c, gpu, np.float32)
    assert not transposed.data.flags.c_contiguous
    opt = optim.AdamW([transposed, contiguous], lr=0.02, weight_decay=0.05)
    grads_t, grads_c = [rng.standard_normal((4, 6)) for _ in range(3)], [rng.standard_normal(9) for _ in range(3)]
    for g_t, g_c in zip(grads_t, grads_c):
        set_grad(transposed, g_t)
        set_grad(contiguous, g_c)
        opt.step()
    assert launches == []  # the bucket held a non-contiguous array: per-parameter kernel for all of it
    np.testing.assert_allclose(transposed.numpy(), adamw_reference(init_t.T, grads_t, [0.02] * 3, (0.9, 0.999), 1e-8,
                                                                   0.05), rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(contiguous.numpy(), adamw_reference(init_c, grads_c, [0.02] * 3, (0.9, 0.999), 1e-8,
                                                                   0.05), rtol=2e-5, atol=1e-6)


# The multi-tensor kernel evaluates the per-parameter kernel's expressions in the same order and
# dtype, but the two are separate NVRTC compilations, each free to contract a*b + c into one FMA
# (one rounding instead of two) where it sees fit. So float32 results may differ by an ulp or two
# per operation (2^-23 ~ 1.2e-7 relative, of values O(1) here), carried over the steps: rtol and
# atol of 1e-6 (~8 ulps) for float32, 1e-13 for float64. A wrong chunk boundary or column leaves
# elements unchanged or mixed up and misses by O(1e-3) at least.
@pytest.mark.parametrize("dtype, tol", [(np.float32, 1e-6), (np.float64, 1e-13)])
def test_multi_tensor_kernel_equals_per_parameter_kernel(gpu, dtype, tol):
    from minillm.kernels.optim import adamw_update_, multi_adamw_, multi_tensor_fusable

    rng = np.random.default_rng(6)
    host = []  # per parameter: p, g, m, v
    for shape in AWKWARD_SHAPES + [(300, 700)]:
        p, g, m = (rng.standard_normal(shape).astype(dtype) for _ in range(3))
        host.append([p, g, m, np.abs(rng.standard_normal(shape)).astype(dtype)])
    multi = [[backend.to_device(x, gpu) for x in four] for four in host]
    single = [[backend.to_device(x, gpu) for x in four] for four in host]
    columns = [[four[k] for four in multi] for k in range(4)]
    assert multi_tensor_fusable([a for column in columns for a in column])
    for t in range(1, 4):
        hyper = dict(beta1=0.9, beta2=0.95, step_size=1e-3 * t, eps_hat=1e-8 * t, decay=1.0 - 1e-4 * t)
        multi_adamw_(*columns, **hyper)
        for four in single:
            adamw_update_(*four, **hyper)
        new_grads = [rng.standard_normal(h[0].shape).astype(dtype) for h in host]
        for four_m, four_s, g in zip(multi, single, new_grads):  # the next step's gradient, one for both
            four_m[1][...] = backend.to_device(g, gpu)
            four_s[1][...] = backend.to_device(g, gpu)
    for k, (four_m, four_s) in enumerate(zip(multi, single)):
        assert four_m[0].dtype == dtype
        for name, a, b in zip(("param", "grad", "exp_avg", "exp_avg_sq"), four_m, four_s):
            np.testing.assert_allclose(backend.to_numpy(a), backend.to_numpy(b), rtol=tol, atol=tol,
                                       err_msg=f"{name} of parameter {k}")
    moved = backend.to_numpy(multi[-1][0]) != host[-1][0]  # all updated, but for the odd float32 update
    assert moved.mean() > 0.999                           # below p's ulp (element-wise: equal to the above)


@pytest.mark.parametrize("threads", [1, 3])
def test_large_mixed_parameters_split_over_threads_match_reference(monkeypatch, threads, cpu_path):
    """CPU: above PARALLEL_MIN_ELEMENTS one step is cut into a share per thread, across parameter
    boundaries, in blocks of CPU_BLOCK_ELEMENTS with a per-thread scratch per dtype; float64 parameters
    form their own bucket and a non-contiguous one is updated on its own. All follow the reference."""
    from minillm.ops import common

    monkeypatch.setattr(common, "CPU_THREADS", threads)
    rng = np.random.default_rng(9)
    shapes_dtypes = [((200_001,), np.float32), ((300, 257), np.float32), ((70_003,), np.float64), ((5, 9), np.float32)]
    inits = [rng.standard_normal(shape) for shape, _ in shapes_dtypes]
    params = [make_param(x, "cpu", dtype) for x, (_, dtype) in zip(inits, shapes_dtypes)]
    params[3].data = np.ascontiguousarray(params[3].data.T).T               # (5, 9), not C-contiguous
    assert not params[3].data.flags.c_contiguous
    assert sum(p.size for p in params) >= common.PARALLEL_MIN_ELEMENTS
    opt = optim.AdamW(params, lr=0.02, betas=(0.85, 0.98), eps=1e-7, weight_decay=0.3)
    grads = [[rng.standard_normal(p.shape) for _ in range(3)] for p in params]
    for step in range(3):
        for p, g in zip(params, grads):
            set_grad(p, g[step])
        opt.step()
    for k, (p, (_, dtype)) in enumerate(zip(params, shapes_dtypes)):
        expected = adamw_reference(inits[k], grads[k], [0.02] * 3, (0.85, 0.98), 1e-7, 0.3)
        rtol, atol = (1e-12, 1e-14) if dtype == np.float64 else (2e-5, 1e-6)
        assert p.data.dtype == dtype
        np.testing.assert_allclose(p.numpy(), expected, rtol=rtol, atol=atol, err_msg=f"parameter {k}")
