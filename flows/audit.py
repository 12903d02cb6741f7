"""`ruyi audit`: reproduce a recorded run in a clean clone and compare it, output by output.

    ruyi audit [--profile text|vl] [--rev REV] [--remote NAME] [--no-pull] [--to-stage S] [--keep]

The recorded run is what git holds at REV: `dvc.lock` (every output's hash, the params and code deps it was
made from; `profiles/vl/dvc.lock` for the vision-language profile) and the small metric files. In a
temporary clean clone at REV the audit
1. pulls the recorded outputs from the DVC remote (when one is configured or named) and checks that what
   it pulled is what `dvc.lock` records (`dvc status`: a modified output is a corrupt remote copy);
2. checks that the recording is current: a stage whose code, params or inputs changed after it ran
   (`dvc status` lists it as changed) is reported as stale, and fails the audit;
3. forces every stage (`dvc repro --force`) and compares each output's hash with the recording.

Each output is then `reproduced` (bitwise), `differs` (with the differing files of a directory when both
versions are in the DVC cache), `measured` (declared with `labels: [measured]` in dvc.yaml: wall times,
timestamps, run ids; not compared) or `missing`. The exit code is 0 only when every reproducible output
matched and nothing was stale or corrupt. The same audit runs as the Prefect deployment `audit`.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefect import flow

from flows.processes import env_tool

if TYPE_CHECKING:
    from flows.machine import OtherWork

#: dvc.yaml label that declares an output measured (timings, timestamps): reported, never compared.
MEASURED_LABEL = "measured"
STATUSES = ("reproduced", "differs", "measured", "missing", "unrecorded")


class AuditError(RuntimeError):
    """The audit could not run (no recording at the revision, a failed clone, pull or stage run)."""


@dataclass(frozen=True)
class OutputCheck:
    """One output of one stage: its recorded and reproduced hashes and the verdict."""

    stage: str
    path: str
    status: str  # one of STATUSES
    recorded: str | None = None
    reproduced: str | None = None
    files: tuple[str, ...] = ()  # differing files inside a directory output, when known


@dataclass
class AuditReport:
    rev: str
    commit: str
    pulled: bool
    checks: list[OutputCheck] = field(default_factory=list)
    stale: list[str] = field(default_factory=list)  # "stage: what changed"
    corrupt: list[str] = field(default_factory=list)  # pulled outputs that do not match dvc.lock
    other_work: OtherWork | None = None  # what else used the CPUs during the reproduction
    cpu: str | None = None  # the CPU the reproduction ran on (flows.machine.cpu_name)

    @property
    def ok(self) -> bool:
        return (
            not self.stale
            and not self.corrupt
            and all(c.status in ("reproduced", "measured") for c in self.checks)
        )

    def counts(self) -> dict[str, int]:
        return {s: sum(c.status == s for c in self.checks) for s in STATUSES}

    def hint(self) -> str | None:
        """Where to look when outputs differ though the recording is not stale (the code, params and
        inputs are those recorded): the first output that differs, in the lock's stage order, and the
        two causes seen in practice. None when nothing differs, or when staleness explains it."""
        first = next((c for c in self.checks if c.status == "differs"), None)
        if first is None or self.stale:
            return None
        prior = self.checks[: self.checks.index(first)]
        ok = {"reproduced", "measured"}
        before = [
            stage
            for stage in dict.fromkeys(c.stage for c in prior if c.stage != first.stage)
            if all(c.status in ok for c in prior if c.stage == stage)
        ]
        return (
            f"the first output that differs is {first.stage}: {first.path}"
            + (f" (the stages before it reproduced: {', '.join(before)})" if before else "")
            + ". With the recorded code, params and inputs, CPU results are the same bits only at the same "
            "thread count (the params' `threads`, capped by OMP_NUM_THREADS and the CPUs available) and on "
            "the same CPU kernels: each stage logs both (`intra-op threads:` and `CPU kernels:` lines), and "
            "a recording made on other kernels does not reproduce here. The CPU model decides too: with the "
            "same pinned kernels, an Intel AVX-512 CPU gave other bits than the AMD AVX2 one that made the "
            'recording (docs/choices.md, "Bits across machines")'
            + (f"; this audit ran on {self.cpu}" if self.cpu else "")
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "rev": self.rev,
            "commit": self.commit,
            "pulled": self.pulled,
            "ok": self.ok,
            "stale": self.stale,
            "corrupt": self.corrupt,
            "counts": self.counts(),
            "hint": self.hint(),
            "cpu": self.cpu,
            "outputs": [c.__dict__ | {"files": list(c.files)} for c in self.checks],
            "other_work": None
            if self.other_work is None
            else {
                **asdict(self.other_work),
                "average": self.other_work.average,
                "alone": self.other_work.alone,
            },
        }


def _run(
    cmd: list[str], cwd: Path, what: str, log: Callable[[str], None] | None = None, check: bool = True
) -> subprocess.CompletedProcess:
    """Runs `cmd` in a session of its own; with `log`, its output (stdout and stderr together) is streamed
    there line by line (stage progress), and kept for the error message either way.

    Interrupted (Ctrl-C, SIGTERM through `sigterm_as_interrupt`, Prefect cancelling the flow), it stops
    the command's whole process group (`flows.processes.interrupt`: a `dvc repro` and its stage), so the
    audit's `finally` removes a clone that nothing writes into any more."""
    from flows.pipeline import stage_env
    from flows.processes import interrupt

    env = stage_env()  # the environment `ruyi run` gives DVC and the stages (HF_HUB_OFFLINE=1, ...)
    stderr = subprocess.STDOUT if log is not None else subprocess.PIPE
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True, start_new_session=True
    )
    try:
        if log is None:
            out, err = proc.communicate()
        else:
            lines = []
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.append(line)
                log(line.rstrip("\n"))
            out, err = "".join(lines), ""
            proc.wait()
    except BaseException:
        interrupt(proc)
        raise
    finally:
        if proc.stdout is not None:
            proc.stdout.close()
    if check and proc.returncode != 0:
        tail = (out + err)[-3000:]
        raise AuditError(f"{what} failed (exit {proc.returncode}): {' '.join(cmd)}\n{tail}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _outs(lock: dict[str, Any]) -> dict[tuple[str, str], str | None]:
    """(stage, path) -> recorded hash (md5, '<md5>.dir' for a directory) of every output in a dvc.lock."""
    found = {}
    for stage, entry in lock.get("stages", {}).items():
        for out in entry.get("outs", []):
            found[(stage, out["path"])] = out.get("md5") or out.get("etag") or out.get("checksum")
    return found


def measured_outputs(dvc_yaml: dict[str, Any]) -> set[tuple[str, str]]:
    """(stage, path) of every output labelled `measured` in a parsed dvc.yaml (outs, metrics, plots)."""
    found = set()
    for stage, spec in dvc_yaml.get("stages", {}).items():
        for kind in ("outs", "metrics", "plots"):
            for item in spec.get(kind, []):
                if isinstance(item, dict):
                    ((path, opts),) = item.items()
                    if MEASURED_LABEL in ((opts or {}).get("labels") or []):
                        found.add((stage, path))
    return found


def _dir_files(cache: Path, digest: str | None) -> dict[str, str] | None:
    """relpath -> md5 of a directory output from its `.dir` object in the DVC cache, if there."""
    if not digest or not digest.endswith(".dir"):
        return None
    obj = cache / "files" / "md5" / digest[:2] / digest[2:]
    if not obj.is_file():
        return None
    return {e["relpath"]: e["md5"] for e in json.loads(obj.read_text())}


def _differing_files(cache: Path, old: str | None, new: str | None) -> tuple[str, ...]:
    a, b = _dir_files(cache, old), _dir_files(cache, new)
    if a is None or b is None:
        return ()
    return tuple(sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k)))


