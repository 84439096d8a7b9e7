"""No tracebacks, no silent nonsense: each class of mistake, through the real command, ends in one line
``minillm: error: ...`` (or a warning) and the exit code cli.py documents.

Pipes and memory run in a subprocess (``python -m minillm``), as a user's shell would run them; the
rest through ``minillm.cli.main`` with captured output.
"""

import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from minillm.cli import main

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--n-layer", "1", "--n-head", "2", "--d-model", "16", "--context", "16", "--batch-size", "2", "--quiet",
        "--tokenizer", "bytes", "--samples", "0"]


def one_line_error(err: str) -> str:
    """The message of a one-line ``minillm: error: ...`` (and nothing else on stderr)."""
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("minillm: error: "), err
    assert "Traceback" not in err
    return lines[0][len("minillm: error: "):]


def run(argv, capsys, code):
    """``main(argv)`` returns ``code``; returns (stdout, stderr)."""
    assert main([str(a) for a in argv]) == code
    captured = capsys.readouterr()
    return captured.out, captured.err


def python_minillm(*args):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return [sys.executable, "-m", "minillm", *map(str, args)], env


# ------------------------------------------------------------------ broken pipes


def read_a_little_then_close(command, env, stdin=None, nbytes=1):
    """What ``command | head -c N`` does: read N bytes, close the pipe while it still writes."""
    process = subprocess.Popen(command, env=env, stdin=subprocess.PIPE if stdin else None,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if stdin:
        process.stdin.write(stdin)
        process.stdin.close()
    head = process.stdout.read(nbytes)
    process.stdout.close()
    err = process.stderr.read().decode()
    return head, process.wait(timeout=120), err


def test_broken_pipe_is_a_quiet_exit(tmp_path):
    from minillm import manual_seed
    from minillm.models import GPT, GPTConfig
    from minillm.tokenizer import BPETokenizer
    from minillm.weights import save_hf_gpt2

    # tokenizer encode ... | head -c 20: the ids of 200 kB of text (far more than a pipe buffers)
    text = tmp_path / "big.txt"
    text.write_text("hello world " * 20_000, encoding="utf-8")
    command, env = python_minillm("tokenizer", "encode", "--tokenizer", "bytes", text)
    head, code, err = read_a_little_then_close(command, env, nbytes=20)
    assert head == b"104 101 108 108 111 " and code == 141 and err == ""

    # generate ... | head -c 1: the reader leaves after the prompt, the tokens keep coming
    manual_seed(0)
    save_hf_gpt2(GPT(GPTConfig(vocab_size=257, context_length=512, n_layer=1, n_head=2, d_model=16)), tmp_path / "hf")
    BPETokenizer.bytes(special_tokens=["<|endoftext|>"]).save(tmp_path / "tok.json")
    command, env = python_minillm("generate", "--hf-gpt2", tmp_path / "hf", "--tokenizer", tmp_path / "tok.json",
                                  "--prompt", "hi", "--max-new-tokens", "400", "--ignore-eos", "--seed", "0")
    head, code, err = read_a_little_then_close(command, env)
    assert head == b"h" and code == 141 and err == ""


# ------------------------------------------------------------------ impossible allocations


def test_impossible_batch_is_one_line_before_any_work(tmp_path):
    command, env = python_minillm("train", "--batch-size", "100000000", "--out", tmp_path / "run")
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    message = one_line_error(result.stderr)
    assert result.returncode == 1
    assert message.startswith("out of memory (a micro-batch of --batch-size 100000000 x --context 128 needs at least")
    assert not (tmp_path / "run").exists()


def test_numpy_memory_error_is_one_line():
    # no early check in bench train: NumPy itself refuses the 8 TiB of batch indices
    command, env = python_minillm("bench", "train", "--n-layer", "1", "--n-head", "1", "--d-model", "8",
                                  "--context", "8", "--batch-size", str(10**12), "--steps", "1", "--warmup", "0")
    # a cap on the address space makes the refusal certain, also where the kernel overcommits
    limit = lambda: resource.setrlimit(resource.RLIMIT_AS, (16 << 30, 16 << 30))  # noqa: E731
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, preexec_fn=limit)
    message = one_line_error(result.stderr)
    assert result.returncode == 1
    assert message.startswith("out of memory (unable to allocate") and "try a smaller --batch-size" in message


def test_a_diverging_run_is_one_line_without_numpy_warnings(tmp_path, text_file):
    # --lr 1e4 without clipping: the loss overflows within a few steps, and NumPy warns on its way there
    command, env = python_minillm("train", "--data", text_file, *TINY, "--steps", "50", "--lr", "1e4", "--clip", "0",
                                  "--warmup", "0", "--checkpoint-interval", "1", "--out", tmp_path / "run")
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    message = one_line_error(result.stderr.split("\n", 1)[1])      # after the model: line
    assert message.startswith("training diverged at step ") and "Try a lower --lr" in message


