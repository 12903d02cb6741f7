"""The schema of `params.yaml`: every hyperparameter of every stage, validated before any work starts.

Library module; `load_params()` is the one entry point the stages use. One pydantic model per section,
unknown keys forbidden, so a typo is an error naming the key. Types are strict: a bool is never a
number, "150" is not an int, "no" is not a bool (an int is fine for a float field); YAML is read as
YAML 1.2, the way DVC reads it (`1e-3` is a float, `010` is 10, `1:30` a string: `load_yaml`). Two
complete profiles share this schema: `params.yaml` (tiny, the whole chain on 2 CPU cores) and
`params.paper.yaml` (paper scale, for clusters).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

PositiveInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
PositiveFloat = Annotated[float, Field(gt=0.0)]


class ParamsError(ValueError):
    """A params file that cannot be used; the message names the file and every bad key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class _Yaml12Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 booleans, floats and integers, read exactly as DVC reads
    params.yaml (ruamel.yaml, `typ="safe"`; a test compares the two on every tricky form).

    PyYAML follows YAML 1.1: `1e-3` (no dot) is a string there, yes/no/on/off are booleans, `010` is
    octal 8 and `1:30` is the sexagesimal 90; YAML 1.2 (and DVC) read 0.001, strings, 10 and "1:30".
    """

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        """YAML 1.2 integers as ruamel.yaml constructs them: `0b`/`0o`/`0x` prefixes, `_` separators,
        and leading zeros are decimal (`010` is 10)."""
        text = str(self.construct_scalar(node)).replace("_", "")
        sign = -1 if text.startswith("-") else 1
        digits = text.lstrip("+-")
        base = {"0b": 2, "0o": 8, "0x": 16}.get(digits[:2], 10)
        try:
            return sign * int(digits[2:] if base != 10 else digits, base)
        except ValueError:
            raise yaml.constructor.ConstructorError(
                None, None, f"{node.value!r} is not an integer", node.start_mark
            ) from None


# YAML 1.1's bool, float and int resolvers replaced by YAML 1.2's (ruamel.yaml's, which DVC uses).
_YAML11_TAGS = ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:float", "tag:yaml.org,2002:int")
_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in _YAML11_TAGS]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_constructor("tag:yaml.org,2002:int", _Yaml12Loader.construct_yaml_int)
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:int",
    re.compile(
        r"""^(?:[-+]?0b[0-1_]+
                  |[-+]?0o?[0-7_]+
                  |[-+]?[0-9_]+
                  |[-+]?0x[0-9a-fA-F_]+)$""",
        re.X,
    ),
    list("-+0123456789"),
)
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                  |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                  |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                  |[-+]?\.(?:inf|Inf|INF)
                  |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def load_yaml(text: str) -> Any:
    """`yaml.safe_load` with YAML 1.2 booleans, floats and integers (`1e-3` -> 0.001, `no` -> "no", `010` ->
    10, `1:30` -> "1:30"), as DVC reads params.yaml; reads params files and `--set` values."""
    return yaml.load(text, Loader=_Yaml12Loader)


class PathsParams(_Section):
    data_dir: str = "data"
    artifacts_dir: str = "artifacts"
    metrics_dir: str = "metrics"
    plots_dir: str = "plots"
    reports_dir: str = "reports"


class ModelParams(_Section):
    """Architecture of the family (a Qwen3 backbone with exits)."""

    hidden_size: PositiveInt = 128
    intermediate_size: PositiveInt = 384
    num_hidden_layers: PositiveInt = 8
    num_attention_heads: PositiveInt = 4
    num_key_value_heads: PositiveInt = 2
    head_dim: PositiveInt = 32
    max_position_embeddings: PositiveInt = 512
    rope_theta: PositiveFloat = 10000.0
    rms_norm_eps: PositiveFloat = 1e-6
    exit_layers: list[PositiveInt] = [2, 4, 8]
    exit_branch_layers: NonNegInt = 1
    shared_heads: bool = False
    # Optional stock Qwen3 checkpoint directory to start the family from (Ruyi2's recipe);
    # null trains the tiny family from scratch.
    init_from: str | None = None
    # Multi-exit loss implementation: auto | naive | chunked | triton (see triton_kernels).
    loss_impl: Literal["auto", "naive", "chunked", "triton"] = "auto"
    # text: a Qwen3 text family (params.yaml); vl: a Qwen3-VL family whose text backbone is this section
    # and whose vision tower is the `vl` section (params.vl.yaml, tasks/training/vl_pipeline.py).
    modality: Literal["text", "vl"] = "text"

    def qwen3_text_fields(self) -> dict[str, int | float]:
        """The Qwen3 text-config fields this section sets: sizes, heads, positions and the norm's eps. One
        source for the text family (`tasks.cpt.family_config`) and the VL family's text model
        (`tasks.training.vl_pipeline.vl_config`), which each add RoPE (the VL one with M-RoPE sections)."""
        return {
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
        }

    @model_validator(mode="after")
    def _check(self) -> ModelParams:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"model.num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"model.num_key_value_heads ({self.num_key_value_heads})"
            )
        exits = self.exit_layers
        if not exits or exits != sorted(set(exits)) or exits[-1] != self.num_hidden_layers:
            raise ValueError(
                f"model.exit_layers must be strictly increasing and end at num_hidden_layers "
                f"({self.num_hidden_layers}); got {exits}"
            )
        return self


class DataParams(_Section):
    """Where the data comes from and how it is split."""

    # Local paths or s3:// URIs of JSONL/Parquet files. Empty: the embedded default (Python's own
    # documentation and docstrings + generated GSM8K-style math problems), built without a network.
    sources: list[str] = []
    # What the embedded data adds to user sources: auto = the kinds (corpus, math) the user files
    # lack; always = both; never = nothing (a missing kind is an error).
    embedded: Literal["auto", "always", "never"] = "auto"
    max_corpus_docs: PositiveInt = 3000
    min_doc_chars: PositiveInt = 200
    max_doc_chars: PositiveInt = 4000
    num_sft: PositiveInt = 1500
    num_rl: PositiveInt = 400
    num_eval: PositiveInt = 100
    math_levels: list[Annotated[int, Field(ge=1, le=5)]] = [1, 2, 3]
    val_fraction: Annotated[float, Field(gt=0.0, lt=0.5)] = 0.05
    # The healing-decision split compress judges its healing on (select.jsonl, select_corpus.jsonl; no stage
    # trains on it): this many math problems of their own problem groups (`problem_key`), and general
    # documents moved out of corpus_train until they hold this many characters. Compress needs
    # compress.solution_rows rows and compress.loss_batches x compress.batch_size blocks of
    # compress.seq_len tokens.
    num_select: PositiveInt = 200
    select_corpus_chars: PositiveInt = 40000

    @model_validator(mode="after")
    def _check(self) -> DataParams:
        if not self.math_levels:
            raise ValueError("data.math_levels must name at least one level (1-5)")
        if self.min_doc_chars > self.max_doc_chars:
            raise ValueError(
                f"data.min_doc_chars ({self.min_doc_chars}) must not exceed data.max_doc_chars "
                f"({self.max_doc_chars}): every document would be dropped"
            )
        return self


class ValidateParams(_Section):
    """Great Expectations data contracts (data_contracts/)."""

    on_violation: Literal["fail", "quarantine"] = "fail"
    # With quarantine: continue only while the bad rows are at most this fraction of a dataset.
    max_quarantine_fraction: Fraction = 0.05
    # Length bounds (characters) of math questions/prompts and of SFT responses / eval solutions.
    # Corpus documents use data.min_doc_chars..data.max_doc_chars.
    min_question_chars: PositiveInt = 10
    max_question_chars: PositiveInt = 2000
    max_solution_chars: PositiveInt = 4000
    # Failing rows quoted (line + value) per violated expectation in the error message.
    sample_rows: PositiveInt = 5

    @model_validator(mode="after")
    def _check(self) -> ValidateParams:
        if self.min_question_chars > self.max_question_chars:
            raise ValueError(
                f"validate_data.min_question_chars ({self.min_question_chars}) exceeds "
                f"max_question_chars ({self.max_question_chars})"
            )
        return self


class TokenizerParams(_Section):
    vocab_size: Annotated[int, Field(ge=300)] = 2048
    min_frequency: PositiveInt = 2


class ExitWeightSchedule(_Section):
    """Ruyi2 Eq. 1 weights w_k(t): shallower members decay from `start` to `floor` over training.

    Ruyi2 gives no formula; ours (tasks/training/ `exit_weights_at`): the deepest member always has
    weight `deepest`; every other member goes from `start` at the first step to `floor` at the last
    step along `kind`: constant (stays at `start`), linear, or cosine (half cosine).
    """

    kind: Literal["constant", "linear", "cosine"] = "cosine"
    start: Annotated[float, Field(ge=0.0)] = 1.0
    floor: Annotated[float, Field(ge=0.0)] = 0.3
    deepest: PositiveFloat = 1.0

    @model_validator(mode="after")
    def _check(self) -> ExitWeightSchedule:
        if self.kind != "constant" and self.floor > self.start:
            raise ValueError(
                f"exit_weights.floor ({self.floor}) must be <= exit_weights.start ({self.start}): "
                f"the shallower members' weights decay"
            )
        return self


class TrainParams(_Section):
    """Optimisation settings shared by the training stages (cpt, family_sft, expand, sft); see
    tasks/training/."""

    seq_len: PositiveInt = 128
    batch_size: PositiveInt = 8
    # Micro-batches per optimizer step (the effective batch is batch_size * grad_accum).
    grad_accum: PositiveInt = 1
    max_steps: PositiveInt = 150
    # Peak learning rate of AdamW (betas 0.9/0.95; decay on matrices only).
    lr: PositiveFloat = 3e-3
    # Cosine decay floor, as a fraction of lr, reached at max_steps.
    min_lr_ratio: Fraction = 0.1
    warmup_steps: NonNegInt = 15
    weight_decay: Annotated[float, Field(ge=0.0)] = 0.01
    # Gradient-norm clipping (0 = off).
    grad_clip: Annotated[float, Field(ge=0.0)] = 1.0
    bf16: bool = False
    # Resumable checkpoint interval into artifacts/checkpoints/<stage>/ (one is always written at the end).
    checkpoint_every: PositiveInt = 50
    eval_every: PositiveInt = 25
    # Validation batches (of batch_size rows) per evaluation.
    eval_batches: PositiveInt = 4

    @model_validator(mode="after")
    def _check_train(self) -> TrainParams:
        if self.warmup_steps >= self.max_steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be < max_steps ({self.max_steps})")
        return self


class CPTParams(TrainParams):
    """Joint multi-exit continued pre-training of the family (tasks/cpt.py)."""

    exit_weights: ExitWeightSchedule = ExitWeightSchedule()


class ExpandParams(TrainParams):
    """DaE expansion (Ruyi2 section 4.4) and the expanded member's CPT (tasks/expand.py)."""

    # Member to expand; null = the smallest member (as in the paper).
    exit_layer: PositiveInt | None = None
    num_blocks: PositiveInt = 2
    init: Literal["random", "clone"] = "random"
    # Share of general (source != "math") documents replayed among the STEM (source == "math")
    # documents during DaE CPT (the paper: 10%).
    replay_fraction: Fraction = 0.1
    max_steps: PositiveInt = 80
    warmup_steps: NonNegInt = 8
    eval_every: PositiveInt = 20


