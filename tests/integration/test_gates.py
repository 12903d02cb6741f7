"""Model quality gates (tasks/gates.py, data_contracts/gates.py) on crafted metrics files."""

from __future__ import annotations

import json
import math

import pytest
from test_data_contracts import params_for_tests

from tasks.core.stage import ContractViolation, StageError
from tasks.gates import check_gates, main

LN_VOCAB = math.log(2048)
EXITS = {"model.exit_layers": [2, 4, 8]}  # the exits of the crafted files (the repo's params may differ)


def _eval(losses: dict[int, float], accuracy: float = 0.1) -> dict:
    out = {
        f"exit_{d}": {
            "loss": loss,
            "perplexity": math.exp(loss) if loss == loss else loss,
            "accuracy": accuracy,
            "tokens_per_s": 100.0,
            "params": 1000 * d,
        }
        for d, loss in losses.items()
    }
    out["checkpoint"] = "artifacts/compress"  # non-exit keys are ignored
    out["ln_vocab"] = LN_VOCAB
    return out


def _rl(start: float = 0.1, end: float = 0.2, member: int = 2) -> dict:
    return {
        "members": [member],
        "accuracy_start": start,
        "accuracy_end": end,
        f"exit_{member}": {"accuracy_start": start, "accuracy_end": end, "steps_with_gradient": 30},
    }


def _params(tmp_path, **overrides):
    return params_for_tests(
        tmp_path,
        **{
            **EXITS,
            "gates.min_accuracy": 0.0,
            "gates.min_loss_margin": 0.5,
            "gates.max_rl_accuracy_drop": 0.0,
            **overrides,
        },
    )


def _compress(changes: dict[int, float]) -> dict:
    out = {
        f"exit_{d}": {"loss_before": 3.0, "loss_after": 3.0 * (1 + c), "relative_loss_change": c}
        for d, c in changes.items()
    }
    out.update({"ratio": 0.4, "within_budget": all(c <= 0.02 for c in changes.values())})
    return out


def _items(evals: dict, blocks: int = 4, problems: int = 200, spread: float = 0.0) -> list[dict]:
    """Per-item results that agree with `evals` (as evaluate writes them): `blocks` corpus blocks of 100
    targets whose losses alternate +-`spread` (relative) around each exit's loss, and `problems` problems
    of which the first accuracy x problems are right."""
    from data_contracts.items import item_row

    rows = []
    for key, m in evals.items():
        if not (key.startswith("exit_") and isinstance(m, dict)):
            continue
        d, loss = int(key[5:]), m.get("loss", float("nan"))
        rows += [
            item_row("loss", f"block {i}", d, loss_sum=100 * loss * (1 + spread * (-1) ** i), tokens=100)
            for i in range(blocks)
        ]
        right = round(m.get("accuracy", 0.0) * problems)
        rows += [item_row("accuracy", f"p{i}", d, correct=i < right) for i in range(problems)]
    return rows


def _rl_items(rl: dict, prompts: int = 100, gained: int = 0) -> list[dict]:
    """rl's per-prompt verdicts that agree with `rl` (as the rl stage writes them): per member, the first
    accuracy_start x `prompts` prompts right before rl; at the kept step the right ones shifted by
    `gained` prompts (0: the same prompts from the first, as few changed verdicts as the change allows;
    more: `gained` newly right and as many more lost)."""
    from data_contracts.items import item_row

    rows = []
    for d in rl["members"]:
        m = rl[f"exit_{d}"]
        before, after = round(m["accuracy_start"] * prompts), round(m["accuracy_end"] * prompts)
        lost = max(before - after, 0) + gained  # the first `lost` of the right ones turn wrong
        rows += [
            item_row("rl", f"q{i}", d, correct_start=i < before, correct_end=lost <= i < lost + after)
            for i in range(prompts)
        ]
    return rows


