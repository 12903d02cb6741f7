"""The artifact store (tasks/release/store.py): local directory and a real S3 server (SeaweedFS).

Releases are tiny real exports (`tiny_export.build_tiny_export`: stock Qwen3 members written by
`ruyi_model.export.export_exits`); loaded members are compared with plain transformers loading of the
source export (bitwise logits) and with the family checkpoint (every member = a stock Qwen3).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from s3server import s3_server  # noqa: F401  (module-scoped SeaweedFS fixture)
from tiny_export import build_tiny_export, private_tmpdir

from ruyi_model.export import verify_export
from tasks.core.params import ParamsError, load_params
from tasks.core.stage import TRANSIENT_EXIT_CODE, USER_ERROR_EXIT_CODE, TransientError, stage_main
from tasks.data.sources import load_source
from tasks.release.store import (
    MANIFEST_NAME,
    LocalStore,
    S3Store,
    StoreError,
    TransientStoreError,
    natural_key,
    open_store,
    scan_dir,
    sha256_file,
)

REPO = Path(__file__).resolve().parents[2]
BLOB_MIB = 11  # > 2 parts of 5 MiB: exercises multipart with a 1 MiB threshold


@pytest.fixture(scope="module")
def export_dir():
    with private_tmpdir("ruyi-store-export-") as tmp:
        yield build_tiny_export(tmp / "export")


@pytest.fixture(scope="module")
def blob_export(export_dir):
    """The export plus an 11 MiB file sorted last (`zz_blob.bin`), so it is uploaded after the rest."""
    with private_tmpdir("ruyi-store-blob-") as tmp:
        out = tmp / "export"
        shutil.copytree(export_dir, out)
        (out / "zz_blob.bin").write_bytes(random.Random(0).randbytes(BLOB_MIB << 20))
        yield out


def _ids(n: int = 12) -> torch.Tensor:
    return torch.arange(3, 3 + n).unsqueeze(0) % 300 + 4


def _stock_logits(path: Path) -> torch.Tensor:
    from transformers import Qwen3ForCausalLM

    model = Qwen3ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(_ids()).logits


def _tree_hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}


# --- local backend --------------------------------------------------------------------------
def test_local_publish_list_fetch_load(tmp_path, export_dir):
    store = LocalStore(tmp_path / "store", cache_dir=tmp_path / "cache")
    assert store.list_versions("fam") == []
    rel = store.publish("fam", export_dir, metadata={"git": "abc"})
    assert (rel.version, rel.uri) == ("v0001", f"{store.uri}/fam/v0001")
    assert rel.uri.startswith("file:///")
    assert store.publish("fam", export_dir).version == "v0002"
    assert store.publish("fam", export_dir, version="v10").version == "v10"
    assert store.publish("fam", export_dir).version == "v0011"  # one more than the highest vNNNN
    assert store.list_versions("fam") == ["v0001", "v0002", "v10", "v0011"]
    assert store.latest_version("fam") == "v0011"

    fetched = store.fetch("fam", "v0001")
    assert fetched == tmp_path / "cache" / "fam" / "v0001"
    expected = _tree_hashes(export_dir)
    got = _tree_hashes(fetched)
    assert got.pop(MANIFEST_NAME)
    assert got == expected
    manifest = json.loads((fetched / MANIFEST_NAME).read_text())
    assert manifest["metadata"] == {"git": "abc"} and manifest["version"] == "v0001"
    assert {f["path"]: f["sha256"] for f in manifest["files"]} == expected
    verify_export(fetched, extra_files=[MANIFEST_NAME])  # the export inside the release is intact

    model, tokenizer = store.load("fam", "v0001", exit_layer=2)
    assert type(model).__name__ == "Qwen3ForCausalLM" and model.config.num_hidden_layers == 2
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") is not None
    with torch.no_grad():
        logits = model(_ids()).logits
    assert torch.equal(logits, _stock_logits(export_dir / "exit_2"))
    family, _ = store.load("fam", "v0001", exit_layer=None)
    with torch.no_grad():
        member = family(_ids(), exit_layer=2).logits
    torch.testing.assert_close(member, logits, rtol=0, atol=1e-5)
    with pytest.raises(StoreError, match=r"no member exit_3 \(members: exit_2, exit_4\)"):
        store.load("fam", "v0001", exit_layer=3)


def test_local_immutable_names_and_bad_sources(tmp_path, export_dir):
    store = LocalStore(tmp_path / "store", cache_dir=tmp_path / "cache")
    store.publish("fam", export_dir, version="v0001")
    before = _tree_hashes(tmp_path / "store")
    with pytest.raises(StoreError, match="immutable"):
        store.publish("fam", export_dir, version="v0001")
    assert _tree_hashes(tmp_path / "store") == before
    for bad in ("../up", "a/b", "", ".hidden", "x" * 200):
        with pytest.raises(StoreError, match="invalid version name"):
            store.publish("fam", export_dir, version=bad)
    with pytest.raises(StoreError, match="invalid model name"):
        store.list_versions("no/slash")
    with pytest.raises(StoreError, match=r"release fam/v9 not found .*published versions: v0001"):
        store.fetch("fam", "v9")
    with pytest.raises(StoreError, match="no published release of model 'other'"):
        store.fetch("other")
    (tmp_path / "empty").mkdir()
    with pytest.raises(StoreError, match="empty"):
        store.publish("fam", tmp_path / "empty")
    with pytest.raises(StoreError, match="not a directory"):
        store.publish("fam", tmp_path / "missing")
    fetched = store.fetch("fam")
    with pytest.raises(StoreError, match="already contains a release MANIFEST.json"):
        store.publish("fam", fetched)


def test_local_interrupted_publish_is_invisible(tmp_path, export_dir):
    store = LocalStore(tmp_path / "store", cache_dir=tmp_path / "cache")
    calls = []

    def crash(path, nbytes):
        calls.append(path)
        if len(calls) == 2:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        store.publish("fam", export_dir, callback=crash)
    assert store.list_versions("fam") == []
    assert list((tmp_path / "store" / "fam").iterdir()) == []  # the temporary copy is gone
    # A SIGKILLed publisher leaves its hidden temporary directory: invisible, cleaned by the retry. One of a
    # publisher still running (its pid alive: here the test's parent) is left alone.
    fam = tmp_path / "store" / "fam"
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    leftovers = [fam / f".v0001.tmp-{int(dead.stdout)}-deadbeef", fam / ".v0001.tmp-0badf00d"]  # pid, legacy
    for leftover in leftovers:
        shutil.copytree(export_dir, leftover)
    live = fam / f".v0001.tmp-{os.getppid()}-0123abcd"
    live.mkdir()
    assert store.list_versions("fam") == []
    assert store.publish("fam", export_dir).version == "v0001"
    assert sorted(p.name for p in fam.iterdir()) == sorted(["v0001", live.name])


def test_fetch_verifies_and_reuses(tmp_path, export_dir):
    store = LocalStore(tmp_path / "store", cache_dir=tmp_path / "cache")
    store.publish("fam", export_dir)
    seen = []
    first = store.fetch("fam", callback=lambda p, n: seen.append(p))
    assert len(seen) == len(scan_dir(export_dir))
    seen.clear()
    assert (
        store.fetch("fam", callback=lambda p, n: seen.append(p)) == first and seen == []
    )  # verified cache hit
    cached = first / "exit_2" / "config.json"
    cached.write_text(cached.read_text() + " ")
    store.fetch("fam", callback=lambda p, n: seen.append(p))  # a damaged cache is downloaded again
    assert (
        seen and _tree_hashes(first)["exit_2/config.json"] == _tree_hashes(export_dir)["exit_2/config.json"]
    )
    # Corruption inside the store is detected and nothing appears at the destination.
    stored = tmp_path / "store" / "fam" / "v0001" / "exit_4" / "model.safetensors"
    data = bytearray(stored.read_bytes())
    data[-1] ^= 0xFF
    stored.write_bytes(bytes(data))
    dest = tmp_path / "elsewhere"
    with pytest.raises(StoreError, match=r"exit_4/model.safetensors: sha256 .* does not match"):
        store.fetch("fam", dest=dest)
    assert not dest.exists()


def test_find_identical_and_manifest_checks(tmp_path, export_dir):
    store = LocalStore(tmp_path / "store")
    files = scan_dir(export_dir)
    assert store.find_identical("fam", files) is None
    store.publish("fam", export_dir)
    assert store.find_identical("fam", files) == "v0001"
    changed = [f if f.path != "manifest.json" else type(f)(f.path, f.size, "0" * 64) for f in files]
    assert store.find_identical("fam", changed) is None
    manifest_path = tmp_path / "store" / "fam" / "v0001" / MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text())
    manifest["files"][0]["path"] = "../../etc/passwd"
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match="unsafe file path '../../etc/passwd'"):
        store.get_release("fam", "v0001")
    manifest_path.write_text("{not json")
    with pytest.raises(StoreError, match="unreadable release manifest"):
        store.get_release("fam", "v0001")


def _check_validation_records(store, export_dir, tmp_path) -> None:
    """What both backends must do with `VALIDATED.json` (`mark_validated`, `validation`, `validated=`)."""
    store.publish("fam", export_dir)
    store.publish("fam", export_dir)
    assert store.validation("fam", "v0001") is None
    with pytest.raises(
        StoreError, match=r"has passed the deploy smoke test \(published, not validated: v0001, v0002\)"
    ):
        store.latest_version("fam", validated=True)
    record = store.mark_validated("fam", "v0001", {"smoke_prompts": 3})
    assert store.validation("fam", "v0001") == record and record["evidence"] == {"smoke_prompts": 3}
    assert (store.latest_version("fam"), store.latest_version("fam", validated=True)) == ("v0002", "v0001")
    assert store.fetch("fam", validated=True, dest=tmp_path / "validated").name == "validated"
    assert json.loads((tmp_path / "validated" / MANIFEST_NAME).read_text())["version"] == "v0001"
    assert "VALIDATED.json" not in {p.name for p in (tmp_path / "validated").iterdir()}  # not release content
    assert store.get_release("fam", "v0001").files == store.get_release("fam", "v0002").files
    with pytest.raises(StoreError, match="release fam/v0009 not found"):
        store.mark_validated("fam", "v0009", {})
    with pytest.raises(StoreError, match="not JSON-serializable"):
        store.mark_validated("fam", "v0002", {"when": object()})
    assert store.validation("fam", "v0002") is None  # nothing written by the refused call
    # a record that attests another release's content, or is not a record, is an error naming it
    store._write_validation("fam", "v0002", json.dumps({**record, "content_sha256": "0" * 64}).encode())
    with pytest.raises(StoreError, match=r"fam/v0002/VALIDATED.json attests fam/v0001 with content 0000"):
        store.validation("fam", "v0002")
    store._write_validation("fam", "v0002", b"{not json")
    with pytest.raises(StoreError, match="v0002/VALIDATED.json: not a valid validation record"):
        store.latest_version("fam", validated=True)


def test_local_validation_records(tmp_path, export_dir):
    store = LocalStore(tmp_path / "store", cache_dir=tmp_path / "cache")
    _check_validation_records(store, export_dir, tmp_path)
    assert (tmp_path / "store" / "fam" / "v0001" / "VALIDATED.json").is_file()


def test_publish_with_the_callers_scan_still_verifies_every_copy(tmp_path, export_dir):
    """`publish(files=scan_dir(src))` does not hash the source again, but a file changed since that scan
    is caught by the copy's verification, and nothing is published."""
    store = LocalStore(tmp_path / "store")
    src = tmp_path / "export"
    shutil.copytree(export_dir, src)
    files = scan_dir(src)
    (src / "exit_2" / "config.json").write_text(
        (src / "exit_2" / "config.json").read_text().replace("{", "{ ", 1)
    )
    with pytest.raises(StoreError, match=r"exit_2/config.json: \d+ bytes, the release manifest says"):
        store.publish("fam", src, files=files)
    assert store.list_versions("fam") == []
    assert store.publish("fam", src, files=scan_dir(src)).version == "v0001"


