"""cosine_schedule: linear warmup, cosine decay, floor; apply_lr writes it into an optimizer."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import minillm as mm
from minillm import optim


def test_values_at_warmup_peak_and_end():
    warmup, total, max_lr, min_lr = 10, 110, 1e-3, 1e-4
    lr = [optim.cosine_schedule(s, warmup, total, max_lr, min_lr) for s in range(130)]
    assert lr[0] == pytest.approx(max_lr / warmup)                     # first step: 1/warmup of the peak
    assert lr[4] == pytest.approx(max_lr * 5 / warmup)                 # linear
    assert lr[warmup - 1] == pytest.approx(max_lr)                     # peak at the end of warmup
    assert lr[warmup] == pytest.approx(max_lr)                         # the cosine starts at the peak
    assert lr[warmup + 50] == pytest.approx((max_lr + min_lr) / 2)     # halfway down
    assert lr[warmup + 25] == pytest.approx(min_lr + (max_lr - min_lr) * (1 + math.cos(math.pi / 4)) / 2)
    assert lr[total - 1] == pytest.approx(min_lr, rel=1e-2)
    assert all(x == min_lr for x in lr[total:])                        # floor after the end
    assert all(a >= b for a, b in zip(lr[warmup:], lr[warmup + 1:]))   # never increases after warmup


def test_no_warmup_and_degenerate_lengths():
    assert optim.cosine_schedule(0, 0, 100, 1.0, 0.0) == 1.0
    assert optim.cosine_schedule(5, 10, 5, 1.0, 0.1) == pytest.approx(0.6)  # still warming up
    assert optim.cosine_schedule(10, 10, 10, 1.0, 0.1) == 0.1
    with pytest.raises(ValueError):
        optim.cosine_schedule(0, 10, 100, 0.1, 1.0)
    with pytest.raises(ValueError):
        optim.cosine_schedule(-1, 10, 100, 1.0, 0.0)


def test_apply_lr_sets_every_group():
    a = mm.Tensor(np.ones(2), requires_grad=True)
    b = mm.Tensor(np.ones(2), requires_grad=True)
    opt = optim.AdamW([{"params": [a], "lr": 0.5}, {"params": [b]}], lr=0.1)
    optim.apply_lr(opt, 0.01)
    assert [g["lr"] for g in opt.param_groups] == [0.01, 0.01]


def schedule_reference(step, warmup, total, max_lr, min_lr):
    """The module docstring's three cases, written out again."""
    if step < warmup:
        return max_lr * (step + 1) / warmup
    if step >= total:
        return min_lr
    return min_lr + (max_lr - min_lr) * (1 + math.cos(math.pi * (step - warmup) / (total - warmup))) / 2


@settings(max_examples=60, deadline=None)
@given(warmup=st.integers(0, 12), total=st.integers(0, 40), max_lr=st.floats(1e-6, 1.0), floor=st.floats(0.0, 1.0))
def test_every_step_equals_the_formula(warmup, total, max_lr, floor):
    """Step 0, each warmup step, the cosine, the last step and 5 steps past the end, for any lengths
    (warmup 0, warmup == total and warmup > total included: then warmup runs its course, then the floor)."""
    min_lr, end = max_lr * floor, max(warmup, total)
    lrs = [optim.cosine_schedule(s, warmup, total, max_lr, min_lr) for s in range(end + 5)]
    assert lrs == pytest.approx([schedule_reference(s, warmup, total, max_lr, min_lr) for s in range(end + 5)],
                                rel=1e-12, abs=0)
    # (min + (max - min) · 1 may round to max_lr's neighbour: rel 1e-15)
    assert lrs[0] == pytest.approx(max_lr / warmup if warmup else max_lr if total else min_lr, rel=1e-15)
    assert all(lr == min_lr for lr in lrs[end:])                             # past the end: the floor, exactly
    assert all(min_lr <= lr <= max_lr * (1 + 1e-12) for lr in lrs[warmup:])
    assert all(0 < a <= b <= max_lr * (1 + 1e-12) for a, b in zip(lrs[:warmup], lrs[1:warmup]))   # warmup climbs
    assert all(a >= b for a, b in zip(lrs[warmup:], lrs[warmup + 1:]))      # then never climbs again
    if total > warmup:
        length = total - warmup
        assert lrs[warmup] == pytest.approx(max_lr, rel=1e-15) and lrs[total - 1] >= min_lr             # the cosine starts at the peak
        # the largest drop between two steps of the cosine is (max - min) · sin(π / (2 · length))
        drops = [a - b for a, b in zip(lrs[warmup:total], lrs[warmup + 1:total + 1])]
        assert max(drops) <= (max_lr - min_lr) * math.sin(math.pi / (2 * length)) * (1 + 1e-9) + 1e-15
