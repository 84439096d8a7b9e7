"""What goes wrong in real use, on the CPU backend: each case ends cleanly, with a clear message, in time.

Launcher variables that contradict each other; ranks started with different
settings (they must refuse to train, not train something else silently); a
Ctrl-C that reaches one rank only (every rank must stop after the same step
and write the checkpoint together); SIGTERM / Ctrl-C sent to ``minillm
launch`` (exit 143 / 130, no rank left behind).
"""

import dataclasses
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from minillm.distributed import read_environment
from minillm.distributed.spawn import free_port, spawn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from parallel_helpers import tiny_run  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------- the launcher's variables

@pytest.mark.parametrize("env, message", [
    ({"RANK": "1"}, "RANK is set but WORLD_SIZE is not"),
    ({"WORLD_SIZE": "2"}, "WORLD_SIZE is set but RANK is not"),
    ({"OMPI_COMM_WORLD_SIZE": "2"}, "OMPI_COMM_WORLD_SIZE is set but OMPI_COMM_WORLD_RANK is not"),
    ({"SLURM_PROCID": "3", "SLURM_NTASKS": "2"}, r"rank 3 is not in a world of size 2 \(SLURM_PROCID=3, SLURM_NTASKS=2\)"),
    ({"RANK": "0", "WORLD_SIZE": "0"}, r"rank 0 is not in a world of size 0 \(RANK=0, WORLD_SIZE=0\)"),
    ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "-1"}, r"LOCAL_RANK=-1 must be in 0\.\.1"),
    ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "2"}, r"LOCAL_RANK=2 must be in 0\.\.1"),
    ({"RANK": "1", "WORLD_SIZE": "2", "MASTER_PORT": "70000"}, r"MASTER_PORT=70000 must be a port number, 1\.\.65535"),
    ({"RANK": "1", "WORLD_SIZE": "2", "MASTER_PORT": "0"}, r"MASTER_PORT=0 must be a port number"),
    ({"RANK": "one", "WORLD_SIZE": "2"}, "environment variable RANK='one' is not an integer"),
    ({"RANK": "1", "WORLD_SIZE": "2", "MASTER_PORT": "29500x"}, "MASTER_PORT='29500x' is not an integer"),
])
def test_contradictory_launcher_variables_are_clear_errors(env, message):
    with pytest.raises(ValueError, match=message):
        read_environment(env)


def test_launch_checks_the_port_before_starting_anything():
    from minillm.distributed.launch import rank_environments

    with pytest.raises(ValueError, match="--master-port must be a port number, 1..65535, got 70000"):
        rank_environments(2, master_port=70000, device="cpu")


def test_a_complete_set_of_variables_wins_over_a_partial_one_of_another_launcher():
    # mpirun inside a Slurm allocation: Open MPI's names are complete, Slurm's are the allocation's
    where = read_environment({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "SLURM_NTASKS": "8",
                              "MASTER_PORT": "1234"})
    assert (where.rank, where.world_size, where.master_port) == (1, 2, 1234)


def _init_twice(group):
    from minillm.distributed import destroy_process_group, init_process_group

    try:
        init_process_group("cpu", timeout=5)
        twice = "no error"
    except RuntimeError as error:
        twice = str(error)
    destroy_process_group()
    again = init_process_group("cpu", timeout=5)      # the same MASTER_PORT: destroy released it
    return twice, again.world_size


def test_a_second_init_is_a_clear_error_and_destroy_frees_the_port():
    """Before: the second init said the port was in use, and so did an init after destroy_process_group
    (the store's listener stayed bound while its accept thread waited on it)."""
    twice, size = spawn(_init_twice, 1, timeout=10)[0]
    assert "this process already joined a job as rank 0 of 1" in twice and "destroy_process_group()" in twice
    assert size == 1


@pytest.mark.parametrize("launched, device", [("cuda", "cpu"), ("cpu", "cuda:0"), ("cpu", "cuda")])
def test_the_launchers_device_and_the_runs_must_agree(monkeypatch, launched, device):
    """``minillm launch --device`` says which transport the ranks are for; the run's own --device picks it.
    Before: a contradiction went unnoticed (launch's default cuda + train's default cpu: CPU training on
    a GPU node; launch --device cpu + train --device cuda: NCCL)."""
    from minillm.distributed.mesh import MeshShape, init_mesh

    monkeypatch.setenv("MINILLM_LAUNCH_DEVICE", launched)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    with pytest.raises(ValueError, match=f"minillm launch --device {launched} started this rank, but the run "
                                         f"asks for --device {device}"):
        init_mesh(MeshShape(pp=2), device, timeout=1)


