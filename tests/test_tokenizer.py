"""The byte-level BPE tokenizer (ruyi_model.tokenizer) and the tokenizer stage (tasks/tokenizer.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ruyi_model.tokenizer import CHAT_TEMPLATE, SPECIAL_TOKENS, load_tokenizer, train_tokenizer
from tasks.common import write_jsonl
from tasks.mathgen import generate_problems
from tasks.params import load_params

REPO = Path(__file__).resolve().parents[1]

ENGLISH = [
    "The parser reads the configuration file and returns a mapping of section names to options.",
    "Each value is a string unless a converter is given; numbers such as 1024 are split into digits.",
    "A tokenizer turns text into integer ids, and decoding the ids gives the same text back again.",
]


def _texts() -> list[str]:
    problems = generate_problems(60, [1, 2, 3], seed=1)
    return ENGLISH * 20 + [f"{p.question}\n{p.solution}" for p in problems]


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    tokenizer = train_tokenizer(_texts(), vocab_size=400)
    path = tmp_path_factory.mktemp("tok")
    tokenizer.save_pretrained(path)
    return path


def test_special_tokens_and_offline_autotokenizer(saved):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(saved)  # HF_HUB_OFFLINE=1 (conftest): local files only
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3]
    assert (tok.eos_token, tok.eos_token_id, tok.pad_token, tok.pad_token_id) == ("<|endoftext|>", 0, "<|pad|>", 1)
    assert tok.bos_token is None and len(tok) == 400
    # Special tokens in text are single tokens; plain text never produces them.
    assert tok("<|im_start|>user\nhi<|im_end|>", add_special_tokens=False)["input_ids"][0] == 2
    assert not set(tok("im_start im_end endoftext | <| |>", add_special_tokens=False)["input_ids"]) & {0, 1, 2, 3}
    assert load_tokenizer(saved).chat_template == CHAT_TEMPLATE


def test_chat_template_exact_string(saved):
    tok = load_tokenizer(saved)
    messages = [{"role": "user", "content": "What is 2+3?"}, {"role": "assistant", "content": "2+3 = <<2+3=5>>5\n#### 5"}]
    assert tok.apply_chat_template(messages, tokenize=False) == (
        "<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n2+3 = <<2+3=5>>5\n#### 5<|im_end|>\n")
    prompt = tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n"
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    assert ids[0] == 2 and ids.count(2) == 2 and ids.count(3) == 1
    assert tok.decode(ids) == prompt
    assert tok.decode(ids, skip_special_tokens=True) == "user\nWhat is 2+3?\nassistant\n"


@pytest.mark.parametrize("text", [
    "Héllo wörld — naïve café, 中文字符, 日本語, 한국어, emoji 🤖👩‍👩‍👧 and ﬁ ligature",
    "e\u0301 (decomposed) vs \u00e9 (composed) must both survive: no normalizer",
    "  leading spaces, trailing spaces   \n\n\ttabs\r\nwindows\x00nul\x1b[0m escape",
    "1,000,000 + 2.50 = $1000002.50 #### 1000002.5",
    "<|im_end|> written inside text, <|pad|> too",
    "",
])
def test_round_trip_exact(saved, text):
    tok = load_tokenizer(saved)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text


def test_digits_are_single_tokens(saved):
    tok = load_tokenizer(saved)
    pieces = tok.convert_ids_to_tokens(tok("costs 12345 dollars", add_special_tokens=False)["input_ids"])
    assert [p for p in pieces if p.strip("Ġ").isdigit()] == ["1", "2", "3", "4", "5"]


def test_training_is_deterministic_and_validates_arguments(tmp_path):
    texts = _texts()
    for name in ("a", "b"):
        train_tokenizer(iter(texts), vocab_size=350).save_pretrained(tmp_path / name)
    assert (tmp_path / "a/tokenizer.json").read_bytes() == (tmp_path / "b/tokenizer.json").read_bytes()
    assert train_tokenizer(texts, vocab_size=350, min_frequency=10_000).vocab_size == 260  # no merge qualifies
    with pytest.raises(ValueError, match="at least 260"):
        train_tokenizer(texts, vocab_size=100)
    with pytest.raises(ValueError, match="no training text"):
        train_tokenizer([], vocab_size=300)
    with pytest.raises(ValueError, match="texts must be strings"):
        train_tokenizer(["ok", 3], vocab_size=300)
    with pytest.raises(ValueError, match="tokenizer.json missing"):
        load_tokenizer(tmp_path / "nothing")


def test_load_tokenizer_rejects_foreign_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel()
    raw.train_from_iterator(ENGLISH, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|pad|>", "<|endoftext|>"]))
    PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|endoftext|>", pad_token="<|pad|>").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"special token <\|endoftext\|> has id 1, expected 0"):
        load_tokenizer(tmp_path)


# --- the stage ---------------------------------------------------------------------------------


def _validated(tmp: Path) -> None:
    problems = generate_problems(80, [1, 2, 3], seed=2)
    val_dir = tmp / "data" / "validated"
    write_jsonl(val_dir / "corpus_train.jsonl", [{"id": f"d{i}", "text": t, "source": "test"}
                                                 for i, t in enumerate(ENGLISH * 10 + ["Ünïcödé ✓ text"])])
    write_jsonl(val_dir / "corpus_val.jsonl", [{"id": "v0", "text": "Held-out text: the ids decode to 42 again.",
                                                "source": "test"}])
    write_jsonl(val_dir / "sft.jsonl", [{"id": f"s{i}", "prompt": p.question, "response": p.solution,
                                         "answer": p.answer, "level": p.level} for i, p in enumerate(problems)])


def _params(tmp: Path, **extra):
    return load_params(REPO / "params.yaml", {
        "paths.data_dir": str(tmp / "data"), "paths.artifacts_dir": str(tmp / "artifacts"),
        "paths.metrics_dir": str(tmp / "metrics"), "paths.plots_dir": str(tmp / "plots"),
        "tokenizer.vocab_size": 420, **extra})


def test_stage_writes_tokenizer_metrics_and_plot(tmp_path):
    from tasks.tokenizer import run

    _validated(tmp_path)
    metrics = run(_params(tmp_path))
    out = tmp_path / "artifacts" / "tokenizer"
    assert sorted(p.name for p in out.iterdir()) == ["chat_template.jinja", "tokenizer.json", "tokenizer_config.json"]
    tok = load_tokenizer(out)
    assert len(tok) == metrics["vocab_size"] == 420
    assert metrics["merges"] == 420 - 260
    assert json.loads((tmp_path / "metrics" / "tokenizer.json").read_text()) == metrics
    held_out = "Held-out text: the ids decode to 42 again."
    n_tokens = len(tok(held_out, add_special_tokens=False)["input_ids"])
    assert metrics["val"] == {"docs": 1, "tokens": n_tokens, "mean_tokens_per_doc": float(n_tokens),
                              "chars_per_token": round(len(held_out) / n_tokens, 4)}
    assert metrics["train"]["chars_per_token"] > 1.5  # merges compress the training text
    assert 0 < metrics["sft_chat_tokens"]["mean"] <= metrics["sft_chat_tokens"]["p95"] <= metrics["sft_chat_tokens"]["max"]
    assert (tmp_path / "plots" / "tokenizer" / "sft_chat_tokens.png").stat().st_size > 1000
    assert (tmp_path / "plots" / "tokenizer" / "sft_chat_tokens.csv").read_text().startswith("tokens,sequences\n")
    # Same input, same params -> the same files.
    first = (out / "tokenizer.json").read_bytes()
    run(_params(tmp_path))
    assert (out / "tokenizer.json").read_bytes() == first


def test_stage_errors_name_the_missing_input(tmp_path):
    cmd = [sys.executable, "-m", "tasks.tokenizer", "--params", str(REPO / "params.yaml"),
           "--set", f"paths.data_dir={tmp_path / 'data'}", "--set", f"paths.artifacts_dir={tmp_path / 'artifacts'}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert f"{tmp_path / 'data' / 'validated' / 'corpus_train.jsonl'} not found" in proc.stderr
    assert not (tmp_path / "artifacts" / "tokenizer").exists()
    proc = subprocess.run(cmd + ["--set", "tokenizer.vocab_size=100"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "tokenizer.vocab_size" in proc.stderr
