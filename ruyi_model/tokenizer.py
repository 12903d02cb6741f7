"""Byte-level BPE tokenizer of the family, with a Qwen-style chat template.

`train_tokenizer(texts, vocab_size)` trains one (loadable offline with `AutoTokenizer`); `load_tokenizer`
loads and checks one; `adopt_tokenizer(path)` takes a stock checkpoint's tokenizer, adding only what the
pipeline needs; `tokenizer_fingerprint` identifies what maps text to ids. Used by the tokenizer stage.
Design: docs/choices.md#tokenizer-design.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

log = logging.getLogger("ruyi")

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (EOS_TOKEN, PAD_TOKEN, IM_START, IM_END)  # ids 0, 1, 2, 3

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Qwen2/Qwen3's pre-tokenization pattern (single digits: `\p{N}` without `+`).
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_MIN_VOCAB = len(SPECIAL_TOKENS) + 256
#: Files one of which a checkpoint directory needs for `adopt_tokenizer` (fast, BPE, SentencePiece).
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model")


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2):
    """Trains the byte-level BPE tokenizer on `texts`.

    Args:
        texts: training text, one document per item (read once, streamed).
        vocab_size: total vocabulary including the 4 special tokens and the 256 byte symbols
            (>= 260). The result can be smaller when the text has too few frequent pairs.
        min_frequency: a pair must occur at least this often to be merged.

    Returns:
        A `transformers.PreTrainedTokenizerFast` with eos/pad set and the chat template.

    Raises:
        ValueError: on a vocab_size below 260, min_frequency below 1, or no text at all.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < _MIN_VOCAB:
        raise ValueError(
            f"vocab_size must be at least {_MIN_VOCAB} (4 special tokens + 256 bytes), got {vocab_size}"
        )
    if min_frequency < 1:
        raise ValueError(f"min_frequency must be >= 1, got {min_frequency}")
    seen = 0

    def counted() -> Iterable[str]:
        nonlocal seen
        for text in texts:
            if not isinstance(text, str):
                raise ValueError(f"texts must be strings, got {type(text).__name__} at item {seen}")
            seen += 1
            yield text

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(counted(), trainer=trainer)
    if seen == 0:
        raise ValueError("no training text: texts was empty")
    return _wrap(tokenizer)


def _wrap(tokenizer):
    from transformers import PreTrainedTokenizerFast

    for expected_id, token in enumerate(SPECIAL_TOKENS):
        if tokenizer.token_to_id(token) != expected_id:
            raise ValueError(
                f"special token {token} has id {tokenizer.token_to_id(token)}, expected {expected_id}"
            )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens=[IM_START, IM_END],
        clean_up_tokenization_spaces=False,
        chat_template=CHAT_TEMPLATE,
    )
    return wrapped


def load_tokenizer(path: str | Path):
    """Loads a saved tokenizer directory with `AutoTokenizer` (offline) and checks its contract.

    The contract: the four special tokens exist, are special (added) tokens with distinct ids,
    eos/pad are `<|endoftext|>`/`<|pad|>`, and there is a chat template. Trained tokenizers have
    them at ids 0..3 (`train_tokenizer`); adopted ones (`adopt_tokenizer`) wherever the source has them.

    Returns:
        The tokenizer `AutoTokenizer.from_pretrained(path)` gives (`TokenizersBackend` or a subclass).

    Raises:
        ValueError: the directory is missing or its special tokens / chat template are not ours.
    """
    from transformers import AutoTokenizer

    path = Path(path)
    if not (path / "tokenizer.json").is_file():
        raise ValueError(f"no tokenizer at {path} (tokenizer.json missing): run the tokenizer stage")
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    check_special_tokens(tokenizer, path)
    if tokenizer.eos_token != EOS_TOKEN or tokenizer.pad_token != PAD_TOKEN:
        raise ValueError(
            f"{path}: eos/pad are {tokenizer.eos_token!r}/{tokenizer.pad_token!r}, "
            f"expected {EOS_TOKEN!r}/{PAD_TOKEN!r}"
        )
    if not tokenizer.chat_template:
        raise ValueError(f"{path}: the tokenizer has no chat template")
    return tokenizer


def _special_ids(tokenizer) -> dict[str, int]:
    """content -> id of the tokenizer's added tokens marked special."""
    return {t.content: i for i, t in tokenizer.added_tokens_decoder.items() if t.special}


