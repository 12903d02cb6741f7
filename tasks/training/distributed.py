"""Data-parallel training of the `cpt`, `family_sft`, `expand` and `sft` stages on Ray Train workers (DDP).

Not a stage: selected by `distributed.backend: ray` in the params file (`num_workers`, `use_gpu`,
`cpus_per_worker`, `address`, `object_store_mib`, `storage_path`, `timeout_s`; tasks/core/params.py).
`launch(stage, params)` runs the stage's own `run(params)` in every worker; rank 0 writes the outputs.
`launch_function` runs another function on the workers (the megatron backend's ranks,
tasks/training/megatron_backend.py).
The result equals the one-process run up to fp32 summation order. Design, errors and cluster
requirements: docs/choices.md#distributed and infra/README.md.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.core.paths import Workspace
from tasks.core.ray_runtime import RayRuntime
from tasks.core.stage import StageError, TransientError

log = logging.getLogger("ruyi")

#: Seconds the TCP probe of `distributed.address` waits before calling the cluster unreachable.
PROBE_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Context:
    """This process's place in a data-parallel group (set on Ray Train workers)."""

    rank: int
    world_size: int
    device: str  # "cpu" or "cuda:<i>"


_CONTEXT: Context | None = None


def context() -> Context | None:
    """The data-parallel context of this process, or None in a local (one-process) run."""
    return _CONTEXT


def in_worker() -> bool:
    return _CONTEXT is not None


def is_main() -> bool:
    """True in a local run and on rank 0: the process that writes checkpoints, artifacts, metrics, plots."""
    return _CONTEXT is None or _CONTEXT.rank == 0


@contextlib.contextmanager
def activated(rank: int, world_size: int, device: str = "cpu") -> Iterator[Context]:
    """Marks this process as rank `rank` of `world_size` (the default torch.distributed process group
    must already be initialised, as Ray Train's TorchConfig does)."""
    global _CONTEXT
    previous = _CONTEXT
    _CONTEXT = Context(rank=rank, world_size=world_size, device=device)
    try:
        yield _CONTEXT
    finally:
        _CONTEXT = previous


