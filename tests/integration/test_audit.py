"""`ruyi audit` on a real git + DVC repository of small deterministic stages (seconds, not the pipeline).

The repository has a deterministic file output, a deterministic directory output, a measured output
(`labels: [measured]`, a timestamp) and a local DVC remote. The audit of its recorded run passes; a
nondeterministic output, a parameter changed without rerunning, and a corrupt object in the remote each
make it fail, naming the output.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flows.audit import AuditError, audit, compare, measured_outputs

REPO = Path(__file__).resolve().parents[2]

BIN = Path(sys.executable).parent
DVC = str(BIN / "dvc")

GEN = """
import json, os, pathlib, sys, time, yaml
p = yaml.safe_load(open("params.yaml"))
pathlib.Path("out").mkdir(exist_ok=True)
pathlib.Path("out/value.txt").write_text(str(p["scale"] * 7) + "\\n")
d = pathlib.Path("out/dir"); d.mkdir(exist_ok=True)
for i in range(3):
    (d / f"part{i}.txt").write_text(f"{i * p['scale']}\\n")
pathlib.Path("out/when.json").write_text(json.dumps({"time": time.time()}))
pathlib.Path("count.json").write_text(json.dumps({"parts": 3}))
if os.environ.get("AUDIT_TEST_PIDFILE"):  # the interruption test: a long stage
    pathlib.Path(os.environ["AUDIT_TEST_PIDFILE"]).write_text(str(os.getpid()))
    time.sleep(600)
