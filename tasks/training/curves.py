"""Loss curves of a training stage: `loss.png` + `loss.csv` (step, exit, split, loss) for `dvc plots`."""

from __future__ import annotations

import csv
import logging
import statistics
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tasks.core.files import atomic_file, pyplot, save_figure

log = logging.getLogger("ruyi")


# --- plots ----------------------------------------------------------------------------------------
def running_mean(values: Sequence[float], window: int) -> list[float]:
    """Each value's mean with the `window - 1` before it (fewer at the start): the line drawn through a
    noisy per-step curve (the rl figures' reward and sampled accuracy)."""
    return [statistics.fmean(values[max(0, i - window + 1) : i + 1]) for i in range(len(values))]


HeldOut = dict[int, list[dict[str, Any]]]
"""Each member's held-out greedy evaluations during rl: `{exit: [{"step": s, "accuracy": a, "correct":
[a bool per held-out prompt], ...}, ...]}`, before rl (step 0), every `rl.eval_every` steps and after;
the text and VL rl stages both keep this shape."""


def held_out_columns(points: Sequence[dict[str, Any]], keys: Sequence[str]) -> dict[str, list[float]]:
    """A member's held-out evaluations as the columns `metrics/rl.json` stores: `{key: [value per point]}`."""
    return {k: [p[k] for p in points] for k in keys}


def draw_held_out(ax, held_out: HeldOut, colors: dict[int, str] | None = None, style: str = "s--") -> None:
    """Draws each member's held-out accuracy over the rl steps on `ax` (in `colors[exit]` when given, so
    it matches the member's other lines); a member without evaluations is left out."""
    for d, points in sorted(held_out.items()):
        if points:
            steps, accuracy = zip(*((p["step"], p["accuracy"]) for p in points))
            color = (colors or {}).get(d)
            ax.plot(steps, accuracy, style, color=color, label=f"exit {d} held-out greedy")


def write_loss_curves(
    history: Sequence[dict[str, Any]],
    out_dir: str | Path,
    title: str,
    exits: Sequence[int] | None = None,
    name: str = "loss",
) -> tuple[Path, Path]:
    """Writes `<name>.csv` (step, exit, split, loss: every logged value, raw) and `<name>.png`
    (`loss_figure`).

    Args:
        history: TrainResult.history rows.
        out_dir: `plots/<stage>/`.
        exits: members to plot (default: all in the history).
    """
    out_dir = Path(out_dir)
    rows = [r for r in history if exits is None or r["exit"] in exits]
    csv_path, png_path = out_dir / f"{name}.csv", out_dir / f"{name}.png"
    with atomic_file(csv_path, "w") as f:
        writer = csv.DictWriter(f, fieldnames=["step", "exit", "split", "loss"], lineterminator="\n")
        writer.writeheader()
        for r in rows:
            writer.writerow(
                {"step": r["step"], "exit": r["exit"], "split": r["split"], "loss": f"{r['loss']:.6f}"}
            )
    save_figure(loss_figure(rows, title), png_path, dpi=110)
    return png_path, csv_path


#: Train losses are smoothed over about 1/TRAIN_POINTS of a member's logged steps.
TRAIN_POINTS = 40


def loss_figure(rows: Sequence[dict[str, Any]], title: str):
    """One colour per member: its validation loss (points joined by a line) and its train loss. A train
    loss is one batch's: it swings with the batch's content (in the tiny family_sft a general-text replay
    batch loses several times what a math batch does; 0.84 against 0.094 nats at exit 2 in the 2026-12-05
    recording), and the members' raw lines hide each other. So the raw values are drawn faint and their
    running mean over `len // TRAIN_POINTS` steps (`running_mean`) through them, labelled with its window;
    short histories (under 2 x TRAIN_POINTS steps) are drawn raw. Returns the figure."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    members = sorted({r["exit"] for r in rows})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, d in enumerate(members):
        color = colors[i % len(colors)]
        train = [(r["step"], r["loss"]) for r in rows if r["exit"] == d and r["split"] == "train"]
        if train:
            xs, ys = zip(*train)
            window = len(ys) // TRAIN_POINTS
            if window >= 2:
                ax.plot(xs, ys, color=color, lw=0.5, alpha=0.15)
                ax.plot(
                    xs,
                    running_mean(ys, window),
                    color=color,
                    lw=1.0,
                    label=f"exit {d} train (mean of {window})",
                )
            else:
                ax.plot(xs, ys, color=color, lw=0.8, alpha=0.55, label=f"exit {d} train")
        val = [(r["step"], r["loss"]) for r in rows if r["exit"] == d and r["split"] == "val"]
        if val:
            ax.plot(*zip(*val), color=color, lw=1.8, marker="o", ms=3, label=f"exit {d} val")
    ax.set_xlabel("step")
    # log scale: the first steps (near ln V nats) would otherwise flatten everything after them
    ax.set_yscale("log")
    ax.set_ylabel("cross-entropy (nats/token, log scale)")
    ax.set_title(textwrap.fill(title, 72))  # a 7-inch figure cuts a longer line (family_sft's did)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    return fig
