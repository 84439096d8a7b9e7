"""``minillm plot`` through ``minillm.cli.main``: it draws two runs of ``minillm train``, or says clearly why not."""

import sys

import pytest

from minillm.cli import main

TINY = ["--n-layer", "1", "--n-head", "2", "--d-model", "16", "--context", "16", "--batch-size", "2", "--quiet",
        "--tokenizer", "bytes", "--steps", "4", "--eval-interval", "2", "--samples", "0"]


def test_train_twice_then_plot(tmp_path, text_file, capsys):
    pytest.importorskip("matplotlib")
    for name, lr in (("a", "1e-3"), ("b", "3e-3")):
        assert main(["train", "--data", str(text_file), *TINY, "--lr", lr, "--out", str(tmp_path / name)]) == 0
    err = capsys.readouterr().err
    run_b = tmp_path / "b"
    assert f"metrics: {run_b / 'metrics.jsonl'}" in err                    # train says what to do next
    assert f"minillm plot {run_b}" in err and f"minillm generate --run {run_b} --prompt 'The '" in err
    out = tmp_path / "both.png"
    assert main(["plot", str(tmp_path / "a"), str(run_b), "-o", str(out)]) == 0
    assert out.read_bytes().startswith(b"\x89PNG")
    assert main(["plot", str(run_b)]) == 0                                 # default: next to the metrics
    assert (run_b / "metrics.png").is_file()


def test_plot_errors_are_one_line(tmp_path, capsys):
    assert main(["plot", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err == f"minillm: error: {tmp_path / 'nowhere'}: no such file or directory\n"
    assert main(["plot", str(tmp_path)]) == 2
    assert "no metrics.jsonl here: not a run directory of minillm train" in capsys.readouterr().err
    (tmp_path / "metrics.jsonl").write_text("", encoding="utf-8")
    assert main(["plot", str(tmp_path)]) == 2
    assert "metrics.jsonl holds no metrics yet" in capsys.readouterr().err


def test_missing_matplotlib_names_the_extra(tmp_path, capsys, monkeypatch):
    (tmp_path / "metrics.jsonl").write_text('{"kind": "train", "step": 1, "loss": 2.0}\n', encoding="utf-8")
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)            # import fails as if not installed
    assert main(["plot", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'minillm[plot]'" in err
