"""``minillm train`` through ``minillm.cli.main``."""

import json

import pytest

from cli_helpers import run, usage_error

from minillm.train import load_checkpoint, read_metrics

TINY = ["--n-layer", "1", "--n-head", "2", "--d-model", "16", "--context", "16", "--batch-size", "2", "--quiet"]


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "argument --steps: expected a positive integer, got 0"),
    (["--steps", "ten"], "argument --steps: expected a positive integer, got 'ten'"),
    (["--tokenizer", "bpe:100"], "argument --tokenizer: bpe:100: the vocabulary needs the 256 bytes"),
    (["--tokenizer", "bpe:big"], "bpe:N needs an integer vocabulary size"),
    (["--device", "tpu"], "argument --device: expected cpu, cuda or cuda:N, got 'tpu'"),
    (["--lr", "-1"], "argument --lr: expected a positive number"),
    (["--dropout", "1.5"], "argument --dropout: expected a probability in [0, 1)"),
    (["--preset", "gpt5"], "argument --preset: unknown preset 'gpt5'"),
    (["--bogus"], "unrecognized arguments: --bogus"),
])
def test_bad_arguments_are_usage_errors(argv, message, capsys):
    assert message in usage_error(["train", *argv], capsys)


def test_inconsistent_arguments_get_one_clear_line(tmp_path, text_file, capsys):
    assert run(["train", "--data", text_file, "--n-head", "3", "--d-model", "16", "--out", tmp_path / "r"]) == 2
    assert "minillm: error: --d-model 16 must be divisible by --n-head 3" in capsys.readouterr().err
    assert run(["train", "--resume"]) == 2
    assert "--resume needs a run directory" in capsys.readouterr().err
    assert run(["train", "--resume", tmp_path / "empty"]) == 2
    assert "no run directory" in capsys.readouterr().err
    assert run(["train", "--data", tmp_path / "missing.txt", "--out", tmp_path / "r2"]) == 2
    assert "missing.txt: no such file or directory" in capsys.readouterr().err
    assert run(["train", "--tokenizer", tmp_path / "nope.json", "--data", text_file, "--out", tmp_path / "r3"]) == 2
    assert "nope.json" in capsys.readouterr().err


def test_tensor_parallel_refusals_come_before_any_work(tmp_path, text_file, capsys):
    """--tp with dropout, or a --tp that does not divide the heads: one line, in the very process that was
    started (no rendezvous waited for, no data read), and no run directory left behind."""
    for extra, message in ((["--dropout", "0.1"], "--tp with dropout > 0 is not supported"),
                           (["--n-head", "3", "--d-model", "48"], "--tp 2 does not divide n_head=3")):
        assert run(["train", "--data", tmp_path / "never-read.txt", "--tp", "2", *extra, "--out", tmp_path / "r"]) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "r").exists()


