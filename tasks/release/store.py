"""The artifact store: immutable, verified, versioned releases of exported model families.

Library module used by `python -m tasks.deploy` and `ruyi serve`. `open_store(params.deploy.store)` builds
a `LocalStore` (a directory) or an `S3Store` (any S3 endpoint); `publish`, `list_versions`, `fetch`,
`load`. A release is `<model>/<version>/` with `MANIFEST.json` written last; the deploy stage adds
`VALIDATED.json` beside it once the release served and passed its smoke test (`mark_validated`), and what
serves "the latest" without naming a version follows the newest *validated* release (`validated=True`):

    store = open_store(params.deploy.store)
    release = store.publish("ruyi-tiny", "artifacts/export")            # -> Release(version="v0001", ...)
    path = store.fetch("ruyi-tiny", dest=release_dir)                   # latest version, hashes verified
    store.mark_validated("ruyi-tiny", "v0001", {"smoke_prompts": 8})     # deploy, after its smoke test
    store.latest_version("ruyi-tiny", validated=True)                   # -> "v0001": what serving follows
    model, tokenizer = store.load("ruyi-tiny", "v0001", exit_layer=2)   # what the exit_2 tier serves

Visibility, verification and retry protocol: docs/choices.md#store. The S3 client and its error mapping
(botocore retries; transient vs credential errors) are `tasks.core.s3`'s, shared with user data sources.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.core.files import LOAD_ERRORS, atomic_dir, atomic_file, sha256_file
from tasks.core.s3 import (
    StoreError,
    TransientStoreError,
    error_code,
    resolve_endpoint,
    s3_client,
    s3_errors,
)

if TYPE_CHECKING:
    from tasks.core.params import StoreParams

log = logging.getLogger("ruyi.store")


class VersionTakenError(StoreError):
    """Another writer published, or is publishing other content as, the version being written."""


MANIFEST_NAME = "MANIFEST.json"
MANIFEST_FORMAT = "ruyi-release/1"
VALIDATED_NAME = "VALIDATED.json"
VALIDATED_FORMAT = "ruyi-validated/1"
CLAIM_NAME = ".publishing.json"  # S3: which content a version is being published with (docs/choices.md#store)
#: `publish(version=None)` moves on to the next vNNNN this many times when another writer took one.
MAX_VERSION_TRIES = 20
MIB = 1 << 20
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_AUTO_VERSION_RE = re.compile(r"^v(\d+)$")

#: `callback(relative_path, bytes_transferred_since_last_call)` during publish/fetch.
ProgressCallback = Callable[[str, int], None]


# --- releases ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class FileEntry:
    """One file of a release: its path relative to the release root (POSIX), size and sha256."""

    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Release:
    """A published (complete) release, as its manifest describes it."""

    model: str
    version: str
    uri: str
    files: tuple[FileEntry, ...]
    created: str
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def to_manifest(self) -> dict[str, Any]:
        return {
            "format": MANIFEST_FORMAT,
            "model": self.model,
            "version": self.version,
            "created": self.created,
            "files": [{"path": f.path, "size": f.size, "sha256": f.sha256} for f in self.files],
            "total_bytes": self.total_bytes,
            "metadata": self.metadata,
        }

    @classmethod
    def from_manifest(cls, manifest: Any, uri: str, where: str) -> Release:
        """Parses and checks a manifest; `where` names it in errors (a path or URI)."""
        try:
            if manifest.get("format") != MANIFEST_FORMAT:
                raise ValueError(f"format is {manifest.get('format')!r}, expected {MANIFEST_FORMAT!r}")
            files = tuple(
                FileEntry(str(f["path"]), int(f["size"]), str(f["sha256"])) for f in manifest["files"]
            )
            release = cls(
                model=str(manifest["model"]),
                version=str(manifest["version"]),
                uri=uri,
                files=files,
                created=str(manifest["created"]),
                metadata=dict(manifest.get("metadata") or {}),
            )
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            raise StoreError(f"{where}: not a valid release manifest ({e})") from None
        for f in files:
            _check_relative_path(f.path, where)
        return release

    def manifest_bytes(self) -> bytes:
        return (json.dumps(self.to_manifest(), indent=2, sort_keys=True) + "\n").encode()


def _check_relative_path(path: str, where: str) -> None:
    parts = path.split("/")
    if not path or path.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\\" in path:
        raise StoreError(f"{where}: unsafe file path {path!r} in the manifest")


def check_name(kind: str, name: str) -> str:
    """Checks a model or version name (used as a path component and an S3 key part)."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise StoreError(
            f"invalid {kind} name {name!r}: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def natural_key(version: str) -> tuple:
    """Sort key putting `v2` before `v10` (digit runs compare as numbers)."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", version) if p)


def scan_dir(src: str | Path) -> list[FileEntry]:
    """Every regular file under `src` (sorted, relative POSIX paths) with its size and sha256.

    Raises:
        StoreError: if `src` is not a directory, is empty, or contains a symlink or a release manifest.
    """
    src = Path(src)
    if not src.is_dir():
        raise StoreError(f"cannot publish {src}: not a directory")
    entries = []
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src).as_posix()
        if path.is_symlink():
            raise StoreError(f"cannot publish {src}: {rel} is a symlink (releases hold regular files only)")
        if path.is_dir():
            continue
        if rel == MANIFEST_NAME:
            raise StoreError(
                f"cannot publish {src}: it already contains a release {MANIFEST_NAME} "
                "(publish the export directory, not a fetched release)"
            )
        entries.append(FileEntry(rel, path.stat().st_size, sha256_file(path)))
    if not entries:
        raise StoreError(f"cannot publish {src}: the directory is empty")
    return entries


def verify_tree(root: str | Path, files: tuple[FileEntry, ...] | list[FileEntry]) -> None:
    """Checks that every listed file exists under `root` with its size and sha256 (StoreError if not)."""
    root = Path(root)
    for entry in files:
        path = root / entry.path
        if not path.is_file():
            raise StoreError(f"{path}: missing (listed in the release manifest)")
        size = path.stat().st_size
        if size != entry.size:
            raise StoreError(
                f"{path}: {size} bytes, the release manifest says {entry.size} (corrupted or truncated)"
            )
        digest = sha256_file(path)
        if digest != entry.sha256:
            raise StoreError(
                f"{path}: sha256 {digest[:16]}... does not match the manifest's "
                f"{entry.sha256[:16]}... (corrupted)"
            )


def _progress(total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(
        total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, disable=None, leave=False
    )


def _utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- the interface -----------------------------------------------------------------------------
class ArtifactStore(ABC):
    """Versioned releases `<model>/<version>/`; see docs/choices.md#store for the guarantees."""

    #: Where the store lives, e.g. `file:///abs/store` or `s3://bucket/prefix`.
    uri: str

    def __init__(self, cache_dir: str | Path | None = None):
        self.cache_dir = Path(cache_dir) if cache_dir is not None else Path("artifacts") / "releases"

    # backend primitives ---------------------------------------------------------------------
    @abstractmethod
    def _published_versions(self, model: str) -> list[str]:
        """Versions of `model` that have a manifest (unsorted)."""

    @abstractmethod
    def _read_manifest(self, model: str, version: str) -> dict | None:
        """The parsed manifest of a version, or None if it has none (absent or incomplete)."""

    @abstractmethod
    def _write_release(self, release: Release, src: Path, callback: ProgressCallback | None) -> None:
        """Uploads/copies every file of `release` from `src`, verifies them, then the manifest, last."""

    @abstractmethod
    def _download(
        self, release: Release, entry: FileEntry, dest: Path, callback: ProgressCallback | None
    ) -> None:
        """Writes one file of a release to `dest` (verified by the caller)."""

    @abstractmethod
    def _read_validation(self, model: str, version: str) -> bytes | None:
        """The raw `VALIDATED.json` of a version, or None if it has none."""

    @abstractmethod
    def _write_validation(self, model: str, version: str, data: bytes) -> None:
        """Writes (atomically, replacing any earlier one) the `VALIDATED.json` of a published version."""

    def release_uri(self, model: str, version: str) -> str:
        return f"{self.uri}/{model}/{version}"

    # public API -----------------------------------------------------------------------------
    def list_versions(self, model: str) -> list[str]:
        """The published versions of `model` in natural order (oldest first); [] if none."""
        check_name("model", model)
        return sorted(self._published_versions(model), key=natural_key)

    def latest_version(self, model: str, *, validated: bool = False) -> str:
        """The newest published version of `model`; with `validated`, the newest that passed the deploy
        smoke test (`mark_validated`). StoreError if there is none, naming what is published."""
        versions = self.list_versions(model)
        if not versions:
            raise StoreError(f"no published release of model {model!r} in {self.uri}")
        if not validated:
            return versions[-1]
        for version in reversed(versions):
            if self.validation(model, version) is not None:
                return version
        raise StoreError(
            f"no release of model {model!r} in {self.uri} has passed the deploy smoke test (published, "
            f"not validated: {', '.join(versions)}); run the deploy stage, or name a version explicitly "
            "(e.g. `ruyi serve --version " + versions[-1] + "`)"
        )

    def validation(self, model: str, version: str) -> dict[str, Any] | None:
        """The validation record of a published version (`VALIDATED.json`: what its deploy smoke test
        attested), or None if it was never validated.

        Raises:
            StoreError: the record is unreadable, or it attests other content than the release holds
                (its `content_sha256` is not the release's `content_digest`).
        """
        data = self._read_validation(check_name("model", model), check_name("version", version))
        if data is None:
            return None
        where = f"{self.release_uri(model, version)}/{VALIDATED_NAME}"
        try:
            record = json.loads(data)
            if record.get("format") != VALIDATED_FORMAT:
                raise ValueError(f"format is {record.get('format')!r}, expected {VALIDATED_FORMAT!r}")
            claimed = (record["model"], record["version"], record["content_sha256"])
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            raise StoreError(f"{where}: not a valid validation record ({e})") from None
        digest = content_digest(self.get_release(model, version).files)
        if claimed != (model, version, digest):
            raise StoreError(
                f"{where} attests {claimed[0]}/{claimed[1]} with content {str(claimed[2])[:16]}..., but the "
                f"release is {model}/{version} with content {digest[:16]}...: remove the record and deploy "
                "again"
            )
        return record

    def mark_validated(self, model: str, version: str, evidence: dict[str, Any]) -> dict[str, Any]:
        """Records that the published release `model/version` served and passed its smoke test.

        `evidence` (JSON-serializable: what was checked) goes into the record with the release's
        `content_sha256` and the time; a later validation of the same release replaces the record.
        Returns the record. StoreError if the version is not published.
        """
        release = self.get_release(model, version)
        record = {
            "format": VALIDATED_FORMAT,
            "model": model,
            "version": release.version,
            "content_sha256": content_digest(release.files),
            "validated": _utc_now(),
            "evidence": evidence,
        }
        try:
            data = (json.dumps(record, indent=2, sort_keys=True) + "\n").encode()
        except (TypeError, ValueError) as e:
            raise StoreError(f"validation evidence is not JSON-serializable: {e}") from None
        self._write_validation(model, release.version, data)
        log.info("marked %s validated", release.uri)
        return record

    def get_release(self, model: str, version: str | None = None, *, validated: bool = False) -> Release:
        """The release `model/version` (None: the latest, or the latest validated one with `validated`);
        StoreError if it is not published."""
        check_name("model", model)
        version = (
            self.latest_version(model, validated=validated)
            if version is None
            else check_name("version", version)
        )
        manifest = self._read_manifest(model, version)
        if manifest is None:
            known = self.list_versions(model)
            raise StoreError(
                f"release {model}/{version} not found in {self.uri} (published versions: "
                f"{', '.join(known) if known else 'none'})"
            )
        release = Release.from_manifest(
            manifest, self.release_uri(model, version), f"{self.release_uri(model, version)}/{MANIFEST_NAME}"
        )
        if (release.model, release.version) != (model, version):
            raise StoreError(
                f"{self.release_uri(model, version)}/{MANIFEST_NAME} describes "
                f"{release.model}/{release.version}, not {model}/{version}"
            )
        return release

    def next_version(self, model: str) -> str:
        """`v0001` or one more than the highest published `vNNNN` of `model`."""
        numbers = [int(m.group(1)) for v in self.list_versions(model) if (m := _AUTO_VERSION_RE.match(v))]
        return f"v{max(numbers, default=0) + 1:04d}"

    def find_identical(self, model: str, files: list[FileEntry]) -> str | None:
        """The latest published version whose files are exactly `files` (paths, sizes, sha256), or None."""
        want = sorted(files, key=lambda f: f.path)
        for version in reversed(self.list_versions(model)):
            if sorted(self.get_release(model, version).files, key=lambda f: f.path) == want:
                return version
        return None

    def publish(
        self,
        model: str,
        src_dir: str | Path,
        version: str | None = None,
        *,
        metadata: dict[str, Any] | None = None,
        callback: ProgressCallback | None = None,
        files: list[FileEntry] | None = None,
    ) -> Release:
        """Publishes every file under `src_dir` as the release `model/version`.

        Args:
            model: the model name (e.g. `ruyi-tiny`).
            src_dir: the directory to publish (e.g. `artifacts/export`).
            version: the version name; None: the next `vNNNN`.
            metadata: JSON-serializable facts stored in the manifest (git revision, source manifest).
            callback: called as `callback(path, nbytes)` while bytes are transferred.
            files: `scan_dir(src_dir)` if the caller has just computed it (not scanned again); every copy
                is still verified against it, so a file changed since is an error.

        Returns:
            The published release.

        Raises:
            StoreError: the version exists (releases are immutable), bad names or source, or any
                backend failure (nothing becomes visible then; a retry resumes).
        """
        check_name("model", model)
        auto = version is None
        version = self.next_version(model) if auto else check_name("version", version)
        if self._read_manifest(model, version) is not None:
            raise StoreError(
                f"release {self.release_uri(model, version)} already exists: releases are "
                "immutable; publish a new version"
            )
        files = scan_dir(src_dir) if files is None else files
        try:
            json.dumps(metadata or {})
        except (TypeError, ValueError) as e:
            raise StoreError(f"release metadata is not JSON-serializable: {e}") from None
        t0 = time.perf_counter()
        for attempt in range(MAX_VERSION_TRIES):
            release = Release(
                model=model,
                version=version,
                uri=self.release_uri(model, version),
                files=tuple(files),
                created=_utc_now(),
                metadata=dict(metadata or {}),
            )
            try:
                self._write_release(release, Path(src_dir), callback)
                break
            except VersionTakenError as e:
                # Two writers chose the same next vNNNN (e.g. a scheduled run and a rerun deploying at
                # once): the one that did not get it takes the next number; a fixed version is an error.
                if not auto or attempt == MAX_VERSION_TRIES - 1:
                    raise
                log.warning("%s; publishing as the next version instead", e)
                match = _AUTO_VERSION_RE.match(version)
                version = f"v{int(match.group(1)) + 1:04d}" if match else self.next_version(model)
        log.info(
            "published %s (%d files, %.1f MiB) in %.1f s",
            release.uri,
            len(files),
            release.total_bytes / MIB,
            time.perf_counter() - t0,
        )
        return release

    def fetch(
        self,
        model: str,
        version: str | None = None,
        dest: str | Path | None = None,
        *,
        callback: ProgressCallback | None = None,
        validated: bool = False,
    ) -> Path:
        """Downloads a release into `dest` (default `<cache_dir>/<model>/<version>`), verified.

        The destination appears only once every file matches the manifest (size + sha256); a
        destination that already holds this exact, intact release is reused without downloading.
        `version` None: the latest published one, or with `validated` the latest validated one.

        Returns:
            The release directory (its files plus `MANIFEST.json`).
        """
        release = self.get_release(model, version, validated=validated)
        dest = Path(dest) if dest is not None else self.cache_dir / model / release.version
        if (dest / MANIFEST_NAME).is_file():
            try:
                cached = Release.from_manifest(
                    json.loads((dest / MANIFEST_NAME).read_text()), release.uri, str(dest)
                )
                if cached.files == release.files and cached.created == release.created:
                    verify_tree(dest, release.files)
                    log.info("fetch: %s already in %s (verified)", release.uri, dest)
                    return dest
            except (StoreError, json.JSONDecodeError) as e:
                log.warning("fetch: replacing %s (%s)", dest, e)
        t0 = time.perf_counter()
        with (
            atomic_dir(dest) as tmp,
            _progress(release.total_bytes, f"fetch {model}/{release.version}") as bar,
        ):

            def progress(path: str, n: int) -> None:
                bar.update(n)
                if callback is not None:
                    callback(path, n)

            for entry in release.files:
                target = tmp / entry.path
                target.parent.mkdir(parents=True, exist_ok=True)
                self._download(release, entry, target, progress)
            verify_tree(tmp, release.files)
            (tmp / MANIFEST_NAME).write_bytes(release.manifest_bytes())
        log.info(
            "fetched %s -> %s (%.1f MiB, %.1f s)",
            release.uri,
            dest,
            release.total_bytes / MIB,
            time.perf_counter() - t0,
        )
        return dest

    def load(
        self,
        model: str,
        version: str | None = None,
        exit_layer: int | None = None,
        *,
        dest: str | Path | None = None,
        dtype: str = "float32",
    ):
        """Fetches a release and loads one member (or the family) with its tokenizer.

        Args:
            exit_layer: `d` loads member d as `load_member` does (its factored copy if the release has
                one, else the stock `exit_<d>/`); None loads `family/` (a `FamilialForCausalLM`, every
                member and dynamic early exit).

        Returns:
            `(model, tokenizer)`, the model in eval mode.
        """
        return load_member(self.fetch(model, version, dest), exit_layer, dtype=dtype)


