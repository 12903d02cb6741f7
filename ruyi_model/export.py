"""Export: every member of a family as a stock `Qwen3ForCausalLM` checkpoint, plus the family itself.

A vision-language family's members are stock `Qwen3VLForConditionalGeneration` checkpoints with the
processor beside each (`export_exits(vl_model, out_dir, processor)`, manifest `"modality"`).

    manifest = export_exits(model, "artifacts/export", tokenizer=tok)
    verify_export("artifacts/export")          # re-hash every file against manifest.json
    one = member_to_familial(model, 2)         # member 2 alone, its low-rank factors kept

Writes `exit_<d>/` (dense: loadable by plain transformers, vLLM, SGLang, llama.cpp converters), for a
member with low-rank factors also `exit_<d>_factored/` (a one-member `FamilialForCausalLM` that runs the
factors), `family/` and `manifest.json` (written last), atomically. Used by the export stage and by
evaluate's parameter count (`member_num_parameters`). Layout: docs/choices.md#export-layout.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from ruyi_model.config import FamilialConfig
from ruyi_model.fileio import atomic_dir, sha256_file
from ruyi_model.modeling import FamilialForCausalLM, LowRankLinear

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = "ruyi-export/1"
FAMILY_DIR = "family"
FACTORED_SUFFIX = "_factored"


def member_dir_name(exit_layer: int) -> str:
    return f"exit_{exit_layer}"


def factored_dir_name(exit_layer: int) -> str:
    """The directory of member `exit_layer`'s factored copy: a sibling of `exit_<d>/` (which stays a pure
    stock checkpoint)."""
    return f"exit_{exit_layer}{FACTORED_SUFFIX}"


# --- what a member runs ---------------------------------------------------------------------------
def member_modules(model: FamilialForCausalLM, exit_layer: int) -> list[torch.nn.Module]:
    """The modules member `exit_layer` runs: embedding, its decoder layers, its norm and its head."""
    d = model.config.check_exit(exit_layer)
    return [
        model.get_input_embeddings(),
        *model.member_layers(d),
        model.exits[str(d)].norm,
        model.exit_head(d),
    ]


def member_num_parameters(model: FamilialForCausalLM, exit_layer: int) -> int:
    """Parameters member `exit_layer` runs as a standalone model (low-rank factors counted as factors).

    The count `evaluate` reports as `params`; equal to `member_to_familial(model, d).num_parameters()`
    and, for a member without low-rank modules, to its dense stock export's count. For a vision-language
    family: the member's stock Qwen3-VL export's count (vision tower and its deepstack mergers included).
    """
    vl = sys.modules.get("ruyi_model.vl")  # (see export_exits: found, not imported)
    if vl is not None and isinstance(model, vl.FamilialVLForConditionalGeneration):
        return vl.member_vl_num_parameters(model, exit_layer)
    return sum(p.numel() for module in member_modules(model, exit_layer) for p in module.parameters())


def member_has_lowrank(model: FamilialForCausalLM, exit_layer: int) -> bool:
    """Whether member `exit_layer` runs any `LowRankLinear` (then its stock export is multiplied out)."""
    return any(
        isinstance(m, LowRankLinear) for module in member_modules(model, exit_layer) for m in module.modules()
    )


# --- member -> stock Qwen3 ----------------------------------------------------------------------
def member_qwen3_config(model: FamilialForCausalLM, exit_layer: int) -> Qwen3Config:
    """The stock `Qwen3Config` of member `exit_layer` (stock fields only, layer count of the member)."""
    cfg = model.config
    d = cfg.check_exit(exit_layer)
    stock_fields = set(Qwen3Config().to_dict())
    fields = {k: v for k, v in cfg.to_dict().items() if k in stock_fields}
    for key in (
        "model_type",
        "architectures",
        "layer_types",
        "transformers_version",
        "_name_or_path",
        "auto_map",
        "dtype",
    ):
        fields.pop(key, None)
    fields.update(num_hidden_layers=cfg.member_num_layers(d), tie_word_embeddings=False)
    qcfg = Qwen3Config(**fields)
    qcfg._attn_implementation = cfg._attn_implementation
    return qcfg


def _dense(module: torch.nn.Module) -> torch.Tensor:
    return module.dense_weight() if isinstance(module, LowRankLinear) else module.weight


def member_state_dict(model: FamilialForCausalLM, exit_layer: int) -> dict[str, torch.Tensor]:
    """Member `exit_layer`'s weights under stock `Qwen3ForCausalLM` names, low rank multiplied back.

    Returns:
        `{stock key: tensor}` (detached; dense tensors are shared with `model`, not copied).
    """
    d = model.config.check_exit(exit_layer)
    sd = {
        "model.embed_tokens.weight": model.model.embed_tokens.weight.detach(),
        "model.norm.weight": model.exits[str(d)].norm.weight.detach(),
        "lm_head.weight": _dense(model.exit_head(d)).detach(),
    }
    for i, layer in enumerate(model.member_layers(d)):
        for name, module in layer.named_modules():
            if isinstance(module, LowRankLinear):
                sd[f"model.layers.{i}.{name}.weight"] = module.dense_weight().detach()
        for name, tensor in layer.state_dict().items():
            if not name.endswith((".weight_a", ".weight_b")):
                sd[f"model.layers.{i}.{name}"] = tensor.detach()
    return sd


def member_to_qwen3(model: FamilialForCausalLM, exit_layer: int) -> Qwen3ForCausalLM:
    """Member `exit_layer` as a standalone stock `Qwen3ForCausalLM` (same dtype and device, eval mode).

    Raises:
        RuntimeError: if the member's weights do not fill the stock model exactly (strict load).
    """
    qcfg = member_qwen3_config(model, exit_layer)
    device = next(model.parameters()).device
    q = Qwen3ForCausalLM._from_config(qcfg, dtype=model.dtype).to(device)
    q.load_state_dict(member_state_dict(model, exit_layer), strict=True)
    q.generation_config = copy.deepcopy(model.generation_config)
    return q.eval()


# --- member -> one-member family (factors kept) --------------------------------------------------
def _member_path(config: FamilialConfig, exit_layer: int, path: str) -> str | None:
    """Where the family's module/tensor `path` lives in member `exit_layer`'s one-member family, or None
    if the member does not run it.

    The one-member family has `num_hidden_layers = d`: backbone layers `[0, d-b)` keep their index, the
    member's `b` branch layers become backbone layers `d-b ..`, its DaE blocks are `exits.<d>.layers.*`
    from 0; norm and head keep their names.
    """
    parts = path.split(".")
    depth, branch = config.backbone_depth(exit_layer), config.branch_layers(exit_layer)
    if parts[:2] == ["model", "layers"]:
        return path if int(parts[2]) < depth else None
    if parts[0] == "exits":
        if parts[1] != str(exit_layer):
            return None
        if parts[2] != "layers":
            return path
        j = int(parts[3])
        if j < branch:
            return ".".join(["model", "layers", str(depth + j), *parts[4:]])
        return ".".join(["exits", parts[1], "layers", str(j - branch), *parts[4:]])
    return path  # the embedding, the shared head


def member_familial_config(model: FamilialForCausalLM, exit_layer: int) -> FamilialConfig:
    """The `FamilialConfig` of member `exit_layer` alone: `exit_layers=[d]`, `num_hidden_layers=d`, its
    DaE blocks, and the ranks of its low-rank modules under their new paths (so `from_pretrained`
    rebuilds them); extra attributes (the tokenizer fingerprint) are kept."""
    cfg = model.config
    d = cfg.check_exit(exit_layer)
    fields = cfg.to_dict()
    for key in ("model_type", "architectures", "layer_types", "transformers_version", "_name_or_path"):
        fields.pop(key, None)
    ranks = {}
    for path, rank in cfg.lowrank_ranks.items():
        new_path = _member_path(cfg, d, path)
        if new_path is not None:
            ranks[new_path] = rank
    fields.update(
        num_hidden_layers=d,
        exit_layers=[d],
        dae_blocks=[cfg.num_dae_blocks(d)],
        exit_loss_weights=[cfg.exit_loss_weights[cfg.exit_layers.index(d)]],
        lowrank_ranks=ranks,
    )
    member_cfg = FamilialConfig(**fields)
    member_cfg._attn_implementation = cfg._attn_implementation
    return member_cfg


def member_to_familial(model: FamilialForCausalLM, exit_layer: int) -> FamilialForCausalLM:
    """Member `exit_layer` as a one-member `FamilialForCausalLM` that runs exactly what the member runs:
    the backbone truncated to the member, its branch layers, DaE blocks, norm and head, with every
    `LowRankLinear` kept at its rank (same dtype, device and train/eval mode as `model`).

    Its parameter count is `member_num_parameters(model, d)` and its logits (and `generate`, whose
    default member is its only one) are the family's at `exit_layer=d`. Save it with `save_pretrained`;
    `FamilialForCausalLM.from_pretrained` rebuilds it (ranks from `config.lowrank_ranks`).

    Raises:
        ValueError: `exit_layer` is not an exit of the family.
        RuntimeError: if the member's tensors do not fill the one-member model exactly (strict load).
    """
    if not isinstance(model, FamilialForCausalLM):
        raise TypeError(f"member_to_familial expects a FamilialForCausalLM, got {type(model).__name__}")
    d = model.config.check_exit(exit_layer)
    member_cfg = member_familial_config(model, d)
    device = next(model.parameters()).device
    one = FamilialForCausalLM._from_config(member_cfg, dtype=model.dtype).to(device)
    state = {}
    for key, tensor in model.state_dict().items():
        new_key = _member_path(model.config, d, key)
        if new_key is not None:
            state[new_key] = tensor.detach()
    one.load_state_dict(state, strict=True)
    # The rotary tables are non-persistent buffers: take the family's as they are (dtype included).
    for name, buf in model.model.rotary_emb.named_buffers(recurse=False):
        setattr(one.model.rotary_emb, name, buf.detach().clone())
    one.generation_config = copy.deepcopy(model.generation_config)
    one.train(model.training)
    count, want = sum(p.numel() for p in one.parameters()), member_num_parameters(model, d)
    if count != want:  # an internal invariant: the one-member model holds exactly what the member runs
        raise RuntimeError(f"member_to_familial: {count} parameters for member {d}, which runs {want}")
    return one


# --- files ---------------------------------------------------------------------------------
def _list_files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def export_exits(model, out_dir: str | Path, tokenizer=None, *, processor=None) -> dict:
    """Writes every member as a stock Qwen3 checkpoint, the family checkpoint and a manifest.

    A vision-language family (`FamilialVLForConditionalGeneration`) goes to `ruyi_model.vl`'s
    `export_vl_exits`: every member as a stock `Qwen3VLForConditionalGeneration` with the processor
    (passed as `tokenizer` or `processor`), the family, and a manifest with `"modality"`.

    A member that runs low-rank factors also gets `exit_<d>_factored/` (`member_to_familial`), and its
    manifest entry states both counts: `num_parameters` (dense) and `factored.num_parameters`.

    Args:
        model: the family (any dtype/device; DaE blocks and low-rank factors allowed).
        out_dir: the export directory; replaced atomically if it exists.
        tokenizer: saved next to every member and the family if given (a `save_pretrained`-able object).

    Returns:
        The manifest (also written to `out_dir/manifest.json`).
    """

    if processor is not None and tokenizer is not None:
        raise TypeError("export_exits: pass the processor as tokenizer or as processor, not both")
    # A vision-language family exists only once ruyi_model.vl is imported; looking it up there (not
    # importing it) keeps the text pipeline's stages free of the VL modules (tasks.core.codedeps).
    vl = sys.modules.get("ruyi_model.vl")
    if vl is not None and isinstance(model, vl.FamilialVLForConditionalGeneration):
        return vl.export_vl_exits(model, out_dir, processor if processor is not None else tokenizer)
    if processor is not None:
        raise TypeError("export_exits: processor= is for vision-language families; pass tokenizer=")
    if not isinstance(model, FamilialForCausalLM):
        raise TypeError(
            "export_exits expects a FamilialForCausalLM or FamilialVLForConditionalGeneration, "
            f"got {type(model).__name__}"
        )
    if tokenizer is not None and not hasattr(tokenizer, "save_pretrained"):
        raise TypeError(f"export_exits: tokenizer must have save_pretrained, got {type(tokenizer).__name__}")
    cfg = model.config

    def export_member(tmp: Path, d: int) -> dict:
        q = member_to_qwen3(model, d)
        save_with(q, tokenizer, tmp / member_dir_name(d))
        entry = {
            "dir": member_dir_name(d),
            "exit_layer": d,
            "num_hidden_layers": q.config.num_hidden_layers,
            "dae_blocks": cfg.num_dae_blocks(d),
            "num_parameters": sum(p.numel() for p in q.parameters()),
            "architecture": "Qwen3ForCausalLM",
            "factored": None,
        }
        del q
        if member_has_lowrank(model, d):
            # The dense export multiplies the factors out; this copy runs them (what is served).
            one = member_to_familial(model, d)
            save_with(one, tokenizer, tmp / factored_dir_name(d))
            entry["factored"] = {
                "dir": factored_dir_name(d),
                "architecture": type(one).__name__,
                "model_type": one.config.model_type,
                "num_parameters": sum(p.numel() for p in one.parameters()),
                "lowrank_ranks": dict(one.config.lowrank_ranks),
            }
        return entry

    return write_export(
        model,
        out_dir,
        export_member,
        tokenizer,
        family={
            "num_hidden_layers": cfg.num_hidden_layers,
            "exit_branch_layers": cfg.exit_branch_layers,
            "shared_heads": cfg.shared_heads,
            "dae_blocks": list(cfg.dae_blocks),
            "lowrank_ranks": dict(cfg.lowrank_ranks),
        },
        extra={"tokenizer": tokenizer is not None},
    )


def save_with(model, companion, target: Path) -> None:
    """`model.save_pretrained(target)` and, when given, its tokenizer / processor beside it."""
    model.save_pretrained(target)
    if companion is not None:
        companion.save_pretrained(target)


def write_export(model, out_dir: str | Path, export_member, companion, family: dict, extra: dict) -> dict:
    """The export's frame, shared by text and vision-language families, in one atomic directory:
    `export_member(tmp, d)` writes member d and returns its manifest entry; then the family checkpoint
    (+ `companion`, its tokenizer or processor), every file's sha256, and the manifest, written last.

    Args:
        family: the manifest's family fields besides dir, architecture, model_type and num_parameters.
        extra: top-level manifest fields (e.g. `tokenizer`, `modality`).
    """
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    members = {}
    with atomic_dir(out_dir) as tmp:
        for d in tqdm(model.config.exit_layers, desc="export: members", unit="member", disable=None):
            members[str(d)] = export_member(tmp, d)
        save_with(model, companion, tmp / FAMILY_DIR)
        files = {}
        for rel in _list_files(tmp):
            files[rel] = {"sha256": sha256_file(tmp / rel), "bytes": (tmp / rel).stat().st_size}
        manifest = {
            "format": FORMAT,
            "dtype": str(model.dtype).removeprefix("torch."),
            "exit_layers": list(model.config.exit_layers),
            "members": members,
            "family": {
                "dir": FAMILY_DIR,
                "architecture": type(model).__name__,
                "model_type": model.config.model_type,
                **family,
                "num_parameters": sum(p.numel() for p in model.parameters()),
            },
            **extra,
            "files": files,
        }
        with open(tmp / MANIFEST, "w") as f:
            json.dump(manifest, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
    kind = "vision-language " if manifest.get("modality") == "vision-language" else ""
    log.info("export: %d %smembers + family -> %s (%d files)", len(members), kind, out_dir, len(files))
    return manifest


def verify_export(
    out_dir: str | Path, extra_files: Iterable[str] = (), hashes: Mapping[str, str] | None = None
) -> None:
    """Re-hashes every file of an export against its manifest.

    Args:
        extra_files: paths (relative to `out_dir`) that another layer added around the export and that
            the export's manifest cannot list, e.g. a fetched release's store manifest `MANIFEST.json`.
        hashes: sha256 per relative path that the caller has just computed over these very files (the
            deploy stage's scan for the release manifest): used instead of hashing each file again, so a
            large export is read once; a listed file missing from it is hashed here.

    Raises:
        ValueError: naming the manifest if it is missing or unreadable, or the first file that is missing,
            has another size or sha256, or is not listed in the manifest.
    """
    out_dir = Path(out_dir)
    manifest_path = out_dir / MANIFEST
    if not manifest_path.is_file():
        raise ValueError(f"{manifest_path}: no export manifest (incomplete or not an export directory)")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
        if manifest.get("format") != FORMAT or not isinstance(files, dict):
            raise KeyError("format")
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{manifest_path}: not a {FORMAT} manifest ({e})") from None
    for rel, meta in sorted(files.items()):
        path = out_dir / rel
        if not path.is_file():
            raise ValueError(f"{path}: listed in {MANIFEST} but missing")
        size = path.stat().st_size
        if size != meta["bytes"]:
            raise ValueError(f"{path}: corrupted ({size} bytes, manifest says {meta['bytes']})")
        digest = hashes[rel] if hashes is not None and rel in hashes else sha256_file(path)
        if digest != meta["sha256"]:
            raise ValueError(
                f"{path}: corrupted (sha256 {digest[:12]}..., manifest says {meta['sha256'][:12]}...)"
            )
    extra = sorted(set(_list_files(out_dir)) - set(files) - {MANIFEST} - set(extra_files))
    if extra:
        raise ValueError(f"{out_dir / extra[0]}: not listed in {MANIFEST} (unexpected file in the export)")


__all__ = [
    "export_exits",
    "verify_export",
    "member_to_qwen3",
    "member_state_dict",
    "member_qwen3_config",
    "member_to_familial",
    "member_familial_config",
    "member_num_parameters",
    "member_has_lowrank",
    "member_modules",
    "factored_dir_name",
]
