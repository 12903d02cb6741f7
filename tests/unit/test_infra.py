"""The cluster definitions in infra/ parse and agree with each other and with prefect.yaml."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"


def test_every_infra_file_parses():
    for path in INFRA.rglob("*"):
        if path.suffix in (".yaml", ".yml"):
            assert yaml.safe_load(path.read_text()) is not None, path
        elif path.suffix == ".json":
            json.loads(path.read_text())


def test_prefect_deployments_use_declared_pools_and_the_flow_entrypoint():
    pools = {p["name"] for p in yaml.safe_load((INFRA / "prefect/work-pool.yaml").read_text())["pools"]}
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    names = {d["name"] for d in spec["deployments"]}
    assert names == {"nightly", "rerun", "audit"}
    for dep in spec["deployments"]:
        assert dep["work_pool"]["name"] in pools
        module, func = dep["entrypoint"].split(":")
        assert (REPO / module).is_file()
        assert f"def {func}(" in (REPO / module).read_text()
    nightly = next(d for d in spec["deployments"] if d["name"] == "nightly")
    assert nightly["schedules"][0]["cron"]


def test_images_agree_between_ray_cluster_and_work_pool():
    cluster = yaml.safe_load((INFRA / "kuberay/raycluster.yaml").read_text())
    images = {cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]}
    for group in cluster["spec"]["workerGroupSpecs"]:
        images |= {c["image"] for c in group["template"]["spec"]["containers"]}
    template = json.loads((INFRA / "prefect/k8s-job-template.json").read_text())
    assert images == {template["variables"]["properties"]["image"]["default"]}
    import ray

    assert cluster["spec"]["rayVersion"] == ray.__version__


def test_dockerfile_installs_with_the_pinned_constraints():
    text = (INFRA / "Dockerfile").read_text()
    assert "constraints.txt" in text and "pip install" in text
    for package in ("ruyi_model", "triton_kernels", "tasks", "flows", "data_contracts"):
        assert f"COPY {package} {package}" in text