def compare(
    recorded: dict[str, Any],
    reproduced: dict[str, Any],
    measured: set[tuple[str, str]],
    cache: Path | None = None,
) -> list[OutputCheck]:
    """Verdicts for every recorded output, from two parsed dvc.lock files; and `unrecorded` for an output
    the reproduction wrote for a recorded stage that the recording has no hash of (dvc.yaml gained it
    after the run was recorded: the recording says nothing about it, so the audit cannot pass)."""
    old, new = _outs(recorded), _outs(reproduced)
    checks = []
    for key, digest in old.items():
        stage, path = key
        now = new.get(key)
        if key in measured:
            status = "measured"
        elif now is None:
            status = "missing"
        else:
            status = "reproduced" if now == digest else "differs"
        files = _differing_files(cache, digest, now) if status == "differs" and cache else ()
        checks.append(OutputCheck(stage, path, status, digest, now, files))
    stages = set(recorded.get("stages", {}))  # the audited scope; the reproduced lock keeps the others
    for key, now in new.items():
        if key not in old and key[0] in stages:
            status = "measured" if key in measured else "unrecorded"
            checks.append(OutputCheck(key[0], key[1], status, None, now, ()))
    return checks


def upstream_stages(dvc_yaml: dict[str, Any], target: str, where: str = "dvc.yaml") -> set[str]:
    """`target` and every stage it depends on, transitively (a dep at or under another stage's output)."""
    stages = dvc_yaml.get("stages", {})
    if target not in stages:
        raise AuditError(f"no stage {target!r} in {where} (stages: {', '.join(stages)})")

    from flows.pipeline import output_producers, producer_of

    producers = output_producers(dvc_yaml)
    found, todo = set(), [target]
    while todo:
        name = todo.pop()
        if name in found:
            continue
        found.add(name)
        for dep in stages[name].get("deps") or []:
            stage = producer_of(next(iter(dep)) if isinstance(dep, dict) else str(dep), producers)
            if stage is not None:
                todo.append(stage)
    return found


