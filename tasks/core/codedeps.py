"""A stage's code dependencies, derived from its imports: one source for dvc.yaml and for checkpoints.

    python -m tasks.core.codedeps --write    # rewrite the code deps of every stage in dvc.yaml
    python -m tasks.core.codedeps --check    # fail when dvc.yaml disagrees

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


def stage_deps(stage: str, root: Path = REPO_ROOT) -> tuple[str, ...]:
    """The code dependencies of the stage `python -m tasks.<stage>`."""
    return module_deps(f"tasks.{stage}", root)


def code_fingerprint(stage: str, root: Path = REPO_ROOT) -> dict[str, str]:
    """sha256 of every file of `stage_deps(stage)`: what a resumable checkpoint must agree on."""
    from ruyi_model.fileio import sha256_file

    return {rel: sha256_file(root / rel) for rel in stage_deps(stage, root)}


# --- dvc.yaml ----------------------------------------------------------------------------------------
def _is_code(dep: str) -> bool:
    """A dep inside a code package: a module (or a whole folder, which `--write` replaces by its modules)."""
    return dep.split("/")[0] in PACKAGES


def _stage_of(cmd: str) -> str | None:
    prefix = "python -m tasks."
    return cmd.split()[2].removeprefix("tasks.") if cmd.startswith(prefix) else None


def dvc_yaml_differences(dvc_yaml: Path) -> list[str]:
    """Lines naming every stage whose code deps in `dvc_yaml` differ from its imports (empty: agree)."""
    import yaml

    stages = yaml.safe_load(dvc_yaml.read_text())["stages"]
    root = dvc_yaml.parent
    out = []
    for name, spec in stages.items():
        stage = _stage_of(spec["cmd"])
        if stage is None:
            continue
        listed = {str(d) for d in spec.get("deps", []) if _is_code(str(d))}
        derived = set(stage_deps(stage, root))
        if listed != derived:
            missing, extra = sorted(derived - listed), sorted(listed - derived)
            out.append(f"{dvc_yaml}: stage {name}: missing {missing or '[]'}, not imported {extra or '[]'}")
    return out


def write_dvc_yaml(dvc_yaml: Path) -> bool:
    """Rewrites each stage's code deps in `dvc_yaml` from its imports (comments and other deps kept);
    True if the file changed."""
    from ruamel.yaml import YAML

    y = YAML()
    y.preserve_quotes = True
    y.width = 4096
    y.indent(mapping=2, sequence=4, offset=2)
    text = dvc_yaml.read_text()
    doc = y.load(text)
    for spec in doc["stages"].values():
        stage = _stage_of(str(spec["cmd"]))
        if stage is None:
            continue
        deps = spec["deps"]
        data = [d for d in deps if not _is_code(str(d))]
        code = list(stage_deps(stage, dvc_yaml.parent))
        keep_data = list(data)
        deps.clear()
        deps.extend(keep_data + code)
    import io

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
        "--dvc-yaml", type=Path, default=REPO_ROOT / "dvc.yaml", help="default: the repo's dvc.yaml"
    )
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--check", action="store_true", help="exit 1 if dvc.yaml's code deps differ from the imports"
    )
    group.add_argument("--write", action="store_true", help="rewrite dvc.yaml's code deps from the imports")
    parser.add_argument("stage", nargs="?", help="print one stage's code dependencies")
    args = parser.parse_args(argv)
    if args.stage:
        print("\n".join(stage_deps(args.stage)))
        return 0
    if args.write:
        print(f"{args.dvc_yaml}: {'updated' if write_dvc_yaml(args.dvc_yaml) else 'already current'}")
        return 0
    problems = dvc_yaml_differences(args.dvc_yaml)
    print("\n".join(problems) or f"{args.dvc_yaml}: every stage's code deps match its imports")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