def test_a_peer_address_that_refuses_is_a_clear_error():
    """What a rank of a second job started on a busy MASTER_PORT meets: the first job's store, whose
    ranks no longer listen. Before: a bare '[Errno 111] Connection refused'."""
    import socket

    from minillm.distributed import CommError, TCPStore
    from minillm.distributed.cpu import CPUCommunicator

    store = TCPStore("127.0.0.1", free_port(), is_server=True, timeout=2)
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        address = closed.getsockname()
    try:
        store.arrive("cpu/address", 0, address)
        with pytest.raises(CommError, match="rank 1: cannot connect to rank 0 at 127.0.0.1:.*it exited, or the "
                                            "store on MASTER_PORT belongs to another job"):
            CPUCommunicator.create(1, 2, store, timeout=2)
    finally:
        store.close()


# ---------------------------------------------------------------- ranks started differently

def _mesh(group, shape):
    from minillm.distributed.mesh import DeviceMesh, MeshShape

    return DeviceMesh(group.comm, MeshShape(**shape))


def _different_meshes(group):
    try:
        _mesh(group, dict(pp=2) if group.rank == 0 else dict(dp=2))
    except ValueError as error:
        return str(error)
    return "no error"


def test_ranks_asking_for_different_meshes_refuse_to_start():
    for message in spawn(_different_meshes, 2, timeout=10):
        assert "the ranks were started with different parallel layouts" in message, message
        assert "pp: 2 on rank 0 / 1 on rank 1" in message and "dp: 1 on rank 0 / 2 on rank 1" in message


def test_settings_differences_group_the_ranks_by_value():
    from minillm.distributed.communicator import settings_differences

    state = lambda seed: {"generator": "PCG64", "state": list(range(seed, seed + 30))}  # noqa: E731 (long)
    posted = [{"seed": 1, "data": {"rng": state(0), "n": 5}}, {"seed": 1, "data": {"rng": state(1), "n": 5}},
              {"seed": 2, "data": {"rng": state(0), "n": 5}}]
    assert settings_differences(posted) == ["data.rng: <value 1> on ranks 0, 2 / <value 2> on rank 1",
                                            "seed: 1 on ranks 0, 1 / 2 on rank 2"]
    assert settings_differences(posted[:1] * 3) == []
    assert settings_differences([{"a": 1}, {}]) == ["a: 1 on rank 0 / (unset) on rank 1"]


def _different_settings(group, model_change, train_change):
    from minillm.distributed.parallel_trainer import ParallelTrainer

    mesh = _mesh(group, dict(dp=2))
    model, data, config = tiny_run(steps=3, **(model_change if group.rank == 1 else {}))
    if group.rank == 1:
        config = dataclasses.replace(config, **train_change)
    try:
        ParallelTrainer(model, config, data, mesh)
    except ValueError as error:
        return str(error)
    return "no error"


@pytest.mark.parametrize("model_change, train_change, difference", [
    ({}, {"seed": 2}, "train.seed: 1337 on rank 0 / 2 on rank 1"),
    ({"n_layer": 1}, {}, "model.n_layer: 2 on rank 0 / 1 on rank 1"),
    ({}, {"lr": 1e-3}, "train.lr: 0.003 on rank 0 / 0.001 on rank 1"),
])
def test_ranks_with_different_settings_refuse_to_train(model_change, train_change, difference):
    """Before: each of these trained without a word (different seeds: replicas that never agree; a model
    size or a learning rate per rank: a run that is neither)."""
    for message in spawn(_different_settings, 2, args=(model_change, train_change), timeout=10):
        assert "the ranks were started with different settings" in message, message
        assert difference in message, message


def _resumed_on_rank_0_only(group, run_dir):
    from minillm.distributed.parallel_trainer import ParallelTrainer

    mesh = _mesh(group, dict(pp=2))
    model, data, config = tiny_run(steps=4)
    trainer = ParallelTrainer(model, config, data, mesh, run_dir=run_dir)
    if group.rank == 0:
        trainer.resume()
    try:
        trainer.fit()
    except ValueError as error:
        return str(error)
    return "no error"


