"""The classifier: last real token, padding-invariant, what trains, accuracy."""

import numpy as np
import pytest

import minillm as mm
from minillm.finetune.classify import GPTClassifier, accuracy, collate_classification, set_trainable
from minillm.models import GPT, GPTConfig


def _classifier(num_classes=3):
    return GPTClassifier(GPT(GPTConfig.from_preset("tiny", vocab_size=30, context_length=16)), num_classes)


def test_collate_pads_right_and_records_lengths():
    ids, lengths, labels = collate_classification([([5, 6, 7], 1), ([8], 0)], pad_id=29)
    np.testing.assert_array_equal(ids, [[5, 6, 7], [8, 29, 29]])
    np.testing.assert_array_equal(lengths, [3, 1])
    np.testing.assert_array_equal(labels, [1, 0])


def test_logits_read_the_last_real_token_so_padding_changes_nothing():
    model = _classifier().eval()
    with mm.no_grad():
        alone = model(np.array([[4, 9, 2]]), np.array([3])).numpy()
        padded = model(np.array([[4, 9, 2, 0, 0, 0]]), np.array([3])).numpy()
        hidden = model.gpt.hidden_states(np.array([[4, 9, 2]])).numpy()[0, 2]
    np.testing.assert_allclose(padded, alone, rtol=1e-5, atol=1e-6)
    W, b = model.head.weight.numpy(), model.head.bias.numpy()
    np.testing.assert_allclose(alone[0], hidden @ W.T + b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("which", ["head", "last-block", "all"])
def test_set_trainable_counts(which):
    model = _classifier(num_classes=2)
    C = model.config.d_model
    head = C * 2 + 2
    block = sum(p.size for p in model.gpt.h[1].parameters())
    norm = 2 * C
    expected = {"head": head, "last-block": head + block + norm, "all": model.num_parameters()}[which]
    assert set_trainable(model, which) == expected
    with pytest.raises(ValueError, match="trainable must be one of"):
        set_trainable(model, "some")


def test_the_trainable_counts_of_the_spam_table():
    """docs/finetuning.md's table, for runs/pydoc's shape (vocabulary 2,048, context 128, 4 layers × 128) and
    two classes: 1,071,872 in the GPT; head 258, last block 198,786, all 1,072,130, LoRA r = α = 16 131,330."""
    from minillm.finetune import FinetuneConfig  # noqa: PLC0415
    from minillm.finetune.run import build_task_model  # noqa: PLC0415
    from minillm.models import gpt_num_parameters  # noqa: PLC0415

    config = GPTConfig(vocab_size=2048, context_length=128, n_layer=4, n_head=4, d_model=128)
    assert gpt_num_parameters(config) == 1_071_872
    for options, count in ((dict(trainable="head"), 258), (dict(trainable="last-block"), 198_786),
                           (dict(trainable="all"), 1_072_130), (dict(lora_rank=16, lora_alpha=16), 131_330)):
        model = build_task_model(GPT(config), FinetuneConfig("classify", "unused.tsv", **options), 2)
        assert model.num_parameters(trainable_only=True) == count, options


def test_frozen_parameters_get_no_gradient_and_the_optimizer_never_sees_them():
    """docs/finetuning.md: frozen parameters have requires_grad False; the engine computes no gradient for them
    and the optimizer (the Trainer builds its groups with weight_decay_groups) never sees them."""
    from minillm import optim  # noqa: PLC0415
    from minillm.finetune.classify import classification_loss  # noqa: PLC0415

    model = _classifier(num_classes=2)
    set_trainable(model, "last-block")
    trainable = {id(p) for p in model.head.parameters()} | {id(p) for p in model.gpt.h[1].parameters()} \
        | {id(p) for p in model.gpt.ln_f.parameters()}
    classification_loss(model, (np.array([[4, 9, 2], [7, 1, 0]]), np.array([3, 2]), np.array([1, 0]))).backward()
    for name, param in model.named_parameters():
        assert (param.grad is not None) == (id(param) in trainable), name
    groups = optim.weight_decay_groups(model.named_parameters(), 0.1)
    assert {id(p) for group in groups for p in group["params"]} == trainable


def test_accuracy():
    assert accuracy([1, 0, 2, 2], [1, 1, 2, 0]) == 0.5
    with pytest.raises(ValueError):
        accuracy([1], [1, 2])


def test_reading_the_end_uses_the_final_position_and_a_fixed_padded_length():
    ids, lengths, _ = collate_classification([([5, 6, 7], 1), ([8], 0)], pad_id=29, length=5)
    np.testing.assert_array_equal(ids, [[5, 6, 7, 29, 29], [8, 29, 29, 29, 29]])
    np.testing.assert_array_equal(collate_classification([([1, 2, 3, 4], 0)], 0, length=2)[0], [[1, 2]])
    model = _classifier()
    end = GPTClassifier(model.gpt, 3, read="end")
    end.head = model.head
    batch = np.array([[4, 9, 2, 0, 0]])
    with mm.no_grad():
        hidden = model.gpt.hidden_states(batch).numpy()[0, -1]
        got = end(batch, np.array([3])).numpy()[0]
    np.testing.assert_allclose(got, hidden @ model.head.weight.numpy().T + model.head.bias.numpy(), rtol=1e-5,
                               atol=1e-6)
    with pytest.raises(ValueError, match="read must be one of"):
        GPTClassifier(model.gpt, 3, read="first")