def _md5(path: Path) -> str:
    import hashlib

    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_pulled(clone: Path, recorded: dict[str, Any], partial: bool = False) -> list[str]:
    """`stage: path (file)` for every pulled output file whose bytes do not hash to what dvc.lock records
    (`partial`: the pull failed part way, so a file missing from a pulled directory is not counted).

    DVC trusts the remote on pull (its state database records the expected hash), so a corrupt remote
    object would pass `dvc status`; this re-hashes what is on disk: a file output against its md5, a
    directory output file by file against its `.dir` listing (itself checked against the recorded hash).
    """
    bad = []
    cache = clone / ".dvc" / "cache"
    for (stage, path), digest in _outs(recorded).items():
        target = clone / path
        if not digest or not target.exists():
            continue  # not pulled (e.g. cache: false outputs live in git or are rebuilt)
        if not digest.endswith(".dir"):
            if target.is_file() and _md5(target) != digest:
                bad.append(f"{stage}: {path}")
            continue
        obj = cache / "files" / "md5" / digest[:2] / digest[2:]
        if not obj.is_file() or _md5(obj) != digest.removesuffix(".dir"):
            bad.append(f"{stage}: {path} (directory listing)")
            continue
        for entry in json.loads(obj.read_text()):
            file = target / entry["relpath"]
            if partial and not file.is_file():
                continue
            if not file.is_file() or _md5(file) != entry["md5"]:
                bad.append(f"{stage}: {path}/{entry['relpath']}")
    return bad


def _status(clone: Path, dvc_file: str = "dvc.yaml") -> dict[str, Any]:
    """`dvc status --json` of the audited pipeline file only (another one has its own lock and outputs),
    keyed by stage name (DVC names a stage of a file other than the root dvc.yaml `<file>:<stage>`)."""
    proc = _run([env_tool("dvc"), "status", dvc_file, "--json"], clone, f"dvc status {dvc_file}")
    return {key.removeprefix(f"{dvc_file}:"): v for key, v in json.loads(proc.stdout or "{}").items()}


