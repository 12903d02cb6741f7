"""The CPUs this process may use: its affinity mask, capped by the CPU quota of its cgroup.

A container started with `docker run --cpus 2`, or a Kubernetes pod with a CPU limit of 2, still sees
every CPU of its host in its affinity mask: the limit is a quota of CPU time per period, enforced by
throttling. A stage at `threads: auto` would start one OpenMP thread per host CPU and have them stalled
by the quota (measured: `benchmarks/experiments/thread_contention.py --quota`, benchmarks/RESULTS.md,
"CPU quotas"). So the CPUs a stage counts are the affinity mask's, capped by the quota rounded down (at
least one), as the JVM's and Go's `automaxprocs` container support count them.

Where the quota is read: /proc/self/mountinfo gives the cgroup hierarchies' mount points (cgroup v1's
`cpu` controller, cgroup v2's unified tree); /proc/self/cgroup the process's cgroup in each. Every
level from that cgroup up to the mount point can set a quota (v2: `cpu.max`; v1: `cpu.cfs_quota_us` /
`cpu.cfs_period_us`), and the smallest one binds. Where nothing can be read (not Linux, no cgroup
file system mounted) there is no quota: the affinity mask alone counts. Why: docs/choices.md, "A CPU
quota".
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

#: The process's own /proc directory (tests point it at a fixture tree).
PROC_SELF = Path("/proc/self")


@dataclass(frozen=True)
class CpuQuota:
    """The binding CPU quota: `cpus` CPUs' worth of time per period, set at the cgroup `path`."""

    cpus: float
    path: Path
    version: int  # 1 or 2 (the cgroup hierarchy that sets it)
    usage: Path | None = None  # the CPU time counter of that cgroup (cgroup_cpu_seconds), where known

    @property
    def threads(self) -> int:
        """Threads that fit in the quota without throttling: rounded down, at least one."""
        return max(1, math.floor(self.cpus + 1e-9))


def usable_cpu_set() -> set[int]:
    """The CPUs of this process's affinity mask (every CPU where that is unknown)."""
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return set(range(os.cpu_count() or 1))


def cpu_limit(proc: Path = PROC_SELF) -> tuple[int, CpuQuota | None]:
    """(CPUs this process may use: its affinity mask capped by its cgroup CPU quota; that quota, or None
    where none binds), from one read of the cgroup files."""
    cpus = len(usable_cpu_set())
    quota = cpu_quota(proc)
    return (min(cpus, quota.threads) if quota else cpus), quota


