"""File-level conversion between a familial HF checkpoint and megatron-core TP x PP shards.

No process group and no megatron import: tensors are renamed, fused and split exactly as
`FamilialGPTModel` (ruyi_model.megatron.model) holds them on each (tp, pp) rank, so every rank loads
its file with a plain `load_state_dict`. Both directions are pure copies, so a round trip is bitwise.

    convert_hf_to_mcore("artifacts/cpt", "artifacts/cpt_mcore", tp=2, pp=2)
    convert_mcore_to_hf("artifacts/cpt_mcore", "artifacts/cpt_back")

Megatron layout written (`out_dir`, replaced atomically):
    mp_rank_<tt>_<ppp>/model.safetensors   the state dict of TP rank tt on pipeline stage ppp
    megatron_split.json                    format, the split (layers per stage, the stage of each exit),
                                           the FamilialConfig, dtype and the sha256 of every shard
    hf_files/                              the family's non-weight files (config, generation config,
                                           tokenizer), copied back unchanged by `convert_mcore_to_hf`

Weight mapping (HF -> megatron, per decoder layer; layers of stage s renumbered from 0):
    input_layernorm                -> input_layernorm                      (replicated)
    self_attn.{q,k}_norm           -> self_attention.{q,k}_layernorm       (replicated)
    self_attn.{q,k,v}_proj         -> self_attention.linear_qkv            (column-parallel, fused per query
                                      group: [q heads of the group, k, v]; TP ranks get whole groups)
    self_attn.o_proj               -> self_attention.linear_proj           (row-parallel)
    post_attention_layernorm       -> pre_mlp_layernorm                    (replicated)
    mlp.{gate,up}_proj             -> mlp.linear_fc1                       (column-parallel; each rank holds
                                      [its gate rows; its up rows])
    mlp.down_proj                  -> mlp.linear_fc2                       (row-parallel)
and model.embed_tokens -> embedding.word_embeddings (stage 0, vocab-parallel); backbone layer i ->
decoder.layers; member d's layers exits.d.layers.k -> exits.d.layers.k, exits.d.norm ->
exits.d.final_layernorm, exits.d.lm_head -> exits.d.output_layer (vocab-parallel), all on the stage
of exit d; the deepest member's norm and head (or the shared lm_head) -> decoder.final_layernorm and
output_layer of the last stage (see ruyi_model.megatron.layout).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from ruyi_model.config import FamilialConfig
from ruyi_model.fileio import atomic_dir, sha256_file
from ruyi_model.megatron.layout import SplitLayout, check_split

FORMAT = "ruyi-megatron/1"
SPLIT_JSON = "megatron_split.json"
HF_FILES = "hf_files"
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


def shard_name(tp_rank: int, pp_rank: int) -> str:
    """The directory of one rank's shard (megatron's `mp_rank_TT_PPP` naming)."""
    return f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"


@dataclass(frozen=True)
class _Entry:
    """One megatron tensor: its kind of split, the HF tensor(s) it is made of, where it lives."""

    kind: str  # "rep" | "col" | "row" | "qkv" | "fc1"
    hf_keys: tuple[str, ...]
    mc_key: str
    stage: int


def _layer_entries(hf: str, mc: str, stage: int) -> list[_Entry]:
    return [
        _Entry("rep", (f"{hf}.input_layernorm.weight",), f"{mc}.input_layernorm.weight", stage),
        _Entry(
            "qkv",
            (
                f"{hf}.self_attn.q_proj.weight",
                f"{hf}.self_attn.k_proj.weight",
                f"{hf}.self_attn.v_proj.weight",
            ),
            f"{mc}.self_attention.linear_qkv.weight",
            stage,
        ),
        _Entry("rep", (f"{hf}.self_attn.q_norm.weight",), f"{mc}.self_attention.q_layernorm.weight", stage),
        _Entry("rep", (f"{hf}.self_attn.k_norm.weight",), f"{mc}.self_attention.k_layernorm.weight", stage),
        _Entry("row", (f"{hf}.self_attn.o_proj.weight",), f"{mc}.self_attention.linear_proj.weight", stage),
        _Entry("rep", (f"{hf}.post_attention_layernorm.weight",), f"{mc}.pre_mlp_layernorm.weight", stage),
        _Entry(
            "fc1",
            (f"{hf}.mlp.gate_proj.weight", f"{hf}.mlp.up_proj.weight"),
            f"{mc}.mlp.linear_fc1.weight",
            stage,
        ),
        _Entry("row", (f"{hf}.mlp.down_proj.weight",), f"{mc}.mlp.linear_fc2.weight", stage),
    ]


def conversion_plan(cfg: FamilialConfig, layout: SplitLayout) -> list[_Entry]:
    """Every megatron tensor of the family under `layout`, with its HF source (see module docstring)."""
    last = layout.pp - 1
    deepest = cfg.exit_layers[-1]
    plan = [_Entry("col", ("model.embed_tokens.weight",), "embedding.word_embeddings.weight", 0)]
    for i in range(cfg.num_hidden_layers):
        stage = layout.stage_of_layer(i)
        plan += _layer_entries(f"model.layers.{i}", f"decoder.layers.{i - layout.stage_start(stage)}", stage)
    for d in cfg.exit_layers:
        stage = layout.exit_stage(d)
        for k in range(cfg.branch_layers(d) + cfg.num_dae_blocks(d)):
            plan += _layer_entries(f"exits.{d}.layers.{k}", f"exits.{d}.layers.{k}", stage)
        if d == deepest:
            plan.append(_Entry("rep", (f"exits.{d}.norm.weight",), "decoder.final_layernorm.weight", last))
            if not cfg.shared_heads:
                plan.append(_Entry("col", (f"exits.{d}.lm_head.weight",), "output_layer.weight", last))
        else:
            plan.append(
                _Entry("rep", (f"exits.{d}.norm.weight",), f"exits.{d}.final_layernorm.weight", stage)
            )
            if not cfg.shared_heads:
                plan.append(
                    _Entry("col", (f"exits.{d}.lm_head.weight",), f"exits.{d}.output_layer.weight", stage)
                )
    if cfg.shared_heads:
        plan.append(_Entry("col", ("lm_head.weight",), "output_layer.weight", last))
    return plan


def _hf_shapes(cfg: FamilialConfig) -> dict[str, tuple[int, ...]]:
    """Expected shape of every HF tensor name suffix (by the last two name parts)."""
    d, hd, h, g = cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    f, v = cfg.intermediate_size, cfg.vocab_size
    return {
        "input_layernorm.weight": (d,),
        "post_attention_layernorm.weight": (d,),
        "q_norm.weight": (hd,),
        "k_norm.weight": (hd,),
        "q_proj.weight": (h * hd, d),
        "k_proj.weight": (g * hd, d),
        "v_proj.weight": (g * hd, d),
        "o_proj.weight": (d, h * hd),
        "gate_proj.weight": (f, d),
        "up_proj.weight": (f, d),
        "down_proj.weight": (d, f),
        "embed_tokens.weight": (v, d),
        "lm_head.weight": (v, d),
        "norm.weight": (d,),
    }


def _expected_shape(cfg: FamilialConfig, hf_key: str) -> tuple[int, ...]:
    shapes = _hf_shapes(cfg)
    parts = hf_key.split(".")
    return shapes[".".join(parts[-2:])]


# --- splitting and joining ------------------------------------------------------------------------
def _split(entry: _Entry, tensors: list[torch.Tensor], cfg: FamilialConfig, tp: int) -> list[torch.Tensor]:
    if entry.kind == "rep":
        return [tensors[0].clone() for _ in range(tp)]
    if entry.kind == "col":
        return [t.clone() for t in torch.chunk(tensors[0], tp, dim=0)]
    if entry.kind == "row":
        return [t.clone() for t in torch.chunk(tensors[0], tp, dim=1)]
    if entry.kind == "fc1":
        gate, up = (torch.chunk(t, tp, dim=0) for t in tensors)
        return [torch.cat([g, u], dim=0) for g, u in zip(gate, up)]
    if entry.kind == "qkv":
        q, k, v = tensors
        groups, hd = cfg.num_key_value_heads, cfg.head_dim
        per_group = cfg.num_attention_heads // groups
        dim = q.shape[1]
        fused = torch.cat(
            [q.reshape(groups, per_group * hd, dim), k.reshape(groups, hd, dim), v.reshape(groups, hd, dim)],
            dim=1,
        )
        return [t.reshape(-1, dim).clone() for t in torch.chunk(fused, tp, dim=0)]
    raise AssertionError(entry.kind)


def _join(entry: _Entry, shards: list[torch.Tensor], cfg: FamilialConfig) -> list[torch.Tensor]:
    if entry.kind == "rep":
        first = shards[0]
        for r, s in enumerate(shards[1:], start=1):
            if not torch.equal(first, s):
                raise ValueError(
                    f"{entry.mc_key}: replicated tensor differs between TP rank 0 and TP rank {r}"
                )
        return [first.clone()]
    if entry.kind == "col":
        return [torch.cat(shards, dim=0)]
    if entry.kind == "row":
        return [torch.cat(shards, dim=1)]
    if entry.kind == "fc1":
        halves = [torch.chunk(s, 2, dim=0) for s in shards]
        return [torch.cat([h[0] for h in halves], dim=0), torch.cat([h[1] for h in halves], dim=0)]
    if entry.kind == "qkv":
        groups, hd = cfg.num_key_value_heads, cfg.head_dim
        per_group = cfg.num_attention_heads // groups
        fused = torch.cat(shards, dim=0)
        dim = fused.shape[1]
        fused = fused.reshape(groups, (per_group + 2) * hd, dim)
        q, k, v = torch.split(fused, [per_group * hd, hd, hd], dim=1)
        return [q.reshape(-1, dim).clone(), k.reshape(-1, dim).clone(), v.reshape(-1, dim).clone()]
    raise AssertionError(entry.kind)


def _shard_shape(entry: _Entry, cfg: FamilialConfig, tp: int) -> tuple[int, ...]:
    shapes = [_expected_shape(cfg, k) for k in entry.hf_keys]
    if entry.kind == "rep":
        return shapes[0]
    if entry.kind == "col":
        return (shapes[0][0] // tp, shapes[0][1])
    if entry.kind == "row":
        return (shapes[0][0], shapes[0][1] // tp)
    return (sum(s[0] for s in shapes) // tp, shapes[0][1])  # qkv, fc1


# --- HF side ----------------------------------------------------------------------------------------
def _hf_weight_files(family_dir: Path) -> list[Path]:
    index = family_dir / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [family_dir / n for n in names]
    single = family_dir / "model.safetensors"
    if single.exists():
        return [single]
    raise ValueError(
        f"{family_dir}: no model.safetensors or model.safetensors.index.json (only safetensors "
        "family checkpoints are converted)"
    )


def _check_keys(where: str, have: set[str], want: set[str]) -> None:
    missing, extra = sorted(want - have), sorted(have - want)
    if missing or extra:
        detail = []
        if missing:
            detail.append(f"missing {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        if extra:
            detail.append(f"unexpected {extra[:8]}{' ...' if len(extra) > 8 else ''}")
        raise ValueError(f"{where} does not match its FamilialConfig: " + "; ".join(detail))


def convert_hf_to_mcore(family_dir: str | Path, out_dir: str | Path, tp: int = 1, pp: int = 1) -> dict:
    """Splits a familial HF checkpoint (`FamilialForCausalLM.save_pretrained` output) into TP x PP shards.

    Args:
        family_dir: the family checkpoint (config.json + safetensors; low-rank factors are refused).
        out_dir: the megatron checkpoint directory to write (replaced atomically).
        tp, pp: tensor- and pipeline-parallel sizes.

    Returns:
        The split description (also written to `out_dir/megatron_split.json`).

    Raises:
        ValueError: before anything is written, for a split that does not fit the family (naming the
            parameter) or a checkpoint whose tensors do not match its config (naming the tensors).
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    family_dir = Path(family_dir)
    if not (family_dir / "config.json").is_file():
        raise ValueError(f"{family_dir}: not a family checkpoint (no config.json)")
    cfg = FamilialConfig.from_pretrained(family_dir)
    layout = check_split(cfg, tp, pp)
    plan = conversion_plan(cfg, layout)
    files = _hf_weight_files(family_dir)
    where: dict[str, Path] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                where[key] = path
    _check_keys(f"{family_dir} (tensors)", set(where), {k for e in plan for k in e.hf_keys})

    shards: dict[tuple[int, int], dict[str, torch.Tensor]] = {
        (t, p): {} for t in range(tp) for p in range(pp)
    }
    dtypes = set()
    handles = {path: safe_open(str(path), framework="pt") for path in files}
    for entry in plan:
        tensors = [handles[where[k]].get_tensor(k) for k in entry.hf_keys]
        for key, t in zip(entry.hf_keys, tensors):
            want = _expected_shape(cfg, key)
            if tuple(t.shape) != want:
                raise ValueError(
                    f"{family_dir}: tensor {key} has shape {tuple(t.shape)}, its config says {want}"
                )
            dtypes.add(str(t.dtype).removeprefix("torch."))
        for t_rank, shard in enumerate(_split(entry, tensors, cfg, tp)):
            shards[(t_rank, entry.stage)][entry.mc_key] = shard.contiguous()
    del handles

    description = {
        "format": FORMAT,
        "split": layout.to_json(),
        "dtype": sorted(dtypes),
        "familial_config": cfg.to_dict(),
        "shards": {},
    }
    with atomic_dir(out_dir) as tmp:
        for (t_rank, p_rank), sd in sorted(shards.items()):
            rel = f"{shard_name(t_rank, p_rank)}/model.safetensors"
            (tmp / rel).parent.mkdir()
            save_file(
                sd, str(tmp / rel), metadata={"format": "pt", "tp_rank": str(t_rank), "pp_rank": str(p_rank)}
            )
            description["shards"][rel] = {
                "tp_rank": t_rank,
                "pp_rank": p_rank,
                "tensors": len(sd),
                "sha256": sha256_file(tmp / rel),
            }
        extra = tmp / HF_FILES
        extra.mkdir()
        for path in sorted(family_dir.iterdir()):
            if path.is_file() and path not in files and path.name not in _WEIGHT_FILES:
                shutil.copy2(path, extra / path.name)
        (tmp / SPLIT_JSON).write_text(json.dumps(description, indent=2, sort_keys=True) + "\n")
    return description


