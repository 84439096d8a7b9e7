"""Module and Parameter: registration, tree walks, state_dict round trips and errors, modes, devices, repr."""

import numpy as np
import pytest

import minillm as mm
from minillm import nn
from minillm.backend import to_numpy


class Tiny(nn.Module):
    """Two layers and a loose parameter, to look at names and order."""

    def __init__(self, bias=True):
        super().__init__()
        self.fc = nn.Linear(4, 3, bias=bias)
        self.scale = nn.Parameter(np.ones(3, dtype=np.float32))
        self.out = nn.Sequential(nn.GELU(), nn.Linear(3, 2))
        self.note = "not a parameter"

    def forward(self, x):
        return self.out(self.fc(x) * self.scale)


# ------------------------------------------------------------------ Parameter


def test_parameter_is_a_float_leaf_that_requires_grad():
    p = nn.Parameter(np.zeros((2, 3), dtype=np.float32))
    assert isinstance(p, mm.Tensor) and p.requires_grad and p.is_leaf
    assert p.dtype == np.float32 and p.shape == (2, 3)
    assert repr(p).startswith("Parameter containing:\n")


@pytest.mark.parametrize("data", [np.arange(3), [1, 2, 3], np.array([True, False])])
def test_parameter_rejects_non_float(data):
    with pytest.raises(TypeError, match="floating point"):
        nn.Parameter(data)


def test_parameter_from_python_floats_gets_default_dtype():
    assert nn.Parameter([1.0, 2.0]).dtype == np.float32


# ------------------------------------------------------------------ registration and walks


def test_named_parameters_are_dotted_and_in_insertion_order():
    model = Tiny()
    names = [name for name, _ in model.named_parameters()]
    # as in PyTorch: a module's own parameters, then each submodule's, depth first
    assert names == ["scale", "fc.weight", "fc.bias", "out.1.weight", "out.1.bias"]
    assert [name for name, _ in model.named_modules()] == ["", "fc", "out", "out.0", "out.1"]
    assert [type(m).__name__ for m in model.children()] == ["Linear", "Sequential"]
    assert model.note == "not a parameter"
    assert "note" not in dict(model.named_parameters())


def test_bias_false_registers_no_bias():
    model = Tiny(bias=False)
    assert model.fc.bias is None
    assert "fc.bias" not in model.state_dict()


def test_reassignment_replaces_and_plain_values_unregister():
    model = Tiny()
    new_fc = nn.Linear(4, 3)
    model.fc = new_fc
    assert model.fc is new_fc and dict(model.named_parameters())["fc.weight"] is new_fc.weight
    assert [n for n, _ in model.named_children()] == ["fc", "out"]      # kept its place
    model.scale = None                      # a plain value replaces the registered parameter
    assert model.scale is None and "scale" not in model.state_dict()
    del model.fc
    with pytest.raises(AttributeError, match="has no attribute 'fc'"):
        model.fc


def test_deleting_or_retyping_a_name_keeps_attribute_and_registries_in_step():
    # registered values are also plain attributes (fast lookup): both must change together
    model = Tiny()
    del model.scale
    assert not hasattr(model, "scale") and "scale" not in dict(model.named_parameters())
    model.scale = nn.Linear(3, 3)                  # a parameter's name reused for a submodule
    assert "scale" not in model._parameters and model._modules["scale"] is model.scale
    assert [n for n, _ in model.named_children()] == ["fc", "out", "scale"]
    model.scale = nn.Parameter(np.ones(3, dtype=np.float32))   # and back to a parameter
    assert "scale" not in model._modules and model._parameters["scale"] is model.scale
    assert list(model.state_dict())[0] == "scale"  # a module's own parameters come first
    with pytest.raises(AttributeError):
        del model.never_assigned


def test_shared_parameter_is_listed_once():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    model[1].weight = model[0].weight
    assert [n for n, _ in model.named_parameters()] == ["0.weight", "0.bias", "1.bias"]
    assert model.num_parameters() == 9 + 3 + 3


def test_assigning_before_super_init_is_a_clear_error():
    class Broken(nn.Module):
        def __init__(self):
            self.fc = nn.Linear(2, 2)

    with pytest.raises(AttributeError, match="super\\(\\).__init__"):
        Broken()


def test_num_parameters_counts_every_scalar():
    assert Tiny().num_parameters() == 4 * 3 + 3 + 3 + 3 * 2 + 2
    assert Tiny(bias=False).num_parameters() == 4 * 3 + 3 + 3 * 2 + 2


def test_apply_visits_children_first():
    seen = []
    Tiny().apply(lambda m: seen.append(type(m).__name__))
    assert seen == ["Linear", "GELU", "Linear", "Sequential", "Tiny"]


# ------------------------------------------------------------------ modes, grads, devices, dtypes


def test_train_eval_reach_every_module():
    model = Tiny()
    assert all(m.training for m in model.modules())
    assert model.eval() is model
    assert not any(m.training for m in model.modules())
    model.train()
    assert all(m.training for m in model.modules())


