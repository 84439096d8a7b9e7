"""Instruction fine-tuning (SFT): next-token loss on prompt + response, in the Alpaca format.

A record ``{instruction, input, output}`` becomes one text:

    Below is an instruction that describes a task. Write a response that appropriately completes the request.

    ### Instruction:
    {instruction}

    ### Input:                      (only when input is not empty)
    {input}

    ### Response:
    {output}<|endoftext|>

and the model is trained exactly as in pretraining, to predict each next
token, except for which targets count. The collate pads a batch with
end-of-text to its longest row; in the targets (inputs shifted by one) the
FIRST end-of-text stays, so the model learns to stop, and every later
(padding) one becomes ``ignore_index``, so padding adds nothing to the loss.
With ``mask_prompt`` the targets inside the prompt are ignored as well and
only the response is learned.

Worked example (end-of-text = 0, prompt [1, 2], response [3]; prompt [4],
response [5, 6, 7]):

    rows + eot           [1 2 3 0]          [4 5 6 7 0]
    padded to 5          [1 2 3 0 0]        [4 5 6 7 0]
    inputs  (= [:-1])    [1 2 3 0]          [4 5 6 7]
    targets (= [1:])     [2 3 0 -100]       [5 6 7 0]
    with mask_prompt     [-100 3 0 -100]    [5 6 7 0]     (target t is the prompt's while t+1 < len(prompt))
"""

from __future__ import annotations

import numpy as np

from .data import DataError, require_fields

IGNORE_INDEX = -100
PREAMBLE = ("Below is an instruction that describes a task. "
            "Write a response that appropriately completes the request.")
RESPONSE_HEADER = "\n\n### Response:\n"


def format_prompt(instruction: str, input_text: str = "") -> str:
    """The Alpaca prompt up to and including "### Response:\\n" (what the model continues)."""
    text = f"{PREAMBLE}\n\n### Instruction:\n{instruction}"
    if input_text:
        text += f"\n\n### Input:\n{input_text}"
    return text + RESPONSE_HEADER


def extract_response(generated: str) -> str:
    """The response part of a generated text: what follows the last "### Response:" header, stripped."""
    marker = RESPONSE_HEADER.strip("\n")
    return generated.rsplit(marker, 1)[-1].strip()


def encode_instruction(tokenizer, record, response_field: str = "output") -> tuple[list[int], list[int]]:
    """(prompt ids, response ids) of a record; the two are encoded apart so the boundary is exact."""
    prompt = tokenizer.encode(format_prompt(record["instruction"], record.get("input") or ""),
                              allowed_special="none")
    response = tokenizer.encode(record[response_field], allowed_special="none")
    return prompt, response


def end_of_text_id(tokenizer) -> int:
    from ..data.dataset import END_OF_TEXT  # noqa: PLC0415

    if END_OF_TEXT not in tokenizer.special_tokens:
        raise DataError(f"instruction tuning needs a tokenizer with {END_OF_TEXT} (to end responses and pad); "
                        f"this one has none")
    return tokenizer.special_tokens[END_OF_TEXT]


def instruction_examples(tokenizer, records, context_length: int, truncate: bool) -> list[tuple[list[int], int]]:
    """[(prompt + response + end-of-text ids, prompt length) or None, ...], one per record, at most context_length + 1 ids.

    A record that does not fit is an error, unless ``truncate`` cuts the tail
    of its response; a prompt that leaves no room for a response is an error
    too, or with ``truncate`` the record is left out: its entry is None.
    """
    require_fields(records, ("instruction", "output"), hint="instruction data needs 'instruction', "
                   "'output' and optionally 'input' per record", optional=("input",))
    eot = end_of_text_id(tokenizer)
    examples = []
    for record in records:
        prompt, response = encode_instruction(tokenizer, record)
        ids = fit_to_context(prompt, response, eot, context_length, truncate, record.get("_where", "a record"))
        examples.append(None if ids is None else (ids, len(prompt)))
    return examples