# --- megatron side ------------------------------------------------------------------------------------
def read_split(mcore_dir: str | Path) -> tuple[dict, FamilialConfig, SplitLayout]:
    """The split description of a megatron checkpoint, its FamilialConfig and layout (validated)."""
    mcore_dir = Path(mcore_dir)
    path = mcore_dir / SPLIT_JSON
    if not path.is_file():
        raise ValueError(f"{mcore_dir}: no {SPLIT_JSON} (not written by convert_hf_to_mcore)")
    desc = json.loads(path.read_text())
    if desc.get("format") != FORMAT:
        raise ValueError(f"{path}: format {desc.get('format')!r}, expected {FORMAT!r}")
    cfg_dict = dict(desc["familial_config"])
    cfg = FamilialConfig.from_dict(cfg_dict)
    layout = check_split(cfg, desc["split"]["tp"], desc["split"]["pp"])
    return desc, cfg, layout


def load_rank_state_dict(
    mcore_dir: str | Path, tp_rank: int, pp_rank: int, verify: bool = True
) -> dict[str, torch.Tensor]:
    """The state dict of one (tp, pp) rank, checked against its recorded sha256 (`verify`), the plan's
    key set and the shard shapes."""
    from safetensors.torch import load_file

    mcore_dir = Path(mcore_dir)
    desc, cfg, layout = read_split(mcore_dir)
    if not (0 <= tp_rank < layout.tp and 0 <= pp_rank < layout.pp):
        raise ValueError(
            f"rank (tp={tp_rank}, pp={pp_rank}) is outside the split tp={layout.tp}, pp={layout.pp}"
        )
    rel = f"{shard_name(tp_rank, pp_rank)}/model.safetensors"
    path = mcore_dir / rel
    if not path.is_file():
        raise ValueError(f"{mcore_dir}: shard {rel} is missing")
    recorded = desc.get("shards", {}).get(rel, {}).get("sha256")
    if verify and recorded != sha256_file(path):
        raise ValueError(
            f"{path}: sha256 differs from {SPLIT_JSON} (a partial or foreign write; run "
            "finalize_split after saving every rank)"
        )
    sd = load_file(str(path))
    plan = [e for e in conversion_plan(cfg, layout) if e.stage == pp_rank]
    _check_keys(str(path), set(sd), {e.mc_key for e in plan})
    for e in plan:
        want = _shard_shape(e, cfg, layout.tp)
        if tuple(sd[e.mc_key].shape) != want:
            raise ValueError(
                f"{path}: tensor {e.mc_key} has shape {tuple(sd[e.mc_key].shape)}, the split says {want}"
            )
    return sd


