"""Busy CPUs for tests: processes that spin one CPU each until stopped."""

from __future__ import annotations

import subprocess
import sys

SPIN = "import os, sys\nif len(sys.argv) > 1: os.sched_setaffinity(0, {int(sys.argv[1])})\nwhile True: pass"


def spinners(cpus: list[int]) -> list[subprocess.Popen]:
    """One process spinning on each CPU of `cpus` (pinned to it)."""
    return [subprocess.Popen([sys.executable, "-c", SPIN, str(cpu)]) for cpu in cpus]


def stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.kill()
        p.wait()
