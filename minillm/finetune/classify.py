"""Classification fine-tuning: a GPT reads a text, a small head reads the GPT's last state.

    ids (B, T) ──gpt.hidden_states──> (B, T, C) ──pick row lengths−1──> (B, C) ──head──> (B, K) logits

The language-model head (V outputs) is not used; a new ``head`` Linear with
K = ``num_classes`` outputs takes its place. It reads the hidden state of the
LAST REAL token of each text: attention is causal, so that position is the
only one that has seen the whole text, and padding after it cannot change it
(padding sits at later positions, which earlier ones never attend to). Texts
are padded on the right, per batch, to the batch's longest; because the last
real position is unaffected by padding, this gives exactly what padding every
text to the longest training example gives, at a fraction of the cost.
(The book pads every text to the longest training text and reads position
−1, which for most texts is a padding token; it works because the model learns
to carry the information into the padding. ``read="end"`` does that, for
comparison: docs/finetuning.md has both measured.)

The loss is the cross-entropy of the K logits against the label index, and
the metric the accuracy, ``mean(argmax(logits) == label)``.

What trains (``set_trainable``): ``"head"`` only the new head; ``"last-block"``
(the book's choice) the head, the last transformer block and the final norm;
``"all"`` everything. LoRA (``minillm.nn.lora``) is the fourth way: the base
frozen, low-rank adapters in every block plus the head train.
"""

from __future__ import annotations

import numpy as np

from .. import backend
from .. import functional as F
from ..nn import Linear, Module
from ..tensor import Tensor
from .data import DataError

TRAINABLE_CHOICES = ("head", "last-block", "all")
READ_CHOICES = ("last", "end")        # the last real token of each text; the final (padded) position


class GPTClassifier(Module):
    """A GPT body and a ``num_classes``-way head on the last real token's hidden state.

    ``read="end"``: the hidden state at the final position instead, whatever the
    lengths (the book's way; texts must then be padded to one common length).
    """

    def __init__(self, gpt, num_classes: int, read: str = "last"):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"GPTClassifier: need at least 2 classes, got {num_classes}")
        if read not in READ_CHOICES:
            raise ValueError(f"GPTClassifier: read must be one of {READ_CHOICES}, got {read!r}")
        self.read = read
        self.gpt = gpt
        weight = gpt.wte.weight
        self.head = Linear(gpt.config.d_model, num_classes, init_std=0.02, device=weight.device,
                           dtype=weight.dtype)
        self.num_classes = num_classes

    @property
    def config(self):
        return self.gpt.config

    def forward(self, ids, lengths=None) -> Tensor:
        """ids (B, T), lengths (B,) real tokens per row (default all T) -> logits (B, num_classes)."""
        hidden = self.gpt.hidden_states(ids)                         # (B, T, C)
        B, T = hidden.shape[0], hidden.shape[1]
        xp = backend.array_module(hidden.data)
        rows = xp.arange(B)
        if lengths is None or self.read == "end":
            last = xp.full(B, T - 1)
        else:
            last = backend.to_device(lengths, hidden.device) - 1
        return self.head(hidden[rows, last])                         # (B, C) -> (B, K)


def set_trainable(model: GPTClassifier, which: str) -> int:
    """Freeze all, then unfreeze what ``which`` names ("head", "last-block", "all"); returns the trainable count."""
    if which not in TRAINABLE_CHOICES:
        raise ValueError(f"trainable must be one of {', '.join(TRAINABLE_CHOICES)}, got {which!r}")
    for param in model.parameters():
        param.requires_grad = which == "all"
    if which == "last-block":
        for module in (model.gpt.h[len(model.gpt.h) - 1], model.gpt.ln_f):
            for param in module.parameters():
                param.requires_grad = True
    for param in model.head.parameters():
        param.requires_grad = True
    return model.num_parameters(trainable_only=True)


# ================================================================ data


def encode_texts(tokenizer, texts, max_length: int, truncate: bool, where=None) -> list[list[int]]:
    """Token ids of each text, at most ``max_length``; a longer one is cut (``truncate``) or an error.

    An empty text becomes the end-of-text token alone (a classifier needs a position to read).
    """
    from ..data.dataset import END_OF_TEXT  # noqa: PLC0415

    fallback = [tokenizer.special_tokens.get(END_OF_TEXT, 0)]
    encoded = []
    for index, text in enumerate(texts):
        ids = tokenizer.encode(text, allowed_special="none") or fallback
        if len(ids) > max_length:
            if not truncate:
                name = where[index] if where is not None else f"text {index + 1}"
                raise DataError(f"{name} is {len(ids)} tokens, longer than the {max_length} the model "
                                f"can read (its context); pass --truncate to keep the first {max_length} "
                                f"tokens of such texts, or start from a model with a longer context")
            ids = ids[:max_length]
        encoded.append(ids)
    return encoded


def collate_classification(examples, pad_id: int = 0, length: int | None = None):
    """[(ids, label), ...] -> ids (B, T) right-padded with ``pad_id``, lengths (B,), labels (B,), int64.

    T is the batch's longest text, or ``length`` when given (longer texts are then cut to it).
    """
    if length is not None:
        examples = [(ids[:length], label) for ids, label in examples]
    lengths = np.array([len(ids) for ids, _ in examples], dtype=np.int64)
    batch = np.full((len(examples), length or int(lengths.max())), pad_id, dtype=np.int64)
    for row, (ids, _) in enumerate(examples):
        batch[row, :len(ids)] = ids
    labels = np.array([label for _, label in examples], dtype=np.int64)
    return batch, lengths, labels


def classification_loss(model, batch) -> Tensor:
    """Mean cross-entropy of the class logits (the Trainer's ``loss_fn``)."""
    ids, lengths, labels = batch
    return F.cross_entropy(model(ids, lengths), labels)


def predict(model, batches) -> tuple[np.ndarray, np.ndarray]:
    """(predicted class, true class) over ``batches`` of (ids, lengths, labels), without a graph."""
    from ..tensor import no_grad  # noqa: PLC0415

    predicted, truth = [], []
    was_training = model.training
    model.eval()
    try:
        with no_grad():
            for ids, lengths, labels in batches:
                logits = model(backend.to_device(ids, model.gpt.wte.weight.device), lengths)
                predicted.append(backend.to_numpy(logits.data.argmax(axis=-1)))
                truth.append(np.asarray(labels))
    finally:
        model.train(was_training)
    return np.concatenate(predicted), np.concatenate(truth)


def accuracy(predicted, truth) -> float:
    """Fraction of predictions equal to the truth."""
    predicted, truth = np.asarray(predicted), np.asarray(truth)
    if predicted.shape != truth.shape or predicted.size == 0:
        raise ValueError(f"accuracy: need two equal, non-empty shapes, got {predicted.shape} and {truth.shape}")
    return float(np.mean(predicted == truth))


def classification_metrics(model, data, batch_size: int, splits=("train", "val", "test")) -> dict[str, float]:
    """{"<split>_acc": accuracy} for each split of ``data`` (an EpochBatches) that has examples."""
    metrics = {}
    for split in splits:
        if data.splits.get(split):
            metrics[f"{split}_acc"] = accuracy(*predict(model, data.iter_batches(split, batch_size)))
    return metrics
