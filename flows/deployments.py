"""Prefect deployments: `nightly` (cron), `rerun` (parameters set in the UI) and `audit` (weekly).

    ruyi server                 # a Prefect server on 127.0.0.1 + the three deployments served (UI reruns)
    ruyi deployments [--cron]   # serve the three deployments against an existing PREFECT_API_URL

The same deployments are declared in prefect.yaml for `prefect deploy`. Why: docs/choices.md#orchestration.
"""

from __future__ import annotations

import os
from pathlib import Path

NIGHTLY_CRON = "0 2 * * *"
AUDIT_CRON = "0 4 * * 0"  # Sundays, after the nightly run


def build_deployments(workspace: str | Path | None = None, cron: str = NIGHTLY_CRON):
    from flows.pipeline import ruyi_pipeline

    ws = str(Path(workspace or os.getcwd()).resolve())
    nightly = ruyi_pipeline.to_deployment(
        name="nightly",
        cron=cron,
        parameters={"workspace": ws, "push": True},
        description="The whole pipeline every night; DVC skips what is up to date.",
        tags=["ruyi", "nightly"],
    )
    rerun = ruyi_pipeline.to_deployment(
        name="rerun",
        parameters={"workspace": ws, "from_stage": None, "to_stage": None, "overrides": {}, "push": True},
        description="Rerun from any stage with parameter overrides (set from_stage/overrides in the UI).",
        tags=["ruyi", "rerun"],
    )
    from flows.audit import ruyi_audit

    audit = ruyi_audit.to_deployment(
        name="audit",
        cron=AUDIT_CRON,
        parameters={"workspace": ws, "rev": "HEAD", "remote": None, "pull": True, "profile": "text"},
        description=(
            "Reproduce the recorded run (the profile's lock file at rev; profile text or vl) in a clean "
            "clone; fails on any difference."
        ),
        tags=["ruyi", "audit"],
    )
    return [nightly, rerun, audit]


def serve_deployments(workspace: str | Path | None = None, cron: str = NIGHTLY_CRON) -> None:
    """Blocks, serving the deployments (scheduled runs and UI-triggered reruns execute here)."""
    from prefect import serve

    serve(*build_deployments(workspace, cron), limit=1)