def test_a_run_resumed_on_some_ranks_only_refuses_to_continue(tmp_path):
    spawn(_ctrl_c_on_rank_0_only, 2, args=(tmp_path, dict(pp=2)), timeout=8)     # a checkpoint at step 4
    for message in spawn(_resumed_on_rank_0_only, 2, args=(tmp_path,), timeout=8):
        assert re.search(r"different starting steps \(--resume on some ranks only\?\): step: [34] on rank 0 / 0 on "
                         "rank 1", message), message


# ---------------------------------------------------------------- Ctrl-C reaching one rank

def _ctrl_c_on_rank_0_only(group, run_dir, shape):
    from minillm.distributed.parallel_trainer import ParallelTrainer
    from minillm.train.checkpoint import read_metadata

    mesh = _mesh(group, shape)
    model, data, config = tiny_run(steps=50)
    trainer = ParallelTrainer(model, config, data, mesh, run_dir=run_dir)
    if group.rank == 0:                      # the Ctrl-C of one node's launcher: the other rank never sees it
        step = trainer.train_step

        def train_step():
            result = step()
            if trainer.step == 3:
                signal.raise_signal(signal.SIGINT)
            return result

        trainer.train_step = train_step
    result = trainer.fit()
    group.comm.barrier()
    return result.step, result.interrupted, read_metadata(run_dir)["step"]


@pytest.mark.parametrize("shape", [dict(pp=2), dict(dp=2)])
def test_ctrl_c_on_one_rank_stops_every_rank_after_the_same_step(tmp_path, shape):
    """Before: rank 0 stopped and began the checkpoint (a collective) while rank 1 ran another step: both
    hung until the timeout, and no checkpoint was written."""
    start = time.monotonic()
    results = spawn(_ctrl_c_on_rank_0_only, 2, args=(tmp_path, shape), timeout=8)
    assert results[0] == results[1]
    step, interrupted, saved = results[0]
    assert interrupted and step == saved and 3 <= step <= 4
    assert time.monotonic() - start < 8


# ---------------------------------------------------------------- signals sent to minillm launch

READY_SCRIPT = textwrap.dedent("""
    import sys, time
    print("ready", flush=True)
    while True:
        time.sleep(0.05)
""")


def _rank_pids(launcher_pid: int) -> list[int]:
    ps = subprocess.run(["ps", "-eo", "pid=,ppid="], capture_output=True, text=True).stdout.split()
    return [int(pid) for pid, ppid in zip(ps[::2], ps[1::2]) if int(ppid) == launcher_pid]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True, text=True).stdout.strip()
    return bool(state) and not state.startswith("Z")


