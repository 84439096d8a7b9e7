"""Smoke tests of the fine-tuning examples (08-11) on a tiny base run and tiny data."""

import importlib.util
import sys
from pathlib import Path


TESTS = Path(__file__).resolve().parents[1]
EXAMPLES = TESTS.parent / "examples"
sys.path.insert(0, str(TESTS / "finetune"))
from finetune_helpers import make_base_run, write_instructions, write_spam_like  # noqa: E402


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
