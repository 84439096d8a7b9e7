"""Training curves from run directories (``minillm plot``), drawn with matplotlib.

    from minillm.plot import plot_runs
    plot_runs(["runs/a", "runs/b"], "curves.png")     # or .svg

Reads each run's ``metrics.jsonl`` (what :class:`minillm.train.Trainer` logs:
``{"kind": "train", "step", "loss", "lr", "tokens", "tokens_per_s", ...}`` every
step and ``{"kind": "eval", "step", "val_loss", ...}`` at each evaluation) and
draws one figure, the runs overlaid and named in the legend:

    loss against step        train (faint: every step; solid: a moving average) and val (dots)
    loss against tokens      the same, against training tokens seen (runs with other batch sizes line up)
    learning rate            the schedule
    tokens/s                 throughput of each step
    accuracy                 when a run logs keys ending in ``acc`` (fine-tuning: train_acc, val_acc, test_acc)
    reward                   when a run logs reward keys (DPO: reward_acc, margin, chosen_reward, ...)

matplotlib is an optional extra (``pip install 'minillm[plot]'``) and is
imported only when a figure is drawn.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from .checks import is_real

METRICS_FILE = "metrics.jsonl"
FORMATS = (".png", ".svg")
INSTALL_HINT = "minillm plot needs matplotlib: pip install 'minillm[plot]' (or pip install matplotlib)"


@dataclass
class RunCurves:
    """One run's metrics as curves: ``train[key]`` / ``eval[key]`` = (steps, values)."""

    name: str
    train: dict[str, tuple[list[int], list[float]]] = field(default_factory=dict)
    eval: dict[str, tuple[list[int], list[float]]] = field(default_factory=dict)
    tokens_at_step: dict[int, int] = field(default_factory=dict)

    def keys(self) -> set[str]:
        return set(self.train) | set(self.eval)


def is_reward_key(key: str) -> bool:
    """DPO-style preference metrics: reward_acc, margin, chosen_reward, rejected_reward, ..."""
    return "reward" in key or "margin" in key


def is_accuracy_key(key: str) -> bool:
    """Classification accuracy: train_acc, val_acc, test_acc, accuracy, ... (reward accuracy is a reward key)."""
    return (key.endswith("acc") or key.endswith("accuracy")) and not is_reward_key(key)


def read_curves(run_dir, name: str | None = None) -> RunCurves:
    """The curves of ``run_dir/metrics.jsonl``; a clear error when the file is missing, empty or unreadable.

    A line cut short by a crash is skipped; numbers that are not finite are kept
    out (matplotlib would draw nothing for them anyway).
    """
    run_dir = Path(run_dir)
    path = run_dir / METRICS_FILE
    if not run_dir.exists():
        raise FileNotFoundError(2, "No such file or directory", str(run_dir))
    if not run_dir.is_dir():
        raise ValueError(f"{run_dir} is a file; give the run directory that holds {METRICS_FILE}")
    if not path.is_file():
        raise FileNotFoundError(2, f"no {METRICS_FILE} here: not a run directory of minillm train, "
                                   f"or a run that has not finished a step yet", str(run_dir))
    curves = RunCurves(name or run_dir.name or str(run_dir))
    records = 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            continue
        records += 1
        step = record["step"]
        table = curves.eval if record.get("kind") == "eval" else curves.train
        if record.get("kind") != "eval" and isinstance(record.get("tokens"), (int, float)):
            curves.tokens_at_step[step] = record["tokens"]
        for key, value in record.items():
            if key in ("kind", "step") or not is_real(value):
                continue
            if not math.isfinite(value):
                continue
            steps, values = table.setdefault(key, ([], []))
            steps.append(step)
            values.append(float(value))
    if records == 0:
        raise ValueError(f"{path} holds no metrics yet (empty, or no complete line)")
    return curves


