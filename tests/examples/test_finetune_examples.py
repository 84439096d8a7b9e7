"""Smoke tests of the fine-tuning examples (08-11) on a tiny base run and tiny data."""

import importlib.util
import sys
from pathlib import Path

import pytest


TESTS = Path(__file__).resolve().parents[1]
EXAMPLES = TESTS.parent / "examples"
sys.path.insert(0, str(TESTS / "finetune"))
from finetune_helpers import make_base_run, write_instructions, write_spam_like  # noqa: E402
from example_helpers import ctrl_c_after_step  # noqa: E402


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_08_classify_spam_ablation(tmp_path, capsys):
    base = make_base_run(tmp_path / "base")
    data = write_spam_like(tmp_path / "spam.tsv", n=60)
    accuracy = load("08_classify_spam").main(["--base", str(base), "--data", str(data), "--out", str(tmp_path / "runs"),
                                              "--epochs", "2", "--lr", "2e-3", "--ablation", "--quiet"])
    assert 0.0 <= accuracy <= 1.0
    out = capsys.readouterr().out
    assert out.count("| LoRA r=16 |") == 1 and "| random init, all layers |" in out
    assert (tmp_path / "runs" / "last-block" / "metrics.jsonl").is_file()


def test_09_instruction_sft(tmp_path, capsys):
    base = make_base_run(tmp_path / "base", context_length=192)
    data = write_instructions(tmp_path / "i.json", n=40)
    curve = load("09_instruction_sft").main(["--base", str(base), "--data", str(data), "--out", str(tmp_path / "sft"),
                                             "--epochs", "2", "--lr", "3e-3", "--max-new-tokens", "4", "--quiet"])
    assert curve[-1] < curve[0]                                      # validation loss falls
    assert (tmp_path / "sft" / "test-responses.json").is_file()
    assert "### Model:" in capsys.readouterr().out


def test_10_lora():
    difference = load("10_lora").main(["--preset", "tiny", "--rank", "4", "--steps", "2"])
    assert difference < 1e-5                                         # merged == unmerged


def test_11_dpo(tmp_path, capsys):
    base = make_base_run(tmp_path / "base", context_length=192)
    history = load("11_dpo").main(["--base", str(base), "--instructions", str(write_instructions(tmp_path / "i.json", 40)),
                                   "--preferences", str(write_instructions(tmp_path / "p.json", 40, preference=True)),
                                   "--out", str(tmp_path / "runs"), "--sft-epochs", "1", "--lr", "3e-3",
                                   "--beta", "0.5", "--eval-interval", "2", "--quiet"])
    assert history[0]["reward_acc"] == 0.5 and history[0]["margin"] == 0.0
    assert history[-1]["margin"] > 0
    assert "| reward accuracy |" in capsys.readouterr().out



@pytest.mark.parametrize("name", ["08_classify_spam", "09_instruction_sft", "11_dpo"])
def test_ctrl_c_stops_the_example_and_a_second_run_is_refused(tmp_path, capsys, monkeypatch, name):
    """Ctrl-C: the step ends, the checkpoint is kept, and the example stops (exit 130): no table, no next
    variant (08 --ablation), no test responses (09), no DPO from a half-trained SFT (11). Run again into
    the same --out: one line (exit 2) before any work, not a traceback."""
    import json

    import minillm.finetune.run as finetune_run

    monkeypatch.setattr(finetune_run, "Trainer", ctrl_c_after_step(finetune_run.Trainer, 2))   # Ctrl-C mid-run
    base, out = make_base_run(tmp_path / "base", context_length=192), tmp_path / "out"
    instructions = ["--data", str(write_instructions(tmp_path / "i.json", n=40))]
    argv, stopped_in = {   # the options, and the run directory the Ctrl-C lands in
        "08_classify_spam": (["--data", str(write_spam_like(tmp_path / "spam.tsv", n=60)), "--ablation"],
                             out / "head-only"),
        "09_instruction_sft": (instructions, out),
        "11_dpo": (["--instructions", instructions[1],
                    "--preferences", str(write_instructions(tmp_path / "p.json", 40, preference=True))], out / "sft"),
    }[name]
    argv += ["--base", str(base), "--out", str(out), "--quiet"]
    example = load(name)
    with pytest.raises(SystemExit) as stopped:
        example.main(argv)
    assert stopped.value.code == 130
    captured = capsys.readouterr()
    assert f"stopped at step 2; the checkpoint is in {stopped_in}\n" == captured.err
    assert "| variant |" not in captured.out and "| step |" not in captured.out and "### Model:" not in captured.out
    assert json.loads((stopped_in / "checkpoint.json").read_text())["step"] == 2
    if stopped_in != out:                                  # no later variant / stage was started
        assert [p.name for p in out.iterdir()] == [stopped_in.name]
    assert not (stopped_in / "test-responses.json").exists()
    with pytest.raises(SystemExit) as again:
        example.main(argv)
    assert again.value.code == 2
    assert f"{stopped_in} already holds a run: pass another --out" in capsys.readouterr().err


@pytest.mark.parametrize("name, option", [("08_classify_spam", "--data"), ("09_instruction_sft", "--data"),
                                          ("11_dpo", "--instructions"), ("11_dpo", "--preferences")])
def test_a_missing_data_file_names_where_it_comes_from(tmp_path, capsys, name, option):
    """Without ../shared/data (a fresh clone elsewhere): one line naming the file, where to get it, and the option."""
    example = load(name)
    with pytest.raises(SystemExit) as refused:
        example.main(["--base", str(make_base_run(tmp_path / "base")), option, str(tmp_path / "missing"),
                      "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.splitlines()[-1]
    assert refused.value.code == 2 and f"no data file {tmp_path / 'missing'}" in err
    assert "https://" in err and err.endswith(f"{option} FILE") and not (tmp_path / "out").exists()
