"""``minillm launch``: start one process per GPU (or CPU rank), watch them, stop them together.

    minillm launch --nproc-per-node 2 -- train --pp 2 --micro-batches 8 --device cuda
    minillm launch --nproc-per-node 4 --device cpu -- train --pp 4 --steps 50 --device cpu
    minillm launch --nproc-per-node 1 -- python my_script.py          # any program

Each child gets torchrun's variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``) and
``MINILLM_LAUNCH_DEVICE`` (``cuda`` or ``cpu``: what the ranks are for; the run's
own ``--device`` picks the communicator and must agree, ``mesh.init_mesh``).
A command that starts with a ``minillm`` subcommand name runs as
``python -m minillm ...``; anything else runs as given.

Every line a rank prints comes out prefixed ``[rank R]``. When a rank exits
with an error, the others are stopped (SIGTERM, then SIGKILL after a grace
period) and the launcher exits with that rank's code; a rank that hangs is
caught by the communicators' timeout, which makes its peers fail, and so on.
Ctrl-C or SIGTERM sent to the launcher goes to every rank (Ctrl-C: a training
run finishes its step, saves and stops; SIGTERM: SIGKILL after the grace
period; a third signal: SIGKILL), and the launcher exits 128 + the signal's
number (130, 143), as a shell reports a command it stopped.

Several nodes: the same command on each, with ``--nnodes K --node-rank R
--master-addr <node 0's address>``: global rank = R * nproc_per_node + local rank.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

SUBCOMMANDS = ("train", "bench", "generate", "finetune", "classify", "tokenizer", "plot")
GRACE_S = 5.0


def rank_environments(nproc_per_node: int, nnodes: int = 1, node_rank: int = 0, master_addr: str = "127.0.0.1",
                      master_port: int = 29500, device: str = "cuda") -> list[dict[str, str]]:
    """The variables each local rank of this node gets (on top of the launcher's own environment)."""
    if nproc_per_node < 1 or nnodes < 1:
        raise ValueError("--nproc-per-node and --nnodes must be at least 1")
    if not 0 <= node_rank < nnodes:
        raise ValueError(f"--node-rank {node_rank} must be in 0..{nnodes - 1} (--nnodes {nnodes})")
    if device not in ("cuda", "cpu"):
        raise ValueError(f"--device must be cuda or cpu, got {device!r}")
    if not 1 <= master_port <= 65535:
        raise ValueError(f"--master-port must be a port number, 1..65535, got {master_port}")
    world = nnodes * nproc_per_node
    return [{"RANK": str(node_rank * nproc_per_node + local), "WORLD_SIZE": str(world), "LOCAL_RANK": str(local),
             "LOCAL_WORLD_SIZE": str(nproc_per_node), "MASTER_ADDR": master_addr, "MASTER_PORT": str(master_port),
             "MINILLM_LAUNCH_DEVICE": device}
            for local in range(nproc_per_node)]


def command_line(command: list[str]) -> list[str]:
    """``train ...`` -> ``python -m minillm train ...``; any other program unchanged."""
    if not command:
        raise ValueError("nothing to launch: give the command after --, e.g. minillm launch --nproc-per-node 2 -- "
                         "train --pp 2")
    if command[0] in SUBCOMMANDS:
        return [sys.executable, "-m", "minillm", *command]
    return list(command)


def _relay(stream, rank: int, out) -> None:
    """Copy a child's output to ours line by line, each line prefixed with its rank."""
    prefix = f"[rank {rank}] ".encode()
    for line in iter(stream.readline, b""):
        line = line if line.endswith(b"\n") else line + b"\n"   # the last one, cut short: the launcher's next
        out.write(prefix + line.replace(b"\r", b"\n" + prefix) if b"\r" in line else prefix + line)
        out.flush()
    stream.close()


def _die_with(launcher_pid: int):
    """What each child runs before its program (Linux): SIGKILL when the launcher dies, however it dies.

    The ranks run in sessions of their own (a terminal's Ctrl-C reaches the
    launcher only, which passes it on), so a launcher killed outright (kill -9,
    the OOM killer) could not stop them: they would train on as orphans. The
    kernel's parent-death signal (prctl PR_SET_PDEATHSIG) stops them instead.
    None (no such call) elsewhere.
    """
    if not sys.platform.startswith("linux"):
        return None
    import ctypes  # noqa: PLC0415

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def in_child() -> None:
        prctl(1, int(signal.SIGKILL))   # PR_SET_PDEATHSIG
        if os.getppid() != launcher_pid:   # the launcher died before the call above: go now
            os._exit(1)

    return in_child


def launch(command: list[str], envs: list[dict[str, str]], out=None) -> int:
    """Run ``command`` once per environment; 0 if every rank succeeded, else the first failure's code."""
    out = out if out is not None else sys.stdout.buffer
    argv = command_line(command)
    children, relays = [], []
    for env in envs:      # every child first, the relay threads after: no thread runs while we fork
        child = subprocess.Popen(argv, env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                                 preexec_fn=_die_with(os.getpid()))
        children.append((int(env["RANK"]), child))
    for rank, child in children:
        relay = threading.Thread(target=_relay, args=(child.stdout, rank, out), daemon=True)
        relay.start()
        relays.append(relay)

    def stop_all(signum=signal.SIGTERM) -> None:
        for _, child in children:
            if child.poll() is None:
                try:
                    os.killpg(child.pid, signum)
                    if signum == signal.SIGTERM:
                        os.killpg(child.pid, signal.SIGCONT)   # a stopped (SIGSTOP) rank acts on it now
                except ProcessLookupError:                     # it ended in the meantime
                    pass

    received: list[int] = []   # signals sent to the launcher (Ctrl-C, SIGTERM), in order

    def on_signal(signum, frame) -> None:
        """Pass it on to every rank (Ctrl-C: they finish the step, save and stop); the third: SIGKILL."""
        received.append(signum)
        stop_all(signal.SIGKILL if len(received) >= 3 else signum)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    code, signalled_at = 0, None
    try:
        while [child.poll() for _, child in children].count(None):   # poll every child, every time
            if received:                                             # the ranks' own exits are expected now
                if signalled_at is None:
                    signalled_at = time.monotonic()
                    _say(out, f"{signal.Signals(received[0]).name}: stopping every rank")
                if received[0] != signal.SIGINT and time.monotonic() > signalled_at + GRACE_S:
                    stop_all(signal.SIGKILL)                         # SIGTERM: the grace period, then no more
                time.sleep(0.05)
                continue
            failed = [(rank, child.returncode) for rank, child in children if child.returncode not in (None, 0)]
            if failed:
                rank, code = failed[0]
                _say(out, f"rank {rank} exited with code {code}: stopping the other ranks")
                stop_all(signal.SIGTERM)
                deadline = time.monotonic() + GRACE_S
                while time.monotonic() < deadline and any(c.poll() is None for _, c in children):
                    time.sleep(0.05)
                stop_all(signal.SIGKILL)
                break
            time.sleep(0.05)
        for _, child in children:
            child.wait()
        if received:                                                 # as a shell reports it: 130, 143
            if signalled_at is None:                                 # they all ended before the loop saw it
                _say(out, f"{signal.Signals(received[0]).name}: stopping every rank")
            return 128 + received[0]
        if code == 0:
            failed = [(rank, child.returncode) for rank, child in children if child.returncode != 0]
            if failed:
                rank, code = failed[0]
                _say(out, f"rank {rank} exited with code {code}")
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for relay in relays:
            relay.join(timeout=2)
    return code if code > 0 else (1 if code else 0)  # killed by a signal (negative code): exit 1


def _say(out, message: str) -> None:
    out.write(f"[launch] {message}\n".encode())
    out.flush()