def test_natural_order():
    assert sorted(["v10", "v2", "v0001", "v1.10", "v1.9"], key=natural_key) == [
        "v0001",
        "v1.9",
        "v1.10",
        "v2",
        "v10",
    ]


def test_store_params(tmp_path):
    params = load_params("params.yaml")
    store = open_store(params.deploy.store, cache_dir=tmp_path)
    assert isinstance(store, LocalStore) and store.root == Path("store") and store.cache_dir == tmp_path
    with pytest.raises(ParamsError, match="store.bucket is required"):
        load_params("params.yaml", {"deploy.store.backend": "s3"})
    with pytest.raises(ParamsError, match="multipart_chunksize_mib"):
        load_params("params.yaml", {"deploy.store.multipart_chunksize_mib": 1})
    with pytest.raises(ParamsError, match="worker port range"):
        load_params("params.yaml", {"deploy.port": 15000})
    s3 = open_store(
        load_params(
            "params.yaml",
            {
                "deploy.store.backend": "s3",
                "deploy.store.bucket": "b-1",
                "deploy.store.endpoint_url": "http://127.0.0.1:9",
            },
        ).deploy.store
    )
    assert isinstance(s3, S3Store) and s3.uri == "s3://b-1/ruyi"


# --- S3 (SeaweedFS) ---------------------------------------------------------------------------
@pytest.fixture
def aws_env(s3_server, monkeypatch, tmp_path):  # noqa: F811
    """The server's credentials through the standard AWS variables (and no user AWS config)."""
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    return s3_server


