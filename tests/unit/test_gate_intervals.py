"""data_contracts.bootstrap, data_contracts.items and the interval helpers of data_contracts.gates:
the resampling, the per-item files (evaluate's and rl's) and the intervals the gates judge, against
direct computations."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from data_contracts.bootstrap import interval, resample_matrix, resamples
from data_contracts.items import item_row, read_items, read_rl_items


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _results(tmp_path, sums, tokens, correct, exits=(1, 2, 4)):
    rows = [
        item_row("loss", f"b{i}", d, loss_sum=float(sums[i][k]), tokens=int(tokens[i]))
        for k, d in enumerate(exits)
        for i in range(len(tokens))
    ]
    rows += [
        item_row("accuracy", f"q{i}", d, correct=bool(correct[i][k]))
        for k, d in enumerate(exits)
        for i in range(len(correct))
    ]
    return read_items(_write(tmp_path / "items.jsonl", rows))


def test_the_matrix_holds_the_same_draws_as_the_iterator_and_intervals_propagate_nan():
    m = resample_matrix(7, 50, seed=3)
    assert m.shape == (50, 7) and (m == np.stack(list(resamples(7, 50, 3)))).all()
    assert m.min() >= 0 and m.max() <= 6
    draws = np.arange(1001.0)
    assert interval(draws, 0.95) == pytest.approx((25.0, 975.0))
    assert interval(draws, 0.5) == pytest.approx((250.0, 750.0))
    assert all(math.isnan(v) for v in interval(np.array([1.0, np.nan]), 0.95))
    with pytest.raises(ValueError, match="confidence must be in"):
        interval(draws, 1.0)
    with pytest.raises(ValueError, match="no items"):
        resample_matrix(0, 10, 0)


def test_the_vectorised_depth_ratio_is_the_frames(tmp_path):
    from data_contracts.gates import gates_frame, loss_vs_shallower

    losses = {1: 4.0, 2: float("nan"), 4: 3.5, 8: 3.9}  # exit 2 diverged: skipped as a shallower member
    frame = gates_frame(
        {f"exit_{d}": {"loss": v, "accuracy": 0.5} for d, v in losses.items()},
        {f"exit_{d}": {"relative_loss_change": 0.0} for d in losses},
    )
    ratios = loss_vs_shallower(np.array([list(losses.values())] * 3))  # any leading axis
    expected = [np.nan, np.nan, 3.5 / 4.0, 3.9 / 3.5]
    np.testing.assert_allclose(ratios, [expected] * 3)
    np.testing.assert_allclose(frame["loss_vs_shallower"].to_numpy(), expected)
    assert np.isnan(loss_vs_shallower(np.array([0.0, 1.0]))).all()  # no positive shallower loss


def test_intervals_are_the_bootstrap_of_the_gates_own_statistics(tmp_path):
    from data_contracts.gates import gate_intervals

    rng = np.random.default_rng(0)
    tokens = rng.integers(5, 30, 40)
    sums = rng.uniform(1.0, 3.0, (40, 3)) * tokens[:, None]
    correct = rng.random((60, 3)) < [0.3, 0.5, 0.6]
    items = _results(tmp_path, sums, tokens, correct)
    floors = {1: 0.1, 2: 0.2, 4: 0.7}
    out = gate_intervals(items, math.log(2048), floors.get, resamples=500, confidence=0.9, seed=11)
    # by hand: the same draws, every member on each draw
    idx = resample_matrix(40, 500, 11)
    losses = np.stack([sums[i].sum(0) / tokens[i].sum() for i in idx])
    acc_idx = resample_matrix(60, 500, 12)
    acc = np.stack([correct[i].mean(0) for i in acc_idx])
    best = np.minimum(losses[:, 0], losses[:, 1])
    for k, d in enumerate((1, 2, 4)):
        assert out[d]["loss"] == pytest.approx(interval(losses[:, k], 0.9))
        assert out[d]["loss_margin"] == pytest.approx(interval(math.log(2048) - losses[:, k], 0.9))
        assert out[d]["accuracy_over_floor"] == pytest.approx(interval(acc[:, k] - floors[d], 0.9))
    assert all(math.isnan(v) for v in out[1]["loss_vs_shallower"])
    assert out[2]["loss_vs_shallower"] == pytest.approx(interval(losses[:, 1] / losses[:, 0], 0.9))
    assert out[4]["loss_vs_shallower"] == pytest.approx(interval(losses[:, 2] / best, 0.9))
    # items without scatter: every interval is the estimate itself
    flat = _results(tmp_path, np.full((5, 3), 20.0), np.full(5, 10), np.ones((4, 3), bool))
    for stats in gate_intervals(flat, None, None, 200, 0.95, 0).values():
        assert stats["loss"] == pytest.approx((2.0, 2.0)) and stats["accuracy_over_floor"] == (1.0, 1.0)
        assert all(math.isnan(v) for v in stats["loss_margin"])  # no ln V: no margin


def test_undecided_names_only_the_gates_whose_interval_straddles_their_bar():
    import pandas as pd

    from data_contracts.gates import gate_bars, undecided

    frame = pd.DataFrame(
        {
            "exit": [2, 8],
            "loss": [3.0, 3.3],
            "loss_low": [2.9, 3.1],
            "loss_high": [3.1, 3.5],
            "loss_vs_shallower": [np.nan, 1.04],
            "loss_vs_shallower_low": [np.nan, 0.98],
            "loss_vs_shallower_high": [np.nan, 1.12],
            "loss_margin": [4.6, 4.3],
            "loss_margin_low": [4.5, 4.1],
            "loss_margin_high": [4.7, 4.5],
            "accuracy_over_floor": [0.02, -0.05],
            "accuracy_over_floor_low": [-0.03, -0.09],
            "accuracy_over_floor_high": [0.07, -0.01],
        },
        index=["exit_2", "exit_8"],
    )
    calls = undecided(frame, gate_bars(max_loss=8.0, depth_tolerance=0.05, min_loss_margin=0.2))
    assert [(c["exit"], c["gate"], c["passes"]) for c in calls] == [
        ("exit_2", "accuracy_over_floor", True),  # [-0.03, 0.07] around its floor
        ("exit_8", "loss_vs_shallower", True),  # [0.98, 1.12] around 1.05
    ]  # exit_8's accuracy [-0.09, -0.01] is decided: below its floor
    assert calls[1]["interval"] == [0.98, 1.12] and calls[1]["bar"] == 1.05


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("not json", "line 2: not valid JSON"),
        ("[1]", "line 2: expected a JSON object"),
        ('{"set": "speed", "item": "b0", "exit": 1}', "line 2: 'set' must be 'loss' or 'accuracy'"),
        (
            '{"set": "loss", "item": "", "exit": 1, "loss_sum": 1.0, "tokens": 2}',
            "'item' must be a non-empty",
        ),
        (
            '{"set": "loss", "item": "b1", "exit": 0, "loss_sum": 1.0, "tokens": 2}',
            "'exit' must be a positive",
        ),
        (
            '{"set": "loss", "item": "b1", "exit": 1, "loss_sum": -1, "tokens": 2}',
            "'loss_sum' must be a number",
        ),
        (
            '{"set": "loss", "item": "b1", "exit": 1, "loss_sum": 1.0, "tokens": 0}',
            "'tokens' must be a positive",
        ),
        ('{"set": "accuracy", "item": "q1", "exit": 1, "correct": 1}', "'correct' must be true or false"),
        (
            '{"set": "loss", "item": "b0", "exit": 1, "loss_sum": 1.0, "tokens": 2}',
            "'b0' of exit 1 appears twice",
        ),
    ],
)
def test_a_malformed_line_is_named(tmp_path, line, message):
    first = json.dumps(item_row("loss", "b0", 1, loss_sum=1.0, tokens=2))
    last = json.dumps(item_row("accuracy", "q0", 1, correct=True))
    path = tmp_path / "items.jsonl"
    path.write_text(f"{first}\n{line}\n{last}\n")
    with pytest.raises(ValueError, match=message) as err:
        read_items(path)
    assert str(path) in str(err.value)


def test_members_must_share_their_items_and_token_counts(tmp_path):
    rows = [
        item_row("loss", "b0", 1, loss_sum=1.0, tokens=2),
        item_row("loss", "b0", 2, loss_sum=1.0, tokens=3),
        item_row("accuracy", "q0", 1, correct=True),
        item_row("accuracy", "q0", 2, correct=False),
    ]
    with pytest.raises(ValueError, match=r"loss item 'b0': token counts \[2, 3\] differ by exit"):
        read_items(_write(tmp_path / "a.jsonl", rows))
    with pytest.raises(
        ValueError, match=r"accuracy item 'q0' has results for exits \[1\], not for every exit"
    ):
        read_items(
            _write(
                tmp_path / "b.jsonl", [rows[0], item_row("loss", "b0", 2, loss_sum=1.0, tokens=2), rows[2]]
            )
        )
    with pytest.raises(ValueError, match=r"no 'accuracy' items"):
        read_items(_write(tmp_path / "c.jsonl", rows[:1]))
    with pytest.raises(ValueError, match=r"cannot read the per-item results"):
        read_items(tmp_path / "missing.jsonl")
    (tmp_path / "latin1.jsonl").write_bytes(b'{"set": "loss", "item": "\xe9"}\n')
    with pytest.raises(ValueError, match=r"latin1.jsonl: not UTF-8 text"):
        read_items(tmp_path / "latin1.jsonl")
    odd = read_items(  # an id holding U+2028 (JSON writes it raw) stays one line
        _write(tmp_path / "e.jsonl", [item_row("loss", "b\u2028x", 1, loss_sum=1.0, tokens=2), rows[2]])
    )
    assert odd.loss_items == ("b\u2028x",)
    nan = read_items(  # a diverged member's NaN loss is a result, not a malformed file
        _write(tmp_path / "d.jsonl", [item_row("loss", "b0", 1, loss_sum=float("nan"), tokens=2), rows[2]])
    )
    assert math.isnan(nan.losses()[0]) and nan.accuracies().tolist() == [1.0]


def _rl_results(tmp_path, start, end, exits=(2, 5)):
    rows = [
        item_row("rl", f"q{i}", d, correct_start=bool(start[i][k]), correct_end=bool(end[i][k]))
        for k, d in enumerate(exits)
        for i in range(len(start))
    ]
    return read_rl_items(_write(tmp_path / "rl_items.jsonl", rows))


def test_rl_change_intervals_resample_each_prompts_two_verdicts_together(tmp_path):
    from data_contracts.gates import check_rl_items_match, gate_intervals

    rng = np.random.default_rng(1)
    start = rng.random((80, 2)) < 0.4
    end = start ^ (rng.random((80, 2)) < 0.15)  # 15% of the verdicts flip
    rl = _rl_results(tmp_path, start, end)
    assert rl.exits == (2, 5) and rl.items[:2] == ("q0", "q1")
    np.testing.assert_allclose(rl.changes(), end.mean(0) - start.mean(0))
    evaluate = _results(tmp_path, np.full((3, 3), 6.0), np.full(3, 3), np.ones((5, 3), bool), exits=(2, 5, 8))
    out = gate_intervals(evaluate, None, None, 400, 0.9, seed=4, rl_items=rl)
    idx = resample_matrix(80, 400, 6)  # seed + 2
    change = np.stack([end[i].mean(0) - start[i].mean(0) for i in idx])
    for k, d in enumerate((2, 5)):
        assert out[d]["rl_accuracy_change"] == pytest.approx(interval(change[:, k], 0.9))
    assert "rl_accuracy_change" not in out[8]  # a member rl did not train
    # unpaired, the same verdicts would give a wider interval: the pairing is what the gate reads
    unpaired = np.stack(
        [end[i].mean(0) - start[j].mean(0) for i, j in zip(idx, resample_matrix(80, 400, 7), strict=True)]
    )
    lo, hi = out[2]["rl_accuracy_change"]
    assert hi - lo < np.subtract(*interval(unpaired[:, 0], 0.9)[::-1])

    metrics = {
        "members": [2, 5],
        **{
            f"exit_{d}": {
                "accuracy_start": float(start[:, k].mean()),
                "accuracy_end": float(end[:, k].mean()),
            }
            for k, d in enumerate((2, 5))
        },
    }
    check_rl_items_match(rl, metrics, ("items", "rl.json"))
    metrics["exit_5"]["accuracy_end"] += 0.01
    with pytest.raises(ValueError, match="exit 5's per-prompt accuracy_end"):
        check_rl_items_match(rl, metrics, ("items", "rl.json"))
    del metrics["exit_5"]["accuracy_end"]
    with pytest.raises(ValueError, match="rl.json: exit_5 has no accuracy_end"):
        check_rl_items_match(rl, metrics, ("items", "rl.json"))


def test_an_rl_change_straddling_its_bar_is_undecided():
    import pandas as pd

    from data_contracts.gates import gate_bars, undecided

    frame = pd.DataFrame(
        {
            "exit": [2, 5, 8],
            "rl_accuracy_change": [-0.02, -0.12, np.nan],
            "rl_accuracy_change_low": [-0.08, -0.2, np.nan],
            "rl_accuracy_change_high": [0.04, -0.05, np.nan],
        },
        index=["exit_2", "exit_5", "exit_8"],
    )
    bars = gate_bars(8.0, 0.05, 0.2, max_rl_accuracy_drop=0.0)
    assert bars["rl_accuracy_change"] == 0.0 and math.copysign(1, bars["rl_accuracy_change"]) == 1
    [call] = undecided(frame, bars)  # exit 5 decided (wholly below 0), exit 8 not trained
    assert (call["exit"], call["gate"], call["passes"], call["interval"]) == (
        "exit_2",
        "rl_accuracy_change",
        False,
        [-0.08, 0.04],
    )
    assert undecided(frame, gate_bars(8.0, 0.05, 0.2, max_rl_accuracy_drop=0.1))[0]["exit"] == "exit_5"


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"set": "accuracy", "item": "q1", "exit": 2, "correct": true}', "line 2: 'set' must be 'rl', got"),
        (
            '{"set": "rl", "item": "q1", "exit": 2, "correct_start": true}',
            "'correct_end' must be true or false",
        ),
        (
            '{"set": "rl", "item": "q0", "exit": 2, "correct_start": true, "correct_end": true}',
            "'q0' of exit 2 appears twice",
        ),
        (
            '{"set": "rl", "item": "q1", "exit": 5, "correct_start": true, "correct_end": true}',
            "rl item 'q0' has results for exits \\[2\\], not",
        ),
    ],
)
def test_a_malformed_rl_line_is_named(tmp_path, line, message):
    first = json.dumps(item_row("rl", "q0", 2, correct_start=True, correct_end=False))
    path = tmp_path / "items.jsonl"
    path.write_text(f"{first}\n{line}\n")
    with pytest.raises(ValueError, match=message) as err:
        read_rl_items(path)
    assert str(path) in str(err.value)
    path.write_text("\n")
    with pytest.raises(ValueError, match="no 'rl' items"):
        read_rl_items(path)


def test_rl_item_rows_pair_step_0_with_the_kept_step_and_read_back(tmp_path):
    from data_contracts.items import rl_item_rows

    rows = [{"id": f"rl-{i}"} for i in range(3)]
    curve = {
        2: [
            {"step": 0, "accuracy": 1 / 3, "correct": [True, False, False]},
            {"step": 5, "accuracy": 2 / 3, "correct": [True, True, False]},
            {"step": 10, "accuracy": 0.0, "correct": [False, False, False]},
        ]
    }
    items = read_rl_items(_write(tmp_path / "rl.jsonl", rl_item_rows(curve, [2], rows, kept_step=5)))
    assert items.items == ("rl-0", "rl-1", "rl-2") and items.exits == (2,)
    assert items.start[:, 0].tolist() == [1.0, 0.0, 0.0] and items.end[:, 0].tolist() == [1.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="exit 2 has no held-out evaluation at the kept step 7"):
        rl_item_rows(curve, [2], rows, kept_step=7)
    curve[2][0] = {"step": 0, "accuracy": 0.0}  # a point without its verdicts
    with pytest.raises(ValueError, match="at step 0 holds 0 verdicts for 3 prompts"):
        rl_item_rows(curve, [2], rows, kept_step=5)