class FamilySFTParams(TrainParams):
    """Joint multi-exit SFT of the whole family before DaE (tasks/family_sft.py; Ruyi2 section 4.3.1)."""

    # Optimizer steps of Stage I (general behaviour: chats built from corpus_train's general text);
    # the remaining max_steps - stage1_steps are Stage II (domain: the math chats of sft.jsonl).
    stage1_steps: NonNegInt = 20
    # Share of Stage I chats replayed among the Stage II rows (Ruyi2: "a fixed ratio", not given).
    replay_fraction: Fraction = 0.1
    # Share of Stage II rows that are plain corpus_train text (packed seq_len blocks, loss on every
    # token: the pre-training stream replayed, so the members keep modelling text); replay_fraction is
    # then a share of the other rows.
    text_replay_fraction: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    # Tokens per text-replay block (right-padded to seq_len; null = seq_len). A block no longer than the
    # math chats never widens a batch, which is trimmed to its longest row.
    text_replay_seq_len: PositiveInt | None = None
    # Stage I chats drawn from the general documents (each document gives at most one).
    stage1_examples: PositiveInt = 1000
    # Share of sft.jsonl held out (by id hash, as the sft stage does) for the per-member loss.
    holdout_fraction: Annotated[float, Field(gt=0.0, lt=0.5)] = 0.05
    exit_weights: ExitWeightSchedule = ExitWeightSchedule()

    @model_validator(mode="after")
    def _check_stages(self) -> FamilySFTParams:
        if self.text_replay_seq_len is not None and self.text_replay_seq_len > self.seq_len:
            raise ValueError(
                f"text_replay_seq_len ({self.text_replay_seq_len}) must be <= seq_len ({self.seq_len}): "
                f"a replay block is one row of a batch"
            )
        if self.stage1_steps >= self.max_steps:
            raise ValueError(
                f"stage1_steps ({self.stage1_steps}) must be < max_steps ({self.max_steps}): "
                f"Stage II (math) needs at least one step"
            )
        return self


