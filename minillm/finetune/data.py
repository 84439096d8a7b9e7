"""Reading fine-tuning data, splitting it, and drawing batches by epoch.

Formats (chosen by the file's extension, checked record by record with errors
that name the file and line):

    .tsv / other   ``label<TAB>text`` per line (the SMS Spam Collection's layout),
                   or a header line naming a ``label`` and a ``text`` column
    .csv           a header line, then rows (Python's csv dialect: quotes, commas in fields)
    .jsonl         one JSON object per line
    .json          one JSON array of objects (the instruction data sets)

``read_records`` returns plain dicts; ``read_labelled`` checks for the text
and label fields of classification data, ``require_fields`` for any other
(``instruction``/``output``, ``chosen``/``rejected``).

Splits are by a seeded permutation (the same seed gives the same split on
every machine), the fractions rounded down for all but the last part, which
takes the rest. ``EpochBatches`` walks a list of examples in a new seeded
order each epoch, ``batch_size`` at a time (the last batch of an epoch may be
smaller), and keeps its place in ``state_dict`` so a resumed run draws the
same batches as an uninterrupted one.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..tokenizer.gpt2 import read_utf8
from ..checks import is_integer


class DataError(ValueError):
    """Fine-tuning data that cannot be used: a clear, user-worded message."""


# ================================================================ reading


def read_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of ``path`` as dicts (format by extension: .json, .jsonl, .csv, else .tsv)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no data file {str(path)!r}")
    text = read_utf8(path, DataError)
    if not text.strip():
        raise DataError(f"{path} is empty: no records to fine-tune on")
    suffix = path.suffix.lower()
    if suffix == ".json":
        records = _read_json(path, text)
    elif suffix == ".jsonl":
        records = _read_jsonl(path, text)
    elif suffix == ".csv":
        records = _read_table(path, text, ",")
    else:
        records = _read_table(path, text, "\t")
    if not records:
        raise DataError(f"{path} holds no records")
    return records


def _read_json(path: Path, text: str) -> list[dict[str, Any]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(f"{path} is not valid JSON ({error})") from None
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise DataError(f"{path}: expected a JSON array of objects")
    for number, record in enumerate(data, 1):
        record.setdefault("_where", f"{path}, record {number}")
    return data


def _read_jsonl(path: Path, text: str) -> list[dict[str, Any]]:
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}, line {number}: not valid JSON ({error})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}, line {number}: expected a JSON object, got {type(record).__name__}")
        record.setdefault("_where", f"{path}, line {number}")
        records.append(record)
    return records


def _read_table(path: Path, text: str, delimiter: str) -> list[dict[str, Any]]:
    lines = text.splitlines()
    header = [h.strip().lower() for h in lines[0].split(delimiter)]
    if delimiter == "\t" and not ("label" in header and "text" in header):
        # headerless label<TAB>text lines (the text may itself hold tabs: split once)
        records = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            label, tab, body = line.partition("\t")
            if not tab:
                raise DataError(f"{path}, line {number}: expected 'label<TAB>text', found no tab "
                                f"(or give a header line naming 'label' and 'text' columns)")
            records.append({"label": label.strip(), "text": body, "_where": f"{path}, line {number}"})
        return records
    reader = csv.DictReader(io.StringIO(text), delimiter=delimiter)
    if reader.fieldnames is None:
        raise DataError(f"{path} has no header line")
    reader.fieldnames = [name.strip().lower() for name in reader.fieldnames]
    records = []
    for row in reader:
        where = f"{path}, line {reader.line_num}"      # counts lines (a quoted field may span several), not rows
        extra = row.pop(None, None)                    # DictReader's place for fields beyond the header's
        if extra is not None:
            hint = "quote a text that holds a comma" if delimiter == "," else "a text that holds a tab needs quotes"
            raise DataError(f"{where}: {len(reader.fieldnames) + len(extra)} fields, but the header names "
                            f"{len(reader.fieldnames)} ({hint})")
        row["_where"] = where
        records.append(row)
    return records


def require_fields(records: Sequence[dict[str, Any]], fields: Sequence[str], source: str = "the data",
                   hint: str = "", optional: Sequence[str] = ()) -> None:
    """Raise DataError naming the first record that lacks one of ``fields`` (or has a non-string there),
    or has one of the ``optional`` fields with a value that is neither a string nor null."""
    for record in records:
        for name in optional:
            value = record.get(name)
            if value is not None and not isinstance(value, str):
                raise DataError(f"{record.get('_where', source)}: {name!r} must be a string when given, "
                                f"got {type(value).__name__}")
        for name in fields:
            value = record.get(name)
            if value is None:
                where = record.get("_where", source)
                raise DataError(f"{where}: no {name!r} field (a record needs {', '.join(map(repr, fields))})"
                                + (f"; {hint}" if hint else ""))
            if not isinstance(value, str):
                raise DataError(f"{record.get('_where', source)}: {name!r} must be a string, "
                                f"got {type(value).__name__}")


def read_labelled(path: str | os.PathLike, text_field: str = "text",
                  label_field: str = "label") -> tuple[list[str], list[str]]:
    """(texts, labels) of a classification file; labels are any strings.

    A missing column is reported with the columns the file does have.
    """
    records = read_records(path)
    first = records[0]
    for name in (label_field, text_field):
        if name not in first:
            columns = [k for k in first if k != "_where"]
            raise DataError(f"{path}: no {name!r} column; the records have {columns}. Classification data "
                            f"needs a text and a label per record (label<TAB>text lines, or CSV/JSONL with "
                            f"'{text_field}' and '{label_field}')")
    require_fields(records, (text_field, label_field), str(path))
    texts = [r[text_field] for r in records]
    labels = [r[label_field].strip() for r in records]
    for record, label in zip(records, labels):
        if not label:
            raise DataError(f"{record.get('_where', path)}: the label is empty")
    if len(set(labels)) < 2:
        raise DataError(f"{path}: every record has the label {labels[0]!r}; a classifier needs two or more")
    return texts, labels


# ================================================================ balance and split


def balance(items: Sequence, labels: Sequence[str], seed: int = 123) -> list[int]:
    """Indices of a class-balanced subset: every class undersampled to the size of the smallest, seeded.

    Returned in the original order of the data (the split shuffles later).
    """
    rng = np.random.default_rng(seed)
    labels = list(labels)
    classes = sorted(set(labels))
    smallest = min(labels.count(c) for c in classes)
    keep: list[int] = []
    for c in classes:
        members = [i for i, label in enumerate(labels) if label == c]
        keep.extend(rng.choice(members, size=smallest, replace=False).tolist())
    return sorted(keep)


def split_indices(n: int, fractions: Sequence[float], seed: int = 123) -> list[list[int]]:
    """A seeded permutation of range(n) cut into parts of ``fractions`` (the last part takes the rest)."""
    if abs(sum(fractions) - 1.0) > 1e-9:
        raise ValueError(f"split fractions must add up to 1, got {list(fractions)}")
    order = np.random.default_rng(seed).permutation(n)
    parts, start = [], 0
    for fraction in fractions[:-1]:
        size = int(fraction * n + 1e-9)                  # floor, as the book does (0.7 * 90 is 62.99...)
        parts.append(order[start:start + size].tolist())
        start += size
    parts.append(order[start:].tolist())
    return parts


# ================================================================ batches by epoch


class EpochBatches:
    """Batches of examples for the Trainer: a fresh seeded order each epoch, ``collate`` turns a list into arrays.

    ``splits``: {"train": [...], "val": [...], ...}, any examples ``collate``
    accepts. ``get_batch("train", B)`` returns the next B training examples of
    the current epoch (the last batch of an epoch holds the remainder);
    ``iter_batches(split, B)`` walks a split once, in order (evaluation).
    """

    def __init__(self, splits: dict[str, list], collate: Callable[[list], tuple], seed: int = 0):
        if not splits.get("train"):
            raise DataError("no training examples")
        self.splits, self.collate, self.seed = splits, collate, int(seed)
        self.epoch, self.position = 0, 0
        self._order = self._epoch_order(0)

    def steps_per_epoch(self, batch_size: int) -> int:
        return -(-len(self.splits["train"]) // batch_size)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.splits["train"]))

    def split(self, name: str) -> list:
        if not self.splits.get(name):
            raise ValueError(f"no {name!r} split")
        return self.splits[name]

    def get_batch(self, split: str, batch_size: int, rng=None) -> tuple:
        if split != "train":
            examples = self.split(split)
            rng = rng or np.random.default_rng(self.seed + 1)
            return self.collate([examples[i] for i in rng.integers(0, len(examples), batch_size)])
        if self.position >= len(self._order):
            self.epoch += 1
            self.position = 0
            self._order = self._epoch_order(self.epoch)
        chosen = self._order[self.position:self.position + batch_size]
        self.position += len(chosen)
        train = self.splits["train"]
        return self.collate([train[i] for i in chosen])

    def epoch_ended(self) -> bool:
        """The last training batch drawn was the current epoch's last: the Trainer ends the step there
        (with fewer than ``grad_accum`` micro-batches), so no step runs into the next epoch and
        ``steps_per_epoch(batch_size * grad_accum)`` steps are exactly one pass."""
        return self.position >= len(self._order)

    def iter_batches(self, split: str, batch_size: int):
        examples = self.split(split)
        for start in range(0, len(examples), batch_size):
            yield self.collate(examples[start:start + batch_size])

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        values = [state.get(key) for key in ("seed", "epoch", "position")] if isinstance(state, dict) else []
        if len(values) != 3 or not all(is_integer(v) for v in values):
            raise ValueError(f"data state: needs integers 'seed', 'epoch' and 'position', got {state!r}")
        seed, epoch, position = values
        if epoch < 0:
            raise ValueError(f"data state: epoch {epoch} is negative")
        if not 0 <= position <= len(self.splits["train"]):
            raise ValueError(f"data state: position {position} is outside the {len(self.splits['train'])} "
                             f"training examples (a state saved for other data?)")
        self.seed, self.epoch, self.position = seed, epoch, position
        self._order = self._epoch_order(self.epoch)