def _stale_and_corrupt(status: dict[str, Any]) -> tuple[list[str], list[str]]:
    """From `dvc status --json`: stages whose deps/params/command changed since the recording (stale), and
    outputs whose files do not match their recorded hash (corrupt)."""
    stale, corrupt = [], []
    for stage, changes in status.items():
        for change in changes:
            if not isinstance(change, dict):
                stale.append(f"{stage}: {change}")
                continue
            # a dep that is another stage's output not pulled yet is "deleted"/"not in cache": not staleness;
            # a params file is a dep whose value maps each changed key to its state
            deps, params = [], []
            for dep, state in (change.get("changed deps") or {}).items():
                if isinstance(state, dict):
                    params.extend(f"{dep}:{key}" for key in state)
                elif state == "modified":
                    deps.append(dep)
            if deps:
                stale.append(f"{stage}: changed deps: {', '.join(sorted(deps))}")
            if params:
                stale.append(f"{stage}: changed params: {', '.join(sorted(params))}")
            if change.get("changed command"):
                stale.append(f"{stage}: changed command")
            for out, state in (change.get("changed outs") or {}).items():
                if state == "modified":
                    corrupt.append(f"{stage}: {out}")
    return stale, corrupt


def _anchor_local_remotes(repo: Path, clone: Path) -> None:
    """A local-path remote (the default `.dvc-remote`, configured relative to `.dvc/`) means the folder of the
    audited repository, not one inside the temporary clone: point the clone's remote at the same folder."""
    proc = _run([env_tool("dvc"), "remote", "list"], repo, "dvc remote list", check=False)
    for line in proc.stdout.splitlines():
        parts = line.split()
        if len(parts) < 2 or "://" in parts[1]:
            continue
        name, url = parts[0], Path(parts[1])
        absolute = url if url.is_absolute() else (repo / ".dvc" / url).resolve()
        _run(
            [env_tool("dvc"), "remote", "modify", "--local", name, "url", str(absolute)],
            clone,
            f"dvc remote modify {name}",
        )


def sandbox_deploy(
    clone: Path, tmp: Path, log: Callable[[str], None] = print, params_file: str = "params.yaml"
) -> dict[str, Any]:
    """Points the clone's deploy stage at a store of its own (a local directory under `tmp`) and a free port.

    The audit re-runs deploy, which publishes a release and serves it: against the recorded
    `deploy.store` (e.g. the team's S3 bucket) a reproduction would publish, and validate, a release there,
    and on `deploy.port` it would fail whenever `ruyi serve` runs on this machine. What deploy's
    reproducible output holds (content digest, smoke answers, served parameter counts) depends on
    neither, so the clone's `params_file` gets `deploy.store.backend: local`, `deploy.store.root` under
    `tmp` and a free `deploy.port`. Returns the overrides."""
    import socket

    from flows.pipeline import apply_param_overrides

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    overrides = {
        "deploy.store.backend": "local",
        "deploy.store.root": str(tmp / "store"),
        "deploy.store.cache_dir": str(tmp / "releases"),
        "deploy.port": port,
    }
    apply_param_overrides(clone, overrides, params_file)
    log(f"audit: deploy publishes to {tmp / 'store'} and serves on port {port}, not the recorded store/port")
    return overrides


