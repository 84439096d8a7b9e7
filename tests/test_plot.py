"""``minillm.plot``: metrics.jsonl read back as curves, the panels a run's metrics call for, the files written."""

import json

import pytest

from minillm.plot import is_accuracy_key, is_reward_key, moving_average, plot_runs, read_curves


def write_run(folder, steps=6, extra_train=None, extra_eval=None, junk=False):
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for step in range(1, steps + 1):
        lines.append({"kind": "train", "step": step, "loss": 5.0 - 0.1 * step, "lr": 1e-3 * step,
                      "tokens": 64 * step, "tokens_per_s": 1000.0 + step, **(extra_train or {})})
        if step % 3 == 0:
            lines.append({"kind": "eval", "step": step, "val_loss": 5.2 - 0.1 * step, **(extra_eval or {})})
    text = "".join(json.dumps(line) + "\n" for line in lines)
    if junk:
        text += '{"kind": "train", "step": 7, "lo'          # a line cut short by a crash
    (folder / "metrics.jsonl").write_text(text, encoding="utf-8")
    return folder


def test_read_curves_splits_train_and_eval(tmp_path):
    curves = read_curves(write_run(tmp_path / "a", junk=True))
    assert curves.name == "a"
    assert curves.train["loss"] == ([1, 2, 3, 4, 5, 6], pytest.approx([4.9, 4.8, 4.7, 4.6, 4.5, 4.4]))
    assert curves.eval["val_loss"] == ([3, 6], pytest.approx([4.9, 4.6]))
    assert curves.tokens_at_step[4] == 256
    assert "kind" not in curves.train and "step" not in curves.train


def test_missing_or_empty_metrics_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no metrics.jsonl here"):
        read_curves(tmp_path)
    (tmp_path / "metrics.jsonl").write_text("\n", encoding="utf-8")
    with pytest.raises(ValueError, match="holds no metrics yet"):
        read_curves(tmp_path)


def test_key_families():
    assert [k for k in ("train_acc", "val_acc", "test_accuracy", "reward_acc", "loss") if is_accuracy_key(k)] == \
        ["train_acc", "val_acc", "test_accuracy"]
    assert [k for k in ("reward_acc", "margin", "chosen_reward", "val_acc") if is_reward_key(k)] == \
        ["reward_acc", "margin", "chosen_reward"]


def test_moving_average_worked_example():
    assert moving_average([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]


def panel_titles(figure):
    return [ax.get_title() for ax in figure.axes if ax.get_visible()]


def test_panels_follow_the_metrics_and_runs_are_overlaid(tmp_path):
    pytest.importorskip("matplotlib")
    from minillm.plot import draw_figure

    plain = read_curves(write_run(tmp_path / "plain"))
    assert panel_titles(draw_figure([plain])) == ["loss against step", "loss against tokens", "learning rate",
                                                  "throughput"]
    classify = read_curves(write_run(tmp_path / "cls", extra_train={"train_acc": 0.5},
                                     extra_eval={"val_acc": 0.6, "test_acc": 0.55}))
    dpo = read_curves(write_run(tmp_path / "dpo", extra_eval={"reward_acc": 0.7, "margin": 0.3}))
    figure = draw_figure([plain, classify, dpo])
    assert panel_titles(figure)[4:] == ["accuracy", "preference reward"]
    loss_axes = figure.axes[0]
    labels = loss_axes.get_legend_handles_labels()[1]
    assert labels == ["plain train", "plain val", "cls train", "cls val", "dpo train", "dpo val"]
    accuracy_labels = figure.axes[4].get_legend_handles_labels()[1]
    assert accuracy_labels == ["cls train_acc", "cls test_acc", "cls val_acc"]
    # the plotted points are the logged ones: the val curve of "plain" against tokens
    val_line = loss_axes.lines[1]
    assert list(val_line.get_xdata()) == [3, 6] and list(val_line.get_ydata()) == pytest.approx([4.9, 4.6])
    tokens_val = figure.axes[1].lines[1]
    assert list(tokens_val.get_xdata()) == [192, 384]


@pytest.mark.parametrize("suffix, magic", [(".png", b"\x89PNG"), (".svg", b"<?xml")])
def test_plot_runs_writes_the_file(tmp_path, suffix, magic):
    pytest.importorskip("matplotlib")
    out = plot_runs([write_run(tmp_path / "a"), write_run(tmp_path / "b")], tmp_path / f"fig{suffix}")
    assert out.read_bytes().startswith(magic)


def test_output_name_is_checked_before_drawing(tmp_path):
    run = write_run(tmp_path / "a")
    with pytest.raises(ValueError, match="must end in .png or .svg"):
        plot_runs([run], tmp_path / "fig.pdf")
    with pytest.raises(FileNotFoundError, match="No such directory to write the figure into"):
        plot_runs([run], tmp_path / "missing" / "fig.png")