# ------------------------------------------------------------------ file-system mistakes


def test_file_system_mistakes_are_one_line(tmp_path, text_file, capsys):
    a_file, a_folder = tmp_path / "taken.txt", tmp_path / "folder"
    a_file.write_text("x", encoding="utf-8")
    a_folder.mkdir()
    _, err = run(["train", "--data", text_file, *TINY, "--steps", "1", "--out", a_file], capsys, 2)
    assert one_line_error(err) == f"--out {a_file} is a file; a run directory is a folder"
    _, err = run(["tokenizer", "train", "--input", a_folder, "--vocab-size", "300", "--out", tmp_path / "t.json"],
                 capsys, 2)
    assert one_line_error(err).startswith(f"{a_folder}: --input wants text files, and this is a folder")
    _, err = run(["tokenizer", "train", "--input", text_file, "--vocab-size", "300", "--out", a_folder], capsys, 2)
    assert one_line_error(err) == f"{a_folder}: --out names a folder; give a file name, e.g. {a_folder / 'tokenizer.json'}"
    _, err = run(["tokenizer", "encode", "--tokenizer", "bytes", a_folder], capsys, 2)
    assert one_line_error(err) == f"{a_folder}: is a directory"
    assert not (tmp_path / "t.json").exists()

    # a folder as --tokenizer (a run directory, GPT-2's files): the message says what to give instead
    from minillm.tokenizer import BPETokenizer

    BPETokenizer.bytes().save(a_folder / "tokenizer.json")
    _, err = run(["tokenizer", "encode", "--tokenizer", a_folder, a_file], capsys, 2)
    assert one_line_error(err) == (f"tokenizer {str(a_folder)!r} is a folder: give the tokenizer file in it, "
                                   f"{a_folder / 'tokenizer.json'}")
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "encoder.json").write_text("{}", encoding="utf-8")
    _, err = run(["train", "--data", text_file, *TINY, "--steps", "1", "--tokenizer", gpt2, "--out", tmp_path / "r"],
                 capsys, 2)
    assert one_line_error(err) == f"tokenizer {str(gpt2)!r} is a folder: for GPT-2's encoder.json and vocab.bpe in it, use gpt2:{gpt2}"
    assert not (tmp_path / "r").exists()


def as_an_ordinary_user(command):
    """``command`` without root's power to write anywhere (root ignores a folder's permissions)."""
    if os.geteuid() != 0:
        return command
    drop = [shutil.which("setpriv") or "setpriv", "--bounding-set=-dac_override,-dac_read_search"]
    if subprocess.run([*drop, "true"], capture_output=True).returncode != 0:
        pytest.skip("running as root, and setpriv cannot drop root's override of folder permissions")
    return [*drop, *command]


def test_an_output_folder_without_write_permission_is_refused_before_the_work(tmp_path, text_file):
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    read_only.chmod(0o555)
    command, env = python_minillm("tokenizer", "train", "--input", text_file, "--vocab-size", "300",
                                  "--out", read_only / "tok.json")                # progress bars on
    result = subprocess.run(as_an_ordinary_user(command), env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert one_line_error(result.stderr) == (f"{read_only / 'tok.json'}: permission denied: --out cannot be "
                                             f"written into {read_only}")    # no training first, no tok.json.tmp


# ------------------------------------------------------------------ run folders


def test_failed_run_leaves_no_folder_and_runs_never_share_one(tmp_path, text_file, capsys):
    short = tmp_path / "short.txt"
    short.write_text("too short\n", encoding="utf-8")
    _, err = run(["train", "--data", short, *TINY, "--steps", "1", "--out", tmp_path / "runs" / "a"], capsys, 2)
    assert "too few for one window" in one_line_error(err)
    assert not (tmp_path / "runs").exists()                      # neither the run folder nor its parent

    mine = tmp_path / "mine"                                     # the user's own folder stays, as it was
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me", encoding="utf-8")
    _, err = run(["train", "--data", short, *TINY, "--steps", "1", "--out", mine], capsys, 2)
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]

    run_dir = tmp_path / "run"
    run(["train", "--data", text_file, *TINY, "--steps", "2", "--out", run_dir], capsys, 0)
    metrics = (run_dir / "metrics.jsonl").read_text(encoding="utf-8")
    _, err = run(["train", "--data", text_file, *TINY, "--steps", "3", "--lr", "0.01", "--out", run_dir], capsys, 2)
    assert one_line_error(err).startswith(f"{run_dir} already holds a run (metrics.jsonl, run.json, "
                                          f"checkpoint.json): add --resume")
    assert (run_dir / "metrics.jsonl").read_text(encoding="utf-8") == metrics      # nothing appended
    steps = [json.loads(line)["step"] for line in metrics.splitlines() if '"train"' in line]
    assert steps == [1, 2]