# --- collectives used by tasks.training ------------------------------------------------------------
def broadcast_object(obj: Any) -> Any:
    """Rank 0's `obj` on every rank (other ranks pass anything)."""
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0, device=_collective_device())
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order."""
    import torch.distributed as dist

    out: list[Any] = [None] * _CONTEXT.world_size
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(values: Sequence[float]) -> list[float]:
    """Element-wise sum over the ranks (float64)."""
    import torch
    import torch.distributed as dist

    t = torch.tensor(list(values), dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t)
    return t.cpu().tolist()


def _collective_device():
    import torch

    return torch.device(_CONTEXT.device) if _CONTEXT is not None else torch.device("cpu")


def wrap_model(model):
    """`DistributedDataParallel` over the parameters that require grad (see docs/choices.md#distributed)."""
    import torch
    from torch.nn.parallel import DistributedDataParallel

    device = torch.device(_CONTEXT.device)
    kwargs: dict[str, Any] = {"broadcast_buffers": False}
    if device.type == "cuda":
        kwargs.update(device_ids=[device.index], output_device=device.index)
    return DistributedDataParallel(model, **kwargs)


def shard_bounds(rows: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rows [lo, hi) of a global batch of `rows` rows that rank `rank` of `world_size` trains on."""
    return rows * rank // world_size, rows * (rank + 1) // world_size


# --- the driver ----------------------------------------------------------------------------------------
def launch_function(name: str, params, fn: Callable[[dict[str, Any]], Any], config: dict[str, Any]) -> Any:
    """Runs `fn(config)` on `params.distributed.num_workers` Ray Train workers (the process group is Ray
    Train's; `config` gains "use_gpu" and "cwd") with the same cluster handling as `launch`; returns
    rank 0's return value. Used by the megatron backend (tasks/training/megatron_backend.py)."""
    return launch(name, params, (), worker=fn, worker_config=config)


def launch(
    stage: str,
    params,
    callbacks: Sequence[Callable[[int], None]] = (),
    worker: Callable[[dict[str, Any]], Any] | None = None,
    worker_config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Runs `tasks.<stage>.run(params, callbacks)` on `params.distributed.num_workers` Ray Train workers.

    Args:
        stage: "cpt", "expand" or "sft".
        params: validated Params with `distributed.backend == "ray"`.
        callbacks: picklable callables, called on every rank after each step (as in a local run).
        worker, worker_config: another function to run on the workers, with its config (`launch_function`).

    Returns:
        The metrics of rank 0 (what the stage's `run` returns).

    Raises:
        StageError: a worker's own error (re-raised), a bad `distributed.*` setting; TransientError: an
            unreachable cluster, a lost worker.
    """
    cfg = params.distributed
    if cfg.use_gpu and cfg.address is None:
        import torch

        if not torch.cuda.is_available():
            raise StageError(
                "distributed.use_gpu is true but CUDA is not available on this machine (the workers "
                "of the local Ray, distributed.address=null, would have no GPU): set "
                "distributed.use_gpu=false or give distributed.address of a GPU cluster"
            )
        if torch.cuda.device_count() < cfg.num_workers:
            raise StageError(
                f"distributed.num_workers={cfg.num_workers} with distributed.use_gpu=true needs "
                f"{cfg.num_workers} GPUs; this machine has {torch.cuda.device_count()}"
            )
    if cfg.address is not None:
        probe_address(cfg.address)
    runtime = RayRuntime(
        num_cpus=max(1, math.ceil(cfg.num_workers * cfg.cpus_per_worker)),
        object_store_mib=cfg.object_store_mib,
        address=cfg.address,
    )
    try:
        runtime.start()
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise TransientError(f"distributed.address={cfg.address!r}: cannot start or reach Ray: {e}") from None
    if cfg.storage_path is None:
        local_root: Path | None = Workspace.from_params(params).ray_train.resolve()
        storage_path = str(local_root)
    elif "://" in cfg.storage_path:
        local_root, storage_path = None, cfg.storage_path
    else:
        local_root = Path(cfg.storage_path).resolve()
        storage_path = str(local_root)
    run_name = f"{stage}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    try:
        check_resources(cfg)
        return _fit(stage, params, callbacks, storage_path, run_name, worker, worker_config)
    finally:
        if local_root is not None:  # Ray Train's run directory holds nothing we need (no Ray checkpoints)
            shutil.rmtree(local_root / run_name, ignore_errors=True)
            if cfg.storage_path is None:
                with contextlib.suppress(OSError):
                    local_root.rmdir()  # only when empty
        runtime.stop()  # shuts down a Ray started here (and every process of it); keeps one that was running


def probe_address(address: str) -> None:
    """A TCP connect to a `host:port` / `ray://host:port` address ("auto" and the like are left to ray.init).

    Raises:
        TransientError: nothing answers there within PROBE_TIMEOUT_S.
    """
    target = address.split("://", 1)[1] if "://" in address else address
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        return
    try:
        with socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=PROBE_TIMEOUT_S):
            pass
    except OSError as e:
        raise TransientError(
            f"distributed.address={address!r}: the Ray cluster is unreachable "
            f"({e.strerror or e}); check the address or set distributed.address=null "
            f"for a local Ray"
        ) from None


def check_resources(cfg) -> None:
    """The cluster must be able to place every worker (an error for a local Ray, a warning for a cluster,
    which may autoscale)."""
    import ray

    have = ray.cluster_resources()
    need_cpu = cfg.num_workers * cfg.cpus_per_worker
    need_gpu = cfg.num_workers if cfg.use_gpu else 0
    if have.get("CPU", 0) + 1e-9 >= need_cpu and have.get("GPU", 0) + 1e-9 >= need_gpu:
        return
    msg = (
        f"distributed.num_workers={cfg.num_workers} workers need {need_cpu:g} CPUs "
        "(distributed.cpus_per_worker="
        f"{cfg.cpus_per_worker:g})"
        + (f" and {need_gpu} GPUs (distributed.use_gpu=true)" if need_gpu else "")
        + f"; the Ray cluster has {have.get('CPU', 0):g} CPUs and {have.get('GPU', 0):g} GPUs"
    )
    if cfg.address is None:
        raise StageError(msg)
    log.warning("%s: waiting for the cluster to scale up", msg)


def _fit(
    stage: str, params, callbacks, storage_path: str, run_name: str, worker=None, worker_config=None
) -> dict[str, Any]:
    import ray.exceptions
    from ray.train import FailureConfig, RunConfig, ScalingConfig, TrainingFailedError, WorkerGroupError
    from ray.train.torch import TorchConfig, TorchTrainer

    cfg = params.distributed
    if worker is None:
        worker = _worker_main
        worker_config = {
            "stage": stage,
            "params": params.model_dump(mode="json"),
            "callbacks": list(callbacks),
        }
    trainer = TorchTrainer(
        worker,
        train_loop_config={**worker_config, "cwd": os.getcwd(), "use_gpu": cfg.use_gpu},
        torch_config=TorchConfig(timeout_s=cfg.timeout_s),
        scaling_config=ScalingConfig(
            num_workers=cfg.num_workers,
            use_gpu=cfg.use_gpu,
            resources_per_worker={"CPU": cfg.cpus_per_worker},
        ),
        run_config=RunConfig(
            name=run_name, storage_path=storage_path, failure_config=FailureConfig(max_failures=0)
        ),
    )
    t0 = time.perf_counter()
    log.info(
        "%s: %d Ray Train workers (%s)", stage, cfg.num_workers, "GPU, nccl" if cfg.use_gpu else "CPU, gloo"
    )
    try:
        result = trainer.fit()
    except WorkerGroupError as e:
        raise _worker_error(stage, e.worker_failures, ray.exceptions.RayError) from None
    except TrainingFailedError as e:
        raise TransientError(f"{stage}: Ray Train failed: {e}") from None
    except ray.exceptions.RayError as e:  # e.g. the controller actor could not start
        raise TransientError(f"{stage}: Ray Train could not run: {type(e).__name__}: {e}") from None
    log.info("%s: Ray Train run finished in %.1f s", stage, time.perf_counter() - t0)
    return result.return_value


def _worker_error(stage: str, failures: dict[int, BaseException], ray_error: type) -> Exception:
    from tasks.core.params import ParamsError

    ranks = sorted(failures)
    for rank in ranks:
        if isinstance(failures[rank], (StageError, ParamsError)):
            return failures[rank]
    rank = ranks[0] if ranks else -1
    e = failures.get(rank)
    text = f"{stage}: Ray Train worker rank {rank} failed: {type(e).__name__}: {e}"
    if any(isinstance(failures[r], ray_error) for r in ranks):
        return TransientError(text)
    return StageError(text)


def _worker_main(config: dict[str, Any]) -> dict[str, Any]:
    """One Ray Train worker: the stage's own `run` as rank r of the group (docs/choices.md#distributed)."""
    import importlib

    import ray.train
    import torch

    from tasks.core.params import Params
    from tasks.core.stage import setup_logging

    os.chdir(config["cwd"])  # Ray starts workers in its own run directory; params paths are relative
    setup_logging()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if config["use_gpu"]:
        if not torch.cuda.is_available():
            raise StageError(
                f"distributed.use_gpu is true but worker rank {rank} ({socket.gethostname()}) sees "
                f"no CUDA device"
            )
        import ray.train.torch

        device = str(ray.train.torch.get_device())
    else:
        device = "cpu"
    params = Params.model_validate(config["params"])
    module = importlib.import_module(f"tasks.{config['stage']}")
    with activated(rank, world, device):
        return module.run(params, callbacks=config["callbacks"])
