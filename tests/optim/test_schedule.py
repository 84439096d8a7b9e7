"""cosine_schedule: linear warmup, cosine decay, floor; apply_lr writes it into an optimizer."""

import math

import numpy as np
import pytest

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
