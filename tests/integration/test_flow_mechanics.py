"""The Prefect flow's mechanics on a real DVC repo and a real (ephemeral) Prefect API.

The pipeline's own stages are exercised end to end in test_pipeline_e2e.py (slow); here a small real
DVC repository with three quick stages checks ordering, up-to-date skipping, partial reruns,
parameter overrides, retry classification and the published artifacts in seconds.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from flows.pipeline import (
    InfrastructureError,
    StageFailed,
    _failure_summary,
    _killing_signal,
    apply_param_overrides,
    classify_failure,
    dvc_stage_order,
    missing_local_effects,
    ruyi_pipeline,
    select_stages,
    stage_freshness,
)
from flows.report import not_this_run, not_this_run_line
from tasks.core.params import ParamsError

REPO = Path(__file__).resolve().parents[2]
DVC = str(Path(sys.executable).parent / "dvc")


@pytest.fixture(scope="module")
def prefect_api():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield


def git(ws: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=ws, check=True, capture_output=True, text=True).stdout


@pytest.fixture()
def mini_ws(tmp_path: Path) -> Path:
    """A real git + DVC repo: a -> b -> c, where b reads `seed` and c fails on demand."""
    ws = tmp_path / "ws"
    ws.mkdir()
    shutil.copy(REPO / "params.yaml", ws / "params.yaml")
    (ws / "stage.py").write_text(
        textwrap.dedent("""
        import json, os, sys, pathlib, yaml
        import time
        name = sys.argv[1]
        p = yaml.safe_load(open("params.yaml"))
        t0 = time.time()
        with open("attempts.log", "a") as f: f.write(name + "\\n")
        if name == "c" and p["evaluate"]["num_problems"] == 13:
            print("error: contract violated in data/x.jsonl row 3", file=sys.stderr)
            for i in range(40): print(f"  expectation {i}: unexpected rows [{i}]", file=sys.stderr)
            sys.exit(2)
        if name == "c" and p["evaluate"]["num_problems"] == 17:
            os.kill(os.getpid(), 9)
        if name == "c" and p["evaluate"]["num_problems"] == 19:
            print("error (transient, may be retried): cannot reach the S3 endpoint", file=sys.stderr); sys.exit(75)
        if name == "b":
            time.sleep(float(os.environ.get("MINI_B_SLEEP", "0")))
            with open("b_intervals.log", "a") as f: f.write(f"{t0} {time.time()}\\n")
        src = {"a": None, "b": "out/a.txt", "c": "out/b.txt"}[name]
        text = (open(src).read() if src else "") + f"{name}:{p['seed']};"
        pathlib.Path("out").mkdir(exist_ok=True)
        open(f"out/{name}.txt", "w").write(text)
        pathlib.Path("metrics").mkdir(exist_ok=True)
        json.dump({"len": len(text), "stage": name}, open(f"metrics/{name}.json", "w"))
        with open("runs.log", "a") as f: f.write(name + "\\n")
    """)  # noqa: E501 - stage.py's text must stay byte for byte
    )
    stages = {}
    for name, dep in (("a", None), ("b", "out/a.txt"), ("c", "out/b.txt")):
        stages[name] = {
            "cmd": f"python stage.py {name}",
            "deps": ["stage.py"] + ([dep] if dep else []),
            "outs": [f"out/{name}.txt"],
            "metrics": [{f"metrics/{name}.json": {"cache": False}}],
        }
    stages["b"]["params"] = ["seed"]
    stages["c"]["params"] = ["evaluate.num_problems"]
    # declared out of dependency order on purpose: the flow must follow `dvc dag`, not the file
    (ws / "dvc.yaml").write_text(
        yaml.safe_dump({"stages": {k: stages[k] for k in ("c", "a", "b")}}, sort_keys=False)
    )
    (ws / ".gitignore").write_text("runs.log\nattempts.log\nb_intervals.log\n")
    git(ws, "init", "-q")
    subprocess.run([DVC, "init", "-q"], cwd=ws, check=True)
    git(ws, "add", "-A")
    git(ws, "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "init")
    return ws


def runs(ws: Path) -> list[str]:
    """Stages that completed, in order."""
    log = ws / "runs.log"
    return log.read_text().split() if log.exists() else []


def attempts(ws: Path) -> list[str]:
    """Stages that started (a retried stage appears once per attempt)."""
    log = ws / "attempts.log"
    return log.read_text().split() if log.exists() else []


def test_stage_order_follows_dvc_dag(mini_ws):
    assert dvc_stage_order(mini_ws) == ["a", "b", "c"]


def test_repository_pipeline_order_is_dvc_dag_order():
    order = dvc_stage_order(REPO)
    assert order[0] == "prepare_data" and order[-1] == "deploy"
    assert set(order) == set(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"])
    dot = subprocess.run([DVC, "dag", "--dot"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    import re

    edges = re.findall(r'"([^"]+)"\s*->\s*"([^"]+)"', dot)
    for a, b in edges:
        if ":" not in a:  # `dvc dag` also shows the VL profile's stages as profiles/vl/dvc.yaml:<stage>
            assert order.index(a) < order.index(b), (a, b)
    vl = dvc_stage_order(REPO, "profiles/vl/dvc.yaml")
    assert vl == [
        "prepare_data",
        "validate_data",
        "tokenizer",
        "cpt",
        "family_sft",
        "rl",
        "evaluate",
        "gates",
        "privacy",
        "export",
        "deploy",
    ]
    for a, b in edges:
        if a.startswith("profiles/vl/dvc.yaml:"):
            assert vl.index(a.split(":")[1]) < vl.index(b.split(":")[1]), (a, b)
    expected_chain = [
        "prepare_data",
        "validate_data",
        "tokenizer",
        "cpt",
        "family_sft",
        "expand",
        "sft",
        "rl",
        "compress",
        "evaluate",
        "route",
        "gates",
        "export",
        "deploy",
    ]
    assert order == expected_chain


def test_select_stages_errors_name_the_stage():
    order = ["a", "b", "c"]
    assert select_stages(order, "b", None) == ["b", "c"]
    assert select_stages(order, None, "b") == ["a", "b"]
    with pytest.raises(ValueError, match="from_stage='x' is not a stage"):
        select_stages(order, "x", None)
    with pytest.raises(ValueError, match="comes after"):
        select_stages(order, "c", "a")


def test_overrides_are_validated_and_keep_comments(mini_ws):
    before = (mini_ws / "params.yaml").read_text()
    with pytest.raises(ParamsError, match="cpt.max_stepz"):
        apply_param_overrides(mini_ws, {"cpt.max_stepz": 3})
    with pytest.raises(ParamsError, match="cpt.lr"):
        apply_param_overrides(mini_ws, {"cpt.lr": -1})
    assert (mini_ws / "params.yaml").read_text() == before  # nothing written on error
    assert apply_param_overrides(mini_ws, {"cpt.max_steps": 70, "seed": 5}) == ["cpt.max_steps", "seed"]
    after = (mini_ws / "params.yaml").read_text()
    assert "# (--set: seed was 1234) every stage derives its RNG seeds from this" in after
    loaded = yaml.safe_load(after)
    assert loaded["cpt"]["max_steps"] == 70 and loaded["seed"] == 5
    # no overrides: the file is still validated (a misspelt section no stage tracks must not pass)
    (mini_ws / "params.yaml").write_text(after + "evalute:\n  num_problems: 3\n")
    with pytest.raises(ParamsError, match="evalute"):
        apply_param_overrides(mini_ws, {})
    (mini_ws / "params.yaml").write_text(after)
    assert apply_param_overrides(mini_ws, {}) == []


def test_figures_of_stages_outside_the_run_are_named_with_dvc_s_word_on_them(mini_ws):
    """`ruyi run --to-stage S` prints a summary from metrics files that later stages may have written
    for another model: each such stage is named as up to date, out of date, or not run here."""
    repro = [DVC, "repro", "--no-run-cache"]
    subprocess.run(repro, cwd=mini_ws, check=True, capture_output=True)
    assert stage_freshness(mini_ws, ["a", "b", "c"]) == dict.fromkeys("abc", "up to date")
    bc = {s: mini_ws / "metrics" / f"{s}.json" for s in "bc"}  # the figures a summary would print
    assert not_this_run(mini_ws, None, bc, "dvc.yaml") == {}  # no run: nothing said
    assert not_this_run(mini_ws, ["a", "b", "c"], bc, "dvc.yaml") == {}
    assert not_this_run_line({}) is None

    # a run to b with a new seed: c's figures are the old b's
    apply_param_overrides(mini_ws, {"seed": 42})
    subprocess.run([*repro, "b"], cwd=mini_ws, check=True, capture_output=True)
    status = not_this_run(mini_ws, ["a", "b"], bc, "dvc.yaml")
    assert list(status) == ["c"]
    assert status["c"].startswith("out of date") and "out/b.txt (modified)" in status["c"]
    line = not_this_run_line(status)
    assert line.startswith("figures not from this run: c: out of date")

    # a changed parameter of the stage itself
    apply_param_overrides(mini_ws, {"evaluate.num_problems": 11})
    assert "evaluate.num_problems (modified)" in stage_freshness(mini_ws, ["c"])["c"]

    # c run again, then its output removed (a clone that has the recorded metrics but never ran c)
    subprocess.run([*repro, "c"], cwd=mini_ws, check=True, capture_output=True)
    (mini_ws / "out" / "c.txt").unlink()
    assert stage_freshness(mini_ws, ["c"]) == {
        "c": "not run here (its outputs are missing: out/c.txt): the recorded figures"
    }
    # a fresh clone: no stage's outputs; c's input is b's output, missing, not changed
    b_out = (mini_ws / "out" / "b.txt").read_bytes()
    (mini_ws / "out" / "b.txt").unlink()
    assert stage_freshness(mini_ws, ["b", "c"]) == {
        "b": "not run here (its outputs are missing: out/b.txt): the recorded figures",
        "c": "not run here (its outputs are missing: out/c.txt; inputs other stages make are missing: "
        "out/b.txt): the recorded figures",
    }
    # a deleted source file is a changed input: out of date
    code = (mini_ws / "stage.py").read_bytes()
    (mini_ws / "stage.py").unlink()
    assert (
        stage_freshness(mini_ws, ["c"])["c"].startswith("out of date")
        and "stage.py (deleted)" in (stage_freshness(mini_ws, ["c"])["c"])
    )
    (mini_ws / "stage.py").write_bytes(code)
    (mini_ws / "out" / "b.txt").write_bytes(b_out)
    # a stage without its metrics file is not named (nothing of it is printed)
    (mini_ws / "metrics" / "c.json").unlink()
    assert not_this_run(mini_ws, ["a"], bc, "dvc.yaml") == {"b": "up to date"}


def test_flow_runs_in_dag_order_skips_up_to_date_and_reruns_downstream_only(mini_ws, prefect_api):
    results = ruyi_pipeline(workspace=str(mini_ws), push=False)
    assert [r["stage"] for r in results] == ["a", "b", "c"]
    assert runs(mini_ws) == ["a", "b", "c"]
    assert not any(r["skipped"] for r in results)
    assert results[2]["metrics"]["metrics/c.json"]["stage"] == "c"
    status = subprocess.run([DVC, "status"], cwd=mini_ws, capture_output=True, text=True).stdout
    assert "up to date" in status

    again = ruyi_pipeline(workspace=str(mini_ws), push=False)
    assert all(r["skipped"] for r in again) and runs(mini_ws) == ["a", "b", "c"]

    # a parameter of b changes: b and c rerun, a does not
    ruyi_pipeline(workspace=str(mini_ws), overrides={"seed": 99}, push=False)
    assert runs(mini_ws) == ["a", "b", "c", "b", "c"]
    assert "b:99;" in (mini_ws / "out/c.txt").read_text()

    # from_stage: only c and nothing upstream, even when forced by a changed parameter of c
    ruyi_pipeline(workspace=str(mini_ws), from_stage="c", overrides={"evaluate.num_problems": 5}, push=False)
    assert runs(mini_ws) == ["a", "b", "c", "b", "c", "c"]


def test_a_stage_whose_inputs_match_an_earlier_run_runs_again(mini_ws, prefect_api):
    """DVC's run cache would restore b's and c's declared outputs without running them when their inputs
    match an earlier run's, leaving what a stage writes beside them (the summary's metrics, the gates'
    Data Docs, a published release) from another run: the flow's stages always run."""
    seed = yaml.safe_load((mini_ws / "params.yaml").read_text())["seed"]
    ruyi_pipeline(workspace=str(mini_ws), push=False)
    ruyi_pipeline(workspace=str(mini_ws), overrides={"seed": 99}, push=False)
    ruyi_pipeline(workspace=str(mini_ws), overrides={"seed": seed}, push=False)  # back to the first inputs
    assert runs(mini_ws) == ["a", "b", "c", "b", "c", "b", "c"]
    assert f"b:{seed};" in (mini_ws / "out/c.txt").read_text()


