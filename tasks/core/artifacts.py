"""Saving and loading a family directory (model + tokenizer) with the tokenizer-fingerprint checks.

Library module. `save_family` writes a model and its tokenizer atomically and records the tokenizer's
fingerprint in the model config; `load_family` loads both and refuses a tokenizer that does not match
the model (size or fingerprint), naming the directory. Why: docs/choices.md#tokenizer-design.
"""

from __future__ import annotations

import logging
from pathlib import Path

from tasks.core.files import LOAD_ERRORS, atomic_dir, require_dir
from tasks.core.stage import StageError

log = logging.getLogger("ruyi")


def load_family(path: str | Path, dtype: str = "float32"):
    """Loads `(model, tokenizer)` from a stage directory; errors name the directory and the problem.

    Checks: the pipeline's special tokens (`ruyi_model.tokenizer.check_special_tokens`), the model's
    vocabulary covers the tokenizer, and the tokenizer's fingerprint is the one recorded in the model
    config by `save_family` (`check_tokenizer_matches`; a model without one loads with a warning).
    """
    import torch
    from transformers import AutoTokenizer

    from ruyi_model import FamilialForCausalLM

    path = require_dir(path, "model checkpoint", marker="config.json")
    if not any((path / f).exists() for f in ("model.safetensors", "model.safetensors.index.json")):
        raise StageError(f"model checkpoint at {path} has no model.safetensors")
    try:
        model = FamilialForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), local_files_only=True)
    except LOAD_ERRORS as e:
        raise StageError(f"cannot load the model at {path}: {e}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (ValueError, OSError) as e:
        raise StageError(f"cannot load the tokenizer at {path}: {e}") from None
    from ruyi_model.tokenizer import check_special_tokens

    try:  # the pipeline's special tokens first: a more specific error than a fingerprint mismatch
        check_special_tokens(tokenizer, path)
    except ValueError as e:
        raise StageError(str(e)) from None
    check_tokenizer_matches(model, tokenizer, path)
    return model, tokenizer


#: The model config attribute that records the fingerprint of the tokenizer a model was trained with
#: (`ruyi_model.tokenizer.tokenizer_fingerprint`). It is written to config.json by `save_family` and
#: survives `load_family` (and the familial checkpoint of the export, which is a `save_pretrained`).
TOKENIZER_FINGERPRINT_KEY = "tokenizer_fingerprint"


def tokenizer_fingerprint(tokenizer) -> str:
    """`ruyi_model.tokenizer.tokenizer_fingerprint` (imported lazily, see atomic_dir)."""
    from ruyi_model.tokenizer import tokenizer_fingerprint as _fingerprint

    return _fingerprint(tokenizer)


def check_tokenizer_size(model, tokenizer, where: str | Path) -> None:
    """The model's vocabulary must cover every token id of the tokenizer."""
    if len(tokenizer) > model.config.vocab_size:
        raise StageError(
            f"{where}: tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
            f"{model.config.vocab_size} (tokenizer/model mismatch)"
        )


def check_tokenizer_matches(model, tokenizer, where: str | Path) -> None:
    """The tokenizer is the one the model was trained with: its size fits and its fingerprint equals the
    one recorded in the model config. A model without a recorded fingerprint (made before they were
    recorded) is accepted with a warning, checked by size only."""
    check_tokenizer_size(model, tokenizer, where)
    recorded = getattr(model.config, TOKENIZER_FINGERPRINT_KEY, None)
    if not recorded:
        log.warning(
            "%s: the model records no tokenizer fingerprint (an artifact from before fingerprints were "
            "recorded): only the vocabulary size is checked; rerun the stage that made it to record one",
            where,
        )
        return
    actual = tokenizer_fingerprint(tokenizer)
    if actual != recorded:
        raise StageError(
            f"{where}: the tokenizer is not the one the model was trained with (tokenizer/model "
            f"mismatch): the model's config records tokenizer fingerprint {recorded}, the tokenizer "
            f"files there have fingerprint {actual}"
        )


def save_family(model, tokenizer, path: str | Path) -> Path:
    """Writes model + tokenizer atomically to `path` (replacing any previous version), recording the
    tokenizer's fingerprint in the model config (`TOKENIZER_FINGERPRINT_KEY`), which `load_family`
    checks. A model that recorded another tokenizer's fingerprint gets the new one, with a warning
    (deliberate vocabulary changes happen; the stages save the tokenizer they loaded the model with).
    """
    fingerprint = tokenizer_fingerprint(tokenizer)
    recorded = getattr(model.config, TOKENIZER_FINGERPRINT_KEY, None)
    if recorded and recorded != fingerprint:
        log.warning(
            "%s: the model was trained with tokenizer fingerprint %s and is saved with a tokenizer of "
            "fingerprint %s (recorded from now on)",
            path,
            recorded,
            fingerprint,
        )
    setattr(model.config, TOKENIZER_FINGERPRINT_KEY, fingerprint)
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return Path(path)