def _shared_bucket(server) -> str:
    """One bucket for the tests that need no bucket of their own (each uses its own model names): a
    SeaweedFS bucket is a collection with volumes of its own, from the server's pool (`-volume.max`)."""
    from botocore.exceptions import ClientError

    try:
        server.create_bucket("rel-shared")
    except ClientError as e:
        if e.response["Error"]["Code"] not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
            raise
    return "rel-shared"


def _s3_store(server, bucket, tmp_path, prefix="releases", **kw) -> S3Store:
    kw = {
        "multipart_threshold_mib": 1,
        "multipart_chunksize_mib": 5,
        "connect_timeout_s": 1,
        "max_attempts": 2,
        "cache_dir": tmp_path / "cache",
        **kw,
    }
    return S3Store(bucket, prefix, endpoint_url=server.endpoint, **kw)


def test_s3_publish_fetch_load_multipart(aws_env, tmp_path, blob_export):
    server = aws_env
    server.create_bucket("rel-main")
    store = _s3_store(server, "rel-main", tmp_path)
    rel = store.publish("fam", blob_export)
    assert (rel.version, rel.uri) == ("v0001", "s3://rel-main/releases/fam/v0001")
    assert store.list_versions("fam") == ["v0001"]
    client = server.client()
    blob = client.head_object(Bucket="rel-main", Key="releases/fam/v0001/zz_blob.bin", ChecksumMode="ENABLED")
    assert blob["ChecksumSHA256"].endswith("-3")  # uploaded in 3 parts (5 + 5 + 1 MiB), checksum verified
    assert blob["Metadata"]["sha256"] == sha256_file(blob_export / "zz_blob.bin")
    small = client.head_object(Bucket="rel-main", Key="releases/fam/v0001/exit_2/config.json")
    assert small["ContentLength"] == (blob_export / "exit_2" / "config.json").stat().st_size
    assert client.list_multipart_uploads(Bucket="rel-main").get("Uploads") is None

    fetched = store.fetch("fam")
    got = _tree_hashes(fetched)
    got.pop(MANIFEST_NAME)
    assert got == _tree_hashes(blob_export)
    model, _ = store.load("fam", "v0001", exit_layer=4)
    with torch.no_grad():
        assert torch.equal(model(_ids()).logits, _stock_logits(blob_export / "exit_4"))
    with pytest.raises(StoreError, match="immutable"):
        store.publish("fam", blob_export, version="v0001")
    # The manifest's conditional PUT, retried by botocore after a lost answer, finds its own bytes stored:
    # published, not "concurrent". Another writer's manifest is a conflict.
    manifest_key = "releases/fam/v0001/" + MANIFEST_NAME
    stored = client.get_object(Bucket="rel-main", Key=manifest_key)["Body"].read()
    store._put_manifest(manifest_key, rel)
    other = dataclasses.replace(rel, metadata={**rel.metadata, "writer": "another"})
    with pytest.raises(StoreError, match="published concurrently by another writer"):
        store._put_manifest(manifest_key, other)
    assert client.get_object(Bucket="rel-main", Key=manifest_key)["Body"].read() == stored


