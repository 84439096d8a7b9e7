"""``minillm launch``: one process per GPU (or CPU rank), output prefixed with the rank.

    minillm launch --nproc-per-node 2 -- train --pp 2 --micro-batches 8 --device cuda
    minillm launch --nproc-per-node 2 --device cpu -- train --pp 2 --device cpu
    # two nodes: the same command on each, node 0's address as --master-addr
    minillm launch --nproc-per-node 8 --nnodes 2 --node-rank 0 --master-addr 10.0.0.1 -- train --pp 16 --device cuda ...

The launching itself is :mod:`minillm.distributed.launch`.
"""

from __future__ import annotations

import argparse

from . import argtypes
from .common import add_command


def register(subparsers) -> argparse.ArgumentParser:
    p = add_command(
        subparsers, "launch", help="run a command on several processes (one per GPU), e.g. pipeline-parallel training",
        description="Start NPROC processes on this node, each with RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and "
                    "MASTER_PORT set, and run the command after -- in each (a minillm subcommand such as "
                    "'train ...', or any program). Output lines are prefixed with the rank; if one rank fails, "
                    "the others are stopped and the exit code is non-zero. On several nodes, run the same "
                    "command on each with --nnodes, --node-rank and node 0's --master-addr.")
    p.add_argument("--nproc-per-node", metavar="N", type=argtypes.positive_int, required=True,
                   help="processes on this node: one per GPU (or CPU ranks with --device cpu)")
    p.add_argument("--nnodes", metavar="K", type=argtypes.positive_int, default=1, help="nodes in the job (default: 1)")
    p.add_argument("--node-rank", metavar="R", type=argtypes.non_negative_int, default=0,
                   help="this node's index, 0..K-1 (default: 0)")
    p.add_argument("--master-addr", metavar="ADDR", default="127.0.0.1",
                   help="address of node 0, where rank 0's rendezvous listens (default: 127.0.0.1)")
    p.add_argument("--master-port", metavar="PORT", type=argtypes.positive_int, default=29500,
                   help="port of the rendezvous on node 0 (default: 29500)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="what the ranks are for, checked against the command's own --device: cuda (NCCL, rank i on GPU "
                        "LOCAL_RANK) or cpu (the CPU test transport) (default: cuda)")
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="COMMAND",
                   help="after --: what each rank runs, a minillm subcommand (train ...) or a program (python x.py)")
    p.set_defaults(func=run_launch)
    return p


def run_launch(args: argparse.Namespace) -> int:
    from ..distributed.launch import launch, rank_environments  # noqa: PLC0415

    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    envs = rank_environments(args.nproc_per_node, args.nnodes, args.node_rank, args.master_addr, args.master_port,
                             args.device)
    return launch(command, envs)
