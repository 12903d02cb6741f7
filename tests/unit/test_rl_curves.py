"""The rl stage's figure and its CSV (tasks/rl.py write_curves), from a history of two members."""

from __future__ import annotations

import csv

from PIL import Image

from tasks.rl import CURVE_KEYS, write_curves


def _history(members=(2, 5), steps=12):
    return {
        d: [{"step": s, **{k: (s * d % 7) / 7 for k in CURVE_KEYS}} for s in range(1, steps + 1)]
        for d in members
    }


def test_rl_curves_keep_every_step_of_every_member_and_draw_the_held_out_accuracy(tmp_path):
    history = _history()
    held_out = {
        2: [{"step": s, "accuracy": a, "reward": a + 0.1} for s, a in ((0, 0.48), (6, 0.45), (12, 0.5))]
    }
    write_curves(history, tmp_path, "bppo", held_out=held_out, window=5)  # member 5 has none
    with open(tmp_path / "curves.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(int(r["step"]), r["member"]) for r in rows] == [
        (s, f"exit_{d}") for d in (2, 5) for s in range(1, 13)
    ]
    assert float(rows[3]["reward"]) == round(history[2][3]["reward"], 6)  # raw values, not the running mean
    with Image.open(tmp_path / "curves.png") as im:
        assert im.format == "PNG" and im.size[0] > im.size[1] > 0


def test_a_member_without_steps_still_gets_a_figure(tmp_path):
    write_curves({2: []}, tmp_path, "grpo", held_out={2: [{"step": 0, "accuracy": 0.4, "reward": 0.5}]})
    assert (tmp_path / "curves.png").stat().st_size > 0
    assert (tmp_path / "curves.csv").read_text().splitlines() == ["step,member," + ",".join(CURVE_KEYS)]
