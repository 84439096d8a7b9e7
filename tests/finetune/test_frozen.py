"""What a fine-tuning run must leave alone, checked bit for bit after whole runs with weight decay on:
the frozen layers of a classifier, the base weights under LoRA, and DPO's reference model."""

import numpy as np
import pytest

from minillm import backend
from minillm.finetune import FinetuneConfig, dpo, finetune, load_language_model

from finetune_helpers import make_base_run, write_instructions, write_spam_like

TRAIN = dict(progress=False, batch_size=8, lr=5e-3, weight_decay=0.5, warmup=0)   # decay: frozen must not shrink


def _silent(message):
    pass


def arrays(model, prefix=""):
    return {prefix + name: backend.to_numpy(p.data).copy() for name, p in model.named_parameters()}


@pytest.mark.parametrize("trainable, expect_trained", [
    ("head", set()),
    ("last-block", {"gpt.h.1.", "gpt.ln_f."}),
])
def test_frozen_classifier_layers_are_bitwise_unchanged_after_a_run(tmp_path, trainable, expect_trained):
    base = make_base_run(tmp_path / "base")
    gpt, tok = load_language_model(base)
    before = {"gpt." + name: value for name, value in arrays(gpt).items()}
    data = write_spam_like(tmp_path / "spam.tsv", n=30)
    result = finetune(gpt, tok, FinetuneConfig("classify", str(data), epochs=2, trainable=trainable),
                      dict(TRAIN), say=_silent)
    after = arrays(result.model)
    trained = {n for n in before if n.startswith(tuple(expect_trained))}
    for name in set(before) - trained:                                      # frozen: bit for bit
        np.testing.assert_array_equal(after[name], before[name], err_msg=name)
    assert "gpt.wte.weight" not in trained and "gpt.h.0.attn.c_attn.weight" not in trained
    if trainable == "last-block":                                           # ... while the block did train
        assert all(not np.array_equal(after[n], before[n]) for n in trained if n.endswith("weight"))


def test_lora_sft_changes_only_the_adapters(tmp_path):
    base = make_base_run(tmp_path / "base", context_length=192)   # the Alpaca preamble alone is ~150 bytes
    gpt, tok = load_language_model(base)
    before = arrays(gpt)
    data = write_instructions(tmp_path / "i.json", n=20)
    result = finetune(gpt, tok, FinetuneConfig("sft", str(data), epochs=1, lora_rank=2, lora_alpha=4,
                                               max_new_tokens=2), dict(TRAIN), say=_silent)
    after = arrays(result.model)
    adapters = {n for n in after if n.endswith(("lora_A", "lora_B"))}
    assert len(adapters) == 2 * 4 * 2                                   # A and B of 4 Linears in 2 blocks
    assert set(after) - adapters == set(before)
    for name, value in before.items():
        np.testing.assert_array_equal(after[name], value, err_msg=name)
    assert all(after[n].any() for n in adapters if n.endswith("lora_B"))   # B left zero: it trained


def test_dpo_reference_model_is_untouched_by_the_run(tmp_path, monkeypatch):
    base = make_base_run(tmp_path / "base", context_length=192)
    gpt, tok = load_language_model(base)
    before = arrays(gpt)
    made = []

    class Recording(dpo.DPOObjective):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(dpo, "DPOObjective", Recording)
    data = write_instructions(tmp_path / "p.json", n=20, preference=True)
    result = finetune(gpt, tok, FinetuneConfig("dpo", str(data), epochs=1, beta=0.5), dict(TRAIN), say=_silent)
    (objective,) = made
    assert objective.reference is not result.model
    reference = arrays(objective.reference)
    for name, value in before.items():
        np.testing.assert_array_equal(reference[name], value, err_msg=name)
    policy = arrays(result.model)
    assert any(not np.array_equal(policy[n], before[n]) for n in before)   # while the policy did move
    assert not objective.reference.training and not any(p.requires_grad for p in objective.reference.parameters())
