"""Multi-exit training and pipeline forward of `FamilialGPTModel` with megatron-core's own machinery.

megatron's `DistributedDataParallel`, `get_megatron_optimizer` and pipeline schedules
(`get_forward_backward_func`) drive the family; the loss is the multi-exit loss of the model
(ruyi_model.megatron.model). On a machine without CUDA everything runs on gloo inside
`cpu_shim.cpu_device_mode()` (no distributed optimizer there).

Run on every rank (e.g. `torchrun --nproc_per_node 2 -m ruyi_model.megatron.train ...`):

    python -m ruyi_model.megatron.train --mcore-dir CKPT --tokens batch.safetensors --tp 1 --pp 2 \
        --steps 3 --lr 0.5 --micro-batches 2 --out OUT [--save]

reads `input_ids` (B x T) from `--tokens` (split over data-parallel ranks, each share cut into
`--micro-batches`); data-parallel rank 0 of each (tp, pp) rank writes
`OUT/logits_tp<t>_pp<p>.safetensors` (the exit logits of this stage before training),
`OUT/losses_tp<t>_pp<p>.json` (per step: the loss of the last stage and each member's CE on this
stage) and, with `--save`, its trained weights back into CKPT (then `convert_mcore_to_hf` gives the
trained family).
"""

from __future__ import annotations

import argparse
import json
import os
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.pipeline_parallel import get_forward_backward_func

from ruyi_model.megatron.cpu_shim import cpu_device_mode, cuda_available
from ruyi_model.megatron.model import FamilialGPTModel, familial_loss_func, set_exit_loss_scale


def batch_from_tokens(input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """The megatron batch equivalent to HF's `labels=input_ids`: targets shifted left, last position
    masked out of the loss."""
    labels = torch.cat([input_ids[:, 1:], torch.zeros_like(input_ids[:, :1])], dim=1)
    loss_mask = torch.ones_like(input_ids, dtype=torch.float32)
    loss_mask[:, -1] = 0
    return {
        "input_ids": input_ids,
        "position_ids": torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids),
        "labels": labels,
        "loss_mask": loss_mask,
    }


def _unwrap(model) -> FamilialGPTModel:
    return model.module if isinstance(model, DistributedDataParallel) else model


def wrap_for_training(
    model: FamilialGPTModel,
    lr: float,
    optimizer: str = "adam",
    weight_decay: float = 0.0,
    sgd_momentum: float = 0.0,
    clip_grad: float = 0.0,
    **optimizer_kw,
):
    """megatron DDP around the model and megatron's optimizer over it. Returns (ddp_model, optimizer).

    `clip_grad` > 0: megatron's global-norm clipping (on the CPU through cpu_shim)."""
    config = model.config
    config.finalize_model_grads_func = finalize_model_grads
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=False
    )
    opt_config = OptimizerConfig(
        optimizer=optimizer,
        lr=lr,
        weight_decay=weight_decay,
        sgd_momentum=sgd_momentum,
        bf16=config.bf16,
        fp16=config.fp16,
        params_dtype=config.params_dtype,
        clip_grad=clip_grad,
        use_distributed_optimizer=False,
        **optimizer_kw,
    )
    with cpu_device_mode():
        ddp = DistributedDataParallel(config=config, ddp_config=ddp_config, module=model)
        opt = get_megatron_optimizer(opt_config, [ddp])
    return ddp, opt


def _forward_step(stage_out: dict, data_iterator, model):
    batch = next(data_iterator)
    output = model(
        batch["input_ids"], batch["position_ids"], labels=batch["labels"], loss_mask=batch["loss_mask"]
    )
    stage_out.setdefault("exit_losses", []).append(dict(_unwrap(model).exit_losses))
    return output, partial(familial_loss_func, batch["loss_mask"])


