"""Artifact store: one interface over a local directory and an S3 bucket.

Every stage of a flow reads and writes its products (profiles, plans, traces,
result tables) through an `ArtifactStore`, so the same flow runs against a
directory on this machine or against S3/MinIO on a real cluster.

What every store guarantees:

- Keys are relative, '/'-separated paths such as ``"jellybean/run-1/plan.json"``.
  A key is rejected (`StoreError`) when it is empty, starts or ends with '/',
  has an empty, '.' or '..' segment, a segment starting with '.' (hidden names
  are reserved for the store's temp, hash and lock files), a backslash or a
  control character.
- Writes are atomic: a reader sees the old object or the new one, never a part.
  `LocalStore` writes a temp file in the target's directory, then moves it into
  place with `os.replace`; `S3Store` uploads with a single ``put_object``.
- Every write records the content's SHA-256 (a hidden sidecar file locally, the
  ``sha256`` user metadata on S3) and returns it; every read recomputes it and
  raises `StoreError` when the object was changed behind the store's back.
- `put_blob` stores content under ``blobs/sha256/<hash>``; storing the same
  content again writes nothing.

`open_store` turns a URL (``None``, a path, ``file://...``, ``s3://bucket/prefix``)
into the matching store.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tempfile
from abc import ABC, abstractmethod
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Iterator
from urllib.parse import urlsplit
from urllib.request import url2pathname

import pandas as pd

try:
    import fcntl
except ImportError:  # Windows: no flock; see LocalStore
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "ArtifactStore",
    "LocalStore",
    "S3Store",
    "StoreError",
    "open_store",
    "DEFAULT_LOCAL_ROOT",
    "BLOB_PREFIX",
]

DEFAULT_LOCAL_ROOT = Path("results") / "store"
BLOB_PREFIX = "blobs/sha256/"
CHUNK_SIZE = 1 << 20
# S3 caps keys at 1024 bytes; holding local keys to the same limit keeps a key
# valid in both stores.
MAX_KEY_BYTES = 1024
_FORBIDDEN_KEY_CHARS = re.compile(r"[\\\x00-\x1f\x7f]")


class StoreError(Exception):
    """An artifact could not be stored or read; the message names the key and store."""


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _chunks(stream: BinaryIO) -> Iterator[bytes]:
    while chunk := stream.read(CHUNK_SIZE):
        yield chunk


def validate_key(key: object) -> str:
    """Return ``key`` unchanged if it is a valid store key, else raise `StoreError`."""
    if not isinstance(key, str):
        raise StoreError(f"invalid key {key!r}: a key must be a str, got {type(key).__name__}")
    if not key:
        raise StoreError("invalid key '': a key must not be empty")
    if key.startswith("/"):
        raise StoreError(f"invalid key {key!r}: a key is relative and must not start with '/'")
    if key.endswith("/"):
        raise StoreError(f"invalid key {key!r}: a key must not end with '/'")
    if _FORBIDDEN_KEY_CHARS.search(key):
        raise StoreError(f"invalid key {key!r}: backslashes and control characters are not allowed")
    if len(key.encode("utf-8")) > MAX_KEY_BYTES:
        raise StoreError(f"invalid key {key[:40]!r}...: longer than {MAX_KEY_BYTES} bytes")
    for segment in key.split("/"):
        if segment in ("", ".", ".."):
            raise StoreError(
                f"invalid key {key!r}: empty, '.' and '..' path segments are not allowed"
            )
        if segment.startswith("."):
            raise StoreError(
                f"invalid key {key!r}: segment {segment!r} starts with '.', "
                "which is reserved for the store's own files"
            )
    return key


def _validate_prefix(prefix: str) -> str:
    """A listing prefix is any leading part of a valid key (or empty)."""
    if prefix:
        # 'runs/a' and 'runs/' are both fine prefixes; check them as if completed.
        validate_key(prefix + "x" if prefix.endswith("/") else prefix)
    return prefix


class ArtifactStore(ABC):
    """Keys → bytes, with atomic writes and content-hash verification on every read.

    Subclasses implement the primitives (`put_stream`, `get_bytes`, `get_file`,
    `exists`, `list`, `delete`, `url`); the typed helpers (JSON, Parquet, files,
    blobs) are built on them here, once.
    """

    # --- primitives -------------------------------------------------------

    @abstractmethod
    def put_stream(self, key: str, stream: BinaryIO) -> str:
        """Store everything read from ``stream`` under ``key`` atomically.

        Parameters
        ----------
        key : str
            Where to store it.
        stream : binary file-like
            Read to the end in chunks. If reading raises, nothing is stored and
            any previous object under ``key`` is left intact.

        Returns
        -------
        str
            The SHA-256 hex digest of the stored content.
        """

    @abstractmethod
    def get_bytes(self, key: str) -> bytes:
        """Return the content under ``key``, verified against its recorded SHA-256.

        Raises `StoreError` when the key is missing, has no recorded hash, or the
        content does not match it.
        """

    @abstractmethod
    def get_file(self, key: str, path: str | os.PathLike[str]) -> Path:
        """Copy the object under ``key`` to ``path`` (parents created), verified.

        The file appears at ``path`` only after its hash has been checked, so a
        corrupted object never lands there. Returns ``Path(path)``.
        """

    @abstractmethod
    def exists(self, key: str) -> bool:
        """Whether an object is stored under ``key``."""

    @abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """Sorted keys that start with ``prefix`` (a plain string prefix, as in S3)."""

    @abstractmethod
    def delete(self, key: str, *, missing_ok: bool = False) -> None:
        """Remove the object under ``key``; a missing key raises unless ``missing_ok``."""

    @abstractmethod
    def url(self, key: str = "") -> str:
        """``file://`` or ``s3://`` URL of ``key`` (of the store's root when empty)."""

    # --- built on the primitives -----------------------------------------

    def put_bytes(self, key: str, data: bytes) -> str:
        """Store ``data`` under ``key``; returns its SHA-256 hex digest."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise StoreError(
                f"cannot store {key!r} in {self.url()}: data must be bytes, "
                f"got {type(data).__name__}"
            )
        return self.put_stream(key, io.BytesIO(data))

    def put_json(self, key: str, obj: Any) -> str:
        """Store ``obj`` as indented, key-sorted UTF-8 JSON; returns its SHA-256."""
        try:
            text = json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False)
        except (TypeError, ValueError) as exc:
            raise StoreError(f"cannot store {key!r} in {self.url()} as JSON: {exc}") from exc
        return self.put_bytes(key, (text + "\n").encode("utf-8"))

    def get_json(self, key: str) -> Any:
        """Load the JSON document under ``key``."""
        data = self.get_bytes(key)
        try:
            return json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise StoreError(f"{self.url(key)} is not valid UTF-8 JSON: {exc}") from exc

    def put_file(self, key: str, path: str | os.PathLike[str]) -> str:
        """Store the file at ``path`` under ``key``; returns its SHA-256."""
        source = Path(path)
        try:
            with source.open("rb") as stream:
                return self.put_stream(key, stream)
        except OSError as exc:
            raise StoreError(f"cannot read {source} to store it as {self.url(key)}: {exc}") from exc

    def put_dataframe(self, key: str, df: pd.DataFrame) -> str:
        """Store ``df`` as Parquet (pyarrow, index kept); returns its SHA-256."""
        if not isinstance(df, pd.DataFrame):
            raise StoreError(
                f"cannot store {key!r} in {self.url()}: expected a pandas DataFrame, "
                f"got {type(df).__name__}"
            )
        buffer = io.BytesIO()
        try:
            df.to_parquet(buffer, engine="pyarrow")
        except (ValueError, TypeError, NotImplementedError, ImportError) as exc:
            raise StoreError(f"cannot write {key!r} as Parquet: {exc}") from exc
        return self.put_bytes(key, buffer.getvalue())

    def get_dataframe(self, key: str) -> pd.DataFrame:
        """Load the Parquet table under ``key``."""
        data = self.get_bytes(key)
        try:
            return pd.read_parquet(io.BytesIO(data), engine="pyarrow")
        except Exception as exc:  # pyarrow raises its own ArrowInvalid family
            raise StoreError(f"{self.url(key)} is not a readable Parquet file: {exc}") from exc

    def put_blob(self, data: bytes) -> str:
        """Store ``data`` content-addressed; returns its key ``blobs/sha256/<hash>``.

        Idempotent: when that key already exists nothing is written.
        """
        key = BLOB_PREFIX + _sha256(bytes(data))
        if not self.exists(key):
            self.put_bytes(key, data)
        return key

    # --- shared checks ----------------------------------------------------

    def _verify(self, key: str, actual: str, recorded: str | None) -> None:
        if recorded is None:
            raise StoreError(
                f"{self.url(key)} has no recorded content hash: it was written outside "
                "the artifact store or its hash record was lost"
            )
        if actual != recorded:
            raise StoreError(
                f"content hash mismatch for {key!r} in {self.url()}: recorded sha256 "
                f"{recorded}, content has {actual}; the object was modified outside the "
                "store or is corrupted"
            )

    def _missing(self, key: str) -> StoreError:
        return StoreError(f"no artifact {key!r} in store {self.url()}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url()!r})"


class LocalStore(ArtifactStore):
    """Artifacts as plain files under ``root``, each with a hidden hash sidecar.

    Key ``a/b.json`` is the file ``root/a/b.json``, so ``url(key)`` opens in any
    tool. Beside it live ``.b.json.sha256`` (its recorded hash) and
    ``.b.json.lock``. A writer holds the lock exclusively only while it renames
    the data and its sidecar into place; a reader holds it shared only while it
    reads the sidecar and opens the data file. So a reader always pairs a version
    with its own hash, even with concurrent writers (POSIX ``flock``; where
    ``fcntl`` is missing, e.g. Windows, the lock is a no-op).

    Keys map to paths, so a key cannot also be a "directory" of other keys here
    ('a' and 'a/b' conflict); that raises `StoreError`.
    """

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root).expanduser().resolve()

    def url(self, key: str = "") -> str:
        if not key:
            return self.root.as_uri()
        return self._path(key).as_uri()

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*validate_key(key).split("/"))

    @staticmethod
    def _sidecar(path: Path) -> Path:
        return path.with_name(f".{path.name}.sha256")

    @staticmethod
    def _lock_path(path: Path) -> Path:
        return path.with_name(f".{path.name}.lock")

    @contextmanager
    def _locked(self, path: Path, *, exclusive: bool) -> Iterator[bool]:
        """Hold the key's lock; yields False when a reader found no lock file.

        Writers create the lock file. Readers never do (reading must not litter),
        so a reader of a key that was never written by the store reads unlocked.
        """
        if fcntl is None:
            yield True
            return
        lock_path = self._lock_path(path)
        while True:
            try:
                fd = os.open(lock_path, os.O_RDWR | (os.O_CREAT if exclusive else 0), 0o644)
            except (FileNotFoundError, NotADirectoryError):
                if exclusive:
                    raise
                yield False
                return
            try:
                fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
                # `delete` unlinks the lock file; a lock taken on the unlinked
                # file guards nothing, so take the current one instead.
                try:
                    current = os.stat(lock_path).st_ino == os.fstat(fd).st_ino
                except FileNotFoundError:
                    current = False
                if not current:
                    continue
                yield True
                return
            finally:
                os.close(fd)

    def put_stream(self, key: str, stream: BinaryIO) -> str:
        path = self._path(key)
        self._make_parent(key, path)
        if path.is_dir():
            raise StoreError(
                f"cannot store {key!r} in {self.url()}: other keys are stored under "
                f"'{key}/', so it cannot also be a key here"
            )
        data_tmp = side_tmp = None
        try:
            digest = hashlib.sha256()
            data_tmp = self._temp_for(path)
            with open(data_tmp, "wb") as out:
                for chunk in _chunks(stream):
                    digest.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            content_hash = digest.hexdigest()
            side_tmp = self._temp_for(path)
            Path(side_tmp).write_text(content_hash + "\n", encoding="ascii")
            with self._locked(path, exclusive=True):
                os.replace(data_tmp, path)
                data_tmp = None
                os.replace(side_tmp, self._sidecar(path))
                side_tmp = None
            return content_hash
        except OSError as exc:
            raise StoreError(f"cannot write {self.url(key)}: {exc}") from exc
        finally:
            for leftover in (data_tmp, side_tmp):
                if leftover is not None:
                    Path(leftover).unlink(missing_ok=True)

    def _make_parent(self, key: str, path: Path) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError) as exc:
            blocker = path.parent
            while not blocker.exists() and blocker != self.root:
                blocker = blocker.parent
            if blocker.is_file() and blocker.is_relative_to(self.root):
                existing = blocker.relative_to(self.root).as_posix()
                reason = f"key {existing!r} is a stored artifact, so nothing can be stored under it"
            else:
                reason = str(exc)
            raise StoreError(f"cannot store {key!r} in {self.url()}: {reason}") from exc

    @staticmethod
    def _temp_for(path: Path) -> str:
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        return name

    def _open_with_recorded_hash(self, key: str, path: Path) -> tuple[BinaryIO, str | None]:
        """Open the data file and read its recorded hash as one consistent pair.

        The open file keeps this version readable whatever writers do next.
        """
        while True:
            with self._locked(path, exclusive=False) as locked:
                try:
                    recorded = self._sidecar(path).read_text(encoding="ascii").strip()
                except FileNotFoundError:
                    recorded = None
                try:
                    handle = open(path, "rb")
                except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
                    raise self._missing(key) from None
            if locked or not self._lock_path(path).exists():
                return handle, recorded
            handle.close()  # the key's first write raced this read: read it under its lock

    def get_bytes(self, key: str) -> bytes:
        path = self._path(key)
        try:
            handle, recorded = self._open_with_recorded_hash(key, path)
            with handle:
                data = handle.read()
        except OSError as exc:
            raise StoreError(f"cannot read {self.url(key)}: {exc}") from exc
        self._verify(key, _sha256(data), recorded)
        return data

    def get_file(self, key: str, path: str | os.PathLike[str]) -> Path:
        source = self._path(key)
        target = Path(path)
        tmp = None
        try:
            handle, recorded = self._open_with_recorded_hash(key, source)
            with handle:
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = self._temp_for(target)
                digest = hashlib.sha256()
                with open(tmp, "wb") as out:
                    for chunk in _chunks(handle):
                        digest.update(chunk)
                        out.write(chunk)
            self._verify(key, digest.hexdigest(), recorded)
            os.replace(tmp, target)
            tmp = None
            return target
        except OSError as exc:
            raise StoreError(f"cannot copy {self.url(key)} to {target}: {exc}") from exc
        finally:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> list[str]:
        _validate_prefix(prefix)
        # Walk only the deepest directory the prefix names.
        start = self.root.joinpath(*prefix.split("/")[:-1]) if "/" in prefix else self.root
        keys = []
        for dirpath, dirnames, filenames in os.walk(start):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            relative = Path(dirpath).relative_to(self.root).as_posix()
            for name in filenames:
                if name.startswith("."):
                    continue
                key = name if relative == "." else f"{relative}/{name}"
                if key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    def delete(self, key: str, *, missing_ok: bool = False) -> None:
        path = self._path(key)
        if not path.is_file():
            if missing_ok:
                return
            raise self._missing(key)
        try:
            with self._locked(path, exclusive=True):
                path.unlink(missing_ok=missing_ok)
                self._sidecar(path).unlink(missing_ok=True)
                self._lock_path(path).unlink(missing_ok=True)
        except FileNotFoundError:
            raise self._missing(key) from None  # a concurrent delete won
        except OSError as exc:
            raise StoreError(f"cannot delete {self.url(key)}: {exc}") from exc
        # Prune emptied directories so 'a' can become a key again after 'a/b' goes.
        parent = path.parent
        while parent != self.root:
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent


class S3Store(ArtifactStore):
    """Artifacts as objects in an S3 (or MinIO, moto) bucket under an optional prefix.

    Parameters
    ----------
    bucket : str
        Bucket name.
    prefix : str, optional
        Key prefix inside the bucket ("runs" stores key ``a/b`` as ``runs/a/b``).
    endpoint_url : str, optional
        S3-compatible endpoint (MinIO, moto); AWS when None.
    region : str, optional
        Region name; from the usual boto3 configuration when None.
    client : botocore S3 client, optional
        Use this client instead of building one (``endpoint_url``/``region`` are then ignored).
    create_bucket : bool
        Create the bucket when it does not exist.

    Credentials come from the usual boto3 chain (environment, profile, instance role).
    Each write is a single ``put_object`` with the content's SHA-256 as the
    ``sha256`` user metadata, so objects are limited to S3's 5 GB single-upload size.
    """

    _HASH_METADATA = "sha256"
    # Streams larger than this spool to a temp file while being hashed.
    _SPOOL_MEMORY_BYTES = 64 << 20

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        endpoint_url: str | None = None,
        region: str | None = None,
        client: Any = None,
        *,
        create_bucket: bool = False,
    ):
        if not bucket or "/" in bucket:
            raise StoreError(f"invalid S3 bucket name {bucket!r}")
        self.bucket = bucket
        prefix = prefix.strip("/")
        if prefix:
            validate_key(prefix)
        self.prefix = f"{prefix}/" if prefix else ""
        if client is None:
            import boto3

            client = boto3.client("s3", endpoint_url=endpoint_url, region_name=region)
        self.client = client
        self.endpoint_url = client.meta.endpoint_url
        if create_bucket:
            self._ensure_bucket()

    def url(self, key: str = "") -> str:
        if key:
            validate_key(key)
        return f"s3://{self.bucket}/{self.prefix}{key}"

    def _object_key(self, key: str) -> str:
        return self.prefix + validate_key(key)

    # botocore is imported lazily so that `import infra.store` stays cheap for
    # local-only runs; these helpers read its error details.
    @staticmethod
    def _error_code(exc: Exception) -> str:
        response = getattr(exc, "response", None) or {}
        return str(response.get("Error", {}).get("Code", ""))

    def _is_missing(self, exc: Exception) -> bool:
        return self._error_code(exc) in ("NoSuchKey", "404", "NotFound")

    def _fail(self, action: str, key: str, exc: Exception) -> StoreError:
        if self._error_code(exc) == "NoSuchBucket":
            return StoreError(
                f"cannot {action} {key!r}: bucket {self.bucket!r} does not exist at "
                f"{self.endpoint_url} (pass create_bucket=True to create it)"
            )
        return StoreError(f"cannot {action} {key!r} in {self.url()} at {self.endpoint_url}: {exc}")

    @staticmethod
    def _boto_errors() -> tuple[type[Exception], ...]:
        from botocore.exceptions import BotoCoreError, ClientError

        return (ClientError, BotoCoreError)

    def _ensure_bucket(self) -> None:
        errors = self._boto_errors()
        try:
            self.client.head_bucket(Bucket=self.bucket)
            return
        except errors as exc:
            if self._error_code(exc) not in ("404", "NoSuchBucket", "NotFound"):
                raise StoreError(
                    f"cannot reach bucket {self.bucket!r} at {self.endpoint_url}: {exc}"
                ) from exc
        region = self.client.meta.region_name
        kwargs: dict[str, Any] = {"Bucket": self.bucket}
        if region and region != "us-east-1":
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
        try:
            self.client.create_bucket(**kwargs)
        except errors as exc:
            if self._error_code(exc) != "BucketAlreadyOwnedByYou":
                raise StoreError(
                    f"cannot create bucket {self.bucket!r} at {self.endpoint_url}: {exc}"
                ) from exc

    def put_stream(self, key: str, stream: BinaryIO) -> str:
        object_key = self._object_key(key)
        # The hash must be known before the upload starts (it travels as metadata),
        # so the content is spooled once while hashing.
        with tempfile.SpooledTemporaryFile(max_size=self._SPOOL_MEMORY_BYTES) as spool:
            digest = hashlib.sha256()
            for chunk in _chunks(stream):
                digest.update(chunk)
                spool.write(chunk)
            spool.seek(0)
            content_hash = digest.hexdigest()
            try:
                self.client.put_object(
                    Bucket=self.bucket,
                    Key=object_key,
                    Body=spool,
                    Metadata={self._HASH_METADATA: content_hash},
                )
            except self._boto_errors() as exc:
                raise self._fail("store", key, exc) from exc
        return content_hash

    def _get_object(self, key: str) -> dict[str, Any]:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._object_key(key))
        except self._boto_errors() as exc:
            if self._is_missing(exc):
                raise self._missing(key) from None
            raise self._fail("read", key, exc) from exc

    def get_bytes(self, key: str) -> bytes:
        response = self._get_object(key)
        try:
            data = response["Body"].read()
        except self._boto_errors() as exc:
            raise self._fail("read", key, exc) from exc
        self._verify(key, _sha256(data), response.get("Metadata", {}).get(self._HASH_METADATA))
        return data

    def get_file(self, key: str, path: str | os.PathLike[str]) -> Path:
        response = self._get_object(key)
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        try:
            digest = hashlib.sha256()
            with os.fdopen(fd, "wb") as out:
                for chunk in response["Body"].iter_chunks(CHUNK_SIZE):
                    digest.update(chunk)
                    out.write(chunk)
            recorded = response.get("Metadata", {}).get(self._HASH_METADATA)
            self._verify(key, digest.hexdigest(), recorded)
            os.replace(tmp, target)
            tmp = None
            return target
        except self._boto_errors() as exc:
            raise self._fail("read", key, exc) from exc
        finally:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)

    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self._object_key(key))
            return True
        except self._boto_errors() as exc:
            if self._is_missing(exc):
                return False
            raise self._fail("look up", key, exc) from exc

    def list(self, prefix: str = "") -> list[str]:
        _validate_prefix(prefix)
        keys = []
        try:
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + prefix):
                keys.extend(item["Key"][len(self.prefix):] for item in page.get("Contents", []))
        except self._boto_errors() as exc:
            raise self._fail("list", prefix, exc) from exc
        return sorted(keys)

    def delete(self, key: str, *, missing_ok: bool = False) -> None:
        # S3's DeleteObject succeeds on missing keys; look first to report them.
        if not missing_ok and not self.exists(key):
            raise self._missing(key)
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._object_key(key))
        except self._boto_errors() as exc:
            raise self._fail("delete", key, exc) from exc


def open_store(url: str | os.PathLike[str] | None = None, *, create_bucket: bool = False) -> ArtifactStore:
    """Open the artifact store that ``url`` names.

    Parameters
    ----------
    url : str, path or None
        ``None`` → `LocalStore` at ``./results/store``; a filesystem path or a
        ``file://`` URL → `LocalStore` there; ``s3://bucket[/prefix]`` → `S3Store`,
        with the endpoint from ``TIERFLOW_S3_ENDPOINT_URL`` or ``AWS_ENDPOINT_URL``
        when set (MinIO, moto).
    create_bucket : bool
        For S3: create the bucket when it does not exist.
    """
    if url is None:
        return LocalStore(DEFAULT_LOCAL_ROOT)
    if isinstance(url, os.PathLike):
        return LocalStore(url)
    if not isinstance(url, str) or not url.strip():
        raise StoreError(f"invalid store URL {url!r}: expected a path, file:// or s3:// URL")
    if "://" not in url:
        return LocalStore(url)
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise StoreError(
                f"invalid store URL {url!r}: file:// URLs must name a local path "
                f"(file:///abs/path), not host {parts.netloc!r}"
            )
        if not parts.path:
            raise StoreError(f"invalid store URL {url!r}: no path after file://")
        return LocalStore(url2pathname(parts.path))
    if scheme == "s3":
        if not parts.netloc:
            raise StoreError(f"invalid store URL {url!r}: expected s3://bucket[/prefix]")
        endpoint = os.environ.get("TIERFLOW_S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL")
        return S3Store(
            parts.netloc, parts.path.strip("/"), endpoint_url=endpoint or None,
            create_bucket=create_bucket,
        )
    raise StoreError(
        f"unsupported store URL {url!r}: use a path, file:///path or s3://bucket/prefix"
    )