def test_s3_validation_records(aws_env, tmp_path, export_dir):
    bucket = _shared_bucket(aws_env)
    store = _s3_store(aws_env, bucket, tmp_path, "valid")
    _check_validation_records(store, export_dir, tmp_path)
    head = aws_env.client().head_object(Bucket=bucket, Key="valid/fam/v0001/VALIDATED.json")
    assert head["ContentType"] == "application/json"
    assert store.list_versions("fam") == ["v0001", "v0002"]  # a record is not a version


def test_s3_clear_errors(aws_env, tmp_path, export_dir):
    server = aws_env
    server.create_bucket("rel-errors")
    bad_key = S3Store(
        "rel-errors",
        endpoint_url=server.endpoint,
        access_key="nobody",
        secret_key=server.secret_key,
        connect_timeout_s=1,
        max_attempts=1,
    )
    with pytest.raises(
        StoreError,
        match=r"credentials were rejected by http://127\.0\.0\.1:\d+ for bucket .rel-errors. "
        r"\(InvalidAccessKeyId",
    ) as info:
        bad_key.list_versions("fam")
    assert not isinstance(info.value, TransientError)  # a wrong key is the user's to fix: never retried
    bad_secret = S3Store(
        "rel-errors",
        endpoint_url=server.endpoint,
        access_key=server.access_key,
        secret_key="wrong-secret",
        connect_timeout_s=1,
        max_attempts=1,
    )
    with pytest.raises(StoreError, match=r"credentials were rejected .*SignatureDoesNotMatch"):
        bad_secret.publish("fam", export_dir)
    with pytest.raises(StoreError, match="the bucket 'no-such-bucket' does not exist at http://127.0.0.1"):
        _s3_store(server, "no-such-bucket", tmp_path).publish("fam", export_dir)
    dead = _dead_endpoint()
    t0 = time.monotonic()
    with pytest.raises(TransientStoreError, match=f"cannot reach the S3 endpoint {dead}"):
        S3Store("rel-errors", endpoint_url=dead, connect_timeout_s=1, max_attempts=2).fetch("fam")
    assert time.monotonic() - t0 < 15
    assert _s3_store(server, "rel-errors", tmp_path).list_versions("fam") == []  # nothing was written


