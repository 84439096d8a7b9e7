"""Reading classification/instruction data (TSV, CSV, JSONL, JSON), its errors, balance and splits."""

import json

import numpy as np
import pytest

from minillm.finetune.classify import encode_texts
from minillm.finetune.data import DataError, EpochBatches, balance, read_labelled, read_records, split_indices
from minillm.finetune.dpo import preference_examples
from minillm.finetune.sft import format_prompt, instruction_examples
from minillm.tokenizer import BPETokenizer


def _tokenizer():
    return BPETokenizer.bytes(special_tokens=["<|endoftext|>"])


def test_tsv_csv_jsonl_give_the_same_records(tmp_path):
    rows = [("spam", "WIN a prize, now!"), ("ham", "see you at 5\tok"), ("other", "x")]
    (tmp_path / "a.tsv").write_text("".join(f"{l}\t{t}\n" for l, t in rows), encoding="utf-8")
    (tmp_path / "a.csv").write_text("label,text\n" + "".join(f'{l},"{t}"\n' for l, t in rows), encoding="utf-8")
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": t, "label": l}) + "\n" for l, t in rows))
    expected = ([t for _, t in rows], [l for l, _ in rows])
    for name in ("a.tsv", "a.csv", "a.jsonl"):
        assert read_labelled(tmp_path / name) == expected, name


def test_a_missing_label_column_names_the_columns(tmp_path):
    (tmp_path / "d.csv").write_text("category,text\nspam,hello\nham,bye\n")
    with pytest.raises(DataError, match=r"d\.csv: no 'label' column; the records have \['category', 'text'\]"):
        read_labelled(tmp_path / "d.csv")
    assert read_labelled(tmp_path / "d.csv", label_field="category")[1] == ["spam", "ham"]


def test_other_column_names_and_sorted_labels_in_a_run(tmp_path):
    """docs/finetuning.md: CSV columns named by --text-column/--label-column; labels are any strings, sorted,
    class 0, 1, ... in that order."""
    from minillm.finetune import FinetuneConfig  # noqa: PLC0415
    from minillm.finetune.run import prepare_data  # noqa: PLC0415

    rows = [("zebra", "z"), ("apple", "a"), ("mango", "m")] * 10
    (tmp_path / "d.csv").write_text("category,message\n" + "".join(f"{l},{t}\n" for l, t in rows))
    config = FinetuneConfig("classify", str(tmp_path / "d.csv"), text_column="message", label_column="category")
    data, extra = prepare_data(config, _tokenizer(), 16)
    assert extra["labels"] == ["apple", "mango", "zebra"]
    examples = sum((data.split(name) for name in ("train", "val", "test")), [])
    assert sorted((bytes(ids).decode(), label) for ids, label in examples) == sorted(
        (t, {"apple": 0, "mango": 1, "zebra": 2}[l]) for l, t in rows)