def test_user_errors_are_not_retried_and_stop_the_flow(mini_ws, prefect_api):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    state = ruyi_pipeline(
        workspace=str(mini_ws), overrides={"evaluate.num_problems": 13}, push=False, return_state=True
    )
    with pytest.raises(StageFailed) as info:
        state.result()
    # the stage's own message is kept whole even though its 40 detail lines would push it out of a tail
    message = str(info.value)
    assert "contract violated in data/x.jsonl row 3" in message and "expectation 39" in message
    assert runs(mini_ws) == ["a", "b"] and attempts(mini_ws) == ["a", "b", "c"]  # c tried once, not retried
    assert not (mini_ws / "out/c.txt").exists()
    with get_client(sync_client=True) as client:
        lineage = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=["lineage"]),
                flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id]),
            )
        )
    assert len(lineage) == 1 and "| c | **failed** |" in lineage[0].data and "| b | yes |" in lineage[0].data


def test_a_transient_stage_error_is_retried_then_reported(mini_ws, prefect_api):
    with pytest.raises(InfrastructureError, match="(?s)a transient error.*cannot reach the S3 endpoint"):
        ruyi_pipeline(workspace=str(mini_ws), overrides={"evaluate.num_problems": 19}, push=False)
    assert attempts(mini_ws) == ["a", "b", "c", "c", "c"]  # one try and two retries