class SFTParams(TrainParams):
    """Supervised fine-tuning on chat-formatted math pairs (tasks/sft.py)."""

    # family: joint multi-exit tuning of every parameter of the family; dae: only the DaE member's
    # trainable parameters (the paper tunes the family before expansion and the DaE member after it).
    scope: Literal["family", "dae"] = "dae"
    seq_len: PositiveInt = 256
    max_steps: PositiveInt = 80
    lr: PositiveFloat = 2e-3
    warmup_steps: NonNegInt = 8
    eval_every: PositiveInt = 20
    # Share of sft.jsonl held out (chosen by a hash of the row id) for the before/after loss.
    holdout_fraction: Annotated[float, Field(gt=0.0, lt=0.5)] = 0.05
    # Exit weights of the multi-exit loss with scope=family (constant 1.0 by default).
    exit_weights: ExitWeightSchedule = ExitWeightSchedule(kind="constant", floor=1.0)


class BPPOParams(_Section):
    """Binary Prefix Policy Optimization (Ruyi2.5); the rules the papers leave open are ours
    (tasks/training/rl_algos.py)."""

    # Which tokens of the two selected responses carry gradient: a fraction of each response's
    # length, its first k tokens, the pair's common prefix plus the first diverging token (on both),
    # the common prefix once on the correct response plus k tokens past the divergence on each
    # (shared_correct), or only k tokens past the divergence (divergent).
    prefix_rule: Literal["fraction", "first_k", "common", "shared_correct", "divergent"] = "common"
    prefix_fraction: Annotated[float, Field(gt=0.0, le=1.0)] = 0.5
    prefix_k: PositiveInt = 16
    # Adaptive completion schedule: the generation budget follows recent shortest-correct lengths,
    # budget = clamp(ceil(budget_margin * EMA), budget_min_tokens, rl.max_new_tokens).
    # Off by default: with the tiny default's responses it never left max_new_tokens (docs/choices.md#rl).
    adaptive_budget: bool = False
    budget_margin: Annotated[float, Field(ge=1.0)] = 1.5
    budget_min_tokens: PositiveInt = 8
    # Weight of the past in the EMA of the per-step shortest-correct length.
    budget_ema: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.5
    # Early group stop: once a group has a finished correct and a finished incorrect response, its
    # unfinished responses stop (scored like a response cut by the budget; never selected).
    early_stop: bool = False


class RLParams(_Section):
    """On-policy RL with a verifiable reward (tasks/rl.py): GRPO as TRL computes it, or BPPO."""

    algorithm: Literal["grpo", "bppo"] = "bppo"
    # Which members are sampled and trained: "dae" (the DaE member, as in the paper: only its DaE
    # parameters train), "all", or a list of exit layers (these two train every parameter, the shared
    # backbone included, so every member changes).
    members: Literal["dae", "all"] | list[PositiveInt] = "dae"
    # Generation batches, each followed by num_iterations optimizer steps.
    steps: PositiveInt = 30
    prompts_per_step: PositiveInt = 4
    group_size: Annotated[int, Field(ge=2)] = 8
    max_new_tokens: PositiveInt = 128
    temperature: PositiveFloat = 1.0
    lr: PositiveFloat = 5e-4
    grad_clip: Annotated[float, Field(ge=0.0)] = 1.0
    # Rollout work (both algorithms; the sampled tokens stay the same): prefill each prompt once for
    # its group_size samples and repeat its KV cache; drop finished rows from the decoded batch.
    share_prefill: bool = True
    compact_rollouts: bool = True
    # How a rollout token is drawn from softmax(logits / temperature) (rl_algos.draw_tokens):
    # inverse_cdf (one uniform per row and step) or race (an exponential per vocabulary entry, the
    # sampler until 2026-12-06: rollouts of the tiny default 1.4x slower, RESULTS.md "Rollout draws").
    sampler: Literal["inverse_cdf", "race"] = "inverse_cdf"
    # What runs a rollout's decoding steps after the prompt's prefill (rl_algos.sample_completions):
    # hf (the model's forward with its DynamicCache) or static (ruyi_model.static_decode: a
    # preallocated cache and fused projections, the same layers up to float rounding; text family
    # only). docs/choices.md#rl has its measured effect.
    rollout_engine: Literal["hf", "static"] = "hf"
    # Optimizer steps per generation batch (TRL's num_iterations); > 1 reuses the batch with
    # importance ratios against the sampling policy, so the PPO clip becomes active.
    num_iterations: PositiveInt = 1
    epsilon: PositiveFloat = 0.2
    epsilon_high: PositiveFloat = 0.28
    beta: Annotated[float, Field(ge=0.0)] = 0.0
    # With beta = 0, the KL metric (k3 between the step's starting and updated policy on its trained
    # tokens) costs one extra no-grad forward: measured on every kl_every-th step (0 = never); the
    # others report none. With beta > 0 the loss computes the KL to the reference on every step anyway.
    kl_every: NonNegInt = 10
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = "dapo"
    # Advantage scaling as TRL's scale_rewards: group std, batch std or none.
    scale_rewards: Literal["group", "batch", "none"] = "group"
    format_reward: Annotated[float, Field(ge=0.0)] = 0.1
    # The last eval_prompts rows of rl.jsonl are held out: greedy reward/accuracy before and after.
    eval_prompts: PositiveInt = 32
    # ... and every eval_every steps between (0 = before and after only): the held-out curve of
    # metrics/rl.json and plots/rl. Greedy decoding draws no random numbers, so it never changes training.
    eval_every: NonNegInt = 10
    # Checkpoint selection: at each held-out evaluation (step 0 included) the members' mean greedy
    # accuracy on the first select_prompts rows of select.jsonl (a split no stage trains on); the stage
    # keeps the weights of the best point (the earliest of equals), so rl may keep the SFT weights.
    # 0 = keep the last step's weights.
    select_prompts: NonNegInt = 0
    # Resumable checkpoints every n steps into artifacts/checkpoints/rl (0 = none).
    checkpoint_every: NonNegInt = 10
    bppo: BPPOParams = BPPOParams()

    @model_validator(mode="after")
    def _check(self) -> RLParams:
        if self.bppo.budget_min_tokens > self.max_new_tokens:
            raise ValueError(
                f"rl.bppo.budget_min_tokens ({self.bppo.budget_min_tokens}) must be <= "
                f"rl.max_new_tokens ({self.max_new_tokens})"
            )
        return self


