"""What else the machine is doing: the CPU time other work takes now, and the warning `ruyi run` and
`ruyi audit` print when the stages' intra-op threads would compete with it.

Two limits are checked: the CPUs of this process's affinity mask, whose load /proc/stat shows, and,
inside a container with a CPU quota (tasks.core.cpus), the quota, whose use the cgroup's own CPU time
counter shows (/proc/stat counts the host's CPUs there, not the container's share of them).

Why: OpenMP threads spin while they wait for each other, so a 2-thread stage beside other work gets
several times slower per step, not twice (benchmarks/RESULTS.md, "Threads on a busy machine";
`benchmarks/experiments/thread_contention.py`). One thread is immune, and on AVX2 CPUs gives the same bits
in every output (`OMP_NUM_THREADS=1 ruyi audit` of a 2-thread recording); on an AVX-512 Intel CPU it did
not (docs/choices.md, "Bits across machines")."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from tasks.core.cpus import (
    CPUINFO,
    CpuQuota,
    cgroup_cpu_seconds,
    cpu_flags,
    cpu_limit,
    cpuinfo_field,
    usable_cpu_set,
)

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
    threads: int,
    busy: float | None,
    cpus: float,
    setting: str,
    limit: str = "CPUs this process may use",
    avx512: bool | None = None,
) -> str | None:
    """The warning for stages of `threads` intra-op threads on `cpus` CPUs of which other work keeps
    `busy` (`busy`), or None: one thread never warns, nor do threads that fit the CPUs left free with
    half a CPU to spare. `limit` says what the `cpus` are (the affinity mask's, or a CPU quota).
    `avx512` (default: this CPU's flags) says whether one thread's outputs are claimed to be two
    threads' bits: measured so on AVX2 CPUs, not on an AVX-512 one (docs/choices.md, "Bits across
    machines")."""
    if busy is None or threads <= 1 or busy + threads <= cpus + 0.5:
        return None
    if avx512 is None:
        avx512 = "avx512f" in (cpu_flags() or set())
    bits = (
        "; on this AVX-512 CPU its outputs can differ from more threads' in the last bits (measured on an "
        "Intel Xeon, where MKL_CBWR=AVX2,STRICT set as well made one and two threads agree)"
        if avx512
        else " and give the same outputs, bit for bit"
    )
    return (
        f"warning: the machine is busy: other work is using {busy:.1f} of the {cpus:g} {limit}, "
        f"and the stages run {threads} intra-op threads ({setting}). Threads spinning against "
        'other work can make every training step several times slower (benchmarks/RESULTS.md, "Threads '
        f'on a busy machine"). With OMP_NUM_THREADS=1 the stages run on one thread{bits}.'
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


# Other work over a whole run. A run is a process tree (ruyi run, its Prefect server, `dvc repro` and the
# stage processes under it); other work is whatever else used the CPUs meanwhile: the CPUs' busy time
# (/proc/stat) less the tree's CPU time. Why: a stage time is an idle machine's only when nothing else ran
# (benchmarks/RESULTS.md, "Threads on a busy machine"); the check at the start sees one moment, and the
# figures in RESULTS were said to be made "alone" on the author's word.
QUIET_AVERAGE = 0.1  # CPUs of other work, on average over the run, below which a run counts as alone
QUIET_PEAK = 0.5  # ... and over any one window


def _tree_times(root: int, ours: set[tuple[int, float]]) -> dict[tuple[int, float], tuple[int, float, float]]:
    """(pid, create_time) -> (ppid, own CPU seconds, children's CPU seconds) of `root`'s process tree now:
    its descendants and every process of `ours` (once in the tree, a process stays counted after its
    parent exits). The children's seconds are what its exited children used, each counted when it waited
    for them (the kernel adds a child's own and children's time to its parent's on `wait`)."""
    import psutil

    table: dict[int, tuple[float, tuple[int, float, float]]] = {}
    for p in psutil.process_iter(["pid", "ppid", "create_time", "cpu_times"]):
        info, times = p.info, p.info.get("cpu_times")
        if times is None or info.get("create_time") is None:
            continue
        own, waited = times.user + times.system, times.children_user + times.children_system
        table[info["pid"]] = (info["create_time"], (info["ppid"], own, waited))
    children: dict[int, list[int]] = {}
    for pid, (_, (ppid, _, _)) in table.items():
        children.setdefault(ppid, []).append(pid)
    found: dict[tuple[int, float], tuple[int, float, float]] = {}
    stack = [root]
    while stack:
        pid = stack.pop()
        if pid not in table:
            continue
        created, entry = table[pid]
        found[(pid, created)] = entry
        stack.extend(children.get(pid, []))
    for pid, (created, entry) in table.items():
        if (pid, created) in ours and (pid, created) not in found:
            found[(pid, created)] = entry
    return found


@dataclass(frozen=True)
class OtherWork:
    """What other work did while a process tree ran: `cpu_seconds` of CPU time outside the tree over
    `seconds` of wall time on `cpus` CPUs (the affinity mask's), at most `peak` CPUs over one window of
    `window_s`, the window that ended `peak_at` seconds into the span; `own_cpu_seconds` the tree's."""

    seconds: float
    cpus: int
    cpu_seconds: float
    own_cpu_seconds: float
    peak: float
    peak_at: float
    window_s: float

    @property
    def average(self) -> float:
        return self.cpu_seconds / self.seconds if self.seconds > 0 else 0.0

    @property
    def alone(self) -> bool:
        return self.average < QUIET_AVERAGE and self.peak < QUIET_PEAK

    def line(self, what: str = "the run") -> str:
        minutes, secs = divmod(round(self.seconds), 60)
        head = (
            f"other work during {what}: {self.average:.2f} of {self.cpus} CPUs on average "
            f"({self.cpu_seconds:.0f} CPU-s in {minutes} min {secs} s; {self.own_cpu_seconds:.0f} CPU-s "
            f"were {what}'s own), at most {self.peak:.2f} over {self.window_s:g} s "
            f"(the window to {int(self.peak_at // 60)} min {round(self.peak_at % 60)} s)"
        )
        if self.alone:
            return head + ": the machine was otherwise idle, so its times are an idle machine's"
        return (
            head + ": the machine was shared, so its stage times are not an idle machine's "
            '(benchmarks/RESULTS.md, "Threads on a busy machine")'
        )


def cpu_name(cpuinfo: Path = CPUINFO) -> str | None:
    """This machine's CPU as /proc/cpuinfo names it, with its widest x86 vector set (e.g. "AMD EPYC
    7B13, AVX2"), or None where it cannot be read. The same pinned kernels can give other bits on
    another CPU model (docs/choices.md, "Bits across machines"), so an audit names the one it ran on."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return None
    name = cpuinfo_field(text, "model name")
    if name is None:
        return None
    flags = set((cpuinfo_field(text, "flags") or "").split())  # the text read above, not the file again
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else None
    return f"{name}, {isa}" if isa else name


def machine_line(cpuinfo: Path = CPUINFO) -> str:
    """One line naming the machine a run's times and bits come from: its CPU (`cpu_name`) and how many
    CPUs this process may use (the affinity mask's, capped by a CPU quota)."""
    count, quota = cpu_limit()
    where = (
        f" (a CPU quota caps the {len(usable_cpu_set())} of the affinity mask)" if quota is not None else ""
    )
    return f"machine: {cpu_name(cpuinfo) or 'a CPU /proc/cpuinfo does not name'}; {count} CPUs usable{where}"


class OtherWorkWatch:
    """Samples, every `interval_s` in a background thread, the CPUs' busy time and the CPU time of
    `root`'s process tree (default: this process), for `OtherWork` at the end (`result`). `on_window`
    is called with the other work's average (CPUs) over each completed window of `window_s` (e.g. to
    warn once that threads now compete with it). Use as a context manager.

    Counted as the tree's: every process seen in it, after its parent exits too, and what exited
    children used once their parent waited for them. Not counted (so it shows as other work): what a
    process of the tree used in its last interval when its time reaches no live process of the tree
    (an orphan reaped by init, a child of a parent that ignores SIGCHLD). Other processes whose CPUs lie
    outside this process's affinity mask are not seen."""

    def __init__(
        self,
        root: int | None = None,
        interval_s: float = 1.0,
        window_s: float = 10.0,
        on_window: Callable[[float], None] | None = None,
        stat: Path = PROC_STAT,
    ) -> None:
        self.root = os.getpid() if root is None else root
        self.interval_s, self.window_s, self.on_window, self.stat = interval_s, window_s, on_window, stat
        self.cpus = usable_cpu_set()
        self._hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self._ours: set[tuple[int, float]] = set()
        self._retry: list[tuple[tuple[int, float], float]] = []  # children not yet found in a parent's time
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._own = self._busy = self._peak = self._peak_at = 0.0
        self._window_other = self._window_start = 0.0
        self._usable = True
        self.error: str | None = None  # why the watch stopped measuring, if it did

    def _sample(self) -> tuple[tuple[int, int] | None, dict, float]:
        return _cpu_times(self.cpus, self.stat), _tree_times(self.root, self._ours), time.monotonic()

    def _advance(self) -> None:
        machine, tree, now = self._sample()
        if machine is None or self._machine is None:
            self._usable = False
            return
        own = 0.0
        for key, (_, mine, waited) in tree.items():
            before = self._tree.get(key)
            # a process new since the last sample: all its time is in this interval
            own += mine + waited - (before[1] + before[2] if before is not None else 0.0)
        own -= self._absorbed(tree)
        self._ours |= set(tree)
        busy_s = (machine[0] - self._machine[0]) / self._hz
        # Totals over the run are exact sums; one interval's share can be off where a process exited
        # in it and its parent has not yet waited for it (counted in the next interval instead).
        self._own += own
        self._busy += busy_s
        self._window_other += max(0.0, busy_s - own)
        if now - self._window_start >= self.window_s:
            average = self._window_other / (now - self._window_start)
            if average > self._peak:
                self._peak, self._peak_at = average, now - self._start
            if self.on_window is not None:
                self.on_window(average)
            self._window_other, self._window_start = 0.0, now
        self._machine, self._tree = machine, tree

    def _absorbed(self, tree: dict) -> float:
        """What the processes that left the tree since the last sample had used up to it (counted then)
        and what a live process of the tree now counts again among its children's time.

        Each process that left is matched, whole or not at all, against the growth of its nearest live
        ancestor's children's time: first those whose own parent is that ancestor (a process is counted
        in its parent's time when the parent waits for it; where the parent is alive and its growth did
        not hold it, once more at the next sample, for a parent read just before it waited), then those
        whose parent left with them (their time reaches the ancestor only if every process between
        waited), fewer hops and smaller first. What no growth holds stays counted: a child reaped by init
        after its parent was killed (`ray.shutdown`'s workers), or one whose parent ignores SIGCHLD
        (raylet), whose time the kernel adds to no one's."""
        live = {key[0]: key for key in tree}
        before = {key[0]: entry for key, entry in self._tree.items()}
        # (ancestor, hops between, CPU seconds counted, retried); last sample's unmatched children first
        gone = [(ancestor, 0, counted, True) for ancestor, counted in self._retry if ancestor in tree]
        for key, (ppid, mine, waited) in self._tree.items():
            if key in tree:
                continue
            parent, hops, seen = ppid, 0, set()
            while parent not in live and parent in before and parent not in seen:
                seen.add(parent)
                parent, hops = before[parent][0], hops + 1
            if parent in live:
                gone.append((live[parent], hops, mine + waited, False))
        room: dict[tuple[int, float], float] = {}
        for ancestor in {g[0] for g in gone}:
            prior = self._tree.get(ancestor)
            room[ancestor] = tree[ancestor][2] - (prior[2] if prior is not None else 0.0)
        absorbed, self._retry = 0.0, []
        for ancestor, hops, counted, retried in sorted(gone, key=lambda g: (not g[3], g[1], g[2])):
            if counted <= room[ancestor] + 0.05:
                absorbed += counted
                room[ancestor] -= counted
            elif hops == 0 and not retried:
                self._retry.append((ancestor, counted))
        return absorbed

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._guarded_advance()

    def _guarded_advance(self) -> None:
        """One sample; an error (a /proc race psutil does not absorb) ends the watch without a figure
        rather than leaving a partial one: the run itself goes on."""
        if not self._usable:
            return
        try:
            self._advance()
        except Exception as e:  # noqa: BLE001 - a measurement aid must never stop the run it watches
            self._usable = False
            self.error = f"{type(e).__name__}: {e}"

    def __enter__(self) -> OtherWorkWatch:
        self._machine, self._tree, self._start = self._sample()
        self._ours |= set(self._tree)
        self._window_start = self._start
        self._thread = threading.Thread(target=self._loop, name="other-work-watch", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._guarded_advance()
        self._end = time.monotonic()
        if self._end - self._window_start >= self.window_s / 2:  # a last window, if it is not a sliver
            last = self._window_other / (self._end - self._window_start)
            if last > self._peak:
                self._peak, self._peak_at = last, self._end - self._start

    def summary(self, what: str = "the run") -> str:
        """`result().line(what)`, or why there is no figure."""
        other = self.result()
        if other is not None:
            return other.line(what)
        return f"other work during {what}: not measured ({self.error or 'no /proc/stat on this system'})"

    def result(self) -> OtherWork | None:
        """What other work did over the watched span (after the `with` block), or None where the CPUs'
        busy time could not be read (no /proc/stat) or a sample failed (`error`)."""
        if not self._usable or self._machine is None:
            return None
        return OtherWork(
            seconds=self._end - self._start,
            cpus=len(self.cpus),
            cpu_seconds=max(0.0, self._busy - self._own),
            own_cpu_seconds=max(0.0, self._own),
            peak=self._peak,
            peak_at=self._peak_at,
            window_s=self.window_s,
        )


def watch_run(setting: int | str, where: str, echo: Callable[[str], None]) -> OtherWorkWatch:
    """The watch `ruyi run` and `ruyi audit` keep over their whole run (this process's tree): at the
    end, `result().line()` says what other work did; meanwhile, the first window in which other work
    leaves too few of the affinity mask's CPUs for the stages' threads (`threads: setting` of `where`;
    the rule of `oversubscription_warning`) is said once through `echo`."""
    from tasks.core.params import Params
    from tasks.core.stage import resolve_threads

    try:
        Params._check_threads(setting)
        threads, _ = resolve_threads(setting, cpu_limit())
    except ValueError:
        threads = 1  # the stages will refuse the setting themselves
    cpus = len(usable_cpu_set())
    said: list[str] = []

    def on_window(other: float) -> None:
        warning = oversubscription_warning(threads, other, cpus, f"`threads: {setting}` in {where}")
        if warning is not None and not said:
            said.append(warning)
            echo(warning.replace("warning: the machine is busy:", "warning: the machine became busy:", 1))

    return OtherWorkWatch(on_window=on_window)
