"""Fine-tuning evaluations against NumPy by hand: SFT's loss is the mean over every counted token of
all the batches (not a mean of batch means), DPO's over every pair; evaluating keeps the model's mode."""


import numpy as np
import pytest

import minillm as mm
from minillm.finetune import dpo, sft
from minillm.models import GPT, GPTConfig
from minillm.train import TrainConfig, Trainer


def tiny_gpt(seed=0):
    mm.manual_seed(seed)
    return GPT(GPTConfig.from_preset("tiny", vocab_size=24, context_length=16, n_layer=1, d_model=16, n_head=2))


def log_probs(model, inputs):
    with mm.no_grad():
        logits = model.eval()(inputs).numpy().astype(np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))        # (B, T, V)


def batches_of(examples, sizes, collate):
    out, start = [], 0
    for size in sizes:
        out.append(collate(examples[start:start + size]))
        start += size
    return out


def test_sft_validation_loss_is_the_mean_over_every_counted_token():
    rng = np.random.default_rng(0)
    examples = [([int(t) for t in rng.integers(1, 24, 4 + n)] + [0], 4) for n in (1, 9, 2, 6, 3)]
    batches = batches_of(examples, (2, 2, 1), lambda b: sft.collate_instructions(b, 0, mask_prompt=True))
    model = tiny_gpt()
    terms = []
    for inputs, targets in batches:
        lp = log_probs(model, inputs)
        rows, cols = np.nonzero(targets != sft.IGNORE_INDEX)
        terms.extend(-lp[rows, cols, targets[rows, cols]])
    assert len(terms) == sum(len(ids) - 4 for ids, _ in examples)          # response + end-of-text of each
    metrics = sft.language_model_metrics(model, batches)
    assert metrics["val_loss"] == pytest.approx(np.mean(terms), rel=1e-5)
    assert metrics["val_perplexity"] == pytest.approx(np.exp(np.mean(terms)), rel=1e-5)


def test_dpo_validation_loss_is_the_mean_over_every_pair():
    rng = np.random.default_rng(1)
    ids = lambda n: [int(t) for t in rng.integers(1, 24, n)] + [0]  # noqa: E731
    examples = [(ids(3 + i % 4), ids(6 - i % 3), 2) for i in range(5)]
    batches = batches_of(examples, (3, 2), lambda b: dpo.collate_preferences(b, 0))
    policy, reference = tiny_gpt(0), tiny_gpt(1)
    objective = dpo.DPOObjective(reference, beta=0.4)
    sums = {}
    for name, model in (("policy", policy), ("reference", reference)):
        values = []
        for inputs, targets in batches:
            lp = log_probs(model, inputs)
            counted = targets != sft.IGNORE_INDEX
            picked = np.take_along_axis(lp, np.where(counted, targets, 0)[..., None], -1)[..., 0]
            per_row = (picked * counted).sum(-1)
            half = len(per_row) // 2
            values.append((per_row[:half], per_row[half:]))
        sums[name] = [np.concatenate(parts) for parts in zip(*values)]   # chosen (5,), rejected (5,)
    (pc, pr), (rc, rr) = sums["policy"], sums["reference"]
    z = 0.4 * ((pc - pr) - (rc - rr))
    metrics = objective.metrics(policy, batches)
    assert metrics["val_loss"] == pytest.approx(np.mean(np.logaddexp(0.0, -z)), rel=1e-5)
    assert metrics["margin"] == pytest.approx(np.mean(0.4 * (pc - rc) - 0.4 * (pr - rr)), rel=1e-5, abs=1e-7)
    assert metrics["reward_acc"] == pytest.approx(np.mean((pc - rc > pr - rr) + 0.5 * (pc - rc == pr - rr)))


@pytest.mark.parametrize("training", [True, False])
def test_an_evaluation_leaves_the_model_in_the_mode_it_found(training):
    class Data:
        def get_batch(self, split, batch_size, rng=None):
            return np.zeros((1, 4), np.int64), np.ones((1, 4), np.int64)

        def state_dict(self):
            return {}

    model = tiny_gpt()
    seen = []
    trainer = Trainer(model, TrainConfig(steps=1, progress=False), Data(),
                      evaluate_fn=lambda m: seen.append(m.training) or {"val_loss": 1.0})
    model.train(training)
    assert trainer.log_evaluation() == {"val_loss": 1.0}
    assert seen == [False] and model.training is training


def test_evaluating_every_step_changes_no_training_loss_with_lora_dropout(tmp_path):
    """LoRA dropout draws from the model's random stream at every training step; an evaluation that
    drew too (dropout left on) would shift every later mask and change the losses."""
    from finetune_helpers import make_base_run, write_instructions
    from minillm.finetune import FinetuneConfig, finetune, load_language_model
    from minillm.train import read_metrics

    base = make_base_run(tmp_path / "base", context_length=192)
    data = write_instructions(tmp_path / "i.json", n=20)
    losses = {}
    for interval in (1, 100):
        gpt, tok = load_language_model(base)
        mm.manual_seed(5)               # as `minillm finetune` seeds (the Trainer does not): adapters, masks
        config = FinetuneConfig("sft", str(data), epochs=2, lora_rank=2, lora_dropout=0.5, max_new_tokens=1)
        finetune(gpt, tok, config, dict(progress=False, batch_size=4, lr=1e-2, eval_interval=interval),
                 run_dir=tmp_path / str(interval), say=lambda message: None)
        losses[interval] = [r["loss"] for r in read_metrics(tmp_path / str(interval), "train")]
        evals = read_metrics(tmp_path / str(interval), "eval")
        assert len(evals) == (len(losses[interval]) + 1 if interval == 1 else 2)   # step 0 and each step / the end
    assert losses[1] == losses[100] and len(losses[1]) == 10
    gpt, tok = load_language_model(base)
    mm.manual_seed(5)                   # the masks are really drawn: without dropout the losses differ
    config = FinetuneConfig("sft", str(data), epochs=2, lora_rank=2, lora_dropout=0.0, max_new_tokens=1)
    finetune(gpt, tok, config, dict(progress=False, batch_size=4, lr=1e-2), run_dir=tmp_path / "off",
             say=lambda message: None)
    assert [r["loss"] for r in read_metrics(tmp_path / "off", "train")] != losses[1]
