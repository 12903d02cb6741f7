"""The DVC remote on S3, against a real SeaweedFS server: push from one workspace, pull in a clone.

Also the flow's push step: `ruyi_pipeline(push=True)` pushes to whatever default remote the
workspace has configured, S3 included; a wrong key is a clear error from the push, not a silent skip.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from s3server import s3_server  # noqa: F401  (module-scoped real S3 server fixture)

DVC = str(Path(sys.executable).parent / "dvc")


def sh(cmd: list[str], cwd: Path, env: dict, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd}: {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture()
def s3_workspace(tmp_path, s3_server):  # noqa: F811
    env = dict(os.environ, **s3_server.env())
    import uuid

    bucket = s3_server.create_bucket(f"dvc-remote-{uuid.uuid4().hex[:8]}")
    ws = tmp_path / "ws"
    ws.mkdir()
    sh(["git", "init", "-q"], ws, env)
    sh([DVC, "init", "-q"], ws, env)
    (ws / "stage.py").write_text(
        "import pathlib; pathlib.Path('out').mkdir(exist_ok=True); "
        "pathlib.Path('out/model.bin').write_bytes(bytes(range(256)) * 4096)\n"
    )
    sh([DVC, "stage", "add", "-q", "-n", "make", "-d", "stage.py", "-o", "out", "python stage.py"], ws, env)
    sh([DVC, "remote", "add", "-d", "s3", f"s3://{bucket}/dvc"], ws, env)
    sh([DVC, "remote", "modify", "s3", "endpointurl", s3_server.endpoint], ws, env)
    sh(["git", "add", "-A"], ws, env)
    sh(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "init"], ws, env)
    return ws, env, bucket


def test_push_to_s3_and_pull_into_a_clean_clone(s3_workspace, s3_server, tmp_path):  # noqa: F811
    ws, env, bucket = s3_workspace
    sh([DVC, "repro", "-q"], ws, env)
    sh([DVC, "push"], ws, env)
    objects = s3_server.client().list_objects_v2(Bucket=bucket, Prefix="dvc/").get("Contents", [])
    assert objects, "nothing was pushed to the S3 remote"
    sh(["git", "add", "-A"], ws, env)
    sh(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "lock"], ws, env)
    clone = tmp_path / "clone"
    sh(["git", "clone", "-q", str(ws), str(clone)], tmp_path, env)
    sh([DVC, "pull"], clone, env)
    assert (clone / "out/model.bin").read_bytes() == (ws / "out/model.bin").read_bytes()
    assert "up to date" in sh([DVC, "status"], clone, env).stdout


def test_wrong_credentials_fail_the_push_clearly(s3_workspace):
    ws, env, _ = s3_workspace
    sh([DVC, "repro", "-q"], ws, env)
    bad = dict(env, AWS_SECRET_ACCESS_KEY="not-the-secret")
    proc = sh([DVC, "push"], ws, bad, check=False)
    assert proc.returncode != 0
    assert (
        "SignatureDoesNotMatch" in proc.stderr
        or "Forbidden" in proc.stderr
        or "Access Denied" in proc.stderr
        or "403" in proc.stderr
    ), proc.stderr


def test_flow_pushes_to_the_s3_remote(s3_workspace, s3_server):  # noqa: F811
    from prefect.testing.utilities import prefect_test_harness

    from flows.pipeline import ruyi_pipeline

    ws, env, bucket = s3_workspace
    (ws / "params.yaml").write_text((Path(__file__).resolve().parents[2] / "params.yaml").read_text())
    old = {k: os.environ.get(k) for k in s3_server.env()}
    os.environ.update(s3_server.env())
    try:
        with prefect_test_harness(server_startup_timeout=90):
            results = ruyi_pipeline(workspace=str(ws), push=True)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    assert [r["stage"] for r in results] == ["make"]
    assert s3_server.client().list_objects_v2(Bucket=bucket, Prefix="dvc/").get("KeyCount", 0) > 0
