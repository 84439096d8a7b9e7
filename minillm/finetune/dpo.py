"""Direct Preference Optimization (Rafailov et al., 2023): prefer the chosen response to the rejected one.

For a prompt x with a chosen response y_c and a rejected one y_r, let
π(y|x) be the policy (the model being trained) and π_ref a frozen copy of
where it started. With the log-probabilities of the RESPONSE tokens only,

    π_c = log π(y_c|x),  π_r = log π(y_r|x),  ref_c = log π_ref(y_c|x),  ref_r = log π_ref(y_r|x)

(each the sum over the response's tokens of log softmax(logits)[next token]),
the loss of one pair is

    z = β ((π_c − π_r) − (ref_c − ref_r))
    L = −log σ(z)

It pushes the policy to raise the chosen response's probability relative to
the rejected one's, MEASURED AGAINST the reference: the implicit reward of a
response is r(y) = β (log π(y|x) − log π_ref(y|x)), and L is the logistic loss
of "the chosen reward beats the rejected reward". β sets how far the policy
may move from the reference (small β: far).

Gradient. dL/dz = −σ(−z) (since d/dz log σ(z) = σ(−z)); z depends on the
policy only through π_c − π_r, so

    ∇θ L = −β σ(−z) (∇θ log π(y_c|x) − ∇θ log π(y_r|x))

a step up the chosen log-likelihood and down the rejected one, weighted by
σ(−z): large while the policy still ranks the pair wrongly, vanishing once it
ranks it right by a margin. The engine derives this by itself: L is built
from the fused cross-entropy (for the log-probabilities) and elementwise ops.

Metrics (per evaluation, on held-out pairs): the mean chosen reward
β(π_c − ref_c), the mean rejected reward β(π_r − ref_r), their margin
(chosen − rejected), and the reward accuracy: the fraction of pairs whose
chosen reward is higher (a tie counts one half, so the untrained policy,
identical to the reference, scores 0.5).
"""

from __future__ import annotations

import numpy as np

from .. import backend
from .. import functional as F
from ..tensor import Tensor, no_grad
from .data import require_fields
from .sft import IGNORE_INDEX, collate_instructions, encode_instruction, end_of_text_id, fit_to_context


def log_sigmoid(z: Tensor) -> Tensor:
    """log σ(z) = min(z, 0) − log(1 + exp(−|z|)), stable for any z (no exp of a large positive number)."""
    return F.minimum(z, 0.0) - F.log(F.exp(-F.abs(z)) + 1.0)


def sequence_log_probs(model, inputs, targets) -> Tensor:
    """(B,) sum over each row of log p(target | prefix), counting only targets != ignore_index.

    ``cross_entropy(..., reduction="none")`` gives −log p per position and 0 at ignored ones.
    """
    logits = model(inputs)                                            # (B, T, V)
    return -F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="none").sum(axis=1)


def dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta: float):
    """(mean loss Tensor, chosen rewards (B,), rejected rewards (B,)) from the four (B,) log-probabilities.

    The rewards are arrays (no graph): β (policy − reference) for each response.
    """
    reference_chosen = _array(reference_chosen)
    reference_rejected = _array(reference_rejected)
    logits = (policy_chosen - policy_rejected - (reference_chosen - reference_rejected)) * beta   # z, (B,)
    loss = -log_sigmoid(logits).mean()
    chosen_rewards = beta * (_array(policy_chosen) - reference_chosen)
    rejected_rewards = beta * (_array(policy_rejected) - reference_rejected)
    return loss, chosen_rewards, rejected_rewards


def _array(value):
    return value.data if isinstance(value, Tensor) else value


# ================================================================ data


