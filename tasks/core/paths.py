"""Where every stage reads and writes: one `Workspace` built from `params.paths`.

    ws = Workspace.from_params(params)
    ws.corpus_train            # data/validated/corpus_train.jsonl
    ws.artifacts("cpt")        # artifacts/cpt/ (a model stage's output)
    ws.checkpoints("cpt")      # artifacts/checkpoints/cpt/ (resumption state, not a DVC output)
    ws.plots("cpt")            # plots/cpt/ (created)

Every directory is relative to the working directory unless params.paths says otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tasks.core.params import Params

#: The files of the validated data set (`data/validated/`), as validate_data publishes them.
VALIDATED_FILES = (
    "corpus_train.jsonl",
    "corpus_val.jsonl",
    "sft.jsonl",
    "rl.jsonl",
    "eval.jsonl",
    "select_corpus.jsonl",  # the healing-decision split: no stage trains on these two
    "select.jsonl",
)


@dataclass(frozen=True)
class Workspace:
    """The workspace directories of `params.paths` and the named places inside them."""

    data_dir: Path
    artifacts_dir: Path
    metrics_dir: Path
    plots_dir: Path
    reports_dir: Path

    @classmethod
    def from_params(cls, params: Params) -> Workspace:
        p = params.paths
        return cls(
            Path(p.data_dir),
            Path(p.artifacts_dir),
            Path(p.metrics_dir),
            Path(p.plots_dir),
            Path(p.reports_dir),
        )

    # --- data -----------------------------------------------------------------------------
    @property
    def raw(self) -> Path:
        """prepare_data's output (`data/raw/`)."""
        return self.data_dir / "raw"

    @property
    def validated(self) -> Path:
        """validate_data's output: the rows that passed the contracts (`data/validated/`)."""
        return self.data_dir / "validated"

    @property
    def quarantine(self) -> Path:
        """validate_data's rejected rows (`data/quarantine/`)."""
        return self.data_dir / "quarantine"

    def validated_file(self, name: str) -> Path:
        """A file of the validated data set; `name` must be one of VALIDATED_FILES."""
        if name not in VALIDATED_FILES:
            raise ValueError(f"unknown validated data file {name!r} (one of {', '.join(VALIDATED_FILES)})")
        return self.validated / name

    @property
    def corpus_train(self) -> Path:
        return self.validated_file("corpus_train.jsonl")

    @property
    def corpus_val(self) -> Path:
        return self.validated_file("corpus_val.jsonl")

    @property
    def sft_data(self) -> Path:
        return self.validated_file("sft.jsonl")

    @property
    def rl_data(self) -> Path:
        return self.validated_file("rl.jsonl")

    @property
    def eval_data(self) -> Path:
        return self.validated_file("eval.jsonl")

    # --- artifacts ------------------------------------------------------------------------
    def artifacts(self, stage: str) -> Path:
        """A stage's output directory (`artifacts/<stage>/`): for the model stages a self-contained
        `save_pretrained` family plus the tokenizer files (`tasks.core.artifacts.load_family`)."""
        return self.artifacts_dir / stage

    @property
    def tokenizer(self) -> Path:
        """The pipeline tokenizer (`artifacts/tokenizer/`)."""
        return self.artifacts("tokenizer")

    def checkpoints(self, stage: str) -> Path:
        """Resumable checkpoints of a stage (`artifacts/checkpoints/<stage>/`: resumption state, not a DVC
        output, so DVC never deletes it and audits do not compare it)."""
        return self.artifacts_dir / "checkpoints" / stage

    @property
    def ray_train(self) -> Path:
        """Ray Train's run directory when `distributed.storage_path` is null (removed after each run)."""
        return self.checkpoints(".ray_train")

    @property
    def releases(self) -> Path:
        """Where fetched releases are kept when `deploy.store.cache_dir` is null."""
        return self.artifacts_dir / "releases"

    # --- outputs for people ---------------------------------------------------------------
    def metrics(self, stage: str) -> Path:
        """A stage's metrics file (`metrics/<stage>.json`)."""
        return self.metrics_dir / f"{stage}.json"

    def reproducible_metrics(self, stage: str) -> Path:
        """The reproducible part of a stage's metrics (`metrics/reproducible/<stage>.json`): what audits
        compare (the complete `metrics/<stage>.json` holds timings too)."""
        return self.metrics_dir / "reproducible" / f"{stage}.json"

    def plots(self, stage: str) -> Path:
        """A stage's plots directory (`plots/<stage>/`), created if missing."""
        path = self.plots_dir / stage
        path.mkdir(parents=True, exist_ok=True)
        return path

    def reports(self, stage: str) -> Path:
        """A stage's reports directory (`reports/<stage>/`; not created)."""
        return self.reports_dir / stage

    @property
    def eval_generations(self) -> Path:
        """evaluate's per-item greedy completions, one row per (member, problem)
        (`reports/evaluate/generations.jsonl`): what deploy's served members must answer."""
        return self.reports("evaluate") / "generations.jsonl"

    @property
    def eval_items(self) -> Path:
        """evaluate's per-item results, one row per (member, item) (`reports/evaluate/items.jsonl`,
        `data_contracts.gates.item_row`): what the gates resample for their intervals."""
        return self.reports("evaluate") / "items.jsonl"

    @property
    def rl_items(self) -> Path:
        """rl's per-prompt greedy verdicts on its held-out prompts, before rl and at the kept step, one
        row per (trained member, prompt) (`reports/rl/items.jsonl`, `data_contracts.items.item_row`):
        what the gates resample for the interval of rl's accuracy change."""
        return self.reports("rl") / "items.jsonl"