class CompressParams(_Section):
    """DaE decomposition (Ruyi2 4.4) of the DaE member's added blocks and head; see tasks/compress.py."""

    # Fraction of the added parameters (DaE blocks + the DaE member's head) removed.
    ratio: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.4
    allocation: Literal["uniform", "loss_aware"] = "loss_aware"
    include_head: bool = True
    # Activation-aware calibration: this many batches of `batch_size` packed `seq_len`-token blocks.
    calibration_batches: PositiveInt = 8
    # Share of the calibration blocks packed from SFT chat text (the rest: corpus_train).
    calibration_sft_fraction: Fraction = 0.5
    seq_len: PositiveInt = 256
    batch_size: PositiveInt = 4
    # Healing: distillation of the low-rank factors + the DaE member's norm toward the dense member on the
    # calibration batches (0 = none).
    heal_steps: NonNegInt = 20
    heal_lr: PositiveFloat = 1e-5
    # Held-out corpus batches: `loss_batches` x `batch_size` corpus_val blocks for the reported
    # before/after losses, and as many select_corpus.jsonl blocks for the budget search and the
    # keep-healing decision.
    loss_batches: PositiveInt = 4
    # Solution rows (batched by `batch_size`): the first this many eval.jsonl solutions for the reported
    # before/after losses, and the first this many select.jsonl rows (data.num_select) for the budget
    # search and the keep-healing decision. A solution loss is a few hundredths of a nat per token, so a
    # 2% budget is about 0.001 nats: 16 rows measured it with noise as large as the budget (RESULTS).
    solution_rows: PositiveInt = 100
    # Quality budget: relative loss increase allowed on every exit (the gates check it on the reported
    # held-out losses).
    max_relative_loss_increase: Fraction = 0.02
    # Budget search: when the decomposition at `ratio` raises the DaE member's loss on the healing-decision
    # set (select files, trained by no stage) by more than the budget, retry `ratio_step` lower, down to
    # `min_ratio`; the largest ratio within the budget is published (false: `ratio` as given).
    fit_budget: bool = True
    min_ratio: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.1
    ratio_step: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.02
    # Greedy exact-match accuracy of the DaE member before DaE / dense / decomposed on the first this
    # many eval.jsonl problems (0 = not measured), with at most `max_new_tokens` new tokens each.
    accuracy_problems: NonNegInt = 100
    max_new_tokens: PositiveInt = 64

    @model_validator(mode="after")
    def _check(self) -> CompressParams:
        if self.fit_budget and self.min_ratio > self.ratio:
            raise ValueError(
                f"compress.min_ratio ({self.min_ratio}) must not exceed compress.ratio ({self.ratio}): the "
                "budget search lowers the ratio from compress.ratio down to compress.min_ratio"
            )
        return self


class EvaluateParams(_Section):
    """Per-exit quality, speed and size of one checkpoint; see tasks/evaluate.py."""

    # Family checkpoint directory to evaluate; null = <artifacts_dir>/compress (the VL profile:
    # <artifacts_dir>/rl).
    checkpoint: str | None = None
    # Math accuracy and solution loss on the first `num_problems` rows of eval.jsonl.
    num_problems: PositiveInt = 100
    # Greedy budget per problem (the tiny data's solutions: median 50 tokens, p95 114).
    max_new_tokens: PositiveInt = 128
    # Prompts per left-padded greedy decoding batch.
    decode_batch_size: PositiveInt = 32
    # Held-out corpus loss: this many batches of `batch_size` packed `seq_len`-token blocks.
    loss_batches: PositiveInt = 4
    seq_len: PositiveInt = 256
    # Blocks (corpus) or examples (eval solutions) per loss batch.
    batch_size: PositiveInt = 8
    # Decoding speed: batch 1, exactly this many new tokens, after `speed_warmup` untimed runs.
    speed_new_tokens: PositiveInt = 32
    speed_warmup: NonNegInt = 1
    speed_repeats: PositiveInt = 3


class RouteParams(_Section):
    """The difficulty router of the `auto` tier: signal, calibration and report (tasks/route.py)."""

    # Router threshold in [0, 1] (0: always the cheapest member, 1: always the deepest); null = the
    # operating point calibrated on the select split.
    threshold: Fraction | None = None
    # Backbone layers the prompt passes for the signal (0 = the embeddings); null = the layers every
    # member shares. Counted in every request's cost.
    probe_layers: NonNegInt | None = None
    # Calibration: the cheapest threshold whose cross-fitted select accuracy is at most this much below
    # always-deepest's; also the accuracy loss the goal allows.
    max_accuracy_loss: Fraction = 0.01
    # The goal reported in metrics/route.json: at least this relative saving in layers per request.
    target_layer_saving: Fraction = 0.4
    # Probe: L2 penalty of the logistic regressions (standardized features) and the cross-fitting folds.
    l2: PositiveFloat = 10.0
    folds: Annotated[int, Field(ge=2)] = 5
    # Calibration rows (first of select.jsonl) and reported rows (first of eval.jsonl).
    num_select: PositiveInt = 200
    num_problems: PositiveInt = 200
    # Greedy decoding of every member on both splits (as evaluate decodes).
    max_new_tokens: PositiveInt = 64
    decode_batch_size: PositiveInt = 32


class GatesParams(_Section):
    """Model quality gates (data_contracts), checked before export/deploy."""

    max_loss: PositiveFloat = 8.0
    # Every exit's held-out loss must be at least this many nats below ln(vocab_size) (the loss of
    # a uniform prediction).
    min_loss_margin: Annotated[float, Field(ge=0.0)] = 0.0
    # A deeper exit may be worse than a shallower one by at most this (relative) tolerance.
    depth_tolerance: Fraction = 0.05
    # Minimum math accuracy: one floor for every exit, or a floor per exit layer ({8: 0.4, ...};
    # an exit not listed has floor 0).
    min_accuracy: Fraction | dict[PositiveInt, Fraction] = 0.0
    # The RL-trained members' held-out accuracy may drop by at most this much during rl (before rl ->
    # the kept step). Under verdict interval the interval carries the prompts' noise, so 0 means "not
    # worse"; under point, set a noise margin.
    max_rl_accuracy_drop: Fraction = 0.0
    # How the gates on per-item estimates (loss, depth, loss margin, accuracy floor, rl's accuracy
    # change) decide: interval = a gate fails only when the whole paired bootstrap interval of its
    # statistic (over the evaluate stage's items, or rl's held-out prompts) lies past its bar, and one
    # whose interval straddles the bar passes and is reported undecided; point = the estimate decides.
    # compress's relative loss change is an estimate either way (that stage writes no per-item results).
    verdict: Literal["point", "interval"] = "interval"
    # Bootstrap resamples of the items (the seed is the run's `seed`).
    resamples: Annotated[int, Field(ge=100)] = 2000
    # Coverage of the interval.
    confidence: Annotated[float, Field(gt=0.5, lt=1.0)] = 0.95

    def accuracy_floor(self, exit_layer: int) -> float:
        if isinstance(self.min_accuracy, dict):
            return float(self.min_accuracy.get(exit_layer, 0.0))
        return float(self.min_accuracy)


