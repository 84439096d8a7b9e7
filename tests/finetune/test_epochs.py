"""--epochs E with --grad-accum K: each training example is seen E times, and the evaluations fall at
the ends of the epochs, also when an epoch's micro-batches do not divide into steps of K."""

import json

import pytest

from minillm.finetune import FinetuneConfig, finetune, load_language_model
from minillm.finetune.data import EpochBatches
from minillm.train import read_metrics

from finetune_helpers import make_base_run, write_spam_like


@pytest.mark.parametrize("grad_accum", [1, 2, 4])
def test_each_example_is_seen_once_per_epoch_with_gradient_accumulation(tmp_path, monkeypatch, grad_accum):
    drawn = []                                       # (epoch, examples) of every training micro-batch
    real_get_batch = EpochBatches.get_batch

    def counting(self, split, batch_size, rng=None):
        batch = real_get_batch(self, split, batch_size, rng)
        if split == "train":
            drawn.append((self.epoch, len(batch[0])))
        return batch

    monkeypatch.setattr(EpochBatches, "get_batch", counting)
    base = make_base_run(tmp_path / "base")
    gpt, tok = load_language_model(base)
    data = write_spam_like(tmp_path / "spam.tsv", n=30)        # 21 training texts: 6 micro-batches of 4 (last 1)
    config = FinetuneConfig("classify", str(data), epochs=3, trainable="head")
    finetune(gpt, tok, config, dict(progress=False, batch_size=4, grad_accum=grad_accum), run_dir=tmp_path / "run",
             say=lambda message: None)
    info = json.loads((tmp_path / "run" / "finetune.json").read_text())
    assert info["split_sizes"]["train"] == 21
    per_epoch = {epoch: sum(n for e, n in drawn if e == epoch) for epoch, _ in drawn}
    assert per_epoch == {0: 21, 1: 21, 2: 21}                  # three passes, nothing of a fourth
    steps_per_epoch = info["steps_per_epoch"]
    assert steps_per_epoch == -(-6 // grad_accum)
    assert [r["step"] for r in read_metrics(tmp_path / "run", "eval")] == [0, steps_per_epoch, 2 * steps_per_epoch,
                                                                            3 * steps_per_epoch]