def content_digest(files: tuple[FileEntry, ...] | list[FileEntry]) -> str:
    """sha256 over the sorted `path size sha256` lines of a release: its identity, version aside."""
    lines = "".join(f"{f.path} {f.size} {f.sha256}\n" for f in sorted(files, key=lambda f: f.path))
    return hashlib.sha256(lines.encode()).hexdigest()


def publish_dir(
    store: ArtifactStore,
    model: str,
    src_dir: str | Path,
    version: str | None,
    metadata: dict[str, Any],
    files: list[FileEntry] | None = None,
) -> tuple[Release, bool]:
    """Publishes `src_dir` as `model` unless the store already holds that content (docs/choices.md#deploy).

    `version` None: the latest release is reused when its files are identical, else the next vNNNN is
    published; a fixed `version` that exists is reused when identical and refused otherwise (releases
    are immutable). `metadata` gets `content_sha256`. `files`: `scan_dir(src_dir)` if the caller has it
    (the directory is then read once to hash it, and once more to copy it). Returns `(release, reused)`.
    """
    files = scan_dir(src_dir) if files is None else files
    known = store.list_versions(model)
    if version is not None and version in known:
        release = store.get_release(model, version)
        if sorted(release.files, key=lambda f: f.path) != sorted(files, key=lambda f: f.path):
            raise StoreError(
                f"deploy.version {version} already exists in {store.uri} with different content: "
                "releases are immutable; choose a new version (or null for the next vNNNN)"
            )
        log.info("release %s already holds %s: reusing it", release.uri, src_dir)
        return release, True
    if version is None and known:
        latest = store.get_release(model, known[-1])
        if sorted(latest.files, key=lambda f: f.path) == sorted(files, key=lambda f: f.path):
            log.info("the latest release %s already holds %s: reusing it", latest.uri, src_dir)
            return latest, True
    metadata = {**metadata, "content_sha256": content_digest(files)}
    return store.publish(model, src_dir, version, metadata=metadata, files=files), False


