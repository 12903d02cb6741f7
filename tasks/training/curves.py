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


def write_loss_curves(
    history: Sequence[dict[str, Any]],
    out_dir: str | Path,
    title: str,
    exits: Sequence[int] | None = None,
    name: str = "loss",
) -> tuple[Path, Path]:
    """Writes `<name>.csv` (step, exit, split, loss) and `<name>.png` (one line per member and split).

    Args:
        history: TrainResult.history rows.
        out_dir: `plots/<stage>/`.
        exits: members to plot (default: all in the history).
    """
    plt = pyplot()
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
    fig, ax = plt.subplots(figsize=(7, 4.2))
    members = sorted({r["exit"] for r in rows})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, d in enumerate(members):
        color = colors[i % len(colors)]
        for split, style in (("train", dict(lw=0.8, alpha=0.55)), ("val", dict(lw=1.8, marker="o", ms=3))):
            pts = [(r["step"], r["loss"]) for r in rows if r["exit"] == d and r["split"] == split]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, color=color, label=f"exit {d} {split}", **style)
    ax.set_xlabel("step")
    # log scale: the first steps (near ln V nats) would otherwise flatten everything after them
    ax.set_yscale("log")
    ax.set_ylabel("cross-entropy (nats/token, log scale)")
    ax.set_title(textwrap.fill(title, 72))  # a 7-inch figure cuts a longer line (family_sft's did)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    save_figure(fig, png_path, dpi=110)
    return png_path, csv_path
