"""The summary `ruyi run` prints: rows from the metric files, and where each result is."""

from __future__ import annotations

import json
from pathlib import Path

from flows.report import print_summary, result_paths, summary_rows
from tasks.core.params import load_params

REPO = Path(__file__).resolve().parents[2]


def test_summary_rows_follow_the_metric_files_in_exit_order(tmp_path, capsys):
    metrics = tmp_path / "metrics"
    metrics.mkdir()
    ev = {
        "exit_8": {"loss": 5.5, "accuracy": 0.25, "tokens_per_s": 100.0, "params": 2000},
        "exit_2": {"loss": 7.25, "accuracy": 0.0, "tokens_per_s": 300.0, "params": 1000},
        "run_id": "x",
    }
    (metrics / "eval.json").write_text(json.dumps(ev))
    (metrics / "compress.json").write_text(json.dumps({"exit_2": {"relative_loss_change": 0.0125}}))
    rows = summary_rows(metrics)
    assert [r["exit"] for r in rows] == ["exit_2", "exit_8"]
    assert rows[0]["compress_change"] == 0.0125 and rows[1]["compress_change"] is None

    params_file = tmp_path / "params.yaml"
    params_file.write_text((REPO / "params.yaml").read_text())
    import yaml

    doc = yaml.safe_load(params_file.read_text())
    doc["paths"].update(
        metrics_dir=str(metrics),
        reports_dir=str(tmp_path / "reports"),
        plots_dir=str(tmp_path / "plots"),
        artifacts_dir=str(tmp_path / "artifacts"),
    )
    params_file.write_text(yaml.safe_dump(doc))
    (tmp_path / "reports" / "gates").mkdir(parents=True)
    paths = result_paths(load_params(params_file))
    assert paths["quality gates (Data Docs)"] == str(tmp_path / "reports" / "gates")
    assert paths["evaluation report"].endswith("(not written yet)")
    assert paths["release"] == "- (not deployed yet)"
    print_summary(params_file)
    out = capsys.readouterr().out
    assert "7.250" in out and "25.0%" in out and "+1.25%" in out and "quality gates" in out


def test_the_summary_reads_the_workspace_of_its_params_file(tmp_path, monkeypatch, capsys):
    """`RUYI_WORKSPACE=/ws ruyi run` from elsewhere: the workspace-relative paths of /ws/params.yaml are
    /ws's, not the current directory's."""
    ws = tmp_path / "ws"
    (ws / "metrics").mkdir(parents=True)
    (ws / "params.yaml").write_text((REPO / "params.yaml").read_text())  # paths: metrics, reports, ...
    ev = {"exit_2": {"loss": 7.125, "accuracy": 0.5, "tokens_per_s": 10.0, "params": 10}}
    (ws / "metrics" / "eval.json").write_text(json.dumps(ev))
    (ws / "reports" / "gates").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    print_summary(ws / "params.yaml")
    out = capsys.readouterr().out
    assert "7.125" in out and "50.0%" in out
    paths = result_paths(load_params(ws / "params.yaml"), ws)
    assert paths["quality gates (Data Docs)"] == str(ws / "reports" / "gates")
    assert paths["metrics"] == str(ws / "metrics")


