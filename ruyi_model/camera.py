"""The camera release's model side: the edge encoder (a Qwen3-VL vision tower and its image processor
turning uint8 clips into edge features, deepstack features included), the cloud's behaviour head
architecture, and the release directory (edge/ and cloud/ parts) the privacy stage writes and the
camera deployments load. Plain torch + transformers; the mapping itself is ruyi_model/privacy.py.

    encoder = EdgeEncoder(build_tiny_tower(seed), frames=3, size=32)
    x = encoder(frames)                                  # uint8 [N, T, S, S, 3] -> [N, D]
    save_camera_artifact(dir, encoder, mapping, head, hidden, behaviours, summary)
    encoder, mapping = load_edge(dir); head, contract, behaviours = load_cloud(dir)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ruyi_model.privacy import FeatureContract, PrivacyMapping


def mlp(d_in: int, d_out: int, hidden: int) -> nn.Module:
    """The two-hidden-layer GELU MLP of the cloud's behaviour head (and of the attackers)."""
    return nn.Sequential(
        nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, d_out)
    )


def tiny_vision_config(out_hidden: int = 64):
    """The tiny Qwen3-VL vision tower's config (patch 8, merge 2, temporal 2, 3 blocks, 64 wide, a
    deepstack feature after every block): the tower the stage trains when no family is given."""
    from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLVisionConfig

    return Qwen3VLVisionConfig(
        depth=3,
        hidden_size=64,
        num_heads=4,
        intermediate_size=128,
        patch_size=8,
        spatial_merge_size=2,
        temporal_patch_size=2,
        out_hidden_size=out_hidden,
        deepstack_visual_indexes=[0, 1, 2],
        num_position_embeddings=64,
    )


