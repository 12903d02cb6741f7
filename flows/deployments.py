"""Prefect deployments of the pipeline: `nightly` (cron) and `rerun` (parameters set in the UI).

    ruyi server                 # a Prefect server on 127.0.0.1 + both deployments served (UI reruns)
    ruyi deployments [--cron]   # serve both deployments against an existing PREFECT_API_URL

The same deployments are declared in prefect.yaml for `prefect deploy`. Why: docs/choices.md#orchestration.
"""

from __future__ import annotations

import os
from pathlib import Path

NIGHTLY_CRON = "0 2 * * *"


def build_deployments(workspace: str | Path | None = None, cron: str = NIGHTLY_CRON):
    from flows.pipeline import ruyi_pipeline

    ws = str(Path(workspace or os.getcwd()).resolve())
    nightly = ruyi_pipeline.to_deployment(
        name="nightly", cron=cron, parameters={"workspace": ws, "push": True},
        description="The whole pipeline every night; DVC skips what is up to date.", tags=["ruyi", "nightly"])
    rerun = ruyi_pipeline.to_deployment(
        name="rerun", parameters={"workspace": ws, "from_stage": None, "to_stage": None, "overrides": {}, "push": True},
        description="Rerun from any stage with parameter overrides (set from_stage/overrides in the UI).",
        tags=["ruyi", "rerun"])
    return [nightly, rerun]


def serve_deployments(workspace: str | Path | None = None, cron: str = NIGHTLY_CRON) -> None:
    """Blocks, serving both deployments (scheduled runs and UI-triggered reruns execute here)."""
    from prefect import serve

    serve(*build_deployments(workspace, cron), limit=1)
