"""``minillm plot``: training curves of one or more runs, overlaid, into a PNG or SVG.

    minillm plot runs/pydoc                          # -> runs/pydoc/metrics.png
    minillm plot runs/a runs/b -o compare.svg

The drawing is :func:`minillm.plot.plot_runs` (matplotlib, the ``plot`` extra).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import add_command, say


def register(subparsers) -> argparse.ArgumentParser:
    p = add_command(
        subparsers, "plot", help="plot loss, learning rate and tokens/s of runs (needs matplotlib)",
        description="Plot the training curves in the metrics.jsonl of one or more run directories: train "
                    "and val loss against step and against tokens, learning rate, tokens/s, and "
                    "fine-tuning accuracy or reward curves when a run logged them. Several runs are "
                    "overlaid, named by their folders. Needs matplotlib: pip install 'minillm[plot]'.")
    p.add_argument("runs", metavar="RUN_DIR", nargs="+", help="run directories written by 'minillm train'")
    p.add_argument("-o", "--out", metavar="FILE",
                   help="the figure, .png or .svg (default: RUN_DIR/metrics.png for one run, "
                        "runs.png for several)")
    p.set_defaults(func=run_plot)
    return p


def run_plot(args: argparse.Namespace) -> int:
    from ..plot import plot_runs  # noqa: PLC0415

    out = args.out or (Path(args.runs[0]) / "metrics.png" if len(args.runs) == 1 else Path("runs.png"))
    written = plot_runs(args.runs, out)
    say(f"wrote {written}")
    return 0
