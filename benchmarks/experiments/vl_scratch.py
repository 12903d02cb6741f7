"""Shared by the VL experiments: a scratch workspace that reads the profile's data and alignment output and
writes everything else under one directory (the workspace's artifacts are never written)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def vl_argparser(doc: str) -> argparse.ArgumentParser:
    """An experiment's parser: its docstring's first paragraph as the description, `--params`, `--set`."""
    ap = argparse.ArgumentParser(
        description=doc.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    ap.add_argument(
        "--params", default="params.vl.yaml", help="the VL profile's params file (default %(default)s)"
    )
    ap.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="params override (repeatable)"
    )
    return ap


def scratch_params(params_path: str | Path, sets: dict[str, Any], out: Path):
    """The VL params with `sets` applied and every output path under `out`; `out/artifacts/{cpt,tokenizer}`
    link to the workspace's (which must exist: `dvc repro profiles/vl/dvc.yaml:cpt`)."""
    from tasks.core.params import load_params
    from tasks.core.paths import Workspace

    ws = Workspace.from_params(load_params(Path(params_path), sets))
    for name in ("cpt", "tokenizer"):
        if not ws.artifacts(name).is_dir():
            raise SystemExit(f"{ws.artifacts(name)} not found: run the VL profile up to cpt first")
    (out / "artifacts").mkdir(parents=True, exist_ok=True)
    for name in ("cpt", "tokenizer"):
        link = out / "artifacts" / name
        if not link.exists():
            link.symlink_to(ws.artifacts(name).resolve())
    scratch = {
        "paths.artifacts_dir": str(out / "artifacts"),
        "paths.metrics_dir": str(out / "metrics"),
        "paths.plots_dir": str(out / "plots"),
        "paths.reports_dir": str(out / "reports"),
        "paths.data_dir": str(ws.data_dir.resolve()),
        "evaluate.checkpoint": "family_sft",
    }
    return load_params(Path(params_path), {**sets, **scratch})
