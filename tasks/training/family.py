"""Joint training of the whole family on the configured backend (the `cpt` and `family_sft` stages).

Library module, the one place that reads `training.backend`:
- `launch_on_workers(params)`: whether the stage must rerun itself on Ray Train workers (hf data
  parallelism, tasks/training/distributed.py); the megatron backend launches its own ranks.
- `train_family(...)`: the stage's fingerprinted, resumable run of `cfg.max_steps` steps with the joint
  multi-exit loss `sum_k w_k(t) CE_k`: hf = `train_loop` (tasks/training/loop.py), megatron =
  `megatron_backend.train` (tasks/training/megatron_backend.py, TP x PP x DP ranks); both return a
  `TrainResult` and leave the trained weights in the stage's HF family.
- `backend_metrics(params)`: what the backend adds to the stage's metrics.
Choices: docs/choices.md#training and #megatron.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from tasks.core.paths import Workspace
from tasks.training import distributed, megatron_backend
from tasks.training.checkpoint import Checkpointer, fingerprint_info
from tasks.training.loop import TrainResult, exit_weights_at, multi_exit_eval, multi_exit_loss_fn, train_loop


def launch_on_workers(params) -> bool:
    """True in the stage's driver process of an hf run with `distributed.backend: ray`: the stage then
    reruns itself on every worker (`distributed.launch`), which calls `train_family` there."""
    return (
        params.distributed.backend == "ray"
        and params.training.backend == "hf"
        and not distributed.in_worker()
    )


def train_family(
    *,
    stage: str,
    params,
    cfg,
    model,
    stream,
    val_batches: Sequence[dict],
    inputs: dict[str, str],
    callbacks: Sequence[Callable[[int], None]] = (),
) -> TrainResult:
    """Trains every parameter of `model` (a FamilialForCausalLM on its training device) in place.

    Args:
        stage: the stage name (logs, checkpoints under `Workspace.checkpoints(stage)`).
        params: the validated parameters (seed, model, training, distributed sections).
        cfg: the stage's TrainParams section (with `exit_weights`).
        stream: `.batch(position, batch_size)`, the stage's training batches.
        val_batches: fixed batches evaluated before step 1, every `eval_every` steps and at the end.
        inputs: name -> digest of the stage's inputs, for the checkpoint fingerprint.
        callbacks: called with the completed step count after each step.
    """
    info = fingerprint_info(
        stage,
        cfg,
        seed=params.seed,
        model=params.model,
        inputs=inputs,
        extra=megatron_backend.fingerprint_extra(params),
    )
    root = Workspace.from_params(params).checkpoints(stage)
    if params.training.backend == "megatron":
        return megatron_backend.train(
            stage=stage,
            params=params,
            cfg=cfg,
            model=model,
            stream=stream,
            val_batches=val_batches,
            checkpoint_root=root,
            info=info,
            callbacks=callbacks,
        )
    exits = list(model.config.exit_layers)
    return train_loop(
        stage=stage,
        model=model,
        cfg=cfg,
        named_params=list(model.named_parameters()),
        stream=stream,
        loss_fn=multi_exit_loss_fn(
            lambda step: exit_weights_at(cfg.exit_weights, exits, step, cfg.max_steps)
        ),
        val_batches=val_batches,
        eval_fn=multi_exit_eval,
        checkpointer=Checkpointer(root, info),
        callbacks=callbacks,
    )


def backend_metrics(params) -> dict[str, Any]:
    """`{"megatron": {tp, pp, dp, recompute}}` for the megatron backend, nothing for hf."""
    if params.training.backend == "megatron":
        return {"megatron": params.training.megatron.model_dump()}
    return {}


__all__ = ["launch_on_workers", "train_family", "backend_metrics"]