def release_exits(release_dir: str | Path) -> list[int]:
    """Exit layers that a release/export directory has a stock checkpoint for (`exit_<d>/`), sorted."""
    root = Path(release_dir)
    return sorted(int(p.name[5:]) for p in root.glob("exit_*") if p.is_dir() and p.name[5:].isdigit())


def load_member(
    release_dir: str | Path, exit_layer: int | None, dtype: str = "float32", *, factored: bool = True
):
    """`(model, tokenizer)` of member `exit_layer` or of the family (`exit_layer=None`, `family/`).

    A member whose release holds a factored copy (`exit_<d>_factored/`, the DaE member's low-rank
    weights, `ruyi_model.export.member_to_familial`) loads that, a one-member `FamilialForCausalLM`
    (tokenizer fingerprint checked as for any family); otherwise, or with `factored=False`, the
    stock `Qwen3ForCausalLM` of `exit_<d>/` (dense; releases made before factored copies existed).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ruyi_model.export import factored_dir_name
    from tasks.core.artifacts import load_family

    root = Path(release_dir)
    if exit_layer is None:
        if not (root / "family").is_dir():
            raise StoreError(f"{root}: no family/ checkpoint in this release")
        model, tokenizer = load_family(root / "family", dtype=dtype)
        return model.eval(), tokenizer
    path = root / f"exit_{int(exit_layer)}"
    if not path.is_dir():
        raise StoreError(
            f"{root}: no member exit_{exit_layer} (members: "
            f"{', '.join(f'exit_{d}' for d in release_exits(root)) or 'none'})"
        )
    factored_path = root / factored_dir_name(int(exit_layer))
    if factored and factored_path.is_dir():
        model, tokenizer = load_family(factored_path, dtype=dtype)
        if model.config.exit_layers != [int(exit_layer)]:
            raise StoreError(
                f"{factored_path}: a family with exits {model.config.exit_layers}, not member "
                f"{exit_layer} alone"
            )
        return model.eval(), tokenizer
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except LOAD_ERRORS as e:
        raise StoreError(f"cannot load {path}: {e}") from None
    return model.eval(), tokenizer


# --- local directory ---------------------------------------------------------------------------
class LocalStore(ArtifactStore):
    """Releases under a local directory: `<root>/<model>/<version>/`."""

    def __init__(self, root: str | Path, cache_dir: str | Path | None = None):
        super().__init__(cache_dir)
        self.root = Path(root)
        self.uri = self.root.resolve().as_uri()

    def _published_versions(self, model: str) -> list[str]:
        model_dir = self.root / model
        if not model_dir.is_dir():
            return []
        return [
            p.name
            for p in model_dir.iterdir()
            if not p.name.startswith(".") and (p / MANIFEST_NAME).is_file()
        ]

    def _read_manifest(self, model: str, version: str) -> dict | None:
        path = self.root / model / version / MANIFEST_NAME
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise StoreError(f"{path}: unreadable release manifest ({e})") from None

    def _read_validation(self, model: str, version: str) -> bytes | None:
        path = self.root / model / version / VALIDATED_NAME
        try:
            return path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StoreError(f"{path}: unreadable validation record ({e})") from None

    def _write_validation(self, model: str, version: str, data: bytes) -> None:
        path = self.root / model / version / VALIDATED_NAME
        try:
            with atomic_file(path, "wb") as f:
                f.write(data)
        except OSError as e:
            raise StoreError(f"cannot write {path}: {e}") from None

    def _write_release(self, release: Release, src: Path, callback: ProgressCallback | None) -> None:
        model_dir = self.root / release.model
        final = model_dir / release.version
        if (final / MANIFEST_NAME).is_file():
            raise VersionTakenError(f"release {release.uri} was published concurrently by another writer")
        if final.exists():
            # A directory without a manifest is not ours (ours appear by rename, complete).
            raise StoreError(
                f"{final} exists but is not a published release; remove it or choose another version"
            )
        from ruyi_model.fileio import sweep_stale_siblings, temp_sibling

        model_dir.mkdir(parents=True, exist_ok=True)
        # What a killed publisher of this version left (its pid is in the name and gone); a live
        # publisher's copy is kept: it fails at its rename, or this one does, never with files missing.
        sweep_stale_siblings(final)
        legacy = re.compile(rf"\.{re.escape(release.version)}\.tmp-[0-9a-f]{{8}}")  # names without a pid
        for stale in model_dir.iterdir():
            if legacy.fullmatch(stale.name):
                shutil.rmtree(stale, ignore_errors=True)
        tmp = temp_sibling(final)
        tmp.mkdir()
        try:
            with _progress(release.total_bytes, f"publish {release.model}/{release.version}") as bar:
                for entry in release.files:
                    target = tmp / entry.path
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(src / entry.path, target)
                    with open(target, "rb+") as f:
                        os.fsync(f.fileno())
                    bar.update(entry.size)
                    if callback is not None:
                        callback(entry.path, entry.size)
            verify_tree(tmp, release.files)  # the copies, re-read from disk
            with open(tmp / MANIFEST_NAME, "wb") as f:
                f.write(release.manifest_bytes())
                f.flush()
                os.fsync(f.fileno())
            try:
                os.rename(tmp, final)  # atomic; fails if another publisher created the version meanwhile
            except OSError as e:
                if (final / MANIFEST_NAME).is_file():
                    raise VersionTakenError(
                        f"release {release.uri} was published concurrently by another writer"
                    ) from None
                raise StoreError(f"cannot publish {final}: {e}") from None
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def _download(
        self, release: Release, entry: FileEntry, dest: Path, callback: ProgressCallback | None
    ) -> None:
        source = self.root / release.model / release.version / entry.path
        try:
            shutil.copyfile(source, dest)
        except OSError as e:
            raise StoreError(f"cannot read {source}: {e}") from None
        if callback is not None:
            callback(entry.path, entry.size)


# --- S3 ---------------------------------------------------------------------------------------
class S3Store(ArtifactStore):
    """Releases in an S3 bucket: `s3://<bucket>/<prefix>/<model>/<version>/`.

    Args:
        bucket: an existing bucket.
        prefix: key prefix of the store inside the bucket ("" for the bucket root).
        endpoint_url: the S3 endpoint (None: AWS, from the AWS config).
        region: the signing region (None: from the AWS config, else us-east-1).
        multipart_threshold_mib / multipart_chunksize_mib / max_concurrency: `TransferConfig`.
        connect_timeout_s / read_timeout_s / max_attempts / retry_mode: botocore's `Config`
            (`tasks.core.s3.s3_client`: botocore retries, "standard" or "adaptive").
        verify: "checksum" (server-side SHA-256, no extra traffic) or "download" (read back and hash).
        addressing_style: "auto" (path-style with an endpoint_url, botocore's default otherwise),
            "path" or "virtual".
        cache_dir: where `fetch`/`load` put releases by default.
        access_key / secret_key: explicit credentials (None: the standard AWS chain; prefer that).
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        multipart_threshold_mib: float = 64.0,
        multipart_chunksize_mib: float = 16.0,
        max_concurrency: int = 4,
        connect_timeout_s: float = 5.0,
        read_timeout_s: float = 60.0,
        max_attempts: int = 5,
        retry_mode: str = "standard",
        verify: str = "checksum",
        addressing_style: str = "auto",
        cache_dir: str | Path | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
    ):
        super().__init__(cache_dir)
        if not bucket:
            raise StoreError("S3 store: no bucket given (deploy.store.bucket)")
        if verify not in ("checksum", "download"):
            raise StoreError(f"S3 store: verify must be 'checksum' or 'download', got {verify!r}")
        if multipart_chunksize_mib < 5:
            raise StoreError(
                f"S3 store: multipart_chunksize_mib must be >= 5 (S3's minimum part size), "
                f"got {multipart_chunksize_mib}"
            )
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint_url = endpoint_url
        self.endpoint = resolve_endpoint(endpoint_url) or "AWS S3"
        self.region = region
        self.verify = verify
        self.multipart_threshold = max(1, int(multipart_threshold_mib * MIB))
        self.multipart_chunksize = int(multipart_chunksize_mib * MIB)
        self.max_concurrency = max_concurrency
        self._client_kwargs = dict(
            connect_timeout_s=connect_timeout_s,
            read_timeout_s=read_timeout_s,
            max_attempts=max_attempts,
            retry_mode=retry_mode,
            addressing_style=addressing_style,
            access_key=access_key,
            secret_key=secret_key,
        )
        self._client_obj = None
        self.uri = f"s3://{bucket}" + (f"/{self.prefix}" if self.prefix else "")

    # clients and errors ---------------------------------------------------------------------
    @property
    def _client(self):
        if self._client_obj is None:
            self._client_obj = s3_client(
                endpoint_url=self.endpoint_url, region=self.region, **self._client_kwargs
            )
        return self._client_obj

    def _transfer_config(self):
        from boto3.s3.transfer import TransferConfig

        return TransferConfig(
            multipart_threshold=self.multipart_threshold,
            multipart_chunksize=self.multipart_chunksize,
            max_concurrency=self.max_concurrency,
            use_threads=self.max_concurrency > 1,
            preferred_transfer_client="classic",
        )

    def _errors(self, what: str, key: str | None = None):
        """Translates boto errors into a StoreError that says what went wrong and where (`tasks.core.s3`)."""
        return s3_errors(what, endpoint=self.endpoint, bucket=self.bucket, key=key)

    def _key(self, *parts: str) -> str:
        return "/".join(p.strip("/") for p in (self.prefix, *parts) if p)

    def _check_bucket(self, what: str) -> None:
        # ListObjectsV2 (not HeadBucket): its error body tells rejected credentials from a missing bucket.
        with self._errors(what):
            self._client.list_objects_v2(Bucket=self.bucket, Prefix=self._key(""), MaxKeys=1)

    def _list_keys(self, prefix: str) -> Iterator[dict]:
        for page in self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            yield from page.get("Contents", [])

    # primitives ------------------------------------------------------------------------------
    def _published_versions(self, model: str) -> list[str]:
        self._check_bucket(f"listing {self.uri}/{model}")
        base = self._key(model) + "/"
        versions = []
        with self._errors(f"listing {self.uri}/{model}"):
            for obj in self._list_keys(base):
                rest = obj["Key"][len(base) :]
                version, _, name = rest.partition("/")
                if name == MANIFEST_NAME:
                    versions.append(version)
        return versions

    def _read_manifest(self, model: str, version: str) -> dict | None:
        from botocore.exceptions import ClientError

        key = self._key(model, version, MANIFEST_NAME)
        self._check_bucket(f"reading s3://{self.bucket}/{key}")
        with self._errors(f"reading s3://{self.bucket}/{key}"):
            try:
                body = self._client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
            except ClientError as e:
                if error_code(e) in ("NoSuchKey", "404"):
                    return None
                raise
        try:
            return json.loads(body)
        except json.JSONDecodeError as e:
            raise StoreError(f"s3://{self.bucket}/{key}: unreadable release manifest ({e})") from None

    def _read_validation(self, model: str, version: str) -> bytes | None:
        from botocore.exceptions import ClientError

        key = self._key(model, version, VALIDATED_NAME)
        with self._errors(f"reading s3://{self.bucket}/{key}"):
            try:
                return self._client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
            except ClientError as e:
                if error_code(e) in ("NoSuchKey", "404"):
                    return None
                raise

    def _write_validation(self, model: str, version: str, data: bytes) -> None:
        key = self._key(model, version, VALIDATED_NAME)
        with self._errors(f"writing s3://{self.bucket}/{key}", key=key):
            self._client.put_object(
                Bucket=self.bucket,
                Key=key,
                Body=data,
                ContentType="application/json",
                ChecksumAlgorithm="SHA256",
            )

    def expected_checksum(self, path: Path, size: int, sha256_hex: str) -> str:
        """The `ChecksumSHA256` S3 reports for `path` uploaded with our TransferConfig (base64).

        Single-part: the SHA-256 of the file, i.e. `sha256_hex` (the scanned one). Multipart: the SHA-256
        of the concatenated part SHA-256s, suffixed `-<number of parts>`, with s3transfer's part size for
        this file size. The parts are hashed in the same pass as the whole file, which must still be
        `sha256_hex`: a file rewritten since the scan (same size or not) is a StoreError, so a multipart
        object is verified against the scanned content, not against whatever the file now holds.
        """
        if size < self.multipart_threshold:
            return base64.b64encode(bytes.fromhex(sha256_hex)).decode()
        from s3transfer.utils import ChunksizeAdjuster

        part_size = ChunksizeAdjuster().adjust_chunksize(self.multipart_chunksize, size)
        digests, whole = [], hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(part_size), b""):
                whole.update(block)
                digests.append(hashlib.sha256(block).digest())
        if whole.hexdigest() != sha256_hex:
            raise StoreError(
                f"{path}: sha256 {whole.hexdigest()[:16]}... is not the {sha256_hex[:16]}... scanned for the "
                "release manifest: the file changed while it was being published; nothing was published"
            )
        return base64.b64encode(hashlib.sha256(b"".join(digests)).digest()).decode() + f"-{len(digests)}"

    def _object_ok(self, key: str, entry: FileEntry, src: Path) -> tuple[bool, str]:
        """Whether the object at `key` holds exactly `src` (size, sha256); the reason if not."""
        from botocore.exceptions import ClientError

        try:
            head = self._client.head_object(Bucket=self.bucket, Key=key, ChecksumMode="ENABLED")
        except ClientError as e:
            if error_code(e) in ("NoSuchKey", "404"):
                return False, "missing"
            raise
        if head["ContentLength"] != entry.size:
            return False, f"{head['ContentLength']} bytes instead of {entry.size}"
        if self.verify == "download":
            h = hashlib.sha256()
            for block in self._client.get_object(Bucket=self.bucket, Key=key)["Body"].iter_chunks(MIB):
                h.update(block)
            return (h.hexdigest() == entry.sha256), f"read back sha256 {h.hexdigest()[:16]}..."
        got = head.get("ChecksumSHA256")
        if not got:
            raise StoreError(
                f"s3://{self.bucket}/{key}: the endpoint {self.endpoint} returned no SHA-256 checksum, so "
                "the upload cannot be verified server-side; set deploy.store.verify: download"
            )
        want = self.expected_checksum(src, entry.size, entry.sha256)
        return got == want, f"server checksum {got} instead of {want}"

    def _abort_stale_uploads(self, prefix: str) -> int:
        aborted = 0
        for page in self._client.get_paginator("list_multipart_uploads").paginate(
            Bucket=self.bucket, Prefix=prefix
        ):
            for upload in page.get("Uploads", []):
                self._client.abort_multipart_upload(
                    Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"]
                )
                aborted += 1
        if aborted:
            log.info("aborted %d stale multipart upload(s) under s3://%s/%s", aborted, self.bucket, prefix)
        return aborted

    def _write_release(self, release: Release, src: Path, callback: ProgressCallback | None) -> None:
        what = f"publishing {release.uri}"
        self._check_bucket(what)
        base = self._key(release.model, release.version) + "/"
        claim_key = base + CLAIM_NAME
        wanted = {base + f.path for f in release.files}
        with self._errors(what):
            # Claim the version for this content before touching anything under it: a writer of other
            # content (a concurrent deploy that chose the same vNNNN) must never abort our uploads, delete
            # or overwrite our objects; one of the same content (a retry after a crash) resumes.
            self._claim(claim_key, release)
            try:
                self._publish_claimed(release, src, callback, base, wanted)
            except TransientStoreError:
                raise  # the flow retries with the same content: it resumes under the claim
            except StoreError:
                # This writer gives the version up (its file changed, a checksum failed, another writer
                # published it): its claim must not make the next writer of other content skip it.
                with contextlib.suppress(Exception):
                    self._client.delete_object(Bucket=self.bucket, Key=claim_key)
                raise

    def _publish_claimed(
        self, release: Release, src: Path, callback: ProgressCallback | None, base: str, wanted: set[str]
    ) -> None:
        """The upload part of `_write_release`, once the version is claimed for this content."""
        what = f"publishing {release.uri}"
        manifest_key, claim_key = base + MANIFEST_NAME, base + CLAIM_NAME
        transfer = self._transfer_config()
        with self._errors(what):
            self._abort_stale_uploads(base)
            existing = {obj["Key"] for obj in self._list_keys(base)}
            if manifest_key in existing:
                raise VersionTakenError(f"release {release.uri} already exists: releases are immutable")
            stale = sorted(existing - wanted - {claim_key})
            for i in range(0, len(stale), 1000):  # objects of an earlier, different attempt
                self._client.delete_objects(
                    Bucket=self.bucket,
                    Delete={"Objects": [{"Key": k} for k in stale[i : i + 1000]], "Quiet": True},
                )
            resumed = 0
            with _progress(release.total_bytes, f"publish {release.model}/{release.version}") as bar:
                for entry in release.files:
                    key, path = base + entry.path, src / entry.path
                    if key in existing and self._object_ok(key, entry, path)[0]:
                        resumed += 1
                        bar.update(entry.size)
                        continue

                    def progress(n: int, _path: str = entry.path) -> None:
                        bar.update(n)
                        if callback is not None:
                            callback(_path, n)

                    self._client.upload_file(
                        str(path),
                        self.bucket,
                        key,
                        Config=transfer,
                        Callback=progress,
                        ExtraArgs={"ChecksumAlgorithm": "SHA256", "Metadata": {"sha256": entry.sha256}},
                    )
                    ok, why = self._object_ok(key, entry, path)
                    if not ok:
                        raise StoreError(
                            f"{what}: s3://{self.bucket}/{key} failed verification after upload ({why})"
                        )
            if resumed:
                log.info("%s: %d file(s) already uploaded and verified by an earlier attempt", what, resumed)
            self._put_manifest(manifest_key, release)
            self._client.delete_object(Bucket=self.bucket, Key=claim_key)  # published: the claim is done

    def _claim(self, key: str, release: Release) -> None:
        """Creates the version's claim (`CLAIM_NAME`, a conditional PUT that only one writer wins), or
        accepts an existing claim for the same content; VersionTakenError if it is for other content."""
        from botocore.exceptions import ClientError

        digest = content_digest(release.files)
        claim = {
            "content_sha256": digest,
            "writer": f"{socket.gethostname()}:{os.getpid()}",
            "created": _utc_now(),
        }
        try:
            self._client.put_object(
                Bucket=self.bucket, Key=key, Body=json.dumps(claim).encode(), IfNoneMatch="*"
            )
            return
        except ClientError as e:
            if error_code(e) not in ("PreconditionFailed", "ConditionalRequestConflict"):
                raise
        try:
            held = json.loads(self._client.get_object(Bucket=self.bucket, Key=key)["Body"].read())
        except ClientError as e:
            if error_code(e) in ("NoSuchKey", "404"):  # released between our PUT and GET: published
                raise VersionTakenError(
                    f"release {release.uri} was published concurrently by another writer"
                ) from None
            raise
        except json.JSONDecodeError:
            held = {}
        if held.get("content_sha256") == digest:
            log.info(
                "%s: resuming the publication of the same content claimed at %s",
                release.uri,
                held.get("created"),
            )
            return
        writer, created = held.get("writer", "another writer"), held.get("created", "at an unknown time")
        raise VersionTakenError(
            f"release {release.uri} is being published with other content by {writer} (claimed {created}, "
            f"s3://{self.bucket}/{key}); choose another version, or delete that object if its writer is dead"
        )

    def _put_manifest(self, key: str, release: Release) -> None:
        from botocore.exceptions import ClientError

        try:
            self._client.put_object(
                Bucket=self.bucket,
                Key=key,
                Body=release.manifest_bytes(),
                ContentType="application/json",
                ChecksumAlgorithm="SHA256",
                IfNoneMatch="*",
            )
        except ClientError as e:
            if error_code(e) not in ("PreconditionFailed", "ConditionalRequestConflict"):
                raise
            # A manifest is there already. botocore retries a PUT that timed out or got a 5xx, so it may be
            # ours, stored by the attempt whose answer was lost: the same bytes are our release, published.
            try:
                existing = self._client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
            except ClientError:
                existing = None
            if existing != release.manifest_bytes():
                raise StoreError(
                    f"release {release.uri} was published concurrently by another writer"
                ) from None
            log.info("%s: the manifest stored by an earlier attempt of this PUT is ours", release.uri)

    def _download(
        self, release: Release, entry: FileEntry, dest: Path, callback: ProgressCallback | None
    ) -> None:
        key = self._key(release.model, release.version, entry.path)
        with self._errors(f"downloading s3://{self.bucket}/{key}", key=key):
            self._client.download_file(
                self.bucket,
                key,
                str(dest),
                Config=self._transfer_config(),
                Callback=(lambda n: callback(entry.path, n)) if callback else None,
            )

    def fetch(
        self,
        model: str,
        version: str | None = None,
        dest: str | Path | None = None,
        *,
        callback: ProgressCallback | None = None,
        validated: bool = False,
    ) -> Path:
        self._check_bucket(f"fetching {self.uri}/{model}")
        return super().fetch(model, version, dest, callback=callback, validated=validated)

    def abort_incomplete(self, model: str) -> int:
        """Aborts every pending multipart upload of `model` (e.g. after a crash); returns the count."""
        with self._errors(f"aborting uploads under {self.uri}/{model}"):
            return self._abort_stale_uploads(self._key(model) + "/")


