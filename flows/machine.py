"""What else the machine is doing: the CPU time other work takes now, and the warning `ruyi run` and
`ruyi audit` print when the stages' intra-op threads would compete with it.

Why: OpenMP threads spin while they wait for each other, so a 2-thread stage beside other work gets
several times slower per step, not twice (benchmarks/RESULTS.md, "Threads on a busy machine";
`benchmarks/experiments/thread_contention.py`). One thread is immune, and gives the same bits in every
output (`OMP_NUM_THREADS=1 ruyi audit` of a 2-thread recording).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from pathlib import Path

PROC_STAT = Path("/proc/stat")


def _cpu_times(cpus: set[int], stat: Path) -> tuple[int, int] | None:
    """(busy, total) jiffies summed over `cpus` from a /proc/stat, or None without one."""
    try:
        lines = stat.read_text().splitlines()
    except OSError:
        return None
    busy = total = 0
    seen = 0
    for line in lines:
        name, _, rest = line.partition(" ")
        if not (name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus):
            continue
        # user nice system idle iowait irq softirq steal (guest time is already counted in user)
        fields = [int(x) for x in rest.split()[:8]]
        total += sum(fields)
        busy += sum(fields) - fields[3] - fields[4]
        seen += 1
    return (busy, total) if seen else None


def busy_cpus(
    cpus: Iterable[int] | None = None, sample_s: float = 0.5, stat: Path = PROC_STAT
) -> float | None:
    """How many CPUs' worth of work ran on `cpus` (default: those this process may use) during the next
    `sample_s` seconds, this process sleeping meanwhile; None where there is no /proc/stat (not Linux)."""
    wanted = set(cpus) if cpus is not None else _usable_cpus()
    first = _cpu_times(wanted, stat)
    if first is None:
        return None
    time.sleep(sample_s)
    second = _cpu_times(wanted, stat)
    if second is None or second[1] <= first[1]:
        return None
    share = (second[0] - first[0]) / (second[1] - first[1])
    return max(0.0, share * len(wanted))


def _usable_cpus() -> set[int]:
    if hasattr(os, "sched_getaffinity"):
        return set(os.sched_getaffinity(0))
    return set(range(os.cpu_count() or 1))


def oversubscription_warning(threads: int, busy: float | None, cpus: int, setting: str) -> str | None:
    """The warning for stages of `threads` intra-op threads on `cpus` CPUs of which other work keeps
    `busy` (busy_cpus), or None: one thread never warns, nor do threads that fit the CPUs left free with
    half a CPU to spare."""
    if busy is None or threads <= 1 or busy + threads <= cpus + 0.5:
        return None
    return (
        f"warning: the machine is busy: other work is using {busy:.1f} of the {cpus} CPUs this process "
        f"may use, and the stages run {threads} intra-op threads ({setting}). Threads spinning against "
        'other work can make every training step several times slower (benchmarks/RESULTS.md, "Threads '
        'on a busy machine"). With OMP_NUM_THREADS=1 the stages run on one thread and give the same '
        "outputs, bit for bit."
    )


def check_threads(setting: int | str, where: str) -> str | None:
    """The oversubscription warning for the `threads` setting of `where` (a params file) on this
    machine now, or None (also for a setting that is not `auto` or a positive integer: the stages will
    refuse it themselves); samples the machine for half a second."""
    from tasks.core.params import Params
    from tasks.core.stage import resolve_threads

    try:
        Params._check_threads(setting)  # the schema's one rule for `threads`
    except ValueError:
        return None
    threads, _ = resolve_threads(setting)
    if threads <= 1:
        return None
    cpus = _usable_cpus()
    return oversubscription_warning(threads, busy_cpus(cpus), len(cpus), f"`threads: {setting}` in {where}")