def preference_examples(tokenizer, records, context_length: int, truncate: bool):
    """[(chosen ids, rejected ids, prompt length) or None, ...], one per record: prompt + response + end-of-text.

    Too long: an error, or with ``truncate`` the response's tail is cut (a
    record whose prompt alone fills the context is left out: its entry is None).
    """
    require_fields(records, ("instruction", "chosen", "rejected"),
                   hint="preference data needs 'instruction', 'chosen', 'rejected' and optionally 'input'",
                   optional=("input",))
    eot = end_of_text_id(tokenizer)
    examples = []
    for record in records:
        where = record.get("_where", "a record")
        pair = []
        for field in ("chosen", "rejected"):
            prompt, response = encode_instruction(tokenizer, record, response_field=field)
            ids = fit_to_context(prompt, response, eot, context_length, truncate, where, f"{field} response")
            if ids is None:
                break                                      # left out: no room for a response
            pair.append(ids)
        examples.append((pair[0], pair[1], len(prompt)) if len(pair) == 2 else None)
    return examples


def collate_preferences(examples, pad_id: int):
    """[(chosen, rejected, prompt length)] -> (inputs (2B, T), targets (2B, T)): the B chosen rows, then the B rejected.

    Targets are the response tokens (through the first end-of-text) only: the
    prompt and the padding are ``ignore_index``. One forward pass serves both halves.
    """
    rows = [(chosen, p) for chosen, _, p in examples] + [(rejected, p) for _, rejected, p in examples]
    return collate_instructions(rows, pad_id, mask_prompt=True)


# ================================================================ the objective


class DPOObjective:
    """The Trainer's ``loss_fn`` (and, through ``metrics``, its evaluation) for DPO.

    ``reference``: the frozen starting model, a copy taken before training
    (``copy.deepcopy(policy)``); it is frozen here and put in eval mode.
    """

    def __init__(self, reference, beta: float = 0.1):
        if not beta > 0:
            raise ValueError(f"DPO: beta must be positive, got {beta!r}")
        self.beta = float(beta)
        for param in reference.parameters():
            param.requires_grad = False
        self.reference = reference.eval()
        self._device = None                  # where the reference lives: moved to the batches' device once

    def _reference_log_probs(self, inputs, targets):
        device = backend.device_of(inputs)
        if device != self._device:
            self.reference.to(device)
            self._device = device
        with no_grad():
            return sequence_log_probs(self.reference, inputs, targets).data

    def pair_terms(self, model, batch):
        """(loss Tensor, chosen rewards, rejected rewards) of one collated batch."""
        inputs, targets = batch
        half = inputs.shape[0] // 2
        policy = sequence_log_probs(model, inputs, targets)                  # (2B,)
        reference = self._reference_log_probs(inputs, targets)               # (2B,) array
        return dpo_loss(policy[:half], policy[half:], reference[:half], reference[half:], self.beta)

    def __call__(self, model, batch) -> Tensor:
        return self.pair_terms(model, batch)[0]

    def metrics(self, model, batches) -> dict[str, float]:
        """Mean loss, chosen/rejected reward, margin and reward accuracy over ``batches`` (held-out pairs)."""
        device = model.wte.weight.device
        losses, chosen, rejected = [], [], []
        for inputs, targets in batches:
            batch = (backend.to_device(inputs, device), backend.to_device(targets, device))
            loss, c, r = self.pair_terms(model, batch)
            losses.append(float(loss.data) * len(c))
            chosen.append(backend.to_numpy(c))
            rejected.append(backend.to_numpy(r))
        chosen, rejected = np.concatenate(chosen), np.concatenate(rejected)
        return {"val_loss": sum(losses) / len(chosen),
                "reward_acc": reward_accuracy(chosen, rejected),
                "chosen_reward": float(chosen.mean()), "rejected_reward": float(rejected.mean()),
                "margin": float((chosen - rejected).mean())}


def reward_accuracy(chosen_rewards, rejected_rewards) -> float:
    """Fraction of pairs with chosen reward > rejected reward; ties count one half."""
    chosen_rewards, rejected_rewards = np.asarray(chosen_rewards), np.asarray(rejected_rewards)
    wins = (chosen_rewards > rejected_rewards).astype(np.float64)
    ties = (chosen_rewards == rejected_rewards).astype(np.float64)
    return float(np.mean(wins + 0.5 * ties))