class StoreParams(_Section):
    """The artifact store for releases (tasks/release/store.py): a local directory or any S3 endpoint."""

    backend: Literal["local", "s3"] = "local"
    # local backend: the store directory (releases under <root>/<model>/<version>/).
    root: str = "store"
    # s3 backend: an existing bucket and a key prefix inside it. Credentials come from the standard
    # AWS chain (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, profiles), never from this file.
    bucket: str | None = None
    prefix: str = "ruyi"
    # null: $AWS_ENDPOINT_URL_S3, else $AWS_ENDPOINT_URL, else AWS; e.g. http://127.0.0.1:8333 for SeaweedFS
    # or MinIO.
    endpoint_url: str | None = None
    # Signing region; null: from the AWS config, else us-east-1.
    region: str | None = None
    # auto: path-style with an endpoint_url (SeaweedFS/MinIO need it), botocore's default on AWS.
    addressing_style: Literal["auto", "path", "virtual"] = "auto"
    # Files of at least this size go up in parts of multipart_chunksize_mib (S3 minimum part: 5 MiB).
    multipart_threshold_mib: PositiveFloat = 64.0
    multipart_chunksize_mib: Annotated[float, Field(ge=5.0)] = 16.0
    max_concurrency: PositiveInt = 4
    # Fail fast on a dead endpoint: botocore retry mode "standard" with this many attempts in all.
    connect_timeout_s: PositiveFloat = 5.0
    read_timeout_s: PositiveFloat = 60.0
    max_attempts: PositiveInt = 5
    # How an upload is verified: checksum = the server's SHA-256 of what it stored (no extra
    # traffic); download = read every object back and hash it (for endpoints without checksums).
    verify: Literal["checksum", "download"] = "checksum"
    # Where fetched releases are kept; null = <paths.artifacts_dir>/releases.
    cache_dir: str | None = None

    @model_validator(mode="after")
    def _check(self) -> StoreParams:
        if self.backend == "s3" and not self.bucket:
            raise ValueError("store.bucket is required when store.backend is s3")
        if self.endpoint_url is not None and not self.endpoint_url.startswith(("http://", "https://")):
            raise ValueError(
                f"store.endpoint_url must start with http:// or https://, got {self.endpoint_url!r}"
            )
        return self


class DistributedParams(_Section):
    """Data parallelism of the training stages cpt, family_sft, expand and sft
    (tasks/training/distributed.py)."""

    # local: one process (the default); ray: Ray Train TorchTrainer workers with DistributedDataParallel.
    backend: Literal["local", "ray"] = "local"
    # Data-parallel workers; each takes 1/num_workers of every global batch (batch_size * grad_accum rows).
    num_workers: PositiveInt = 2
    # One GPU per worker (nccl); false: CPU workers (gloo).
    use_gpu: bool = False
    # Logical CPUs reserved per worker (Ray sets each worker's OMP_NUM_THREADS from it).
    cpus_per_worker: PositiveFloat = 1.0
    # Ray cluster address ("auto", "host:port", "ray://host:port"); null: the Ray already running in this
    # process, else a local Ray started with num_workers * cpus_per_worker CPUs.
    address: str | None = None
    # Object store of the local Ray started here (unused with an address).
    object_store_mib: Annotated[int, Field(ge=80)] = 512
    # Ray Train's run directory (reachable from every node; an s3:// URI works);
    # null: <paths.artifacts_dir>/checkpoints/.ray_train (removed after each run).
    storage_path: str | None = None
    # Timeout of the process group's collectives.
    timeout_s: PositiveInt = 1800


class MegatronLayout(_Section):
    """The TP x PP x DP split of the megatron backend (world size tp * pp * dp processes)."""

    # Tensor parallelism: must divide the attention heads, KV heads, FFN width and vocabulary.
    tp: PositiveInt = 1
    # Pipeline parallelism: equal stages; must divide the layers; each member lives on its exit's stage.
    pp: PositiveInt = 1
    # Data parallelism: every micro-batch (batch_size rows) is split over dp ranks (dp | batch_size).
    dp: PositiveInt = 1
    # Recompute every decoder layer's activations in the backward pass (keeps only layer inputs).
    recompute: bool = False


class TrainingParams(_Section):
    """Training engine of the family stages cpt and family_sft (docs/choices.md#training).

    hf: the FamilialForCausalLM in one process or Ray Train DDP workers (tasks/training/loop.py);
    megatron: megatron-core GPTModel family (ruyi_model.megatron) on tp x pp x dp processes with
    megatron's DDP, optimizer, 1F1B pipeline schedule and dist_checkpointing
    (tasks/training/megatron_backend.py); same batches, multi-exit loss, weight and lr schedules.
    The DaE stages (expand, sft, rl) always use hf: they train a few blocks of one member.
    """

    backend: Literal["hf", "megatron"] = "hf"
    megatron: MegatronLayout = MegatronLayout()


# Ray reserves worker ports 10002-19999 on every node for its workers: serving there collides.
_RAY_WORKER_PORTS = range(10002, 20000)


class ExportParams(_Section):
    """The export stage (tasks/export.py): extra formats written next to each stock member."""

    # GGUF files written as exit_<d>/model-<dtype>.gguf for every member (llama.cpp's format, arch
    # "qwen3"; the DaE member's from its dense export), each loaded back with transformers' GGUF loader
    # and checked against the member's logits. f32 | f16 | q8_0; [] = none.
    gguf_dtypes: list[Literal["f32", "f16", "q8_0"]] = ["f32", "q8_0"]

    @field_validator("gguf_dtypes")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"lists a dtype twice: {value}")
        return value


#: The dynamic tier's default confidence threshold (`deploy.dynamic_threshold`, and the serving app's
#: default). Measured on the tiny family of three data seeds (600 eval problems, benchmarks/RESULTS.md,
#: "The dynamic tier's default"): 0.9, 0.95 and 0.99 all answer within 0.2 points of the deepest member
#: on average; 0.95 decodes as fast as 0.9 (1.87x against 1.88x) and keeps more of the deepest member's
#: completions (94.8% against 91.3%); 0.99 keeps 98.7% at 1.77x.
DYNAMIC_THRESHOLD = 0.95

