"""Orchestration: the Prefect flow over `dvc repro`, its deployments, the `ruyi` CLI and the run summary."""
