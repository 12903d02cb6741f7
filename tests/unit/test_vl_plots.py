"""The vision-language profile's figures: rl's curves, evaluate's trade-off (PNG + CSV), and the list of
figures that `dvc plots show` and the run's summary name."""

from __future__ import annotations

import csv
from pathlib import Path

import yaml
from PIL import Image

from flows.report import VL_PLOTS
from tasks.training.vl_pipeline import plot_rl, plot_tradeoff

REPO = Path(__file__).resolve().parents[2]


def _png(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        im.verify()
        assert im.format == "PNG"
        return im.size


def test_evaluate_tradeoff_writes_every_exit_and_task_type_to_csv_and_a_png(tmp_path):
    metrics = {
        "exit_1": {
            "accuracy": 0.5,
            "loss": 0.9,
            "num_parameters": 1_000_000,
            "tokens_per_s": 120.0,
            "by_task": {
                "scene_colour": {"accuracy": 0.75, "n": 4},
                "scene_count": {"accuracy": 0.25, "n": 4},
            },
        },
        "exit_4": {
            "accuracy": 0.875,
            "loss": 0.3,
            "num_parameters": 2_500_000,
            "tokens_per_s": 60.0,
            "by_task": {"scene_colour": {"accuracy": 1.0, "n": 4}, "scene_count": {"accuracy": 0.75, "n": 4}},
        },
    }
    png = plot_tradeoff(metrics, [1, 4], tmp_path)
    assert png == tmp_path / "tradeoff.png" and _png(png)[0] > 0
    with open(tmp_path / "tradeoff.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["exit"] for r in rows] == ["1", "4"]
    assert rows[0]["scene_count"] == "0.25" and rows[1]["scene_colour"] == "1.0"
    assert rows[1]["num_parameters"] == "2500000" and rows[0]["tokens_per_s"] == "120.0"
    assert not list(tmp_path.glob("*.tmp*"))  # written atomically, nothing left beside


def test_a_task_type_a_member_never_saw_is_an_empty_cell_not_an_error(tmp_path):
    metrics = {
        "exit_1": {
            "accuracy": 0.5,
            "loss": 1.0,
            "num_parameters": 10,
            "by_task": {"a": {"accuracy": 0.5, "n": 2}},
        },
        "exit_2": {
            "accuracy": 1.0,
            "loss": 0.5,
            "num_parameters": 20,
            "by_task": {"b": {"accuracy": 1.0, "n": 1}},
        },
    }
    plot_tradeoff(metrics, [1, 2], tmp_path)
    with open(tmp_path / "tradeoff.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert (rows[0]["a"], rows[0]["b"], rows[1]["a"], rows[1]["b"]) == ("0.5", "", "", "1.0")
    assert rows[0]["tokens_per_s"] == ""  # evaluate measures speed after accuracy: absent, not invented


def test_rl_curves_plot_every_member_that_trained(tmp_path):
    history = [
        {"step": s + 1, "exit": (1, 2, 4)[s % 3], "reward": (s % 4) / 4, "loss": 0.1} for s in range(12)
    ]
    curve = {
        d: [{"step": s, "accuracy": a} for s, a in zip((0, 6, 12), accuracies, strict=True)]
        for d, accuracies in ((1, (0.4, 0.42, 0.45)), (2, (0.5, 0.45, 0.5)), (4, (0.6, 0.6, 0.65)))
    }
    png = plot_rl(history, curve, tmp_path, tasks=("counting",))
    w, h = _png(png)
    assert png == tmp_path / "curves.png" and w > h > 0


def test_the_vl_pipeline_lists_the_figures_the_summary_names():
    spec = yaml.safe_load((REPO / "profiles/vl/dvc.yaml").read_text())
    assert spec["plots"] == [f"../../plots/vl/{p}" for p in VL_PLOTS]  # relative to profiles/vl/
    outs = {o for stage in spec["stages"].values() for o in stage.get("outs", [])}
    for p in VL_PLOTS:  # every figure but evaluate's (tokens/s is measured, not reproduced) is a stage output
        stage_dir = f"plots/vl/{p.split('/')[0]}"
        assert (stage_dir in outs) == (p != "evaluate/tradeoff.png"), p


def test_pyplot_draws_off_screen_whatever_the_environment_asks():
    """A headless node whose environment names an interactive backend still gets Agg (a figure is a file)."""
    import os
    import subprocess
    import sys

    code = "from tasks.core.files import pyplot; print(pyplot().get_backend())"
    env = dict(os.environ, MPLBACKEND="TkAgg", PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip().lower() == "agg", out.stderr