"""


def _run(cmd, cwd, check=True):
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if check and proc.returncode:
        raise AssertionError(f"{cmd}: {proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return proc


def _git(repo, *args):
    return _run(["git", "-c", "user.email=ci@ruyi", "-c", "user.name=ci", *args], repo)


@pytest.fixture()
def recorded(tmp_path) -> Path:
    """A git + DVC repo whose run is recorded (dvc.lock committed) and pushed to a local remote."""
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    _run([DVC, "init", "-q"], repo)
    (repo / "gen.py").write_text(GEN)
    (repo / "params.yaml").write_text("scale: 3\n")
    (repo / "dvc.yaml").write_text(
        yaml.safe_dump(
            {
                "stages": {
                    "gen": {
                        "cmd": f"{sys.executable} gen.py",
                        "deps": ["gen.py"],
                        "params": ["scale"],
                        "outs": [
                            "out/value.txt",
                            "out/dir",
                            {"out/when.json": {"labels": ["measured"]}},
                            {"count.json": {"cache": False}},  # git-tracked, as metrics/reproducible/
                        ],
                    }
                }
            }
        )
    )
    _run([DVC, "remote", "add", "-d", "local", str(tmp_path / "remote")], repo)
    _run([DVC, "repro"], repo)
    _run([DVC, "push"], repo)
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "recorded run")
    return repo


def test_a_recorded_run_reproduces(recorded, tmp_path):
    report = audit(recorded, log=lambda _: None, workdir=tmp_path)
    assert report.pulled and report.ok, report.to_dict()
    verdicts = {c.path: c.status for c in report.checks}
    assert verdicts == {
        "out/value.txt": "reproduced",
        "out/dir": "reproduced",
        "out/when.json": "measured",
        "count.json": "reproduced",
    }
    # what else used the CPUs during the reproduction is measured and reported (the stages' own time too)
    said = report.to_dict()["other_work"]
    assert said is not None and said["own_cpu_seconds"] > 0 and said["seconds"] > 0, said
    assert set(said) >= {"cpu_seconds", "average", "peak", "alone", "cpus"}


@pytest.mark.parametrize("threads", [2, "lots"])
def test_a_busy_machine_is_named_before_the_reproduction(recorded, tmp_path, monkeypatch, threads):
    """The audited revision's `threads` is read from its own params file (it may predate this code's
    schema: a value the schema would refuse is no error here, the stages refuse it themselves); with
    every CPU spinning, 2 threads are warned about before the reproduction, with the remedy."""
    from spinners import spinners, stop

    (recorded / "params.yaml").write_text(f"scale: 3\nthreads: {threads}\n")
    _git(recorded, "commit", "-qam", "threads")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    lines: list[str] = []
    procs = spinners(sorted(os.sched_getaffinity(0)))
    try:
        report = audit(recorded, pull=False, log=lines.append, workdir=tmp_path)
    finally:
        stop(procs)
    assert report.ok, report.to_dict()
    warned = [line for line in lines if "the machine is busy" in line]
    if threads == 2:
        assert len(warned) == 1 and "`threads: 2` in params.yaml" in warned[0], lines
        assert "OMP_NUM_THREADS=1" in warned[0]
    else:
        assert warned == [], lines


def test_from_scratch_without_a_remote(recorded, tmp_path):
    report = audit(recorded, pull=False, log=lambda _: None, workdir=tmp_path)
    assert not report.pulled and report.ok, report.to_dict()


def test_a_committed_output_that_disagrees_with_the_lock_fails_without_a_pull(recorded, tmp_path):
    """A git-tracked output edited (or committed from another run) without its dvc.lock entry: the forced
    reproduction rewrites it to the recorded value, so only the status check before it can tell."""
    (recorded / "count.json").write_text('{"parts": 4}')
    _git(recorded, "commit", "-qam", "a figure edited by hand")
    report = audit(recorded, pull=False, log=lambda _: None, workdir=tmp_path)
    assert not report.ok and report.corrupt == ["gen: count.json"], report.to_dict()


def test_a_nondeterministic_output_differs_naming_the_files(recorded, tmp_path):
    (recorded / "gen.py").write_text(GEN.replace("i * p['scale']", "i * p['scale'] + (i == 1)"))
    assert "i == 1" in (recorded / "gen.py").read_text()
    _git(recorded, "commit", "-qam", "code changed, run not re-recorded")
    report = audit(recorded, log=lambda _: None, workdir=tmp_path)
    assert not report.ok
    assert any("gen: changed deps: gen.py" in s for s in report.stale), report.stale
    by_path = {c.path: c for c in report.checks}
    assert by_path["out/dir"].status == "differs" and by_path["out/dir"].files == ("part1.txt",)
    assert by_path["out/value.txt"].status == "reproduced"


def test_a_parameter_changed_without_rerunning_fails(recorded, tmp_path):
    (recorded / "params.yaml").write_text("scale: 4\n")
    _git(recorded, "commit", "-qam", "param changed, run not re-recorded")
    report = audit(recorded, log=lambda _: None, workdir=tmp_path)
    assert not report.ok
    assert any(s.startswith("gen: changed params") and "scale" in s for s in report.stale), report.stale
    assert {c.path for c in report.checks if c.status == "differs"} == {"out/value.txt", "out/dir"}


def test_a_corrupt_object_in_the_remote_is_caught(recorded, tmp_path):
    lock = yaml.safe_load((recorded / "dvc.lock").read_text())
    md5 = next(o["md5"] for o in lock["stages"]["gen"]["outs"] if o["path"] == "out/value.txt")
    obj = tmp_path / "remote" / "files" / "md5" / md5[:2] / md5[2:]
    data = bytearray(obj.read_bytes())
    data[0] ^= 0x01
    obj.write_bytes(bytes(data))
    report = audit(recorded, log=lambda _: None, workdir=tmp_path)
    assert not report.ok
    assert report.corrupt == ["gen: out/value.txt"], report.corrupt


def test_a_corrupt_object_is_caught_when_another_is_missing_from_the_remote(recorded, tmp_path):
    """One object missing on the remote fails `dvc pull`; the audit used to skip verifying everything it
    did pull, so a flipped byte in another output passed."""
    lock = yaml.safe_load((recorded / "dvc.lock").read_text())
    outs = {o["path"]: o["md5"] for o in lock["stages"]["gen"]["outs"] if "md5" in o}
    remote = tmp_path / "remote" / "files" / "md5"
    (remote / outs["out/when.json"][:2] / outs["out/when.json"][2:]).unlink()  # missing: the pull fails
    obj = remote / outs["out/value.txt"][:2] / outs["out/value.txt"][2:]
    data = bytearray(obj.read_bytes())
    data[0] ^= 0x01
    obj.write_bytes(bytes(data))
    lines: list[str] = []
    report = audit(recorded, log=lines.append, workdir=tmp_path)
    assert report.corrupt == ["gen: out/value.txt"], report.corrupt
    assert not report.ok and not report.pulled and any("the pull failed" in line for line in lines)


def _record_vl(repo: Path) -> None:
    """Adds a second pipeline file as the VL profile has it (`profiles/vl/dvc.yaml`, run from the root,
    params in params.vl.yaml, its own lock), records and pushes its run, and commits."""
    gen = (
        GEN.replace('"params.yaml"', '"params.vl.yaml"')
        .replace("out/", "out_vl/")
        .replace('"out"', '"out_vl"')
    )
    gen = gen.replace("count.json", "count_vl.json")
    (repo / "gen_vl.py").write_text(gen)
    (repo / "params.vl.yaml").write_text("scale: 5\n")
    (repo / "profiles" / "vl").mkdir(parents=True)
    stage = {
        "cmd": f"{sys.executable} gen_vl.py",
        "wdir": "../..",
        "deps": ["gen_vl.py"],
        "params": [{"params.vl.yaml": ["scale"]}],
        "outs": [
            "out_vl/value.txt",
            "out_vl/dir",
            {"out_vl/when.json": {"labels": ["measured"]}},
            {"count_vl.json": {"cache": False}},
        ],
    }
    (repo / "profiles" / "vl" / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"gen": stage}}))
    _run([DVC, "repro", "profiles/vl/dvc.yaml"], repo)
    _run([DVC, "push", "profiles/vl/dvc.yaml"], repo)
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "recorded VL run")


def test_the_vl_profile_is_audited_against_its_own_lock(recorded, tmp_path):
    """`profile="vl"` pulls, checks, reproduces and compares the pipeline of profiles/vl/dvc.yaml against
    profiles/vl/dvc.lock, and leaves the text pipeline alone (it once audited dvc.yaml only)."""
    with pytest.raises(AuditError, match="profiles/vl/dvc.lock is not committed"):
        audit(recorded, log=lambda _: None, workdir=tmp_path, profile="vl")
    _record_vl(recorded)
    lines: list[str] = []
    report = audit(recorded, log=lines.append, workdir=tmp_path, profile="vl")
    assert report.pulled and report.ok, report.to_dict()
    assert {c.path: c.status for c in report.checks} == {
        "out_vl/value.txt": "reproduced",
        "out_vl/dir": "reproduced",
        "out_vl/when.json": "measured",
        "count_vl.json": "reproduced",
    }
    assert any("Running stage 'profiles/vl/dvc.yaml:gen':" in line for line in lines)
    assert not any("Running stage 'gen':" in line for line in lines)  # the text stage did not run
    assert audit(recorded, log=lambda _: None, workdir=tmp_path, to_stage="gen", profile="vl").ok
    # a VL change that is not re-recorded fails the VL audit, naming it, and not the text one
    (recorded / "gen_vl.py").write_text((recorded / "gen_vl.py").read_text().replace("i * p", "(i + 1) * p"))
    _git(recorded, "commit", "-qam", "VL code changed, run not re-recorded")
    report = audit(recorded, log=lambda _: None, workdir=tmp_path, profile="vl")
    assert not report.ok and any(s.startswith("gen: changed deps: gen_vl.py") for s in report.stale)
    assert {c.path for c in report.checks if c.status == "differs"} == {"out_vl/dir"}
    assert audit(recorded, log=lambda _: None, workdir=tmp_path).ok
    with pytest.raises(ValueError, match="profiles: text, vl"):
        audit(recorded, log=lambda _: None, workdir=tmp_path, profile="audio")


def test_a_revision_without_a_recording_is_an_error(tmp_path):
    repo = tmp_path / "empty"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / "README").write_text("x\n")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "nothing recorded")
    with pytest.raises(AuditError, match="dvc.lock is not committed"):
        audit(repo, log=lambda _: None, workdir=tmp_path)


def test_compare_and_measured_labels_on_parsed_files():
    spec = {
        "stages": {
            "s": {
                "outs": ["a", {"b": {"labels": ["measured"]}}],
                "metrics": [{"m.json": {"cache": False}}, {"t.json": {"labels": ["measured"]}}],
            }
        }
    }
    assert measured_outputs(spec) == {("s", "b"), ("s", "t.json")}
    old = {
        "stages": {
            "s": {
                "outs": [
                    {"path": "a", "md5": "1"},
                    {"path": "b", "md5": "2"},
                    {"path": "m.json", "md5": "3"},
                    {"path": "gone", "md5": "4"},
                ]
            }
        }
    }
    new = {
        "stages": {
            "s": {
                "outs": [
                    {"path": "a", "md5": "1"},
                    {"path": "b", "md5": "9"},
                    {"path": "m.json", "md5": "8"},
                    {"path": "added", "md5": "5"},  # dvc.yaml gained it after the recording
                ]
            },
            "outside": {"outs": [{"path": "x", "md5": "4"}]},  # a stage outside the audited scope
        }
    }
    verdicts = {c.path: c.status for c in compare(old, new, measured_outputs(spec))}
    assert verdicts == {
        "a": "reproduced",
        "b": "measured",
        "m.json": "differs",
        "gone": "missing",
        "added": "unrecorded",
    }
    json.dumps([c.__dict__ for c in compare(old, new, set())])  # JSON-able


def test_the_reproduced_deploy_publishes_to_a_store_of_its_own(tmp_path):
    """The audit re-runs deploy: with params.yaml's S3 store it would publish (and validate) a release in
    the team's bucket, and on deploy.port it fails while `ruyi serve` runs. The clone's deploy gets a
    local store under the audit's directory and a free port; nothing else in params.yaml changes."""
    from flows.audit import sandbox_deploy
    from tasks.core.params import load_params

    clone = tmp_path / "clone"
    clone.mkdir()
    shutil.copy(REPO / "params.yaml", clone / "params.yaml")
    before = load_params(
        clone / "params.yaml",
        {"deploy.store.backend": "s3", "deploy.store.bucket": "team-releases"},
    )
    from flows.pipeline import apply_param_overrides

    apply_param_overrides(clone, {"deploy.store.backend": "s3", "deploy.store.bucket": "team-releases"})
    sandbox_deploy(clone, tmp_path, log=lambda _: None)
    after = load_params(clone / "params.yaml")
    assert after.deploy.store.backend == "local" and after.deploy.store.root == str(tmp_path / "store")
    assert after.deploy.port != before.deploy.port and after.deploy.port >= 1024
    assert after.model_dump(exclude={"deploy"}) == before.model_dump(exclude={"deploy"})
    assert "# " in (clone / "params.yaml").read_text()  # comments kept


