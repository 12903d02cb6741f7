"""benchmarks/experiments/privacy_gate_seeds.py: a seed's row comes from the stage's own privacy.json (the
recorded VL run's), and the summary reports the failed checks as the stage's gate judged them."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from tests.scripts import load_script

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def module():
    return load_script("benchmarks/experiments/privacy_gate_seeds.py")


@pytest.fixture(scope="module")
def recorded() -> dict:
    return json.loads((REPO / "metrics/vl/privacy.json").read_text())


def test_a_row_holds_the_gated_figures_and_their_bars(module, recorded):
    row = module.gate_row(1234, recorded)
    assert row["passed"] is recorded["passed"] and row["failures"] == []
    assert row["f1_ratio"] == pytest.approx(recorded["behaviour_f1"] / recorded["behaviour_f1_raw"])
    assert row["reid_bar"] == pytest.approx(recorded["reid_chance"] + recorded["gate"]["reid_margin"])
    assert row["reid"] == max(row["reid_mlp"], row["reid_linear"])  # the best attacker is what is gated


def test_the_summary_names_the_seeds_each_check_failed(module, recorded):
    failing = copy.deepcopy(recorded)
    failing.update(passed=False, reid_accuracy=0.099, reid_accuracy_mlp=0.099)
    failing["failures"] = [{"check": "reid_accuracy", "description": "re-identification 0.099 > 0.092"}]
    rows = [module.gate_row(1234, recorded), module.gate_row(2, failing)]
    summary = module.summarise(rows)
    assert (summary["seeds"], summary["passed"]) == (2, 1)
    assert summary["failed_checks"] == {"reid_accuracy": [2]}
    assert summary["reid"]["max"] == 0.099 and summary["reid"]["min"] == rows[0]["reid"]
    with pytest.raises(ValueError, match="no seeds"):
        module.summarise([])


def test_a_missing_family_is_refused_before_any_run(module, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        module.main(["--family", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")])
    assert info.value.code == 2 and "no config.json" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