def test_force_recomputes_up_to_date_stages(mini_ws, prefect_api):
    ruyi_pipeline(workspace=str(mini_ws), push=False)
    results = ruyi_pipeline(workspace=str(mini_ws), from_stage="b", force=True, push=False)
    assert [r["skipped"] for r in results] == [False, False]
    assert runs(mini_ws) == ["a", "b", "c", "b", "c"]


def _declare_local_effect(ws: Path, stage: str, effect) -> None:
    spec = yaml.safe_load((ws / "dvc.yaml").read_text())
    spec["stages"][stage]["meta"] = {"local_effect": effect}
    (ws / "dvc.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))


def test_a_stage_whose_local_effect_is_missing_runs_although_dvc_finds_it_up_to_date(mini_ws, prefect_api):
    # c stands for gates/deploy: what it leaves on this machine (a report) is not a DVC output, so a
    # fresh clone of a recorded run has the lock and the committed metrics but not the report.
    _declare_local_effect(mini_ws, "c", "reports/c.html")
    ruyi_pipeline(workspace=str(mini_ws), push=False)
    assert runs(mini_ws) == ["a", "b", "c"]
    status = subprocess.run([DVC, "status"], cwd=mini_ws, capture_output=True, text=True).stdout
    assert "up to date" in status  # DVC alone would skip c from now on

    results = ruyi_pipeline(workspace=str(mini_ws), push=False)
    assert [r["skipped"] for r in results] == [True, True, False]
    assert results[2]["forced_for"] == ["reports/c.html"]
    assert runs(mini_ws) == ["a", "b", "c", "c"]

    (mini_ws / "reports").mkdir()
    (mini_ws / "reports/c.html").write_text("<html></html>")
    results = ruyi_pipeline(workspace=str(mini_ws), push=False)
    assert all(r["skipped"] for r in results) and "forced_for" not in results[2]
    assert runs(mini_ws) == ["a", "b", "c", "c"]

    # a stage outside the selection is never forced
    (mini_ws / "reports/c.html").unlink()
    ruyi_pipeline(workspace=str(mini_ws), to_stage="b", push=False)
    assert runs(mini_ws) == ["a", "b", "c", "c"]


def test_local_effects_resolve_against_the_stage_wdir_and_reject_bad_declarations(tmp_path):
    ws = tmp_path / "ws"
    (ws / "profiles/p").mkdir(parents=True)
    (ws / "reports").mkdir()
    (ws / "reports/here.txt").write_text("x")
    spec = {
        "stages": {
            "one": {
                "cmd": "true",
                "wdir": "../..",
                "meta": {"local_effect": ["reports/here.txt", "reports/gone"]},
            },
            "two": {"cmd": "true", "meta": {"local_effect": "reports/here.txt"}},
            "plain": {"cmd": "true"},
            "bad": {"cmd": "true", "meta": {"local_effect": {"path": "x"}}},
        }
    }
    (ws / "profiles/p/dvc.yaml").write_text(yaml.safe_dump(spec))
    assert missing_local_effects(ws, "one", "profiles/p/dvc.yaml") == ["reports/gone"]
    assert missing_local_effects(ws, "two", "profiles/p/dvc.yaml") == ["profiles/p/reports/here.txt"]
    assert missing_local_effects(ws, "plain", "profiles/p/dvc.yaml") == []
    with pytest.raises(ValueError, match="stage bad: meta.local_effect must be a path or a list of paths"):
        missing_local_effects(ws, "bad", "profiles/p/dvc.yaml")
    with pytest.raises(ValueError, match="has no stage 'nope'"):
        missing_local_effects(ws, "nope", "profiles/p/dvc.yaml")


@pytest.mark.parametrize("dvc_file", ["dvc.yaml", "profiles/vl/dvc.yaml"])
def test_the_pipelines_declare_the_gate_and_deploy_reports_as_local_effects(dvc_file):
    """The paths must be what the stages write (checked after real runs in the e2e tests)."""
    stages = yaml.safe_load((REPO / dvc_file).read_text())["stages"]
    for name in ("gates", "deploy"):
        assert stages[name].get("meta", {}).get("local_effect"), (dvc_file, name)
        cached = [o for o in stages[name].get("outs", []) if not isinstance(o, dict)]
        assert not cached, f"{dvc_file}: {name} has cached outputs: a fresh clone reruns it anyway"


def test_stage_output_reaches_the_run_logs(mini_ws, prefect_api):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    state = ruyi_pipeline(workspace=str(mini_ws), push=False, return_state=True)
    APILogHandler().flush()  # send the queued run logs before reading them back
    with get_client(sync_client=True) as client:
        logs = client.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[state.state_details.flow_run_id]))
        )
    messages = [log.message for log in logs]
    assert any(m.startswith("b | ") and "python stage.py b" in m for m in messages), messages


