"""minillm launch and faults, on the CPU backend: rank-prefixed output, a killed rank stops the job
within the timeout with a clear message, and a checkpoint written before the kill resumes exactly."""

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
from train_helpers import make_config, make_dataset, make_model  # noqa: E402

from minillm.distributed.launch import command_line, rank_environments  # noqa: E402
from minillm.distributed.spawn import free_port  # noqa: E402
from minillm.train import Trainer  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
RUN = dict(steps=10, batch_size=2, grad_accum=2, eval_interval=0, checkpoint_interval=0)

# one rank of a PP=2 run that checkpoints every 3 steps; rank KILL_RANK SIGKILLs itself at step 5
SCRIPT = textwrap.dedent(f"""
    import os, signal, sys
    sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / "tests" / "train")!r}]
    from train_helpers import make_config, make_dataset, make_model
    import minillm as mm
    from minillm.distributed import init_process_group, destroy_process_group
    from minillm.distributed.pipeline import build_stage
    from minillm.distributed.pipeline_trainer import PipelineTrainer

    run_dir, kill_rank = sys.argv[1], int(sys.argv[2])
    group = init_process_group("cpu", timeout=10)
    config = make_model(n_layer=2).config        # the helpers' model shape
    mm.manual_seed(0)                            # make_model's seed: the stage holds its weights
    stage = build_stage(config, group.rank, group.world_size)
    trainer = PipelineTrainer(stage, make_config(**{RUN!r}), make_dataset(), group.comm, run_dir=run_dir)
    while trainer.step < 10:
        loss, _ = trainer.train_step()
        print(f"step {{trainer.step}} loss {{loss:.6f}}", flush=True)
        if trainer.step % 3 == 0:
            trainer.save()
        if group.rank == kill_rank and trainer.step == 5:
            os.kill(os.getpid(), signal.SIGKILL)
    destroy_process_group()
""")