class EdgeEncoder(nn.Module):
    """The edge's vision tower and its image processor: uint8 clips `[N, T, H, W, 3]` -> edge features
    `[N, T * tokens * out_hidden * (1 + n_deepstack)]`: per frame the merged tokens and every deepstack
    feature (what a Qwen3-VL member consumes), concatenated and flattened per clip. Everything that
    leaves the edge goes through the mapping after this, deepstack features included."""

    def __init__(self, tower: nn.Module, frames: int, size: int) -> None:
        super().__init__()
        from ruyi_model.vl_processor import build_image_processor

        self.tower = tower
        self.frames, self.size = frames, size
        self.processor = build_image_processor(tower.config, min_pixels=size * size, max_pixels=size * size)

    def check_frames(self, frames) -> torch.Tensor:
        """`frames` as a uint8 tensor `[N, T, H, W, 3]` of this encoder's T and size, else ValueError."""
        t = torch.as_tensor(frames)
        want = [self.frames, self.size, self.size, 3]
        if t.dtype != torch.uint8 or t.dim() != 5 or list(t.shape[1:]) != want:
            raise ValueError(
                f"frames: expected uint8 [N, {', '.join(map(str, want))}], got {t.dtype} {list(t.shape)}"
            )
        return t

    def pixels(self, frames) -> tuple[torch.Tensor, torch.Tensor]:
        """The processor's `pixel_values` per clip `[N, T * patches, patch_dim]` and one frame's grid_thw."""
        from PIL import Image

        t = self.check_frames(frames).numpy()
        out, grid = [], None
        for i in range(0, len(t), 64):
            images = [Image.fromarray(f) for clip in t[i : i + 64] for f in clip]
            batch = self.processor(images=images, return_tensors="pt")
            out.append(batch["pixel_values"].reshape(len(t[i : i + 64]), -1, batch["pixel_values"].shape[-1]))
            grid = batch["image_grid_thw"][:1]
        return torch.cat(out), grid

    def features_from_pixels(self, pixel_values: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        n = pixel_values.shape[0]
        out = self.tower(
            pixel_values.reshape(-1, pixel_values.shape[-1]), grid_thw=grid.repeat(n * self.frames, 1)
        )
        parts = [out.pooler_output, *(out.deepstack_features or [])]
        return torch.cat([p.reshape(n, -1) for p in parts], dim=1)

    @torch.no_grad()
    def forward(self, frames) -> torch.Tensor:
        pv, grid = self.pixels(frames)
        self.tower.eval()
        return torch.cat([self.features_from_pixels(pv[i : i + 64], grid) for i in range(0, len(pv), 64)])

    @property
    def n_deepstack(self) -> int:
        return len(self.tower.config.deepstack_visual_indexes)


def build_tiny_tower(seed: int) -> nn.Module:
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel

    torch.manual_seed(seed)
    return Qwen3VLVisionModel(tiny_vision_config()).eval()


def save_camera_artifact(
    out_dir,
    encoder: EdgeEncoder,
    mapping: PrivacyMapping,
    head: nn.Module,
    hidden: int,
    behaviours: Sequence[str],
    summary: dict,
) -> None:
    """Writes the camera release into `out_dir` (an existing, empty directory: pass an atomic one):
    `edge/` (vision config + tower weights, mapping weights + shape), `cloud/` (behaviour head and the
    feature contract) and `manifest.json`. The cloud part holds nothing of the edge."""
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    out = Path(out_dir)
    (out / "edge").mkdir(parents=True)
    (out / "cloud").mkdir()
    (out / "edge" / "vision_config.json").write_text(encoder.tower.config.to_json_string())
    save_file(
        {k: v.contiguous() for k, v in encoder.tower.state_dict().items()}, out / "edge" / "tower.safetensors"
    )
    m = mapping
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, out / "edge" / "mapping.safetensors")
    mapping_cfg = {
        "in_dim": m.in_dim,
        "out_dim": m.out_dim,
        "hidden": hidden,
        "min_logvar": m.min_logvar,
        "max_logvar": m.max_logvar,
        "stochastic_release": m.stochastic_release,
        "frames": encoder.frames,
        "size": encoder.size,
    }
    (out / "edge" / "mapping.json").write_text(json.dumps(mapping_cfg, indent=2) + "\n")
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, out / "cloud" / "head.safetensors")
    head_cfg = {"in_dim": m.out_dim, "hidden": hidden, "behaviours": list(behaviours)}
    (out / "cloud" / "head.json").write_text(json.dumps(head_cfg, indent=2) + "\n")
    (out / "cloud" / "contract.json").write_text(json.dumps(m.contract.to_dict(), indent=2) + "\n")
    (out / "manifest.json").write_text(json.dumps({"format": "ruyi-camera/1", **summary}, indent=2) + "\n")


def load_edge(art_dir) -> tuple[EdgeEncoder, PrivacyMapping]:
    """The edge half of a camera release: its encoder and mapping (eval mode)."""
    import json
    from pathlib import Path

    from safetensors.torch import load_file
    from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLVisionConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel

    edge = Path(art_dir) / "edge"
    cfg = Qwen3VLVisionConfig(**json.loads((edge / "vision_config.json").read_text()))
    tower = Qwen3VLVisionModel(cfg)
    tower.load_state_dict(load_file(edge / "tower.safetensors"))
    mc = json.loads((edge / "mapping.json").read_text())
    mapping = PrivacyMapping(
        mc["in_dim"],
        mc["out_dim"],
        mc["hidden"],
        min_logvar=mc["min_logvar"],
        max_logvar=mc["max_logvar"],
        stochastic_release=mc["stochastic_release"],
    )
    mapping.load_state_dict(load_file(edge / "mapping.safetensors"))
    return EdgeEncoder(tower.eval(), mc["frames"], mc["size"]).eval(), mapping.eval()


def load_cloud(art_dir):
    """The cloud half of a camera release: (behaviour head, FeatureContract, behaviour names)."""
    import json
    from pathlib import Path

    from safetensors.torch import load_file

    cloud = Path(art_dir) / "cloud"
    hc = json.loads((cloud / "head.json").read_text())
    head = mlp(hc["in_dim"], len(hc["behaviours"]), hc["hidden"])
    head.load_state_dict(load_file(cloud / "head.safetensors"))
    contract = FeatureContract.from_dict(json.loads((cloud / "contract.json").read_text()))
    return head.eval(), contract, tuple(hc["behaviours"])
