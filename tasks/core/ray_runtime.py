"""Starting and stopping Ray, one way for the whole project (Ray Train DDP and Ray Serve use it).

    with ray_runtime(num_cpus=2, object_store_mib=256):     # or address="host:port" for a cluster
        ...                                                  # ray.init() has run
    # ray.shutdown(); every process of the local Ray started here is gone, its temp directory removed

or, for a lifetime that is not one block (a serving session), `rt = RayRuntime(...).start()` ...
`rt.stop()`. Ray already running in this process is used as is and left running.

What it takes care of:
- `RAY_AUTH_MODE=disabled` and usage stats off (unless set); a local Ray gets `RAY_TMPDIR` under a short
  new temporary directory (unix socket paths are limited to 107 bytes) unless RAY_TMPDIR is set; the
  directory and the variable are removed by `stop()`.
- Signals: `ray.init` replaces the SIGTERM handler with one that raises SystemExit. A handler the
  caller had installed is put back (its own stop logic runs); with none (the default, which would kill
  the process without any cleanup) Ray's stays, so `finally` blocks and `stop()` run. `stop()` defers
  SIGTERM/SIGINT while it shuts down, then restores the handler of before `start()`.
- Stop: `ray.shutdown()`, then every process the local Ray started (gcs, raylet, the workers and
  replicas under it, found as this process's new children at start and their descendants at stop)
  gets `STOP_GRACE_S` to exit and is then SIGKILLed: nothing outlives the command.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator

log = logging.getLogger("ruyi")

#: Seconds Ray's processes get to exit after `ray.shutdown()` before they are killed.
STOP_GRACE_S = 5.0


def short_tmpdir() -> str:
    """A new temporary directory with a short path (for Ray's unix sockets)."""
    base = tempfile.gettempdir()
    return tempfile.mkdtemp(prefix="ruyi-ray-", dir=base if len(base) <= 20 else "/tmp")


def _children() -> list:
    import psutil

    with contextlib.suppress(psutil.Error):
        return psutil.Process().children()
    return []


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """SIGTERM and SIGINT are noted, not acted on, inside the block (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = {
        sig: signal.signal(sig, lambda signum, frame: received.append(signum))
        for sig in (signal.SIGTERM, signal.SIGINT)
    }
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if received:
            log.info("stopping Ray: %s received meanwhile", signal.Signals(received[0]).name)


class RayRuntime:
    """A Ray instance for this process: started (or joined) by `start()`, ended by `stop()`.

    Args:
        num_cpus: logical CPUs of a local Ray (ignored with `address`).
        object_store_mib: object store of a local Ray.
        address: a Ray cluster to connect to ("auto", "host:port", "ray://host:port"); None: a local Ray.
        log_to_driver: forward the workers' output to this process.
    """

    def __init__(
        self,
        *,
        num_cpus: int | None = None,
        object_store_mib: int = 256,
        address: str | None = None,
        log_to_driver: bool = True,
    ):
        self.num_cpus = num_cpus
        self.object_store_mib = object_store_mib
        self.address = address
        self.log_to_driver = log_to_driver
        self.owns_ray = False
        self.tmpdir: str | None = None
        self._started: list = []  # psutil.Process of what ray.init started here
        self._sigterm_before = None
        self._running = False

    def start(self) -> RayRuntime:
        """Connects to / starts Ray (nothing if this process already has it). Exceptions of `ray.init`
        pass."""
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        import ray

        self._running = True
        if ray.is_initialized():
            return self
        if self.address is None and not os.environ.get("RAY_TMPDIR"):
            self.tmpdir = os.environ["RAY_TMPDIR"] = short_tmpdir()
        main = threading.current_thread() is threading.main_thread()
        self._sigterm_before = signal.getsignal(signal.SIGTERM) if main else None
        before = {p.pid for p in _children()}
        try:
            if self.address is None:
                ray.init(
                    num_cpus=self.num_cpus,
                    include_dashboard=False,
                    log_to_driver=self.log_to_driver,
                    object_store_memory=self.object_store_mib << 20,
                    configure_logging=False,
                )
            else:
                ray.init(address=self.address, log_to_driver=self.log_to_driver, configure_logging=False)
        except BaseException:  # e.g. an unreachable address: nothing half-started is left behind
            self._started = [p for p in _children() if p.pid not in before]
            processes = self._snapshot()
            with contextlib.suppress(Exception):
                ray.shutdown()
            self._reap(processes)
            self._remove_tmpdir()
            self._restore_sigterm()
            self._running = False
            raise
        self.owns_ray = True
        self._started = [p for p in _children() if p.pid not in before]
        if main and callable(self._sigterm_before):
            signal.signal(signal.SIGTERM, self._sigterm_before)  # the caller's own stop logic
        return self

    def stop(self) -> None:
        """Shuts down the Ray started by `start()` and everything it started; idempotent."""
        if not self._running:
            return
        self._running = False
        if self.owns_ray:
            import ray

            with _signals_deferred():
                processes = self._snapshot()
                try:
                    ray.shutdown()
                finally:
                    self._reap(processes)
            self.owns_ray = False
        self._remove_tmpdir()
        self._restore_sigterm()

    def __enter__(self) -> RayRuntime:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # internals -------------------------------------------------------------------------------
    def _snapshot(self) -> list:
        """The processes Ray started here and all their descendants, now."""
        import psutil

        found = {}
        for p in self._started:
            with contextlib.suppress(psutil.Error):
                if p.is_running():
                    found[p.pid] = p
                    for child in p.children(recursive=True):
                        found[child.pid] = child
        return list(found.values())

    @staticmethod
    def _reap(processes: list) -> None:
        import psutil

        if not processes:
            return
        _, alive = psutil.wait_procs(processes, timeout=STOP_GRACE_S)
        if alive:
            log.warning(
                "Ray: %d process(es) still running %.0f s after shutdown; killing them: %s",
                len(alive),
                STOP_GRACE_S,
                ", ".join(f"{p.pid}" for p in alive),
            )
            for p in alive:
                with contextlib.suppress(psutil.Error):
                    p.kill()
            psutil.wait_procs(alive, timeout=STOP_GRACE_S)

    def _remove_tmpdir(self) -> None:
        if self.tmpdir:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
            # Set for this runtime only: a later one in the same process must get a fresh directory.
            if os.environ.get("RAY_TMPDIR") == self.tmpdir:
                del os.environ["RAY_TMPDIR"]
            self.tmpdir = None

    def _restore_sigterm(self) -> None:
        if self._sigterm_before is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._sigterm_before)
        self._sigterm_before = None


@contextlib.contextmanager
def ray_runtime(**kwargs) -> Iterator[RayRuntime]:
    """`RayRuntime(**kwargs)` started for the block and stopped after it (see the module docstring)."""
    runtime = RayRuntime(**kwargs).start()
    try:
        yield runtime
    finally:
        runtime.stop()
