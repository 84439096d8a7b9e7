"""Seeing a pipeline schedule: each stage's forwards, backwards and transfers on a time axis.

``PipelineEngine(timeline=True)`` records, for every action of a step,
(kind, micro-batch, start, end) in seconds from the step's start, synchronizing
the GPU around each one so that host clocks bracket the device's work (which
costs a little speed: timelines are for looking, not for timing).
``bubble_fraction`` is the idle share those records show; with equal stages it
approaches (P - 1) / (M + P - 1). ``draw_timeline`` needs matplotlib (the
``plot`` extra).
"""

from __future__ import annotations

import math

COLORS = {"forward": "tab:blue", "backward": "tab:green", "send/recv": "0.7"}


def ideal_bubble(stages: int, micro_batches: int) -> float:
    """(P - 1) / (M + P - 1): the idle share of every stage with equal stages and free transfers."""
    return (stages - 1) / (micro_batches + stages - 1)


def bubble_fraction(events) -> float:
    """1 - (forward + backward time) / step time, for one stage's events of one step."""
    if not events:
        return math.nan
    busy = sum(end - start for kind, _, start, end in events if kind in ("forward", "backward"))
    return 1.0 - busy / max(end for *_, end in events)


def draw_timeline(events_per_stage, path, title: str = "") -> str:
    """One row per stage: a bar per forward (blue), backward (green), send/recv (grey), numbered by
    micro-batch; the white space is the bubble. Writes ``path`` (.png or .svg) and returns it."""
    try:
        import matplotlib  # noqa: PLC0415
    except ImportError:
        raise ValueError("drawing a timeline needs matplotlib: pip install 'minillm[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(10, 0.8 + 0.5 * len(events_per_stage)))
    for stage, events in enumerate(events_per_stage):
        for kind, mb, start, end in events:
            ax.broken_barh([(start * 1e3, (end - start) * 1e3)], (stage - 0.4, 0.8), color=COLORS[kind])
            if kind != "send/recv":
                ax.text((start + end) / 2 * 1e3, stage, str(mb), ha="center", va="center", fontsize=7, color="w")
    ax.set_yticks(range(len(events_per_stage)), [f"stage {s}" for s in range(len(events_per_stage))])
    ax.invert_yaxis()
    ax.set_xlabel("time in the step (ms); white space = idle (the bubble)")
    ax.set_title(title)
    ax.legend([plt.Rectangle((0, 0), 1, 1, color=c) for c in COLORS.values()], list(COLORS), fontsize=7,
              loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)   # beside the bars, never on them
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)
