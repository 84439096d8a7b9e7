"""The SFT and DPO collates and their masks against a hand-worked example."""

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