# --- from params --------------------------------------------------------------------------------
def open_store(cfg: StoreParams, cache_dir: str | Path | None = None) -> ArtifactStore:
    """The store configured by a `StoreParams` section (`params.deploy.store`)."""
    cache = cache_dir if cache_dir is not None else cfg.cache_dir
    if cfg.backend == "local":
        return LocalStore(cfg.root, cache_dir=cache)
    if cfg.backend == "s3":
        return S3Store(
            cfg.bucket or "",
            cfg.prefix,
            endpoint_url=cfg.endpoint_url,
            region=cfg.region,
            multipart_threshold_mib=cfg.multipart_threshold_mib,
            multipart_chunksize_mib=cfg.multipart_chunksize_mib,
            max_concurrency=cfg.max_concurrency,
            connect_timeout_s=cfg.connect_timeout_s,
            read_timeout_s=cfg.read_timeout_s,
            max_attempts=cfg.max_attempts,
            verify=cfg.verify,
            addressing_style=cfg.addressing_style,
            cache_dir=cache,
        )
    raise StoreError(f"unknown store backend {cfg.backend!r} (deploy.store.backend: local or s3)")


__all__ = [
    "ArtifactStore",
    "LocalStore",
    "S3Store",
    "StoreError",
    "TransientStoreError",
    "Release",
    "FileEntry",
    "open_store",
    "scan_dir",
    "verify_tree",
    "sha256_file",
    "natural_key",
    "check_name",
    "load_member",
    "release_exits",
    "MANIFEST_NAME",
    "VALIDATED_NAME",
    "VersionTakenError",
]
