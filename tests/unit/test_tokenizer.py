"""The byte-level BPE tokenizer (ruyi_model.tokenizer) and the tokenizer stage (tasks/tokenizer.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from training_helpers import save_qwen_like_tokenizer

from ruyi_model.tokenizer import CHAT_TEMPLATE, SPECIAL_TOKENS, load_tokenizer, train_tokenizer
from tasks.core.files import write_jsonl
from tasks.core.params import load_params
from tasks.data.mathgen import generate_problems

REPO = Path(__file__).resolve().parents[2]

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
    assert (tok.eos_token, tok.eos_token_id, tok.pad_token, tok.pad_token_id) == (
        "<|endoftext|>",
        0,
        "<|pad|>",
        1,
    )
    assert tok.bos_token is None and len(tok) == 400
    # Special tokens in text are single tokens; plain text never produces them.
    assert tok("<|im_start|>user\nhi<|im_end|>", add_special_tokens=False)["input_ids"][0] == 2
    assert not set(tok("im_start im_end endoftext | <| |>", add_special_tokens=False)["input_ids"]) & {
        0,
        1,
        2,
        3,
    }
    assert load_tokenizer(saved).chat_template == CHAT_TEMPLATE


def test_chat_template_exact_string(saved):
    tok = load_tokenizer(saved)
    messages = [
        {"role": "user", "content": "What is 2+3?"},
        {"role": "assistant", "content": "2+3 = <<2+3=5>>5\n#### 5"},
    ]
    assert tok.apply_chat_template(messages, tokenize=False) == (
        "<|im_start|>user\nWhat is 2+3?<|im_end|>\n"
        "<|im_start|>assistant\n2+3 = <<2+3=5>>5\n#### 5<|im_end|>\n"
    )
    prompt = tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n"
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    assert ids[0] == 2 and ids.count(2) == 2 and ids.count(3) == 1
    assert tok.decode(ids) == prompt
    assert tok.decode(ids, skip_special_tokens=True) == "user\nWhat is 2+3?\nassistant\n"


@pytest.mark.parametrize(
    "text",
    [
        "Héllo wörld — naïve café, 中文字符, 日本語, 한국어, emoji 🤖👩‍👩‍👧 and ﬁ ligature",
        "e\u0301 (decomposed) vs \u00e9 (composed) must both survive: no normalizer",
        "  leading spaces, trailing spaces   \n\n\ttabs\r\nwindows\x00nul\x1b[0m escape",
        "1,000,000 + 2.50 = $1000002.50 #### 1000002.5",
        "<|im_end|> written inside text, <|pad|> too",
        "",
    ],
)
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
    assert (
        train_tokenizer(texts, vocab_size=350, min_frequency=10_000).vocab_size == 260
    )  # no merge qualifies
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
    raw.train_from_iterator(
        ENGLISH, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|pad|>", "<|endoftext|>"])
    )
    PreTrainedTokenizerFast(
        tokenizer_object=raw, eos_token="<|endoftext|>", pad_token="<|pad|>"
    ).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"special token <\|im_start\|> is missing"):
        load_tokenizer(tmp_path)


def test_load_tokenizer_rejects_a_control_token_that_is_not_special(tmp_path):
    """`<|im_end|>` as an ordinary vocabulary entry would not be kept whole in text: not our contract."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel()
    raw.train_from_iterator(
        ENGLISH, trainers.BpeTrainer(vocab_size=300, special_tokens=list(SPECIAL_TOKENS[:3]))
    )
    raw.add_tokens(["<|im_end|>"])  # added, but not special
    PreTrainedTokenizerFast(
        tokenizer_object=raw, eos_token="<|endoftext|>", pad_token="<|pad|>", chat_template=CHAT_TEMPLATE
    ).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"<\|im_end\|> \(id \d+\) is not a special token"):
        load_tokenizer(tmp_path)


