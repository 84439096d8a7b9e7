"""Gradient accumulation = one big batch, also when micro-batches count different numbers of targets.

A step's loss is the mean over every counted target of the step (SFT: the
tokens that are not ``ignore_index``; classification: the examples), so K
micro-batches of B/K move the weights exactly as one batch of B does, however
the counted targets fall among the micro-batches. The reference is the same
Trainer run with ``grad_accum=1`` on the whole batch.
"""

import numpy as np
import pytest

from minillm import backend, optim
from minillm.finetune import classify as cls
from minillm.finetune import dpo, sft
from minillm.finetune.data import EpochBatches
from minillm.train import Trainer

from train_helpers import VOCAB, make_config, make_model


def params(model):
    return {name: backend.to_numpy(value).copy() for name, value in model.state_dict().items()}


def instruction_data(lengths, seed=0):
    """SFT examples (ids ending in end-of-text 0, prompt length): prompt 3 tokens, responses of ``lengths``."""
    rng = np.random.default_rng(seed)
    examples = []
    for n in lengths:
        ids = [int(t) for t in rng.integers(1, VOCAB, 3 + n)] + [0]
        examples.append((ids, 3))
    collate = lambda batch: sft.collate_instructions(batch, pad_id=0, mask_prompt=True)  # noqa: E731
    return EpochBatches({"train": examples}, collate, seed=seed)


def sgd_trainer(data, batch_size, grad_accum, clip):
    model = make_model()
    config = make_config(steps=2, batch_size=batch_size, grad_accum=grad_accum, clip=clip, warmup=0)
    return Trainer(model, config, data, optimizer=optim.SGD(model.parameters(), lr=0.5))


# responses of 1 and 12 tokens: the micro-batches of a step hold 2 + 13 and 4 + 9 ... counted targets
LENGTHS = [1, 12, 2, 3, 9, 1, 7, 5]


@pytest.mark.parametrize("grad_accum", [2, 4])
@pytest.mark.parametrize("clip", [None, 0.05])   # 0.05: clipping active at every step
def test_masked_micro_batches_move_the_weights_as_one_batch(grad_accum, clip):
    big = sgd_trainer(instruction_data(LENGTHS), 8, 1, clip)
    small = sgd_trainer(instruction_data(LENGTHS), 8 // grad_accum, grad_accum, clip)
    # the micro-batches really do count different numbers of targets
    probe = instruction_data(LENGTHS)
    counts = [int((probe.get_batch("train", 8 // grad_accum)[1] != sft.IGNORE_INDEX).sum())
              for _ in range(grad_accum)]
    assert len(set(counts)) > 1
    for _ in range(2):
        big_loss, big_norm = big.train_step()
        small_loss, small_norm = small.train_step()
        assert small_loss == pytest.approx(big_loss, rel=1e-6)
        assert small_norm == pytest.approx(big_norm, rel=1e-5)
    if clip is not None:
        assert big_norm > clip
    for name, value in params(big.model).items():
        np.testing.assert_allclose(params(small.model)[name], value, rtol=1e-5, atol=1e-6, err_msg=name)


def test_equal_counts_keep_the_plain_mean_of_micro_batch_losses():
    """Language modelling (every target counts): the step's loss is the mean of the K micro-batch losses."""
    data = instruction_data([4] * 8)               # every row the same length: equal counts
    trainer = sgd_trainer(data, 2, 4, None)
    seen = []
    loss_fn = trainer.loss_fn

    def recording(model, batch):
        loss = loss_fn(model, batch)
        seen.append(float(loss.data))
        return loss

    trainer.loss_fn = recording
    loss, _ = trainer.train_step()
    assert loss == pytest.approx(np.mean(seen), rel=1e-6)


def classification_task():
    rng = np.random.default_rng(1)
    examples = [([int(t) for t in rng.integers(1, VOCAB, int(rng.integers(2, 9)))], i % 2) for i in range(6)]
    data = EpochBatches({"train": examples}, lambda b: cls.collate_classification(b, 0), seed=3)
    return data, lambda: cls.GPTClassifier(make_model(), 2), cls.classification_loss


def preference_task():
    rng = np.random.default_rng(2)
    ids = lambda n: [int(t) for t in rng.integers(1, VOCAB, n)] + [0]  # noqa: E731
    examples = [(ids(3 + i), ids(5 - i % 3), 2) for i in range(6)]        # (chosen, rejected, prompt length)
    data = EpochBatches({"train": examples}, lambda b: dpo.collate_preferences(b, 0), seed=3)
    objective = dpo.DPOObjective(make_model(), beta=0.5)  # the reference: the policy's starting weights
    return data, make_model, objective


@pytest.mark.parametrize("task", [classification_task, preference_task])
def test_the_smaller_last_batch_of_an_epoch_counts_by_its_examples(task):
    """6 examples, micro-batches of 4 then the epoch's remaining 2 = one batch of all 6 (per-example mean)."""
    steps = []
    for batch_size, grad_accum in ((6, 1), (4, 2)):
        data, build, loss_fn = task()
        model = build()
        trainer = Trainer(model, make_config(steps=1, batch_size=batch_size, grad_accum=grad_accum, clip=None,
                                             warmup=0), data, loss_fn=loss_fn,
                          optimizer=optim.SGD(model.parameters(), lr=0.5))
        steps.append((trainer.train_step()[0], params(model)))
    (big_loss, big), (small_loss, small) = steps
    assert small_loss == pytest.approx(big_loss, rel=1e-6)
    for name, value in big.items():
        np.testing.assert_allclose(small[name], value, rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("grad_accum, clip", [(3, None), (3, 0.3), (6, 0.3)])
def test_language_model_micro_batches_of_a_third_or_a_sixth_equal_one_batch(grad_accum, clip):
    """Pretraining windows (every target counts): 12 windows as 3 x 4 or 6 x 2, weights 1/3 and 1/6
    (not powers of two), with and without active clipping, over 3 steps of plain SGD."""
    from train_helpers import make_dataset

    def trainer(batch_size, accumulate):
        model = make_model()
        config = make_config(steps=3, batch_size=batch_size, grad_accum=accumulate, clip=clip, warmup=0)
        return Trainer(model, config, make_dataset(), optimizer=optim.SGD(model.parameters(), lr=0.5))

    big, small = trainer(12, 1), trainer(12 // grad_accum, grad_accum)
    for _ in range(3):
        (big_loss, big_norm), (small_loss, small_norm) = big.train_step(), small.train_step()
        assert small_loss == pytest.approx(big_loss, rel=1e-6) and small_norm == pytest.approx(big_norm, rel=1e-5)
        assert clip is None or big_norm > clip
    for name, value in params(big.model).items():
        np.testing.assert_allclose(params(small.model)[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