def test_two_runs_in_one_workspace_are_serialized(mini_ws, prefect_api, monkeypatch):
    """Two flow runs at once in one workspace: the workspace lock makes the second wait
    (DVC could not run two repros there anyway), so stage b's two runs never overlap and both finish."""
    import threading

    # b holds DVC's repository lock for 8 s, longer than a stage's retries wait in all (2 x 3 s): without
    # the workspace lock the second run would fail on DVC's lock; with it, it waits its turn.
    monkeypatch.setenv("MINI_B_SLEEP", "8")
    errors: list[BaseException] = []

    def one(seed: int) -> None:
        try:
            ruyi_pipeline(workspace=str(mini_ws), overrides={"seed": seed}, push=False)
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=one, args=(seed,)) for seed in (101, 202)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    assert not errors, errors
    intervals = sorted(
        tuple(map(float, line.split())) for line in (mini_ws / "b_intervals.log").read_text().splitlines()
    )
    assert len(intervals) == 2
    (s1, e1), (s2, e2) = intervals
    assert e1 <= s2, f"stage b ran twice at once: {intervals}"
    final_seed = (mini_ws / "out/c.txt").read_text().split("b:")[1].split(";")[0]
    assert final_seed in ("101", "202") and yaml.safe_load((mini_ws / "params.yaml").read_text())[
        "seed"
    ] == int(final_seed)


