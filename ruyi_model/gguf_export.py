"""A family member as a GGUF file (llama.cpp's format, arch "qwen3"), for llama.cpp-based runtimes.

    export_gguf("artifacts/export/exit_4", None, "exit_4.q8_0.gguf", dtype="q8_0")

The input is a stock Qwen3 member as `ruyi_model.export.export_exits` writes it (a Qwen3ForCausalLM
directory, or the loaded model), with its tokenizer (from the directory when `tokenizer` is None).
Written as llama.cpp's converter writes Qwen3: tensor names from gguf's own map (token_embd,
blk.N.attn_q/k/v/output, attn_q_norm/attn_k_norm, attn_norm, ffn_gate/up/down, ffn_norm,
output_norm, output), no Q/K permutation (llama.cpp permutes only llama-arch models), 1-D tensors
(norms) in F32; `qwen3.*` hyperparameters (context length, widths, head counts, key/value length,
rope freq base, rms eps); the byte-level BPE tokenizer (tokenizer.ggml.model "gpt2", pre "qwen2" or
"gpt-2" read off the tokenizer's pre-tokenizer, tokens padded with unused [PADi] entries up to the
model's vocab_size, token types, merges, bos/eos/pad/eot ids) and `tokenizer.chat_template`.

dtype: "f32", "f16", or "q8_0" (blocks of 32 int8 with an fp16 scale; a matrix whose rows are not a
multiple of 32 falls back to F16, as llama.cpp's converter does). Loads back with
`AutoModelForCausalLM.from_pretrained(dir, gguf_file=name)` and `AutoTokenizer.from_pretrained(dir,
gguf_file=name)`. Caveat: transformers' qwen3 GGUF reader ignores `qwen3.attention.key_length` and
uses Qwen3Config's default head_dim of 128 (that of every released Qwen3); a member with another
head_dim loads in llama.cpp but needs `config=` from the member directory in transformers.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer, Qwen3ForCausalLM

log = logging.getLogger(__name__)

DTYPES = ("f32", "f16", "q8_0")
#: transformers' Qwen3Config head_dim default, which its GGUF reader falls back on (see module docstring).
TRANSFORMERS_GGUF_HEAD_DIM = 128


def _gguf():
    try:
        import gguf
    except ImportError as e:  # pragma: no cover - gguf is a pinned dependency
        raise ImportError("export_gguf needs the `gguf` package") from e
    return gguf


def export_gguf(
    member_dir_or_model: str | Path | Qwen3ForCausalLM,
    tokenizer,
    out_path: str | Path,
    dtype: str = "f16",
    name: str | None = None,
) -> Path:
    """Writes one member as a GGUF file; returns `out_path`.

    Args:
        member_dir_or_model: a stock Qwen3ForCausalLM checkpoint directory (an `exit_<d>/` of an
            export) or the model itself.
        tokenizer: the member's tokenizer; None loads it from the member directory.
        out_path: the .gguf file to write (atomically: a temporary sibling renamed when complete).
        dtype: "f32", "f16" or "q8_0" (see module docstring).
        name: `general.name` (default: the directory name, or "ruyi-member").
    """
    gguf = _gguf()
    if dtype not in DTYPES:
        raise ValueError(f"export_gguf(dtype={dtype!r}): must be one of {DTYPES}")
    model, src_dir = _load_member(member_dir_or_model)
    if tokenizer is None:
        if src_dir is None:
            raise ValueError("export_gguf: pass the tokenizer when exporting an in-memory model")
        tokenizer = AutoTokenizer.from_pretrained(src_dir)
    cfg = model.config
    _check_supported(cfg)
    head_dim = cfg.head_dim or cfg.hidden_size // cfg.num_attention_heads
    if head_dim != TRANSFORMERS_GGUF_HEAD_DIM:
        log.warning(
            "head_dim=%d: llama.cpp reads it from qwen3.attention.key_length, but transformers' GGUF "
            "reader assumes %d (load with config= from the member directory there)",
            head_dim,
            TRANSFORMERS_GGUF_HEAD_DIM,
        )
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    name = name or (src_dir.name if src_dir is not None else "ruyi-member")

    fd, tmp = tempfile.mkstemp(prefix=f".{out_path.name}.", suffix=".tmp", dir=out_path.parent)
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.QWEN3])
        writer.add_name(name)
        writer.add_file_type(
            {
                "f32": gguf.LlamaFileType.ALL_F32,
                "f16": gguf.LlamaFileType.MOSTLY_F16,
                "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
            }[dtype]
        )
        if dtype == "q8_0":
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_context_length(cfg.max_position_embeddings)
        writer.add_embedding_length(cfg.hidden_size)
        writer.add_block_count(cfg.num_hidden_layers)
        writer.add_feed_forward_length(cfg.intermediate_size)
        writer.add_head_count(cfg.num_attention_heads)
        writer.add_head_count_kv(cfg.num_key_value_heads)
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_rope_dimension_count(head_dim)
        writer.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
        writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
        _add_tokenizer(writer, gguf, tokenizer, cfg.vocab_size)
        _add_tensors(writer, gguf, model, dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out_path


def _load_member(member) -> tuple[Qwen3ForCausalLM, Path | None]:
    if isinstance(member, Qwen3ForCausalLM):
        return member, None
    if isinstance(member, (str, Path)):
        path = Path(member)
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise FileNotFoundError(f"{path} is not a model directory (no config.json)")
        model_type = json.loads(cfg_file.read_text()).get("model_type")
        if model_type != "qwen3":
            raise ValueError(
                f"{cfg_file}: model_type {model_type!r}; export_gguf takes a stock Qwen3 member "
                "(an exit_<d>/ directory written by export_exits), not the family checkpoint"
            )
        return Qwen3ForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), path
    raise TypeError(f"export_gguf expects a Qwen3ForCausalLM or its directory, got {type(member).__name__}")


def _check_supported(cfg) -> None:
    rope = cfg.rope_parameters or {}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"export_gguf supports default RoPE only; this member has rope_parameters={rope}")
    if getattr(cfg, "use_sliding_window", False):
        raise ValueError("export_gguf does not support sliding-window attention (use_sliding_window=True)")
    if getattr(cfg, "attention_bias", False):
        raise ValueError("export_gguf: Qwen3 GGUF has no attention biases (attention_bias=True)")


# --- tokenizer -----------------------------------------------------------------------------------
def _pre_tokenizer_name(state: dict) -> str:
    """llama.cpp's `tokenizer.ggml.pre` for this tokenizer's pre-tokenizer ("qwen2" or "gpt-2")."""
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX as QWEN2_SPLIT

    pre = state.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    if pre.get("type") == "Sequence":
        parts = pre.get("pretokenizers", [])
        if (
            len(parts) == 2
            and parts[0].get("type") == "Split"
            and parts[0].get("pattern", {}).get("Regex") == QWEN2_SPLIT
            and parts[1].get("type") == "ByteLevel"
            and not parts[1].get("use_regex", True)
        ):
            return "qwen2"
    raise ValueError(
        f"export_gguf: unsupported pre-tokenizer {json.dumps(pre)[:300]} "
        "(supported: Qwen2's split regex + byte-level, or GPT-2 byte-level)"
    )


def _add_tokenizer(writer, gguf, tokenizer, vocab_size: int) -> None:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise TypeError(
            f"export_gguf needs a fast (tokenizers-backed) tokenizer, got {type(tokenizer).__name__}"
        )
    state = json.loads(backend.to_str())
    model = state.get("model") or {}
    if model.get("type") != "BPE" or (state.get("decoder") or {}).get("type") != "ByteLevel":
        raise ValueError("export_gguf supports byte-level BPE tokenizers only (tokenizer.ggml.model 'gpt2')")
    if state.get("normalizer") is not None:
        raise ValueError(
            f"export_gguf: the tokenizer has a normalizer ({state['normalizer'].get('type')}), "
            "which GGUF's gpt2 tokenizer cannot express"
        )
    pre = _pre_tokenizer_name(state)
    vocab = backend.get_vocab(with_added_tokens=True)
    if len(vocab) > vocab_size or max(vocab.values()) >= vocab_size:
        raise ValueError(
            f"the tokenizer has {len(vocab)} tokens (max id {max(vocab.values())}) but the "
            f"model's vocab_size is {vocab_size}"
        )
    by_id = {i: t for t, i in vocab.items()}
    added = {i: tok for i, tok in tokenizer.added_tokens_decoder.items()}
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:  # rows of the embedding no token uses (llama.cpp's converter does the same)
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for role, add in (
        ("bos_token_id", writer.add_bos_token_id),
        ("eos_token_id", writer.add_eos_token_id),
        ("pad_token_id", writer.add_pad_token_id),
    ):
        token_id = getattr(tokenizer, role, None)
        if token_id is not None:
            add(int(token_id))
    im_end = vocab.get("<|im_end|>")
    if im_end is not None:  # end of a chat turn: llama.cpp stops generation on it
        writer.add_eot_token_id(int(im_end))
    writer.add_add_bos_token(False)
    template = getattr(tokenizer, "chat_template", None)
    if template:
        writer.add_chat_template(template)


# --- tensors -------------------------------------------------------------------------------------
def _add_tensors(writer, gguf, model: Qwen3ForCausalLM, dtype: str) -> None:
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN3, model.config.num_hidden_layers)
    state = model.state_dict()
    if "lm_head.weight" not in state or model.config.tie_word_embeddings:
        # llama.cpp reuses token_embd when `output` is absent; keep the file explicit either way.
        state["lm_head.weight"] = model.get_output_embeddings().weight
    for hf_name, tensor in state.items():
        base, _, suffix = hf_name.rpartition(".")
        gguf_base = name_map.get_name(base)
        if gguf_base is None or suffix != "weight":
            raise ValueError(f"export_gguf: no GGUF name for tensor {hf_name!r} (not a stock Qwen3 tensor)")
        data = tensor.detach().to(torch.float32).cpu().numpy()
        gguf_name = f"{gguf_base}.weight"
        if data.ndim == 1 or dtype == "f32":
            writer.add_tensor(gguf_name, data.astype(np.float32))
        elif dtype == "f16":
            writer.add_tensor(gguf_name, data.astype(np.float16))
        else:
            try:
                q = gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0)
            except gguf.quants.QuantError:
                log.info("%s %s: rows not a multiple of 32, kept in F16", gguf_name, data.shape)
                writer.add_tensor(gguf_name, data.astype(np.float16))
            else:
                writer.add_tensor(gguf_name, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)


__all__ = ["export_gguf", "DTYPES"]