def moving_average(values: list[float], window: int) -> list[float]:
    """Mean of each value and the ``window - 1`` before it (fewer at the start)."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _import_matplotlib():
    try:
        from matplotlib.figure import Figure  # noqa: PLC0415 (optional extra)
    except ImportError:
        raise RuntimeError(INSTALL_HINT) from None
    return Figure


def plot_runs(run_dirs, out, names: list[str] | None = None) -> Path:
    """Draw the curves of every run in ``run_dirs`` into ``out`` (.png or .svg); returns ``out``."""
    run_dirs = [Path(r) for r in run_dirs]
    if not run_dirs:
        raise ValueError("give at least one run directory")
    names = names or _run_names(run_dirs)
    runs = [read_curves(r, n) for r, n in zip(run_dirs, names)]    # errors before matplotlib is needed
    out = Path(out)
    if out.suffix.lower() not in FORMATS:
        raise ValueError(f"{out}: the figure is written as PNG or SVG, so the name must end in .png or .svg")
    if out.is_dir():
        raise IsADirectoryError(21, "Is a directory (give a file name ending in .png or .svg)", str(out))
    if not out.parent.is_dir():
        raise FileNotFoundError(2, "No such directory to write the figure into", str(out.parent))
    draw_figure(runs).savefig(out, dpi=110)
    return out


def draw_figure(runs: list[RunCurves]):
    """A matplotlib ``Figure`` with the panels the runs' metrics call for (see the module docstring)."""
    Figure = _import_matplotlib()
    keys = set().union(*(run.keys() for run in runs))
    panels = ["loss_step", "loss_tokens", "lr", "tokens_per_s"]
    if any(is_accuracy_key(k) for k in keys):
        panels.append("accuracy")
    if any(is_reward_key(k) for k in keys):
        panels.append("reward")
    rows = (len(panels) + 1) // 2
    figure = Figure(figsize=(12, 3.6 * rows), layout="constrained")
    axes = figure.subplots(rows, 2, squeeze=False).ravel()
    for extra in axes[len(panels):]:
        extra.set_visible(False)
    colors = [f"C{i % 10}" for i in range(len(runs))]
    for panel, ax in zip(panels, axes):
        for run, color in zip(runs, colors):
            _draw(panel, ax, run, color)
        ax.grid(True, alpha=0.3)
        if panel == "tokens_per_s":
            ax.set_ylim(bottom=0)       # after every run is drawn: autoscaling stays on for the top
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    figure.suptitle("minillm: " + ", ".join(run.name for run in runs))
    return figure


def _run_names(run_dirs: list[Path]) -> list[str]:
    """Folder names, or whole paths where two runs share a folder name."""
    names = [r.name or str(r) for r in run_dirs]
    return [str(r) if names.count(n) > 1 else n for r, n in zip(run_dirs, names)]


def _draw(panel: str, ax, run: RunCurves, color: str) -> None:
    if panel in ("loss_step", "loss_tokens"):
        def x_of(steps):
            if panel == "loss_step":
                return steps
            return [run.tokens_at_step.get(s, math.nan) for s in steps]

        if "loss" in run.train:
            steps, loss = run.train["loss"]
            if len(loss) > 50:   # every step faintly, the trend boldly
                ax.plot(x_of(steps), loss, color=color, alpha=0.25, linewidth=0.8)
                loss = moving_average(loss, max(len(loss) // 25, 2))
            ax.plot(x_of(steps), loss, color=color, label=f"{run.name} train")
        if "val_loss" in run.eval:
            steps, val = run.eval["val_loss"]
            ax.plot(x_of(steps), val, color=color, linestyle="--", marker="o", markersize=4, label=f"{run.name} val")
        ax.set_xlabel("step" if panel == "loss_step" else "training tokens seen")
        ax.set_ylabel("loss (cross-entropy, nats)")
        ax.set_title("loss against " + ("step" if panel == "loss_step" else "tokens"))
    elif panel == "lr":
        if "lr" in run.train:
            ax.plot(*run.train["lr"], color=color, label=run.name)
        ax.set_xlabel("step")
        ax.set_ylabel("learning rate")
        ax.set_title("learning rate")
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    elif panel == "tokens_per_s":
        if "tokens_per_s" in run.train:
            ax.plot(*run.train["tokens_per_s"], color=color, label=run.name, linewidth=0.8)
        ax.set_xlabel("step")
        ax.set_ylabel("tokens/s")
        ax.set_title("throughput")
    else:
        wanted = is_accuracy_key if panel == "accuracy" else is_reward_key
        styles = {"train": "-", "eval": "--"}
        markers = "osD^v"    # one run, one colour; its keys told apart by the marker
        for kind, table in (("train", run.train), ("eval", run.eval)):
            for i, key in enumerate(sorted(k for k in table if wanted(k))):
                steps, values = table[key]
                marker = markers[i % len(markers)] if kind == "eval" or len(values) < 30 else None
                ax.plot(steps, values, color=color, linestyle=styles[kind], marker=marker, markersize=4,
                        label=f"{run.name} {key}")
        ax.set_xlabel("step")
        ax.set_ylabel("accuracy" if panel == "accuracy" else "reward")
        ax.set_title("accuracy" if panel == "accuracy" else "preference reward")