def convert_mcore_to_hf(mcore_dir: str | Path, out_dir: str | Path) -> Path:
    """Joins the TP x PP shards written by `convert_hf_to_mcore` (or saved from a trained
    `FamilialGPTModel` with `save_rank_state_dict`) back into a familial HF checkpoint.

    Returns:
        `out_dir`, loadable with `FamilialForCausalLM.from_pretrained` (replaced atomically).
    """
    from huggingface_hub import save_torch_state_dict

    mcore_dir = Path(mcore_dir)
    desc, cfg, layout = read_split(mcore_dir)
    rank_sds = {
        (t, p): load_rank_state_dict(mcore_dir, t, p) for t in range(layout.tp) for p in range(layout.pp)
    }
    hf_sd: dict[str, torch.Tensor] = {}
    for entry in conversion_plan(cfg, layout):
        parts = _join(entry, [rank_sds[(t, entry.stage)][entry.mc_key] for t in range(layout.tp)], cfg)
        for key, tensor in zip(entry.hf_keys, parts):
            hf_sd[key] = tensor.contiguous()
    with atomic_dir(out_dir) as tmp:
        save_torch_state_dict(hf_sd, tmp, metadata={"format": "pt"})
        extra = mcore_dir / HF_FILES
        copied = set()
        if extra.is_dir():
            for path in sorted(extra.iterdir()):
                if path.is_file():
                    shutil.copy2(path, tmp / path.name)
                    copied.add(path.name)
        if "config.json" not in copied:
            cfg.save_pretrained(tmp)
    return Path(out_dir)