def test_a_killed_run_never_leaves_the_workspace_locked(tmp_path):
    """The workspace lock is an OS file lock: a run killed with SIGKILL releases it at once, and a run that
    finds it held waits (a server-side concurrency slot would stay taken until its lease expired)."""
    import threading

    from flows.pipeline import workspace_lock

    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from flows.pipeline import workspace_lock\n"
            "with workspace_lock(Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(600)\n",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        acquired = threading.Event()

        def second() -> None:
            with workspace_lock(tmp_path):
                acquired.set()

        waiter = threading.Thread(target=second, daemon=True)
        waiter.start()
        assert not acquired.wait(2.0), "a second run entered while the first held the workspace"
        assert f"pid {holder.pid}" in (tmp_path / ".dvc/tmp/ruyi-pipeline.lock").read_text()
        holder.kill()
        holder.wait()
        assert acquired.wait(10.0), "the lock of a killed run was not released"
    finally:
        if holder.poll() is None:
            holder.kill()


def test_failure_summary_keeps_the_stage_message_and_the_tail():
    out = "\n".join(
        [
            "Running stage 'x':",
            "> python -m tasks.x",
            *[f"log {i}" for i in range(30)],
            "error: data contract violated for sft",
            *[f"  row {i}" for i in range(100)],
            "ERROR: failed to reproduce 'x': failed to run: python -m tasks.x, exited with 2",
        ]
    )
    summary = _failure_summary(out)
    assert summary.splitlines()[0] == "error: data contract violated for sft"
    assert (
        "more lines in the stage output" in summary and "exited with 2" in summary and "log 3" not in summary
    )
    assert _failure_summary("just\nsome\noutput") == "just\nsome\noutput"  # no error line: the tail