def _launch(tmp_path, kill_rank, nnodes=1, node_rank=0, port=None, nproc=2):
    script = tmp_path / "rank.py"
    script.write_text(SCRIPT)
    command = [sys.executable, "-m", "minillm", "launch", "--nproc-per-node", str(nproc), "--device", "cpu",
               "--nnodes", str(nnodes), "--node-rank", str(node_rank), "--master-port", str(port or free_port()),
               "--", sys.executable, str(script), str(tmp_path / "run"), str(kill_rank)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def _reference_losses():
    trainer = Trainer(make_model(n_layer=2), make_config(**RUN), make_dataset())
    return [trainer.train_step()[0] for _ in range(10)]


def test_launch_prefixes_ranks_and_trains(tmp_path):
    process = _launch(tmp_path, kill_rank=-1)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 0, output
    for rank in (0, 1):
        losses = [float(line.split()[-1]) for line in output.splitlines() if line.startswith(f"[rank {rank}] step")]
        assert losses == pytest.approx(_reference_losses(), rel=1e-6)


def test_killed_rank_stops_the_job_and_the_checkpoint_resumes(tmp_path):
    start = time.monotonic()
    process = _launch(tmp_path, kill_rank=1)
    output, _ = process.communicate(timeout=60)
    assert process.returncode != 0
    # whichever the launcher sees first: the killed rank, or its peer failing on the closed connection
    assert ("[launch] rank 1 exited with code -9: stopping the other ranks" in output
            or ("rank 0: rank 1 closed its connection" in output and "[launch] rank 0 exited with code 1" in output))
    assert time.monotonic() - start < 30
    # the step-3 checkpoint (one ordinary file) resumes on one process, exactly
    trainer = Trainer(make_model(n_layer=2), make_config(**RUN), make_dataset(), run_dir=tmp_path / "run")
    assert trainer.resume() == 3
    resumed = [trainer.train_step()[0] for _ in range(7)]
    assert resumed == pytest.approx(_reference_losses()[3:], rel=1e-6)


def test_survivor_on_another_node_reports_the_dead_peer(tmp_path):
    """Two launchers ("nodes"): nothing kills the survivor for us; its own communicator must notice."""
    port = free_port()
    node0 = _launch(tmp_path, kill_rank=1, nnodes=2, node_rank=0, port=port, nproc=1)
    node1 = _launch(tmp_path, kill_rank=1, nnodes=2, node_rank=1, port=port, nproc=1)
    node1.communicate(timeout=60)
    killed = time.monotonic()
    output, _ = node0.communicate(timeout=60)
    assert node0.returncode != 0
    assert "rank 0: rank 1 closed its connection" in output
    assert time.monotonic() - killed < 10   # within the 10 s timeout


def test_rank_environments_and_command_line():
    envs = rank_environments(2, nnodes=2, node_rank=1, master_addr="10.0.0.1", master_port=1234)
    assert [(e["RANK"], e["LOCAL_RANK"], e["WORLD_SIZE"]) for e in envs] == [("2", "0", "4"), ("3", "1", "4")]
    assert envs[0]["MASTER_ADDR"] == "10.0.0.1" and envs[0]["MASTER_PORT"] == "1234"
    assert command_line(["train", "--pp", "2"])[1:] == ["-m", "minillm", "train", "--pp", "2"]
    assert command_line(["python", "x.py"]) == ["python", "x.py"]
    with pytest.raises(ValueError, match="--node-rank 2 must be in 0..1"):
        rank_environments(1, nnodes=2, node_rank=2)


def test_bench_train_draws_the_pipeline_timeline(tmp_path):
    pytest.importorskip("matplotlib")
    command = [sys.executable, "-m", "minillm", "launch", "--nproc-per-node", "2", "--device", "cpu",
               "--master-port", str(free_port()), "--", "bench", "train", "--pp", "2", "--micro-batches", "4",
               "--batch-size", "8", "--n-layer", "2", "--n-head", "2", "--d-model", "32", "--context", "16",
               "--steps", "1", "--warmup", "0", "--timeline", str(tmp_path / "pipe.png")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "vs (P-1)/(M+P-1) = 0.200" in result.stdout
    assert (tmp_path / "pipe.png").stat().st_size > 0


def test_bubble_fraction_by_hand():
    from minillm.distributed.timeline import bubble_fraction, ideal_bubble

    # busy 0-1 (forward) and 2-4 (backward), waiting 1-2 and 4-5: idle 2 of 5
    events = [("forward", 0, 0.0, 1.0), ("send/recv", 0, 1.0, 2.0), ("backward", 0, 2.0, 4.0),
              ("send/recv", -1, 4.0, 5.0)]
    assert bubble_fraction(events) == pytest.approx(0.4)
    assert ideal_bubble(2, 8) == pytest.approx(1 / 9)


def _minillm(*argv, launch: bool = False):
    prefix = ["launch", "--nproc-per-node", "2", "--device", "cpu", "--master-port", str(free_port()), "--"]
    command = [sys.executable, "-m", "minillm", *(prefix if launch else []), *map(str, argv)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def test_minillm_train_pp2_builds_only_its_stage_and_logs_the_single_process_losses(tmp_path):
    """``minillm train --pp 2`` (each rank builds only its stage, its weights the one-process model's):
    the same losses as one process, and a resumed run (the checkpoint overwrites the drawn weights) too."""
    import json

    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 300, encoding="utf-8")
    common = ["--data", text, "--tokenizer", "bytes", "--n-layer", "2", "--n-head", "2", "--d-model", "32",
              "--context", "16", "--batch-size", "4", "--micro-batches", "2", "--eval-interval", "3",
              "--eval-batches", "1", "--samples", "0", "--quiet", "--device", "cpu"]
    for name, parallel in (("one", []), ("pp", ["--pp", 2])):
        _minillm("train", *common, *parallel, "--steps", 4, "--out", tmp_path / name, launch=bool(parallel))
        _minillm("train", *common, *parallel, "--steps", 6, "--resume", tmp_path / name, launch=bool(parallel))
    read = lambda run: [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    one, pp = read("one"), read("pp")
    assert [r["step"] for r in pp] == [r["step"] for r in one] and len(one) >= 6
    values = lambda records: [r.get("loss", r.get("val_loss")) for r in records]  # noqa: E731
    assert values(pp) == pytest.approx(values(one), rel=1e-6)
