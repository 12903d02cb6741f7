"""The megatron-core backend of the family stages (`training.backend: megatron` for cpt, family_sft).

Library module, called by `tasks.training.family.train_family`. `train(...)` takes the stage's HF
family, its batch stream, validation batches and checkpoint fingerprint (what `train_loop` takes) and:
  1. converts the family to megatron shards (`ruyi_model.megatron.convert_hf_to_mcore`, the
     configured TP x PP) in a temporary directory beside the stage's checkpoints;
  2. runs tp x pp x dp ranks: `distributed.backend: local` spawns them on this machine (torch
     multiprocessing, gloo on CPU, NCCL on GPU); `ray` runs them as Ray Train workers (one per rank,
     `distributed.num_workers` = the world size, a given cluster address or a local Ray);
  3. every rank trains its shard with megatron's DDP, `get_megatron_optimizer` (AdamW, betas
     0.9/0.95, decay on matrices only, global-norm clipping) and the pipeline schedule (1F1B with
     `grad_accum` micro-batches), on the same batches, multi-exit loss, exit-weight and lr schedules
     as the hf loop (tasks/training/loop.py): each micro-batch's loss is weighted by its share of the
     global batch's supervised tokens, so the gradient is the hf backend's;
  4. checkpoints with megatron-core `dist_checkpointing` (model, optimizer, RNG per rank) plus the
     trainer state (step, data position, history) on the stage's `checkpoint_every`, in the
     Checkpointer's layout (fingerprint, manifest, atomic rename; tasks/training/checkpoint.py); a
     killed run resumes from the newest verified one;
  5. converts the trained shards back and loads them into the HF family.
Returns the same `TrainResult` as `train_loop`. Choices: docs/choices.md#training.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import tempfile
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasks.core.stage import StageError
from tasks.training.batches import IGNORE_INDEX
from tasks.training.checkpoint import Checkpointer, write_manifest
from tasks.training.loop import TrainResult, exit_weights_at, lr_factor

log = logging.getLogger("ruyi")
#: The files of a megatron checkpoint (dist_checkpointing's torch_dist format + the trainer state).
CHECKPOINT_FILES = ("metadata.json", "common.pt", "trainer_state.json")
RESULT_FILE = "result.json"


@dataclass
class MegatronJob:
    """Everything a rank needs (pickled to the spawned processes or Ray workers)."""

    stage: str
    cfg: Any  # the stage's TrainParams section (with exit_weights)
    tp: int
    pp: int
    dp: int
    seed: int
    mcore_dir: str
    stream: Any  # `.batch(position, batch_size)`, the stage's own stream
    val_batches: list[dict]
    exit_layers: list[int]
    checkpoint_root: str
    info: dict[str, Any]
    result_dir: str
    threads: int = 1
    recompute: bool = False
    callbacks: list = field(default_factory=list)

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.dp


# --- the driver (the stage's process) -------------------------------------------------------------
def train(
    *,
    stage: str,
    params,
    cfg,
    model,
    stream,
    val_batches,
    checkpoint_root: Path,
    info: dict[str, Any],
    callbacks=(),
) -> TrainResult:
    """Trains `model` (a FamilialForCausalLM, on the CPU) in place on the megatron backend; see the
    module docstring. Raises StageError for a bad split or a failed rank (its error and traceback)."""
    import torch

    from ruyi_model.megatron import convert_hf_to_mcore, convert_mcore_to_hf

    lay = params.training.megatron
    if cfg.bf16 and not torch.cuda.is_available():
        raise StageError(
            f"{stage}.bf16=true with training.backend=megatron needs CUDA (megatron's mixed-precision "
            f"optimizer wraps CUDA tensors only); set {stage}.bf16=false on this CPU-only machine"
        )
    checkpoint_root = Path(checkpoint_root).resolve()
    checkpoint_root.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{stage}.megatron-", dir=checkpoint_root.parent))
    try:
        model.to("cpu").save_pretrained(work / "hf")
        try:
            convert_hf_to_mcore(work / "hf", work / "mcore", tp=lay.tp, pp=lay.pp)
        except ValueError as e:
            raise StageError(f"training.megatron (tp={lay.tp}, pp={lay.pp}): {e}") from None
        job = MegatronJob(
            stage=stage,
            cfg=cfg,
            tp=lay.tp,
            pp=lay.pp,
            dp=lay.dp,
            seed=params.seed,
            mcore_dir=str(work / "mcore"),
            stream=stream,
            val_batches=list(val_batches),
            exit_layers=list(model.config.exit_layers),
            checkpoint_root=str(checkpoint_root),
            info=info,
            result_dir=str(work),
            # the stage's intra-op threads (params.threads) shared by its ranks
            threads=max(1, torch.get_num_threads() // (lay.tp * lay.pp * lay.dp)),
            recompute=lay.recompute,
            callbacks=list(callbacks),
        )
        log.info(
            "%s: megatron backend, tp=%d pp=%d dp=%d (%d ranks, %s)",
            stage,
            lay.tp,
            lay.pp,
            lay.dp,
            job.world,
            params.distributed.backend,
        )
        if params.distributed.backend == "ray":
            _launch_ray(job, params)
        else:
            _launch_local(job)
        result = _read_result(work / RESULT_FILE)
        convert_mcore_to_hf(work / "mcore", work / "trained")
        _load_weights(model, work / "trained")
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _load_weights(model, hf_dir: Path) -> None:
    from safetensors.torch import load_file

    sd = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        sd.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise StageError(
            f"the trained megatron shards do not fill the family: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )


def _read_result(path: Path) -> TrainResult:
    if not path.is_file():
        raise StageError(f"the megatron ranks finished without writing {path.name}")
    raw = json.loads(path.read_text())
    result = TrainResult(**{k: v for k, v in raw.items() if k != "history"})
    result.history = [{**r, "exit": int(r["exit"])} for r in raw["history"]]
    return result


def fingerprint_extra(params) -> dict[str, Any] | None:
    """What a checkpoint of the megatron backend adds to the stage's fingerprint (its split: a
    megatron checkpoint never resumes an hf run or another split); None for the hf backend."""
    if params.training.backend != "megatron":
        return None
    return {"training": params.training.model_dump()}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_local(job: MegatronJob) -> None:
    """`job.world` processes on this machine (spawned; each dies with this process)."""
    import torch.multiprocessing as mp

    port = free_port()
    try:
        mp.spawn(_local_rank, args=(job, port, os.getpid()), nprocs=job.world, join=True)
    except mp.ProcessRaisedException as e:
        text = str(e)
        marker = "StageError: "
        if marker in text:  # the rank's own clear error, without the traceback around it
            raise StageError(text.rsplit(marker, 1)[1].strip()) from None
        raise StageError(f"{job.stage}: a megatron rank failed:\n{text}") from None
    except mp.ProcessExitedException as e:
        raise StageError(f"{job.stage}: a megatron rank died: {e}") from None


def _die_with_parent(parent: int) -> None:
    """Linux: SIGKILL this rank when the stage process dies (a `kill -9` of the stage must not leave
    ranks training and writing checkpoints beside the resumed run)."""
    import ctypes
    import signal

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:
        os._exit(1)


def _checkpoint_helpers_die_with(rank_pid: int) -> None:
    """dist_checkpointing's writer forks one process per file it writes and collects results through a
    multiprocessing Manager (a server process, spawned on the first save). Both get
    `_die_with_parent(<this rank>)` here, so a killed rank leaves no process behind."""
    import functools
    import multiprocessing
    from multiprocessing.managers import SyncManager

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    writer = filesystem_async.FileSystemWriterAsync
    if not getattr(writer.write_preloaded_data, "_dies_with_rank", False):
        write = writer.write_preloaded_data

        @functools.wraps(write)
        def write_preloaded_data(*args, **kwargs):  # runs in the forked writer process
            _die_with_parent(rank_pid)
            return write(*args, **kwargs)

        write_preloaded_data._dies_with_rank = True
        writer.write_preloaded_data = staticmethod(write_preloaded_data)
    if filesystem_async._results_queue is None:
        manager = SyncManager(ctx=multiprocessing.get_context("spawn"))
        manager.start(initializer=_die_with_parent, initargs=(rank_pid,))
        filesystem_async._results_queue = manager.Queue()


def _local_rank(rank: int, job: MegatronJob, port: int, parent: int) -> None:
    import torch
    import torch.distributed as dist

    _die_with_parent(parent)
    from tasks.core.stage import setup_logging

    setup_logging()
    warnings.filterwarnings("ignore", module="megatron")  # "TE/Apex not installed: fallback" and the like
    _checkpoint_helpers_die_with(os.getpid())
    torch.set_num_threads(job.threads)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(rank % torch.cuda.device_count())
    dist.init_process_group(
        "nccl" if cuda else "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=job.world,
    )
    try:
        run_rank(job)
    finally:
        dist.destroy_process_group()


def _launch_ray(job: MegatronJob, params) -> None:
    """One Ray Train worker per rank (the process group is Ray's: gloo, or NCCL with use_gpu)."""
    from tasks.training import distributed

    distributed.launch_function(job.stage, params, _ray_rank, {"job": job})


def _ray_rank(config: dict[str, Any]) -> None:
    import torch

    from tasks.core.stage import setup_logging

    os.chdir(config["cwd"])
    setup_logging()
    warnings.filterwarnings("ignore", module="megatron")
    _checkpoint_helpers_die_with(os.getpid())
    job: MegatronJob = config["job"]
    if torch.cuda.is_available() and config.get("use_gpu"):
        import ray.train.torch

        torch.cuda.set_device(ray.train.torch.get_device())
    torch.set_num_threads(job.threads)
    run_rank(job)


# --- one rank -----------------------------------------------------------------------------------------
def megatron_batch(batch: dict) -> dict:
    """An hf batch (`input_ids`, optional `labels` with -100, right padding) as megatron's GPT batch:
    targets shifted left, `loss_mask` on the supervised targets (the hf loss's tokens)."""
    import torch

    ids = batch["input_ids"]
    labels = batch.get("labels", ids)
    target = labels[:, 1:]
    keep = target != IGNORE_INDEX
    zeros = torch.zeros_like(ids[:, :1])
    return {
        "input_ids": ids,
        "position_ids": torch.arange(ids.shape[1], device=ids.device).expand_as(ids),
        "labels": torch.cat([torch.where(keep, target, torch.zeros_like(target)), zeros], dim=1),
        "loss_mask": torch.cat([keep.float(), zeros.float()], dim=1),
    }


def _shard(batch: dict, dp_rank: int, dp: int) -> dict:
    return {k: v.chunk(dp)[dp_rank] for k, v in batch.items()}


class _Rank:
    """The state of one rank through a run."""

    def __init__(self, job: MegatronJob):
        import torch
        from megatron.core import parallel_state as ps

        from ruyi_model.megatron import load_model
        from ruyi_model.megatron.train import wrap_for_training

        self.job, self.cfg = job, job.cfg
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
        # bf16: megatron's mixed precision (bf16 weights and compute, fp32 main weights, fp32 grads).
        self.model = load_model(job.mcore_dir, dtype=torch.bfloat16 if self.cfg.bf16 else torch.float32)
        self.model.recompute_layers = job.recompute
        if self.device is not None:
            self.model.cuda()
        self.ddp, self.opt = wrap_for_training(
            self.model.train(),
            lr=self.cfg.lr,
            weight_decay=self.cfg.weight_decay,
            clip_grad=self.cfg.grad_clip,
            adam_beta1=0.9,
            adam_beta2=0.95,
            adam_eps=1e-8,
        )
        self.tp_rank = ps.get_tensor_model_parallel_rank()
        self.pp_rank = ps.get_pipeline_model_parallel_rank()
        self.dp_rank = ps.get_data_parallel_rank()
        self.rank = torch.distributed.get_rank()
        self.result = TrainResult()
        self.start = 0

    # --- batches ------------------------------------------------------------------------------
    def _to_device(self, batch: dict) -> dict:
        return batch if self.device is None else {k: v.to(self.device) for k, v in batch.items()}

    def _step_batches(self) -> tuple[list[dict], list[int], int]:
        """This rank's shares of the step's `grad_accum` micro-batches (megatron form), their supervised
        targets, and the global batch's targets; advances the data position and token count."""
        cfg, result = self.cfg, self.result
        mine, counts = [], []
        for _ in range(cfg.grad_accum):
            batch = self.job.stream.batch(result.samples, cfg.batch_size)
            result.samples += cfg.batch_size
            mask = batch.get("attention_mask")
            result.tokens += int(mask.sum()) if mask is not None else batch["input_ids"].numel()
            shard = megatron_batch(_shard(batch, self.dp_rank, self.job.dp))
            mine.append(self._to_device(shard))
            full = batch.get("labels", batch["input_ids"])
            counts.append(int((full[:, 1:] != IGNORE_INDEX).sum()))
        targets = [int(b["loss_mask"].sum()) for b in mine]
        return mine, targets, sum(counts)

    # --- one optimizer step -------------------------------------------------------------------
    def train_step(self, step: int) -> dict[int, float]:
        import torch
        from megatron.core.pipeline_parallel import get_forward_backward_func

        from ruyi_model.megatron import familial_loss_func, set_exit_loss_scale
        from ruyi_model.megatron.cpu_shim import cpu_device_mode

        cfg, job = self.cfg, self.job
        t0 = time.perf_counter()
        micro, targets, total = self._step_batches()
        weights = exit_weights_at(cfg.exit_weights, job.exit_layers, step, cfg.max_steps)
        factor = lr_factor(step, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
        for group in self.opt.param_groups:
            group["lr"] = cfg.lr * factor * group.get("lr_mult", 1.0)
            group["weight_decay"] = cfg.weight_decay * group.get("wd_mult", 1.0)
        n = len(micro)
        # share of micro-batch m: its targets / the global batch's; the schedule averages over the
        # n micro-batches and megatron's DDP over the dp ranks, hence the factor dp * n * share.
        shares = [t / total if total else 1.0 / (n * job.dp) for t in targets]
        scales = [job.dp * n * s for s in shares]
        ce: list[dict] = []
        it = iter(zip(micro, scales))

        def forward_step(_data, model):
            batch, scale = next(it)
            out = model(
                batch["input_ids"],
                batch["position_ids"],
                labels=batch["labels"],
                loss_mask=batch["loss_mask"],
                exit_loss_weights=[w * scale for w in weights],
            )
            ce.append({d: float(v) for d, v in self.model.exit_losses.items()})
            return out, lambda o: familial_loss_func(batch["loss_mask"], o)

        set_exit_loss_scale(1.0 / n)
        with cpu_device_mode():
            self.ddp.zero_grad_buffer()
            self.opt.zero_grad()
            get_forward_backward_func()(
                forward_step_func=forward_step,
                data_iterator=iter(micro),
                model=[self.ddp],
                num_microbatches=n,
                seq_length=micro[0]["input_ids"].shape[1],
                micro_batch_size=micro[0]["input_ids"].shape[0],
                forward_only=False,
            )
            ok, _, _ = self.opt.step()
        if not ok:
            raise StageError(
                f"{job.stage}: non-finite gradients at step {step + 1}; lower {job.stage}.lr or check "
                f"the data (nothing was saved for this run)"
            )
        local = {d: sum(c[d] * s for c, s in zip(ce, shares)) for d in (ce[0] if ce else {})}
        per_exit = self._sum_over_ranks(local)
        self.result.train_seconds += time.perf_counter() - t0
        if not all(torch.isfinite(torch.tensor(v)) for v in per_exit.values()):
            raise StageError(
                f"{job.stage}: the loss is not finite at step {step + 1} ({per_exit}); lower "
                f"{job.stage}.lr or check the data (nothing was saved for this run)"
            )
        return per_exit

    def _sum_over_ranks(self, local: dict[int, float]) -> dict[int, float]:
        """Sums per-member values over the pipeline stages and data-parallel ranks (tp rank 0 of each
        counts: the other tensor-parallel ranks hold the same values)."""
        import torch
        import torch.distributed as dist

        exits = self.job.exit_layers
        vec = torch.zeros(len(exits), dtype=torch.float64)
        if self.tp_rank == 0:
            for d, v in local.items():
                vec[exits.index(d)] = v
        if self.device is not None:
            vec = vec.to(self.device)
        dist.all_reduce(vec)
        return dict(zip(exits, vec.cpu().tolist()))

    # --- evaluation -----------------------------------------------------------------------------
    def evaluate(self) -> dict[int, float]:
        """Mean CE per member over the validation batches (token-weighted, as the hf `evaluate`)."""
        import torch
        from megatron.core.pipeline_parallel import get_forward_backward_func

        from ruyi_model.megatron import familial_loss_func
        from ruyi_model.megatron.cpu_shim import cpu_device_mode

        self.model.eval()
        sums: dict[int, float] = {}
        tokens: dict[int, float] = {}
        for full in self.job.val_batches:
            batch = self._to_device(megatron_batch(_shard(full, self.dp_rank, self.job.dp)))
            n = float(batch["loss_mask"].sum())

            def forward_step(_data, model, batch=batch, n=n):
                out = model(
                    batch["input_ids"],
                    batch["position_ids"],
                    labels=batch["labels"],
                    loss_mask=batch["loss_mask"],
                )
                for d, v in self.model.exit_losses.items():
                    sums[d] = sums.get(d, 0.0) + float(v) * n
                    tokens[d] = tokens.get(d, 0.0) + n
                return out, lambda o: familial_loss_func(batch["loss_mask"], o)

            with cpu_device_mode(), torch.no_grad():
                get_forward_backward_func()(
                    forward_step_func=forward_step,
                    data_iterator=iter([batch]),
                    model=[self.ddp],
                    num_microbatches=1,
                    seq_length=batch["input_ids"].shape[1],
                    micro_batch_size=batch["input_ids"].shape[0],
                    forward_only=True,
                )
        self.model.train()
        s, t = self._sum_over_ranks(sums), self._sum_over_ranks(tokens)
        return {d: s[d] / max(t[d], 1.0) for d in self.job.exit_layers}

    def record_eval(self, step: int) -> None:
        losses = self.evaluate()
        self.result.history.extend(
            {"step": step, "exit": d, "split": "val", "loss": v} for d, v in losses.items()
        )

    # --- checkpoints ------------------------------------------------------------------------------
    def _sharded_state(self, is_loading: bool = False) -> dict:
        import torch
        from megatron.core import parallel_state as ps
        from megatron.core.dist_checkpointing.mapping import ShardedObject

        model_sd = self.model.sharded_state_dict()
        return {
            "model": model_sd,
            "optimizer": self.opt.sharded_state_dict(model_sd, is_loading=is_loading),
            "rng": ShardedObject(
                "rng_state",
                {"torch": torch.get_rng_state()},
                (
                    ps.get_pipeline_model_parallel_world_size(),
                    ps.get_tensor_model_parallel_world_size(),
                    self.job.dp,
                ),
                (self.pp_rank, self.tp_rank, self.dp_rank),
                replica_id=0,
            ),
        }

    def checkpointer(self) -> Checkpointer:
        return Checkpointer(self.job.checkpoint_root, self.job.info, required=CHECKPOINT_FILES)

    def save_checkpoint(self, done: int) -> None:
        """`root/step_<done>/` written by every rank into one temporary directory, then (rank 0) the
        trainer state, the manifest and the atomic rename; keeps the newest two."""
        import torch.distributed as dist
        from megatron.core import dist_checkpointing

        from ruyi_model.megatron.cpu_shim import cpu_device_mode

        ckpt = self.checkpointer()
        root = ckpt.root
        box = [f".step_{done}.tmp-{uuid.uuid4().hex[:8]}" if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        tmp = root / box[0]
        if self.rank == 0:
            tmp.mkdir(parents=True)
        dist.barrier()
        with cpu_device_mode():
            dist_checkpointing.save(self._sharded_state(), str(tmp))
        dist.barrier()
        if self.rank == 0:
            from tasks.core.files import write_json

            r = self.result
            write_json(
                tmp / "trainer_state.json",
                {
                    "samples": r.samples,
                    "tokens": r.tokens,
                    "history": r.history,
                    "train_seconds": r.train_seconds,
                    "step": done,
                    "fingerprint": ckpt.digest,
                    "fingerprint_info": ckpt.info,
                },
            )
            write_manifest(tmp)
            final = root / f"step_{done}"
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            for _, old in ckpt.step_dirs()[: -ckpt.keep]:
                doomed = old.with_name(f".{old.name}.tmp-pruned-{uuid.uuid4().hex[:8]}")
                old.rename(doomed)
                shutil.rmtree(doomed, ignore_errors=True)
        dist.barrier()

    def resume(self) -> None:
        import torch
        import torch.distributed as dist
        from megatron.core import dist_checkpointing

        from ruyi_model.megatron.cpu_shim import cpu_device_mode

        ckpt = self.checkpointer()
        box = [None]
        if self.rank == 0:
            box = [(ckpt.find_resumable(), ckpt.stale, ckpt.skipped)]
        dist.broadcast_object_list(box, src=0)
        latest, stale, skipped = box[0]
        self.result.stale_checkpoint, self.result.skipped_checkpoints = stale, skipped
        if latest is None:
            return
        state = json.loads((Path(latest) / "trainer_state.json").read_text())
        cfg = self.cfg
        start = int(state["step"])
        if int(state["samples"]) != start * cfg.grad_accum * cfg.batch_size:
            raise StageError(
                f"{Path(latest) / 'trainer_state.json'}: data position {state['samples']} does not match "
                f"step {start} x {cfg.grad_accum} x {cfg.batch_size}"
            )
        try:
            with cpu_device_mode():
                loaded = dist_checkpointing.load(self._sharded_state(is_loading=True), str(latest))
        except Exception as e:  # dist_checkpointing raises its own error types
            raise StageError(
                f"cannot load the megatron checkpoint {latest}: {type(e).__name__}: {e}"
            ) from None
        self.model.load_state_dict(loaded["model"], strict=False)
        self.opt.load_state_dict(loaded["optimizer"])
        torch.set_rng_state(loaded["rng"]["torch"])
        r = self.result
        r.history = list(state["history"])
        r.samples, r.tokens = int(state["samples"]), int(state["tokens"])
        r.train_seconds = float(state["train_seconds"])
        r.resumed_from_step = self.start = start
        if self.rank == 0:
            log.info("%s: resumed from %s (%s)", self.job.stage, Path(latest).name, latest)

    # --- the end --------------------------------------------------------------------------------------
    def save_weights(self) -> None:
        """Trained weights back into the conversion's shards (dp rank 0 of each (tp, pp) rank)."""
        import torch.distributed as dist

        from ruyi_model.megatron.convert import finalize_split, save_rank_state_dict

        if self.dp_rank == 0:
            save_rank_state_dict(self.model.state_dict(), self.job.mcore_dir, self.tp_rank, self.pp_rank)
        dist.barrier()
        if self.rank == 0:
            finalize_split(self.job.mcore_dir)
        dist.barrier()


def run_rank(job: MegatronJob) -> None:
    """One rank of a megatron run (torch.distributed initialised, world size tp * pp * dp): resume,
    train `max_steps` steps with evaluations and checkpoints, save the weights; rank 0 writes the
    result (TrainResult fields, JSON) into `job.result_dir`."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from ruyi_model.megatron import init_parallel
    from tasks.core.stage import seed_everything

    logging.getLogger("megatron").setLevel(logging.WARNING)  # its per-bucket parameter lists
    if dist.get_world_size() != job.world:
        raise StageError(
            f"{job.stage}: {dist.get_world_size()} processes for a megatron world of tp x pp x dp = "
            f"{job.tp} x {job.pp} x {job.dp} = {job.world}"
        )
    seed_everything(job.seed)
    t_wall = time.perf_counter()
    init_parallel(job.tp, job.pp, job.seed)
    try:
        rank = _Rank(job)
        cfg = job.cfg
        rank.resume()
        if rank.start > cfg.max_steps:
            raise StageError(
                f"{job.stage}: checkpoint is at step {rank.start}, beyond max_steps={cfg.max_steps}"
            )
        if rank.start == 0:
            rank.record_eval(0)
        for step in range(rank.start, cfg.max_steps):
            per_exit = rank.train_step(step)
            done = step + 1
            rank.result.history.extend(
                {"step": done, "exit": d, "split": "train", "loss": v} for d, v in sorted(per_exit.items())
            )
            if done % cfg.eval_every == 0 or done == cfg.max_steps:
                rank.record_eval(done)
            if done % cfg.checkpoint_every == 0 or done == cfg.max_steps:
                rank.save_checkpoint(done)
            if rank.rank == 0 and done % max(1, cfg.max_steps // 10) == 0:
                log.info(
                    "%s: step %d/%d, train loss per member %s",
                    job.stage,
                    done,
                    cfg.max_steps,
                    {d: round(v, 3) for d, v in per_exit.items()},
                )
            for callback in job.callbacks:
                callback(done)
        rank.save_weights()
        if rank.rank == 0:
            r = rank.result
            r.steps = cfg.max_steps
            r.wall_seconds = time.perf_counter() - t_wall
            out = {
                "history": r.history,
                "steps": r.steps,
                "resumed_from_step": r.resumed_from_step,
                "samples": r.samples,
                "tokens": r.tokens,
                "train_seconds": r.train_seconds,
                "wall_seconds": r.wall_seconds,
                "stale_checkpoint": r.stale_checkpoint,
                "skipped_checkpoints": r.skipped_checkpoints,
            }
            path = Path(job.result_dir) / RESULT_FILE
            path.write_text(json.dumps(out, default=str))
    finally:
        ps.destroy_model_parallel()


__all__ = [
    "MegatronJob",
    "train",
    "fingerprint_extra",
    "run_rank",
    "megatron_batch",
    "CHECKPOINT_FILES",
]
