"""What else the machine is doing: the CPU time other work takes now, and the warning `ruyi run` and
`ruyi audit` print when the stages' intra-op threads would compete with it.

Two limits are checked: the CPUs of this process's affinity mask, whose load /proc/stat shows, and,
inside a container with a CPU quota (tasks.core.cpus), the quota, whose use the cgroup's own CPU time
counter shows (/proc/stat counts the host's CPUs there, not the container's share of them).

Why: OpenMP threads spin while they wait for each other, so a 2-thread stage beside other work gets
several times slower per step, not twice (benchmarks/RESULTS.md, "Threads on a busy machine";
`benchmarks/experiments/thread_contention.py`). One thread is immune, and gives the same bits in every
output (`OMP_NUM_THREADS=1 ruyi audit` of a 2-thread recording).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path

from tasks.core.cpus import CpuQuota, cgroup_cpu_seconds, cpu_limit, usable_cpu_set

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


def busy(
    cpus: Iterable[int] | None, quota: CpuQuota | None, sample_s: float = 0.5, stat: Path = PROC_STAT
) -> tuple[float | None, float | None]:
    """(CPUs' worth of work on `cpus`, per /proc/stat; CPUs' worth of work in the cgroup that sets
    `quota`, per its CPU time counter) over one window of `sample_s` seconds, this process sleeping
    meanwhile; either is None where it cannot be measured (no /proc/stat, no quota or no counter).
    `cpus` None: those this process may use."""
    wanted = set(cpus) if cpus is not None else usable_cpu_set()
    first = _cpu_times(wanted, stat)
    cg_first = cgroup_cpu_seconds(quota) if quota is not None else None
    start = time.monotonic()
    time.sleep(sample_s)
    second = _cpu_times(wanted, stat)
    cg_second = cgroup_cpu_seconds(quota) if quota is not None and cg_first is not None else None
    elapsed = time.monotonic() - start
    host = None
    if first is not None and second is not None and second[1] > first[1]:
        host = max(0.0, (second[0] - first[0]) / (second[1] - first[1]) * len(wanted))
    in_cgroup = None
    if cg_first is not None and cg_second is not None and elapsed > 0:
        in_cgroup = max(0.0, (cg_second - cg_first) / elapsed)
    return host, in_cgroup


def oversubscription_warning(
    threads: int, busy: float | None, cpus: float, setting: str, limit: str = "CPUs this process may use"
) -> str | None:
    """The warning for stages of `threads` intra-op threads on `cpus` CPUs of which other work keeps
    `busy` (`busy`), or None: one thread never warns, nor do threads that fit the CPUs left free with
    half a CPU to spare. `limit` says what the `cpus` are (the affinity mask's, or a CPU quota)."""
    if busy is None or threads <= 1 or busy + threads <= cpus + 0.5:
        return None
    return (
        f"warning: the machine is busy: other work is using {busy:.1f} of the {cpus:g} {limit}, "
        f"and the stages run {threads} intra-op threads ({setting}). Threads spinning against "
        'other work can make every training step several times slower (benchmarks/RESULTS.md, "Threads '
        'on a busy machine"). With OMP_NUM_THREADS=1 the stages run on one thread and give the same '
        "outputs, bit for bit."
    )


def check_threads(setting: int | str, where: str) -> str | None:
    """The oversubscription warning for the `threads` setting of `where` (a params file) on this
    machine now, or None (also for a setting that is not `auto` or a positive integer: the stages will
    refuse it themselves); samples the machine for half a second. Both limits are checked: the
    affinity mask's CPUs against their load, and a cgroup CPU quota against its cgroup's use."""
    from tasks.core.params import Params
    from tasks.core.stage import resolve_threads

    try:
        Params._check_threads(setting)  # the schema's one rule for `threads`
    except ValueError:
        return None
    limit = cpu_limit()
    threads, _ = resolve_threads(setting, limit)
    if threads <= 1:
        return None
    cpus, quota = usable_cpu_set(), limit[1]
    on_host, in_cgroup = busy(cpus, quota)
    said = f"`threads: {setting}` in {where}"
    warning = oversubscription_warning(threads, on_host, len(cpus), said)
    if warning is None and quota is not None:
        warning = oversubscription_warning(
            threads, in_cgroup, quota.cpus, said, f"CPUs of this process's CPU quota (set at {quota.path})"
        )
    return warning
