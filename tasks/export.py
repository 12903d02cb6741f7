"""Stage `export`: every member of the compressed family as a stock Qwen3 checkpoint, plus the family.

    python -m tasks.export [--params params.yaml]

Reads `artifacts/compress/`. Writes `artifacts/export/` (`exit_<d>/` loadable by plain transformers,
dense; `exit_<d>_factored/` for the member with low-rank factors (the DaE member), a one-member familial
checkpoint that runs them; `family/`; `manifest.json` with sha256 and size of every file;
`ruyi_model.export.export_exits`), `metrics/export.json` (per member params and bytes, dense and
factored, logit parity) and `plots/export/sizes.{png,csv}`. Each `exit_<d>/` is reloaded with
`Qwen3ForCausalLM`, each factored copy with `FamilialForCausalLM`, and their logits compared with the
family member's. Choices: docs/choices.md#export.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from tasks.core.artifacts import load_family
from tasks.core.files import atomic_dir, atomic_file, save_figure, sha256_file, write_metrics
from tasks.core.params import Params
from tasks.core.paths import Workspace
from tasks.core.stage import StageError, stage_main

log = logging.getLogger("ruyi.export")

PROBE = "What is 12 + 30? Show your work."
PARITY_ATOL = 1e-4


def set_chat_generation_config(model, tokenizer) -> tuple[int, int]:
    """Sets the family's generation config to stop at `<|im_end|>` and pad with `<|pad|>`; returns the ids."""
    from ruyi_model.tokenizer import IM_END

    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    model.generation_config.eos_token_id = im_end
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return im_end, tokenizer.pad_token_id


def member_parity(model, exit_layer: int, export_dir: Path, input_ids) -> float:
    """Max |logit difference| between member `exit_layer` and its export loaded from `export_dir`."""
    import torch
    from transformers import Qwen3ForCausalLM

    stock, info = Qwen3ForCausalLM.from_pretrained(
        export_dir, dtype=torch.float32, output_loading_info=True, local_files_only=True
    )
    problems = {
        k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v
    }
    if problems:
        raise StageError(f"{export_dir}: the export does not load cleanly as Qwen3ForCausalLM: {problems}")
    with torch.inference_mode():
        ours = model(input_ids=input_ids, exit_layer=exit_layer, use_cache=False).logits
        theirs = stock.eval()(input_ids=input_ids, use_cache=False).logits
    return float((ours - theirs).abs().max())


def factored_parity(model, exit_layer: int, factored_dir: Path, input_ids, expect_params: int) -> float:
    """Max |logit difference| between member `exit_layer` and its factored copy loaded from `factored_dir`
    (strictly, by `FamilialForCausalLM.from_pretrained`); StageError if the copy does not load, runs no
    low-rank module or holds another number of parameters than `expect_params`."""
    import torch

    from ruyi_model import FamilialForCausalLM, LowRankLinear

    try:
        one = FamilialForCausalLM.from_pretrained(factored_dir, dtype=torch.float32, local_files_only=True)
    except (OSError, ValueError) as e:
        raise StageError(
            f"{factored_dir}: the factored copy does not load as FamilialForCausalLM: {e}"
        ) from None
    count = sum(p.numel() for p in one.parameters())
    if count != expect_params:
        raise StageError(
            f"{factored_dir}: {count} parameters, but member {exit_layer} runs {expect_params}: "
            "not the member's factored weights"
        )
    if not any(isinstance(m, LowRankLinear) for m in one.modules()):
        raise StageError(f"{factored_dir}: no low-rank module: not the member's factored weights")
    with torch.inference_mode():
        ours = model(input_ids=input_ids, exit_layer=exit_layer, use_cache=False).logits
        theirs = one.eval()(input_ids=input_ids, use_cache=False).logits
    return float((ours - theirs).abs().max())


def _plot(metrics: dict[str, Any], out_dir: Path) -> None:
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fields = ["params", "bytes", "num_hidden_layers", "params_factored", "bytes_factored"]
    # A member without low-rank factors has no factored copy: empty cells (CSV), no factored bar (figure).
    rows = [{"exit": d, **{k: metrics[f"exit_{d}"].get(k) for k in fields}} for d in metrics["members"]]
    with atomic_file(out_dir / "sizes.csv") as f:
        writer = csv.DictWriter(f, fieldnames=["exit", *fields])
        writer.writeheader()
        writer.writerows(rows)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    x = list(range(len(rows)))
    for ax, key, scale, unit in (
        (axes[0], "params", 1e6, "parameters (M)"),
        (axes[1], "bytes", 2**20, "MiB"),
    ):
        ax.bar([i - 0.2 for i in x], [r[key] / scale for r in rows], width=0.4, label="dense (stock Qwen3)")
        factored = [(i, r[f"{key}_factored"] / scale) for i, r in zip(x, rows) if r[f"{key}_factored"]]
        if factored:
            ax.bar([i + 0.2 for i, _ in factored], [v for _, v in factored], width=0.4, label="factored")
        ax.set_xticks(x, [f"exit {r['exit']}" for r in rows])
        ax.set_ylabel(unit if key == "params" else f"checkpoint size ({unit})")
    axes[0].legend(fontsize=8)
    fig.suptitle("Exported members (dense stock Qwen3ForCausalLM; factored copy where low rank)")
    fig.tight_layout()
    save_figure(fig, out_dir / "sizes.png")