def _dead_endpoint() -> str:
    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_store_and_user_sources_fail_alike(aws_env, monkeypatch):
    """One S3 client and error mapping (tasks.core.s3): a dead endpoint is the same transient error
    (exit code 75, retried by the flow) from the store and from a user data source; a wrong key is
    the user's to fix in both (exit code 2)."""
    server = aws_env
    server.create_bucket("rel-alike")
    client = server.client()
    client.put_object(Bucket="rel-alike", Key="in/a.jsonl", Body=b'{"text": "a document"}\n')
    try:
        _fail_alike(server, monkeypatch)
    finally:
        # the bucket's volumes back to the server's small pool (-volume.max) for the tests after this one
        client.delete_object(Bucket="rel-alike", Key="in/a.jsonl")
        client.delete_bucket(Bucket="rel-alike")


def _fail_alike(server, monkeypatch) -> None:
    dead = _dead_endpoint()

    def from_store(endpoint, secret=None):
        return S3Store(
            "rel-alike",
            endpoint_url=endpoint,
            secret_key=secret,
            access_key=secret and server.access_key,
            connect_timeout_s=1,
            max_attempts=2,
        ).list_versions("fam")

    def from_source():
        return load_source("s3://rel-alike/in/a.jsonl")

    assert (
        from_store(server.endpoint) == [] and len(from_source().records) == 1
    )  # both work when the server does

    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", dead)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    t0 = time.monotonic()
    errors = []
    for call in (lambda: from_store(dead), from_source):
        with pytest.raises(TransientError) as info:
            call()
        errors.append(info.value)
        assert (
            stage_main(
                "deploy", "doc", lambda params, call=call: call(), ["--params", str(REPO / "params.yaml")]
            )
            == TRANSIENT_EXIT_CODE
        )
    assert time.monotonic() - t0 < 40
    assert [type(e) for e in errors] == [TransientStoreError, TransientStoreError]
    assert all(f"cannot reach the S3 endpoint {dead}" in str(e) for e in errors)

    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", server.endpoint)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    errors = []
    for call in (lambda: from_store(server.endpoint, "wrong-secret"), from_source):
        with pytest.raises(StoreError) as info:
            call()
        errors.append(info.value)
        assert (
            stage_main(
                "deploy", "doc", lambda params, call=call: call(), ["--params", str(REPO / "params.yaml")]
            )
            == USER_ERROR_EXIT_CODE
        )
    assert [type(e) for e in errors] == [StoreError, StoreError]
    assert all(
        f"credentials were rejected by {server.endpoint} for bucket 'rel-alike' (SignatureDoesNotMatch"
        in str(e)
        for e in errors
    )