def test_bad_lines_and_empty_files_are_clear_errors(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n  \n")
    with pytest.raises(DataError, match=r"empty\.jsonl is empty"):                 # errors name the file
        read_records(tmp_path / "empty.jsonl")
    (tmp_path / "notab.tsv").write_text("spam\thi\nno tab here\n")
    with pytest.raises(DataError, match=r"notab.tsv, line 2: expected 'label<TAB>text'"):
        read_labelled(tmp_path / "notab.tsv")
    (tmp_path / "broken.jsonl").write_text('{"text": "a", "label": "x"}\n{"text": \n')
    with pytest.raises(DataError, match="broken.jsonl, line 2: not valid JSON"):
        read_records(tmp_path / "broken.jsonl")
    (tmp_path / "one.tsv").write_text("ham\ta\nham\tb\n")
    with pytest.raises(DataError, match="a classifier needs two or more"):
        read_labelled(tmp_path / "one.tsv")
    with pytest.raises(FileNotFoundError):
        read_records(tmp_path / "absent.json")


def test_an_instruction_record_without_output_is_named(tmp_path):
    records = [{"instruction": "a", "output": "b"}, {"instruction": "c", "input": ""}]
    (tmp_path / "i.json").write_text(json.dumps(records))
    with pytest.raises(DataError, match=r"i.json, record 2: no 'output' field"):
        instruction_examples(_tokenizer(), read_records(tmp_path / "i.json"), 512, truncate=False)


@pytest.mark.parametrize("value", [["a list"], 0, 1.5, {"k": "v"}])
def test_an_optional_input_that_is_not_a_string_is_named(tmp_path, value):
    """'input' may be absent, null or a string; anything else was formatted into the prompt as
    its Python form (and a 0 silently dropped)."""
    instructions = [{"instruction": "a", "output": "b"}, {"instruction": "c", "input": value, "output": "d"}]
    (tmp_path / "i.json").write_text(json.dumps(instructions))
    with pytest.raises(DataError, match=r"i.json, record 2: 'input' must be a string when given"):
        instruction_examples(_tokenizer(), read_records(tmp_path / "i.json"), 512, truncate=False)
    pairs = [{"instruction": "c", "input": value, "chosen": "d", "rejected": "e"}]
    (tmp_path / "p.json").write_text(json.dumps(pairs))
    with pytest.raises(DataError, match=r"p.json, record 1: 'input' must be a string when given"):
        preference_examples(_tokenizer(), read_records(tmp_path / "p.json"), 512, truncate=False)
    fine = [{"instruction": "c", "input": None, "output": "d"}, {"instruction": "c", "output": "d"}]
    first, second = instruction_examples(_tokenizer(), fine, 512, truncate=False)
    assert first == second                                # null and absent: the same prompt


def test_texts_longer_than_the_context_stop_unless_truncated(tmp_path):
    tok = _tokenizer()
    with pytest.raises(DataError, match=r"text 2 is 12 tokens, longer than the 8 .*--truncate"):
        encode_texts(tok, ["short", "twelve bytes"], 8, truncate=False)
    assert encode_texts(tok, ["short", "twelve bytes"], 8, truncate=True)[1] == list(b"twelve b")
    long = [{"instruction": "i", "output": "o" * 400, "_where": "rec 1"}]
    with pytest.raises(DataError, match=r"rec 1 is \d+ tokens .* longer than the model's context of 200"):
        instruction_examples(tok, long, 200, truncate=False)
    (ids, prompt_length), = instruction_examples(tok, long, 200, truncate=True)
    assert len(ids) == 201 and prompt_length < 200                     # inputs and targets: 200 each
    huge_prompt = [{"instruction": "i" * 300, "output": "o"}]
    from minillm.finetune import FinetuneConfig  # noqa: PLC0415
    from minillm.finetune.run import prepare_data  # noqa: PLC0415
    (tmp_path / "long.tsv").write_text("ham\tok\nspam\t" + "z" * 20 + "\n")      # a run names file and record
    with pytest.raises(DataError, match=r"long\.tsv, record 2 is 20 tokens, longer than the 8 .*--truncate"):
        prepare_data(FinetuneConfig("classify", str(tmp_path / "long.tsv")), tok, 8)
    assert instruction_examples(tok, huge_prompt, 200, truncate=True) == [None]   # no room for a response: left out
    with pytest.raises(DataError, match="the prompt alone is"):
        instruction_examples(tok, huge_prompt, 200, truncate=False)


def test_preference_pairs_fit_the_context_by_the_same_rule():
    """DPO: each response is fitted like an SFT one; the message names which response is too long."""
    tok = _tokenizer()
    pair = [{"instruction": "i", "chosen": "short", "rejected": "r" * 400, "_where": "rec 3"}]
    with pytest.raises(DataError, match=r"rec 3 is \d+ tokens \(prompt \d+ \+ rejected response 400\), longer "
                                        r"than the model's context of 200"):
        preference_examples(tok, pair, 200, truncate=False)
    (chosen, rejected, prompt_length), = preference_examples(tok, pair, 200, truncate=True)
    prompt = tok.encode(format_prompt("i", ""), allowed_special="none")   # bytes: one id per character
    assert prompt_length == len(prompt)
    assert chosen == prompt + list(b"short") + [256]                       # fits: whole, ended by <|endoftext|>
    assert rejected == (prompt + list(b"r" * 400))[:201]                  # cut to 200 inputs + 200 targets
    huge_prompt = [{"instruction": "i" * 300, "chosen": "a", "rejected": "b"}]
    assert preference_examples(tok, huge_prompt, 200, truncate=True) == [None]
    with pytest.raises(DataError, match=r"a record: the prompt alone is \d+ tokens; the model's context is 200, "
                                        r"leaving no room for the chosen response"):
        preference_examples(tok, huge_prompt, 200, truncate=False)


def test_balance_undersamples_to_the_smallest_class_seeded():
    labels = ["a"] * 10 + ["b"] * 3 + ["c"] * 5
    keep = balance(range(18), labels, seed=1)
    assert sorted(labels[i] for i in keep) == ["a"] * 3 + ["b"] * 3 + ["c"] * 3
    assert keep == balance(range(18), labels, seed=1) and keep == sorted(keep)


def test_split_is_seeded_disjoint_and_sized():
    parts = split_indices(1494, (0.7, 0.1, 0.2), seed=123)
    assert [len(p) for p in parts] == [1045, 149, 300]                  # the book's SMS sizes
    assert sorted(sum(parts, [])) == list(range(1494))
    assert parts == split_indices(1494, (0.7, 0.1, 0.2), seed=123)
    assert parts != split_indices(1494, (0.7, 0.1, 0.2), seed=124)
    with pytest.raises(ValueError, match="add up to 1"):
        split_indices(10, (0.5, 0.4))


def test_the_book_data_sets_split_as_docs_say(shared_data):
    """docs/finetuning.md: the SMS data has 747 spam and 4,827 ham; --balance keeps 747 of each, split 70/10/20
    with the default seed into 1,045 / 149 / 300; SFT's 85/5/10 of 1,099 instructions is 934 / 54 / 111."""
    from collections import Counter  # noqa: PLC0415

    from minillm.finetune import FinetuneConfig  # noqa: PLC0415
    from minillm.finetune.run import SPLITS  # noqa: PLC0415

    path = shared_data / "sms-spam-collection.tsv"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    texts, labels = read_labelled(path)
    assert Counter(labels) == {"ham": 4827, "spam": 747}
    seed = FinetuneConfig("classify", str(path)).split_seed
    keep = balance(range(len(texts)), labels, seed)
    assert Counter(labels[i] for i in keep) == {"ham": 747, "spam": 747}
    assert [len(p) for p in split_indices(len(keep), SPLITS["classify"], seed)] == [1045, 149, 300]
    for task in ("sft", "dpo"):
        assert [len(p) for p in split_indices(1099, SPLITS[task], seed)] == [934, 54, 111]


def test_epoch_batches_cover_each_epoch_once_and_resume_exactly():
    data = EpochBatches({"train": list(range(10))}, collate=lambda b: (np.array(b),), seed=3)
    epoch = np.concatenate([data.get_batch("train", 4)[0] for _ in range(3)])   # 4 + 4 + 2
    assert sorted(epoch.tolist()) == list(range(10))
    state = data.state_dict()
    ahead = [data.get_batch("train", 4)[0].tolist() for _ in range(3)]
    again = EpochBatches({"train": list(range(10))}, collate=lambda b: (np.array(b),), seed=3)
    again.load_state_dict(state)
    assert [again.get_batch("train", 4)[0].tolist() for _ in range(3)] == ahead
    assert data.steps_per_epoch(4) == 3
    second = np.concatenate(ahead)                                      # the next epoch: a new seeded order
    assert sorted(second.tolist()) == list(range(10)) and second.tolist() != epoch.tolist()


def test_a_row_with_more_fields_than_the_header_is_named_not_cut(tmp_path):
    """An unquoted comma (CSV) or an extra tab (TSV with a header) must not silently drop the rest of the text."""
    (tmp_path / "extra.csv").write_text("label,text\nham,hello\nspam,win a prize, now\n")
    with pytest.raises(DataError, match=r"extra\.csv, line 3: 3 fields, but the header names 2 .*quote"):
        read_labelled(tmp_path / "extra.csv")
    (tmp_path / "extra.tsv").write_text("label\ttext\nham\thello\nspam\twin\tnow\n")
    with pytest.raises(DataError, match=r"extra\.tsv, line 3: 3 fields, but the header names 2"):
        read_labelled(tmp_path / "extra.tsv")
    # a quoted comma and a headerless TSV text holding a tab are fine
    (tmp_path / "ok.csv").write_text('label,text\nham,hello\nspam,"win a prize, now"\n')
    assert read_labelled(tmp_path / "ok.csv")[0] == ["hello", "win a prize, now"]


def test_csv_line_numbers_count_the_lines_of_quoted_multi_line_fields(tmp_path):
    (tmp_path / "multi.csv").write_text('label,text\nham,"a\nb\nc"\n\nspam,x\nham\n')   # and a blank line
    with pytest.raises(DataError, match=r"multi\.csv, line 7: no 'text' field"):
        read_labelled(tmp_path / "multi.csv")


def test_an_empty_label_is_named(tmp_path):
    (tmp_path / "nolabel.tsv").write_text("ham\thello\n\tno label here\nspam\tx\n")
    with pytest.raises(DataError, match=r"nolabel\.tsv, line 2: the label is empty"):
        read_labelled(tmp_path / "nolabel.tsv")


@pytest.mark.parametrize("name", ["bad.json", "bad.jsonl", "bad.tsv", "bad.csv"])
def test_a_file_that_is_not_utf8_is_named(tmp_path, name):
    (tmp_path / name).write_bytes(b'label,text\nham,caf\xe9\n')          # Latin-1, not UTF-8
    with pytest.raises(DataError, match=rf"{name}, line 2: not UTF-8 text \(byte 0xe9 at byte offset 18\)"):
        read_records(tmp_path / name)


@pytest.mark.parametrize("state, message", [
    ({"epoch": 1, "position": 0}, r"needs integers 'seed', 'epoch' and 'position', got \{'epoch': 1, 'position': 0\}"),
    ({"seed": 0, "epoch": 0, "position": 11}, r"position 11 is outside the 10 training examples"),
    ({"seed": 0, "epoch": 0, "position": -3}, r"position -3 is outside the 10 training examples"),
    ({"seed": 0, "epoch": -1, "position": 0}, r"epoch -1 is negative"),
])
def test_a_damaged_epoch_state_is_a_clear_error(state, message):
    data = EpochBatches({"train": list(range(10))}, collate=lambda b: (np.array(b),), seed=3)
    with pytest.raises(ValueError, match=r"data state: " + message):
        data.load_state_dict(state)
    assert data.state_dict() == {"seed": 3, "epoch": 0, "position": 0}       # unchanged
