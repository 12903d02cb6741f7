"""Stage `export`: every member of the compressed family as a stock Qwen3 checkpoint, plus the family.

    python -m tasks.export [--params params.yaml]

Reads `artifacts/compress/` and the route stage's `artifacts/route/router.json` (shipped as
`router.json`, checked to belong to the family). Writes `artifacts/export/` (`exit_<d>/` loadable by
plain transformers, dense; `exit_<d>_factored/` for the member with low-rank factors (the DaE member), a
one-member familial checkpoint that runs them; `family/`; `manifest.json` with sha256 and size of every file;
`ruyi_model.export.export_exits`; `exit_<d>/model-<dtype>.gguf` for each dtype of `export.gguf_dtypes`,
`ruyi_model.gguf_export.export_gguf`), `metrics/export.json` (per member params and bytes, dense and
factored, logit parity, per GGUF file its errors) and `plots/export/sizes.{png,csv}`. Each `exit_<d>/`
is reloaded with `Qwen3ForCausalLM`, each factored copy with `FamilialForCausalLM`, and their logits
compared with the family member's; each GGUF file is reloaded with transformers' GGUF loader and
compared with its stock member (logits within a per-dtype bound, tokenizer ids).
Choices: docs/choices.md#export.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from tasks.core.artifacts import load_family
from tasks.core.files import (
    LOAD_ERRORS,
    atomic_dir,
    atomic_file,
    pyplot,
    save_figure,
    sha256_file,
    write_metrics,
)
from tasks.core.params import Params
from tasks.core.paths import Workspace
from tasks.core.stage import StageError, stage_main

log = logging.getLogger("ruyi.export")

PROBE = "What is 12 + 30? Show your work."
PARITY_ATOL = 1e-4
# GGUF files, loaded back by transformers and compared with the stock member on the probe
# (docs/choices.md#export): f32 absolutely, f16 and q8_0 relative to the largest |logit| (measured:
# at most 5.7e-4 / 1.2e-2 on the trained tiny family, 1.3e-3 / 3.2e-2 on random-init models).
GGUF_F32_ATOL = 1e-4
GGUF_REL_BOUND = {"f16": 3e-3, "q8_0": 6e-2}
# Besides the chat probe, the GGUF tokenizer must encode this like the member's tokenizer.
GGUF_TEXT_PROBE = "Tom has 3 apples!\n#### 7  héllo wörld 😀 \t tabs  and  spaces\r\n"


def set_chat_generation_config(model, tokenizer) -> tuple[int, int]:
    """Sets the family's generation config to stop at `<|im_end|>` and pad with `<|pad|>`; returns the ids."""
    from ruyi_model.tokenizer import IM_END

    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    model.generation_config.eos_token_id = im_end
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return im_end, tokenizer.pad_token_id


def member_parity(model, exit_layer: int, export_dir: Path, input_ids) -> tuple[float, Any]:
    """Max |logit difference| between member `exit_layer` and its export loaded from `export_dir`, and the
    export's logits on `input_ids` (the reference of its GGUF files)."""
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
    return float((ours - theirs).abs().max()), theirs


def factored_parity(model, exit_layer: int, factored_dir: Path, input_ids, expect_params: int) -> float:
    """Max |logit difference| between member `exit_layer` and its factored copy loaded from `factored_dir`
    (strictly, by `FamilialForCausalLM.from_pretrained`); StageError if the copy does not load, runs no
    low-rank module or holds another number of parameters than `expect_params`."""
    import torch

    from ruyi_model import FamilialForCausalLM, LowRankLinear

    try:
        one = FamilialForCausalLM.from_pretrained(factored_dir, dtype=torch.float32, local_files_only=True)
    except LOAD_ERRORS as e:
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


def gguf_file_name(dtype: str) -> str:
    """The GGUF file of one member in `dtype`, inside its `exit_<d>/` directory."""
    return f"model-{dtype}.gguf"


