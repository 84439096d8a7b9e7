"""``minillm finetune``, ``minillm classify`` and ``generate --instruction`` through ``minillm.cli.main``."""

import io
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "finetune"))
from cli_helpers import run  # noqa: E402
from finetune_helpers import make_base_run, write_instructions, write_spam_like  # noqa: E402

from minillm.finetune import load_finetuned  # noqa: E402
from minillm.finetune.sft import respond  # noqa: E402
from minillm.train import read_metrics  # noqa: E402


def failed(argv, capsys, code=2):
    assert run(argv) == code
    return capsys.readouterr().err


def test_classify_run_then_minillm_classify_prints_one_label_per_line(tmp_path, capsys, monkeypatch):
    base = make_base_run(tmp_path / "base")
    data = write_spam_like(tmp_path / "spam.tsv", n=60)
    out = tmp_path / "run"
    assert run(["finetune", "classify", "--data", data, "--from", base, "--out", out, "--trainable", "all",
                "--epochs", "6", "--lr", "3e-3", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "done: step" in err and "test_acc" in err
    assert read_metrics(out, "eval")[-1]["train_acc"] > 0.8

    texts = ["abcz", "abca", "", "hhhhz"]
    (tmp_path / "texts.txt").write_text("\n".join(texts) + "\n")
    assert run(["classify", "--run", out, tmp_path / "texts.txt"]) == 0
    printed = capsys.readouterr().out.splitlines()
    model, tok, info = load_finetuned(out)
    from minillm.finetune.classify import collate_classification, encode_texts, predict
    ids = encode_texts(tok, texts, 48, truncate=True)
    expected, _ = predict(model, [collate_classification([(i, 0) for i in ids], 0)])
    assert printed == [info["labels"][int(k)] for k in expected]

    monkeypatch.setattr(sys, "stdin", io.StringIO("abcz\n"))
    assert run(["classify", "--run", out, "-"]) == 0
    assert capsys.readouterr().out == printed[0] + "\n"

    assert run(["classify", "--run", out, "--batch-size", "3", tmp_path / "texts.txt"]) == 0   # 4 texts, 2 batches
    captured = capsys.readouterr()
    assert captured.out.splitlines() == printed and "classify: 100%" in captured.err and "2/2" in captured.err
    assert run(["classify", "--run", out, "--quiet", tmp_path / "texts.txt"]) == 0
    assert capsys.readouterr().err == ""

    latin1 = tmp_path / "latin1.txt"                    # not UTF-8: one line naming the file, no labels
    latin1.write_bytes("abcz\ncafé\n".encode("latin-1"))
    assert run(["classify", "--run", out, latin1]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == (f"minillm: error: {latin1}: not UTF-8 text (byte 0xe9 at offset 8: "
                                                   f"invalid continuation byte); convert it to UTF-8 first\n")


def test_resume_continues_to_the_saved_number_of_steps(tmp_path, capsys):
    base = make_base_run(tmp_path / "base")
    data = write_spam_like(tmp_path / "spam.tsv", n=30)
    out = tmp_path / "run"
    argv = ["finetune", "classify", "--data", data, "--from", base, "--out", out, "--epochs", "2", "--quiet"]
    assert run(argv) == 0
    assert "already holds a run" in failed(argv, capsys)
    assert "already at step" in failed(["finetune", "classify", "--out", out, "--resume", "--quiet"], capsys)
    assert "is a classify run, not sft" in failed(["finetune", "sft", "--out", out, "--resume"], capsys)
    assert failed(["train", "--resume", out], capsys) == (f"minillm: error: {out} is a fine-tuning run (classify): "
                                                          f"continue it with minillm finetune classify --out {out} "
                                                          f"--resume\n")


def test_bad_data_and_options_are_one_line_errors(tmp_path, capsys):
    base = make_base_run(tmp_path / "base")
    out = tmp_path / "run"
    (tmp_path / "cats.csv").write_text("category,text\na,x\nb,y\n")
    (tmp_path / "empty.tsv").write_text("")
    (tmp_path / "noout.json").write_text(json.dumps([{"instruction": "hi", "input": ""}]))
    long = tmp_path / "long.tsv"
    long.write_text("spam\t" + "z" * 100 + "\nham\tok\n")
    common = ["--from", base, "--out", out]
    cases = [
        (["finetune", "classify", "--data", tmp_path / "cats.csv", *common], "no 'label' column"),
        (["finetune", "classify", "--data", tmp_path / "empty.tsv", *common], "is empty"),
        (["finetune", "sft", "--data", tmp_path / "noout.json", *common], "record 1: no 'output' field"),
        (["finetune", "classify", "--data", long, *common], "longer than the 48 the model can read"),
        (["finetune", "classify", "--data", long, "--out", out], "--from RUN_DIR"),
        (["finetune", "classify", "--data", tmp_path / "absent.tsv", *common], "absent.tsv"),
        (["finetune", "classify", "--data", tmp_path, *common],
         f"{tmp_path}: --data wants a data file (.tsv, .csv, .jsonl or .json), and this is a folder"),
        (["finetune", "classify", "--data", long, *common, "--lora-rank", "4", "--trainable", "all"],
         "exclude each other"),
        (["finetune", "classify", "--data", long, "--from", tmp_path / "nowhere", "--out", out], "nowhere"),
    ]
    for argv, message in cases:
        err = failed(argv, capsys)
        assert message in err and err.count("\n") == 1, (argv, err)


def test_sft_run_and_generate_instruction_prints_only_the_response(tmp_path, capsys):
    base = make_base_run(tmp_path / "base", context_length=192)
    data = write_instructions(tmp_path / "i.json", n=40)
    out = tmp_path / "sft"
    assert run(["finetune", "sft", "--data", data, "--from", base, "--out", out, "--epochs", "1",
                "--max-new-tokens", "4", "--quiet"]) == 0
    assert (out / "test-responses.json").is_file()
    capsys.readouterr()
    assert run(["generate", "--run", out, "--instruction", "Say 3.", "--temperature", "0",
                "--max-new-tokens", "6"]) == 0
    printed = capsys.readouterr().out
    model, tok, _ = load_finetuned(out)
    assert printed.strip() == respond(model, tok, "Say 3.", max_new_tokens=6)   # respond() strips too
    assert "Below is an instruction" not in printed
    assert "--input goes with --instruction" in failed(["generate", "--run", out, "--input", "x"], capsys)


def test_ctrl_c_saves_and_resume_finishes_the_run(tmp_path, capsys, monkeypatch):
    from minillm.train.trainer import Trainer

    base = make_base_run(tmp_path / "base")
    data = write_spam_like(tmp_path / "spam.tsv", n=30)
    out = tmp_path / "run"
    original = Trainer.train_step

    def step_then_ctrl_c(self):
        result = original(self)
        if self.step == 2:
            self.request_stop()                      # what the first Ctrl-C does
        return result

    monkeypatch.setattr(Trainer, "train_step", step_then_ctrl_c)
    assert run(["finetune", "classify", "--data", data, "--from", base, "--out", out, "--epochs", "2"]) == 130
    assert "minillm finetune classify --out" in capsys.readouterr().err
    monkeypatch.setattr(Trainer, "train_step", original)
    assert json_step(out) == 2
    assert run(["finetune", "classify", "--out", out, "--resume", "--quiet"]) == 0
    assert json_step(out) == 6                        # 21 training texts, batch 8: 3 steps per epoch


def json_step(run_dir):
    return json.loads((run_dir / "checkpoint.json").read_text())["step"]


def test_from_a_hugging_face_directory(tmp_path, capsys):
    from minillm.finetune import load_language_model
    from minillm.weights import save_hf_gpt2

    base = make_base_run(tmp_path / "base")
    gpt, tok = load_language_model(base)
    save_hf_gpt2(gpt, tmp_path / "hf")                      # config.json + model.safetensors
    data = write_spam_like(tmp_path / "spam.tsv", n=30)
    out = tmp_path / "run"
    assert run(["finetune", "classify", "--data", data, "--hf", tmp_path / "hf", "--tokenizer",
                base / "tokenizer.json", "--out", out, "--epochs", "1", "--quiet"]) == 0
    model, _, info = load_finetuned(out)
    assert info["finetune"]["base"]["hf"] == str(tmp_path / "hf")
    frozen = dict(model.gpt.named_parameters())["h.0.attn.c_attn.weight"].numpy()   # last-block: h.0 frozen
    np.testing.assert_array_equal(frozen, gpt.h[0].attn.c_attn.weight.numpy())     # so: the --hf weights
    assert "--tokenizer is for --hf" in failed(["finetune", "classify", "--data", data, "--from", base, "--out",
                                                tmp_path / "r2", "--tokenizer", "x"], capsys)


def test_a_second_run_on_a_folder_in_use_stops_at_once(tmp_path, capsys, monkeypatch):
    """While a fine-tuning run holds --out, the same command again (here: started from inside the first
    run's second step) is refused at once instead of interleaving its steps and checkpoints with it."""
    from minillm.train.trainer import Trainer

    base = make_base_run(tmp_path / "base")
    data = write_spam_like(tmp_path / "spam.tsv", n=30)
    out = tmp_path / "runs" / "spam"
    argv = ["finetune", "classify", "--data", data, "--from", base, "--out", out, "--epochs", "2", "--quiet"]
    original, started, second = Trainer.train_step, [], []

    def step_and_start_another(self):
        if self.step == 1 and not started:
            started.append(True)
            second.append(run(argv))
        return original(self)

    monkeypatch.setattr(Trainer, "train_step", step_and_start_another)
    assert run(argv) == 0
    assert second == [2]
    assert (f"minillm: error: {out} is in use by another minillm run: wait until it ends (or stop it), or choose "
            f"another --out\n") in capsys.readouterr().err
    assert [r["step"] for r in read_metrics(out, "train")] == [1, 2, 3, 4, 5, 6] and json_step(out) == 6

    latin1 = tmp_path / "latin1.tsv"                        # a start that fails leaves no folder behind
    latin1.write_bytes("ham\tcafé\n".encode("latin-1"))
    assert run(["finetune", "classify", "--data", latin1, "--from", base, "--out", tmp_path / "runs" / "x"]) == 2
    assert "not UTF-8" in capsys.readouterr().err and sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["spam"]
