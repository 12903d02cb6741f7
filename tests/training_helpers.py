"""A micro workspace for the training-stage tests (cpt, expand, sft): real files, real tokenizer.

`make_workspace(root)` writes what the stages read, following the data contract:
data/validated/{corpus_train,corpus_val,sft}.jsonl (general text = docstrings of standard-library
modules, math = `tasks.data.mathgen` problems, also added to the corpus as `source: "math"` documents,
as prepare_data does) and artifacts/tokenizer/ (a byte-level BPE trained here with
`ruyi_model.tokenizer.train_tokenizer`), plus a params file with a micro model (hidden 32, 4 layers,
members 2 and 4), seq_len 32 (sft: 128) and about ten steps per stage, so each stage runs in seconds.

`save_qwen_like_tokenizer(path, texts)` writes a stock-checkpoint-style tokenizer (transformers'
`Qwen2Tokenizer`: NFC normalizer, Qwen2 split, byte-level BPE, `<|endoftext|>`, `<|im_start|>`,
`<|im_end|>` added *after* the vocabulary, pad = eos, no `<|pad|>`), as the one shipped with a Qwen3
checkpoint, for the `model.init_from` tests.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import yaml

GENERAL_MODULES = [
    "json",
    "csv",
    "argparse",
    "pathlib",
    "collections",
    "functools",
    "textwrap",
    "logging",
    "random",
    "shutil",
    "string",
    "heapq",
    "bisect",
    "fractions",
    "decimal",
    "statistics",
    "tempfile",
    "zipfile",
    "difflib",
    "calendar",
]


def general_documents() -> list[str]:
    docs = []
    for name in GENERAL_MODULES:
        module = importlib.import_module(name)
        text = " ".join((module.__doc__ or "").split())
        for start in range(0, len(text), 600):
            piece = text[start : start + 600]
            if len(piece) > 120:
                docs.append(piece)
    return docs


def micro_params(root: Path) -> dict[str, Any]:
    train = dict(
        seq_len=32,
        batch_size=4,
        grad_accum=1,
        max_steps=12,
        lr=3e-3,
        min_lr_ratio=0.1,
        warmup_steps=2,
        weight_decay=0.01,
        grad_clip=1.0,
        checkpoint_every=4,
        eval_every=4,
        eval_batches=2,
    )
    return {
        "seed": 7,
        "paths": {
            "data_dir": str(root / "data"),
            "artifacts_dir": str(root / "artifacts"),
            "metrics_dir": str(root / "metrics"),
            "plots_dir": str(root / "plots"),
            "reports_dir": str(root / "reports"),
        },
        "model": {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 4,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 16,
            "max_position_embeddings": 128,
            "exit_layers": [2, 4],
            "loss_impl": "chunked",
        },
        "tokenizer": {"vocab_size": 400},
        "cpt": {**train, "exit_weights": {"kind": "cosine", "start": 1.0, "floor": 0.3}},
        "family_sft": {
            **train,
            "seq_len": 128,
            "max_steps": 8,
            "stage1_steps": 3,
            "stage1_examples": 40,
            "holdout_fraction": 0.1,
        },
        "expand": {**train, "num_blocks": 2, "init": "random", "replay_fraction": 0.25, "max_steps": 8},
        "sft": {**train, "scope": "dae", "max_steps": 10, "holdout_fraction": 0.1, "seq_len": 128},
    }


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def make_workspace(root: Path, num_problems: int = 80) -> Path:
    """Writes the micro workspace under `root`; returns the params file."""
    from ruyi_model.tokenizer import train_tokenizer
    from tasks.data.mathgen import generate_problems

    root.mkdir(parents=True, exist_ok=True)
    general = general_documents()
    problems = generate_problems(num_problems, [1, 2], seed=3)
    math_docs = [f"{p.question}\n{p.solution}" for p in problems]
    corpus = [{"id": f"g{i}", "text": t, "source": "docs"} for i, t in enumerate(general)]
    corpus += [{"id": f"m{i}", "text": t, "source": "math"} for i, t in enumerate(math_docs)]
    corpus.sort(key=lambda r: r["id"])
    val = [r for k, r in enumerate(corpus) if k % 8 == 0]
    train = [r for k, r in enumerate(corpus) if k % 8 != 0]
    data = root / "data" / "validated"
    write_jsonl(data / "corpus_train.jsonl", train)
    write_jsonl(data / "corpus_val.jsonl", val)
    write_jsonl(
        data / "sft.jsonl",
        [
            {
                "id": f"s{i}",
                "prompt": p.question,
                "response": p.solution,
                "answer": p.answer,
                "level": p.level,
            }
            for i, p in enumerate(problems)
        ],
    )
    params = micro_params(root)
    tokenizer = train_tokenizer(
        [r["text"] for r in train], vocab_size=params["tokenizer"]["vocab_size"], min_frequency=2
    )
    tokenizer.save_pretrained(root / "artifacts" / "tokenizer")
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def copy_workspace(params_path: Path, dest: Path, artifacts: tuple[str, ...] = ("tokenizer",), **overrides):
    """Copies the data and the named artifact directories of a workspace to `dest`; returns params
    (from the same file, with `overrides` as in `load`) whose paths point at `dest`."""
    import shutil

    src = params_path.parent
    shutil.copytree(src / "data", dest / "data")
    for name in artifacts:
        shutil.copytree(src / "artifacts" / name, dest / "artifacts" / name)
    return load(
        params_path,
        paths__data_dir=str(dest / "data"),
        paths__artifacts_dir=str(dest / "artifacts"),
        paths__metrics_dir=str(dest / "metrics"),
        paths__plots_dir=str(dest / "plots"),
        **overrides,
    )


def load(params_path: Path, **overrides):
    """`load_params` with dotted overrides given as keyword arguments (`cpt__max_steps=3`)."""
    from tasks.core.params import load_params

    return load_params(params_path, {k.replace("__", "."): v for k, v in overrides.items()})


def save_qwen_like_tokenizer(
    path: Path, texts: list[str], vocab_size: int = 330, chat_template: str | None = None
):
    """Trains a small BPE on `texts` and saves it at `path` as a Qwen2Tokenizer (see the module docstring).

    Returns the tokenizer (its ids: the BPE vocabulary, then <|endoftext|> <|im_start|> <|im_end|>).
    """
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    from ruyi_model.tokenizer import SPLIT_PATTERN

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    raw.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=2,
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    state = json.loads(raw.to_str())["model"]
    tokenizer = Qwen2Tokenizer(
        vocab=state["vocab"],
        merges=[tuple(m) for m in state["merges"]],
        extra_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(path)
    return tokenizer


def sft_like_rows(n: int = 12, seq_len: int = 12, seed: int = 1) -> dict:
    """Right-padded rows whose supervised spans (labels != -100) have very different lengths, as SFT
    examples do: row i has length 4 + i % 8 and a prompt of 1 + (i * 5) % 3 tokens."""
    import torch

    from tasks.training.batches import IGNORE_INDEX

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 64, (n, seq_len), generator=g)
    mask = torch.zeros(n, seq_len, dtype=torch.long)
    labels = torch.full((n, seq_len), IGNORE_INDEX)
    for i in range(n):
        length, prompt = 4 + i % 8, 1 + (i * 5) % 3
        mask[i, :length] = 1
        ids[i, length:] = 1  # pad
        labels[i, prompt:length] = ids[i, prompt:length]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