# ------------------------------------------------------------------ checks before the work


def test_checks_come_before_the_work(tmp_path, text_file, capsys):
    long_prompt = "word " * 20                                   # 100 byte tokens, context 16
    out, err = run(["train", "--data", text_file, *TINY[:-2], "--samples", "1", "--prompt", long_prompt,
                    "--out", tmp_path / "run"], capsys, 2)
    assert one_line_error(err) == (f"--prompt {long_prompt!r} is 100 tokens, and the model's context is 16: "
                                   f"give a shorter prompt or a larger --context")
    assert out == "" and not (tmp_path / "run").exists()         # failed before training, nothing written

    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--run", str(tmp_path), "--prompt", "hi", "--seed", "-1"])
    captured = capsys.readouterr()
    assert exit_info.value.code == 2 and captured.out == ""
    assert "argument --seed: expected an integer >= 0, got -1" in captured.err


# ------------------------------------------------------------------ degenerate requests


def test_degenerate_requests_are_refused_or_warned(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "ops", "--repeat", "0"])
    assert exit_info.value.code == 2
    assert "argument --repeat: expected a positive integer, got 0" in capsys.readouterr().err

    empty, small = tmp_path / "empty.txt", tmp_path / "small.txt"
    empty.write_text("", encoding="utf-8")
    small.write_text("ab ab ab\n", encoding="utf-8")
    _, err = run(["tokenizer", "train", "--input", empty, "--vocab-size", "300", "--out", tmp_path / "e.json"],
                 capsys, 2)
    assert one_line_error(err) == f"nothing to learn from: {empty} is empty"
    assert not (tmp_path / "e.json").exists()
    _, err = run(["tokenizer", "train", "--input", small, "--vocab-size", "1000", "--out", tmp_path / "s.json",
                  "--quiet"], capsys, 0)
    assert ("minillm: warning: the text has too few distinct pairs to merge: the vocabulary stopped at 258 tokens "
            "(2 merges), not the 1000 asked for") in err


def test_a_pipeline_schedule_without_a_pipeline_is_refused(tmp_path, text_file, capsys):
    """--schedule only means something with --pp 2 or more; it was silently ignored."""
    _, err = run(["train", "--data", text_file, *TINY, "--schedule", "gpipe", "--out", tmp_path / "run"], capsys, 2)
    assert one_line_error(err) == "--schedule gpipe picks a pipeline schedule: it needs --pp 2 or more"
    assert not (tmp_path / "run").exists()
    _, err = run(["bench", "train", "--schedule", "1f1b", "--steps", "1"], capsys, 2)
    assert one_line_error(err) == "--schedule 1f1b picks a pipeline schedule: it needs --pp 2 or more"


# ------------------------------------------------------------------ text that is not UTF-8


def test_text_that_is_not_utf8_names_its_file_in_one_line(tmp_path, capsys, monkeypatch):
    import io

    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café au lait\n".encode("latin-1") * 50)        # é is the byte 0xe9, at offset 3
    reason = "byte 0xe9 at offset 3: invalid continuation byte); convert it to UTF-8 first"
    _, err = run(["tokenizer", "encode", "--tokenizer", "bytes", latin1], capsys, 2)
    assert one_line_error(err) == f"{latin1}: not UTF-8 text ({reason}"

    # standard input as Python opens it (surrogateescape): the bytes must not travel on as surrogates
    stdin = io.TextIOWrapper(io.BytesIO(latin1.read_bytes()), encoding="utf-8", errors="surrogateescape")
    monkeypatch.setattr("sys.stdin", stdin)
    _, err = run(["tokenizer", "encode", "--tokenizer", "bytes"], capsys, 2)
    assert one_line_error(err) == f"standard input: not UTF-8 text ({reason}"

    ids = tmp_path / "ids.txt"
    ids.write_bytes(b"104 105 \xff")
    _, err = run(["tokenizer", "decode", "--tokenizer", "bytes", ids], capsys, 2)
    assert one_line_error(err).startswith(f"{ids}: not UTF-8 text (byte 0xff at offset 8: invalid start byte)")

    _, err = run(["tokenizer", "train", "--input", latin1, "--vocab-size", "300", "--out", tmp_path / "t.json",
                  "--quiet"], capsys, 2)
    assert one_line_error(err) == (f"{latin1}: not UTF-8 text (byte 0xe9: invalid continuation byte); "
                                   f"convert it to UTF-8 first")
    assert not (tmp_path / "t.json").exists()

    utf8 = tmp_path / "utf8.txt"                                        # the same text in UTF-8 is fine
    utf8.write_text("café au lait\n", encoding="utf-8")
    out, _ = run(["tokenizer", "encode", "--tokenizer", "bytes", utf8], capsys, 0)
    assert out.split() == [str(b) for b in "café au lait\n".encode("utf-8")]