def train_step(ddp_model, optimizer, microbatches: list[dict[str, torch.Tensor]]) -> dict:
    """One optimizer step over `microbatches` (each a `batch_from_tokens` dict of equal shape).

    Returns (this rank's view): `loss` (the mean multi-exit loss over the micro-batches of the members on
    the last stage, None on other stages) and `exit_losses` `{d: mean CE_d}` for this stage's members.
    The total loss is `sum_k w_k CE_k` over all stages (each stage knows its own members)."""
    n = len(microbatches)
    batch_size, seq = microbatches[0]["input_ids"].shape
    set_exit_loss_scale(1.0 / n)
    stage_out: dict = {}
    with cpu_device_mode():
        ddp_model.zero_grad_buffer()
        optimizer.zero_grad()
        reduced = get_forward_backward_func()(
            forward_step_func=partial(_forward_step, stage_out),
            data_iterator=iter(microbatches),
            model=[ddp_model],
            num_microbatches=n,
            seq_length=seq,
            micro_batch_size=batch_size,
            forward_only=False,
        )
        ok, _, _ = optimizer.step()
    if not ok:
        raise RuntimeError("megatron optimizer step was skipped (non-finite gradients)")
    exit_losses = {}
    for d in stage_out["exit_losses"][0]:
        exit_losses[d] = float(sum(e[d] for e in stage_out["exit_losses"]) / n)
    loss = float(sum(r["lm loss"] for r in reduced) / n) if reduced else None
    return {"loss": loss, "exit_losses": exit_losses}


def forward_exit_logits(model, input_ids: torch.Tensor) -> dict[int, torch.Tensor]:
    """Every member's logits (B x T x V) on this rank's stage, through megatron's pipeline schedule."""
    batch = batch_from_tokens(input_ids)
    store: dict[int, torch.Tensor] = {}

    def step(data_iterator, m):
        b = next(data_iterator)
        out = m(b["input_ids"], b["position_ids"], exit_logits=store)
        return out, lambda o: (o.float().sum() * 0.0, {})

    with cpu_device_mode(), torch.no_grad():
        get_forward_backward_func()(
            forward_step_func=step,
            data_iterator=iter([batch]),
            model=[model],
            num_microbatches=1,
            seq_length=input_ids.shape[1],
            micro_batch_size=input_ids.shape[0],
            forward_only=True,
        )
    return store


def main(argv: list[str] | None = None) -> None:
    from safetensors.torch import load_file, save_file

    from ruyi_model.megatron.convert import finalize_split, save_rank_state_dict
    from ruyi_model.megatron.model import init_parallel, load_model

    p = argparse.ArgumentParser(
        prog="python -m ruyi_model.megatron.train", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--mcore-dir", required=True)
    p.add_argument("--tokens", required=True, help="safetensors file with input_ids (B x T)")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--optimizer", choices=("adam", "sgd"), default="adam")
    p.add_argument("--micro-batches", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--save", action="store_true", help="write the trained weights back into --mcore-dir")
    args = p.parse_args(argv)

    if cuda_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda_available() else "gloo")
    try:
        init_parallel(args.tp, args.pp, args.seed)
        ids = load_file(args.tokens)["input_ids"]
        dp = parallel_state.get_data_parallel_world_size()
        if ids.shape[0] % dp:
            raise ValueError(f"the batch size {ids.shape[0]} is not divisible by the data-parallel size {dp}")
        ids = ids.chunk(dp)[parallel_state.get_data_parallel_rank()]  # each data-parallel rank its share
        if cuda_available():
            ids = ids.cuda()
        if ids.shape[0] % args.micro_batches:
            raise ValueError(
                f"--micro-batches={args.micro_batches} does not divide the batch size {ids.shape[0]}"
            )
        model = load_model(args.mcore_dir)
        t_rank = parallel_state.get_tensor_model_parallel_rank()
        p_rank = parallel_state.get_pipeline_model_parallel_rank()
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        first_dp = parallel_state.get_data_parallel_rank() == 0  # writes the files of its (tp, pp) rank
        logits = forward_exit_logits(model, ids)
        if first_dp:
            save_file(
                {str(d): v.cpu().contiguous() for d, v in logits.items()},
                str(out / f"logits_tp{t_rank}_pp{p_rank}.safetensors"),
            )
        ddp, opt = wrap_for_training(model.train(), lr=args.lr, optimizer=args.optimizer)
        micro = [batch_from_tokens(c) for c in ids.chunk(args.micro_batches)]
        history = [train_step(ddp, opt, micro) for _ in range(args.steps)]
        if first_dp:
            (out / f"losses_tp{t_rank}_pp{p_rank}.json").write_text(json.dumps(history, indent=1))
        if args.save:
            if first_dp:
                save_rank_state_dict(model.state_dict(), args.mcore_dir, t_rank, p_rank)
            dist.barrier()
            if dist.get_rank() == 0:
                finalize_split(args.mcore_dir)
            dist.barrier()
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
