"""The route stage (tasks/route.py) on the micro workspace: outputs, metrics that agree with the per
problem report and with each member's own greedy answers, the threshold parameter's extremes, and bad
input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from test_evaluate import EXITS, build_workspace, write_params


@pytest.fixture(scope="module")
def routed(session_tmp, tmp_path_factory):
    from tasks.route import main

    root = build_workspace(session_tmp, tmp_path_factory.mktemp("route") / "ws", compressed=True)
    shutil.rmtree(root / "artifacts" / "route")
    assert main(["--params", str(root / "params.yaml")]) == 0
    return root


def test_outputs_and_metrics(routed):
    from tasks.core.artifacts import load_family
    from tasks.release.router import Router

    root = routed
    m = json.loads((root / "metrics/route.json").read_text())
    rep = json.loads((root / "metrics/reproducible/route.json").read_text())
    assert rep == m  # nothing measured in it
    assert m["exits"] == EXITS and m["eval_problems"] == 8 and m["select_rows"] == 12
    rows = [json.loads(line) for line in (root / "reports/route/routes.jsonl").read_text().splitlines()]
    assert len(rows) == 8
    for d in EXITS:  # always-member accuracy is the mean of the per-problem report
        assert m["members"][f"exit_{d}"]["accuracy"] == pytest.approx(
            np.mean([r["correct"][str(d)] for r in rows])
        )
        assert m["members"][f"exit_{d}"]["layers_per_request"] == m["member_layers"][str(d)]
    assert m["always_deepest"] == m["members"][f"exit_{EXITS[-1]}"]
    # the router's point is the per-problem routing of the report
    acc = np.mean([r["correct"][str(r["member"])] for r in rows])
    overhead = m["probe_layers"] if m["threshold"] < 1 else 0
    layers = np.mean([m["member_layers"][str(r["member"])] for r in rows]) + overhead
    assert m["router"]["accuracy"] == pytest.approx(acc)
    assert m["router"]["layers_per_request"] == pytest.approx(layers)
    assert m["relative_layer_saving"] == pytest.approx(1 - layers / m["always_deepest"]["layers_per_request"])
    assert m["accuracy_loss"] == pytest.approx(m["always_deepest"]["accuracy"] - acc)
    assert m["goal"]["met"] == (m["relative_layer_saving"] >= 0.4 and m["accuracy_loss"] <= 0.01 + 1e-12)
    # the curve: threshold 0 = all cheapest, 1 = all deepest, cost non-decreasing below 1
    curve = m["curve"]
    assert curve[0]["threshold"] == 0.0 and curve[-1]["threshold"] == 1.0
    assert curve[-1]["layers_per_request"] == m["always_deepest"]["layers_per_request"]
    assert curve[-1]["accuracy"] == m["always_deepest"]["accuracy"]
    cheapest = min(m["member_layers"].values())
    assert curve[0]["layers_per_request"] == cheapest + m["probe_layers"]
    costs = [p["layers_per_request"] for p in curve[:-1]]
    assert costs == sorted(costs)
    # the router file: the calibrated threshold, loadable, and for this family
    router = Router.load(root / "artifacts/route/router.json")
    assert router.threshold == m["threshold"] and m["threshold_source"] == "calibrated"
    model, _ = load_family(root / "artifacts/compress")
    router.check_model(model)
    assert (root / "plots/route/cost_quality.png").stat().st_size > 0
    assert (root / "plots/route/cost_quality.csv").read_text().count("\n") == 1 + 2 * 101


def test_member_correctness_is_each_members_own_greedy_answer(routed):
    """The report's per-member correctness equals a separate greedy decode of each member."""
    from ruyi_model.decoding import greedy_generate
    from tasks.core.artifacts import load_family
    from tasks.core.files import read_jsonl
    from tasks.data.mathgen import answers_match, extract_answer

    root = routed
    model, tok = load_family(root / "artifacts/compress")
    problems = read_jsonl(root / "data/validated/eval.jsonl")[:8]
    rows = [json.loads(line) for line in (root / "reports/route/routes.jsonl").read_text().splitlines()]
    for d in EXITS:
        texts = greedy_generate(model, tok, [p["question"] for p in problems], d, 12, batch_size=1)
        ok = [answers_match(extract_answer(t), p["answer"]) for t, p in zip(texts, problems)]
        assert ok == [r["correct"][str(d)] for r in rows]


@pytest.mark.parametrize("threshold", [0.0, 1.0])
def test_threshold_parameter_extremes(routed, tmp_path, threshold):
    from tasks.route import main

    root = tmp_path / "ws"
    shutil.copytree(routed, root)
    write_params(root, route={"threshold": threshold})
    assert main(["--params", str(root / "params.yaml")]) == 0
    m = json.loads((root / "metrics/route.json").read_text())
    assert m["threshold"] == threshold and m["threshold_source"] == "route.threshold"
    # the cheapest member by layers (the DaE member, with its blocks, may cost more than a deeper exit)
    cheapest = min(EXITS[:-1], key=lambda d: (m["member_layers"][str(d)], d))
    want = cheapest if threshold == 0.0 else EXITS[-1]
    assert m["router"]["share"][str(want)] == 1.0
    assert json.loads((root / "artifacts/route/router.json").read_text())["threshold"] == threshold


def test_bad_select_row_names_file_and_line(routed, tmp_path, capsys):
    from tasks.route import main

    root = tmp_path / "ws"
    shutil.copytree(routed, root)
    write_params(root)  # paths inside the copy
    select = root / "data/validated/select.jsonl"
    lines = select.read_text().splitlines()
    lines[2] = json.dumps({"id": "x", "answer": "3"})  # no prompt
    select.write_text("\n".join(lines) + "\n")
    before = (root / "artifacts/route/router.json").read_bytes()
    assert main(["--params", str(root / "params.yaml")]) == 2
    err = capsys.readouterr().err
    assert "select.jsonl:3" in err and "prompt" in err
    assert (root / "artifacts/route/router.json").read_bytes() == before  # nothing half-published
    write_params(root, route={"probe_layers": 99})
    assert main(["--params", str(root / "params.yaml")]) == 2
    assert "route.probe_layers=99" in capsys.readouterr().err