def _launch_ready_ranks(tmp_path):
    """``minillm launch`` of 2 CPU ranks that each print "ready", then wait forever."""
    script = tmp_path / "ready.py"
    script.write_text(READY_SCRIPT)
    return subprocess.Popen([sys.executable, "-m", "minillm", "launch", "--nproc-per-node", "2", "--device", "cpu",
                             "--master-port", str(free_port()), "--", sys.executable, str(script)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signalled_launcher_stops_every_rank_and_exits_128_plus_the_signal(tmp_path, signum, code):
    launcher = _launch_ready_ranks(tmp_path)
    try:
        lines = [launcher.stdout.readline() for _ in range(2)]
        assert sorted(lines) == ["[rank 0] ready\n", "[rank 1] ready\n"], lines
        ranks = _rank_pids(launcher.pid)
        assert len(ranks) == 2
        start = time.monotonic()
        launcher.send_signal(signum)
        output, _ = launcher.communicate(timeout=30)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == code, output
    assert f"[launch] {signal.Signals(signum).name}: stopping every rank" in output
    assert time.monotonic() - start < 10
    assert not [pid for pid in ranks if _alive(pid)]


def test_a_killed_launcher_takes_its_ranks_with_it(tmp_path):
    """SIGKILL (the OOM killer, kill -9) leaves the launcher no chance to stop its ranks: each rank has
    asked the kernel to kill it when its parent dies. Before: both ranks went on, orphans."""
    launcher = _launch_ready_ranks(tmp_path)
    ranks = []
    try:
        lines = [launcher.stdout.readline() for _ in range(2)]
        assert sorted(lines) == ["[rank 0] ready\n", "[rank 1] ready\n"], lines
        ranks = _rank_pids(launcher.pid)
        assert len(ranks) == 2
        launcher.kill()
        launcher.wait()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and [pid for pid in ranks if _alive(pid)]:
            time.sleep(0.05)
        assert not [pid for pid in ranks if _alive(pid)]
    finally:
        for pid in ranks:    # a failed run of this test leaves nothing behind either
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


SPAWN_SCRIPT = textwrap.dedent("""
    import sys, time
    from minillm.distributed.spawn import spawn

    def forever(group):
        if group.rank == 0:
            print("ready", flush=True)
        while True:
            group.comm.barrier()
            time.sleep(0.01)

    try:
        spawn(forever, 2, timeout=20)
    except KeyboardInterrupt:
        print("interrupted", flush=True)
""")


def test_ctrl_c_in_the_process_calling_spawn_stops_its_ranks_at_once(tmp_path):
    """A notebook's interrupt reaches the kernel only, not the forked ranks. Before: spawn waited out its
    timeout (20 s here) for ranks that were still training, then killed them."""
    script = tmp_path / "spawner.py"
    script.write_text(SPAWN_SCRIPT)
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    ranks = []
    try:
        assert parent.stdout.readline() == "ready\n"
        ranks = _rank_pids(parent.pid)
        start = time.monotonic()
        parent.send_signal(signal.SIGINT)
        output, _ = parent.communicate(timeout=30)
        assert "interrupted" in output
        assert time.monotonic() - start < 5
        assert not [pid for pid in ranks if _alive(pid)]
    finally:
        parent.kill()
        for pid in ranks:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _outward_address():
    """This machine's address on its way out (no packet is sent), or None on a machine with loopback only."""
    import socket

    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.connect(("192.0.2.1", 9))          # TEST-NET-1: any routable address does
            address = sock.getsockname()[0]
    except OSError:
        return None
    return None if address.startswith("127.") else address


ADDRESS_SCRIPT = textwrap.dedent("""
    from minillm.distributed import destroy_process_group, init_process_group

    group = init_process_group("cpu", timeout=10)
    hosts = [host for host, _ in group.store.wait_arrivals("cpu/address", group.world_size)]
    group.comm.barrier()
    print("hosts", " ".join(hosts), flush=True)
    destroy_process_group()
""")


def test_cpu_ranks_on_several_nodes_post_the_address_that_reaches_rank_0(tmp_path):
    """With a MASTER_ADDR that is not loopback (several nodes), each rank posts the local address of its
    route to rank 0, which the others can reach. Before: the host name's address, which is 127.0.1.1 on
    Debian-style hosts (and 127.0.0.1 here): unreachable from another node."""
    address = _outward_address()
    if address is None:
        pytest.skip("no address other than loopback on this machine")
    script = tmp_path / "address.py"
    script.write_text(ADDRESS_SCRIPT)
    result = subprocess.run([sys.executable, "-m", "minillm", "launch", "--nproc-per-node", "2", "--device", "cpu",
                             "--master-addr", address, "--master-port", str(free_port()), "--", sys.executable,
                             str(script)], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stdout + result.stderr
    for rank in (0, 1):
        assert f"[rank {rank}] hosts {address} {address}" in result.stdout, result.stdout


# ---------------------------------------------------------------- Ctrl-C on one node's launcher, minillm train

def test_ctrl_c_on_one_nodes_launcher_makes_both_launchers_exit_130(tmp_path):
    """Two launchers ("nodes", one rank each) of ``minillm train --dp 2``; Ctrl-C reaches node 0's only.
    The ranks agree to stop after the same step and both say so: node 1's launcher exits 130 too
    (before: rank 1 returned 0 from ``minillm train`` after the agreed stop, so node 1 exited 0)."""
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 300, encoding="utf-8")
    port = free_port()
    train = ["train", "--data", str(text), "--tokenizer", "bytes", "--n-layer", "1", "--n-head", "2", "--d-model",
             "16", "--context", "16", "--batch-size", "4", "--steps", "100000", "--eval-interval", "0",
             "--quiet", "--samples", "0", "--device", "cpu", "--dp", "2", "--out", str(tmp_path / "run")]
    nodes = [subprocess.Popen([sys.executable, "-m", "minillm", "launch", "--nproc-per-node", "1", "--nnodes", "2",
                               "--node-rank", str(node), "--device", "cpu", "--master-port", str(port), "--", *train],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
             for node in (0, 1)]
    try:
        metrics, deadline = tmp_path / "run" / "metrics.jsonl", time.monotonic() + 60
        while time.monotonic() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
            time.sleep(0.05)                                  # rank 0 logs every step
        nodes[0].send_signal(signal.SIGINT)
        outputs = [node.communicate(timeout=30)[0] for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    assert [node.returncode for node in nodes] == [130, 130], outputs
    assert "continue with: minillm train --resume" in outputs[0]
