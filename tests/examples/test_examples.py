"""Smoke tests: every numbered example runs, on a reduced setting, and returns a sensible number."""

import ast
import importlib.util
import math
from pathlib import Path

import pytest
from example_helpers import ctrl_c_after_step

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def load(name: str):
    """Import examples/<name>.py as a module (file names start with digits, so not via `import`)."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_01_autograd(capsys):
    loss = load("01_autograd").main(["--steps", "30"])
    assert math.isfinite(loss) and loss < math.log(2)   # better than guessing between the two moons
    out = capsys.readouterr().out
    assert "accuracy" in out
    # the graph it draws is the trained MLP's: 3 Linear, 2 GELU, the 6 parameters as leaves, nothing else
    graph = out[out.index("the graph of the loss"):]
    assert graph.count("Linear ->") == 3 and graph.count("GELU ->") == 2 and graph.count("CrossEntropy ->") == 1
    assert graph.count("[requires grad]") == 6 and "GetItem" not in graph
    # README: "an MLP on the engine alone": tensors and ops, no nn layers and no optim (SGD by hand)
    tree = ast.parse((EXAMPLES / "01_autograd.py").read_text(encoding="utf-8"))
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {f"{node.module}.{alias.name}" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                 for alias in node.names}
    assert imported == {"argparse", "numpy", "minillm", "minillm.functional"}


def test_02_tokenizer(capsys):
    load("02_tokenizer").main([])
    assert "saved and reloaded" in capsys.readouterr().out


def test_03_attention():
    difference = load("03_attention").main([])
    assert difference < 1e-5   # the layer equals the step-by-step computation


def test_04_gpt(capsys):
    loss = load("04_gpt").main(["--preset", "tiny", "--batch", "2", "--time", "8"])
    assert loss == pytest.approx(math.log(256), abs=0.3)   # a fresh model is maximally unsure
    out = capsys.readouterr().out
    from minillm.models import GPT, GPTConfig

    cfg = GPTConfig.from_preset("tiny")
    counted = sum(p.size for p in GPT(cfg).parameters())  # "count the parameters against the formula"
    C, V, L = cfg.d_model, cfg.vocab_size, cfg.context_length
    assert counted == V * C + L * C + cfg.n_layer * (12 * C * C + 13 * C) + 2 * C
    assert f"parameters: {counted:,} (formula: {counted:,})" in out
    n = len(list(GPT(cfg).parameters()))
    assert f"parameters with a gradient: {n} of {n}" in out   # "every parameter gets a gradient"


def test_05_pretrain_shakespeare(tmp_path, capsys):
    text = tmp_path / "play.txt"
    text.write_text("ROMEO:\nBut soft, what light through yonder window breaks?\n\n" * 60, encoding="utf-8")
    argv = ["--data", text, "--steps", "30", "--n-layer", "1", "--n-head", "2", "--d-model", "32", "--context", "32",
            "--eval-interval", "10", "--eval-batches", "2", "--out", tmp_path / "run", "--quiet"]
    val_loss = load("05_pretrain_shakespeare").main([str(a) for a in argv])
    out = capsys.readouterr().out
    assert "val loss on all" in out and "ROMEO:" in out
    assert val_loss < math.log(256) - 0.5   # 30 small steps on one repeated line already beat uniform
    assert (tmp_path / "run" / "checkpoint.json").is_file()


def test_05_ctrl_c_saves_stops_and_resumes(tmp_path, capsys):
    """Ctrl-C: the step ends, a checkpoint is saved, the example stops (exit 130, no evaluation, no sample)
    and says how to continue; --resume finishes the run, a run directory `minillm generate --run` reads."""
    import json

    from minillm.train.run import load_run

    text = tmp_path / "play.txt"
    text.write_text("ROMEO:\nBut soft, what light through yonder window breaks?\n\n" * 60, encoding="utf-8")
    run = tmp_path / "run"
    argv = [str(a) for a in ["--data", text, "--steps", "12", "--n-layer", "1", "--n-head", "2", "--d-model", "16",
                             "--context", "16", "--eval-interval", "0", "--out", run, "--quiet"]]
    example = load("05_pretrain_shakespeare")

    example.Trainer = ctrl_c_after_step(example.Trainer, 5)   # Ctrl-C mid-run
    with pytest.raises(SystemExit) as stopped:
        example.main(argv)
    assert stopped.value.code == 130
    out, err = capsys.readouterr()
    assert "val loss on all" not in out and "ROMEO:" not in out and "--resume" in err
    assert json.loads((run / "checkpoint.json").read_text())["step"] == 5
    val_loss = example.main(argv + ["--resume"])
    assert "resuming at step 5" in capsys.readouterr().out and math.isfinite(val_loss)
    assert json.loads((run / "checkpoint.json").read_text())["step"] == 12
    model, tokenizer = load_run(run)
    assert tokenizer.vocab_size == 256 and tokenizer.decode(tokenizer.encode("ROMEO:")) == "ROMEO:"
    with pytest.raises(SystemExit, match="already at step 12 of 12"):
        example.main(argv + ["--resume"])
    with pytest.raises(SystemExit, match="^--resume: .*model config differs.*d_model: checkpoint has 16, given 32"):
        example.main(argv + ["--resume", "--steps", "20", "--d-model", "32"])   # not the run's sizes: one line


def test_05_device_cuda_without_a_gpu(tmp_path, capsys):
    """--device cuda where there is no CuPy: one line before the data is read, and no run directory left."""
    if importlib.util.find_spec("cupy") is not None:
        pytest.skip("CuPy is installed: whether CUDA works is then the GPU tests' business")
    (tmp_path / "t.txt").write_text("abc" * 100, encoding="utf-8")
    with pytest.raises(SystemExit) as refused:
        load("05_pretrain_shakespeare").main(["--device", "cuda", "--data", str(tmp_path / "t.txt"),
                                              "--out", str(tmp_path / "run")])
    out, err = capsys.readouterr()
    assert refused.value.code == 2 and out == "" and "CUDA is not available" in err.splitlines()[-1]
    assert not (tmp_path / "run").exists()


def test_06_generate_smoke(capsys):
    speedup = load("06_generate").main(["--new-tokens", "16"])
    assert speedup > 0          # any number: a smoke test (the KV cache's speed-up is a benchmark figure)
    out = capsys.readouterr().out
    assert "seed 42 twice" in out and "eos_id=" in out


def test_06_run_option(tmp_path, capsys):
    """--run samples from a run directory; a wrong one is one line (exit 2) before any work."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "finetune"))
    from finetune_helpers import make_base_run

    example = load("06_generate")
    with pytest.raises(SystemExit) as wrong:
        example.main(["--run", str(tmp_path / "missing")])
    assert wrong.value.code == 2
    out, err = capsys.readouterr()
    assert out == "" and f"--run {tmp_path / 'missing'}: no run directory" in err
    example.main(["--new-tokens", "4", "--run", str(make_base_run(tmp_path / "run")), "--prompt", "a<|endoftext|>b"])
    out = capsys.readouterr().out
    assert out.count("--- {") == 3                         # greedy, top-k, top-p from the run's model
    assert out.count("a<|endoftext|>b") == 3               # the prompt's special token taken as one (no error)


