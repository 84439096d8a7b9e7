"""``minillm train``'s promises about Ctrl-C and resuming (docs/training.md §9, §10), through the real
command line: a ``python -m minillm`` process that gets real SIGINTs, and ``minillm.cli.main``."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cli_helpers import run as run_cli

import minillm
from minillm.train import load_checkpoint, read_metrics

ROOT = Path(minillm.__file__).resolve().parents[1]
TINY = ["--tokenizer", "bytes", "--n-layer", "1", "--n-head", "2", "--d-model", "16", "--context", "16",
        "--batch-size", "2", "--eval-interval", "0", "--samples", "0", "--quiet"]

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGINT") or os.name == "nt",
                                reason="sends POSIX SIGINT to a child process")

# `minillm train` whose second training step waits `seconds` (as a long step would) after writing
# `marker`: a real command-line run, with one slow step to press Ctrl-C in.
SLOW_STEP_SCRIPT = """
import sys, time
from pathlib import Path
from minillm.cli import main
from minillm.data.dataset import TokenDataset

marker, seconds, argv = Path(sys.argv[1]), float(sys.argv[2]), sys.argv[3:]
real_get_batch, calls = TokenDataset.get_batch, []

def get_batch(self, split, batch_size, rng=None):
    if split == "train":
        calls.append(split)
        if len(calls) == 2:
            marker.write_text("in step 2")
            time.sleep(seconds)
    return real_get_batch(self, split, batch_size, rng)

TokenDataset.get_batch = get_batch
sys.exit(main(argv))
"""


def start(command, cwd):
    """The command in a child Python; its stdout goes to cwd/stdout.txt (unbuffered, readable while it runs)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "OPENBLAS_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with open(Path(cwd) / "stdout.txt", "w") as stdout:
        return subprocess.Popen([sys.executable, *command], cwd=cwd, env=env, text=True,
                                stdout=stdout, stderr=subprocess.PIPE)


def wait_until(condition, process, what, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"the run ended (status {process.returncode}) before {what}:\n{process.communicate()[1]}")
        if time.monotonic() > deadline:
            process.kill()
            process.communicate()
            pytest.fail(f"no sign, after {timeout} s, that {what}")
        time.sleep(0.02)


def finish(process, timeout):
    """The process's stderr, once it has ended."""
    try:
        return process.communicate(timeout=timeout)[1]
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        pytest.fail(f"the process was still running {timeout} s after Ctrl-C")


def test_ctrl_c_saves_a_checkpoint_and_exits_with_status_130(tmp_path, text_file):
    run = tmp_path / "run"
    process = start(["-m", "minillm", "train", "--data", str(text_file), *TINY, "--steps", "1000000",
                     "--checkpoint-interval", "0", "--out", str(run)], tmp_path)
    wait_until(lambda: read_metrics(run, "train"), process, "the first step was logged")
    process.send_signal(signal.SIGINT)
    err = finish(process, timeout=60)
    assert process.returncode == 130, err
    assert "Traceback" not in err
    steps = [r["step"] for r in read_metrics(run, "train")]
    assert steps == list(range(1, len(steps) + 1))
    assert load_checkpoint(run).step == steps[-1] >= 1             # saved at the step it stopped at
    assert f"stopped at step {steps[-1]}; continue with: minillm train --resume {run}" in err


def test_second_ctrl_c_stops_at_once(tmp_path, text_file):
    """The first Ctrl-C lets the step in flight finish; a second one must not wait for it (here
    it would take 60 s), nor save: the process ends at once with status 130, the checkpoint of
    step 1 intact."""
    run, marker = tmp_path / "run", tmp_path / "in-step-2"
    process = start(["-c", SLOW_STEP_SCRIPT, str(marker), "60", "train", "--data", str(text_file), *TINY,
                     "--steps", "10", "--checkpoint-interval", "1", "--out", str(run)], tmp_path)
    wait_until(marker.exists, process, "step 2 began")
    process.send_signal(signal.SIGINT)
    first_seen = lambda: "Ctrl-C: finishing this step" in (tmp_path / "stdout.txt").read_text()  # noqa: E731
    wait_until(first_seen, process, "the first Ctrl-C was handled", timeout=30)   # two presses, not one signal
    process.send_signal(signal.SIGINT)
    start_time = time.monotonic()
    err = finish(process, timeout=20)
    assert time.monotonic() - start_time < 15
    assert process.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert [r["step"] for r in read_metrics(run, "train")] == [1]  # step 2 never finished
    assert load_checkpoint(run).step == 1


def test_resume_refuses_other_data_and_names_the_option(tmp_path, text_file, capsys):
    other = tmp_path / "other.txt"
    other.write_text("Now is the winter of our discontent.\n" * 40, encoding="utf-8")
    run = tmp_path / "run"
    assert run_cli(["train", "--data", text_file, *TINY, "--steps", "2", "--out", run]) == 0
    capsys.readouterr()
    assert run_cli(["train", "--resume", run, "--data", other, "--steps", "4"]) == 2
    err = capsys.readouterr().err
    assert f"cannot change --data when resuming {run}: the run used {[str(text_file)]!r}" in err
    assert [r["step"] for r in read_metrics(run, "train")] == [1, 2] and load_checkpoint(run).step == 2
    # the same --data again is no change
    assert run_cli(["train", "--resume", run, "--data", text_file, "--steps", "3", "--quiet"]) == 0
    assert "resuming" in capsys.readouterr().err
    assert load_checkpoint(run).step == 3


def test_a_second_run_on_a_folder_in_use_stops_at_once(tmp_path, text_file, capsys):
    """Two runs never write into one folder at the same time (their metrics would interleave, each
    overwriting the other's checkpoint): not two new runs started together, not a --resume of a run
    still going. The folder is locked while a run holds it, and free again when that process ends."""
    shared = tmp_path / "shared"
    both = [start(["-m", "minillm", "train", "--data", str(text_file), *TINY, "--steps", "300", "--seed", str(seed),
                   "--out", str(shared)], tmp_path) for seed in (1, 2)]
    errors = [finish(process, timeout=120) for process in both]
    assert sorted(process.returncode for process in both) == [0, 2], errors
    refused = errors[[process.returncode for process in both].index(2)]
    assert "Traceback" not in refused and refused.startswith(f"minillm: error: {shared} ")
    assert [r["step"] for r in read_metrics(shared, "train")] == list(range(1, 301))   # one run's steps, once

    run = tmp_path / "run"
    process = start(["-m", "minillm", "train", "--data", str(text_file), *TINY, "--steps", "1000000",
                     "--checkpoint-interval", "1", "--out", str(run)], tmp_path)
    wait_until(lambda: (run / "checkpoint.json").exists(), process, "the first checkpoint was saved")
    assert run_cli(["train", "--resume", run, "--steps", "2000000", "--quiet"]) == 2
    assert capsys.readouterr().err == (f"minillm: error: {run} is in use by another minillm run: wait until it ends "
                                       f"(or stop it), or choose another --out\n")
    process.send_signal(signal.SIGINT)
    assert "Traceback" not in finish(process, timeout=60) and process.returncode == 130
    steps = [r["step"] for r in read_metrics(run, "train")]
    assert steps == list(range(1, len(steps) + 1))                 # no steps of the refused resume among them
    assert run_cli(["train", "--resume", run, "--steps", steps[-1] + 1, "--quiet"]) == 0   # free again
    assert load_checkpoint(run).step == steps[-1] + 1
