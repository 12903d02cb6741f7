"""Data-parallel training (tasks/training/distributed.py): the same result as the local loop, exact
resume, clear errors.

- `train_loop` under DistributedDataParallel on 2 gloo processes (torch.multiprocessing, no Ray), on
  SFT-like rows whose supervised token counts differ (the case a wrong normalisation gets wrong), with
  shards that cut across the local micro-batches: the same gradients, weights and losses as one process.
- The cpt stage with `distributed.backend: ray` on 2 Ray Train CPU workers: killed after step 6 (its
  step-4 checkpoint written by rank 0) and resumed by Ray, it ends with the local run's weights (max
  abs diff <= WEIGHT_ATOL = 5e-5, 99.9% of them within 1e-6; see below) and per-step losses (rel 1e-5),
  data position and RNG state; the local backend resumes from that
  Ray-written checkpoint as well. No Ray process is left afterwards (checked under RAY_TMPDIR).
- Parameter errors: num_workers < 1, a global batch smaller than num_workers, use_gpu without CUDA,
  an unreachable address.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from local_http import free_port
from training_helpers import copy_workspace, load, make_workspace, sft_like_rows

from tasks import cpt
from tasks.core.artifacts import load_family
from tasks.core.params import CPTParams, ParamsError, TrainParams
from tasks.core.stage import StageError, TransientError
from tasks.training import distributed
from tasks.training.batches import BlockStream, fixed_batches
from tasks.training.checkpoint import Checkpointer, fingerprint_info
from tasks.training.loop import _targets, exit_weights_at, multi_exit_loss_fn, train_loop

#: Final weights of a data-parallel run vs the local run (fp32). Measured on the cpt run below: max abs
#: diff 1.1e-5 (an lm_head row: Adam divides by sqrt(v), which amplifies summation-order rounding on
#: elements with a near-zero gradient), 99.9% of the weights within 2.3e-7, median 6e-9. Asserted: max
#: <= 5e-5 (1/60 of one lr step of 3e-3) and the 99.9% quantile <= 1e-6, which a normalisation error
#: (e.g. a mean of per-rank means, or a factor world_size) exceeds by orders of magnitude.
WEIGHT_ATOL = 5e-5
WEIGHT_Q999 = 1e-6
LOSS_RTOL = 1e-5


# --- parameters and driver-side errors (no workers started) --------------------------------------------
def test_distributed_params_are_validated(tmp_path):
    path = make_params_file(tmp_path)
    with pytest.raises(ParamsError, match=r"distributed.num_workers: Input should be greater than 0"):
        load(path, distributed__backend="ray", distributed__num_workers=0)
    with pytest.raises(
        ParamsError,
        match=r"distributed.num_workers \(5\) exceeds the global batch of cpt "
        r"\(cpt.batch_size x cpt.grad_accum = 4 rows\)",
    ):
        load(path, distributed__backend="ray", distributed__num_workers=5)
    assert load(path).distributed.backend == "local"  # the default: one process, unchanged
    from tasks.core.params import load_params

    paper = load_params(Path(__file__).resolve().parents[2] / "params.paper.yaml").distributed
    assert (paper.backend, paper.num_workers, paper.use_gpu) == ("ray", 8, True)


def make_params_file(tmp_path: Path) -> Path:
    import yaml
    from training_helpers import micro_params

    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(micro_params(tmp_path)))
    return path


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_use_gpu_without_cuda_is_an_error_naming_the_parameter(tmp_path):
    params = load(make_params_file(tmp_path), distributed__backend="ray", distributed__use_gpu=True)
    with pytest.raises(StageError, match="distributed.use_gpu is true but CUDA is not available"):
        cpt.run(params)


def test_unreachable_address_is_a_transient_error_naming_the_parameter(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    params = load(
        make_params_file(tmp_path), distributed__backend="ray", distributed__address=f"127.0.0.1:{port}"
    )
    with pytest.raises(
        TransientError,
        match=rf"distributed.address='127.0.0.1:{port}': the Ray cluster is "
        rf"unreachable",
    ):
        cpt.run(params)


# --- train_loop under DDP without Ray ------------------------------------------------------------------
def _micro_family():
    from ruyi_model import FamilialConfig, FamilialForCausalLM

    torch.manual_seed(0)
    cfg = FamilialConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=32,
        exit_layers=[1, 3],
        tie_word_embeddings=False,
        loss_impl="chunked",
    )
    return FamilialForCausalLM(cfg)


def _loop_run(ckpt_dir: Path):
    """3 rows per micro-batch, 2 micro-batches: 2 ranks take rows 0-2 and 3-5, i.e. one micro-batch each,
    whose supervised token counts differ."""
    tensors = sft_like_rows(n=18)
    model = _micro_family()
    cfg = TrainParams(
        seq_len=12,
        batch_size=3,
        grad_accum=2,
        max_steps=4,
        lr=1e-2,
        warmup_steps=1,
        checkpoint_every=2,
        eval_every=2,
        eval_batches=3,
    )
    stream = BlockStream(tensors, 0, "ddp")
    info = fingerprint_info("cpt", cfg, seed=0, inputs={"data": "x"})  # the code fingerprint of a real stage
    weights = lambda step: exit_weights_at(CPTParams().exit_weights, [1, 3], step, 4)  # noqa: E731
    val = fixed_batches({k: v[:9] for k, v in tensors.items()}, 3, 3)
    result = train_loop(
        stage="t",
        model=model,
        cfg=cfg,
        named_params=list(model.named_parameters()),
        stream=stream,
        loss_fn=multi_exit_loss_fn(weights),
        val_batches=val,
        checkpointer=Checkpointer(ckpt_dir, info),
    )
    return model, result


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        with distributed.activated(rank, world, "cpu"):
            model, result = _loop_run(Path(out) / "ckpt")
        torch.save(
            {
                "state": model.state_dict(),
                "history": result.history,
                "samples": result.samples,
                "tokens": result.tokens,
            },
            Path(out) / f"rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def test_train_loop_under_ddp_equals_the_local_loop(tmp_path):
    import torch.multiprocessing as mp

    stream = BlockStream(sft_like_rows(n=18), 0, "ddp")
    shards = [_targets(stream.batch(3 * h, 3)) for h in range(2)]
    assert shards[0] != shards[1], shards  # the ranks supervise different numbers of tokens
    local, res_local = _loop_run(tmp_path / "local")
    mp.spawn(_ddp_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for name, ref in local.state_dict().items():
        assert torch.equal(ranks[0]["state"][name], ranks[1]["state"][name]), name  # replicas stay identical
        torch.testing.assert_close(ranks[0]["state"][name], ref, rtol=0, atol=WEIGHT_ATOL, msg=name)
    ddp = type(local)(local.config)
    ddp.load_state_dict(ranks[0]["state"])
    _weights_close(ddp, local)
    assert ranks[0]["samples"] == res_local.samples and ranks[0]["tokens"] == res_local.tokens
    assert [(r["step"], r["exit"], r["split"]) for r in ranks[0]["history"]] == [
        (r["step"], r["exit"], r["split"]) for r in res_local.history
    ]
    assert [r["loss"] for r in ranks[0]["history"]] == pytest.approx(
        [r["loss"] for r in res_local.history], rel=LOSS_RTOL
    )
    # rank 0 alone wrote the checkpoints, in the local format
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step_2", "step_4"]


# --- the cpt stage on Ray Train ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_session():
    from tasks.core.ray_runtime import ray_runtime

    tmpdir = os.environ["RAY_TMPDIR"]  # tests/conftest.py: a short directory of this test session
    with ray_runtime(num_cpus=2, object_store_mib=256, log_to_driver=False) as runtime:
        assert runtime.owns_ray and runtime.tmpdir is None  # RAY_TMPDIR was set: used, not replaced
        yield
    out = subprocess.run(["pgrep", "-af", tmpdir], capture_output=True, text=True).stdout
    assert [line for line in out.splitlines() if "pgrep" not in line] == [], out


class KillAfter:
    """A picklable callback (it runs on every Ray worker): a simulated kill after step `step`."""

    def __init__(self, step: int):
        self.step = step

    def __call__(self, done: int) -> None:
        if done == self.step:
            raise StageError(f"simulated kill after step {done}")


def _weights_close(a, b) -> tuple[float, float]:
    """(max, 99.9% quantile) of |a - b| over every weight; asserts both tolerances."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    diffs = torch.cat([(sa[k] - sb[k]).abs().flatten() for k in sa])
    worst, q999 = float(diffs.max()), float(diffs.quantile(0.999))
    assert worst <= WEIGHT_ATOL and q999 <= WEIGHT_Q999, (worst, q999)
    return worst, q999