def test_07_gpt2_weights():
    assert load("07_gpt2_weights").main([]) == 0.0   # save_hf_gpt2 -> load_hf_gpt2 gives identical logits


def test_07_gpt2_directory(tmp_path, capsys):
    """A GPT-2 directory: loaded and continued; a wrong one is one line (exit 2) before any work."""
    example = load("07_gpt2_weights")
    with pytest.raises(SystemExit) as wrong:
        example.main([str(tmp_path)])
    assert wrong.value.code == 2
    out, err = capsys.readouterr()
    assert out == "" and f"{tmp_path}: no config.json" in err
    if not (example.SHARED_GPT2 / "encoder.json").is_file():
        pytest.skip("GPT-2's tokenizer files are not in ../shared/data/gpt2")
    import minillm as mm
    from minillm.models import GPT, GPTConfig
    from minillm.weights import save_hf_gpt2

    mm.manual_seed(0)
    save_hf_gpt2(GPT(GPTConfig.from_preset("tiny", vocab_size=50257)), tmp_path / "gpt2")   # GPT-2's vocabulary
    example.main([str(tmp_path / "gpt2"), "--prompt", "Hello", "--max-new-tokens", "3"])
    out = capsys.readouterr().out
    example.SHARED_GPT2 = tmp_path / "no-shared-data"        # no tokenizer anywhere: said, in its words
    with pytest.raises(SystemExit) as no_tokenizer:
        example.main([str(tmp_path / "gpt2")])
    err = capsys.readouterr().err
    assert no_tokenizer.value.code == 2 and "has no tokenizer files" in err
    assert "--tokenizer" not in err                          # an option of minillm's commands, not of example 07
    C, V, L, n_layer = 32, 50257, 64, 2                      # tiny's shape: V·C + L·C + n(12C² + 13C) + 2C
    assert f"{V * C + L * C + n_layer * (12 * C * C + 13 * C) + 2 * C:,} parameters" in out and "\nHello" in out


def test_12_llama_style(tmp_path, capsys):
    text = tmp_path / "play.txt"
    text.write_text("ROMEO:\nBut soft, what light through yonder window breaks?\n\n" * 60, encoding="utf-8")
    results = load("12_llama_style").main(["--steps", "20", "--data", str(text), "--n-layer", "1", "--n-head", "2",
                                           "--d-model", "32", "--context", "32", "--eval-interval", "10",
                                           "--eval-batches", "2"])
    assert results["rope_offset_difference"] < 1e-12 and results["gqa_cache_ratio"] == 2
    assert results["round_trip_difference"] == 0.0
    losses = {arch: loss for arch, (loss, _) in results["training"].items()}
    assert set(losses) == {"gpt2", "llama"} and all(loss < math.log(256) - 0.5 for loss in losses.values())
    out = capsys.readouterr().out
    assert "gpt2: " in out and "llama: " in out and "same parameter count" in out