#: The speculative tier's defaults (`deploy.speculative_draft_tokens` / `_threshold` / `_blocks`, and the
#: serving app's): up to SPECULATIVE_DRAFT_TOKENS drafts per round, a round stopping after a draft the
#: draft member gives a probability below SPECULATIVE_DRAFT_THRESHOLD, the draft member running its DaE
#: blocks only if SPECULATIVE_DRAFT_BLOCKS. Measured on the first 200 eval problems of the tiny families
#: of three data seeds (benchmarks/RESULTS.md, "Self-speculative decoding past 2x"), exit 2 drafting:
#: without its DaE blocks 2.44x the deepest member's `generate` on average (2.43-2.45x; 0.9 measured
#: the same within the noise), with them 1.65x; every completion identical to the deepest member's.
#: Gated rounds beat fixed lengths (the recorded family: 1.70x against 1.44x for a fixed 4 drafts).
SPECULATIVE_DRAFT_TOKENS = 16
SPECULATIVE_DRAFT_THRESHOLD = 0.95
SPECULATIVE_DRAFT_BLOCKS = False


class DeployParams(_Section):
    """Publishing `artifacts/export/` as a release and serving it (tasks/deploy.py,
    tasks/release/serving.py)."""

    # Release name in the store (letters, digits, '.', '_', '-').
    model_name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")] = "ruyi-tiny"
    # null: v0001, v0002, ... (an export identical to the latest release reuses it); or a fixed name.
    version: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")] | None = None
    store: StoreParams = StoreParams()
    # HTTP address of the Ray Serve application (deploy's smoke test and `ruyi serve`).
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=1024, le=65535)] = 8124
    # Requests asking for more new tokens get HTTP 400.
    max_tokens_limit: PositiveInt = 128
    # Per request: more prompts get HTTP 413; more new tokens in all (prompts x max_tokens) get 422.
    max_prompts_per_request: PositiveInt = 16
    max_total_new_tokens: PositiveInt = 4096
    # Default confidence threshold of the dynamic early-exit tier (model "dynamic"); why 0.95:
    # DYNAMIC_THRESHOLD.
    dynamic_threshold: Annotated[float, Field(gt=0.0, le=1.0)] = DYNAMIC_THRESHOLD
    # Speculative tier (model "speculative"): the drafting member (null = the shallowest), the most
    # tokens it drafts per round, its confidence gate (a round stops drafting after a token the draft
    # gives a probability below the threshold; 0: always the most), and whether it drafts with its DaE
    # blocks (false: with its layers before expansion, a cheaper draft; the output is the deepest
    # member's either way). A request may override all four; why these: SPECULATIVE_DRAFT_TOKENS.
    speculative_draft_exit: PositiveInt | None = None
    speculative_draft_tokens: Annotated[int, Field(ge=1, le=16)] = SPECULATIVE_DRAFT_TOKENS
    speculative_draft_threshold: Annotated[float, Field(ge=0.0, le=1.0)] = SPECULATIVE_DRAFT_THRESHOLD
    speculative_draft_blocks: bool = SPECULATIVE_DRAFT_BLOCKS
    # Vision-language releases: images (base64 data URLs) per chat request, and each image's size in
    # bytes and decoded pixels; more get HTTP 413. A text release refuses images whatever these say.
    max_images_per_request: PositiveInt = 4
    max_image_bytes: PositiveInt = 8 * 2**20
    max_image_pixels: PositiveInt = 4096 * 4096
    # Smoke test: the first smoke_prompts eval.jsonl questions, greedy, at every tier, with at most
    # smoke_max_tokens new tokens. Each exit tier's answer is compared with evaluate's completion of the
    # question: whole at evaluate.max_new_tokens (the default), else the shorter cut begins the longer.
    smoke_prompts: PositiveInt = 4
    smoke_max_tokens: PositiveInt = 128
    # Resources of the one serving replica (a GPU per replica at paper scale), where it puts the
    # models ("auto": cuda when the replica has one) and in which dtype.
    replica_num_cpus: Annotated[float, Field(gt=0.0, le=64.0)] = 0.5
    replica_num_gpus: Annotated[float, Field(ge=0.0, le=8.0)] = 0.0
    device: Annotated[str, Field(pattern=r"^(cpu|auto|cuda(:\d+)?)$")] = "cpu"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # The local Ray instance deploy / `ruyi serve` start (ignored with ray_address).
    ray_num_cpus: PositiveInt = 2
    ray_object_store_mib: Annotated[int, Field(ge=80)] = 256
    # null: start a local Ray instance; else the address of a running cluster (e.g. "auto").
    ray_address: str | None = None

    @model_validator(mode="after")
    def _check(self) -> DeployParams:
        if self.port in _RAY_WORKER_PORTS:
            raise ValueError(
                f"deploy.port {self.port} is in Ray's worker port range 10002-19999; pick another"
            )
        if self.replica_num_cpus > self.ray_num_cpus and self.ray_address is None:
            raise ValueError(
                f"deploy.replica_num_cpus ({self.replica_num_cpus}) exceeds deploy.ray_num_cpus "
                f"({self.ray_num_cpus}): the replica could never be scheduled"
            )
        if self.max_tokens_limit > self.max_total_new_tokens:
            raise ValueError(
                f"deploy.max_tokens_limit ({self.max_tokens_limit}) exceeds deploy.max_total_new_tokens "
                f"({self.max_total_new_tokens}): a one-prompt request (every chat) could ask for more than "
                "the server's total"
            )
        return self


