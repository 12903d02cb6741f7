"""Byte-level BPE tokenizer of the family, with a Qwen-style chat template.

`train_tokenizer(texts, vocab_size)` trains it with the `tokenizers` library and wraps it as a
transformers fast tokenizer; `tokenizer.save_pretrained(dir)` writes a directory that loads offline
with `transformers.AutoTokenizer.from_pretrained(dir)` (a `TokenizersBackend` in transformers 5) or
with `load_tokenizer(dir)`, which also checks the special tokens and the chat template.

Design (follows Qwen2/Qwen3's tokenizer where it matters, at a tiny vocabulary):
- Special tokens at fixed ids: 0 `<|endoftext|>` (eos; also the document separator in packed
  pre-training), 1 `<|pad|>` (padding), 2 `<|im_start|>`, 3 `<|im_end|>` (chat turns; generation
  stops at `<|im_end|>`, set as eos in saved models' generation config by the training stages).
  There is no bos token, as in Qwen.
- Pre-tokenizer: Qwen2's split regex (contractions, letter runs with one leading non-letter,
  SINGLE DIGITS, punctuation runs, newlines, spaces) then GPT-2 byte-level mapping. One token per
  digit keeps arithmetic learnable by a tiny model (numbers are not merged into arbitrary chunks).
- No normalizer (no NFC/NFKC): every string, including arbitrary Unicode and control characters,
  round-trips exactly through encode/decode (`clean_up_tokenization_spaces=False`).
- Vocabulary: `vocab_size` counts everything (4 special tokens + 256 byte symbols + merges);
  merges need `min_frequency` occurrences. Training is deterministic for the same input.
- Chat template (Jinja, as Qwen without the default system prompt or tool calls):
  `<|im_start|>{role}\\n{content}<|im_end|>\\n` per message, and `<|im_start|>assistant\\n` when
  `add_generation_prompt=True`.
- Padding side stays "right" (training); batched generation sets `tokenizer.padding_side = "left"`.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

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
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_MIN_VOCAB = len(SPECIAL_TOKENS) + 256


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
        raise ValueError(f"vocab_size must be at least {_MIN_VOCAB} (4 special tokens + 256 bytes), got {vocab_size}")
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
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
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
            raise ValueError(f"special token {token} has id {tokenizer.token_to_id(token)}, expected {expected_id}")
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

    Returns:
        The tokenizer `AutoTokenizer.from_pretrained(path)` gives (`TokenizersBackend`).

    Raises:
        ValueError: the directory is missing or its special tokens / chat template are not ours.
    """
    from transformers import AutoTokenizer

    path = Path(path)
    if not (path / "tokenizer.json").is_file():
        raise ValueError(f"no tokenizer at {path} (tokenizer.json missing): run the tokenizer stage")
    tokenizer = AutoTokenizer.from_pretrained(path)
    for expected_id, token in enumerate(SPECIAL_TOKENS):
        if tokenizer.convert_tokens_to_ids(token) != expected_id:
            raise ValueError(f"{path}: special token {token} has id {tokenizer.convert_tokens_to_ids(token)}, "
                             f"expected {expected_id}")
    if tokenizer.eos_token != EOS_TOKEN or tokenizer.pad_token != PAD_TOKEN:
        raise ValueError(f"{path}: eos/pad are {tokenizer.eos_token!r}/{tokenizer.pad_token!r}, "
                         f"expected {EOS_TOKEN!r}/{PAD_TOKEN!r}")
    if not tokenizer.chat_template:
        raise ValueError(f"{path}: the tokenizer has no chat template")
    return tokenizer