@pytest.mark.parametrize("shell_forks", [False, True], ids=["exec", "fork"])
def test_a_stage_killed_by_a_signal_is_retried_as_infrastructure(mini_ws, prefect_api, shell_forks):
    # A shell that execs the stage reports the signal itself (-9); one that forks first (dash, or any
    # shell running a compound command) exits 128 + 9 = 137 and prints "Killed". Both are retried.
    if shell_forks:
        spec = yaml.safe_load((mini_ws / "dvc.yaml").read_text())
        spec["stages"]["c"]["cmd"] = "python stage.py c && :"
        (mini_ws / "dvc.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    with pytest.raises(InfrastructureError, match="infrastructure error, killed by SIGKILL"):
        ruyi_pipeline(workspace=str(mini_ws), overrides={"evaluate.num_problems": 17}, push=False)
    assert runs(mini_ws) == ["a", "b"] and attempts(mini_ws) == [
        "a",
        "b",
        "c",
        "c",
        "c",
    ]  # 3 tries, none done


@pytest.mark.parametrize(
    ("code", "name"),
    [
        (-9, "SIGKILL"),
        (137, "SIGKILL"),
        (143, "SIGTERM"),
        (-11, "SIGSEGV"),
        (1, None),
        (2, None),
        (128, None),
        (255, None),
        (None, None),
    ],
)
def test_killing_signal_reads_both_shell_conventions(code, name):
    assert _killing_signal(code) == name


def test_failures_are_classified_by_dvcs_last_exit_line_or_its_own_death():
    dvc_line = "ERROR: failed to reproduce 'x': failed to run: python -m tasks.x, exited with {}"
    # the stage's log quotes an exit code before DVC's own line: DVC's (the last) decides
    quoted = "worker exited with 75 earlier, recovered\n" + dvc_line.format(2)
    assert classify_failure(quoted, 1) == (None, False)
    assert classify_failure("note: exited with 2\n" + dvc_line.format(137), 1) == ("SIGKILL", False)
    assert classify_failure(dvc_line.format(75), 1) == (None, True)
    # dvc itself killed (no "exited with" line): its own return code tells
    assert classify_failure("Running stage 'x':\n> python -m tasks.x\n", -9) == ("SIGKILL", False)
    assert classify_failure("ERROR: unexpected error\n", 1) == (None, False)
    assert classify_failure("Connection refused\n", 1) == (None, True)
    # a stage that crashed on a bug (exit 1) after a warning that looks like infrastructure: not transient;
    # one whose final exception is a connection error: transient
    bug = "WARNING ray: health check timed out, retrying\n" + "\n".join(f"step {i}" for i in range(20))
    bug += "\nTraceback (most recent call last):\n  File 'x.py'\nKeyError: 'exit_9'\n" + dvc_line.format(1)
    assert classify_failure(bug, 1) == (None, False)
    network = "Traceback (most recent call last):\nbotocore.exceptions.EndpointConnectionError: Could not "
    network += "connect to the endpoint URL\n" + dvc_line.format(1)
    assert classify_failure(network, 1) == (None, True)


def test_artifacts_published(mini_ws, prefect_api):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    state = ruyi_pipeline(workspace=str(mini_ws), push=False, return_state=True)
    assert state.is_completed()
    # the API is shared by the module's tests, so read this run's artifacts only (by key alone, an
    # earlier run's lineage, where c was up to date or failed, may come first: CI saw it once)
    this_run = ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])
    with get_client(sync_client=True) as client:
        lineage = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["lineage"]), flow_run_id=this_run)
        )
        table = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["metrics-c"]), flow_run_id=this_run)
        )
    assert len(lineage) == 1 and "git revision" in lineage[0].data and "| c | yes |" in lineage[0].data
    assert len(table) == 1 and "c.len" in str(table[0].data)


def test_push_to_a_local_dvc_remote(mini_ws, tmp_path, prefect_api):
    remote = tmp_path / "remote"
    subprocess.run([DVC, "remote", "add", "-d", "store", str(remote)], cwd=mini_ws, check=True)
    ruyi_pipeline(workspace=str(mini_ws), push=True)
    assert remote.is_dir() and any(p.is_file() for p in remote.rglob("*"))


def test_a_failed_push_is_retried_and_reported(mini_ws, tmp_path, prefect_api):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the remote's directory should be")
    subprocess.run([DVC, "remote", "add", "-d", "store", str(blocker / "remote")], cwd=mini_ws, check=True)
    state = ruyi_pipeline(workspace=str(mini_ws), push=True, return_state=True)
    assert state.is_failed()
    with pytest.raises(InfrastructureError, match="dvc push failed"):
        state.result()
    with get_client(sync_client=True) as client:
        task_runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
        )
    push = [t for t in task_runs if t.name.startswith("dvc-push")]
    assert len(push) == 1 and push[0].run_count == 3, [(t.name, t.run_count) for t in task_runs]
    assert runs(mini_ws) == ["a", "b", "c"]  # the stages themselves completed


# --- infrastructure: DVC's output locks and an unreachable Prefect API -----------------------------


def _hold_stage_b(ws: Path, seconds: float) -> subprocess.Popen:
    """A real `dvc repro b` outside the flow (as a run with another PREFECT_HOME, which the workspace's
    concurrency limit cannot see), inside its stage command, so DVC holds the locks of b's outputs."""
    import os
    import time

    env = dict(os.environ, MINI_B_SLEEP=str(seconds))
    before = attempts(ws).count("b")
    proc = subprocess.Popen(
        [DVC, "repro", "b", "--single-item", "--force"],
        cwd=ws,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while attempts(ws).count("b") == before:
        assert proc.poll() is None and time.monotonic() < deadline, "the holding dvc repro never started b"
        time.sleep(0.2)
    return proc


def _stop(proc: subprocess.Popen) -> None:
    import os
    import signal

    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=60)