class PrivacyParams(_Section):
    """The edge-cloud camera's privacy stage (tasks/privacy.py): not part of the default text pipeline."""

    # A vision-language family checkpoint (FamilialVLForConditionalGeneration.save_pretrained) whose
    # vision tower the edge runs (frozen); null = the stage builds the tiny Qwen3-VL tower and trains it
    # on the clips' behaviour labels for `tower_steps` steps (a trained tower, not a random one).
    family_dir: str | None = None
    tower_steps: NonNegInt = 300
    tower_lr: PositiveFloat = 1e-3
    # The generated camera clips (tasks/data/camgen.py): identities (>= 20 in the tiny profile),
    # training / held-out clips (held-out clips show the same identities, never the same clip).
    identities: Annotated[int, Field(ge=2)] = 24
    train_clips: PositiveInt = 600
    test_clips: PositiveInt = 240
    frames: Annotated[int, Field(ge=2, le=4)] = 3
    size: Annotated[int, Field(ge=16, multiple_of=16)] = 32
    # The mapping (ruyi_model/privacy.py): released dimension, width, training steps, the KL weight
    # `beta` (the gated mapping) and the identity adversary's weight (0 = none).
    out_dim: PositiveInt = 16
    hidden: PositiveInt = 128
    steps: PositiveInt = 600
    beta: Annotated[float, Field(ge=0.0)] = 0.01
    adv_weight: Annotated[float, Field(ge=0.0)] = 1.0
    # The privacy-utility curve: one mapping per beta, each audited by every attack ([] = none).
    betas: list[Annotated[float, Field(ge=0.0)]] = [0.0, 0.001, 0.01, 0.1, 1.0]
    # Also audit the no-privacy reference: the same mapping with beta = 0 and no adversary (metrics
    # `no_privacy`; dimension reduction and task training only).
    audit_reference: bool = True
    # Attackers: epoch cap and patience (convergence on a held-out fifth of the training clips),
    # releases per training clip, the inversion decoder's epochs, the raw-frame identifier's epochs.
    attack_max_epochs: PositiveInt = 400
    attack_patience: PositiveInt = 20
    attack_draws: PositiveInt = 4
    decoder_epochs: PositiveInt = 30
    identifier_epochs: PositiveInt = 15
    # The gate: behaviour F1 >= min_f1_ratio x the raw-feature F1; re-identification (best attacker)
    # and identity on reconstructions <= chance + reid_margin.
    min_f1_ratio: Fraction = 0.9
    reid_margin: Fraction = 0.05
    # The cloud's deep member (ruyi_model.camera.CloudMember; needs family_dir): the family's deepest
    # member reads the released features as `cloud_tokens` soft tokens in place of an image and answers
    # the clips' questions in text; trained `cloud_steps` AdamW steps of `cloud_batch` clips (every
    # question) at `cloud_lr`, and the same member on raw edge features as the non-private reference.
    # The gate then also asks QA accuracy >= min_qa_ratio x that reference's. false: the cloud is the
    # behaviour head alone (its answers follow from the predicted behaviour).
    cloud_member: bool = False
    cloud_tokens: PositiveInt = 4
    cloud_steps: PositiveInt = 200
    cloud_batch: PositiveInt = 16
    cloud_lr: PositiveFloat = 1e-3
    min_qa_ratio: Fraction = 0.9


class VisionParams(_Section):
    """The Qwen3-VL vision tower shared by every member of a VL family (its output width is
    model.hidden_size)."""

    depth: PositiveInt = 2
    hidden_size: PositiveInt = 64
    intermediate_size: PositiveInt = 128
    num_heads: PositiveInt = 4
    patch_size: PositiveInt = 8
    spatial_merge_size: PositiveInt = 2
    num_position_embeddings: PositiveInt = 64
    deepstack_visual_indexes: list[NonNegInt] = [0]
    # M-RoPE split of the text head's rotary frequencies over (t, h, w): sums to model.head_dim / 2
    mrope_section: list[NonNegInt] = [4, 6, 6]

    @model_validator(mode="after")
    def _check(self) -> VisionParams:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"vl.vision.hidden_size {self.hidden_size} must be a multiple of num_heads")
        bad = [i for i in self.deepstack_visual_indexes if i >= self.depth]
        if bad:
            raise ValueError(
                f"vl.vision.deepstack_visual_indexes {bad} are not blocks of a depth-{self.depth} tower"
            )
        return self


VL_TASKS = (
    "scene_count", "scene_colour", "scene_position", "scene_relation", "caption",
    "chart_bar", "chart_line", "chart_pie", "arithmetic", "geometry",
)  # fmt: skip


class VLParams(_Section):
    """The vision-language profile (model.modality: vl): generated VQA data and the vision tower."""

    tasks: list[str] = ["scene_count", "scene_colour", "scene_position", "scene_relation"]
    rl_tasks: list[str] = ["scene_count"]
    image_size: PositiveInt = 32
    num_train: PositiveInt = 4000
    num_select: PositiveInt = 200
    num_eval: PositiveInt = 200
    max_answer_tokens: PositiveInt = 6
    # family_sft also trains on the captions (every object's colour, shape and cell: dense supervision
    # of the vision tower; they are never evaluated)
    sft_captions: bool = True
    # family_sft's and rl's lr multiplier for the vision tower and its mergers (`model.visual.*`): at the
    # text backbone's lr they grew their features ~100x (norm 1 -> 100, text embeddings 0.3) along colour
    # and cell, and the members never learned to read shape (counting at the shape-blind 40%)
    vision_lr_scale: Annotated[float, Field(gt=0.0)] = 1.0
    vision: VisionParams = VisionParams()

    @model_validator(mode="after")
    def _check(self) -> VLParams:
        for name in ("tasks", "rl_tasks"):
            bad = [t for t in getattr(self, name) if t not in VL_TASKS or t == "caption"]
            if bad or not getattr(self, name):
                raise ValueError(
                    f"vl.{name} {bad}: must be a non-empty list of {[t for t in VL_TASKS if t != 'caption']}"
                )
        if not set(self.rl_tasks) <= set(self.tasks):
            raise ValueError(f"vl.rl_tasks {self.rl_tasks} must be among vl.tasks {self.tasks}")
        grid = self.vision.patch_size * self.vision.spatial_merge_size
        if self.image_size % grid:
            raise ValueError(f"vl.image_size {self.image_size} must be a multiple of patch x merge = {grid}")
        return self