def save_rank_state_dict(
    state_dict: dict[str, torch.Tensor], mcore_dir: str | Path, tp_rank: int, pp_rank: int
) -> Path:
    """Writes one rank's `FamilialGPTModel.state_dict()` into an existing megatron checkpoint directory
    (e.g. after training), replacing that rank's shard; `_extra_state` entries are dropped. The split
    description is updated with the new sha256 by the caller through `finalize_split`."""
    from safetensors.torch import save_file

    mcore_dir = Path(mcore_dir)
    desc, cfg, layout = read_split(mcore_dir)
    plan = [e for e in conversion_plan(cfg, layout) if e.stage == pp_rank]
    sd = {k: v.detach().cpu().contiguous() for k, v in state_dict.items() if not k.endswith("._extra_state")}
    _check_keys(f"state dict of rank (tp={tp_rank}, pp={pp_rank})", set(sd), {e.mc_key for e in plan})
    rel = f"{shard_name(tp_rank, pp_rank)}/model.safetensors"
    path = mcore_dir / rel
    tmp = path.with_suffix(".tmp")
    save_file(sd, str(tmp), metadata={"format": "pt", "tp_rank": str(tp_rank), "pp_rank": str(pp_rank)})
    tmp.replace(path)
    return path


def finalize_split(mcore_dir: str | Path) -> dict:
    """Re-hashes every shard into megatron_split.json (after `save_rank_state_dict` on all ranks)."""
    mcore_dir = Path(mcore_dir)
    desc, _, _ = read_split(mcore_dir)
    for rel, info in desc["shards"].items():
        info["sha256"] = sha256_file(mcore_dir / rel)
    tmp = mcore_dir / (SPLIT_JSON + ".tmp")
    tmp.write_text(json.dumps(desc, indent=2, sort_keys=True) + "\n")
    tmp.replace(mcore_dir / SPLIT_JSON)
    return desc


__all__ = [
    "convert_hf_to_mcore",
    "convert_mcore_to_hf",
    "conversion_plan",
    "read_split",
    "load_rank_state_dict",
    "save_rank_state_dict",
    "finalize_split",
    "shard_name",
    "FORMAT",
    "SPLIT_JSON",
]
