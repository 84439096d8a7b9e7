"""The SFT and DPO collates and their masks against a hand-worked example; SFT responses against greedy decoding."""

import numpy as np

from minillm.finetune.dpo import collate_preferences
from minillm.finetune.sft import IGNORE_INDEX, collate_instructions, format_prompt

X = IGNORE_INDEX
EOT = 0
# prompt [1, 2] + response [3] + eot;  prompt [4] + response [5, 6, 7] + eot
EXAMPLES = [([1, 2, 3, EOT], 2), ([4, 5, 6, 7, EOT], 1)]


def test_sft_collate_pads_with_end_of_text_and_keeps_only_the_first_as_target():
    inputs, targets = collate_instructions(EXAMPLES, pad_id=EOT)
    np.testing.assert_array_equal(inputs, [[1, 2, 3, 0], [4, 5, 6, 7]])
    np.testing.assert_array_equal(targets, [[2, 3, 0, X], [5, 6, 7, 0]])
    assert inputs.dtype == targets.dtype == np.int64


def test_sft_collate_masks_the_prompt():
    _, targets = collate_instructions(EXAMPLES, pad_id=EOT, mask_prompt=True)
    # row 1: target 2 is a prompt token (masked), 3 and the first eot are the response
    # row 2: a one-token prompt has no prompt target at all
    np.testing.assert_array_equal(targets, [[X, 3, 0, X], [5, 6, 7, 0]])


def test_end_of_text_inside_the_longest_row_is_its_target_and_padding_of_three():
    inputs, targets = collate_instructions([([9, EOT], 1), ([1, 2, 3, 4, EOT], 1)], pad_id=EOT)
    np.testing.assert_array_equal(inputs, [[9, 0, 0, 0], [1, 2, 3, 4]])
    np.testing.assert_array_equal(targets, [[0, X, X, X], [2, 3, 4, 0]])


def test_dpo_collate_stacks_chosen_then_rejected_and_counts_only_responses():
    chosen, rejected = [1, 2, 3, EOT], [1, 2, 8, 9, EOT]
    inputs, targets = collate_preferences([(chosen, rejected, 2)], pad_id=EOT)
    np.testing.assert_array_equal(inputs, [[1, 2, 3, 0], [1, 2, 8, 9]])
    np.testing.assert_array_equal(targets, [[X, 3, 0, X], [X, 8, 9, 0]])


def test_alpaca_prompt():
    assert format_prompt("Add.", "1 and 2") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nAdd.\n\n### Input:\n1 and 2\n\n### Response:\n")
    assert "### Input" not in format_prompt("Say hi.")


def test_a_response_is_the_greedy_continuation_up_to_end_of_text():
    """docs/finetuning.md: SFT's responses are greedy continuations of the Alpaca prompt that stop at
    end-of-text (which is not printed). Reference: argmax of a full forward, step by step. The head's
    end-of-text row is set to a row the greedy run reaches, so the stop really happens."""
    import minillm as mm  # noqa: PLC0415
    from minillm.finetune.sft import respond  # noqa: PLC0415
    from minillm.models import GPT, GPTConfig  # noqa: PLC0415
    from minillm.tokenizer import BPETokenizer  # noqa: PLC0415

    tok = BPETokenizer.bytes(special_tokens=["<|endoftext|>"])
    mm.manual_seed(0)
    model = GPT(GPTConfig.from_preset("tiny", vocab_size=257, context_length=256, n_layer=1, tie_embeddings=False))
    rng = np.random.default_rng(0)
    for param in model.parameters():
        param.data[...] = rng.standard_normal(param.shape).astype(np.float32) * 0.3
    prompt = tok.encode(format_prompt("Say hi."), allowed_special="none")

    def greedy(steps):
        ids, new = list(prompt), []
        with mm.no_grad():
            for _ in range(steps):
                token = int(np.argmax(model(np.array([ids])).numpy()[0, -1]))
                if token == 256:
                    break
                new.append(token)
                ids.append(token)
        return new

    free = greedy(8)
    stop = next(i for i, token in enumerate(free) if token not in free[:i] and i >= 2)   # a first occurrence
    model.lm_head.weight.data[256] = model.lm_head.weight.data[free[stop]] + 1e-3
    expected = greedy(8)
    assert expected == free[:stop]
    assert respond(model, tok, "Say hi.", max_new_tokens=8) == tok.decode(expected).strip()
