"""Specification of the artifact store.

The same suite runs against a `LocalStore` in a temp directory and an `S3Store`
talking to moto's S3 server over HTTP, so both backends are held to one contract.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pandas as pd
import pytest

from infra.store import (
    ArtifactStore,
    LocalStore,
    S3Store,
    StoreError,
    open_store,
)
from tests.aws import FAKE_AWS_ENV


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- fixtures (moto_endpoint: tests/conftest.py) -------------------------------


def unique_bucket() -> str:
    return f"tierflow-test-{uuid.uuid4().hex[:12]}"


@dataclass
class Backend:
    """A store plus a way to change an object behind its back."""

    store: ArtifactStore
    # tamper(key, data, keep_recorded_hash): overwrite the stored content directly;
    # with keep_recorded_hash=False the recorded hash is dropped too.
    tamper: Callable[[str, bytes, bool], None]


def local_backend(root: Path) -> Backend:
    store = LocalStore(root)

    def tamper(key: str, data: bytes, keep_recorded_hash: bool) -> None:
        path = root.joinpath(*key.split("/"))
        path.write_bytes(data)
        if not keep_recorded_hash:
            path.with_name(f".{path.name}.sha256").unlink()

    return Backend(store, tamper)


def s3_backend(endpoint: str) -> Backend:
    store = S3Store(
        unique_bucket(), prefix="artifacts", endpoint_url=endpoint, region="us-east-1",
        create_bucket=True,
    )

    def tamper(key: str, data: bytes, keep_recorded_hash: bool) -> None:
        object_key = store.prefix + key
        metadata = store.client.head_object(Bucket=store.bucket, Key=object_key)["Metadata"]
        store.client.put_object(
            Bucket=store.bucket, Key=object_key, Body=data,
            Metadata=metadata if keep_recorded_hash else {},
        )

    return Backend(store, tamper)


@pytest.fixture(params=["local", "s3"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "local":
        return local_backend(tmp_path / "store")
    return s3_backend(request.getfixturevalue("moto_endpoint"))


@pytest.fixture
def store(backend: Backend) -> ArtifactStore:
    return backend.store


@pytest.fixture
def local_store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "store")


class FailingSource(io.RawIOBase):
    """A data source that hands out `good_bytes` bytes, then fails."""

    def __init__(self, good_bytes: int):
        self.remaining = good_bytes

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        if self.remaining <= 0:
            raise RuntimeError("source died mid-way")
        n = self.remaining if size < 0 else min(size, self.remaining)
        self.remaining -= n
        return b"x" * n


def temp_files(root: Path) -> list[str]:
    """Store-internal files under root other than hash sidecars and lock files."""
    return sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob(".*")
        if p.is_file() and not p.name.endswith((".sha256", ".lock"))
    )


# --- both backends: round trips and hashes ----------------------------------


def test_put_bytes_returns_sha256_of_content_and_round_trips(store: ArtifactStore) -> None:
    data = bytes(range(256)) * 1000
    assert store.put_bytes("runs/r1/weights.bin", data) == sha256(data)
    assert store.get_bytes("runs/r1/weights.bin") == data


def test_empty_content_round_trips(store: ArtifactStore) -> None:
    assert store.put_bytes("empty", b"") == sha256(b"")
    assert store.get_bytes("empty") == b""


def test_put_json_round_trips_and_hash_matches_stored_bytes(store: ArtifactStore) -> None:
    plan = {"system": "jellybean", "assignments": [{"worker": "edge-0", "model": "yolo"}],
            "cost": 1.25, "feasible": True, "note": "héllo"}
    content_hash = store.put_json("jellybean/run-1/plan.json", plan)
    assert store.get_json("jellybean/run-1/plan.json") == plan
    assert content_hash == sha256(store.get_bytes("jellybean/run-1/plan.json"))


def test_put_json_rejects_unserializable_objects(store: ArtifactStore) -> None:
    with pytest.raises(StoreError, match="bad.json"):
        store.put_json("bad.json", {"x": object()})
    assert not store.exists("bad.json")


def test_put_dataframe_round_trips_through_parquet(store: ArtifactStore) -> None:
    df = pd.DataFrame(
        {
            "latency_ms": [1.5, 2.25, float("nan")],
            "batch": [1, 8, 32],
            "device": ["T4", "A100", "H100"],
            "ok": [True, False, True],
            "at": pd.to_datetime(["2025-01-01", "2025-01-02", "2025-01-03"]),
        },
        index=pd.Index(["a", "b", "c"], name="run"),
    )
    content_hash = store.put_dataframe("profiles/latency.parquet", df)
    pd.testing.assert_frame_equal(store.get_dataframe("profiles/latency.parquet"), df)
    assert content_hash == sha256(store.get_bytes("profiles/latency.parquet"))


def test_get_dataframe_of_non_parquet_content_is_a_store_error(store: ArtifactStore) -> None:
    store.put_bytes("not-a-table", b"hello")
    with pytest.raises(StoreError, match="not a readable Parquet"):
        store.get_dataframe("not-a-table")


def test_put_file_and_get_file_round_trip(store: ArtifactStore, tmp_path: Path) -> None:
    source = tmp_path / "in" / "trace.bin"
    source.parent.mkdir()
    data = os.urandom(3 * (1 << 20) + 17)  # several read chunks
    source.write_bytes(data)
    assert store.put_file("traces/trace.bin", source) == sha256(data)

    target = tmp_path / "out" / "nested" / "trace.bin"
    assert store.get_file("traces/trace.bin", target) == target
    assert target.read_bytes() == data
    assert [p.name for p in target.parent.iterdir()] == ["trace.bin"]


def test_put_file_of_missing_source_names_it(store: ArtifactStore, tmp_path: Path) -> None:
    with pytest.raises(StoreError, match=re.escape(str(tmp_path / "nope.bin"))):
        store.put_file("k", tmp_path / "nope.bin")


def test_put_stream_returns_sha256_of_everything_read(store: ArtifactStore) -> None:
    data = os.urandom(2 * (1 << 20) + 5)
    assert store.put_stream("streamed", io.BytesIO(data)) == sha256(data)
    assert store.get_bytes("streamed") == data


def test_overwrite_replaces_content_and_hash(store: ArtifactStore) -> None:
    store.put_bytes("plan.json", b"v1")
    assert store.put_bytes("plan.json", b"version two") == sha256(b"version two")
    assert store.get_bytes("plan.json") == b"version two"


# --- both backends: content addressing ---------------------------------------


def test_put_blob_stores_under_its_sha256(store: ArtifactStore) -> None:
    data = b"model weights"
    key = store.put_blob(data)
    assert key == f"blobs/sha256/{sha256(data)}"
    assert store.get_bytes(key) == data


def test_put_blob_of_same_content_twice_writes_nothing(
    store: ArtifactStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = store.put_blob(b"same content")
    writes = []
    real_put_stream = store.put_stream
    monkeypatch.setattr(
        store, "put_stream", lambda key, stream: writes.append(key) or real_put_stream(key, stream)
    )
    assert store.put_blob(b"same content") == first
    assert writes == []
    assert store.put_blob(b"other content") != first
    assert len(writes) == 1
    assert store.list("blobs/") == sorted([first, f"blobs/sha256/{sha256(b'other content')}"])


# --- both backends: listing, existence, deletion -----------------------------


def test_empty_store_lists_nothing(store: ArtifactStore) -> None:
    assert store.list() == []
    assert store.list("runs/") == []


def test_list_returns_sorted_keys_starting_with_prefix(store: ArtifactStore) -> None:
    keys = ["runs/b/plan.json", "runs/a/plan.json", "runs/ab/x", "other/z", "top"]
    for key in keys:
        store.put_bytes(key, key.encode())
    assert store.list() == sorted(keys)
    assert store.list("runs/a") == ["runs/a/plan.json", "runs/ab/x"]  # a string prefix, as in S3
    assert store.list("runs/a/") == ["runs/a/plan.json"]
    assert store.list("runs/") == ["runs/a/plan.json", "runs/ab/x", "runs/b/plan.json"]
    assert store.list("to") == ["top"]
    assert store.list("missing/") == []


def test_exists_and_delete(store: ArtifactStore) -> None:
    assert not store.exists("a/b.json")
    store.put_json("a/b.json", [1, 2])
    assert store.exists("a/b.json")
    assert not store.exists("a")  # a prefix of a key is not a key
    store.delete("a/b.json")
    assert not store.exists("a/b.json")
    assert store.list() == []


def test_delete_of_missing_key_names_it_unless_missing_ok(store: ArtifactStore) -> None:
    with pytest.raises(StoreError, match=re.escape("'gone/plan.json'")):
        store.delete("gone/plan.json")
    store.delete("gone/plan.json", missing_ok=True)


# --- both backends: errors ----------------------------------------------------


@pytest.mark.parametrize("read", ["get_bytes", "get_json", "get_dataframe", "get_file"])
def test_missing_key_error_names_key_and_store(
    store: ArtifactStore, read: str, tmp_path: Path
) -> None:
    args = (tmp_path / "out.bin",) if read == "get_file" else ()
    with pytest.raises(StoreError) as excinfo:
        getattr(store, read)("runs/r9/evaluation.json", *args)
    message = str(excinfo.value)
    assert "'runs/r9/evaluation.json'" in message
    assert store.url() in message
    assert not (tmp_path / "out.bin").exists()


@pytest.mark.parametrize("keep_recorded_hash", [True, False], ids=["stale-hash", "no-hash"])
def test_object_changed_behind_the_stores_back_is_detected(
    backend: Backend, keep_recorded_hash: bool, tmp_path: Path
) -> None:
    store = backend.store
    store.put_bytes("runs/r1/plan.json", b'{"ok": true}')
    backend.tamper("runs/r1/plan.json", b'{"ok": false}', keep_recorded_hash)

    expected = "content hash mismatch" if keep_recorded_hash else "no recorded content hash"
    with pytest.raises(StoreError, match=expected) as excinfo:
        store.get_bytes("runs/r1/plan.json")
    assert "runs/r1/plan.json" in str(excinfo.value)
    with pytest.raises(StoreError, match=expected):
        store.get_json("runs/r1/plan.json")

    target = tmp_path / "copy" / "plan.json"
    with pytest.raises(StoreError, match=expected):
        store.get_file("runs/r1/plan.json", target)
    assert list(target.parent.iterdir()) == []  # corrupted content never lands


def test_corrupted_blob_is_detected_on_read(backend: Backend) -> None:
    key = backend.store.put_blob(b"payload")
    backend.tamper(key, b"pAyload", True)
    with pytest.raises(StoreError, match="content hash mismatch"):
        backend.store.get_bytes(key)


def test_failing_source_leaves_previous_content_intact(store: ArtifactStore) -> None:
    store.put_bytes("plan.json", b"old plan")
    with pytest.raises(RuntimeError, match="source died"):
        store.put_stream("plan.json", FailingSource(good_bytes=(1 << 20) + 3))
    assert store.get_bytes("plan.json") == b"old plan"
    with pytest.raises(RuntimeError):
        store.put_stream("new.json", FailingSource(good_bytes=10))
    assert not store.exists("new.json")
    assert store.list() == ["plan.json"]


INVALID_KEYS = [
    "",
    "/etc/passwd",
    "../outside",
    "runs/../../outside",
    "runs/..",
    "runs/./plan.json",
    "runs//plan.json",
    "runs/",
    ".hidden",
    "runs/.plan.json.sha256",
    "runs\\plan.json",
    "runs/plan\x00.json",
    "k" * 1025,
]


@pytest.mark.parametrize("key", INVALID_KEYS)
def test_invalid_keys_are_rejected_by_every_operation(
    store: ArtifactStore, key: str, tmp_path: Path
) -> None:
    operations = {
        "put_bytes": lambda: store.put_bytes(key, b"x"),
        "get_bytes": lambda: store.get_bytes(key),
        "exists": lambda: store.exists(key),
        "delete": lambda: store.delete(key, missing_ok=True),
        "get_file": lambda: store.get_file(key, tmp_path / "out"),
    }
    if key:  # url("") is the store's own URL
        operations["url"] = lambda: store.url(key)
    for operation in operations.values():
        with pytest.raises(StoreError, match="invalid key"):
            operation()
    assert store.list() == []
    assert not (tmp_path / "outside").exists()


def test_non_string_key_is_rejected(store: ArtifactStore) -> None:
    with pytest.raises(StoreError, match="must be a str"):
        store.put_bytes(Path("a/b"), b"x")  # type: ignore[arg-type]


def test_invalid_list_prefix_is_rejected(store: ArtifactStore) -> None:
    for prefix in ("/runs", "../", "runs/../x"):
        with pytest.raises(StoreError, match="invalid key"):
            store.list(prefix)


def test_non_bytes_data_is_rejected(store: ArtifactStore) -> None:
    with pytest.raises(StoreError, match="must be bytes"):
        store.put_bytes("k", "text")  # type: ignore[arg-type]


# --- local store ----------------------------------------------------------------


def test_local_objects_are_plain_files_at_their_file_url(local_store: LocalStore) -> None:
    local_store.put_bytes("runs/r1/report.md", b"# report")
    url = local_store.url("runs/r1/report.md")
    assert url == (local_store.root / "runs" / "r1" / "report.md").as_uri()
    assert url.startswith("file:///")
    assert (local_store.root / "runs" / "r1" / "report.md").read_bytes() == b"# report"
    assert local_store.url() == local_store.root.as_uri()


def test_local_writes_leave_no_temp_files(local_store: LocalStore, tmp_path: Path) -> None:
    local_store.put_bytes("a/b.bin", b"1")
    local_store.put_bytes("a/b.bin", b"2")
    local_store.put_json("a/c.json", {})
    local_store.put_blob(b"blob")
    local_store.get_file("a/b.bin", tmp_path / "copy.bin")
    assert temp_files(local_store.root) == []
    assert [p.name for p in tmp_path.glob(".*")] == []


def test_local_failing_source_removes_its_temp_file(local_store: LocalStore) -> None:
    local_store.put_bytes("plan.json", b"old plan")
    with pytest.raises(RuntimeError, match="source died"):
        local_store.put_stream("plan.json", FailingSource(good_bytes=(1 << 20) + 3))
    assert temp_files(local_store.root) == []
    assert local_store.get_bytes("plan.json") == b"old plan"


def test_local_failed_rename_keeps_old_content_and_removes_temp_files(
    local_store: LocalStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    local_store.put_bytes("plan.json", b"old plan")

    def refuse(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(StoreError, match="No space left") as excinfo:
        local_store.put_bytes("plan.json", b"new plan")
    assert "plan.json" in str(excinfo.value)
    monkeypatch.undo()
    assert temp_files(local_store.root) == []
    assert local_store.get_bytes("plan.json") == b"old plan"


def test_local_concurrent_writers_and_reader_always_pair_content_with_its_hash(
    local_store: LocalStore,
) -> None:
    versions = [b"A" * 50_000, b"B" * 70_000]
    local_store.put_bytes("hot.bin", versions[0])
    stop = threading.Event()

    def writer(data: bytes) -> None:
        while not stop.is_set():
            local_store.put_bytes("hot.bin", data)

    writers = [threading.Thread(target=writer, args=(data,)) for data in versions]
    for thread in writers:
        thread.start()
    try:
        seen = {local_store.get_bytes("hot.bin") for _ in range(300)}
    finally:
        stop.set()
        for thread in writers:
            thread.join()
    assert seen <= set(versions)
    assert local_store.get_bytes("hot.bin") in versions  # the last write left a matching hash
    assert temp_files(local_store.root) == []


def test_local_delete_leaves_no_store_files_behind(local_store: LocalStore) -> None:
    local_store.put_bytes("runs/r1/plan.json", b"{}")
    local_store.put_blob(b"blob")
    for key in local_store.list():
        local_store.delete(key)
    assert list(local_store.root.iterdir()) == []


def test_local_key_cannot_also_hold_keys_beneath_it(local_store: LocalStore) -> None:
    local_store.put_bytes("runs", b"file")
    with pytest.raises(StoreError, match="'runs' is a stored artifact"):
        local_store.put_bytes("runs/r1/plan.json", b"x")
    local_store.delete("runs")
    local_store.put_bytes("runs/r1/plan.json", b"x")
    with pytest.raises(StoreError, match="other keys are stored under"):
        local_store.put_bytes("runs/r1", b"x")
    local_store.delete("runs/r1/plan.json")  # prunes the emptied directories
    local_store.put_bytes("runs", b"file again")
    assert local_store.list() == ["runs"]


def test_local_store_reads_the_sidecar_hash_it_wrote(local_store: LocalStore) -> None:
    content_hash = local_store.put_bytes("x/y.bin", b"data")
    sidecar = local_store.root / "x" / ".y.bin.sha256"
    assert sidecar.read_text().strip() == content_hash


# --- S3 store ---------------------------------------------------------------------


def test_s3_object_lives_under_prefix_with_its_hash_as_metadata(moto_endpoint: str) -> None:
    store = S3Store(unique_bucket(), prefix="/team/artifacts/", endpoint_url=moto_endpoint,
                    create_bucket=True)
    content_hash = store.put_bytes("runs/r1/plan.json", b"{}")
    head = store.client.head_object(Bucket=store.bucket, Key="team/artifacts/runs/r1/plan.json")
    assert head["Metadata"] == {"sha256": content_hash}
    assert store.url("runs/r1/plan.json") == f"s3://{store.bucket}/team/artifacts/runs/r1/plan.json"
    assert store.list() == ["runs/r1/plan.json"]


def test_s3_stores_with_different_prefixes_do_not_see_each_other(moto_endpoint: str) -> None:
    bucket = unique_bucket()
    one = S3Store(bucket, prefix="one", endpoint_url=moto_endpoint, create_bucket=True)
    two = S3Store(bucket, prefix="two", endpoint_url=moto_endpoint, create_bucket=True)
    one.put_bytes("k", b"1")
    assert two.list() == []
    assert not two.exists("k")


def test_s3_missing_bucket_is_named_unless_created(moto_endpoint: str) -> None:
    bucket = unique_bucket()
    store = S3Store(bucket, endpoint_url=moto_endpoint)
    with pytest.raises(StoreError, match=f"bucket '{bucket}' does not exist"):
        store.put_bytes("k", b"x")
    created = S3Store(bucket, endpoint_url=moto_endpoint, create_bucket=True)
    created.put_bytes("k", b"x")
    assert store.get_bytes("k") == b"x"


def test_s3_store_accepts_a_prebuilt_client(moto_endpoint: str) -> None:
    import boto3

    client = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1")
    store = S3Store(unique_bucket(), client=client, create_bucket=True)
    assert store.client is client
    store.put_json("k.json", {"a": 1})
    assert store.get_json("k.json") == {"a": 1}


def test_s3_unreachable_endpoint_is_a_store_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from botocore.config import Config
    import boto3

    for name, value in FAKE_AWS_ENV.items():
        monkeypatch.setenv(name, value)
    client = boto3.client(
        "s3", endpoint_url="http://127.0.0.1:9", region_name="us-east-1",
        config=Config(connect_timeout=1, retries={"max_attempts": 1}),
    )
    store = S3Store("some-bucket", client=client)
    with pytest.raises(StoreError, match="127.0.0.1:9"):
        store.get_bytes("k")


def test_invalid_bucket_name_is_rejected() -> None:
    with pytest.raises(StoreError, match="bucket"):
        S3Store("", endpoint_url="http://127.0.0.1:9")


# --- open_store ------------------------------------------------------------------


def test_open_store_defaults_to_results_store_in_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    store = open_store(None)
    assert isinstance(store, LocalStore)
    assert store.root == (tmp_path / "results" / "store").resolve()
    assert not store.root.exists()  # opening creates nothing
    store.put_bytes("k", b"v")
    assert (tmp_path / "results" / "store" / "k").read_bytes() == b"v"


@pytest.mark.parametrize("form", ["str", "path", "file-url", "file-localhost-url"])
def test_open_store_maps_paths_and_file_urls_to_local_store(tmp_path: Path, form: str) -> None:
    root = tmp_path / "my store"
    url = {
        "str": str(root),
        "path": root,
        "file-url": root.as_uri(),
        "file-localhost-url": root.as_uri().replace("file://", "file://localhost"),
    }[form]
    store = open_store(url)
    assert isinstance(store, LocalStore)
    assert store.root == root.resolve()


def test_open_store_maps_s3_url_to_bucket_and_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in FAKE_AWS_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("TIERFLOW_S3_ENDPOINT_URL", "http://127.0.0.1:9000")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9999")
    store = open_store("s3://my-bucket/team/runs/")
    assert isinstance(store, S3Store)
    assert (store.bucket, store.prefix) == ("my-bucket", "team/runs/")
    assert store.endpoint_url == "http://127.0.0.1:9000"  # tierflow's variable wins
    assert store.url("k") == "s3://my-bucket/team/runs/k"

    monkeypatch.delenv("TIERFLOW_S3_ENDPOINT_URL")
    assert open_store("s3://my-bucket").endpoint_url == "http://127.0.0.1:9999"
    assert open_store("s3://my-bucket").prefix == ""


def test_open_store_s3_without_endpoint_uses_aws(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in FAKE_AWS_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("TIERFLOW_S3_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    assert "amazonaws.com" in open_store("s3://my-bucket/x").endpoint_url


def test_open_store_s3_end_to_end_against_moto(
    moto_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TIERFLOW_S3_ENDPOINT_URL", moto_endpoint)
    bucket = unique_bucket()
    store = open_store(f"s3://{bucket}/tierflow", create_bucket=True)
    store.put_json("runs/r1/evaluation.json", {"p99_ms": 12.5})
    assert store.get_json("runs/r1/evaluation.json") == {"p99_ms": 12.5}
    assert store.url("runs/r1/evaluation.json") == f"s3://{bucket}/tierflow/runs/r1/evaluation.json"
    raw = store.client.get_object(Bucket=bucket, Key="tierflow/runs/r1/evaluation.json")
    assert json.loads(raw["Body"].read()) == {"p99_ms": 12.5}


@pytest.mark.parametrize(
    "url, message",
    [
        ("gs://bucket/x", "unsupported store URL"),
        ("s3://", "expected s3://bucket"),
        ("s3:///prefix", "expected s3://bucket"),
        ("file://otherhost/x", "must name a local path"),
        ("", "invalid store URL"),
        ("s3://bucket/../x", "invalid key"),
    ],
)
def test_open_store_rejects_bad_urls_clearly(url: str, message: str) -> None:
    with pytest.raises(StoreError, match=re.escape(message)):
        open_store(url)