@pytest.mark.parametrize(
    "signame,target", [("SIGINT", "group"), ("SIGTERM", "group"), ("SIGTERM", "process")]
)
def test_ruyi_audit_stops_within_seconds_on_ctrl_c_or_sigterm_and_removes_its_clone(
    recorded, tmp_path, signame, target
):
    """Ctrl-C (SIGINT to the foreground group), a SIGTERM to the group (`timeout`, a CI cancel) or to the
    `ruyi audit` process alone: exit 130 / 143 with one line, the reproduction's DVC and stage stopped,
    and the temporary clone removed. Before, DVC ran in the caller's process group: a SIGTERM to the
    process left the stage running and the clone behind, and a Ctrl-C ended without a word."""
    import signal
    import time

    from cli_signals import cli_env, interrupt_cli, running

    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    pidfile = tmp_path / "stage.pid"
    env = cli_env(
        TMPDIR=str(tmpdir), AUDIT_TEST_PIDFILE=str(pidfile), PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}"
    )

    def stage_runs() -> bool:
        return pidfile.is_file() and bool(pidfile.read_text()) and any(tmpdir.iterdir())

    returncode, took = interrupt_cli(
        ["audit", "--no-pull"],
        recorded,
        env,
        tmp_path / "audit.err",
        stage_runs,
        getattr(signal, signame),
        to_group=target == "group",
        ready_timeout_s=120,
    )
    stderr = (tmp_path / "audit.err").read_text()
    assert returncode == {"SIGINT": 130, "SIGTERM": 143}[signame], stderr[-3000:]
    assert took < 30, (took, stderr[-3000:])
    said = {"SIGINT": "interrupted by Ctrl-C (SIGINT)", "SIGTERM": "interrupted by SIGTERM"}[signame]
    assert said in stderr, stderr[-3000:]
    stage_pid = int(pidfile.read_text())
    deadline = time.monotonic() + 10
    while running(stage_pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not running(stage_pid), f"the stage (pid {stage_pid}) still runs"
    assert list(tmpdir.iterdir()) == []
