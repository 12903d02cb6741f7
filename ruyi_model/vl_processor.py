"""The vision-language processor: a tokenizer plus a PIL image processor, built and loaded offline.

Stock `Qwen3VLProcessor` needs a video processor, which needs torchvision; this project reads images
only and has no torchvision. `Qwen3VLImageOnlyProcessor` is the stock processor without the video
part (same tokens, same `pixel_values` / `image_grid_thw` / `mm_token_type_ids`). Importing this
module registers it with `AutoProcessor` for Qwen3-VL configs, so an exported member's directory
loads with `AutoProcessor.from_pretrained(dir)` (without the registration transformers silently
returns the bare tokenizer).

    processor = build_vl_processor(tokenizer, model.config.vision_config, chat_template=template)
    batch = processor(text=[prompt], images=[pil_image], return_tensors="pt")
"""

from __future__ import annotations

from transformers import AutoProcessor, Qwen2VLImageProcessorPil, Qwen3VLConfig
from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

# The special tokens the stock processor and a Qwen3-VL config expect (token strings are fixed by the
# stock processor; their ids must equal the config's image/video/vision start/end token ids).
VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")


class Qwen3VLImageOnlyProcessor(Qwen3VLProcessor):
    """`Qwen3VLProcessor` for images only (no video processor, so no torchvision)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template)


def build_image_processor(
    vision_config, min_pixels: int | None = None, max_pixels: int | None = None, mean=None, std=None
) -> Qwen2VLImageProcessorPil:
    """A PIL image processor matching `vision_config` (patch, temporal patch and merge sizes).

    `min_pixels` / `max_pixels` bound the resized image's pixel count (default: 4 and 256 merge
    blocks); `mean` / `std` default to 0.5 per channel. Transformers' defaults are Qwen2-VL's (patch
    14, CLIP statistics), which would silently mismatch a tiny vision tower, so nothing is left to them.
    """
    block = vision_config.patch_size * vision_config.spatial_merge_size
    min_pixels = 4 * block * block if min_pixels is None else min_pixels
    max_pixels = 256 * block * block if max_pixels is None else max_pixels
    if not 0 < min_pixels <= max_pixels:
        raise ValueError(
            f"image pixel bounds must satisfy 0 < min_pixels <= max_pixels, got {min_pixels}, {max_pixels}"
        )
    return Qwen2VLImageProcessorPil(
        patch_size=vision_config.patch_size,
        temporal_patch_size=vision_config.temporal_patch_size,
        merge_size=vision_config.spatial_merge_size,
        image_mean=list(mean) if mean is not None else [0.5, 0.5, 0.5],
        image_std=list(std) if std is not None else [0.5, 0.5, 0.5],
        size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
    )


def build_vl_processor(tokenizer, model_config, chat_template: str | None = None, **image_kwargs):
    """The processor of a Qwen3-VL model (stock or familial) from its tokenizer and config.

    Raises:
        ValueError: if the tokenizer's vision token ids differ from the config's (the model would then
            look for image features at the wrong positions).
    """
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in VISION_TOKENS}
    want = {
        "<|vision_start|>": model_config.vision_start_token_id,
        "<|vision_end|>": model_config.vision_end_token_id,
        "<|image_pad|>": model_config.image_token_id,
        "<|video_pad|>": model_config.video_token_id,
    }
    bad = {t: (ids[t], want[t]) for t in VISION_TOKENS if ids[t] != want[t]}
    if bad:
        detail = ", ".join(f"{t}: tokenizer {a}, config {b}" for t, (a, b) in bad.items())
        raise ValueError(f"tokenizer and model config disagree on vision token ids ({detail})")
    image_processor = build_image_processor(model_config.vision_config, **image_kwargs)
    template = chat_template if chat_template is not None else getattr(tokenizer, "chat_template", None)
    return Qwen3VLImageOnlyProcessor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=template
    )


AutoProcessor.register(Qwen3VLConfig, Qwen3VLImageOnlyProcessor, exist_ok=True)

__all__ = ["Qwen3VLImageOnlyProcessor", "build_image_processor", "build_vl_processor", "VISION_TOKENS"]
