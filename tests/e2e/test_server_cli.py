"""`ruyi server` (`make server`): a real Prefect server on 127.0.0.1 serving the two deployments (slow).

Started as a user would, as a subprocess; checked through the server's REST API (the nightly cron
schedule, the rerun deployment's parameters), a second server on the same port is refused, and SIGTERM
stops everything (the Prefect server's processes included).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from local_http import free_port

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
# `ruyi` is the console script of flows.cli:main (pyproject); run as a module so that the checkout under
# test is what runs, whatever an installed `ruyi` script points at.
RUYI = [sys.executable, "-m", "flows.cli"]


def _get(url: str):
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def _processes_naming(port: int) -> list[str]:
    out = subprocess.run(["pgrep", "-af", f"--port {port}"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if "pgrep" not in line]


def test_ruyi_server_serves_both_deployments_and_stops_cleanly(tmp_path):
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = dict(
        os.environ,
        PREFECT_HOME=str(tmp_path / "prefect-home"),
        PREFECT_LOGGING_LEVEL="WARNING",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    )
    env.pop("PREFECT_API_URL", None)
    env.pop("PREFECT_UI_API_URL", None)
    assert port != 4200
    proc = subprocess.Popen(
        [*RUYI, "server", "--port", str(port), "--cron", "0 3 * * *"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        nightly = rerun = audit = None
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and None in (nightly, rerun, audit):
            assert proc.poll() is None, proc.stdout.read()
            try:  # registered one after the other: all three, as the banner says
                nightly = _get(f"{api}/deployments/name/ruyi-pipeline/nightly")
                rerun = _get(f"{api}/deployments/name/ruyi-pipeline/rerun")
                audit = _get(f"{api}/deployments/name/ruyi-audit/audit")
            except (OSError, urllib.error.HTTPError):
                time.sleep(1)
        assert nightly and rerun and audit, "the deployments never registered"
        assert [s["schedule"]["cron"] for s in nightly["schedules"]] == ["0 3 * * *"]
        assert rerun["schedules"] == []
        assert {"from_stage", "to_stage", "overrides", "push"} <= set(rerun["parameters"])
        assert rerun["parameters"]["workspace"] == str(tmp_path.resolve())
        assert [s["schedule"]["cron"] for s in audit["schedules"]] == ["0 4 * * 0"]
        # The UI talks to the API it is served with (it used the default port 4200: "Can't connect to
        # Server API").
        ui = _get(f"http://127.0.0.1:{port}/ui-settings")
        assert ui["api_url"] == api, ui

        second = subprocess.run(
            [*RUYI, "server", "--port", str(port)], env=env, capture_output=True, text=True, timeout=60
        )
        assert second.returncode == 2 and f"port {port} on 127.0.0.1 is already in use" in second.stderr
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    deadline = time.monotonic() + 30
    while _processes_naming(port) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _processes_naming(port) == []  # the Prefect server went down with it
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0