def audit(
    repo: str | Path = ".",
    rev: str = "HEAD",
    remote: str | None = None,
    pull: bool = True,
    workdir: str | Path | None = None,
    keep: bool = False,
    to_stage: str | None = None,
    log: Callable[[str], None] = print,
    profile: str = "text",
) -> AuditReport:
    """Reproduces the run recorded at `rev` of `repo` in a clean clone (module docstring).

    `to_stage`: reproduce and compare only that stage and its upstream (a quick partial audit);
    `profile`: the pipeline audited (`flows.pipeline.PROFILES`: text = dvc.yaml and its dvc.lock, vl =
    profiles/vl/dvc.yaml and its lock); another profile's stages are neither run nor compared.

    Raises:
        AuditError: no recording at `rev`, a failed clone/pull (with `remote` named)/stage.
        ValueError: an unknown profile.
    """
    import yaml

    from flows.machine import check_threads, cpu_name, machine_line, watch_run
    from flows.pipeline import lock_file as lock_of
    from flows.pipeline import profile_files, stage_target

    dvc_file, params_file = profile_files(profile)
    lock_file = lock_of(dvc_file)
    repo = Path(repo).resolve()
    commit = _run(
        ["git", "rev-parse", "--verify", f"{rev}^{{commit}}"], repo, f"git: revision {rev!r}"
    ).stdout.strip()
    tmp = Path(tempfile.mkdtemp(prefix="ruyi-audit-", dir=workdir))
    clone = tmp / "clone"
    try:
        _run(["git", "clone", "-q", "--no-checkout", str(repo), str(clone)], tmp, "git clone")
        _run(["git", "checkout", "-q", commit], clone, f"git checkout {commit}")
        if not (clone / lock_file).is_file():
            raise AuditError(
                f"no recorded run of the {profile} profile at {rev} ({commit[:12]}): {lock_file} is not "
                f"committed there (record one: ruyi run --profile {profile}, then git add {lock_file} "
                "metrics and commit)"
            )
        local_config = repo / ".dvc" / "config.local"  # remote credentials/endpoints kept out of git
        if local_config.is_file():
            shutil.copy(local_config, clone / ".dvc" / "config.local")
        _anchor_local_remotes(repo, clone)
        recorded = yaml.safe_load((clone / lock_file).read_text())
        dvc_yaml = yaml.safe_load((clone / dvc_file).read_text())
        measured = measured_outputs(dvc_yaml)
        scope = upstream_stages(dvc_yaml, to_stage, dvc_file) if to_stage else set(dvc_yaml.get("stages", {}))
        recorded = {**recorded, "stages": {k: v for k, v in recorded.get("stages", {}).items() if k in scope}}
        pulled = partial = False
        if pull:
            # the audited pipeline's outputs only: another pipeline file's may be absent from the remote
            cmd = [env_tool("dvc"), "pull", dvc_file] + (["-r", remote] if remote else [])
            proc = _run(cmd, clone, "dvc pull", check=remote is not None)
            pulled = proc.returncode == 0
            if not pulled:
                # what did come down is still checked: one object missing on the remote (e.g. after a
                # --no-push run) must not hide a flipped byte in the others
                partial = True
                log(
                    f"audit: the pull failed (exit {proc.returncode}): what was pulled is verified, every "
                    f"output is reproduced from scratch and compared with {lock_file}"
                )
        report = AuditReport(rev=rev, commit=commit, pulled=pulled, cpu=cpu_name())
        stale, corrupt = _stale_and_corrupt(_status(clone, dvc_file))
        report.stale = [line for line in stale if line.split(":")[0] in scope]
        corrupt = [line for line in corrupt if line.split(":")[0] in scope]
        # without a pull, the cached outputs are absent ("deleted", not counted); a git-tracked output
        # (cache: false, e.g. metrics/reproducible/*.json) is there all the same and must match dvc.lock
        checked = set(verify_pulled(clone, recorded, partial=partial)) if pulled or partial else set()
        report.corrupt = sorted(set(corrupt) | checked)
        if "deploy" in scope:
            sandbox_deploy(clone, tmp, log, params_file)
        # the audited revision's params may predate this code's schema: its `threads` alone is read
        recorded_params = yaml.safe_load((clone / params_file).read_text()) or {}
        threads = recorded_params.get("threads", "auto") if isinstance(recorded_params, dict) else "auto"
        if warning := check_threads(threads, params_file):
            log(f"audit: {warning}")
        cmd = [
            env_tool("dvc"),
            "repro",
            "--force",
            stage_target(to_stage, dvc_file) if to_stage else dvc_file,
        ]
        log(f"audit: {rev} ({commit[:12]}): {' '.join(cmd[1:])} in {clone}")
        watch = watch_run(threads, params_file, lambda m: log(f"audit: {m}"))
        with watch:
            _run(cmd, clone, " ".join(cmd[1:]), log=log)
        report.other_work = watch.result()
        log(f"audit: {machine_line()}")
        log(f"audit: {watch.summary('the reproduction')}")
        reproduced = yaml.safe_load((clone / lock_file).read_text())
        report.checks = compare(recorded, reproduced, measured, clone / ".dvc" / "cache")
        return report
    finally:
        if keep:
            log(f"audit: clone kept at {clone}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def print_report(report: AuditReport) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"audit of {report.rev} ({report.commit[:12]})"
        + (", outputs pulled from the remote" if report.pulled else ", reproduced from scratch")
    )
    for col in ("stage", "output", "verdict", "detail"):
        table.add_column(col)
    style = {
        "reproduced": "green",
        "measured": "cyan",
        "differs": "red",
        "missing": "red",
        "unrecorded": "red",
    }
    for c in report.checks:
        detail = {
            "reproduced": "bitwise",
            "measured": "not compared (labels: [measured])",
            "missing": "not produced by the reproduction",
            "unrecorded": "not in the recorded dvc.lock (added to dvc.yaml since): re-record the run",
        }.get(c.status)
        if c.status == "differs":
            detail = (
                ("files: " + ", ".join(c.files[:8]) + (" ..." if len(c.files) > 8 else ""))
                if c.files
                else f"{c.recorded} -> {c.reproduced}"
            )
        table.add_row(c.stage, c.path, f"[{style[c.status]}]{c.status}[/]", detail)
    console = Console()
    console.print(table)
    for line in report.stale:
        console.print(f"[red]stale recording[/] {line}")
    for line in report.corrupt:
        console.print(f"[red]pulled output does not match dvc.lock[/] {line}")
    if hint := report.hint():
        console.print(f"[yellow]where to look[/]: {hint}", markup=True, highlight=False)
    counts = report.counts()
    console.print(
        ", ".join(f"{n} {s}" for s, n in counts.items())
        + f": audit {'[green]passed[/]' if report.ok else '[red]FAILED[/]'}"
    )