class Params(_Section):
    seed: NonNegInt = 1234
    # Intra-op (torch/OpenMP) threads of every stage (tasks.core.stage.set_threads): a positive int, or
    # "auto" = the CPUs this process may use (its affinity, capped by its cgroup CPU quota:
    # tasks.core.cpus), capped by OMP_NUM_THREADS when that is set.
    threads: Literal["auto"] | PositiveInt = "auto"
    paths: PathsParams = PathsParams()
    model: ModelParams = ModelParams()
    data: DataParams = DataParams()
    validate_data: ValidateParams = ValidateParams()
    tokenizer: TokenizerParams = TokenizerParams()
    cpt: CPTParams = CPTParams()
    family_sft: FamilySFTParams = FamilySFTParams()
    expand: ExpandParams = ExpandParams()
    sft: SFTParams = SFTParams()
    rl: RLParams = RLParams()
    compress: CompressParams = CompressParams()
    evaluate: EvaluateParams = EvaluateParams()
    route: RouteParams = RouteParams()
    gates: GatesParams = GatesParams()
    export: ExportParams = ExportParams()
    deploy: DeployParams = DeployParams()
    distributed: DistributedParams = DistributedParams()
    training: TrainingParams = TrainingParams()
    privacy: PrivacyParams = PrivacyParams()

    vl: VLParams = VLParams()

    @field_validator("threads", mode="before")
    @classmethod
    def _check_threads(cls, value: Any) -> Any:
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value > 0):
            return value
        raise ValueError("must be 'auto' or a positive integer (intra-op threads of every stage)")

    @model_validator(mode="after")
    def _cross_checks(self) -> Params:
        if self.distributed.backend == "ray":
            for name in ("cpt", "family_sft", "expand", "sft"):
                section = getattr(self, name)
                rows = section.batch_size * section.grad_accum
                if rows < self.distributed.num_workers:
                    raise ValueError(
                        f"distributed.num_workers ({self.distributed.num_workers}) exceeds the global "
                        f"batch of {name} ({name}.batch_size x {name}.grad_accum = {rows} rows): every "
                        f"worker needs at least one row of each step"
                    )
        if self.training.backend == "megatron":
            self._check_megatron()
        exits = self.model.exit_layers
        if self.expand.exit_layer is not None and self.expand.exit_layer not in exits:
            raise ValueError(
                f"expand.exit_layer {self.expand.exit_layer} is not one of model.exit_layers {exits}"
            )
        draft = self.deploy.speculative_draft_exit
        if draft is not None and draft not in exits[:-1]:
            raise ValueError(
                f"deploy.speculative_draft_exit {draft} must be a member shallower than the deepest, one of "
                f"{exits[:-1]}"
            )
        if isinstance(self.rl.members, list):
            bad = [m for m in self.rl.members if m not in exits]
            if bad:
                raise ValueError(f"rl.members {bad} are not in model.exit_layers {exits}")
        if self.model.modality == "text":
            self._check_select_rows()
        if self.tokenizer.vocab_size > 1 << 20:
            raise ValueError("tokenizer.vocab_size is unreasonably large")
        if self.model.modality == "vl":
            self._check_vl()
        return self

    def _check_select_rows(self) -> None:
        # select.jsonl holds data.num_select rows (fewer only if validation quarantines some: the stages
        # check the file itself); what reads it a fixed number of rows must fit in it.
        have, compress = self.data.num_select, self.compress
        for key, need in (
            ("rl.select_prompts", self.rl.select_prompts),
            ("compress.solution_rows", compress.solution_rows),
        ):
            if need > have:
                raise ValueError(
                    f"{key} = {need} exceeds data.num_select = {have} (the rows of select.jsonl): raise "
                    f"data.num_select or lower {key}"
                )

    def _check_vl(self) -> None:
        m, v = self.model, self.vl
        if sum(v.vision.mrope_section) * 2 != m.head_dim:
            raise ValueError(
                f"vl.vision.mrope_section {v.vision.mrope_section} must sum to model.head_dim / 2 "
                f"= {m.head_dim // 2}"
            )
        for key, value in (("model.init_from", m.init_from), ("training.backend", self.training.backend)):
            if value not in (None, "hf"):
                raise ValueError(f"{key}={value!r}: the VL profile builds a fresh family on the hf backend")
        if self.distributed.backend != "local":
            raise ValueError("distributed.backend: the VL profile trains in one process (local)")

    def _check_megatron(self) -> None:
        lay = self.training.megatron
        world = lay.tp * lay.pp * lay.dp
        if self.distributed.backend == "ray" and self.distributed.num_workers != world:
            raise ValueError(
                f"distributed.num_workers ({self.distributed.num_workers}) must equal the megatron world "
                f"size training.megatron.tp x pp x dp = {lay.tp} x {lay.pp} x {lay.dp} = {world}"
            )
        for name in ("cpt", "family_sft"):
            section = getattr(self, name)
            if section.batch_size % lay.dp:
                raise ValueError(
                    f"training.megatron.dp ({lay.dp}) must divide {name}.batch_size ({section.batch_size}): "
                    f"each micro-batch is split over the data-parallel ranks"
                )
        if self.model.init_from is None:
            from types import SimpleNamespace

            from ruyi_model.megatron.layout import check_split

            m = self.model
            shape = SimpleNamespace(
                num_attention_heads=m.num_attention_heads,
                num_key_value_heads=m.num_key_value_heads,
                intermediate_size=m.intermediate_size,
                vocab_size=64 * lay.tp,  # the vocabulary is checked on the built family
                num_hidden_layers=m.num_hidden_layers,
                lowrank_ranks=None,
                exit_layers=list(m.exit_layers),
                exit_branch_layers=m.exit_branch_layers,
                shared_heads=m.shared_heads,
                backbone_depth=lambda d: d if d == m.exit_layers[-1] else d - m.exit_branch_layers,
            )
            try:
                check_split(shape, lay.tp, lay.pp)
            except ValueError as e:
                raise ValueError(f"training.megatron (tp={lay.tp}, pp={lay.pp}): {e}") from None

    @property
    def dae_exit(self) -> int:
        """The member DaE expands: `expand.exit_layer`, or the smallest member."""
        return self.expand.exit_layer if self.expand.exit_layer is not None else self.model.exit_layers[0]


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check its spelling and section)"
        # A model validator's input is its whole section (or, at the root, every parameter): its message
        # names the values, so only a single field's input is quoted.
        quote = e["type"] != "extra_forbidden" and not isinstance(e["input"], dict)
        lines.append(f"  {key}: {msg}" + (f" (got {e['input']!r})" if quote else ""))
    return "\n".join(lines)


def _is_section(parts: list[str]) -> bool:
    """Whether the dotted key `parts` names a section of the schema (a model of its own, e.g. `cpt` or
    `rl.bppo`), not a field whose value is a mapping (e.g. `gates.min_accuracy`)."""
    model: Any = Params
    for part in parts:
        field = (
            model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        )
        if field is None:
            return False
        model = field.annotation
    return isinstance(model, type) and issubclass(model, BaseModel)


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any] | None) -> dict[str, Any]:
    """Returns a copy of `raw` with dotted-key `overrides` applied ({"cpt.lr": 1e-3}).

    A mapping for a section the file already has (`cpt={max_steps: 600}`) is refused: it would replace the
    whole section, its other keys falling back to the schema's defaults (not the file's values)."""
    import copy

    out = copy.deepcopy(raw)
    for dotted, value in (overrides or {}).items():
        node = out
        parts = dotted.split(".")
        for part in parts[:-1]:
            if not isinstance(node.setdefault(part, {}), dict):
                raise ParamsError(f"override {dotted!r}: {part!r} is not a section")
            node = node[part]
        if isinstance(value, dict) and isinstance(node.get(parts[-1]), dict) and _is_section(parts):
            example = next(iter(value), "key")
            raise ParamsError(
                f"override {dotted!r}: a mapping would replace the whole section (its other keys would "
                f"take the schema's defaults, not this file's); set its keys one by one, e.g. "
                f"{dotted}.{example}=..."
            )
        node[parts[-1]] = value
    return out


def load_params(path: str | Path = "params.yaml", overrides: dict[str, Any] | None = None) -> Params:
    """Reads and validates a params file; raises ParamsError naming the file and every bad key."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"params file not found: {path}")
    try:
        raw = load_yaml(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ParamsError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: the top level must be a mapping of sections")
    raw = apply_overrides(raw, overrides)
    try:
        return Params.model_validate(raw)
    except ValidationError as e:
        raise ParamsError(f"{path}: invalid parameters:\n{_format_errors(e)}") from None