# ------------------------------------------------------------------ messages in the user's words


def test_messages_are_in_the_users_words(tmp_path, text_file, capsys, monkeypatch):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("hello"))
    _, err = run(["tokenizer", "decode", "--tokenizer", "bytes"], capsys, 2)
    assert one_line_error(err) == "expected token ids (integers, separated by spaces, or a JSON list), got 'hello'"
    monkeypatch.setattr("sys.stdin", io.StringIO("[1, 2.5]"))
    _, err = run(["tokenizer", "decode", "--tokenizer", "bytes"], capsys, 2)
    assert one_line_error(err).endswith("got 2.5")
    monkeypatch.setattr("sys.stdin", io.StringIO("300"))
    _, err = run(["tokenizer", "decode", "--tokenizer", "bytes"], capsys, 2)
    assert one_line_error(err) == "token id 300 is not in this tokenizer's vocabulary (ids 0 to 255)"

    from minillm.tokenizer import BPETokenizer

    BPETokenizer.bytes(special_tokens=["<|endoftext|>"]).save(tmp_path / "tok.json")
    monkeypatch.setattr("sys.stdin", io.StringIO("a<|endoftext|>"))
    _, err = run(["tokenizer", "encode", "--tokenizer", tmp_path / "tok.json"], capsys, 2)
    message = one_line_error(err)
    assert "--allowed-special all" in message and "--allowed-special none" in message
    assert "allowed_special=" not in message

    run_dir = tmp_path / "run"                                   # a checkpoint replaced by garbage
    run(["train", "--data", text_file, *TINY, "--steps", "1", "--out", run_dir], capsys, 0)
    arrays = next((run_dir / "checkpoints").glob("*.npz"))
    np.savez(arrays, weights=np.array([object()], dtype=object))
    _, err = run(["generate", "--run", run_dir, "--prompt", "To"], capsys, 2)
    message = one_line_error(err)
    assert "is not a minillm checkpoint" in message and "pickle" not in message


def test_library_messages_are_in_the_users_words():
    import minillm as mm
    from minillm import functional as F
    from minillm.models import GPT, GPTConfig
    from minillm.optim import SGD, AdamW
    from minillm.tokenizer import BPETokenizer

    with pytest.raises(TypeError, match=r"^softmax: needs floating-point tensors, got dtype int64; convert first"):
        F.softmax(mm.Tensor(np.array([1, 2, 3])))
    with pytest.raises(TypeError, match="^layernorm: needs floating-point tensors"):
        F.layer_norm(mm.Tensor(np.ones((2, 3), dtype=np.int64)), mm.Tensor(np.ones(3)), mm.Tensor(np.zeros(3)))
    model = GPT(GPTConfig(vocab_size=10, context_length=8, n_layer=1, n_head=1, d_model=8))
    with pytest.raises(ValueError, match=r"token ids of shape \(1, 0\) are empty"):
        model(np.zeros((1, 0), dtype=np.int64))
    tokenizer = BPETokenizer.bytes()
    with pytest.raises(TypeError, match=r"^encode takes a str of text, got int 12345 \(decode turns ids into text\)"):
        tokenizer.encode(12345)
    with pytest.raises(TypeError, match="^decode takes a sequence of integer token ids, got a str: 'hello'"):
        tokenizer.decode("hello")
    with pytest.raises(ValueError, match=r"^token ids are integers, got 2.5 \(float\)"):
        tokenizer.decode([1, 2.5])
    param = mm.Tensor(np.ones(3, dtype=np.float32), requires_grad=True)
    for bad in (dict(lr=float("nan")), dict(lr=float("inf")), dict(eps=float("nan")), dict(weight_decay=-0.1),
                dict(betas=(0.9, float("nan"))), dict(betas=(1.0, 0.9))):
        with pytest.raises(ValueError, match=f"^AdamW: {next(iter(bad))} must be"):
            AdamW([param], **bad)
    with pytest.raises(ValueError, match=r"^AdamW: lr must be a finite number >= 0, got nan \(parameter group 1\)"):
        AdamW([{"params": [param]}, {"params": [mm.Tensor(np.ones(2), requires_grad=True)], "lr": float("nan")}])
    with pytest.raises(ValueError, match="^SGD: momentum must be"):
        SGD([param], momentum=float("nan"))