def test_fingerprint_is_stable_and_tells_same_size_tokenizers_apart(saved, tmp_path):
    from ruyi_model.tokenizer import tokenizer_fingerprint

    loaded = load_tokenizer(saved)
    fp = tokenizer_fingerprint(loaded)
    assert len(fp) == 64 and fp == tokenizer_fingerprint(load_tokenizer(saved))
    # Retrained on the same text: the same tokenizer, the same fingerprint (computed from content, not files).
    assert tokenizer_fingerprint(train_tokenizer(_texts(), vocab_size=400)) == fp
    loaded.save_pretrained(tmp_path / "resaved")
    assert tokenizer_fingerprint(load_tokenizer(tmp_path / "resaved")) == fp
    # Same size, other merges (trained on other text): another fingerprint.
    other = train_tokenizer(list(reversed(_texts())) + ["zzzz qqqq xxxx"] * 40, vocab_size=400)
    assert len(other) == len(loaded) and other.get_vocab() != loaded.get_vocab()
    assert tokenizer_fingerprint(other) != fp
    # A role change alone (another pad token) changes it too.
    loaded.pad_token = "<|endoftext|>"
    assert tokenizer_fingerprint(loaded) != fp


# --- the stage ---------------------------------------------------------------------------------


def _validated(tmp: Path) -> None:
    problems = generate_problems(80, [1, 2, 3], seed=2)
    val_dir = tmp / "data" / "validated"
    write_jsonl(
        val_dir / "corpus_train.jsonl",
        [
            {"id": f"d{i}", "text": t, "source": "test"}
            for i, t in enumerate(ENGLISH * 10 + ["Ünïcödé ✓ text"])
        ],
    )
    write_jsonl(
        val_dir / "corpus_val.jsonl",
        [{"id": "v0", "text": "Held-out text: the ids decode to 42 again.", "source": "test"}],
    )
    write_jsonl(
        val_dir / "sft.jsonl",
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


def _params(tmp: Path, **extra):
    return load_params(
        REPO / "params.yaml",
        {
            "paths.data_dir": str(tmp / "data"),
            "paths.artifacts_dir": str(tmp / "artifacts"),
            "paths.metrics_dir": str(tmp / "metrics"),
            "paths.plots_dir": str(tmp / "plots"),
            "tokenizer.vocab_size": 420,
            **extra,
        },
    )


def test_stage_writes_tokenizer_metrics_and_plot(tmp_path):
    from tasks.tokenizer import run

    _validated(tmp_path)
    metrics = run(_params(tmp_path))
    out = tmp_path / "artifacts" / "tokenizer"
    assert sorted(p.name for p in out.iterdir()) == [
        "chat_template.jinja",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    tok = load_tokenizer(out)
    assert len(tok) == metrics["vocab_size"] == 420
    assert metrics["merges"] == 420 - 260
    assert metrics["source"] == {"kind": "trained"} and metrics["round_trip_failures"] == 0
    from ruyi_model.tokenizer import tokenizer_fingerprint

    assert metrics["fingerprint"] == tokenizer_fingerprint(tok)
    assert json.loads((tmp_path / "metrics" / "tokenizer.json").read_text()) == metrics
    held_out = "Held-out text: the ids decode to 42 again."
    n_tokens = len(tok(held_out, add_special_tokens=False)["input_ids"])
    assert metrics["val"] == {
        "docs": 1,
        "tokens": n_tokens,
        "mean_tokens_per_doc": float(n_tokens),
        "chars_per_token": round(len(held_out) / n_tokens, 4),
    }
    assert metrics["train"]["chars_per_token"] > 1.5  # merges compress the training text
    assert (
        0
        < metrics["sft_chat_tokens"]["mean"]
        <= metrics["sft_chat_tokens"]["p95"]
        <= metrics["sft_chat_tokens"]["max"]
    )
    assert (tmp_path / "plots" / "tokenizer" / "sft_chat_tokens.png").stat().st_size > 1000
    assert (
        (tmp_path / "plots" / "tokenizer" / "sft_chat_tokens.csv")
        .read_text()
        .startswith("tokens,sequences\n")
    )
    # Same input, same params -> the same files.
    first = (out / "tokenizer.json").read_bytes()
    run(_params(tmp_path))
    assert (out / "tokenizer.json").read_bytes() == first


def test_stage_errors_name_the_missing_input(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "tasks.tokenizer",
        "--params",
        str(REPO / "params.yaml"),
        "--set",
        f"paths.data_dir={tmp_path / 'data'}",
        "--set",
        f"paths.artifacts_dir={tmp_path / 'artifacts'}",
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert f"{tmp_path / 'data' / 'validated' / 'corpus_train.jsonl'} not found" in proc.stderr
    assert not (tmp_path / "artifacts" / "tokenizer").exists()
    proc = subprocess.run(
        cmd + ["--set", "tokenizer.vocab_size=100"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and "tokenizer.vocab_size" in proc.stderr


def test_stage_adopts_the_tokenizer_of_model_init_from(tmp_path):
    """model.init_from: the checkpoint's own tokenizer, ids unchanged, only <|pad|> (and our chat template,
    which it lacks) added; its provenance in the metrics; no BPE is trained."""
    from transformers import AutoTokenizer

    from ruyi_model.tokenizer import tokenizer_fingerprint
    from tasks.tokenizer import run

    _validated(tmp_path)
    src = tmp_path / "qwen3"
    save_qwen_like_tokenizer(src, _texts(), vocab_size=330)
    source = AutoTokenizer.from_pretrained(src)
    assert source.convert_tokens_to_ids("<|endoftext|>") > 3 and source.pad_token == "<|endoftext|>"
    metrics = run(_params(tmp_path, **{"model.init_from": str(src)}))
    out = tmp_path / "artifacts" / "tokenizer"
    tok = load_tokenizer(out)
    assert type(tok).__name__ == "Qwen2Tokenizer" and len(tok) == len(source) + 1
    for token, i in source.get_vocab().items():  # every id of the checkpoint means what it meant
        assert tok.convert_tokens_to_ids(token) == i, token
    assert (tok.eos_token, tok.pad_token, tok.pad_token_id) == ("<|endoftext|>", "<|pad|>", len(source))
    assert tok.chat_template == CHAT_TEMPLATE
    assert metrics["vocab_size"] == len(source) + 1 != 420  # tokenizer.vocab_size is not used
    assert metrics["fingerprint"] == tokenizer_fingerprint(tok)
    assert metrics["source"] == {
        "kind": "init_from",
        "init_from": str(src),
        "source_class": "Qwen2Tokenizer",
        "source_size": len(source),
        "source_fingerprint": tokenizer_fingerprint(source),
        "added_tokens": {"<|pad|>": len(source)},
        "roles_set": {"pad": ["<|endoftext|>", "<|pad|>"]},
        "chat_template": "ruyi",
    }
    text = "Held-out text: the ids decode to 42 again."
    assert (
        tok(text, add_special_tokens=False)["input_ids"]
        == source(text, add_special_tokens=False)["input_ids"]
    )
    # The Ünïcödé training line is NFC already: nothing failed to round-trip.
    assert metrics["round_trip_failures"] == 0


def test_stage_keeps_the_source_chat_template_and_counts_normalized_text(tmp_path):
    from tasks.core.stage import StageError
    from tasks.tokenizer import run

    _validated(tmp_path)
    val = tmp_path / "data" / "validated" / "corpus_val.jsonl"
    write_jsonl(
        val,
        [{"id": "v0", "text": "e\u0301 is not NFC", "source": "test"}]
        + [{"id": f"v{i}", "text": f"plain text number {i}", "source": "test"} for i in range(1, 11)],
    )
    template = CHAT_TEMPLATE.replace("{% endfor %}", "{% endfor %}{# source template #}")
    src = tmp_path / "qwen3"
    save_qwen_like_tokenizer(src, _texts(), chat_template=template)
    metrics = run(_params(tmp_path, **{"model.init_from": str(src)}))
    assert load_tokenizer(tmp_path / "artifacts" / "tokenizer").chat_template == template
    assert metrics["source"]["chat_template"] == "source"
    assert metrics["round_trip_failures"] == 1  # NFC turns e + U+0301 into é: counted, not fatal
    # A tokenizer that changes more than 10% of a file's texts is an error (here: all 4 are not NFC).
    write_jsonl(val, [{"id": f"v{i}", "text": f"e\u0301 number {i}", "source": "test"} for i in range(4)])
    with pytest.raises(StageError, match="does not reproduce 4 of 4 corpus_val.jsonl items"):
        run(_params(tmp_path, **{"model.init_from": str(src)}))


def test_stage_with_init_from_lacking_a_tokenizer_names_the_path(tmp_path):
    from tasks.core.stage import StageError
    from tasks.tokenizer import run

    _validated(tmp_path)
    src = tmp_path / "qwen3"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "qwen3"}))
    with pytest.raises(StageError, match=f"model.init_from={src}: cannot load the checkpoint's tokenizer"):
        run(_params(tmp_path, **{"model.init_from": str(src)}))
    with pytest.raises(StageError, match=f"model.init_from={tmp_path / 'nope'}: not a directory"):
        run(_params(tmp_path, **{"model.init_from": str(tmp_path / "nope")}))
    assert not (tmp_path / "artifacts" / "tokenizer").exists()
