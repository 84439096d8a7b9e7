"""The learning rate each optimizer step really uses (every param group) is the schedule's formula at
that step: from step 0 to the last, with warmup 0, and in a run resumed halfway."""

import math

import pytest

from train_helpers import make_trainer


def formula(step, warmup, total, lr, min_lr):
    if step < warmup:
        return lr * (step + 1) / warmup
    return min_lr + (lr - min_lr) * (1 + math.cos(math.pi * (step - warmup) / (total - warmup))) / 2


def record_step_lrs(trainer):
    """[(step index, [lr of each group]), ...] as the optimizer's step() sees them."""
    seen, real_step = [], trainer.optimizer.step

    def step():
        seen.append((trainer.step, [group["lr"] for group in trainer.optimizer.param_groups]))
        real_step()

    trainer.optimizer.step = step
    return seen


@pytest.mark.parametrize("warmup", [0, 1, 3])
def test_each_step_uses_the_formula_also_after_a_resume(tmp_path, warmup):
    config = dict(steps=7, warmup=warmup, lr=1e-2, min_lr=1e-3, grad_accum=2, batch_size=2, eval_interval=0,
                  checkpoint_interval=0)
    first = make_trainer(tmp_path, **config)
    seen = record_step_lrs(first)
    first.fit(stop_at=4)                            # checkpoint at step 4, as an interrupted run leaves it
    second = make_trainer(tmp_path, **config)
    assert second.resume() == 4
    resumed = record_step_lrs(second)
    second.fit()
    seen = seen + resumed
    assert [step for step, _ in seen] == list(range(7))
    assert len(first.optimizer.param_groups) == 2   # decayed and spared groups: both follow the schedule
    for step, lrs in seen:
        assert lrs == [pytest.approx(formula(step, warmup, 7, 1e-2, 1e-3), rel=1e-12)] * 2, step
    assert seen[0][1][0] == pytest.approx(1e-2 / warmup if warmup else 1e-2, rel=1e-12)
    assert seen[-1][1][0] > 1e-3                    # the last step (6) is one step before the floor