def test_dvc_busy_output_lock_is_infrastructure_and_retried(mini_ws, prefect_api):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    ruyi_pipeline(workspace=str(mini_ws), push=False)
    holder = _hold_stage_b(mini_ws, 120)
    try:
        state = ruyi_pipeline(
            workspace=str(mini_ws), from_stage="b", to_stage="b", force=True, push=False, return_state=True
        )
        # DVC's own words: "failed to reproduce 'b': '<ws>/<an output of b>' is busy, it is being blocked
        # by: (PID n): dvc repro b ..."
        busy = (
            r"(?s)a transient error \(will retry\).*failed to reproduce 'b': '.*' is busy, "
            r"it is being blocked by"
        )
        with pytest.raises(InfrastructureError, match=busy):
            state.result()
    finally:
        _stop(holder)
    with get_client(sync_client=True) as client:
        task_runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
        )
    b = [t for t in task_runs if t.name == "b"]
    # one try and two retries
    assert len(b) == 1 and b[0].run_count == 3, [(t.name, t.run_count) for t in task_runs]


def _ruyi_run(ws: Path, tmp_path: Path, *args: str, **env_extra: str) -> subprocess.CompletedProcess:
    """`ruyi run` as a user starts it (flows.cli:main), with its own empty Prefect home."""
    import os

    env = dict(
        os.environ,
        PREFECT_HOME=str(tmp_path / "prefect-home"),
        RUYI_QUIET_STAGES="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        **env_extra,
    )
    env.pop("PREFECT_API_URL", None)
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", "--no-push", *args],
        cwd=ws,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_ruyi_run_exits_1_when_the_dvc_lock_persists(mini_ws, tmp_path, prefect_api):
    ruyi_pipeline(workspace=str(mini_ws), push=False)
    holder = _hold_stage_b(mini_ws, 300)
    try:
        proc = _ruyi_run(mini_ws, tmp_path, "--from-stage", "b", "--to-stage", "b", "--force")
    finally:
        _stop(holder)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "is busy, it is being blocked by" in proc.stderr and "the retries did not help" in proc.stderr
    assert "not retried" not in proc.stderr


def test_ruyi_run_reports_an_unreachable_prefect_api_as_infrastructure(mini_ws, tmp_path):
    # The run's Prefect server cannot come up in time (as when several runs start together with empty
    # Prefect homes): `ruyi run` explains it, exits 1 and leaves no server behind.
    proc = _ruyi_run(mini_ws, tmp_path, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="0")
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "error: cannot reach the Prefect API (the Prefect server on port " in proc.stderr
    assert "was not healthy after 0 s" in proc.stderr
    assert "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS" in proc.stderr
    assert "Traceback" not in proc.stderr and runs(mini_ws) == []
    assert _processes_in(mini_ws) == []
    log = re.search(r"its log,? (/\S+\.log)", proc.stderr)  # the server's log is kept and named
    assert log and Path(log.group(1)).is_file(), proc.stderr[-3000:]
    Path(log.group(1)).unlink()


def test_ruyi_run_warns_when_its_threads_would_compete_with_other_work(mini_ws, tmp_path):
    """With every CPU busy, a run of `threads: 2` (params.yaml) says so before it starts, and how to run on
    one thread; at one thread (OMP_NUM_THREADS=1) it says nothing. (The run then stops at its Prefect
    server's start, as in the test above: the warning comes first.)"""
    from spinners import spinners, stop

    procs = spinners(sorted(os.sched_getaffinity(0)))
    try:
        busy = _ruyi_run(
            mini_ws, tmp_path, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="0", OMP_NUM_THREADS=""
        )
        one = _ruyi_run(
            mini_ws, tmp_path, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="0", OMP_NUM_THREADS="1"
        )
    finally:
        stop(procs)
    for proc in (busy, one):
        assert proc.returncode == 1 and "cannot reach the Prefect API" in proc.stderr, proc.stderr[-3000:]
        log = re.search(r"its log,? (/\S+\.log)", proc.stderr)
        if log:
            Path(log.group(1)).unlink(missing_ok=True)
    assert "warning: the machine is busy: other work is using" in busy.stderr, busy.stderr[-3000:]
    assert "2 intra-op threads (`threads: 2` in params.yaml)" in busy.stderr
    assert "With OMP_NUM_THREADS=1 the stages run on one thread" in busy.stderr
    assert "the machine is busy" not in one.stderr


