"""A tiny random Qwen3-VL built offline: the oracle of the vision-language family's tests.

`tiny_qwen3_vl_config()` is a 4-text-layer, 3-vision-block Qwen3-VL (hidden 64, patch 8, merge 2,
deepstack on vision blocks 0, 1, 2); `tiny_vl_processor()` is a byte-level BPE with the Qwen3-VL
vision tokens plus the image-only PIL processor, trained on a few lines (nothing is downloaded);
`tiny_images()` are small deterministic RGB images of different sizes.
"""

from __future__ import annotations

import functools

import numpy as np

VISION_SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif part['type'] == 'text' %}{{ part['text'] }}"
    "{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_TEXTS = [
    "describe the image. a red square left of a blue circle.",
    "how many triangles are there? there are 3 triangles.",
    "what colour is the bar for march? the bar is green, value 12.",
] * 4


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=VISION_SPECIALS,
        show_progress=False,
    )
    tk.train_from_iterator(_TEXTS, trainer)
    return tk.to_str()


def tiny_tokenizer():
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def token_ids() -> dict[str, int]:
    tok = tiny_tokenizer()
    return {t: tok.convert_tokens_to_ids(t) for t in VISION_SPECIALS}


def tiny_qwen3_vl_config(text_layers: int = 4, deepstack=(0, 1, 2), **text_overrides):
    from transformers import Qwen3VLConfig

    ids = token_ids()
    text = dict(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=text_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        pad_token_id=ids["<|endoftext|>"],
    )
    text.update(text_overrides)
    vision = dict(
        depth=3,
        hidden_size=64,
        intermediate_size=96,
        num_heads=4,
        patch_size=8,
        spatial_merge_size=2,
        temporal_patch_size=2,
        out_hidden_size=text["hidden_size"],
        num_position_embeddings=64,
        deepstack_visual_indexes=list(deepstack),
    )
    cfg = Qwen3VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    cfg._attn_implementation = "eager"
    return cfg


def tiny_qwen3_vl(seed: int = 0, **kw):
    """A stock Qwen3VLForConditionalGeneration with random weights (seeded), eval mode, fp32."""
    import torch
    from transformers import Qwen3VLForConditionalGeneration

    torch.manual_seed(seed)
    return Qwen3VLForConditionalGeneration(tiny_qwen3_vl_config(**kw)).eval()


def tiny_vl_processor(model_config=None):
    from ruyi_model.vl_processor import build_vl_processor

    return build_vl_processor(tiny_tokenizer(), model_config or tiny_qwen3_vl_config(), CHAT_TEMPLATE)


def tiny_images(sizes=((64, 48), (32, 32))):
    """Deterministic RGB PIL images of the given (width, height)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB") for w, h in sizes]


def image_batch(processor, prompts=("describe the image.", "how many triangles are there?"), sizes=None):
    """A left-padded batch, one image per prompt, through the processor's chat template."""
    images = tiny_images(sizes) if sizes else tiny_images()
    texts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p}]}],
            add_generation_prompt=True,
            tokenize=False,
        )
        for p in prompts
    ]
    processor.tokenizer.padding_side = "left"
    return processor(text=texts, images=images[: len(texts)], padding=True, return_tensors="pt")
