"""Tiny exports in the layout the export stage writes, for the store, serving and deploy tests.

`build_tiny_export(dir)` makes a 4-layer stock Qwen3 (random weights, seeded), turns it into a family
with exits 2 and 4 (`FamilialForCausalLM.from_qwen3`, Ruyi2's recipe) and writes it with the real
`ruyi_model.export.export_exits`: `exit_2/`, `exit_4/` (stock Qwen3ForCausalLM checkpoints with the
tokenizer), `family/` and `manifest.json`. With `dae_blocks=n` the shallowest member is DaE-expanded by
n blocks and decomposed (`ruyi_model.dae.expand` + `decompose`, as the expand/compress stages do), so
the export also holds its factored copy `exit_2_factored/`. The tokenizer is a byte-level BPE trained
on a few lines, with the project's special tokens and Qwen-style chat template, so chat prompts work
end to end. `add_router(dir, ...)` adds the route stage's `router.json` (the `auto` tier's router).
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_TEXTS = [
    "Tom has 3 apples and buys 4 more. How many apples does he have now?",
    "He has 3 + 4 = 7 apples.\n#### 7",
    "A train travels 60 miles in 2 hours. What is its speed in miles per hour?",
    "The speed is 60 / 2 = 30 miles per hour.\n#### 30",
    "The quick brown fox jumps over the lazy dog. Python is a programming language.",
] * 4


def tiny_tokenizer():
    """A byte-level BPE (~300 tokens) with the special tokens and chat template of the project."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        min_frequency=1,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_TEXTS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>", bos_token=None, unk_token=None
    )
    fast.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_family(tokenizer, seed: int = 0, exit_layers=(2, 4), dae_blocks: int = 0):
    """`(family, source_qwen3)`: a random stock Qwen3 of 4 layers and the family made from it (its
    shallowest member DaE-expanded by `dae_blocks` blocks with random weights, then decomposed)."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from ruyi_model import FamilialForCausalLM

    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=max(exit_layers),
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    source = Qwen3ForCausalLM(config).eval()
    family = FamilialForCausalLM.from_qwen3(source, exit_layers=list(exit_layers)).eval()
    if dae_blocks:
        from ruyi_model.dae import BLOCK_LINEARS, decompose, expand

        d = min(exit_layers)
        family = expand(family, d, dae_blocks)
        with torch.no_grad():  # fresh DaE blocks are the identity: give them a function to keep
            for block in list(family.exits[str(d)].layers)[family.config.branch_layers(d) :]:
                for path in BLOCK_LINEARS:
                    weight = block.get_submodule(path).weight
                    weight.copy_(torch.randn_like(weight) * 0.1)
        family = decompose(family, ratio=0.4, allocation="uniform").model.eval()
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    family.generation_config.eos_token_id = [im_end, tokenizer.eos_token_id]
    family.generation_config.pad_token_id = tokenizer.pad_token_id
    return family, source


def build_tiny_export(out_dir: str | Path, seed: int = 0, exit_layers=(2, 4), dae_blocks: int = 0) -> Path:
    """Writes a tiny export (exit_<d>/, family/, manifest.json; exit_<d>_factored/ with `dae_blocks`) to
    `out_dir` and returns it."""
    from ruyi_model.export import export_exits

    tokenizer = tiny_tokenizer()
    family, _ = build_tiny_family(tokenizer, seed=seed, exit_layers=exit_layers, dae_blocks=dae_blocks)
    export_exits(family, out_dir, tokenizer=tokenizer)
    return Path(out_dir)


def add_router(export_dir: str | Path, prompts: list[str], labels: list[int], threshold: float = 0.5) -> Path:
    """Adds `router.json` to a tiny export as the export stage ships it (listed in the manifest): one
    probe per cheaper member, fitted on `prompts` (raw text) with `labels`, after 1 backbone layer."""
    import json

    import numpy as np

    from ruyi_model.export import MANIFEST
    from ruyi_model.fileio import sha256_file
    from tasks.release.router import ROUTER_FILE, build_router, fit_probe, prompt_features
    from tasks.release.store import load_member

    out = Path(export_dir)
    family, tok = load_member(out, None)
    ids = [list(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    x = prompt_features(family, ids, 1)
    probes = {d: fit_probe(x, np.asarray(labels), 1e-3) for d in family.config.exit_layers[:-1]}
    build_router(family, probes, 1, threshold, ids[0], {"calibration": {"rows": len(ids)}}).save(
        out / ROUTER_FILE
    )
    manifest = json.loads((out / MANIFEST).read_text())
    path = out / ROUTER_FILE
    manifest["files"][ROUTER_FILE] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    manifest["router"] = ROUTER_FILE
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return path


@contextlib.contextmanager
def private_tmpdir(prefix: str) -> Iterator[Path]:
    """A fresh temporary directory, removed afterwards, for module-scoped fixtures.

    Not pytest's tmp_path_factory: concurrent pytest runs of the same user prune each other's
    /tmp/pytest-of-<user> trees, which can remove a module fixture's files while its tests run.
    """
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