def test_recipe_lines_show_the_dae_rl_and_compression_gains(tmp_path):
    from flows.report import recipe_lines

    assert recipe_lines(tmp_path) == []  # nothing run yet
    comp = {
        "dae_exit": 2,
        "removed_fraction": {"blocks": 0.55, "head": 0.3, "blocks_and_head": 0.45},
        "dae_control": {
            "before_dae": {"accuracy": 0.1},
            "dense": {"accuracy": 0.3},
            "decomposed": {"accuracy": 0.29},
            "gain_retained": {"accuracy": 0.95, "solution_loss": 0.9},
        },
    }
    rl = {
        "algorithm": "bppo",
        "members": [2],
        "steps": 30,
        "steps_with_gradient": 27,
        "accuracy_start": 0.3,
        "accuracy_end": 0.36,
    }
    (tmp_path / "compress.json").write_text(json.dumps(comp))
    (tmp_path / "rl.json").write_text(json.dumps(rl))
    dae, rl_line, compression = recipe_lines(tmp_path)
    assert "10.0% before DaE -> 30.0% dense -> 29.0% decomposed" in dae and "accuracy 0.95" in dae
    assert "30.0% -> 36.0%; steps" in rl_line and "27/30" in rl_line  # no curve between: none printed
    rl["exit_2"] = {"held_out_curve": {"step": [0, 10, 20, 30], "accuracy": [0.3, 0.32, 0.35, 0.36]}}
    (tmp_path / "rl.json").write_text(json.dumps(rl))
    rl_line = recipe_lines(tmp_path)[1]
    assert "30.0% -> 36.0% (exit 2 by step: 0: 30%, 10: 32%, 20: 35%, 30: 36%); steps" in rl_line
    # rl.select_prompts kept an earlier step's weights: which, why, and what the last step scored.
    rl.update(accuracy_end=0.35, accuracy_last_step=0.36)
    rl["selection"] = {"prompts": 200, "kept_step": 20, "kept_accuracy": 0.415}
    (tmp_path / "rl.json").write_text(json.dumps(rl))
    rl_line = recipe_lines(tmp_path)[1]
    assert (
        "30.0% -> 35.0% (exit 2 by step: 0: 30%, 10: 32%, 20: 35%, 30: 36%); kept step 20 (best on 200 "
        "select problems: 41.5%; the last step scored 36.0% held-out); steps with a gradient 27/30"
    ) in rl_line
    assert "55.0% of the DaE blocks" in compression and "45.0% of both" in compression
    assert "ratio" not in compression  # no ratio in the metrics, or the one asked: nothing to say
    comp.update(ratio=0.31, ratio_used=0.31)
    (tmp_path / "compress.json").write_text(json.dumps(comp))
    assert "ratio" not in recipe_lines(tmp_path)[2]
    comp["ratio_used"] = 0.27  # the budget search lowered it
    (tmp_path / "compress.json").write_text(json.dumps(comp))
    assert recipe_lines(tmp_path)[2].endswith(
        "45.0% of both (ratio 0.27 of the 0.31 asked: the largest within the loss budget on the decision set)"
    )
    route = {
        "threshold": 0.6,
        "always_deepest": {"layers_per_request": 8.0, "accuracy": 0.675},
        "router": {"layers_per_request": 4.5, "accuracy": 0.67},
        "relative_layer_saving": 0.4375,
        "goal": {"met": True},
    }
    (tmp_path / "route.json").write_text(json.dumps(route))
    router = recipe_lines(tmp_path)[-1]
    assert (
        "threshold 0.6" in router and "4.5 layers/request at 67.0% vs always-deepest 8.0 at 67.5%" in router
    )
    assert "43.8% fewer layers, goal met" in router
    # The served speculative tier, from the deploy smoke test's record.
    smoke = {
        "tiers": {
            "exit_8": {"requests": 4},
            "speculative": {
                "requests": 4,
                "completion_tokens_mean": 48.5,
                "same_as_deepest": 1.0,
                "acceptance_rate": 0.9728,
                "verifications": 20,
            },
        }
    }
    (tmp_path / "deploy_smoke.json").write_text(json.dumps(smoke))
    assert recipe_lines(tmp_path)[-2] == router
    assert recipe_lines(tmp_path)[-1] == (
        "speculative tier (deploy smoke test, 4 questions): 100% of the completions equal to the deepest "
        "member's; 97.3% of the drafts accepted, 194 tokens in 20 deepest-member forwards (9.7 each)"
    )


