"""The defaults that README.md, docs/choices.md and benchmarks/RESULTS.md state are the ones the code holds.

Two kinds of claims are checked against the committed `params.yaml` (loaded through the schema in
`tasks/core/params.py`) and, where the schema has a default of its own, against that default too:
- every backticked `section.key: value` followed by "(default" in those files;
- the prose claims listed in `CLAIMS` (a sentence that states a default without that form). A claim whose
  sentence was reworded fails here as "not found": update the pattern with the words.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from tasks.core.params import Params, load_params

ROOT = Path(__file__).resolve().parents[2]
DOCS = ("README.md", "docs/choices.md", "benchmarks/RESULTS.md")


def _committed() -> Params:
    return load_params(ROOT / "params.yaml")


def _get(obj, dotted: str):
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _schema_default(dotted: str):
    """The schema's own default of `dotted` (None when the field is required or has no default)."""
    *sections, name = dotted.split(".")
    cls = Params
    for part in sections:
        cls = cls.model_fields[part].annotation
    field = cls.model_fields[name]
    return None if field.is_required() else field.get_default(call_default_factory=True)


def _as_value(text: str):
    """A stated value as params.yaml would hold it; prose numbers too ("3e-4", "1,700")."""
    value = yaml.safe_load(text)
    if isinstance(value, str):
        try:
            number = float(text.replace(",", ""))
        except ValueError:
            return value
        return int(number) if number.is_integer() and "e" not in text.lower() else number
    return value


# (file, regex with one group per stated value, param paths in the group order, how to parse a group)
CLAIMS = [
    ("README.md", r"members at depths (\d+), (\d+) and (\d+)", ["model.exit_layers"], "list"),
    (
        "README.md",
        r"the BPPO prefix rule \(`(\w+)` by default",
        ["rl.bppo.prefix_rule"],
        "scalar",
    ),
    (
        "README.md",
        r"GRPO settings \(TRL defaults:\s+`(\w+)` aggregation, clip ([\d.]+)/([\d.]+), beta ([\d.]+)\)",
        ["rl.loss_type", "rl.epsilon", "rl.epsilon_high", "rl.beta"],
        "scalar",
    ),
    ("README.md", r"DaE \(exit (\d+)\)", ["dae_exit"], "scalar"),
    ("README.md", r"rl \((\w+), members \[(\d+)\]\)", ["rl.algorithm", "dae_exit"], "scalar"),
    (
        "README.md",
        r"on (\d+) held-out GSM-style problems: one sum or difference",
        ["evaluate.num_problems"],
        "scalar",
    ),
    ("README.md", r"at `compress\.ratio` ([\d.]+), ", ["compress.ratio"], "scalar"),
    ("README.md", r"`rl\.lr` is ([\d.e-]+), where", ["rl.lr"], "scalar"),
    ("README.md", r"best point on (\d+) select problems", ["rl.select_prompts"], "scalar"),
    ("README.md", r"`dynamic` at its default threshold ([\d.]+)", ["deploy.dynamic_threshold"], "scalar"),
    (
        "README.md",
        r"member drafts up to (\d+) tokens a round, the round stopping after a draft"
        r" it is less than\s+([\d.]+) sure",
        ["deploy.speculative_draft_tokens", "deploy.speculative_draft_threshold"],
        "scalar",
    ),
    (
        "benchmarks/RESULTS.md",
        r"`family_sft\.text_replay_seq_len`\s+\(new, (\d+) in the tiny profile\)",
        ["family_sft.text_replay_seq_len"],
        "scalar",
    ),
    (
        "benchmarks/RESULTS.md",
        r"`max_steps` went from 1,300 to ([\d,]+) for",
        ["family_sft.max_steps"],
        "scalar",
    ),
    ("benchmarks/RESULTS.md", r"`data\.math_levels: (\[[\d, ]+\])`", ["data.math_levels"], "scalar"),
]


def claim_errors(texts: dict[str, str], params: Params) -> list[str]:
    """What the `texts` (`{file: text}`) state wrongly or no longer state, one line each."""
    errors = []
    for path, pattern, keys, kind in CLAIMS:
        match = re.search(pattern, texts[path])
        if not match:
            errors.append(f"{path}: the claim /{pattern}/ is not found; reword the pattern in CLAIMS")
            continue
        if kind == "list":
            stated = [[int(g) for g in match.groups()]]
        else:
            stated = [_as_value(g) for g in match.groups()]
        for key, value in zip(keys, stated, strict=True):
            actual = _get(params, key)
            if value != actual:
                errors.append(f"{path}: states {key} = {value!r}, params.yaml has {actual!r}")
    for path, text in texts.items():
        for m in re.finditer(r"`([a-z_]+(?:\.[a-z_]+)+): ([^`]+)`\s*\(default", text):
            key, stated = m.group(1), _as_value(m.group(2))
            actual = _get(params, key)
            if stated != actual:
                errors.append(
                    f"{path}: states `{key}: {m.group(2)}` as the default, params.yaml has {actual!r}"
                )
            default = _schema_default(key)
            if default is not None and stated != default:
                errors.append(
                    f"{path}: states `{key}: {m.group(2)}` as the default; the schema's is {default!r}"
                )
    return errors


def _texts() -> dict[str, str]:
    return {path: (ROOT / path).read_text() for path in DOCS}


def test_docs_state_the_committed_defaults():
    assert claim_errors(_texts(), _committed()) == []


def test_backticked_default_claims_are_present():
    found = [
        m.group(1) for t in _texts().values() for m in re.finditer(r"`([a-z_.]+): [^`]+`\s*\(default", t)
    ]
    assert {"sft.scope", "rl.algorithm"} <= set(found), found


def test_schema_and_committed_params_agree_on_the_documented_choices():
    """The choices the docs describe as defaults are also the schema's defaults, so a profile that leaves
    them out gets what the docs say."""
    params = _committed()
    for key in (
        "rl.algorithm",
        "rl.bppo.prefix_rule",
        "rl.loss_type",
        "sft.scope",
        "deploy.dynamic_threshold",
        "deploy.speculative_draft_tokens",
        "deploy.speculative_draft_threshold",
        "deploy.speculative_draft_blocks",
    ):
        default = _schema_default(key)
        assert default is not None, f"{key} has no schema default"
        assert _get(params, key) == default, (
            f"params.yaml's {key} differs from the schema default {default!r}"
        )


def test_wrong_or_missing_claims_are_caught():
    texts = _texts()
    wrong = dict(texts)
    wrong["README.md"] = (
        texts["README.md"]
        .replace("members at depths 2, 5 and 8", "members at depths 2, 4 and 8")
        .replace("`rl.algorithm: bppo` (default", "`rl.algorithm: grpo` (default")
    )
    errors = claim_errors(wrong, _committed())
    assert any("model.exit_layers" in e and "[2, 4, 8]" in e for e in errors), errors
    assert any("rl.algorithm: grpo" in e for e in errors), errors
    gone = dict(texts)
    gone["README.md"] = texts["README.md"].replace(
        "prefix rule (`common` by default", "prefix rule (`common`"
    )
    assert any("not found" in e for e in claim_errors(gone, _committed()))
