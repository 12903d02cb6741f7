"""The Prefect flow that chains the DVC stages: what `make run`, the deployments and the UI run.

    ruyi run [--profile text|vl] [--from-stage S] [--to-stage S] [--set key=value ...] [--no-push] [--force]

One task per stage running `dvc repro <stage> --single-item` in `dvc dag` order, retries for
infrastructure errors only, one run per workspace, overrides written to params.yaml first, metrics and
lineage as Prefect artifacts, then `dvc push`. A stage whose `meta.local_effect` (`LOCAL_EFFECT_KEY`: the
gates' Data Docs, the deploy's smoke report) is missing on this machine runs even when DVC finds it up
to date, so a fresh clone of a recorded run still gates, publishes and smoke-tests. A profile
(`PROFILES`) is a DVC pipeline file and its params file: `text` (dvc.yaml + params.yaml, the default) or
`vl` (profiles/vl/dvc.yaml + params.vl.yaml, docs/choices.md#vision-language-profile). Why:
docs/choices.md#orchestration.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NONE

from flows.processes import env_tool, interrupt
from tasks.core.codedeps import TEXT_PIPELINE, VL_PIPELINE
from tasks.core.stage import TRANSIENT_EXIT_CODE, USER_ERROR_EXIT_CODE

# Exit codes of `python -m tasks.<stage>` (tasks.core.stage_main): USER_ERROR_EXIT_CODE for bad input
# (StageError/ParamsError/ContractViolation), a property of the data or parameters, never retried;
# TRANSIENT_EXIT_CODE for a TransientError (an unreachable or timed-out server), retried.
_INFRA_PATTERNS = (
    r"Unable to acquire lock",
    r"is locked by another process",
    # DVC's per-output read/write lock, held by another `dvc repro` in the same workspace (a run
    # outside this flow's workspace lock, e.g. a manual `dvc repro` in the same workspace).
    r"is busy, it is being blocked by",
    r"Connection (refused|reset|aborted)",
    r"EndpointConnectionError",
    r"Could not connect to the endpoint URL",
    r"Temporary failure in name resolution",
    r"timed out",
)


#: profile -> (its DVC pipeline file, its params file), relative to the workspace.
PROFILES: dict[str, tuple[str, str]] = {
    "text": (TEXT_PIPELINE, "params.yaml"),
    "vl": (VL_PIPELINE, "params.vl.yaml"),
}


def profile_files(profile: str) -> tuple[str, str]:
    if profile not in PROFILES:
        raise ValueError(f"profile={profile!r} is not a profile; profiles: {', '.join(PROFILES)}")
    return PROFILES[profile]


def lock_file(dvc_file: str) -> str:
    """The lock file DVC writes beside a pipeline file (`dvc.yaml` -> `dvc.lock`)."""
    return Path(dvc_file).with_suffix(".lock").as_posix()


def stage_target(stage: str, dvc_file: str = "dvc.yaml") -> str:
    """The `dvc repro` target of a stage: its name in the root dvc.yaml, `<file>:<name>` elsewhere."""
    return stage if dvc_file == "dvc.yaml" else f"{dvc_file}:{stage}"


class StageFailed(RuntimeError):
    """A stage failed because of its input, parameters or code: retrying would not help."""


class InfrastructureError(RuntimeError):
    """A transient failure around a stage (lock, signal, network): retried."""


def stage_env() -> dict[str, str]:
    """The environment of DVC and the stages it runs, for `ruyi run` and `ruyi audit` alike: offline, no
    analytics, this interpreter's tools first on PATH (a variable the caller set is kept)."""
    env = dict(os.environ)
    env.setdefault("DVC_NO_ANALYTICS", "1")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("GX_ANALYTICS_ENABLED", "false")
    # Stages are `python -m tasks.<stage>`: make sure it is this interpreter's environment.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def _dvc(args: list[str], workspace: Path, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [env_tool("dvc"), *args]
    proc = subprocess.run(cmd, cwd=workspace, env=stage_env(), capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise RuntimeError(
            f"`dvc {' '.join(args)}` failed in {workspace}:\n{proc.stderr.strip() or proc.stdout.strip()}"
        )
    return proc


def _dvc_streamed(
    args: list[str],
    workspace: Path,
    keep_bytes: int = 64 * 1024,
    on_line: Callable[[str], None] | None = None,
) -> tuple[int, str]:
    """Runs dvc with its output (stage logs, progress bars) shown live; returns (code, output tail).

    Raw chunks are passed through to stderr so that carriage-return progress bars render in a
    terminal; each completed line (for a progress bar: its last state) also goes to `on_line`, which
    the flow sends to the Prefect run logger, so the stage's progress shows in the UI. The last
    `keep_bytes` are kept for the error message of a failed stage.
    """
    cmd = [env_tool("dvc"), *args]
    # Its own session: a signal meant for the run (Ctrl-C in the terminal, a SIGTERM to the run or to
    # its process group) reaches DVC and the stage through `interrupt`, once, whichever way it came.
    proc = subprocess.Popen(
        cmd,
        cwd=workspace,
        env=stage_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    tail = bytearray()
    pending = bytearray()
    out = getattr(sys.stderr, "buffer", None)
    assert proc.stdout is not None
    try:
        while chunk := os.read(proc.stdout.fileno(), 65536):
            if out is not None and os.environ.get("RUYI_QUIET_STAGES") != "1":
                out.write(chunk)
                out.flush()
            tail += chunk
            del tail[:-keep_bytes]
            if on_line is not None:
                pending += chunk
                *lines, rest = pending.split(b"\n")
                pending = bytearray(rest[-keep_bytes:])
                for raw in lines:
                    line = raw.split(b"\r")[-1].decode("utf-8", errors="replace").rstrip()
                    if line:
                        on_line(line)
        code = proc.wait()
    except BaseException:  # the run is interrupted (KeyboardInterrupt, Prefect's TerminationSignal)
        interrupt(proc)
        raise
    finally:
        proc.stdout.close()
    if on_line is not None and (line := pending.split(b"\r")[-1].decode("utf-8", errors="replace").rstrip()):
        on_line(line)
    return code, tail.decode("utf-8", errors="replace")


def _failure_summary(output: str, tail_lines: int = 25, max_error_lines: int = 60) -> str:
    """What to show of a failed stage: its own error message whole (from the first `error` line that
    tasks.core.stage_main prints up to DVC's closing ERROR), then the output tail if that adds
    anything. A data-contract failure lists several expectations: keeping only the tail would cut off
    the line that names the dataset and the Data Docs."""
    lines = output.strip().splitlines()
    tail = lines[-tail_lines:]
    start = next(
        (i for i, line in enumerate(lines) if line.startswith(("error: ", "error (transient"))), None
    )
    if start is None:
        return "\n".join(tail)
    end = next(
        (j for j in range(start + 1, len(lines)) if lines[j].startswith("ERROR: failed to reproduce")),
        len(lines),
    )
    message = lines[start:end]
    if len(message) > max_error_lines:
        message = message[:max_error_lines] + [
            f"... ({end - start - max_error_lines} more lines in the stage output)"
        ]
    rest = [line for line in lines[end:] if line not in message][-tail_lines:]
    return "\n".join(message + rest)


def dvc_stage_order(workspace: str | Path, dvc_file: str = "dvc.yaml") -> list[str]:
    """The stages of `dvc_file` in `dvc dag` order (a topological order; ties in file order)."""
    import yaml

    workspace = Path(workspace)
    try:
        declared = list((yaml.safe_load((workspace / dvc_file).read_text()) or {}).get("stages", {}))
    except (yaml.YAMLError, AttributeError) as e:
        raise ValueError(f"{workspace / dvc_file}: not a valid pipeline file ({e})") from None
    try:
        dot = _dvc(["dag", "--dot"], workspace).stdout
    except RuntimeError as e:  # DVC refuses the pipeline (a bad stage, a missing .dvc/): the user's to fix
        raise ValueError(f"{workspace / dvc_file}: {e}") from None
    edges = re.findall(r'"([^"]+)"\s*->\s*"([^"]+)"', dot)
    nodes = set(re.findall(r'^\s*"([^"]+)"\s*;?\s*$', dot, flags=re.M)) | {n for e in edges for n in e}
    # `dvc dag` shows every pipeline of the repository; a stage of another dvc.yaml is `<file>:<name>`
    prefix = "" if dvc_file == "dvc.yaml" else f"{dvc_file}:"
    mine = {n for n in nodes if (":" not in n) == (not prefix) and n.startswith(prefix)}
    nodes = {n.removeprefix(prefix) for n in mine}
    edges = [(a.removeprefix(prefix), b.removeprefix(prefix)) for a, b in edges if a in mine and b in mine]
    unknown = nodes - set(declared)
    if unknown:
        raise RuntimeError(f"`dvc dag` lists stages that {dvc_file} does not: {sorted(unknown)}")
    preds: dict[str, set[str]] = {s: set() for s in declared}
    for a, b in edges:
        preds[b].add(a)
    order: list[str] = []
    while len(order) < len(declared):
        ready = [s for s in declared if s not in order and preds[s] <= set(order)]
        if not ready:
            raise RuntimeError("dvc.yaml has a dependency cycle")
        order.append(ready[0])
    return order


#: A stage's `meta` key in a DVC pipeline file naming what the stage leaves on the machine that runs it
#: outside DVC's outputs (the gates' Data Docs, the deploy's smoke report). DVC finds such a stage up to
#: date in a fresh clone of a recorded run (its only outputs are committed metrics), so without this a
#: first `make run` would neither write the gate report nor publish and smoke-test a release.
LOCAL_EFFECT_KEY = "local_effect"


def missing_local_effects(workspace: str | Path, stage: str, dvc_file: str = "dvc.yaml") -> list[str]:
    """The paths of `stage`'s `meta.local_effect` (a path or a list, relative to the stage's `wdir`, as
    DVC's own paths) that do not exist in `workspace`, workspace-relative; [] when none is missing or
    the stage declares none.

    Raises:
        ValueError: `stage` is not in `dvc_file`, or its `meta.local_effect` is not a path or a list of paths.
    """
    import yaml

    workspace = Path(workspace).resolve()
    stages = (yaml.safe_load((workspace / dvc_file).read_text()) or {}).get("stages", {})
    if stage not in stages:
        raise ValueError(f"{dvc_file} has no stage {stage!r}")
    spec = stages[stage]
    declared = (spec.get("meta") or {}).get(LOCAL_EFFECT_KEY, [])
    paths = [declared] if isinstance(declared, str) else declared
    if not isinstance(paths, list) or not all(isinstance(p, str) and p for p in paths):
        raise ValueError(
            f"{dvc_file}: stage {stage}: meta.{LOCAL_EFFECT_KEY} must be a path or a list of paths, "
            f"got {declared!r}"
        )
    wdir = ((workspace / dvc_file).parent / str(spec.get("wdir", "."))).resolve()
    missing = [wdir / p for p in paths if not (wdir / p).exists()]
    return [os.path.relpath(p, workspace) for p in missing]


def stage_freshness(workspace: str | Path, stages: list[str], dvc_file: str = "dvc.yaml") -> dict[str, str]:
    """DVC's view of each of `stages` in `workspace`, in words: "up to date"; "out of date (...)" when a
    dependency (changed, or a source file deleted), a parameter or the command differs from what
    dvc.lock recorded (its figures describe another model); "not run here (...)" when only files are
    missing: its outputs, or inputs that are other stages' outputs (the figures in the checkout are the
    recorded ones, e.g. a clone that never ran the pipeline: nothing says they describe another model).
    One `dvc status` call."""
    import yaml

    if not stages:
        return {}
    workspace = Path(workspace)
    proc = _dvc(["status", "--json", *(stage_target(s, dvc_file) for s in stages)], workspace)
    try:
        report = json.loads(proc.stdout or "{}")
    except json.JSONDecodeError as e:
        raise RuntimeError(
            f"`dvc status --json` in {workspace} printed no JSON ({e}): {proc.stdout[:200]!r}"
        ) from None
    produced = output_producers(yaml.safe_load((workspace / dvc_file).read_text()) or {})
    out: dict[str, str] = {}
    for stage in stages:
        changed: list[str] = []
        missing: list[str] = []
        upstream: list[str] = []
        for entry in report.get(stage_target(stage, dvc_file), []):
            if isinstance(entry, str):  # "changed command", "always changed"
                changed.append(entry.removeprefix("changed ").strip())
                continue
            for kind, paths in entry.items():
                for path, state in (paths or {}).items():
                    if isinstance(state, dict):  # a params file: {key: state}
                        changed += [f"{key} ({st})" for key, st in state.items()]
                    elif kind == "changed outs" and state == "deleted":
                        missing.append(path)
                    elif kind == "changed deps" and state == "deleted" and producer_of(path, produced):
                        upstream.append(path)  # another stage's output, not produced in this checkout
                    elif state != "not in cache":  # outputs present but not cached: still current
                        changed.append(f"{path} ({state})")
        if changed:
            out[stage] = "out of date (its recorded inputs or command differ: " + ", ".join(changed) + ")"
        elif missing or upstream:
            what = ([f"its outputs are missing: {', '.join(missing)}"] if missing else []) + (
                [f"inputs other stages make are missing: {', '.join(upstream)}"] if upstream else []
            )
            out[stage] = "not run here (" + "; ".join(what) + "): the recorded figures"
        else:
            out[stage] = "up to date"
    return out


def output_producers(dvc_yaml: dict[str, Any]) -> dict[str, str]:
    """Every path a stage of a parsed dvc file writes (outs, metrics, plots, as the file writes them,
    without a trailing "/") -> that stage."""

    def paths(items) -> list[str]:
        return [next(iter(i)) if isinstance(i, dict) else str(i) for i in items or []]

    return {
        path.rstrip("/"): name
        for name, spec in (dvc_yaml.get("stages") or {}).items()
        for key in ("outs", "metrics", "plots")
        for path in paths((spec or {}).get(key))
    }


def producer_of(path: str, producers: dict[str, str]) -> str | None:
    """The stage whose output `path` is or lies inside (a directory output), from `output_producers`;
    None for a file no stage writes (a source file)."""
    return next(
        (stage for out, stage in producers.items() if path == out or path.startswith(out + "/")), None
    )


def select_stages(order: list[str], from_stage: str | None, to_stage: str | None) -> list[str]:
    for name, value in (("from_stage", from_stage), ("to_stage", to_stage)):
        if value is not None and value not in order:
            raise ValueError(f"{name}={value!r} is not a stage; stages: {', '.join(order)}")
    lo = order.index(from_stage) if from_stage else 0
    hi = order.index(to_stage) if to_stage else len(order) - 1
    if lo > hi:
        raise ValueError(f"from_stage={from_stage!r} comes after to_stage={to_stage!r} in the pipeline")
    return order[lo : hi + 1]


def apply_param_overrides(
    workspace: Path, overrides: dict[str, Any], params_file: str = "params.yaml"
) -> list[str]:
    """Validates `params_file` with the dotted-key overrides and writes them into it, keeping its comments.

    The file is validated even without overrides: a misspelt section or a bad value that no stage's
    `params:` tracks would otherwise let every stage report "up to date" and the run pass."""
    from tasks.core.params import load_params

    path = workspace / params_file
    # Validate the result first: a bad override is an error naming params.yaml and the key;
    # nothing is written.
    load_params(path, overrides)
    if not overrides:
        return []
    from ruamel.yaml import YAML
    from ruamel.yaml.comments import CommentedMap

    ry = YAML()
    ry.preserve_quotes = True
    # null stays `null` (ruamel's round trip writes an empty value)
    ry.representer.add_representer(
        type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null")
    )
    doc = ry.load(path.read_text())
    changed = []
    for dotted, value in overrides.items():
        node = doc
        *parents, leaf = dotted.split(".")
        # The line's comment belongs to the last block-style mapping on the path: a flow-style value
        # (`exit_weights: {..., deepest: 2.0}  # ...`) shares its key's line and comment.
        owner, owner_key = doc, dotted.split(".")[0]
        for part in parents:
            if part not in node or node[part] is None:
                node[part] = CommentedMap()
            if not _flow_style(node):
                owner, owner_key = node, part
            node = node[part]
        if not _flow_style(node):
            owner, owner_key = node, leaf
        if node.get(leaf) != value:
            old = node[leaf] if leaf in node else _ABSENT
            restored = None
            if isinstance(owner, CommentedMap):
                restored = _mark_override(ry, owner, owner_key, leaf, old, value)
            # set back to the file's own value: its own spelling too (`3.0e-5`, not `3e-05`)
            node[leaf] = _in_style_of(ry, old, value) if restored is None else ry.load(restored)
            changed.append(dotted)
    from tasks.core.files import atomic_file

    with atomic_file(path) as f:
        ry.dump(doc, f)
    return changed


def _flow_style(node: Any) -> bool:
    fa = getattr(node, "fa", None)
    return bool(fa is not None and fa.flow_style())


_ABSENT = object()


def _plain(value: Any) -> Any:
    """ruamel's round-trip types (CommentedMap, ScalarFloat, ...) as the builtins they stand for."""
    from ruamel.yaml.scalarbool import ScalarBoolean

    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    for kind in (ScalarBoolean, bool, float, int, str):
        if isinstance(value, kind):
            return bool(value) if kind is ScalarBoolean else kind(value)
    return value


def _in_style_of(ry: Any, old: Any, new: Any) -> Any:
    """`new` in the style of `old`, the value it replaces: a collection in `old`'s flow style where `old`
    was a flow-style mapping or list (`{2: 0.12, ...}`); a float in exponent notation where `old` was
    spelled so or Python would spell `new` so (`lr: 3.0e-5` set to 1e-4 reads `1.0e-4`, not `0.0001`),
    inside a collection too."""
    from ruamel.yaml.comments import CommentedMap, CommentedSeq

    if isinstance(new, float) and math.isfinite(new):
        was_exponent = isinstance(old, float) and "e" in _yaml_text(ry, old).lower()
        return ry.load(_exponent_text(new)) if was_exponent or "e" in repr(new) else new
    if isinstance(new, dict):
        styled = CommentedMap({k: _in_style_of(ry, None, v) for k, v in new.items()})
    elif isinstance(new, list):
        styled = CommentedSeq([_in_style_of(ry, None, v) for v in new])
    else:
        return new
    if _flow_style(old):
        styled.fa.set_flow_style()
    return styled


def _exponent_text(value: float) -> str:
    """`value` in exponent notation with the fewest digits that read back exactly, spelled so that YAML
    1.1 (PyYAML) reads a float too, not only YAML 1.2: a point in the mantissa and a signed exponent
    (`1.0e-4`, `2.5e-7`, `1.0e+20`; Python's `1e-05` is a string under YAML 1.1)."""
    digits = next(n for n in range(17) if float(f"{value:.{n}e}") == value)
    mantissa, exponent = f"{value:.{digits}e}".split("e")
    if "." not in mantissa:
        mantissa += ".0"
    return f"{mantissa}e{int(exponent):+d}"


def _yaml_text(ry: Any, value: Any) -> str:
    """`value` on one line as YAML: a scalar as the file spells it (`3.0e-5`), a collection in flow style."""
    import io

    from ruamel.yaml import YAML

    buf = io.StringIO()
    if isinstance(value, (dict, list)):
        one_line = YAML(typ="safe", pure=True)
        one_line.default_flow_style = True
        one_line.width = 1_000_000
        one_line.dump(_plain(value), buf)
    else:
        ry.dump(value, buf)
    text = buf.getvalue().strip()
    return text[: -len("...")].strip() if text.endswith("...") else text


# "(--set: lr was 3.0e-5; ...)" at the start of a line's comment: what `ruyi run --set` replaced, so a
# comment written for the file's own value is not read as describing the new one.
_OVERRIDE_MARK = re.compile(r"^\(--set: (?P<items>.*?)\)(?: |$)")


def _mark_override(ry: Any, owner: Any, owner_key: str, leaf: str, old: Any, new: Any) -> str | None:
    """Notes on the line of `owner[owner_key]` that `leaf` was `old` before `--set`.

    The first `--set` of a key records the file's value; later ones keep it, and setting the key back
    to it removes the note and returns the value's recorded text. The rest of the comment (the
    value's documentation) is kept as it is."""
    from tasks.core.params import load_yaml  # YAML 1.2, as the params file is read (`1e-4` a float)

    slot = owner.ca.items.get(owner_key)
    token = slot[2] if slot and len(slot) > 2 else None
    first, nl, rest = (token.value if token is not None else "").partition("\n")
    text = first.strip()
    text = text[1:].strip() if text.startswith("#") else text
    items: dict[str, str] = {}
    if m := _OVERRIDE_MARK.match(text):
        for item in m.group("items").split("; "):
            key, sep, was = item.partition(" was ")
            if sep:
                items[key] = was
        text = text[m.end() :]
    items.setdefault(leaf, "absent" if old is _ABSENT else _yaml_text(ry, old))
    restored = None
    if items[leaf] != "absent" and load_yaml(items[leaf]) == _plain(new):
        restored = items.pop(leaf)
    mark = "(--set: " + "; ".join(f"{k} was {v}" for k, v in items.items()) + ")" if items else ""
    line = " ".join(part for part in (mark, text) if part)
    if token is not None and (line or rest):
        token.value = f"# {line}{nl}{rest}" if line else f"{nl}{rest}"
    elif token is not None:
        slot[2] = None
    elif line:
        owner.yaml_add_eol_comment(f"# {line}", owner_key)
    return restored


def _stage_metrics(workspace: Path, stage: str, dvc_file: str = "dvc.yaml") -> dict[str, Any]:
    import yaml

    spec = (yaml.safe_load((workspace / dvc_file).read_text()) or {})["stages"][stage]
    out: dict[str, Any] = {}
    for entry in spec.get("metrics", []):
        name = next(iter(entry)) if isinstance(entry, dict) else entry
        path = workspace / name
        if path.is_file():
            try:
                out[name] = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: stage {stage}'s metrics file is not valid JSON ({e})") from None
    return out


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _killing_signal(code: int | None) -> str | None:
    """The signal that ended a stage, from the exit code DVC reports, or None.

    A shell that execs the command reports the child's own status (`-9`); one that forks first
    (dash, or bash running a compound command) reports `128 + 9 = 137` and prints "Killed". Both are
    the same event: an OOM kill, a preempted node, a `kill` from outside. No stage exits with 129-192
    on its own (Python re-raises SIGINT as a signal death too), so the range is unambiguous.
    """
    if code is None:
        return None
    number = -code if code < 0 else code - 128 if 128 < code <= 128 + 64 else None
    if number is None:
        return None
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def classify_failure(output: str, returncode: int) -> tuple[str | None, bool]:
    """`(signal, transient)` of a failed `dvc repro`: the signal that killed the stage (or None) and
    whether the failure is an infrastructure error worth a retry.

    The stage's exit code is the *last* "exited with N" of the output (DVC's own line comes after the
    stage's log, which may quote one); without one, DVC itself ended by `returncode` (killed: `-9`).
    The infrastructure patterns (`_INFRA_PATTERNS`) are looked for in DVC's own failure when no stage
    exit code is there, and otherwise only in the stage's last lines (its final exception): a stage
    that crashed on a bug after logging a warning such as "timed out" is not retried as transient."""
    codes = re.findall(r"exited with (-?\d+)", output)
    code = int(codes[-1]) if codes else None
    killer = _killing_signal(code if code is not None else returncode)
    if code is None:
        searched = output
    else:  # the stage's output up to DVC's last "exited with" line, its last 6 non-blank lines
        before = output[: output.rfind("exited with")].splitlines()
        searched = "\n".join([line for line in before if line.strip()][-6:])
    transient = code == TRANSIENT_EXIT_CODE or (
        code != USER_ERROR_EXIT_CODE and any(re.search(p, searched) for p in _INFRA_PATTERNS)
    )
    return killer, transient


def _api_only_logger(run_logger: logging.LoggerAdapter) -> logging.LoggerAdapter:
    """A logger for the run's log in the Prefect UI only: the console already shows the stage's raw
    output (progress bars included), so its lines must not be printed a second time there."""
    from prefect.logging.handlers import APILogHandler

    base = logging.getLogger("ruyi.stage_output")
    if not any(isinstance(h, APILogHandler) for h in base.handlers):
        base.addHandler(APILogHandler())
        base.setLevel(logging.INFO)
        base.propagate = False
    return logging.LoggerAdapter(base, dict(run_logger.extra or {}))


def _retry_only_infrastructure(task_obj, task_run, state) -> bool:
    try:
        state.result()
    except InfrastructureError:
        return True
    except Exception:
        return False
    return False


@task(
    name="dvc-stage",
    task_run_name="{stage}",
    cache_policy=NONE,
    retries=2,
    retry_delay_seconds=3,
    retry_condition_fn=_retry_only_infrastructure,
)
def run_stage(stage: str, workspace: str, force: bool = False, dvc_file: str = "dvc.yaml") -> dict[str, Any]:
    """`dvc repro <stage> --single-item --no-run-cache [--force]` (of `dvc_file`); publishes the stage's
    metrics as a table artifact.

    `--no-run-cache`: DVC would otherwise restore a stage's declared outputs without running it when its
    inputs match any earlier run (not only the recorded one), while what the stage writes beside them
    (`metrics/eval.json`, the gates' Data Docs, the deploy smoke report, the published release) would stay
    from another run. An up-to-date stage (dvc.lock matches) is still skipped."""
    logger = get_run_logger()
    ws = Path(workspace)
    t0 = time.perf_counter()
    ui_log = _api_only_logger(logger)
    returncode, output = _dvc_streamed(
        [
            "repro",
            stage_target(stage, dvc_file),
            "--single-item",
            "--no-run-cache",
            *(["--force"] if force else []),
        ],
        ws,
        on_line=lambda line: ui_log.info("%s | %s", stage, line),
    )
    elapsed = time.perf_counter() - t0
    if returncode != 0:
        summary = _failure_summary(output)
        killer, transient = classify_failure(output, returncode)
        if killer or transient:
            if killer:
                why = f"killed by {killer}" + (" (out of memory?)" if killer == "SIGKILL" else "")
            else:
                why = "a transient error"
            raise InfrastructureError(
                f"stage {stage} hit an infrastructure error, {why} (will retry):\n{summary}"
            )
        raise StageFailed(f"stage {stage} failed (not retried):\n{summary}")
    skipped = "didn't change, skipping" in output or "is cached - skipping" in output
    logger.info("stage %s %s in %.1f s", stage, "up to date" if skipped else "ran", elapsed)
    metrics = _stage_metrics(ws, stage, dvc_file)
    rows = [
        {"metric": k, "value": v}
        for name, m in metrics.items()
        for k, v in _flatten(m, Path(name).stem).items()
        if isinstance(v, (int, float, str, bool))
    ]
    if rows:
        create_table_artifact(
            key=f"metrics-{stage.replace('_', '-')}", table=rows, description=f"metrics of stage {stage}"
        )
    return {"stage": stage, "skipped": skipped, "seconds": round(elapsed, 2), "metrics": metrics}


def _lineage_markdown(
    workspace: Path, results: list[dict[str, Any]], failed: str | None = None, dvc_file: str = "dvc.yaml"
) -> str:
    import yaml
    from prefect.runtime import flow_run

    def git(*args: str) -> str:
        p = subprocess.run(["git", *args], cwd=workspace, capture_output=True, text=True)
        return p.stdout.strip() if p.returncode == 0 else "n/a"

    lock_path = workspace / lock_file(dvc_file)
    lock = yaml.safe_load(lock_path.read_text()) if lock_path.is_file() else {}
    lines = [
        "# Lineage",
        "",
        f"- flow run id: `{flow_run.id}`",
        f"- git revision: `{git('rev-parse', 'HEAD')}`"
        + (" (uncommitted changes)" if git("status", "--porcelain") not in ("", "n/a") else ""),
        "",
        "| stage | ran | seconds | outputs (md5) |",
        "|---|---|---|---|",
    ]
    for r in results:
        outs = (lock.get("stages", {}).get(r["stage"], {}) or {}).get("outs", [])
        hashes = ", ".join(f"`{o['path']}`: `{o.get('md5', '')[:12]}`" for o in outs)
        lines.append(
            f"| {r['stage']} | {'no (up to date)' if r['skipped'] else 'yes'} | {r['seconds']} | {hashes} |"
        )
    if failed is not None:
        lines.append(f"| {failed} | **failed** | | (no outputs recorded) |")
    return "\n".join(lines)


#: The lock file that serializes runs of one workspace (DVC's own lock would fail the second run instead).
WORKSPACE_LOCK = Path(".dvc") / "tmp" / "ruyi-pipeline.lock"


@contextlib.contextmanager
def workspace_lock(workspace: Path, logger: Any = None) -> Iterator[Path]:
    """One run per workspace at a time: an exclusive `flock` on `.dvc/tmp/ruyi-pipeline.lock`.

    The operating system releases it when the holder exits, however it exits (a killed run never leaves
    the workspace locked, unlike a server-side concurrency slot whose lease must expire first). A second
    run waits, logging who holds the lock (pid and start time, written into the file by the holder).
    """
    path = workspace / WORKSPACE_LOCK
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another run"
            (logger or logging.getLogger("ruyi")).info(
                "workspace %s is busy (%s): waiting for that run to finish", workspace, holder
            )
            fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()
        try:
            yield path
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@task(
    name="dvc-push",
    cache_policy=NONE,
    retries=2,
    retry_delay_seconds=5,
    retry_condition_fn=_retry_only_infrastructure,
)
def push_results(workspace: str, dvc_file: str = "dvc.yaml") -> None:
    """`dvc push <dvc_file>` (that pipeline's outputs) to the default remote; a failure (unreachable
    remote, throttling) is retried."""
    proc = _dvc(["push", dvc_file], Path(workspace), check=False)
    if proc.returncode != 0:
        raise InfrastructureError(f"dvc push failed:\n{(proc.stderr.strip() or proc.stdout.strip())[-2000:]}")


@flow(name="ruyi-pipeline", log_prints=True)
def ruyi_pipeline(
    from_stage: str | None = None,
    to_stage: str | None = None,
    overrides: dict[str, Any] | None = None,
    push: bool = True,
    workspace: str | None = None,
    force: bool = False,
    profile: str = "text",
) -> list[dict[str, Any]]:
    """Runs the pipeline's DVC stages from `from_stage` to `to_stage` (default: all).

    Args:
        from_stage: first stage to run (upstream stages are not recomputed; their outputs must exist).
        to_stage: last stage to run.
        overrides: parameter overrides as dotted keys, e.g. {"cpt.max_steps": 50}; written to params.yaml.
        push: push the results to the DVC remote when one is configured.
        workspace: the repository to run in (default: $RUYI_WORKSPACE or the current directory).
        force: recompute the selected stages even when DVC finds them up to date (`dvc repro --force`),
            e.g. to rerun from a stage in the UI after a change that DVC does not track.
        profile: "text" (dvc.yaml, params.yaml) or "vl" (profiles/vl/dvc.yaml, params.vl.yaml): `PROFILES`.
    """
    logger = get_run_logger()
    ws = Path(workspace or os.environ.get("RUYI_WORKSPACE") or os.getcwd()).resolve()
    dvc_file, params_file = profile_files(profile)
    if not (ws / dvc_file).is_file():
        raise ValueError(f"workspace {ws} has no {dvc_file}")
    stages = select_stages(dvc_stage_order(ws, dvc_file), from_stage, to_stage)
    results: list[dict[str, Any]] = []
    with workspace_lock(ws, logger):
        changed = apply_param_overrides(ws, overrides or {}, params_file)
        if changed:
            logger.info("parameters overridden in %s: %s", params_file, ", ".join(changed))
        logger.info("stages to run in %s: %s%s", ws, " -> ".join(stages), " (forced)" if force else "")
        failed: str | None = None
        try:
            for stage in stages:
                failed = stage
                missing = [] if force else missing_local_effects(ws, stage, dvc_file)
                if missing:
                    logger.info(
                        "stage %s: %s not on this machine (not a DVC output): running it even if DVC "
                        "finds it up to date",
                        stage,
                        ", ".join(missing),
                    )
                result = run_stage(stage, str(ws), force=force or bool(missing), dvc_file=dvc_file)
                results.append({**result, "forced_for": missing} if missing else result)
            failed = None
        finally:
            # Published for failed runs too: which stages ran, with which outputs, and where it stopped.
            create_markdown_artifact(
                key="lineage",
                markdown=_lineage_markdown(ws, results, failed, dvc_file),
                description="git revision, dvc.lock hashes and flow run of this pipeline run",
            )
        if push and _dvc(["remote", "list"], ws).stdout.strip():
            push_results(str(ws), dvc_file)
            logger.info("pushed the results to the DVC remote")
    return results


__all__ = [
    "ruyi_pipeline",
    "dvc_stage_order",
    "select_stages",
    "PROFILES",
    "profile_files",
    "stage_target",
    "apply_param_overrides",
    "StageFailed",
    "InfrastructureError",
    "push_results",
    "missing_local_effects",
    "stage_freshness",
    "LOCAL_EFFECT_KEY",
]