def _write(tmp_path, evals, compress, rl=None, items=None, rl_items=None):
    """The files the gates read: evaluate's eval_quality.json and per-item results (`items`, default
    `_items(evals)`), the reproducible parts of the compress and rl metrics (what dvc.yaml declares as
    the gates' deps) and rl's per-prompt verdicts (`rl_items`, default `_rl_items(rl)`)."""
    metrics = tmp_path / "metrics"
    (metrics / "reproducible").mkdir(parents=True, exist_ok=True)
    if evals is not None:
        (metrics / "eval_quality.json").write_text(json.dumps(evals))
        evaluate = tmp_path / "reports" / "evaluate"
        evaluate.mkdir(parents=True, exist_ok=True)
        rows = _items(evals) if items is None else items
        (evaluate / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if compress is not None:
        (metrics / "reproducible" / "compress.json").write_text(json.dumps(compress))
    rl = rl if rl is not None else _rl()
    (metrics / "reproducible" / "rl.json").write_text(json.dumps(rl))
    reports = tmp_path / "reports" / "rl"
    reports.mkdir(parents=True, exist_ok=True)
    rows = _rl_items(rl) if rl_items is None else rl_items
    (reports / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_gates_pass(tmp_path):
    # exit_8 is 3% worse than exit_4: inside the 5% depth tolerance.
    _write(tmp_path, _eval({2: 4.0, 4: 3.0, 8: 3.09}), _compress({2: 0.015, 4: 0.0, 8: 0.0}))
    metrics = check_gates(_params(tmp_path))
    assert (
        metrics["passed"] and metrics["expectations_failed"] == 0 and metrics["expectations_evaluated"] == 16
    )
    assert metrics["exits"]["exit_8"]["loss_vs_shallower"] == pytest.approx(1.03)
    assert metrics["exits"]["exit_2"]["loss_vs_shallower"] is None
    saved = json.loads((tmp_path / "metrics" / "gates.json").read_text())
    assert saved["passed"] and saved["thresholds"]["max_loss"] == 8.0
    assert (tmp_path / "reports" / "gates" / "data_docs" / "index.html").is_file()


def test_each_failing_gate_is_named_with_its_exit(tmp_path):
    # exit_2 over max_loss; exit_8 10% worse than exit_4 (tolerance 5%); exit_4 over its compression
    # budget (5% > 2%); every exit's accuracy (0.1) below the minimum (0.2).
    _write(tmp_path, _eval({2: 9.0, 4: 3.0, 8: 3.3}), _compress({2: 0.0, 4: 0.05, 8: 0.0}))
    params = _params(tmp_path, **{"gates.min_accuracy": 0.2})
    with pytest.raises(ContractViolation) as err:
        check_gates(params)
    message = str(err.value)
    assert "model quality gates failed" in message
    by_column = {(f["expectation"], f["column"]): set(f["rows"]) for f in err.value.failures}
    # the per-item gates judge the interval's bound nearest the bar (items without spread: the value)
    assert by_column == {
        ("expect_column_values_to_be_between", "loss_low"): {"exit_2"},
        ("expect_column_values_to_be_between", "loss_vs_shallower_low"): {"exit_8"},
        ("expect_column_values_to_be_between", "relative_loss_change"): {"exit_4"},
        ("expect_column_values_to_be_between", "loss_margin_high"): {"exit_2"},  # 9.0 > ln 2048 - 0.5
        ("expect_column_values_to_be_between", "accuracy_over_floor_high"): {"exit_2", "exit_4", "exit_8"},
    }
    assert "held-out loss below gates.max_loss=8.0" in message and "exit_2: 9\n" in message
    assert "gates.depth_tolerance=0.05" in message and "exit_8: 1.1" in message
    assert "compress.max_relative_loss_increase=0.02" in message and "exit_4: 0.05" in message
    saved = json.loads((tmp_path / "metrics" / "gates.json").read_text())
    assert not saved["passed"] and saved["expectations_failed"] == 5
    assert saved["failing_exits"] == ["exit_2", "exit_4", "exit_8"]
    pages = list(
        (tmp_path / "reports" / "gates" / "data_docs" / "validations" / "model_gates").rglob("*.html")
    )
    assert len(pages) == 1 and "exit_8" in pages[0].read_text()


def test_nan_loss_and_missing_exit_fail(tmp_path):
    evals = _eval({2: 4.0, 4: float("nan")})  # exit_8 not evaluated, exit_4 diverged
    _write(tmp_path, evals, _compress({2: 0.0, 4: 0.0, 8: 0.0}))
    with pytest.raises(ContractViolation) as err:
        check_gates(_params(tmp_path))
    names = {f"{f['expectation']}({f['column']})": set(f["rows"]) for f in err.value.failures}
    assert names["expect_column_values_to_not_be_null(loss)"] == {"exit_4", "exit_8"}
    assert names["expect_column_values_to_not_be_null(accuracy)"] == {"exit_8"}
    assert "expect_column_distinct_values_to_equal_set(exit)" not in names  # compress has every exit


def test_exit_set_must_match_the_model(tmp_path):
    _write(tmp_path, _eval({2: 4.0, 8: 3.0}), _compress({2: 0.0, 8: 0.0}))
    with pytest.raises(
        ContractViolation, match=r"expect_column_distinct_values_to_equal_set\(exit\).*observed: "
    ):
        check_gates(_params(tmp_path))


def test_missing_or_malformed_metrics_are_stage_errors(tmp_path, capsys):
    _write(tmp_path, None, _compress({2: 0.0}))
    with pytest.raises(
        StageError, match=r"eval_quality.json not found \(run the evaluate stage first\)"
    ) as err:
        check_gates(_params(tmp_path))
    assert not isinstance(err.value, ContractViolation)
    _write(tmp_path, {"loss": 3.0}, _compress({2: 0.0}))
    with pytest.raises(StageError, match=r"eval_quality.json: no exit_<d> entries"):
        check_gates(_params(tmp_path))
    (tmp_path / "metrics" / "reproducible" / "compress.json").write_text("{not json")
    sets = [f"paths.{k}_dir={tmp_path / k}" for k in ("data", "metrics", "plots", "reports")]
    assert main([arg for s in sets for arg in ("--set", s)]) == 2
    assert "compress.json: not valid JSON" in capsys.readouterr().err


def test_gates_frame_ratios():
    from data_contracts.gates import gates_frame

    frame = gates_frame(_eval({2: 4.0, 4: 3.0, 8: 3.6}), _compress({2: 0.0, 4: 0.0, 8: 0.0}))
    assert list(frame.index) == ["exit_2", "exit_4", "exit_8"]
    assert math.isnan(frame.loc["exit_2", "loss_vs_shallower"])
    assert frame.loc["exit_4", "loss_vs_shallower"] == pytest.approx(0.75)
    assert frame.loc["exit_8", "loss_vs_shallower"] == pytest.approx(1.2)  # vs the best shallower (3.0)
    with pytest.raises(ValueError, match="compress.json: exit_2 must be an object"):
        gates_frame(_eval({2: 1.0}), {"exit_2": 0.5})


def test_a_uniform_model_and_an_accuracy_zero_model_fail_the_tiny_defaults(tmp_path):
    # The repo's own params.yaml (exits, floors, margin): a uniform prediction (loss ln V at every exit,
    # no correct answer) fails on loss and accuracy; good losses with accuracy 0 fail on accuracy.
    repo = params_for_tests(tmp_path)
    exits = list(repo.model.exit_layers)
    floored = {f"exit_{d}" for d in exits if repo.gates.accuracy_floor(d) > 0}
    assert repo.gates.min_loss_margin > 0 and floored, "the tiny defaults must be able to fail"
    no_change = _compress({d: 0.0 for d in exits})
    _write(
        tmp_path, _eval({d: LN_VOCAB for d in exits}, accuracy=0.0), no_change, _rl(0.0, 0.0, repo.dae_exit)
    )
    with pytest.raises(ContractViolation) as err:
        check_gates(repo)
    by_column = {f["column"]: set(f["rows"]) for f in err.value.failures}
    assert by_column["loss_margin_high"] == {f"exit_{d}" for d in exits}
    assert by_column["accuracy_over_floor_high"] == floored
    assert not json.loads((tmp_path / "metrics" / "gates.json").read_text())["passed"]

    _write(
        tmp_path,
        _eval({d: 2.0 - 0.01 * d for d in exits}, accuracy=0.0),
        no_change,
        _rl(0.0, 0.0, repo.dae_exit),
    )
    with pytest.raises(ContractViolation) as err:
        check_gates(repo)
    assert {f["column"]: set(f["rows"]) for f in err.value.failures} == {"accuracy_over_floor_high": floored}


def test_accuracy_zero_fails_with_good_losses(tmp_path):
    _write(tmp_path, _eval({2: 2.0, 4: 1.5, 8: 1.4}, accuracy=0.0), _compress({2: 0.0, 4: 0.0, 8: 0.0}))
    with pytest.raises(ContractViolation) as err:
        check_gates(_params(tmp_path, **{"gates.min_accuracy": {4: 0.1, 8: 0.3}}))
    by_column = {f["column"]: set(f["rows"]) for f in err.value.failures}
    assert by_column == {"accuracy_over_floor_high": {"exit_4", "exit_8"}}  # exit_2 has no floor
    assert "accuracy at least its floor" in str(err.value)


def test_rl_making_its_member_worse_fails(tmp_path):
    _write(tmp_path, _eval({2: 2.0, 4: 1.5, 8: 1.4}), _compress({2: 0.0, 4: 0.0, 8: 0.0}), _rl(0.3, 0.25))
    with pytest.raises(ContractViolation) as err:
        check_gates(_params(tmp_path))
    # 5 of the 30 prompts it answered turn wrong, none turns right: the whole interval lies below 0
    assert {f["column"]: set(f["rows"]) for f in err.value.failures} == {
        "rl_accuracy_change_high": {"exit_2"}
    }
    assert "not worse after rl than before" in str(err.value)
    assert check_gates(_params(tmp_path, **{"gates.max_rl_accuracy_drop": 0.06}))["passed"]
    (tmp_path / "metrics" / "reproducible" / "rl.json").write_text(json.dumps({"members": [2], "exit_2": {}}))
    with pytest.raises(StageError, match="rl.json: exit_2 .*has no accuracy_start/accuracy_end"):
        check_gates(_params(tmp_path))


def _noisy_deepest(evals: dict, deepest: int, spread: float) -> list[dict]:
    """`_items(evals)` with the deepest exit's block losses alternating +-`spread` (relative) around its
    loss: the other members stay flat, so the pairing cannot cancel the deepest member's noise."""
    rows = _items(evals)
    noisy = _items({f"exit_{deepest}": evals[f"exit_{deepest}"]}, spread=spread)
    return [r for r in rows if not (r["exit"] == deepest and r["set"] == "loss")] + [
        r for r in noisy if r["set"] == "loss"
    ]


def test_a_depth_ratio_whose_interval_straddles_the_bar_passes_undecided_and_fails_on_its_estimate(tmp_path):
    # exit_8 is 10% worse than exit_4 (tolerance 5%), but its 4 blocks' losses scatter +-50%: the items
    # cannot tell 1.10 from 1.05, so the interval verdict passes it, reported undecided; the point
    # verdict fails it. Without the scatter the interval is the estimate and both verdicts fail it.
    evals = _eval({2: 4.0, 4: 3.0, 8: 3.3})
    _write(tmp_path, evals, _compress({2: 0.0, 4: 0.0, 8: 0.0}), items=_noisy_deepest(evals, 8, 0.5))
    metrics = check_gates(_params(tmp_path))
    assert metrics["passed"] and metrics["verdict"] == "interval"
    [open_call] = metrics["undecided"]
    assert (open_call["exit"], open_call["gate"], open_call["passes"]) == (
        "exit_8",
        "loss_vs_shallower",
        False,
    )
    lo, hi = open_call["interval"]
    assert lo < 1.05 < hi and open_call["estimate"] == pytest.approx(1.1) and open_call["bar"] == 1.05
    row = metrics["exits"]["exit_8"]
    assert (row["loss_vs_shallower_low"], row["loss_vs_shallower_high"]) == (lo, hi)
    assert metrics["intervals"] == {
        "confidence": 0.95,
        "resamples": 2000,
        "seed": _params(tmp_path).seed,
        "loss_items": 4,
        "problems": 200,
        "rl_prompts": 100,
    }
    with pytest.raises(ContractViolation, match="verdict point") as err:
        check_gates(_params(tmp_path, **{"gates.verdict": "point"}))
    assert {f["column"]: set(f["rows"]) for f in err.value.failures} == {"loss_vs_shallower": {"exit_8"}}
    saved = json.loads((tmp_path / "metrics" / "gates.json").read_text())
    assert not saved["passed"] and [u["exit"] for u in saved["undecided"]] == ["exit_8"]

    _write(tmp_path, evals, _compress({2: 0.0, 4: 0.0, 8: 0.0}))
    with pytest.raises(ContractViolation) as err:
        check_gates(_params(tmp_path))
    assert {f["column"]: set(f["rows"]) for f in err.value.failures} == {"loss_vs_shallower_low": {"exit_8"}}
    assert json.loads((tmp_path / "metrics" / "gates.json").read_text())["undecided"] == []


def test_missing_malformed_or_foreign_per_item_results_are_stage_errors(tmp_path):
    evals = _eval({2: 4.0, 4: 3.0, 8: 3.09})
    _write(tmp_path, evals, _compress({2: 0.0, 4: 0.0, 8: 0.0}))
    items = tmp_path / "reports" / "evaluate" / "items.jsonl"
    good = items.read_text()
    items.unlink()
    with pytest.raises(StageError, match=r"items.jsonl not found \(run the evaluate stage"):
        check_gates(_params(tmp_path))
    lines = good.splitlines()
    items.write_text("\n".join([*lines[:2], '{"set": "loss", "item": "block 9", "exit": 2}', *lines[2:]]))
    with pytest.raises(StageError, match=r"items.jsonl: line 3: 'loss_sum' must be a number >= 0 or NaN"):
        check_gates(_params(tmp_path))
    items.write_text("\n".join(line for line in lines if '"block 1"' not in line or '"exit": 8' not in line))
    with pytest.raises(
        StageError, match=r"loss item 'block 1' has results for exits \[2, 4\], not for every"
    ):
        check_gates(_params(tmp_path))
    # the items of another evaluation (another accuracy) are not judged against these metrics
    items.write_text("".join(json.dumps(r) + "\n" for r in _items(_eval({2: 4.0, 4: 3.0, 8: 3.09}, 0.5))))
    with pytest.raises(StageError, match=r"exit 2's per-item accuracy is 0.5000, but .* reports 0.1000"):
        check_gates(_params(tmp_path))
    assert not (tmp_path / "metrics" / "gates.json").exists()  # no verdict on inputs that do not agree


def test_an_rl_drop_whose_interval_straddles_zero_passes_undecided_and_fails_on_its_estimate(tmp_path):
    # 30 -> 28 of 100 prompts, 5 lost and 3 gained: the prompts cannot tell the 2-point drop from none, so
    # the interval verdict passes it, reported undecided; the point verdict fails it (bar 0).
    evals, compress = _eval({2: 2.0, 4: 1.5, 8: 1.4}), _compress({2: 0.0, 4: 0.0, 8: 0.0})
    rl = _rl(0.3, 0.28)
    _write(tmp_path, evals, compress, rl, rl_items=_rl_items(rl, gained=3))
    metrics = check_gates(_params(tmp_path))
    [open_call] = metrics["undecided"]
    assert (open_call["exit"], open_call["gate"], open_call["passes"], open_call["bar"]) == (
        "exit_2",
        "rl_accuracy_change",
        False,
        0.0,
    )
    lo, hi = open_call["interval"]
    assert lo < -0.02 < 0.0 < hi and open_call["estimate"] == pytest.approx(-0.02)
    row = metrics["exits"]["exit_2"]
    assert (row["rl_accuracy_change_low"], row["rl_accuracy_change_high"]) == (lo, hi)
    assert (
        row["rl_accuracy_change_low"] is not None
        and metrics["exits"]["exit_4"]["rl_accuracy_change_low"] is None
    )
    with pytest.raises(ContractViolation) as err:
        check_gates(_params(tmp_path, **{"gates.verdict": "point"}))
    assert {f["column"]: set(f["rows"]) for f in err.value.failures} == {"rl_accuracy_change": {"exit_2"}}


def test_missing_malformed_or_foreign_rl_verdicts_are_stage_errors(tmp_path):
    evals, compress = _eval({2: 2.0, 4: 1.5, 8: 1.4}), _compress({2: 0.0, 4: 0.0, 8: 0.0})
    _write(tmp_path, evals, compress)
    items = tmp_path / "reports" / "rl" / "items.jsonl"
    good = items.read_text()
    items.unlink()
    with pytest.raises(StageError, match=r"rl/items.jsonl not found \(run the rl stage"):
        check_gates(_params(tmp_path))
    lines = good.splitlines()
    items.write_text("\n".join([*lines[:4], lines[4].replace("true", "1").replace("false", "0"), *lines[5:]]))
    with pytest.raises(
        StageError, match=r"items.jsonl: line 5: 'correct_start' must be true or false, got [01]"
    ):
        check_gates(_params(tmp_path))
    # another run's verdicts (another accuracy at the kept step), or another member's
    items.write_text("".join(json.dumps(r) + "\n" for r in _rl_items(_rl(0.1, 0.3))))
    with pytest.raises(
        StageError, match=r"exit 2's per-prompt accuracy_end is 0.3000, but .*rl.json reports 0.2000"
    ):
        check_gates(_params(tmp_path))
    items.write_text("".join(json.dumps(r) + "\n" for r in _rl_items(_rl(member=4))))
    with pytest.raises(StageError, match=r"items.jsonl has members \[4\], .*rl.json has \[2\]"):
        check_gates(_params(tmp_path))
    assert not (tmp_path / "metrics" / "gates.json").exists()