def _processes_in(ws: Path, wait_s: float = 15.0) -> list[str]:
    """Command lines of live processes whose working directory is `ws` (the run's Prefect server, DVC and
    the stage all start there), after up to `wait_s` seconds for them to go."""
    import time

    from cli_signals import running

    deadline = time.monotonic() + wait_s
    while True:
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                if Path(f"/proc/{pid}/cwd").resolve() != ws.resolve() or not running(int(pid)):
                    continue
                found.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode())
            except OSError:
                continue
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_ruyi_run_stops_within_seconds_on_ctrl_c_or_sigterm_and_then_resumes(mini_ws, tmp_path, signame):
    """Ctrl-C in a terminal (SIGINT to the run's process group) or a SIGTERM to it (`timeout`, a CI
    cancel, a batch scheduler) stops the run in seconds, with 130 / 143 and one line saying so: the
    running stage is stopped and not recorded, nothing of the run is left running (its Prefect server,
    DVC, the stage), and the next run resumes at that stage. Before, the signal killed Prefect's embedded
    server with the run, and the run spent minutes retrying to report to it (still alive after 5)."""
    import signal
    import time

    from cli_signals import cli_env, interrupt_cli

    env = cli_env(PREFECT_HOME=str(tmp_path / "prefect-home"), RUYI_QUIET_STAGES="1", MINI_B_SLEEP="600")
    env.pop("PREFECT_API_URL", None)
    started: list[float] = []

    def b_sleeps() -> bool:  # b has started; then a second more, so that it is in its sleep
        if "b" in attempts(mini_ws) and not started:
            started.append(time.monotonic())
        return bool(started) and time.monotonic() - started[0] > 1.0

    returncode, took = interrupt_cli(
        ["run", "--no-push"], mini_ws, env, tmp_path / "run.err", b_sleeps, getattr(signal, signame)
    )
    stderr = (tmp_path / "run.err").read_text()
    assert returncode == {"SIGINT": 130, "SIGTERM": 143}[signame], stderr[-3000:]
    assert took < 30, (took, stderr[-3000:])
    said = {"SIGINT": "interrupted by Ctrl-C (SIGINT)", "SIGTERM": "interrupted by SIGTERM"}[signame]
    assert said in stderr and "the running stage was stopped and is not recorded" in stderr
    assert _processes_in(mini_ws) == []
    assert runs(mini_ws) == ["a"]  # b never finished
    again = _ruyi_run(mini_ws, tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert runs(mini_ws) == ["a", "b", "c"]  # resumed at b; a stayed up to date
    # the last lines: the machine, and what else used the CPUs during the run against the run's own time
    assert re.search(
        r"machine: .+; \d+ CPUs usable\nother work during the run: [\d.]+ of \d+ CPUs on average",
        again.stdout,
    ), again.stdout


def test_ruyi_run_user_errors_are_one_clear_line_without_a_traceback(mini_ws, tmp_path):
    """A bad stage name, override or pipeline file is refused before the flow starts (inside it, Prefect
    logs every exception with its traceback), exit 2, and nothing runs."""
    cases = [
        (("--from-stage", "bogus"), "bogus"),
        (("--set", 'cpt.max_steps="x"'), "cpt.max_steps: Input should be a valid integer"),
    ]
    for args, message in cases:
        proc = _ruyi_run(mini_ws, tmp_path, *args)
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    (mini_ws / "dvc.yaml").write_text("stages: [not, a, mapping\n")
    proc = _ruyi_run(mini_ws, tmp_path)
    assert proc.returncode == 2 and f"{mini_ws / 'dvc.yaml'}: not a valid pipeline file" in proc.stderr
    assert "Traceback" not in proc.stderr and runs(mini_ws) == []


def test_param_override_errors_name_params_yaml_and_the_key(mini_ws):
    before = (mini_ws / "params.yaml").read_text()
    with pytest.raises(ParamsError) as err:
        apply_param_overrides(mini_ws, {"cpt.max_steps": "150"})
    message = str(err.value)
    assert message.startswith(f"{mini_ws / 'params.yaml'}: invalid parameters")
    assert "cpt.max_steps: Input should be a valid integer (got '150')" in message
    assert "override-check" not in message and not list(mini_ws.glob(".params*"))
    assert (mini_ws / "params.yaml").read_text() == before  # nothing written
    changed = apply_param_overrides(mini_ws, {"cpt.max_steps": 151, "cpt.lr": 1e-3})
    assert changed == ["cpt.max_steps", "cpt.lr"]
    assert "lr: 0.001" in (mini_ws / "params.yaml").read_text()