def test_zero_grad_clears_every_gradient():
    model = Tiny()
    model(mm.Tensor(np.ones((2, 4), dtype=np.float32))).sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    model.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_to_dtype_keeps_parameter_objects_and_casts_grads():
    model = Tiny()
    model(mm.Tensor(np.ones((2, 4), dtype=np.float32))).sum().backward()
    before = list(model.parameters())
    values = [to_numpy(p.data).copy() for p in before]
    assert model.to(dtype=np.float64) is model
    after = list(model.parameters())
    assert all(a is b for a, b in zip(before, after))            # optimizers keep working
    for p, v in zip(after, values):
        assert p.dtype == np.float64 and p.grad.dtype == np.float64
        np.testing.assert_array_equal(to_numpy(p.data), v)
    model.to(np.float32)                                           # a dtype given positionally
    assert all(p.dtype == np.float32 for p in model.parameters())
    with pytest.raises(TypeError, match="floating point"):
        model.to(dtype=np.int32)


def test_to_device_moves_parameters(device):
    model = Tiny()
    values = {k: to_numpy(v).copy() for k, v in model.state_dict().items()}
    model.to(device)
    for name, p in model.named_parameters():
        assert p.device.split(":")[0] == device.split(":")[0]
        np.testing.assert_array_equal(to_numpy(p.data), values[name])
    x = mm.Tensor(np.ones((2, 4), dtype=np.float32), device=device)
    assert model(x).device == model.fc.weight.device


# ------------------------------------------------------------------ state_dict


def test_state_dict_holds_the_live_arrays():
    model = Tiny()
    sd = model.state_dict()
    assert list(sd) == [n for n, _ in model.named_parameters()]
    assert sd["fc.weight"] is model.fc.weight.data
    sd["fc.weight"][0, 0] = 42.0
    assert model.fc.weight.data[0, 0] == 42.0


def test_round_trip_reproduces_outputs(device):
    mm.manual_seed(1)
    source = Tiny().to(device)
    mm.manual_seed(2)
    target = Tiny().to(device)
    x = mm.Tensor(np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32), device=device)
    assert not np.allclose(source(x).numpy(), target(x).numpy())
    arrays_before = [p.data for p in target.parameters()]
    snapshot = {k: to_numpy(v).copy() for k, v in source.state_dict().items()}   # host copies
    result = target.load_state_dict(snapshot)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert all(p.data is a for p, a in zip(target.parameters(), arrays_before))    # copied in place
    np.testing.assert_array_equal(source(x).numpy(), target(x).numpy())


def test_load_casts_to_parameter_dtype_and_accepts_tensors():
    model = Tiny()
    sd = {k: mm.Tensor(np.full(to_numpy(v).shape, 0.5, dtype=np.float64)) for k, v in model.state_dict().items()}
    model.load_state_dict(sd)
    for p in model.parameters():
        assert p.dtype == np.float32
        np.testing.assert_array_equal(to_numpy(p.data), 0.5)


def test_load_errors_name_missing_unexpected_and_mismatched_keys():
    model = Tiny()
    sd = {k: to_numpy(v).copy() for k, v in model.state_dict().items()}
    del sd["scale"]
    sd["lm_head.weight"] = np.zeros((2, 2), dtype=np.float32)
    sd["fc.weight"] = np.zeros((3, 5), dtype=np.float32)
    original = to_numpy(model.fc.bias.data).copy()
    sd["fc.bias"] = original + 1
    with pytest.raises(RuntimeError) as info:
        model.load_state_dict(sd)
    message = str(info.value)
    assert "missing keys: scale" in message
    assert "unexpected keys: lm_head.weight" in message
    assert "fc.weight: checkpoint has shape (3, 5), model has (3, 4)" in message
    np.testing.assert_array_equal(to_numpy(model.fc.bias.data), original)   # nothing was copied


def test_non_strict_load_reports_and_still_checks_shapes():
    model = Tiny()
    sd = {"fc.bias": np.full(3, 7.0, dtype=np.float32), "extra": np.zeros(1)}
    result = model.load_state_dict(sd, strict=False)
    assert result.unexpected_keys == ["extra"]
    assert "fc.weight" in result.missing_keys and "fc.bias" not in result.missing_keys
    np.testing.assert_array_equal(to_numpy(model.fc.bias.data), 7.0)
    with pytest.raises(RuntimeError, match="size mismatch for fc.bias: checkpoint has shape \\(4,\\), model has \\(3,\\)"):
        model.load_state_dict({"fc.bias": np.zeros(4)}, strict=False)


# ------------------------------------------------------------------ repr


def test_repr_is_nested_like_pytorch():
    assert repr(Tiny()) == (
        "Tiny(\n"
        "  (fc): Linear(in_features=4, out_features=3, bias=True)\n"
        "  (out): Sequential(\n"
        "    (0): GELU(approximate='tanh')\n"
        "    (1): Linear(in_features=3, out_features=2, bias=True)\n"
        "  )\n"
        ")"
    )


def test_repr_folds_identical_repeated_children():
    layers = nn.ModuleList([nn.Linear(2, 2) for _ in range(4)] + [nn.Linear(2, 3)])
    assert repr(layers) == (
        "ModuleList(\n"
        "  (0-3): 4 x Linear(in_features=2, out_features=2, bias=True)\n"
        "  (4): Linear(in_features=2, out_features=3, bias=True)\n"
        ")"
    )
