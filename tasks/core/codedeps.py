"""A stage's code dependencies, derived from its imports: one source for dvc.yaml and for checkpoints.

    python -m tasks.core.codedeps --write    # rewrite the code deps of every stage of every pipeline file
    python -m tasks.core.codedeps --check    # fail when a pipeline file disagrees

The pipeline files are `PIPELINES`: dvc.yaml (the text profile) and profiles/vl/dvc.yaml (the
vision-language profile, whose stages run with `wdir` at the repository root and also import
`tasks.training.vl_pipeline` by name, see tasks/core/stage.py).

The same closure feeds the checkpoint fingerprint (`code_fingerprint`), so changing any module a stage
imports both reruns the stage under DVC and retires its checkpoints. Why: docs/choices.md#orchestration.
"""

from __future__ import annotations

import argparse
import ast
import sys
from functools import cache
from pathlib import Path

#: The repository root (the folder that holds `tasks/`).
REPO_ROOT = Path(__file__).resolve().parents[2]
#: The text profile's and the vision-language profile's pipeline files (repository-relative).
TEXT_PIPELINE = "dvc.yaml"
VL_PIPELINE = "profiles/vl/dvc.yaml"
#: Every DVC pipeline file -> modules its stages load besides `tasks.<stage>`.
PIPELINES: dict[str, tuple[str, ...]] = {
    TEXT_PIPELINE: (),
    VL_PIPELINE: ("tasks.training.vl_pipeline",),
}
#: Top-level packages of this repository whose modules count as code dependencies.
PACKAGES = ("tasks", "ruyi_model", "triton_kernels", "data_contracts", "flows")


def module_path(module: str, root: Path = REPO_ROOT) -> Path | None:
    """The file of a dotted module of this repository (a package's `__init__.py`), or None."""
    if module.split(".")[0] not in PACKAGES:
        return None
    base = root.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imported_modules(path: Path, module: str) -> set[str]:
    """Dotted names of every module `path` imports (at any depth of the file), relative ones resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            found.add(target)
            # `from pkg import name` may name a submodule
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return found


def _with_parents(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


@cache
def module_deps(module: str, root: Path = REPO_ROOT) -> tuple[str, ...]:
    """Repository-relative paths of `module` and of every repository module it imports, transitively."""
    seen: dict[str, Path] = {}
    todo = [module]
    while todo:
        name = todo.pop()
        for candidate in _with_parents(name):  # importing a.b.c runs a/__init__.py and a/b/__init__.py
            if candidate in seen:
                continue
            path = module_path(candidate, root)
            if path is None:
                continue
            seen[candidate] = path
            todo.extend(_imported_modules(path, candidate))
    if module not in seen:
        raise ValueError(f"no module {module!r} in {root}")
    return tuple(sorted(p.relative_to(root).as_posix() for p in seen.values()))


def stage_deps(stage: str, root: Path = REPO_ROOT, pipeline: str = TEXT_PIPELINE) -> tuple[str, ...]:
    """The code dependencies of the stage `python -m tasks.<stage>` as `pipeline` (a key of
    `PIPELINES`) runs it: its own imports and those of the modules that pipeline's stages load."""
    if pipeline not in PIPELINES:
        raise ValueError(f"unknown pipeline file {pipeline!r} (one of {', '.join(PIPELINES)})")
    deps = set(module_deps(f"tasks.{stage}", root))
    for module in PIPELINES[pipeline]:
        deps |= set(module_deps(module, root))
    return tuple(sorted(deps))


def code_fingerprint(stage: str, root: Path = REPO_ROOT, pipeline: str = TEXT_PIPELINE) -> dict[str, str]:
    """sha256 of every file of `stage_deps(stage, root, pipeline)`: what a resumable checkpoint must
    agree on (the same files as the stage's code deps in that pipeline file)."""
    from ruyi_model.fileio import sha256_file

    return {rel: sha256_file(root / rel) for rel in stage_deps(stage, root, pipeline)}


# --- dvc.yaml ----------------------------------------------------------------------------------------
def _is_code(dep: str) -> bool:
    """A dep inside a code package: a module (or a whole folder, which `--write` replaces by its modules)."""
    return dep.split("/")[0] in PACKAGES


def _stage_of(cmd: str) -> str | None:
    prefix = "python -m tasks."
    return cmd.split()[2].removeprefix("tasks.") if cmd.startswith(prefix) else None


def _stage_code(spec, dvc_yaml: Path) -> tuple[Path, list[str]] | None:
    """(the stage's working directory, its derived code deps) for a `python -m tasks.<stage>` stage."""
    stage = _stage_of(str(spec["cmd"]))
    if stage is None:
        return None
    root = (dvc_yaml.parent / str(spec.get("wdir", "."))).resolve()
    try:
        pipeline = dvc_yaml.resolve().relative_to(root).as_posix()
    except ValueError:
        pipeline = TEXT_PIPELINE
    return root, list(stage_deps(stage, root, pipeline if pipeline in PIPELINES else TEXT_PIPELINE))


def dvc_yaml_differences(dvc_yaml: Path) -> list[str]:
    """Lines naming every stage whose code deps in `dvc_yaml` differ from its imports (empty: agree)."""
    import yaml

    stages = yaml.safe_load(dvc_yaml.read_text())["stages"]
    out = []
    for name, spec in stages.items():
        code = _stage_code(spec, dvc_yaml)
        if code is None:
            continue
        listed = {str(d) for d in spec.get("deps", []) if _is_code(str(d))}
        derived = set(code[1])
        if listed != derived:
            missing, extra = sorted(derived - listed), sorted(listed - derived)
            out.append(f"{dvc_yaml}: stage {name}: missing {missing or '[]'}, not imported {extra or '[]'}")
    return out


def write_dvc_yaml(dvc_yaml: Path) -> bool:
    """Rewrites each stage's code deps in `dvc_yaml` from its imports (comments and other deps kept);
    True if the file changed."""
    import io

    from ruamel.yaml import YAML

    y = YAML()
    y.preserve_quotes = True
    y.width = 4096
    y.indent(mapping=2, sequence=4, offset=2)
    text = dvc_yaml.read_text()
    doc = y.load(text)
    for spec in doc["stages"].values():
        code = _stage_code(spec, dvc_yaml)
        if code is None:
            continue
        deps = spec["deps"]
        data = [d for d in deps if not _is_code(str(d))]
        deps.clear()
        deps.extend(data + code[1])
    buf = io.StringIO()
    y.dump(doc, buf)
    if buf.getvalue() == text:
        return False
    dvc_yaml.write_text(buf.getvalue())
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tasks.core.codedeps",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--dvc-yaml",
        type=Path,
        action="append",
        help="a pipeline file (repeatable); default: every file of PIPELINES",
    )
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--check", action="store_true", help="exit 1 if a file's code deps differ from the imports"
    )
    group.add_argument("--write", action="store_true", help="rewrite the files' code deps from the imports")
    parser.add_argument("stage", nargs="?", help="print one stage's code dependencies")
    args = parser.parse_args(argv)
    if args.stage:
        print("\n".join(stage_deps(args.stage)))
        return 0
    files = args.dvc_yaml or [REPO_ROOT / rel for rel in PIPELINES]
    if args.write:
        for f in files:
            print(f"{f}: {'updated' if write_dvc_yaml(f) else 'already current'}")
        return 0
    problems = [line for f in files for line in dvc_yaml_differences(f)]
    print("\n".join(problems) or "every stage's code deps match its imports: " + ", ".join(map(str, files)))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
