"""The camera release's model side: the edge encoder (a Qwen3-VL vision tower and its image processor
turning uint8 clips into edge features, deepstack features included), the cloud's behaviour head
architecture, and the release directory (edge/ and cloud/ parts) the privacy stage writes and the
camera deployments load. Plain torch + transformers; the mapping itself is ruyi_model/privacy.py.

    encoder = EdgeEncoder(build_tiny_tower(seed), frames=3, size=32)
    x = encoder(frames)                                  # uint8 [N, T, S, S, 3] -> [N, D]
    save_camera_artifact(dir, encoder, mapping, head, hidden, behaviours, summary)
    encoder, mapping = load_edge(dir); head, contract, behaviours = load_cloud(dir)
    member = load_cloud_member(f"{dir}/cloud")           # the deep member (None if the release has none)
    member.answer(z, ["Did anyone fall?"])               # released z [N, k] -> text answers
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
        """`frames` as a uint8 tensor `[N, T, H, W, 3]` (N >= 1) of this encoder's T and size, else
        ValueError."""
        t = torch.as_tensor(frames)
        want = [self.frames, self.size, self.size, 3]
        if t.dtype != torch.uint8 or t.dim() != 5 or list(t.shape[1:]) != want or t.shape[0] < 1:
            raise ValueError(
                f"frames: expected uint8 [N >= 1, {', '.join(map(str, want))}], got {t.dtype} {list(t.shape)}"
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
    cloud_member: CloudMember | None = None,
) -> None:
    """Writes the camera release into `out_dir` (an existing, empty directory: pass an atomic one):
    `edge/` (vision config + tower weights, mapping weights + shape), `cloud/` (behaviour head, the
    feature contract and, when given, the deep member: `CloudMember.save`) and `manifest.json`. The
    cloud part holds nothing of the edge."""
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
    if cloud_member is not None:
        cloud_member.save(out / "cloud", summary.get("cloud_exit_layer", -1), str(summary.get("cloud", "")))
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


class CloudMember(nn.Module):
    """The cloud's deep member: a stock Qwen3-VL *text* model (a family member's layers, norm and head;
    no vision tower, nothing of the edge) that reads the edge's released features as soft tokens and
    answers questions in text.

    A linear projector turns a released vector `z` `[N, k]` (standardised by the fixed `shift`/`scale`
    buffers) into `n_tokens` embeddings of the member's width, which take the place of the
    `<|image_pad|>` tokens of the member's own image prompt
    (`<|vision_start|><|image_pad|>...<|vision_end|>question`, chat template): the member reads the
    features where it reads an image, with text positions (no deepstack injection: the deepstack
    features were mapped into `z` on the edge with the merged tokens). Answers are greedy, up to
    `max_new_tokens`, ending at `<|im_end|>`.
    """

    def __init__(
        self, text_model: nn.Module, lm_head: nn.Module, tokenizer, in_dim: int, n_tokens: int
    ) -> None:
        super().__init__()
        self.text_model, self.lm_head, self.tokenizer = text_model, lm_head, tokenizer
        self.in_dim, self.n_tokens = in_dim, n_tokens
        hidden = text_model.config.hidden_size
        self.projector = nn.Linear(in_dim, n_tokens * hidden)
        nn.init.normal_(self.projector.weight, std=0.02 / max(in_dim, 1) ** 0.5)
        nn.init.zeros_(self.projector.bias)
        self.register_buffer("shift", torch.zeros(in_dim))
        self.register_buffer("scale", torch.ones(in_dim))
        vocab = tokenizer.get_vocab()
        missing = [
            t for t in ("<|image_pad|>", "<|vision_start|>", "<|vision_end|>", "<|im_end|>") if t not in vocab
        ]
        if missing:
            raise ValueError(
                f"cloud member tokenizer lacks {missing}: not a vision-language family's tokenizer"
            )
        self.image_token_id, self.end_id = vocab["<|image_pad|>"], vocab["<|im_end|>"]
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.end_id

    @classmethod
    def from_family(cls, family, exit_layer: int, tokenizer, in_dim: int, n_tokens: int) -> CloudMember:
        """A copy of member `exit_layer` of a `FamilialVLForConditionalGeneration` (its stock Qwen3-VL
        text model and head; the family is left unchanged) with a fresh projector."""
        import copy

        from ruyi_model.vl import member_to_qwen3_vl

        member = member_to_qwen3_vl(family, exit_layer)
        return cls(
            copy.deepcopy(member.model.language_model),
            copy.deepcopy(member.lm_head),
            tokenizer,
            in_dim,
            n_tokens,
        ).float()

    def fit_standardiser(self, features: torch.Tensor) -> None:
        """Sets `shift`/`scale` to the per-feature mean and std of `features` (floored at 1e-6)."""
        self.shift.copy_(features.mean(0))
        self.scale.copy_(features.std(0).clamp_min(1e-6))

    def prompt(self, question: str) -> str:
        pads = "<|image_pad|>" * self.n_tokens
        user = f"<|vision_start|>{pads}<|vision_end|>{question}"
        return f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"

    def encode(self, questions: Sequence[str], answers: Sequence[str] | None = None):
        """Left-padded `(input_ids, attention_mask, labels)`; labels are -100 except on the answer and
        its `<|im_end|>` (None without answers)."""
        rows, labels = [], []
        for i, q in enumerate(questions):
            ids = self.tokenizer(self.prompt(q), add_special_tokens=False)["input_ids"]
            lab = [-100] * len(ids)
            if answers is not None:
                a = self.tokenizer(answers[i], add_special_tokens=False)["input_ids"] + [self.end_id]
                ids, lab = ids + a, lab + a
            rows.append(ids)
            labels.append(lab)
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        lab = torch.full((len(rows), width), -100, dtype=torch.long)
        for i, (r, la) in enumerate(zip(rows, labels, strict=True)):
            ids[i, width - len(r) :] = torch.tensor(r)
            mask[i, width - len(r) :] = 1
            lab[i, width - len(r) :] = torch.tensor(la)
        return ids, mask, (lab if answers is not None else None)

    def forward(self, z: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Logits `[B, L, V]` of the member on prompts whose image pads read `z` (one row of z per row)."""
        emb = self.text_model.embed_tokens(input_ids)
        soft = self.projector((z.to(emb.dtype) - self.shift) / self.scale).view(len(z), self.n_tokens, -1)
        slots = input_ids == self.image_token_id
        if not bool((slots.sum(1) == self.n_tokens).all()):
            raise ValueError(f"every prompt must hold exactly {self.n_tokens} <|image_pad|> tokens")
        emb = emb.masked_scatter(slots[..., None], soft)
        positions = (attention_mask.cumsum(1) - 1).clamp_min(0)
        out = self.text_model(inputs_embeds=emb, attention_mask=attention_mask, position_ids=positions)
        return self.lm_head(out.last_hidden_state)

    @torch.no_grad()
    def answer(self, z: torch.Tensor, questions: Sequence[str], max_new_tokens: int = 4) -> list[str]:
        """Greedy answers, one per (row of `z`, question) pair."""
        ids, mask, _ = self.encode(questions)
        done = torch.zeros(len(ids), dtype=torch.bool)
        out: list[list[int]] = [[] for _ in range(len(ids))]
        for _ in range(max_new_tokens):
            nxt = self(z, ids, mask)[:, -1].argmax(-1)
            for i, t in enumerate(nxt.tolist()):
                if not done[i]:
                    if t == self.end_id:
                        done[i] = True
                    else:
                        out[i].append(t)
            if bool(done.all()):
                break
            ids = torch.cat([ids, nxt[:, None]], 1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        return [self.tokenizer.decode(o, skip_special_tokens=True).strip() for o in out]

    def save(self, out_dir, exit_layer: int, source: str) -> None:
        """`member/` (text config, weights, tokenizer), `projector.safetensors` and `member.json`."""
        import json
        from pathlib import Path

        from safetensors.torch import save_file

        out = Path(out_dir)
        (out / "member").mkdir(parents=True)
        (out / "member" / "text_config.json").write_text(self.text_model.config.to_json_string())
        weights = {f"model.{k}": v for k, v in self.text_model.state_dict().items()}
        weights.update({f"lm_head.{k}": v for k, v in self.lm_head.state_dict().items()})
        save_file({k: v.contiguous() for k, v in weights.items()}, out / "member" / "model.safetensors")
        self.tokenizer.save_pretrained(out / "member")
        save_file(
            {
                k: v.contiguous()
                for k, v in {**self.projector.state_dict(), "shift": self.shift, "scale": self.scale}.items()
            },
            out / "projector.safetensors",
        )
        meta = {"in_dim": self.in_dim, "n_tokens": self.n_tokens, "exit_layer": exit_layer, "source": source}
        (out / "member.json").write_text(json.dumps(meta, indent=2) + "\n")


def load_cloud_member(cloud_dir) -> CloudMember | None:
    """The cloud member saved by `CloudMember.save` in `cloud_dir` (None when the release has none)."""
    import json
    from pathlib import Path

    from safetensors.torch import load_file
    from transformers import AutoTokenizer
    from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLTextConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextModel

    cloud = Path(cloud_dir)
    if not (cloud / "member.json").is_file():
        return None
    meta = json.loads((cloud / "member.json").read_text())
    cfg = Qwen3VLTextConfig(**json.loads((cloud / "member" / "text_config.json").read_text()))
    text_model = Qwen3VLTextModel(cfg)
    lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
    weights = load_file(cloud / "member" / "model.safetensors")
    text_model.load_state_dict({k[6:]: v for k, v in weights.items() if k.startswith("model.")})
    lm_head.load_state_dict({k[8:]: v for k, v in weights.items() if k.startswith("lm_head.")})
    tokenizer = AutoTokenizer.from_pretrained(cloud / "member")
    member = CloudMember(text_model, lm_head, tokenizer, meta["in_dim"], meta["n_tokens"])
    projector = load_file(cloud / "projector.safetensors")
    member.shift.copy_(projector.pop("shift"))
    member.scale.copy_(projector.pop("scale"))
    member.projector.load_state_dict(projector)
    return member.eval()