def check_special_tokens(tokenizer, where: str | Path) -> None:
    """Each of SPECIAL_TOKENS must be a special (added, never split) token, with distinct ids.

    Raises:
        ValueError: naming `where` and the token.
    """
    special = _special_ids(tokenizer)
    vocab = tokenizer.get_vocab()
    for token in SPECIAL_TOKENS:
        if token not in vocab:
            raise ValueError(f"{where}: special token {token} is missing")
        if token not in special:
            raise ValueError(
                f"{where}: {token} (id {vocab[token]}) is not a special token: text containing it "
                f"would be split by the BPE"
            )
    ids = [special[t] for t in SPECIAL_TOKENS]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{where}: special tokens {list(SPECIAL_TOKENS)} share ids {ids}")


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 (hex) of the tokenizer's canonical text<->id mapping (docs/choices.md#tokenizer-design)."""
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    model = dict(state.get("model") or {})
    vocab = model.pop("vocab", {})
    if isinstance(vocab, dict):  # BPE/WordPiece: token -> id; ordered by id for a canonical form
        vocab = sorted(((i, t) for t, i in vocab.items()))
    merges = model.pop("merges", None)
    if merges is not None:  # older files store "a b" strings, newer ones ["a", "b"] pairs
        merges = [m.split(" ", 1) if isinstance(m, str) else list(m) for m in merges]
    canonical = {
        "model": model,
        "vocab": vocab,
        "merges": merges,
        "added_tokens": sorted(
            (t["id"], t["content"], bool(t.get("special"))) for t in state.get("added_tokens", [])
        ),
        "normalizer": state.get("normalizer"),
        "pre_tokenizer": state.get("pre_tokenizer"),
        "decoder": state.get("decoder"),
        "roles": {r: getattr(tokenizer, f"{r}_token", None) for r in ("eos", "pad", "bos", "unk")},
    }
    blob = json.dumps(canonical, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def adopt_tokenizer(path: str | Path) -> tuple[Any, dict[str, Any]]:
    """The tokenizer of a checkpoint directory (`model.init_from`), made to meet the pipeline's contract.

    Loads `AutoTokenizer.from_pretrained(path)` offline, then adds only what it lacks
    (docs/choices.md#tokenizer-design): missing special tokens, the eos/pad roles, our chat template if
    it has none.
    Deterministic: the same source gives the same tokenizer (and fingerprint).

    Returns:
        (tokenizer, info) with info = {"init_from", "source_class", "source_fingerprint", "source_size",
        "added_tokens", "roles_set", "chat_template" ("source" or "ruyi")}.

    Raises:
        ValueError: no loadable tokenizer at `path` (the message names it).
    """
    from transformers import AddedToken, AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"model.init_from={path}: not a directory")
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        # AutoTokenizer would build an empty tokenizer of the config's model type instead of failing
        raise ValueError(
            f"model.init_from={path}: cannot load the checkpoint's tokenizer: none of "
            f"{', '.join(TOKENIZER_FILES)} is there; the family must keep the checkpoint's token ids"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (
        Exception
    ) as e:  # transformers raises OSError/ValueError/TypeError/KeyError for bad or missing files
        raise ValueError(
            f"model.init_from={path}: cannot load the checkpoint's tokenizer with AutoTokenizer "
            f"({type(e).__name__}: {e}); the family must keep the checkpoint's token ids"
        ) from None
    if not getattr(tokenizer, "is_fast", False) or not hasattr(tokenizer, "backend_tokenizer"):
        raise ValueError(
            f"model.init_from={path}: the tokenizer ({type(tokenizer).__name__}) is not a fast "
            f"(tokenizers) tokenizer"
        )
    if len(tokenizer) < 256:
        raise ValueError(
            f"model.init_from={path}: its tokenizer has only {len(tokenizer)} tokens: empty or "
            f"truncated tokenizer files"
        )
    info: dict[str, Any] = {
        "init_from": str(path),
        "source_class": type(tokenizer).__name__,
        "source_fingerprint": tokenizer_fingerprint(tokenizer),
        "source_size": len(tokenizer),
    }
    vocab = tokenizer.get_vocab()
    special = _special_ids(tokenizer)
    missing = [t for t in SPECIAL_TOKENS if t not in vocab]
    plain = [t for t in SPECIAL_TOKENS if t in vocab and t not in special]
    if plain:
        raise ValueError(
            f"model.init_from={path}: {plain} are ordinary tokens of its tokenizer, not special ones; "
            f"the pipeline cannot use them as control tokens"
        )
    if missing:
        tokenizer.add_tokens(
            [AddedToken(t, special=True, normalized=False) for t in missing], special_tokens=True
        )
    roles = {}
    if tokenizer.eos_token != EOS_TOKEN:
        roles["eos"] = [tokenizer.eos_token, EOS_TOKEN]
        tokenizer.eos_token = EOS_TOKEN
    if tokenizer.pad_token != PAD_TOKEN:
        roles["pad"] = [tokenizer.pad_token, PAD_TOKEN]
        tokenizer.pad_token = PAD_TOKEN
    source_template = bool(tokenizer.chat_template)
    if not source_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.padding_side = "right"
    check_special_tokens(tokenizer, path)
    info.update(
        {
            "added_tokens": {t: tokenizer.convert_tokens_to_ids(t) for t in missing},
            "roles_set": roles,
            "chat_template": "source" if source_template else "ruyi",
        }
    )
    if missing or roles:
        log.info(
            "adopted the tokenizer of %s (%d tokens): added %s, set roles %s",
            path,
            info["source_size"],
            info["added_tokens"] or "nothing",
            roles or "none",
        )
    return tokenizer, info
