"""The summary `ruyi run` prints after the pipeline: one row per exit, then where the results are.

    python -m tasks.report [--params params.yaml]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from tasks.params import load_params


def _read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def summary_rows(metrics_dir: str | Path) -> list[dict[str, Any]]:
    """One row per exit from metrics/eval.json (quality, speed, parameters) and compress.json."""
    metrics_dir = Path(metrics_dir)
    ev = _read(metrics_dir / "eval.json")
    comp = _read(metrics_dir / "compress.json")
    rows = []
    for key in sorted((k for k in ev if k.startswith("exit_")), key=lambda k: int(k.split("_")[1])):
        m = ev[key]
        rows.append({"exit": key, "loss": m.get("loss"), "accuracy": m.get("accuracy"),
                     "tokens_per_s": m.get("tokens_per_s"), "params": m.get("params"),
                     "compress_change": (comp.get(key) or {}).get("relative_loss_change")})
    return rows


def print_summary(params_path: str | Path = "params.yaml") -> None:
    from rich.console import Console
    from rich.table import Table

    params = load_params(params_path)
    console = Console()
    rows = summary_rows(params.paths.metrics_dir)
    table = Table(title="ruyi family: one row per exit (member)")
    for col in ("exit", "held-out loss", "math accuracy", "tokens/s", "params", "compression loss change"):
        table.add_column(col, justify="right")

    def fmt(v, spec):
        return "-" if v is None else format(v, spec)

    for r in rows:
        table.add_row(r["exit"], fmt(r["loss"], ".3f"), fmt(r["accuracy"], ".1%"), fmt(r["tokens_per_s"], ".1f"),
                      fmt(r["params"], ","), fmt(r["compress_change"], "+.2%"))
    console.print(table)
    deploy = _read(Path(params.paths.metrics_dir) / "deploy.json")
    paths = {
        "metrics": params.paths.metrics_dir,
        "plots": params.paths.plots_dir,
        "data contracts (Data Docs)": str(Path(params.paths.reports_dir) / "contracts"),
        "exports (stock Qwen3 per exit)": str(Path(params.paths.artifacts_dir) / "export"),
        "release": deploy.get("release_uri") or deploy.get("store_uri") or "-",
    }
    for name, where in paths.items():
        console.print(f"[bold]{name}[/bold]: {where}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tasks.report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args(argv)
    print_summary(args.params)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
