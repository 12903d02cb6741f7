"""Child processes in a session of their own, stopped together with their whole process group, and
SIGTERM handled as Ctrl-C: one home for how `ruyi run`, `ruyi audit` and `ruyi server` stop."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path


def env_tool(name: str) -> str:
    """A command of this environment (dvc): the one beside the interpreter, else PATH's."""
    local = Path(sys.executable).with_name(name)
    return str(local) if local.exists() else name


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


def interrupt(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """Stops a child started with `start_new_session=True` (a `dvc repro` and its stage): SIGINT to its
    process group, as Ctrl-C would (the stage stops, DVC records nothing for it and releases its locks);
    SIGTERM after `grace_s` seconds (a process started with SIGINT ignored, as under `nohup ... &`, never
    sees the first); SIGKILL after as long again. A lock left by a killed DVC names a dead process, which
    the next DVC releases."""
    stop_group(proc, (signal.SIGINT, signal.SIGTERM, signal.SIGKILL), grace_s)


@contextmanager
def sigterm_as_interrupt() -> Iterator[list[int]]:
    """While inside, SIGTERM raises KeyboardInterrupt in the main thread as Ctrl-C does, so `finally`
    blocks run and children are stopped (Python's default for SIGTERM is to die on the spot, leaving them
    running). Yields the list of SIGTERMs received: empty when an interruption was a Ctrl-C."""
    received: list[int] = []

    def on_sigterm(signum, frame):
        received.append(signum)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield received
    finally:
        signal.signal(signal.SIGTERM, previous)
