"""``minillm bench tokenizer|train|generate|ops`` through ``minillm.cli.main``."""

import io
import json
import re
import sys

import pytest

from cli_helpers import run, usage_error

from minillm.cli import main


def test_bench_ops_layer_norm_smoke(capsys):
    """A smoke test: the timings may be any number (figures come from running the benchmark, not
    from tests); what is checked is that the printed speed-up is their ratio and the memory order."""
    assert main(["bench", "ops", "--case", "layer_norm", "--repeat", "1", "--memory"]) == 0
    out = capsys.readouterr().out
    line = next(l for l in out.splitlines() if l.strip().startswith("layer_norm"))
    fused, composed, speedup = map(float, re.findall(r"([\d.]+) ms.*?([\d.]+) ms.*?([\d.]+)x", line)[0])
    assert abs(speedup - composed / fused) < 0.02 * speedup
    peak_fused, peak_composed = map(float, re.findall(r"peak (\d+) vs (\d+) MiB", line)[0])
    assert peak_fused < peak_composed   # the fused op keeps fewer arrays alive


def test_bench_train_smoke(capsys):
    """A smoke test: it runs and reports; tokens/s may be any positive number (figures belong to
    benchmarks, measured on a quiet machine)."""
    assert run(["bench", "train", "--n-layer", "1", "--n-head", "2", "--d-model", "16", "--context", "16",
                "--vocab-size", "50", "--batch-size", "2", "--steps", "2", "--warmup", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["config"]["n_layer"] == 1 and result["config"]["vocab_size"] == 50
    assert result["tokens_per_s"] > 0 and result["peak_rss_mib"] > 10
    assert result["ms_per_step_min"] <= result["ms_per_step_mean"]
    assert "argument --steps: expected a positive integer" in usage_error(["bench", "train", "--steps", "0"], capsys)


def test_bench_generate_smoke(capsys):
    """A smoke test for the speeds (any positive number: figures belong to benchmarks); the tokens
    of both ways must be the same."""
    assert main(["bench", "generate", "--preset", "tiny", "--new-tokens", "8", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["same_tokens"] is True
    assert result["cache_tokens_per_s"] > 0 and result["no_cache_tokens_per_s"] > 0
    assert result["speedup"] == pytest.approx(result["cache_tokens_per_s"] / result["no_cache_tokens_per_s"])


def test_bench_generate_shows_progress_on_a_terminal(monkeypatch, capsys):
    """A minute of silence on a laptop CPU for gpt2-124m before; now a bar per way of generating,
    counted by token, on stderr when it is a terminal (never in --json's stdout)."""
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert main(["bench", "generate", "--preset", "tiny", "--new-tokens", "8", "--json"]) == 0
    shown = terminal.getvalue()
    assert "with KV cache" in shown and "without cache" in shown and "0/8 [" in shown     # counted in tokens
    assert json.loads(capsys.readouterr().out)["same_tokens"] is True


def test_bench_tokenizer_arguments_parse():
    from minillm.cli import build_parser

    args = build_parser().parse_args(["bench", "tokenizer", "--memory-mb", "0"])
    assert args.memory_mb == 0 and callable(args.func)


def test_bench_train_timeline_is_checked_before_the_measurement(tmp_path, capsys):
    """--timeline's name and folder are checked before any step is measured (here: before the check that
    --pp 2 has its two processes, which comes with the measurement), not after the whole benchmark."""
    bench = ["bench", "train", "--pp", "2", "--n-layer", "2", "--steps", "1", "--timeline"]
    assert run([*bench, tmp_path / "t.pdf"]) == 2
    assert capsys.readouterr().err == (f"minillm: error: --timeline {tmp_path / 't.pdf'}: the timeline is drawn as "
                                       f"PNG or SVG, so the name must end in .png or .svg\n")
    assert run([*bench, tmp_path / "missing" / "t.png"]) == 2
    assert capsys.readouterr().err == f"minillm: error: {tmp_path / 'missing'}: no such folder to write --timeline into\n"
