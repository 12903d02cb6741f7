"""ruyi_model: the familial (early-exit, shared-backbone) Qwen3 model of Ruyi2, Hugging Face compatible.

Public API:
    FamilialConfig, FamilialForCausalLM     the config and the model (registered with the Auto classes)
    FamilialVLConfig, FamilialVLForConditionalGeneration
                                            the vision-language family (Ruyi2.5) on Qwen3-VL
    Qwen3VLImageOnlyProcessor, build_vl_processor
                                            its processor (images, no torchvision); importing ruyi_model.vl
                                            registers the family and this processor with the Auto classes
    expand, dae_trainable_parameters        DaE expansion (zero-residual blocks on one member)
    decompose                               DaE decomposition (activation-aware SVD of the added blocks):
                                            a DecomposeResult (model, report)
    export_exits                            each member as a stock Qwen3ForCausalLM (or, for the
                                            vision-language family, Qwen3VLForConditionalGeneration)
    member_to_familial                      one member alone, low-rank factors kept (what is served)
    dynamic_generate                        confidence-based dynamic early exit (decoding)
    speculative_generate                    self-speculative decoding (a shallow member drafts)
    export_gguf                             a member as a GGUF file (llama.cpp, transformers)
    train_tokenizer, load_tokenizer         byte-level BPE tokenizer with a chat template

This package never imports the pipeline, Prefect, DVC or Ray. Choices: docs/choices.md#model.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from ruyi_model.config import FamilialConfig
from ruyi_model.dae import (
    DecomposeReport,
    DecomposeResult,
    dae_trainable_parameters,
    decompose,
    expand,
    freeze_for_dae,
)
from ruyi_model.export import export_exits, member_to_familial, member_to_qwen3, verify_export
from ruyi_model.generation import DynamicGenerationOutput, dynamic_generate
from ruyi_model.modeling import FamilialCausalLMOutput, FamilialForCausalLM, LowRankLinear
from ruyi_model.tokenizer import load_tokenizer, train_tokenizer

AutoConfig.register(FamilialConfig.model_type, FamilialConfig, exist_ok=True)
AutoModelForCausalLM.register(FamilialConfig, FamilialForCausalLM, exist_ok=True)

# Optional features, imported on first use: the pipeline's stages do not need them, so they stay out of the
# stages' code dependencies (tasks.core.codedeps follows static imports) and out of `import ruyi_model`.
# The vision-language family likewise: the text pipeline does not run it, and importing ruyi_model.vl
# (done by the first access to one of its names) registers it with the Auto classes.
_LAZY = {
    "speculative_generate": "ruyi_model.speculative",
    "export_gguf": "ruyi_model.gguf_export",
    "FamilialVLConfig": "ruyi_model.vl",
    "FamilialVLForConditionalGeneration": "ruyi_model.vl",
    "member_to_qwen3_vl": "ruyi_model.vl",
    "Qwen3VLImageOnlyProcessor": "ruyi_model.vl_processor",
    "build_vl_processor": "ruyi_model.vl_processor",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ruyi_model' has no attribute {name!r}")


__all__ = [
    "FamilialConfig",
    "FamilialForCausalLM",
    "FamilialCausalLMOutput",
    "FamilialVLConfig",
    "FamilialVLForConditionalGeneration",
    "member_to_qwen3_vl",
    "Qwen3VLImageOnlyProcessor",
    "build_vl_processor",
    "LowRankLinear",
    "expand",
    "dae_trainable_parameters",
    "freeze_for_dae",
    "decompose",
    "DecomposeReport",
    "DecomposeResult",
    "export_exits",
    "verify_export",
    "member_to_qwen3",
    "member_to_familial",
    "train_tokenizer",
    "load_tokenizer",
    "dynamic_generate",
    "DynamicGenerationOutput",
    "speculative_generate",
    "export_gguf",
]
