"""Stopping a child process together with its whole process group (it was started in its own session)."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Sequence


def stop_group(proc: subprocess.Popen, signals: Sequence[signal.Signals], grace_s: float) -> None:
    """Sends each of `signals` in turn to `proc`'s process group, waiting up to `grace_s` seconds for
    `proc` to exit after each; returns as soon as it has (or its group is gone)."""
    for sig in signals:
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=grace_s)
            return
        except subprocess.TimeoutExpired:
            continue
    proc.wait(timeout=grace_s)