def _unescape(field: str) -> str:
    """A mountinfo path field with its octal escapes (`\\040` for a space) decoded."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError):
        return None


def _mounts_and_paths(proc: Path) -> tuple[list[tuple[str, str, str, set[str]]], dict[str, str]] | None:
    """(mount point, cgroup root, fstype, super options) of every cgroup mount, and this process's cgroup
    path per v1 controller ("" for the v2 tree); None where either file cannot be read."""
    mountinfo, membership = _read(proc / "mountinfo"), _read(proc / "cgroup")
    if mountinfo is None or membership is None:
        return None
    paths: dict[str, str] = {}
    for line in membership.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            for controller in parts[1].split(","):
                paths[controller] = parts[2]
    mounts = []
    for line in mountinfo.splitlines():
        fields = line.split()
        if "-" not in fields[6:]:
            continue
        sep = fields.index("-", 6)
        if len(fields) >= sep + 4 and fields[sep + 1] in ("cgroup", "cgroup2"):
            options = set(fields[sep + 3].split(","))
            mounts.append((_unescape(fields[4]), _unescape(fields[3]), fields[sep + 1], options))
    return mounts, paths


def cgroup_dirs(proc: Path = PROC_SELF) -> list[tuple[int, Path, Path, Path | None]]:
    """(version, this process's cgroup directory, the hierarchy's mount point, the directory holding
    its usage counter's hierarchy at the same place) for the cgroup v1 hierarchy with the `cpu`
    controller and for the cgroup v2 tree, where mounted and readable. The usage directory is the
    cgroup's own in v2 and where v1 mounts `cpuacct` with `cpu`; the `cpuacct` hierarchy's mount point
    where it is mounted apart and the process sits at the same path in both; otherwise None."""
    read = _mounts_and_paths(proc)
    if read is None:
        return []
    mounts, paths = read
    acct = [Path(m) for m, r, kind, opts in mounts if kind == "cgroup" and {"cpuacct"} <= opts and r == "/"]
    acct_mount = acct[0] if acct else None
    found: list[tuple[int, Path, Path, Path | None]] = []
    for mount, root, fstype, options in mounts:
        if fstype == "cgroup2" and "" in paths:
            found.append((2, _inside(mount, root, paths[""]), Path(mount), Path(mount)))
        elif fstype == "cgroup" and "cpu" in options and "cpu" in paths:
            if "cpuacct" in options:
                usage: Path | None = Path(mount)
            elif acct_mount is not None and root == "/" and paths.get("cpuacct") == paths["cpu"]:
                usage = acct_mount
            else:
                usage = None
            found.append((1, _inside(mount, root, paths["cpu"]), Path(mount), usage))
    return found


def _inside(mount: str, root: str, path: str) -> Path:
    """The directory of cgroup `path` in a hierarchy mounted at `mount` from its cgroup `root`; the mount
    point itself where `path` is not below `root` (a container that sees its own cgroup as the root)."""
    root = root.rstrip("/")
    if path == root or path.startswith(root + "/"):
        return Path(mount, path[len(root) :].lstrip("/"))
    return Path(mount)


def _level_quota(directory: Path, version: int) -> float | None:
    """The quota set at one cgroup directory, in CPUs, or None (unlimited or unreadable)."""
    if version == 2:
        text = _read(directory / "cpu.max")
        parts = text.split() if text else []
        if len(parts) != 2 or parts[0] == "max":
            return None
        quota, period = parts
    else:
        quota, period = _read(directory / "cpu.cfs_quota_us"), _read(directory / "cpu.cfs_period_us")
        if quota is None or period is None:
            return None
    try:
        q, p = int(quota), int(period)
    except ValueError:
        return None
    return q / p if q > 0 and p > 0 else None


def cpu_quota(proc: Path = PROC_SELF) -> CpuQuota | None:
    """The smallest CPU quota over this process's cgroup and its ancestors up to each hierarchy's mount
    point, or None where none is set or none can be read."""
    best: CpuQuota | None = None
    for version, directory, mount, usage_root in cgroup_dirs(proc):
        level = directory
        while True:
            cpus = _level_quota(level, version)
            if cpus is not None and (best is None or cpus < best.cpus):
                usage = None
                if usage_root is not None:
                    counter = "cpu.stat" if version == 2 else "cpuacct.usage"
                    usage = usage_root / level.relative_to(mount) / counter
                best = CpuQuota(cpus, level, version, usage)
            if level == mount or mount not in level.parents:
                break
            level = level.parent
    return best


def cgroup_cpu_seconds(quota: CpuQuota) -> float | None:
    """CPU time used so far by every process of the cgroup that sets `quota` (v2: `cpu.stat`'s
    usage_usec; v1: `cpuacct.usage`), or None where that counter cannot be read."""
    text = _read(quota.usage) if quota.usage is not None else None
    if text is None:
        return None
    if quota.version == 2:
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "usage_usec" and value.strip().isdigit():
                return int(value) / 1e6
        return None
    return int(text.strip()) / 1e9 if text.strip().isdigit() else None


#: The CPU kernels every numeric library of the stages dispatches to, pinned to x86-64-v3 (AVX2 + FMA)
#: where the CPU has it, so that a recording made on a CPU with AVX-512 reproduces bit for bit on one
#: without, and the other way round (docs/choices.md, "Bits across machines"): torch's own kernels
#: (reductions, softmax, the optimizers), MKL's code path (its conditional numerical reproducibility
#: mode, which also fixes its blocking across CPU models), numpy's OpenBLAS kernels and numpy's own SIMD
#: loops. A variable already set is left as it is (ATEN_CPU_CAPABILITY=avx512 buys speed back).
KERNEL_PINS = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_CBWR": "AVX2",
    "OPENBLAS_CORETYPE": "Haswell",
    "NPY_DISABLE_CPU_FEATURES": "X86_V4,AVX512_ICL,AVX512_SPR",
}
CPUINFO = Path("/proc/cpuinfo")


def cpuinfo_field(text: str, field: str) -> str | None:
    """The first CPU's `field` (e.g. "flags", "model name") in /proc/cpuinfo's text, or None."""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == field:
            return value.strip()
    return None


def cpu_flags(cpuinfo: Path = CPUINFO) -> set[str] | None:
    """The first CPU's feature flags from /proc/cpuinfo, or None where it cannot be read."""
    flags = cpuinfo_field(_read(cpuinfo) or "", "flags")
    return None if flags is None else set(flags.split())


def pin_cpu_kernels(environ: dict | None = None, cpuinfo: Path = CPUINFO) -> dict[str, str]:
    """Sets each of KERNEL_PINS that `environ` (default: os.environ) lacks, where the CPU has AVX2 and
    FMA; returns what it set. Must run before torch and numpy are imported: they read these once."""
    env = os.environ if environ is None else environ
    flags = cpu_flags(cpuinfo)
    if flags is None or not {"avx2", "fma"} <= flags:
        return {}
    set_now = {k: v for k, v in KERNEL_PINS.items() if k not in env}
    env.update(set_now)
    return set_now