def test_target_lines_say_met_or_missed_with_the_measured_value(tmp_path):
    from flows.report import target_lines

    assert target_lines(tmp_path) == []  # nothing run yet
    ev = {"exit_2": {"accuracy": 0.30}, "exit_5": {"accuracy": 0.52}, "exit_8": {"accuracy": 0.51}}
    comp = {
        "removed_fraction": {"blocks": 0.55},
        "dae_control": {
            "before_dae": {"accuracy": 0.18},
            "dense": {"accuracy": 0.30},
            "gain_retained": {"accuracy": 0.96},
        },
    }
    rl = {"steps": 60, "steps_with_gradient": 47, "accuracy_start": 0.30, "accuracy_end": 0.34}
    for name, data in (("eval.json", ev), ("compress.json", comp), ("rl.json", rl)):
        (tmp_path / name).write_text(json.dumps(data))
    lines = target_lines(tmp_path)
    assert lines == [
        "target deepest member >= 50%: 51.0% -> met",
        "target deeper never more than 2 points below shallower: worst 1.0 points below -> met",
        "target DaE gain >= 10 points: +12.0 points -> met",
        "target rl gain >= 5 points: +4.0 points -> MISSED",
        "target rl steps with a gradient >= 80%: 47/60 -> MISSED",
        "target SVD removes >= 50% of the DaE blocks keeping >= 0.95 of the accuracy gain: 55.0% removed, "
        "0.96 kept -> met",
    ]
    ev["exit_8"]["accuracy"] = 0.49  # 3 points below exit 5, and under 50%
    (tmp_path / "eval.json").write_text(json.dumps(ev))
    lines = target_lines(tmp_path)
    assert lines[0].endswith("49.0% -> MISSED") and lines[1].endswith("worst 3.0 points below -> MISSED")


def test_the_gates_line_says_the_verdict_and_every_undecided_gate(tmp_path):
    # the line reads the gates stage's own metrics file, as tasks.release.gates.judge writes it
    from flows.report import gates_line

    assert gates_line(tmp_path) is None  # the gates have not run
    gates = {
        "passed": True,
        "verdict": "interval",
        "intervals": {"confidence": 0.95, "resamples": 2000},
        "failing_exits": [],
        "undecided": [],
    }
    (tmp_path / "gates.json").write_text(json.dumps(gates))
    assert gates_line(tmp_path) == (
        "quality gates passed, verdict interval; every per-item gate decided at 95%"
    )
    gates["undecided"] = [
        {
            "exit": "exit_8",
            "gate": "loss_vs_shallower",
            "estimate": 1.0333,
            "interval": [0.981, 1.092],
            "bar": 1.05,
            "passes": True,
        }
    ]
    (tmp_path / "gates.json").write_text(json.dumps(gates))
    assert gates_line(tmp_path) == (
        "quality gates passed, verdict interval; undecided at 95% (the draw of the items): "
        "exit_8 loss_vs_shallower 1.033 [0.981, 1.092] vs 1.050"
    )
    gates.update(passed=False, failing_exits=["exit_2"], undecided=[])
    (tmp_path / "gates.json").write_text(json.dumps(gates))
    assert gates_line(tmp_path).startswith("quality gates FAILED (exit_2), verdict interval;")


def test_the_report_command_prints_the_vl_profile_s_own_summary(capsys):
    """`python -m flows.report --params params.vl.yaml` printed the text summary (math accuracy, the
    router's plot) from the VL metrics; it now prints the VL profile's, from the committed recording."""
    from flows.report import main

    assert main(["--params", str(REPO / "params.vl.yaml")]) == 0
    out = capsys.readouterr().out
    assert "VL family, held-out generated VQA, accuracy % per exit and task type" in out
    assert "scene_count" in out and "math accuracy" not in out and "router" not in out
    assert main(["--params", str(REPO / "params.yaml")]) == 0
    out = capsys.readouterr().out
    assert "math accuracy" in out and "VL family" not in out