def test_s3_server_killed_mid_upload_then_retry(aws_env, tmp_path, blob_export):
    server = aws_env
    server.create_bucket("rel-crash")
    store = _s3_store(server, "rel-crash", tmp_path, max_concurrency=1)  # callbacks in this thread
    uploaded: list[str] = []
    blob_bytes = [0]

    def kill_in_blob(path, nbytes):
        uploaded.append(path)
        if path == "zz_blob.bin":
            blob_bytes[0] += nbytes
            if blob_bytes[0] >= 5 << 20 and server.is_running():  # after the first part
                server.kill()

    with pytest.raises(TransientStoreError, match="cannot reach the S3 endpoint"):  # the flow retries this
        store.publish("fam", blob_export, callback=kill_in_blob)
    assert not server.is_running()
    server.restart()
    client = server.client()
    assert store.list_versions("fam") == []  # no visible partial release
    with pytest.raises(StoreError, match="not found"):
        store.fetch("fam", "v0001")
    pending = client.list_multipart_uploads(Bucket="rel-crash").get("Uploads") or []
    assert [u["Key"] for u in pending] == ["releases/fam/v0001/zz_blob.bin"]  # the crash was mid-multipart
    small_files = {p for p in uploaded if p != "zz_blob.bin"}
    assert small_files  # these completed before the crash
    first = sorted(small_files)[0]  # readable at once: restart() waits for the volume server's volumes
    got = client.get_object(Bucket="rel-crash", Key=f"releases/fam/v0001/{first}")["Body"].read()
    assert got == (blob_export / first).read_bytes()

    retried: set[str] = set()
    rel = store.publish("fam", blob_export, callback=lambda p, n: retried.add(p))
    assert rel.version == "v0001"  # the same automatic version, resumed
    assert retried == {"zz_blob.bin"}  # verified files of the first attempt were kept
    assert client.list_multipart_uploads(Bucket="rel-crash").get("Uploads") is None  # stale upload aborted
    got = _tree_hashes(store.fetch("fam"))
    got.pop(MANIFEST_NAME)
    assert got == _tree_hashes(blob_export)


def test_s3_multipart_file_rewritten_after_the_scan_is_refused(aws_env, tmp_path, blob_export):
    """A multipart object is verified against the sha256 scanned for the manifest: the blob rewritten (same
    size) while earlier files upload would otherwise be stored, pass its part checksums (computed from
    the new bytes) and be published under the old sha256."""
    store = _s3_store(aws_env, _shared_bucket(aws_env), tmp_path, "rewrite", max_concurrency=1)
    src = tmp_path / "export"
    shutil.copytree(blob_export, src)
    blob = src / "zz_blob.bin"

    def rewrite_blob(path: str, n: int) -> None:
        if path != blob.name and blob.read_bytes()[:4] != b"NEW!":  # the blob is uploaded last
            with open(blob, "r+b") as f:
                f.write(b"NEW!")

    with pytest.raises(StoreError, match=r"zz_blob.bin: sha256 .* is not the .* scanned .* changed while"):
        store.publish("fam", src, callback=rewrite_blob)
    assert store.list_versions("fam") == []  # nothing published
    assert store.publish("fam", src).version == "v0001"  # the file as it is now: a new scan, published
    got = _tree_hashes(store.fetch("fam"))
    assert got["zz_blob.bin"] == sha256_file(blob)


def _other_blob(src: Path, dest: Path) -> Path:
    """A copy of `src` whose blob has other bytes (same size): other content under the same paths."""
    shutil.copytree(src, dest)
    (dest / "zz_blob.bin").write_bytes(random.Random(1).randbytes(BLOB_MIB << 20))
    return dest


