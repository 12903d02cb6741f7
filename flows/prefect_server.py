"""A Prefect API server on 127.0.0.1 owned by one `ruyi` command (`ruyi server`, and `ruyi run` when no
PREFECT_API_URL is set): started in its own session, stopped by the command that started it.

Why not Prefect's embedded ("temporary") server for `ruyi run`: Prefect starts it in the caller's
process group, so a Ctrl-C in the terminal or a SIGTERM to the run's group (`timeout`, systemd, a CI
cancel, a batch scheduler) killed the API together with the run, and the run then spent minutes
retrying to report its own interruption to a server that was gone (measured: still alive 5 minutes
after the SIGTERM). A server in its own session outlives the signal until the run has recorded the
interruption and stops it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from flows.processes import stop_group

HOST = "127.0.0.1"


class ServerError(RuntimeError):
    """The Prefect server did not come up (it exited, or it was not healthy in time)."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def port_in_use(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex((HOST, port)) == 0


def api_url(port: int) -> str:
    return f"http://{HOST}:{port}/api"


def start(port: int, startup_timeout: float, log_file: Path | None = None) -> subprocess.Popen:
    """`prefect server start` on 127.0.0.1:`port` in a new session; returns once /api/health answers.

    Its output goes to `log_file` (None: inherited, as `ruyi server` shows it). The UI is told the API
    it is served with (PREFECT_UI_API_URL, else it would use the default port 4200).

    Raises:
        ServerError: the server exited, or was not healthy after `startup_timeout` seconds (it is
            stopped first; the message ends with the tail of `log_file`).
    """
    api = api_url(port)
    env = {
        **os.environ,
        "PREFECT_UI_API_URL": api,
        "PREFECT_SERVER_API_HOST": HOST,
        "PREFECT_SERVER_API_PORT": str(port),
    }
    env.pop("PREFECT_API_URL", None)  # the server is not a client of another one
    out = open(log_file, "ab") if log_file is not None else None  # noqa: SIM115 - closed below
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", HOST, "--port", str(port)],
            start_new_session=True,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT if out is not None else None,
        )
    finally:
        if out is not None:
            out.close()
    deadline = time.monotonic() + startup_timeout
    try:
        while True:
            try:
                urllib.request.urlopen(f"{api}/health", timeout=1)
                return proc
            except OSError:
                if proc.poll() is not None:
                    raise ServerError(
                        f"prefect server exited with {proc.returncode}{_tail(log_file)}"
                    ) from None
                if time.monotonic() >= deadline:
                    raise ServerError(
                        f"the Prefect server on port {port} was not healthy after {startup_timeout:.0f} s"
                        f"{_tail(log_file)}"
                    ) from None
                time.sleep(0.5)
    except BaseException:  # not healthy in time, or interrupted while waiting: never leave it behind
        stop(proc)
        raise


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's whole process group (its uvicorn workers too), SIGKILL after 30 s."""
    stop_group(proc, (signal.SIGTERM, signal.SIGKILL), 30.0)


def _tail(log_file: Path | None, lines: int = 15) -> str:
    if log_file is None or not log_file.is_file():
        return ""
    text = log_file.read_text(errors="replace").strip().splitlines()[-lines:]
    return f" (its log, {log_file}:\n" + "\n".join(text) + ")" if text else f" (its log {log_file} is empty)"