def test_train_end_to_end_then_resume(tmp_path, text_file, capsys):
    out = tmp_path / "run"
    assert run(["train", "--data", text_file, "--tokenizer", "bytes", *TINY, "--steps", "3", "--out", out,
                "--samples", "2", "--sample-tokens", "5", "--prompt", "To be"]) == 0
    captured = capsys.readouterr()
    assert captured.out.count("--- sample") == 2 and "To be" in captured.out
    assert "done: step 3" in captured.err
    assert load_checkpoint(out).step == 3
    assert load_checkpoint(out).metadata["tokenizer"] == {"spec": "bytes", "file": "tokenizer.json"}
    assert {p.name for p in out.iterdir()} >= {"checkpoint.json", "metrics.jsonl", "run.json", "tokenizer.json",
                                               "tokens.bin"}

    # the same --out again without --resume would overwrite a run
    assert run(["train", "--data", text_file, "--tokenizer", "bytes", *TINY, "--out", out]) == 2
    assert "already holds a run (metrics.jsonl, run.json, checkpoint.json): add --resume" in capsys.readouterr().err
    # resuming cannot change the model or the data ...
    assert run(["train", "--resume", out, "--n-layer", "2"]) == 2
    err = capsys.readouterr().err
    assert "cannot change the model when resuming" in err and "n_layer: checkpoint has 1, given 2" in err
    assert run(["train", "--resume", out, "--tokenizer", "bpe:300"]) == 2
    assert "cannot change --tokenizer" in capsys.readouterr().err
    # ... but can train for longer, with a note when a training option changes what the steps compute
    assert run(["train", "--resume", out, "--steps", "5", "--lr", "5e-4", "--samples", "0", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "resuming" in err and "note: resuming with changed training options" in err
    assert "lr: checkpoint has 0.002, given 0.0005" in err and "steps" not in err.split("note:")[1].split("\n")[0]
    assert [r["step"] for r in read_metrics(out, "train")] == [1, 2, 3, 4, 5]
    assert json.loads((out / "checkpoint.json").read_text())["train_config"]["steps"] == 5
    # a finished run has nothing left to do unless --steps goes further
    assert run(["train", "--resume", out, "--steps", "4", "--quiet"]) == 2
    assert "is already at step 5 (--steps 4): pass a larger --steps" in capsys.readouterr().err


def test_train_on_the_builtin_corpus_with_a_bpe_tokenizer(tmp_path, capsys):
    out = tmp_path / "pydoc"
    assert run(["train", "--tokenizer", "bpe:300", *TINY, "--steps", "2", "--out", out, "--samples", "1",
                "--sample-tokens", "4"]) == 0
    captured = capsys.readouterr()
    assert "trained a BPE tokenizer of 300 tokens" in captured.err
    assert captured.out.count("--- sample") == 1
    assert load_checkpoint(out).metadata["model_config"]["vocab_size"] == 300


def test_train_arch_llama_trains_a_llama_style_model_and_generates_from_it(tmp_path, text_file, capsys):
    """--arch llama with GQA: the checkpoint holds a rotary/RMSNorm/SwiGLU model whose loss went down,
    and `minillm generate --run` continues a prompt with it (KV cache with rotary offsets)."""
    out = tmp_path / "llama"
    argv = ["train", "--data", text_file, "--tokenizer", "bytes", *TINY, "--arch", "llama", "--n-kv-head", "1",
            "--steps", "12", "--lr", "1e-2", "--out", out, "--samples", "0"]
    assert run(argv) == 0
    config = load_checkpoint(out).metadata["model_config"]
    assert {k: config[k] for k in ("positions", "norm", "mlp", "bias", "n_kv_head", "n_head", "qk_norm")} == dict(
        positions="rope", norm="rmsnorm", mlp="swiglu", bias=False, n_kv_head=1, n_head=2, qk_norm=False)
    losses = [r["loss"] for r in read_metrics(out, "train")]
    assert losses[-1] < losses[0] - 0.5
    capsys.readouterr()
    assert run(["generate", "--run", out, "--prompt", "To be", "--max-new-tokens", "5", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("To be")
    assert run(["train", "--resume", out, "--arch", "gpt2"]) == 2           # the architecture is the model's
    assert "cannot change the model when resuming" in capsys.readouterr().err


def test_sizes_given_over_a_preset_shape_its_heads(tmp_path, text_file, capsys):
    """--preset NAME with --d-model / --n-head ("the sizes below override it"): each head gets d_model / n_head
    features of the sizes given, and a preset's plain multi-head attention stays plain; no head_dim or
    key/value head count is left over from the preset's own sizes (a 64-wide model with 32-wide attention,
    or an error about --n-kv-head, an option never given)."""
    for preset, sizes in (("tiny", ["--d-model", "64", "--n-head", "4"]),
                          ("gpt2-124m", ["--n-layer", "1", "--d-model", "32", "--n-head", "4", "--context", "16"])):
        out = tmp_path / preset
        assert run(["train", "--data", text_file, "--tokenizer", "bytes", "--preset", preset, *sizes, "--steps", "1",
                    "--batch-size", "1", "--samples", "0", "--quiet", "--out", out]) == 0, capsys.readouterr().err
        config = load_checkpoint(out).metadata["model_config"]
        assert (config["n_head"], config["n_kv_head"], config["head_dim"]) == (4, 4, config["d_model"] // 4)

    assert run(["bench", "train", "--preset", "gpt2-124m", "--n-layer", "1", "--d-model", "32", "--n-head", "4",
                "--context", "16", "--vocab-size", "50", "--batch-size", "1", "--steps", "1", "--warmup", "0",
                "--json"]) == 0, capsys.readouterr().err
    config = json.loads(capsys.readouterr().out)["config"]
    assert (config["n_head"], config["n_kv_head"], config["head_dim"]) == (4, 4, 8)


def test_a_low_lr_pulls_the_final_lr_down_with_it(tmp_path, text_file, capsys):
    """--lr below the default --min-lr (0.0002), --min-lr not given: the schedule ends at --lr (was: an error
    about min_lr, an option never given; also when lowering the lr of a run on --resume)."""
    out, tiny = tmp_path / "run", ["--data", text_file, "--tokenizer", "bytes", *TINY, "--samples", "0"]
    assert run(["train", *tiny, "--steps", "2", "--lr", "1e-4", "--out", out]) == 0, capsys.readouterr().err
    config = load_checkpoint(out).metadata["train_config"]
    assert (config["lr"], config["min_lr"]) == (1e-4, 1e-4)
    assert [r["lr"] for r in read_metrics(out, "train")] == pytest.approx([1e-4, 1e-4])      # no warmup in 2 steps
    assert run(["train", "--resume", out, "--steps", "3", "--lr", "5e-5", "--quiet"]) == 0, capsys.readouterr().err
    assert read_metrics(out, "train")[-1]["lr"] == pytest.approx(5e-5)
    capsys.readouterr()
    assert run(["train", *tiny, "--steps", "2", "--lr", "1e-3", "--min-lr", "1e-2", "--out", tmp_path / "r2"]) == 2
    assert capsys.readouterr().err == "minillm: error: --min-lr 0.01 is above --lr 0.001\n"
    assert not (tmp_path / "r2").exists()
