"""Interrupting a `ruyi` command as a terminal, a CI runner or `timeout` would: shared by the tests of
`ruyi run` and `ruyi audit` stopping on Ctrl-C / SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def cli_env(**extra: str) -> dict[str, str]:
    """The environment of a `python -m flows.cli` child: this one, the repository importable, `extra` set."""
    pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return dict(os.environ, PYTHONPATH=pythonpath, **extra)


def interrupt_cli(
    args: list[str],
    cwd: Path,
    env: dict[str, str],
    err_path: Path,
    ready: Callable[[], bool],
    sig: signal.Signals,
    to_group: bool = True,
    ready_timeout_s: float = 180.0,
) -> tuple[int, float]:
    """Starts `python -m flows.cli *args` as a terminal's foreground job (its own process group, SIGINT
    at its default even where this worker ignores it), waits until `ready()`, sends `sig` to its group
    (`to_group`) or to the process alone, and waits for it. Returns (exit code, seconds to exit)."""
    with open(err_path, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "flows.cli", *args],
            cwd=cwd,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=err,
            start_new_session=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
    try:
        deadline = time.monotonic() + ready_timeout_s
        while not ready():
            assert proc.poll() is None and time.monotonic() < deadline, err_path.read_text()[-3000:]
            time.sleep(0.2)
        start = time.monotonic()
        if to_group:
            os.killpg(proc.pid, sig)
        else:
            os.kill(proc.pid, sig)
        proc.wait(timeout=120)
        return proc.returncode, time.monotonic() - start
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def running(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie waiting for its parent's wait()."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