def test_s3_two_writers_of_one_version(aws_env, tmp_path, blob_export):
    """Two deploys that pick the same next vNNNN at once: the second finds the first's claim (other
    content) and publishes as the next version, without touching the first's objects; a fixed version
    claimed by another writer is an error naming the claim. Both releases fetch back verified."""
    bucket = _shared_bucket(aws_env)
    store = _s3_store(aws_env, bucket, tmp_path, "race", max_concurrency=1)
    other = _other_blob(blob_export, tmp_path / "other")
    seen: dict = {}

    def second_writer(path: str, n: int) -> None:  # runs while the first writer uploads its first file
        if "second" not in seen:
            seen["second"] = store.publish("fam", other)
            with pytest.raises(
                StoreError, match=r"race/fam/v0001 is being published with other content by .*:\d+"
            ):
                store.publish("fam", other, version="v0001")

    first = store.publish("fam", blob_export, callback=second_writer)
    assert (first.version, seen["second"].version) == ("v0001", "v0002")
    assert store.list_versions("fam") == ["v0001", "v0002"]
    for version, src in (("v0001", blob_export), ("v0002", other)):
        got = _tree_hashes(store.fetch("fam", version))
        got.pop(MANIFEST_NAME)
        assert got == _tree_hashes(src)
    keys = {o["Key"] for o in aws_env.client().list_objects_v2(Bucket=bucket, Prefix="race/")["Contents"]}
    assert not [k for k in keys if k.endswith("/.publishing.json")]  # claims end with the publication


def test_local_two_writers_of_one_version(tmp_path, blob_export):
    store = LocalStore(tmp_path / "store")
    other = _other_blob(blob_export, tmp_path / "other")
    seen: dict = {}

    def second_writer(path: str, n: int) -> None:
        if "second" not in seen:
            seen["second"] = store.publish("fam", other)  # also v0001: renamed into place first

    first = store.publish("fam", blob_export, callback=second_writer)
    assert (seen["second"].version, first.version) == ("v0001", "v0002")
    assert _tree_hashes(store.fetch("fam", "v0002", dest=tmp_path / "a"))["zz_blob.bin"] == sha256_file(
        blob_export / "zz_blob.bin"
    )
    assert _tree_hashes(store.fetch("fam", "v0001", dest=tmp_path / "b"))["zz_blob.bin"] == sha256_file(
        other / "zz_blob.bin"
    )


def test_s3_detects_tampering_and_download_verify(aws_env, tmp_path, export_dir):
    server = aws_env
    server.create_bucket("rel-verify")
    store = _s3_store(server, "rel-verify", tmp_path, verify="download")
    assert store.publish("fam", export_dir).version == "v0001"
    # Stale objects of an earlier attempt that are not part of the release are removed on publish.
    client = server.client()
    client.put_object(Bucket="rel-verify", Key="releases/fam/v0002/old-leftover.bin", Body=b"x")
    assert store.publish("fam", export_dir).version == "v0002"
    keys = {
        o["Key"]
        for o in client.list_objects_v2(Bucket="rel-verify", Prefix="releases/fam/v0002/")["Contents"]
    }
    assert "releases/fam/v0002/old-leftover.bin" not in keys and "releases/fam/v0002/MANIFEST.json" in keys
    client.put_object(Bucket="rel-verify", Key="releases/fam/v0002/exit_2/config.json", Body=b"{}")
    with pytest.raises(StoreError, match=r"exit_2/config.json: 2 bytes, the release manifest says"):
        store.fetch("fam", "v0002", dest=tmp_path / "tampered")
    assert not (tmp_path / "tampered").exists()
    # A same-named object with other content left by an earlier attempt is uploaded again, not kept.
    client.put_object(Bucket="rel-verify", Key="releases/fam/v0003/exit_4/config.json", Body=b"stale")
    assert store.publish("fam", export_dir).version == "v0003"
    got = _tree_hashes(store.fetch("fam", "v0003"))
    got.pop(MANIFEST_NAME)
    assert got == _tree_hashes(export_dir)


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (TransientStoreError("s3 down"), TRANSIENT_EXIT_CODE),
        (StoreError("credentials were rejected"), USER_ERROR_EXIT_CODE),
    ],
)
def test_stage_exit_code_tells_transient_from_user_errors(error, code, capsys):
    """The flow retries exactly the stages that exit with TRANSIENT_EXIT_CODE (flows/pipeline.py)."""

    def failing(params):
        raise error

    assert stage_main("deploy", "doc", failing, ["--params", str(REPO / "params.yaml")]) == code
    assert str(error) in capsys.readouterr().err
