"""dvc.yaml declares what each stage really reads, so that `dvc repro` reruns exactly what changed.

Code deps: derived from each stage's imports, transitively (`tasks.core.codedeps`), the same set the
checkpoint fingerprint hashes. Params: every section a stage module reads (`params.<section>`).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import yaml

from tasks.core import codedeps

REPO = Path(__file__).resolve().parents[2]
STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
# Params properties that are derived from declared keys (tasks/core/params.py).
DERIVED = {"dae_exit": ("expand.exit_layer", "model.exit_layers")}


def test_dvc_yaml_code_deps_are_the_imports():
    assert codedeps.dvc_yaml_differences(REPO / "dvc.yaml") == []


def test_vl_profile_code_deps_include_the_vl_bodies():
    """The VL pipeline file's stages run from the repository root and load tasks.training.vl_pipeline
    by name: its closure counts, so editing it reruns those stages (and not the text ones)."""
    vl_file = REPO / "profiles" / "vl" / "dvc.yaml"
    assert codedeps.dvc_yaml_differences(vl_file) == []
    stages = yaml.safe_load(vl_file.read_text())["stages"]
    assert all("tasks/training/vl_pipeline.py" in spec["deps"] for spec in stages.values())
    assert "tasks/training/vl_pipeline.py" not in codedeps.stage_deps("cpt")


@pytest.mark.parametrize("pipeline", sorted(codedeps.PIPELINES))
def test_checkpoint_fingerprints_hash_the_stages_code_deps(pipeline):
    """A resumable checkpoint is stale when any code dependency of its stage changed, in the pipeline file
    that runs it: the VL stages' checkpoints once hashed only `tasks.<stage>`'s closure, so an edit to
    tasks/training/vl_pipeline.py (their training code) reran them under DVC and they resumed the old
    code's finished checkpoint."""
    stages = yaml.safe_load((REPO / pipeline).read_text())["stages"]
    for name, spec in stages.items():
        stage = spec["cmd"].split()[2].removeprefix("tasks.")
        listed = {d for d in spec["deps"] if d.split("/")[0] in codedeps.PACKAGES}
        assert set(codedeps.code_fingerprint(stage, REPO, pipeline)) == listed, name
    with pytest.raises(ValueError, match="unknown pipeline file"):
        codedeps.stage_deps("cpt", REPO, "profiles/nope/dvc.yaml")


def test_rl_depends_on_decoding_transitively():
    deps = codedeps.stage_deps("rl")
    assert "ruyi_model/decoding.py" in deps and "tasks/training/rl_algos.py" in deps
    assert "ruyi_model/decoding.py" in STAGES["rl"]["deps"]