def fit_to_context(prompt: list[int], response: list[int], eot: int, context_length: int, truncate: bool,
                   where: str, what: str = "response") -> list[int] | None:
    """prompt + response + end-of-text as one row of at most context_length + 1 ids (T inputs, T shifted targets).

    Longer: a DataError naming ``where``, or with ``truncate`` the response's
    tail is cut. A prompt that fills the context alone leaves no room for the
    response: a DataError, or with ``truncate`` None (the record is left out).
    ``what`` names the response in the messages (DPO: "chosen response").
    """
    ids = prompt + response + [eot]
    if len(prompt) >= context_length:
        if truncate:
            return None
        raise DataError(f"{where}: the prompt alone is {len(prompt)} tokens; the model's context is "
                        f"{context_length}, leaving no room for the {what} (--truncate leaves such "
                        f"records out)")
    if len(ids) - 1 > context_length:
        if not truncate:
            raise DataError(f"{where} is {len(ids) - 1} tokens (prompt {len(prompt)} + {what} "
                            f"{len(response)}), longer than the model's context of {context_length}; pass "
                            f"--truncate to cut the end of such responses")
        ids = ids[:context_length + 1]
    return ids


def collate_instructions(examples, pad_id: int, mask_prompt: bool = False, ignore_index: int = IGNORE_INDEX):
    """[(ids ending in end-of-text, prompt length), ...] -> (inputs, targets), int64 (B, T), T = longest − 1.

    See the module docstring for the worked example.
    """
    longest = max(len(ids) for ids, _ in examples)
    inputs = np.full((len(examples), longest - 1), pad_id, dtype=np.int64)
    targets = np.full((len(examples), longest - 1), ignore_index, dtype=np.int64)
    for row, (ids, prompt_length) in enumerate(examples):
        padded = np.full(longest, pad_id, dtype=np.int64)
        padded[:len(ids)] = ids
        inputs[row] = padded[:-1]
        # targets: the shifted row; its own tokens (through its end-of-text) count, the padding does not
        targets[row, :len(ids) - 1] = padded[1:len(ids)]
        if mask_prompt:
            targets[row, :prompt_length - 1] = ignore_index       # targets that are prompt tokens
    return inputs, targets


def language_model_metrics(model, batches) -> dict[str, float]:
    """Mean cross-entropy per counted target (and its exp, the perplexity) over ``batches`` of (inputs, targets)."""
    from .. import backend  # noqa: PLC0415

    device = model.wte.weight.device
    total, count = 0.0, 0
    for inputs, targets in batches:
        counted = int((targets != IGNORE_INDEX).sum())
        if counted == 0:
            continue
        _, loss = model(backend.to_device(inputs, device), backend.to_device(targets, device))
        total += float(loss.data) * counted
        count += counted
    val_loss = total / max(count, 1)
    return {"val_loss": val_loss, "val_perplexity": float(np.exp(min(val_loss, 700.0)))}


def respond(model, tokenizer, instruction: str, input_text: str = "", max_new_tokens: int = 128,
            temperature: float = 0.0, top_k: int | None = None, seed: int | None = None, stream=None) -> str:
    """The model's response to one instruction: greedy by default, stops at end-of-text or the context."""
    eot = end_of_text_id(tokenizer)
    prompt = tokenizer.encode(format_prompt(instruction, input_text), allowed_special="none")
    room = model.config.context_length - len(prompt)
    if room < 1:
        raise ValueError(f"the prompt is {len(prompt)} tokens; the model's context is {model.config.context_length}")
    from ..generate import generate  # noqa: PLC0415

    out = generate(model, np.asarray([prompt]), min(max_new_tokens, room), temperature=temperature,
                   top_k=top_k, eos_id=eot, seed=seed, stream=stream)
    new = [int(t) for t in out[0, len(prompt):] if int(t) != eot]
    return tokenizer.decode(new).strip()


def respond_to_records(model, tokenizer, records, max_new_tokens: int = 128, progress: bool = False):
    """Each record with a "model_response" added (greedy), as new dicts without internal keys."""
    from tqdm import tqdm  # noqa: PLC0415

    answered = []
    for record in tqdm(records, desc="responses", disable=not progress, dynamic_ncols=True):
        clean = {k: v for k, v in record.items() if not k.startswith("_")}
        clean["model_response"] = respond(model, tokenizer, record["instruction"], record.get("input") or "",
                                          max_new_tokens=max_new_tokens)
        answered.append(clean)
    return answered