@flow(name="ruyi-audit", log_prints=True)
def ruyi_audit(
    workspace: str = ".",
    rev: str = "HEAD",
    remote: str | None = None,
    pull: bool = True,
    profile: str = "text",
) -> dict:
    """Reproduce the run of `profile` recorded at `rev` in a clean clone; the run fails unless every
    reproducible output matched. The verdicts are published as a markdown artifact (`ruyi-audit`)."""
    from prefect.artifacts import create_markdown_artifact

    report = audit(workspace, rev=rev, remote=remote, pull=pull, profile=profile)
    rows = "\n".join(
        f"| {c.stage} | {c.path} | {c.status} | {', '.join(c.files[:5])} |" for c in report.checks
    )
    create_markdown_artifact(
        key="ruyi-audit",
        description=f"audit of {rev}",
        markdown=(
            f"# Audit of {rev} ({report.commit[:12]}, {profile} profile): "
            f"{'passed' if report.ok else 'FAILED'}\n\n"
            + "".join(f"- stale: {s}\n" for s in report.stale)
            + "".join(f"- corrupt: {s}\n" for s in report.corrupt)
            + "\n| stage | output | verdict | files |\n|---|---|---|---|\n"
            + rows
        ),
    )
    if not report.ok:
        raise AuditError(
            f"audit of {rev} failed: {report.counts()}; stale {report.stale}; corrupt {report.corrupt}"
        )
    return report.to_dict()
