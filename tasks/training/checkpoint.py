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
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.core.files import atomic_dir, write_json
from tasks.core.stage import StageError

if TYPE_CHECKING:  # heavy imports stay inside the functions (the `ruyi` CLI must start instantly)

    pass

log = logging.getLogger("ruyi")
#: Parameters that do not change the trained weights (excluded from the checkpoint fingerprint).
NON_FINGERPRINT_KEYS = ("checkpoint_every", "eval_every", "eval_batches")


# --- inputs ----------------------------------------------------------------------------------
def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def dir_sha256(path: str | Path) -> dict[str, str]:
    """sha256 of every regular file directly inside `path` (model or tokenizer directories)."""
    path = Path(path)
    return {p.name: file_sha256(p) for p in sorted(path.iterdir()) if p.is_file()}


# --- checkpoints ---------------------------------------------------------------------------------
def _code_fingerprint(stage: str) -> dict[str, str]:
    """sha256 of every module the stage imports (`tasks.core.codedeps`, the same list as its dvc.yaml
    deps): a checkpoint written by other code is stale (DVC reruns the stage when that code changes;
    resuming the old code's checkpoint would mix the two)."""
    from tasks.core.codedeps import code_fingerprint

    return code_fingerprint(stage)


def fingerprint_info(stage: str, section: Any, *, seed: int, model: Any = None, inputs: dict[str, Any],
                     extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a checkpoint must agree on to be resumed (see docs/choices.md#training)."""
    params = section.model_dump() if hasattr(section, "model_dump") else dict(section)
    for key in NON_FINGERPRINT_KEYS:
        params.pop(key, None)
    info: dict[str, Any] = {"stage": stage, "seed": seed, "params": params, "inputs": inputs,
                            "code": _code_fingerprint(stage)}
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


CHECKPOINT_FILES = ("model.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt", "trainer_state.json")
_STEP_DIR = re.compile(r"^step_(\d+)$")


def _rng_state() -> dict[str, Any]:
    import numpy as np
    import torch

    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
             "torch": torch.get_rng_state()}
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


class Checkpointer:
    """Resumable checkpoints of one stage under `root` (see docs/choices.md#training).

    Args:
        root: `artifacts/checkpoints/<stage>`.
        info: `fingerprint_info(...)` of this run.
        keep: how many step directories to keep.
    """

    def __init__(self, root: str | Path, info: dict[str, Any], keep: int = 2):
        self.root = Path(root)
        self.info = info
        self.digest = hashlib.sha256(json.dumps(info, sort_keys=True).encode()).hexdigest()
        self.keep = keep
        self.stale: dict[str, Any] | None = None

    def step_dirs(self) -> list[tuple[int, Path]]:
        if not self.root.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
        return sorted(found)

    def find_resumable(self) -> Path | None:
        """The latest checkpoint of this configuration, or None.

        A checkpoint from different parameters/inputs is set aside (docs/choices.md#training); a broken one
        is an error.
        """
        if self.root.is_dir():  # leftovers of a save interrupted by SIGKILL (atomic_dir's temporaries)
            for p in self.root.glob(".step_*.tmp-*"):
                shutil.rmtree(p, ignore_errors=True)
        dirs = self.step_dirs()
        if not dirs:
            return None
        step, latest = dirs[-1]
        state = self._read_state(latest)
        if state.get("fingerprint") != self.digest:
            diffs = fingerprint_differences(state.get("fingerprint_info", {}), self.info) or ["(fingerprint format)"]
            stale = self.root.with_name(self.root.name + ".stale")
            if stale.exists():
                shutil.rmtree(stale)
            self.root.rename(stale)
            self.stale = {"set_aside_to": str(stale), "step": step, "differences": diffs}
            log.warning("checkpoint %s was made with different parameters or inputs; set aside to %s and "
                        "training starts from scratch. Differences:\n  %s", latest, stale, "\n  ".join(diffs))
            return None
        return latest

    @staticmethod
    def _read_state(path: Path) -> dict[str, Any]:
        for name in CHECKPOINT_FILES:
            if not (path / name).is_file():
                raise StageError(f"checkpoint {path} is incomplete: {path / name} is missing "
                                 f"(delete the directory to start over from the previous checkpoint)")
        try:
            return json.loads((path / "trainer_state.json").read_text())
        except json.JSONDecodeError as e:
            raise StageError(f"checkpoint {path / 'trainer_state.json'}: not valid JSON ({e.msg})") from None

    def save(self, step: int, model, optimizer, scheduler, state: dict[str, Any]) -> Path:
        import torch
        from safetensors.torch import save_file

        final = self.root / f"step_{step}"
        with atomic_dir(final) as tmp:
            tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
            save_file(tensors, str(tmp / "model.safetensors"))
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            torch.save(_rng_state(), tmp / "rng.pt")
            write_json(tmp / "trainer_state.json",
                       {**state, "step": step, "fingerprint": self.digest, "fingerprint_info": self.info})
        for _, old in self.step_dirs()[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def load(self, path: Path, model, optimizer, scheduler) -> dict[str, Any]:
        """Restores model, optimizer, scheduler and RNG states; returns the trainer state."""
        import torch
        from safetensors.torch import load_file

        state = self._read_state(path)
        try:
            tensors = load_file(str(path / "model.safetensors"))
            missing, unexpected = model.load_state_dict(tensors, strict=False)
        except Exception as e:  # safetensors raises its own error types for corrupt files
            raise StageError(f"cannot load {path / 'model.safetensors'}: {e}") from None
        if missing or unexpected:
            raise StageError(f"{path / 'model.safetensors'} does not match the model: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
        for name, obj in (("optimizer.pt", optimizer), ("scheduler.pt", scheduler)):
            try:
                obj.load_state_dict(torch.load(path / name, weights_only=True))
            except Exception as e:
                raise StageError(f"cannot load {path / name}: {e}") from None
        try:
            _set_rng_state(torch.load(path / "rng.pt", weights_only=True))
        except Exception as e:
            raise StageError(f"cannot load {path / 'rng.pt'}: {e}") from None
        return state
