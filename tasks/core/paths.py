"""Where the workspace keeps each stage's inputs and outputs, derived from `params.paths`.

Library module: `stage_dir`, `checkpoint_dir`, `plots_dir`, `validated_path`, `tokenizer_dir`, ... so no
stage spells a path of another stage's outputs by hand.
"""

from __future__ import annotations

import logging
from pathlib import Path

from tasks.core.params import Params

log = logging.getLogger("ruyi")




log = logging.getLogger("ruyi.evaluate")




# --- model artifacts -------------------------------------------------------------------------
# Every model-producing stage writes `artifacts/<stage>/`: a FamilialForCausalLM `save_pretrained`
# directory plus the tokenizer files, so each directory is self-contained and loads offline with
# `load_family` (or transformers' Auto classes after `import ruyi_model`).


def stage_dir(params: Params, stage: str) -> Path:
    return Path(params.paths.artifacts_dir) / stage


def checkpoint_dir(params: Params, stage: str) -> Path:
    """Resumable checkpoints of a stage (DVC: persist: true, cache: false)."""
    return Path(params.paths.artifacts_dir) / "checkpoints" / stage


def plots_dir(params: Params, stage: str) -> Path:
    path = Path(params.paths.plots_dir) / stage
    path.mkdir(parents=True, exist_ok=True)
    return path




# --- data helpers (also used by tasks.compress) -------------------------------------------------
def validated_path(params: Params, name: str) -> Path:
    """A file of the validated data set (`<data_dir>/validated/<name>`)."""
    return Path(params.paths.data_dir) / "validated" / name




def validated_dir(params: Params) -> Path:
    return Path(params.paths.data_dir) / "validated"


def tokenizer_dir(params: Params) -> Path:
    return Path(params.paths.artifacts_dir) / "tokenizer"


def corpus_inputs(params: Params) -> tuple[Path, Path]:
    data = validated_dir(params)
    return data / "corpus_train.jsonl", data / "corpus_val.jsonl"
