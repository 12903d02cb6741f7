"""Resumable, fingerprinted training checkpoints (`Checkpointer`).

Library module. A checkpoint in `artifacts/checkpoints/<stage>/step_<n>/` holds the model, optimizer,
scheduler, RNG states and trainer state, written atomically; one whose fingerprint (params, seed,
inputs, code) differs is set aside, never resumed. Policy and why: docs/choices.md#training.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tasks.core.codedeps import REPO_ROOT, TEXT_PIPELINE, code_fingerprint
from tasks.core.files import atomic_dir, sha256_file, write_json
from tasks.core.stage import StageError

log = logging.getLogger("ruyi")
#: Parameters that do not change the trained weights (excluded from the checkpoint fingerprint).
NON_FINGERPRINT_KEYS = ("checkpoint_every", "eval_every", "eval_batches")


# --- inputs ----------------------------------------------------------------------------------
def dir_sha256(path: str | Path) -> dict[str, str]:
    """sha256 of every regular file directly inside `path` (model or tokenizer directories)."""
    path = Path(path)
    return {p.name: sha256_file(p) for p in sorted(path.iterdir()) if p.is_file()}


# --- checkpoints ---------------------------------------------------------------------------------
def fingerprint_info(
    stage: str,
    section: Any,
    *,
    seed: int,
    model: Any = None,
    inputs: dict[str, Any],
    extra: dict[str, Any] | None = None,
    exclude: Sequence[str] = (),
    code_root: str | Path | None = None,
    pipeline: str = TEXT_PIPELINE,
) -> dict[str, Any]:
    """What a checkpoint must agree on to be resumed (docs/choices.md#training).

    `exclude`: more parameters of `section` left out (besides `NON_FINGERPRINT_KEYS`), e.g. rl's `steps`
    (extending a run resumes it); `code_root`: the repository whose code is hashed (default: this one);
    `pipeline`: the pipeline file that runs the stage (`tasks.core.codedeps.PIPELINES`: the VL profile's
    stages also run `tasks.training.vl_pipeline`, whose code counts too).

    The code is the sha256 of every module the stage imports as `pipeline` runs it (the same list as its
    deps in that pipeline file): a checkpoint written by other code is stale (DVC reruns the stage when
    that code changes; resuming the old code's checkpoint would mix the two).
    """
    params = section.model_dump() if hasattr(section, "model_dump") else dict(section)
    for key in (*NON_FINGERPRINT_KEYS, *exclude):
        params.pop(key, None)
    info: dict[str, Any] = {
        "stage": stage,
        "seed": seed,
        "params": params,
        "inputs": inputs,
        "code": code_fingerprint(stage, REPO_ROOT if code_root is None else Path(code_root), pipeline),
    }
    if model is not None:
        info["model"] = model.model_dump() if hasattr(model, "model_dump") else model
    if extra:
        info["extra"] = extra
    return json.loads(json.dumps(info, sort_keys=True, default=str))


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: obj}


def fingerprint_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Human-readable 'key: old -> new' lines for every dotted key that differs."""
    a, b = _flatten(old), _flatten(new)
    lines = []
    for key in sorted(set(a) | set(b)):
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            lines.append(f"{key}: {a.get(key, '<absent>')!r} -> {b.get(key, '<absent>')!r}")
    return lines


#: The files every checkpoint has (`scheduler.pt` too when the stage has a scheduler).
CHECKPOINT_FILES = ("model.safetensors", "optimizer.pt", "rng.pt", "trainer_state.json")
#: sha256 and size of every file of a checkpoint, written last: its completeness marker.
MANIFEST = "checksums.json"
#: A stage's other tensors, when it saves some (`Checkpointer.save(tensors=...)`).
EXTRA_TENSORS = "extra.safetensors"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def _rng_state() -> dict[str, Any]:
    import numpy as np
    import torch

    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np
    import torch

    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_manifest(path: Path) -> None:
    """Writes `path/checksums.json`: {"files": {name: {"sha256", "bytes"}}} of every other file in `path`."""
    files = {
        p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        for p in sorted(path.iterdir())
        if p.is_file() and p.name != MANIFEST
    }
    write_json(path / MANIFEST, {"files": files})


def verify_checkpoint(path: Path, required: Sequence[str] = CHECKPOINT_FILES) -> str | None:
    """None if every file of the checkpoint `path` matches its manifest, else why not (naming the file).
    `required`: the files the manifest must list (another layout: the megatron backend's)."""
    manifest = path / MANIFEST
    if not manifest.is_file():
        return f"{MANIFEST} is missing (an incomplete checkpoint, or one written before checksums)"
    try:
        files = json.loads(manifest.read_text())["files"]
        entries = {str(name): (str(e["sha256"]), int(e["bytes"])) for name, e in files.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        return f"{MANIFEST} is unreadable ({type(e).__name__}: {e})"
    for name in required:
        if name not in entries:
            return f"{MANIFEST} does not list {name}"
    for name, (digest, size) in sorted(entries.items()):
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        actual = file.stat().st_size
        if actual != size:
            return f"{name} has {actual} bytes, {MANIFEST} records {size}"
        if sha256_file(file) != digest:
            return f"{name} does not match its sha256 in {MANIFEST} (corrupt)"
    return None


def _other_layout(path: Path, required: Sequence[str]) -> bool:
    """True if `path` is an intact checkpoint of another layout: its manifest lists exactly the files
    present, every one matches, and a file that `required` names is absent (not merely unlisted)."""
    if verify_checkpoint(path, ()) is not None:
        return False
    listed = set(json.loads((path / MANIFEST).read_text())["files"])
    present = {p.name for p in path.iterdir() if p.is_file() and p.name != MANIFEST}
    return listed == present and any(name not in present for name in required)


class Checkpointer:
    """Resumable checkpoints of one stage under `root` (see docs/choices.md#training).

    Args:
        root: `artifacts/checkpoints/<stage>`.
        info: `fingerprint_info(...)` of this run.
        keep: how many step directories to keep (at least 2: a checkpoint that fails verification is
            skipped for the previous one).
        required: the files a complete checkpoint has (default: this class's own `save` layout).

    After `find_resumable`: `stale` (the set-aside directory and its differences, or None) and
    `skipped` ([{"path", "reason"}] of the checkpoints that failed verification, newest first).
    """

    def __init__(
        self,
        root: str | Path,
        info: dict[str, Any],
        keep: int = 2,
        required: Sequence[str] = CHECKPOINT_FILES,
    ):
        if keep < 2:
            raise ValueError(
                f"Checkpointer keep={keep}: keep at least 2 checkpoints (a corrupt latest one "
                f"is skipped for the previous one)"
            )
        self.root = Path(root)
        self.info = info
        self.digest = hashlib.sha256(json.dumps(info, sort_keys=True).encode()).hexdigest()
        self.keep = keep
        self.required = tuple(required)
        self.stale: dict[str, Any] | None = None
        self.skipped: list[dict[str, str]] = []

    @property
    def stage(self) -> str:
        return str(self.info.get("stage", self.root.name))

    def step_dirs(self) -> list[tuple[int, Path]]:
        if not self.root.is_dir():
            return []
        found = [
            (int(m.group(1)), p) for p in self.root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()
        ]
        return sorted(found)

    def find_resumable(self) -> Path | None:
        """The latest verified checkpoint of this configuration, or None.

        Checkpoints are tried newest first: one that fails verification against its manifest is set
        aside to `<root>.corrupt/` and skipped for the previous one (a warning names the file and why;
        `skipped` records it); none left: training starts from scratch. A verified checkpoint from
        different parameters/inputs/code sets the whole directory aside (docs/choices.md#training), and so
        does an intact checkpoint of another layout (written by the other `training.backend`).
        """
        self.stale, self.skipped = None, []
        if self.root.is_dir():  # leftovers of a save or a pruning interrupted by SIGKILL (temporaries)
            for p in self.root.glob(".step_*.tmp-*"):
                shutil.rmtree(p, ignore_errors=True)
        for step, path in reversed(self.step_dirs()):
            reason = verify_checkpoint(path, self.required)
            if reason is not None and _other_layout(path, self.required):
                reason = None  # intact, written by the other training backend: stale, not corrupt
            state: dict[str, Any] = {}
            if reason is None:
                try:
                    state = json.loads((path / "trainer_state.json").read_text())
                except (OSError, ValueError) as e:
                    reason = f"trainer_state.json is missing or not valid JSON ({e})"
            if reason is not None:
                self._set_aside_corrupt(step, path, reason)
                continue
            if state.get("fingerprint") != self.digest:
                self._set_aside_stale(step, path, state)
                return None
            return path
        if self.skipped:
            log.warning(
                "%s: no checkpoint in %s passed verification (%s); training starts from scratch",
                self.stage,
                self.root,
                "; ".join(f"{s['path']}: {s['reason']}" for s in self.skipped),
            )
        return None

    def _set_aside_corrupt(self, step: int, path: Path, reason: str) -> None:
        aside = self.root.with_name(self.root.name + ".corrupt") / path.name
        if aside.exists():
            shutil.rmtree(aside)
        aside.parent.mkdir(parents=True, exist_ok=True)
        path.rename(aside)
        self.skipped.append({"path": str(path), "step": step, "reason": reason, "set_aside_to": str(aside)})
        log.warning(
            "%s: checkpoint %s fails verification: %s; skipped (set aside to %s), trying the previous one",
            self.stage,
            path,
            reason,
            aside,
        )

    def _set_aside_stale(self, step: int, path: Path, state: dict[str, Any]) -> None:
        diffs = fingerprint_differences(state.get("fingerprint_info", {}), self.info) or [
            "(fingerprint format)"
        ]
        stale = self.root.with_name(self.root.name + ".stale")
        if stale.exists():
            shutil.rmtree(stale)
        self.root.rename(stale)
        self.stale = {"set_aside_to": str(stale), "step": step, "differences": diffs}
        log.warning(
            "checkpoint %s was made with different parameters, inputs or code; set aside to %s and "
            "training starts from scratch. Differences:\n  %s",
            path,
            stale,
            "\n  ".join(diffs),
        )

    def save(
        self,
        step: int,
        model,
        optimizer,
        scheduler,
        state: dict[str, Any],
        tensors: dict[str, Any] | None = None,
    ) -> Path:
        """Writes `root/step_<step>/` atomically: the model, optimizer, scheduler (None: the stage has
        none), RNG states, `state` (JSON), `tensors` (a stage's other tensors, e.g. the weights it keeps
        from an earlier step: `extra.safetensors`, read back by `load_tensors`) and, last, the manifest;
        keeps the newest `keep`."""
        import torch
        from safetensors.torch import save_file

        final = self.root / f"step_{step}"
        with atomic_dir(final) as tmp:
            weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
            save_file(weights, str(tmp / "model.safetensors"))
            if tensors:
                save_file(
                    {k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                    str(tmp / EXTRA_TENSORS),
                )
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            if scheduler is not None:
                torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            torch.save(_rng_state(), tmp / "rng.pt")
            write_json(
                tmp / "trainer_state.json",
                {**state, "step": step, "fingerprint": self.digest, "fingerprint_info": self.info},
            )
            write_manifest(tmp)
        for _, old in self.step_dirs()[: -self.keep]:
            # Out of sight first (a rename is atomic): a kill while deleting leaves a temporary that the
            # next `find_resumable` removes, never a half-deleted step directory.
            doomed = old.with_name(f".{old.name}.tmp-pruned-{uuid.uuid4().hex[:8]}")
            old.rename(doomed)
            shutil.rmtree(doomed, ignore_errors=True)
        return final

    def load(self, path: Path, model, optimizer, scheduler=None) -> dict[str, Any]:
        """Restores model, optimizer, scheduler (if any) and RNG states from the checkpoint `path` (found
        and verified by `find_resumable`), logs "resumed from step_<n>"; returns the trainer state."""
        import torch
        from safetensors.torch import load_file

        try:
            state = json.loads((path / "trainer_state.json").read_text())
        except (OSError, ValueError) as e:
            raise StageError(f"cannot read {path / 'trainer_state.json'}: {e}") from None
        try:
            tensors = load_file(str(path / "model.safetensors"))
            missing, unexpected = model.load_state_dict(tensors, strict=False)
        except Exception as e:  # safetensors raises its own error types for corrupt files
            raise StageError(f"cannot load {path / 'model.safetensors'}: {e}") from None
        if missing or unexpected:
            raise StageError(
                f"{path / 'model.safetensors'} does not match the model: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}"
            )
        objects = [("optimizer.pt", optimizer), ("scheduler.pt", scheduler)]
        for name, obj in [(n, o) for n, o in objects if o is not None]:
            try:
                obj.load_state_dict(torch.load(path / name, weights_only=True))
            except Exception as e:
                raise StageError(f"cannot load {path / name}: {e}") from None
        try:
            _set_rng_state(torch.load(path / "rng.pt", weights_only=True))
        except Exception as e:
            raise StageError(f"cannot load {path / 'rng.pt'}: {e}") from None
        log.info("%s: resumed from %s (%s)", self.stage, path.name, path)
        return state

    @staticmethod
    def load_tensors(path: Path) -> dict[str, Any]:
        """The `tensors` saved with the checkpoint `path` (empty when it has none)."""
        from safetensors.torch import load_file

        file = path / EXTRA_TENSORS
        if not file.is_file():
            return {}
        try:
            return load_file(str(file))
        except Exception as e:  # safetensors raises its own error types for corrupt files
            raise StageError(f"cannot load {file}: {e}") from None