def check_generation_config(path: Path, eos_id: int, pad_id: int) -> None:
    """The checkpoint at `path` stops at `eos_id` and pads with `pad_id` (StageError naming the file)."""
    import json

    gen = json.loads((path / "generation_config.json").read_text())
    if gen.get("eos_token_id") != eos_id or gen.get("pad_token_id") != pad_id:
        raise StageError(
            f"{path / 'generation_config.json'}: eos/pad ids {gen.get('eos_token_id')}/"
            f"{gen.get('pad_token_id')}, expected {eos_id}/{pad_id}"
        )


def check_export(model, tokenizer, out: Path, manifest: dict, eos_id: int, pad_id: int) -> dict[str, Any]:
    """Verifies an export (hashes, generation configs, logit parity per member and per factored copy);
    returns its metrics."""
    import torch

    from ruyi_model.export import (
        MANIFEST,
        member_dir_name,
        member_has_lowrank,
        member_num_parameters,
        verify_export,
    )

    try:
        verify_export(out)
    except ValueError as e:
        raise StageError(f"export verification failed: {e}") from None

    probe = tokenizer.apply_chat_template(
        [{"role": "user", "content": PROBE}], add_generation_prompt=True, tokenize=False
    )
    input_ids = torch.tensor([tokenizer(probe, add_special_tokens=False)["input_ids"]])
    files = manifest["files"]
    metrics: dict[str, Any] = {
        "members": list(model.config.exit_layers),
        "dtype": manifest["dtype"],
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
    }
    for d in model.config.exit_layers:
        name = member_dir_name(d)
        member = manifest["members"][str(d)]
        check_generation_config(out / name, eos_id, pad_id)
        diff = member_parity(model, d, out / name, input_ids)
        if not diff <= PARITY_ATOL:
            raise StageError(
                f"{out / name}: logits differ from the family member {d} by {diff:.3g} "
                f"(> {PARITY_ATOL}); the export is not the evaluated member"
            )
        size = sum(meta["bytes"] for rel, meta in files.items() if rel.startswith(f"{name}/"))
        metrics[f"exit_{d}"] = {
            "params": member["num_parameters"],
            "bytes": size,
            "num_hidden_layers": member["num_hidden_layers"],
            "dae_blocks": member["dae_blocks"],
            "max_abs_logit_diff": diff,
        }
        log.info(
            "exit %d: %d params, %.2f MiB, max |logit diff| %.2e",
            d,
            member["num_parameters"],
            size / 2**20,
            diff,
        )
        factored = member.get("factored")
        if member_has_lowrank(model, d) != (factored is not None):
            raise StageError(
                f"{out / MANIFEST}: member {d} "
                + (
                    "runs low-rank factors but has no"
                    if factored is None
                    else "runs no low-rank factors but has a"
                )
                + " factored copy"
            )
        if factored is not None:
            fdir = out / factored["dir"]
            expect = member_num_parameters(model, d)
            if factored["num_parameters"] != expect:
                raise StageError(
                    f"{out / MANIFEST}: member {d}'s factored copy states {factored['num_parameters']} "
                    f"parameters, the member runs {expect}"
                )
            check_generation_config(fdir, eos_id, pad_id)
            fdiff = factored_parity(model, d, fdir, input_ids, expect)
            if not fdiff <= PARITY_ATOL:
                raise StageError(
                    f"{fdir}: logits differ from the family member {d} by {fdiff:.3g} "
                    f"(> {PARITY_ATOL}); the factored copy is not the evaluated member"
                )
            fsize = sum(meta["bytes"] for rel, meta in files.items() if rel.startswith(f"{factored['dir']}/"))
            metrics[f"exit_{d}"].update(
                params_factored=factored["num_parameters"],
                bytes_factored=fsize,
                max_abs_logit_diff_factored=fdiff,
            )
            log.info(
                "exit %d factored: %d params (dense %d), %.2f MiB, max |logit diff| %.2e",
                d,
                factored["num_parameters"],
                member["num_parameters"],
                fsize / 2**20,
                fdiff,
            )
    metrics["family_params"] = manifest["family"]["num_parameters"]
    metrics["family_bytes"] = sum(meta["bytes"] for rel, meta in files.items() if rel.startswith("family/"))
    metrics["total_bytes"] = sum(meta["bytes"] for meta in files.values())
    metrics["manifest_sha256"] = sha256_file(out / MANIFEST)
    return metrics


def run(params: Params) -> dict:
    """Exports artifacts/compress to artifacts/export, verifies it; returns the metrics."""
    from ruyi_model.export import export_exits
    from tasks.training.batches import check_tokenizer

    ws = Workspace.from_params(params)
    source = ws.artifacts("compress")
    model, tokenizer = load_family(source)
    model.eval()
    check_tokenizer(tokenizer, source)
    eos_id, pad_id = set_chat_generation_config(model, tokenizer)

    # Exported and checked in a temporary sibling, renamed onto artifacts/export only when every check
    # passed: a failed check never leaves an export that looks complete.
    with atomic_dir(ws.artifacts("export")) as out:
        manifest = export_exits(model, out, tokenizer=tokenizer)
        metrics = check_export(model, tokenizer, out, manifest, eos_id, pad_id)
    _plot(metrics, ws.plots("export"))
    write_metrics(params, "export", metrics)
    return metrics


def main(argv: list[str] | None = None) -> int:
    return stage_main("export", __doc__, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