def _copy_code(dst: Path) -> Path:
    for pkg in codedeps.PACKAGES:
        shutil.copytree(REPO / pkg, dst / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", dst / "dvc.yaml")
    return dst


def test_a_change_to_an_imported_module_changes_the_stage_and_its_fingerprint(tmp_path):
    root = _copy_code(tmp_path)
    before = codedeps.code_fingerprint("rl", root)
    assert codedeps.dvc_yaml_differences(root / "dvc.yaml") == []
    with open(root / "ruyi_model/decoding.py", "a") as f:
        f.write("\n# changed\n")
    after = codedeps.code_fingerprint("rl", root)
    assert [k for k in before if before[k] != after[k]] == ["ruyi_model/decoding.py"]


def test_a_new_import_is_caught_and_written(tmp_path):
    root = _copy_code(tmp_path)
    (root / "tasks/data/extra_helper.py").write_text("X = 1\n")
    with open(root / "tasks/rl.py", "a") as f:
        f.write("\nfrom tasks.data import extra_helper  # noqa\n")
    problems = codedeps.dvc_yaml_differences(root / "dvc.yaml")
    assert problems and "stage rl" in problems[0] and "tasks/data/extra_helper.py" in problems[0]
    assert codedeps.write_dvc_yaml(root / "dvc.yaml")
    assert codedeps.dvc_yaml_differences(root / "dvc.yaml") == []
    assert (
        "tasks/data/extra_helper.py"
        in yaml.safe_load((root / "dvc.yaml").read_text())["stages"]["rl"]["deps"]
    )


@pytest.mark.parametrize("pipeline", ["dvc.yaml", "profiles/vl/dvc.yaml"])
def test_every_stage_tracks_the_thread_count(pipeline):
    """`threads` is read by every stage (tasks.core.stage) and decides bitwise CPU results: a change must
    rerun the stages and show in the audit, so each stage's params list it."""
    stages = yaml.safe_load((REPO / pipeline).read_text())["stages"]
    for name, stage in stages.items():
        declared = [p for p in stage.get("params", []) if isinstance(p, str)]
        declared += [
            k for p in stage.get("params", []) if isinstance(p, dict) for k in next(iter(p.values()))
        ]
        assert "threads" in declared, f"{pipeline}: stage {name} does not track threads"


@pytest.mark.parametrize("pipeline", sorted(codedeps.PIPELINES))
def test_measured_metric_files_are_neither_stage_outputs_nor_inputs(pipeline):
    """The complete metric files (the file's top-level `metrics`: timings, tokens/s) change on every run:
    as a stage output `ruyi audit` would find them different, as a stage input they would rerun it. The
    VL profile's evaluate once output metrics/vl/eval.json (tokens/s) and its deploy read it."""
    spec = yaml.safe_load((REPO / pipeline).read_text())
    folder = (REPO / pipeline).parent
    measured = {(folder / m).resolve().relative_to(REPO).as_posix() for m in spec.get("metrics", [])}
    assert measured, f"{pipeline} lists no measured metric files"
    for name, stage in spec["stages"].items():
        touched = {
            next(iter(x)) if isinstance(x, dict) else str(x)
            for kind in ("deps", "outs", "metrics", "plots")
            for x in stage.get(kind, []) or []
        }
        assert not touched & measured, f"{pipeline}: stage {name} outputs or reads {touched & measured}"


@pytest.mark.parametrize("pipeline", sorted(codedeps.PIPELINES))
def test_every_complete_metric_file_is_a_top_level_metric(pipeline):
    """`write_metrics` writes a stage's reproducible part (the stage output `.../reproducible/<x>.json`)
    and beside it the complete file `<x>.json`, which `dvc metrics show` shows only when the pipeline
    file lists it: the VL file once listed evaluate's alone, leaving its training stages' timings and
    run ids out of `dvc metrics show`/`diff`. Deploy's complete file is written beside its smoke record."""
    spec = yaml.safe_load((REPO / pipeline).read_text())
    folder = (REPO / pipeline).parent
    listed = {(folder / m).resolve().relative_to(REPO).as_posix() for m in spec.get("metrics", [])}
    complete = {"/".join(Path(m).parts[:-2] + (Path(m).name,)) for m in _outputs(spec, "/reproducible/")}
    complete |= {m.replace("deploy_smoke.json", "deploy.json") for m in _outputs(spec, "deploy_smoke")}
    assert len(complete) >= 10, complete
    assert complete <= listed, f"{pipeline}: add to its top-level metrics: {sorted(complete - listed)}"


def _outputs(spec: dict, marker: str) -> set[str]:
    return {
        next(iter(x)) if isinstance(x, dict) else str(x)
        for stage in spec["stages"].values()
        for kind in ("outs", "metrics")
        for x in stage.get(kind, []) or []
        if marker in (next(iter(x)) if isinstance(x, dict) else str(x))
    }


@pytest.mark.parametrize("stage", list(STAGES))
def test_stage_params_include_every_section_it_reads(stage):
    source = (REPO / f"tasks/{stage}.py").read_text()
    declared = [str(p) for p in STAGES[stage].get("params", [])]
    missing = []
    for name in sorted(set(re.findall(r"\bparams\.([a-z_]+)", source)) - {"paths", "yaml"}):
        needed = DERIVED.get(name, (name,))
        for key in needed:
            if not any(d == key or d.startswith(key + ".") or key.startswith(d + ".") for d in declared):
                missing.append(key)
    assert not missing, f"dvc.yaml stage {stage}: add params {missing} (read by tasks/{stage}.py)"


@pytest.mark.parametrize("pipeline", sorted(codedeps.PIPELINES))
def test_every_declared_param_is_in_its_params_file(pipeline):
    """DVC refuses a stage whose declared param key is missing from its params file ("Parameters ...
    are missing"), which only a full `dvc repro` would show: each key must be written in the file the
    stage names (params.yaml by default), not only be a schema default."""
    stages = yaml.safe_load((REPO / pipeline).read_text())["stages"]
    missing = []
    for name, stage in stages.items():
        wdir = (REPO / pipeline).parent / stage.get("wdir", ".")
        for entry in stage.get("params", []):
            file, keys = next(iter(entry.items())) if isinstance(entry, dict) else ("params.yaml", [entry])
            values = yaml.safe_load((wdir / file).read_text())
            missing += [f"{name}: {file}: {key}" for key in keys if not _has_key(values, str(key))]
    assert not missing, f"{pipeline}: declared params missing from their files: {missing}"


def _has_key(values: dict, key: str) -> bool:
    """`key` (dotted) is present in `values`, whatever its value (null included)."""
    *parents, last = key.split(".")
    for part in parents:
        values = values.get(part)
        if not isinstance(values, dict):
            return False
    return last in values