def test_12_progress_and_ctrl_c(tmp_path, capsys, monkeypatch):
    """Step 4 shows example 5's progress (no minutes of silence); Ctrl-C stops it (exit 130) and says that
    its temporary run is gone, so example 5's 'continue with --resume' does not apply."""
    import minillm.train

    text = tmp_path / "play.txt"
    text.write_text("ROMEO:\nBut soft, what light through yonder window breaks?\n\n" * 60, encoding="utf-8")
    argv = ["--steps", "6", "--data", str(text), "--n-layer", "1", "--n-head", "2", "--d-model", "16",
            "--context", "16", "--eval-interval", "3", "--eval-batches", "1"]
    monkeypatch.setattr(minillm.train, "Trainer", ctrl_c_after_step(minillm.train.Trainer, 3))   # 5 imports it
    with pytest.raises(SystemExit) as stopped:
        load("12_llama_style").main(argv)
    assert stopped.value.code == 130
    out, err = capsys.readouterr()
    assert "4. example 5's recipe" in out and "step 3: train loss" in out and "training:" in err  # its bar
    assert err.rstrip().endswith("nothing to resume (example 5 with --arch and --out keeps a run)")


def test_13_pipeline(tmp_path, capsys):
    import importlib.util

    plot = importlib.util.find_spec("matplotlib") is not None   # the timeline needs the plot extra
    timeline = ["--timeline", str(tmp_path / "pipe.png")] if plot else []
    difference = load("13_pipeline").main(["--steps", "3", "--micro-batches", "4", *timeline])
    assert difference < 1e-6                   # GPipe and 1F1B take one process's steps
    out = capsys.readouterr().out
    assert "micro-batches held per stage: [2, 1]" in out   # 1F1B: at most P - s on stage s
    assert not plot or (tmp_path / "pipe.png").stat().st_size > 0


def test_14_data_parallel(capsys):
    example = load("14_data_parallel")
    difference = example.main(["--steps", "5"])
    assert difference < 1e-6                   # DP=2 takes one process's steps
    assert "wte.weight" in capsys.readouterr().out
    # the docstring's order: final norm and last block first, embeddings last (wte, tied to the head, the very last)
    order = example.gradient_order()
    blocks = [int(name.split(".")[1]) for name in order if name.startswith("h.")]
    assert order[:2] == ["ln_f.weight", "ln_f.bias"] and blocks == sorted(blocks, reverse=True)
    assert order[-2:] == ["wpe.weight", "wte.weight"]


def test_15_tensor_parallel(capsys):
    difference = load("15_tensor_parallel").main(["--steps", "5"])
    assert difference < 1e-6
    out = capsys.readouterr().out
    assert "gradcheck passed" in out and "(96, 32)" in out


BAD_OPTIONS = {   # example -> a wrong value of one of its options (each is refused by its parser, exit 2)
    "01_autograd": ["--steps", "-1"], "02_tokenizer": ["--vocab-size", "512"], "03_attention": ["--heads", "3"],
    "04_gpt": ["--preset", "llama-tiny"], "05_pretrain_shakespeare": ["--d-model", "30"],
    "06_generate": ["--new-tokens", "0"], "07_gpt2_weights": ["--max-new-tokens", "0"],
    "08_classify_spam": ["--epochs", "0"], "09_instruction_sft": ["--lr", "0"], "10_lora": ["--rank", "0"],
    "11_dpo": ["--beta", "0"], "12_llama_style": ["--steps", "-1"], "13_pipeline": ["--stages", "5"],
    "14_data_parallel": ["--steps", "0"], "15_tensor_parallel": ["--steps", "0"],
}


@pytest.mark.parametrize("name", sorted(BAD_OPTIONS))
def test_a_wrong_option_is_one_line_before_any_work(name, tmp_path, capsys):
    assert sorted(BAD_OPTIONS) == sorted(p.stem for p in EXAMPLES.glob("[0-9][0-9]_*.py"))   # every example
    argv = BAD_OPTIONS[name]
    if name == "05_pretrain_shakespeare":        # a model that does not fit, said before the data is read
        (tmp_path / "t.txt").write_text("abc" * 100, encoding="utf-8")
        argv = argv + ["--data", str(tmp_path / "t.txt"), "--out", str(tmp_path / "run")]
    with pytest.raises(SystemExit) as refused:
        load(name).main(argv)
    out, err = capsys.readouterr()
    assert refused.value.code == 2 and out == ""
    assert "error: " in err.splitlines()[-1] and "Traceback" not in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", ["13_pipeline", "14_data_parallel", "15_tensor_parallel"])
def test_multi_process_examples_say_they_need_fork(name, monkeypatch, capsys):
    """Where processes cannot be forked (Windows), the CPU-rank examples say so in one line, before any work."""
    import multiprocessing

    monkeypatch.setattr(multiprocessing, "get_all_start_methods", lambda: ["spawn"])
    with pytest.raises(SystemExit, match="forked processes, which needs Linux or macOS"):
        load(name).main([])
    assert capsys.readouterr().out == ""