def write_ggufs(out: Path, manifest: dict, dtypes: list[str]) -> None:
    """Writes `exit_<d>/model-<dtype>.gguf` for every member and dtype (from the dense stock export just
    written, the DaE member's too) and lists them in the manifest (`files`, and per member `gguf`:
    dtype -> path), which is rewritten. The other files of `exit_<d>/` are left as they are."""
    import json

    from ruyi_model.export import MANIFEST, member_dir_name
    from ruyi_model.gguf_export import export_gguf

    for d in manifest["exit_layers"]:
        name = member_dir_name(d)
        entry = manifest["members"][str(d)]
        entry["gguf"] = {}
        for dtype in dtypes:
            rel = f"{name}/{gguf_file_name(dtype)}"
            if rel in manifest["files"]:
                raise StageError(f"{out / rel}: already written by the export (a name clash)")
            try:
                path = export_gguf(out / name, None, out / rel, dtype=dtype, name=name)
            except (ValueError, TypeError) as e:  # a member or tokenizer GGUF cannot express
                raise StageError(f"{out / rel}: cannot write the member as GGUF: {e}") from None
            manifest["files"][rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
            entry["gguf"][dtype] = rel
            log.info("exit %d: %s (%.2f MiB)", d, rel, path.stat().st_size / 2**20)
    manifest["gguf_dtypes"] = list(dtypes)
    with atomic_file(out / MANIFEST) as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
        f.write("\n")


def check_gguf(path: Path, dtype: str, ref_logits, input_ids, tokenizer, texts: list[str]) -> dict[str, Any]:
    """Loads the GGUF file `path` back with transformers' GGUF loader (config, weights and tokenizer from
    the file alone) and compares it with the stock member in `path.parent`: its logits on `input_ids`
    with `ref_logits` (f32: max |diff| <= GGUF_F32_ATOL; f16/q8_0: max |diff| / max |ref logit| <=
    GGUF_REL_BOUND[dtype]), the hyperparameters, and the tokenizer (same ids for every text of `texts`,
    same chat template and eos). Returns its metrics; StageError naming the file on any mismatch."""
    import os
    import tempfile

    import gguf
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    member_cfg = AutoConfig.from_pretrained(path.parent, local_files_only=True)
    # Alone in a directory: next to the member's tokenizer.json, AutoTokenizer would read that file and
    # ignore the GGUF's tokenizer.
    with tempfile.TemporaryDirectory(prefix="ruyi-gguf-check-") as tmp:
        os.symlink(path.resolve(), Path(tmp) / path.name)
        try:
            cfg = AutoConfig.from_pretrained(tmp, gguf_file=path.name, local_files_only=True)
            key_length = gguf.GGUFReader(path).fields["qwen3.attention.key_length"].contents()
            # transformers' qwen3 GGUF reader ignores key_length (head_dim): the member's config supplies
            # it, checked above against the file's own field.
            model = AutoModelForCausalLM.from_pretrained(
                tmp, gguf_file=path.name, config=member_cfg, dtype=torch.float32, local_files_only=True
            ).eval()
            loaded_tok = AutoTokenizer.from_pretrained(tmp, gguf_file=path.name, local_files_only=True)
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise StageError(f"{path}: transformers' GGUF loader cannot load it: {e}") from None
    fields = (
        "model_type",
        "num_hidden_layers",
        "hidden_size",
        "intermediate_size",
        "num_attention_heads",
        "num_key_value_heads",
        "vocab_size",
        "max_position_embeddings",
        "tie_word_embeddings",
    )
    wrong = {f: (getattr(cfg, f, None), getattr(member_cfg, f)) for f in fields}
    wrong = {f: v for f, v in wrong.items() if v[0] != v[1]}
    if key_length != member_cfg.head_dim:
        wrong["qwen3.attention.key_length"] = (key_length, member_cfg.head_dim)
    if abs(cfg.rms_norm_eps - member_cfg.rms_norm_eps) > 1e-6 * member_cfg.rms_norm_eps:
        wrong["rms_norm_eps"] = (cfg.rms_norm_eps, member_cfg.rms_norm_eps)
    if cfg.rope_parameters["rope_theta"] != member_cfg.rope_parameters["rope_theta"]:
        wrong["rope_theta"] = (cfg.rope_parameters["rope_theta"], member_cfg.rope_parameters["rope_theta"])
    if wrong:
        raise StageError(
            f"{path}: hyperparameters differ from {path.parent / 'config.json'} (file, member): {wrong}"
        )

    with torch.inference_mode():
        logits = model(input_ids=input_ids, use_cache=False).logits
    diff = float((logits - ref_logits).abs().max())
    rel = diff / float(ref_logits.abs().max())
    agree = float((logits.argmax(-1) == ref_logits.argmax(-1)).float().mean())
    if dtype == "f32":
        ok, bound = diff <= GGUF_F32_ATOL, f"max |diff| <= {GGUF_F32_ATOL}"
    else:
        ok, bound = rel <= GGUF_REL_BOUND[dtype], f"max |diff| / max |logit| <= {GGUF_REL_BOUND[dtype]}"
    if not ok:
        raise StageError(
            f"{path}: logits differ from the stock member {path.parent} by {diff:.3g} "
            f"(relative {rel:.3g}; bound for {dtype}: {bound}); the GGUF file is not the member"
        )
    for text in texts:
        want = tokenizer(text, add_special_tokens=False)["input_ids"]
        got = loaded_tok(text, add_special_tokens=False)["input_ids"]
        if got != want:
            raise StageError(
                f"{path}: its tokenizer encodes {text[:60]!r} as {got[:12]}..., not {want[:12]}..."
            )
    if loaded_tok.chat_template != tokenizer.chat_template:
        raise StageError(f"{path}: its chat template differs from the member's")
    if loaded_tok.eos_token != tokenizer.eos_token:
        raise StageError(
            f"{path}: eos token {loaded_tok.eos_token!r}, the member's is {tokenizer.eos_token!r}"
        )
    log.info("%s: max |logit diff| %.2e (relative %.2e), argmax agreement %.3f", path, diff, rel, agree)
    return {
        "max_abs_logit_diff": diff,
        "rel_logit_diff": rel,
        "argmax_agreement": agree,
        "bound": bound,
        "tokenizer_texts_checked": len(texts),
    }


def write_router(out: Path, manifest: dict, router_file: Path, model) -> dict[str, Any]:
    """Copies the route stage's router into the export (`router.json`, what the `auto` tier applies),
    after checking it was calibrated on this family; lists it in the manifest (`files`, `router`), which
    is rewritten. Returns its metrics entry."""
    import json
    import shutil

    from ruyi_model.export import MANIFEST
    from tasks.release.router import ROUTER_FILE, Router

    if not router_file.is_file():
        raise StageError(f"router not found at {router_file} (the route stage writes it)")
    try:
        router = Router.load(router_file)
        router.check_model(model)
    except ValueError as e:
        raise StageError(f"{router_file}: cannot ship this router with the family: {e}") from None
    shutil.copyfile(router_file, out / ROUTER_FILE)
    manifest["files"][ROUTER_FILE] = {
        "sha256": sha256_file(out / ROUTER_FILE),
        "bytes": (out / ROUTER_FILE).stat().st_size,
    }
    manifest["router"] = ROUTER_FILE
    with atomic_file(out / MANIFEST) as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
        f.write("\n")
    log.info("router: threshold %.2f, probe layers %d", router.threshold, router.probe_layers)
    return {"threshold": router.threshold, "probe_layers": router.probe_layers, "order": list(router.order)}


def _plot(metrics: dict[str, Any], out_dir: Path) -> None:
    import csv

    plt = pyplot()

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
        "gguf_dtypes": manifest.get("gguf_dtypes", []),
    }
    for d in model.config.exit_layers:
        name = member_dir_name(d)
        member = manifest["members"][str(d)]
        check_generation_config(out / name, eos_id, pad_id)
        diff, stock_logits = member_parity(model, d, out / name, input_ids)
        if not diff <= PARITY_ATOL:
            raise StageError(
                f"{out / name}: logits differ from the family member {d} by {diff:.3g} "
                f"(> {PARITY_ATOL}); the export is not the evaluated member"
            )
        ggufs = member.get("gguf") or {}
        # `bytes`: the stock checkpoint (config, weights, tokenizer); the GGUF files are counted apart.
        size = sum(
            meta["bytes"]
            for rel, meta in files.items()
            if rel.startswith(f"{name}/") and rel not in ggufs.values()
        )
        metrics[f"exit_{d}"] = {
            "params": member["num_parameters"],
            "bytes": size,
            "num_hidden_layers": member["num_hidden_layers"],
            "dae_blocks": member["dae_blocks"],
            "max_abs_logit_diff": diff,
        }
        if ggufs:
            metrics[f"exit_{d}"]["gguf"] = {
                dtype: {
                    "file": rel,
                    "bytes": files[rel]["bytes"],
                    "sha256": files[rel]["sha256"],
                    **check_gguf(
                        out / rel, dtype, stock_logits, input_ids, tokenizer, [probe, GGUF_TEXT_PROBE]
                    ),
                }
                for dtype, rel in ggufs.items()
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
        write_ggufs(out, manifest, params.export.gguf_dtypes)
        router = write_router(out, manifest, ws.artifacts("route") / "router.json", model)
        metrics = check_export(model, tokenizer, out, manifest, eos_id, pad_id)
        metrics["router"] = router
    _plot(metrics, ws.plots("export"))
    write_metrics(params, "export", metrics)
    return metrics


def main(argv: list[str] | None = None) -> int:
    return stage_main("export", __doc__, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