def _train_losses(history):
    return [(r["step"], r["exit"], r["loss"]) for r in history if r["split"] == "train"]


def test_cpt_on_ray_workers_equals_the_local_run_and_resumes(ray_session, tmp_path):
    from ray import cloudpickle  # Ray's own copy serializes the trainer's arguments

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # KillAfter travels to the workers by value
    workspace = make_workspace(tmp_path / "w")
    local = load(workspace)
    local_metrics = cpt.run(local)
    reference, _ = load_family(Path(local.paths.artifacts_dir) / "cpt")

    params = copy_workspace(
        workspace, tmp_path / "ray", distributed__backend="ray", distributed__num_workers=2
    )
    ckpt = tmp_path / "ray" / "artifacts" / "checkpoints" / "cpt"
    with pytest.raises(StageError, match="simulated kill after step 6"):
        cpt.run(params, callbacks=[KillAfter(6)])
    assert sorted(p.name for p in ckpt.iterdir()) == ["step_4"]  # written by rank 0, in the local format
    assert (
        not (tmp_path / "ray" / "artifacts" / "cpt").exists() and not (tmp_path / "ray" / "metrics").exists()
    )
    assert not (tmp_path / "ray" / "artifacts" / "checkpoints" / ".ray_train").exists()

    # The local backend resumes from the checkpoint the Ray run wrote.
    cross = copy_workspace(workspace, tmp_path / "cross")
    shutil.copytree(ckpt, tmp_path / "cross" / "artifacts" / "checkpoints" / "cpt")
    cross_metrics = cpt.run(cross)
    assert cross_metrics["resumed_from_step"] == 4
    crossed, _ = load_family(tmp_path / "cross" / "artifacts" / "cpt")
    _weights_close(crossed, reference)

    # Ray resumes its own run (every rank from step_4) and ends where the uninterrupted local run ended.
    metrics = cpt.run(params)
    assert metrics["resumed_from_step"] == 4 and metrics["steps"] == 12
    assert metrics["tokens"] == local_metrics["tokens"] and metrics["samples"] == local_metrics["samples"]
    on_disk = json.loads((tmp_path / "ray" / "metrics" / "cpt.json").read_text())
    assert on_disk["exit_4"] == metrics["exit_4"]
    model, _ = load_family(tmp_path / "ray" / "artifacts" / "cpt")
    _weights_close(model, reference)
    state = json.loads((ckpt / "step_12" / "trainer_state.json").read_text())
    ref_state = json.loads(
        (
            Path(local.paths.artifacts_dir) / "checkpoints" / "cpt" / "step_12" / "trainer_state.json"
        ).read_text()
    )
    assert state["samples"] == ref_state["samples"] and state["fingerprint"] == ref_state["fingerprint"]
    ours, ref = _train_losses(state["history"]), _train_losses(ref_state["history"])
    assert [x[:2] for x in ours] == [x[:2] for x in ref] and len(ours) == 24
    assert [x[2] for x in ours] == pytest.approx([x[2] for x in ref], rel=LOSS_RTOL)
    for d in (2, 4):
        assert metrics[f"exit_{d}"]["val_loss"] == pytest.approx(
            local_metrics[f"exit_{d}"]["val_loss"], rel=LOSS_RTOL
        )
    # The RNG state rank 0 saved is the local run's (the data-parallel run draws nothing extra).
    rng, ref_rng = (
        torch.load(p / "step_12" / "rng.pt", weights_only=True)
        for p in (ckpt, Path(local.paths.artifacts_dir) / "checkpoints" / "cpt")
    )
    assert torch.equal(rng["torch"], ref_rng["torch"])
    assert sorted(p.name for p in Path(params.paths.plots_dir, "cpt").iterdir()) == ["loss.csv", "loss.png"]
