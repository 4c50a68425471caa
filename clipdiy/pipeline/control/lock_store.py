"""Where the OUTPUT lock file lives, with compare-and-swap writes where the store allows them.

A :class:`LockStore` reads the lock file with a *version* (S3: its ETag; local disk: inode,
mtime and a digest of the bytes) and writes it only if nothing else wrote it since:

- :meth:`~LockStore.create` succeeds only when there is no lock file;
- :meth:`~LockStore.replace` and :meth:`~LockStore.delete` only when the file still has the
  version the caller read (or last wrote).

A refused condition raises :class:`ConditionalWriteConflict`. Implementations:

- :class:`LocalLockStore`: the file is created complete with ``os.link`` of a written temporary
  file (no empty lock file ever, even if the driver dies in between), replaced with
  ``os.replace``; every compare-and-write runs under ``flock`` on a sidecar file, so two
  processes (on one host, or on a file system whose flock is shared between hosts) cannot both
  win it;
- :class:`S3LockStore`: S3 conditional writes, ``PutObject`` with ``If-None-Match: *`` (create)
  and ``If-Match: <ETag>`` (replace), ``DeleteObject`` with ``If-Match``. S3 answers a failed
  condition with 412 (or 409 for a concurrent conditional write); both are conflicts. Needs a
  botocore that knows the parameters (1.35.x, Nov 2024, or later); with an older one, or an
  S3-compatible store that ignores the headers, the caller's read-back check remains;
- :class:`PlainLockStore`: any other fsspec store (gcs, ...), unconditional writes; the caller
  reads its write back after a pause (``conditional`` is False).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import posixpath
import uuid
from dataclasses import dataclass
from typing import Protocol

from clipdiy.output_layout import OutputLayout

logger = logging.getLogger(__name__)

#: S3 error codes and HTTP statuses of a failed write condition.
_CONFLICT_CODES = frozenset({"PreconditionFailed", "ConditionalRequestConflict", "412", "409"})
_CONFLICT_STATUSES = frozenset({409, 412})


class ConditionalWriteConflict(Exception):
    """The store refused a conditional write: the lock file is not (any more) what was read."""


@dataclass(frozen=True)
class StoredLock:
    """One read of the lock file: its bytes, its version, and when it was last written (epoch s,
    the store's clock)."""

    data: bytes
    version: str
    modified_at: float


class LockStore(Protocol):
    #: True when create/replace/delete are atomic compare-and-swaps on the store itself.
    conditional: bool

    def read(self) -> StoredLock | None: ...

    def create(self, data: bytes) -> str: ...

    def replace(self, data: bytes, expected_version: str) -> str: ...

    def delete(self, expected_version: str) -> None: ...


def is_conflict(error: BaseException) -> bool:
    """Whether a storage error (or anything in its cause chain) is a failed write condition."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, (ConditionalWriteConflict, FileExistsError)):
            return True
        response = getattr(current, "response", None)
        if isinstance(response, dict):
            code = str(response.get("Error", {}).get("Code", ""))
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in _CONFLICT_CODES or status in _CONFLICT_STATUSES:
                return True
        current = current.__cause__ or current.__context__
    return False


def open_lock_store(layout: OutputLayout) -> LockStore:
    """The store for ``layout``'s lock file: local, S3 (conditional), or plain."""
    path = layout.lock_path()
    if layout.is_local:
        return LocalLockStore(path)
    if _is_s3fs(layout.fs):
        if s3_conditional_writes_supported():
            return S3LockStore(layout.fs, path)
        logger.warning("this botocore cannot send conditional writes (If-Match/If-None-Match, botocore >= 1.35.x): "
                       "the lock of %s is written plainly and read back", layout.uri)
    return PlainLockStore(layout.fs, path)


# --------------------------------------------------------------------------------- local disk


class LocalLockStore:
    """A lock file on a local (or shared POSIX) file system."""

    conditional = True

    def __init__(self, path: str):
        self.path = path
        directory, name = posixpath.split(path)
        self.mutex_path = posixpath.join(directory, f".{name}.flock")

    @contextlib.contextmanager
    def _exclusive(self):
        import fcntl

        os.makedirs(posixpath.dirname(self.path), exist_ok=True)
        with open(self.mutex_path, "a") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def read(self) -> StoredLock | None:
        try:
            with open(self.path, "rb") as handle:
                data = handle.read()
                status = os.fstat(handle.fileno())
        except FileNotFoundError:
            return None
        digest = hashlib.blake2b(data, digest_size=8).hexdigest()
        return StoredLock(data, f"{status.st_ino}-{status.st_mtime_ns}-{digest}", status.st_mtime)

    def _written_temp(self, data: bytes) -> str:
        directory, name = posixpath.split(self.path)
        temp = posixpath.join(directory, f".tmp-{uuid.uuid4().hex}-{name}")
        with open(temp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        return temp

    def create(self, data: bytes) -> str:
        with self._exclusive():
            temp = self._written_temp(data)
            try:
                os.link(temp, self.path)  # atomic, fails if the lock exists, never leaves it empty
            except FileExistsError:
                raise ConditionalWriteConflict("the lock file exists") from None
            finally:
                os.unlink(temp)
            return self._version_now()

    def replace(self, data: bytes, expected_version: str) -> str:
        with self._exclusive():
            self._expect(expected_version)
            temp = self._written_temp(data)
            try:
                os.replace(temp, self.path)
            finally:
                if os.path.exists(temp):
                    os.unlink(temp)
            return self._version_now()

    def delete(self, expected_version: str) -> None:
        with self._exclusive():
            self._expect(expected_version)
            os.unlink(self.path)

    def _expect(self, expected_version: str) -> None:
        current = self.read()
        if current is None or current.version != expected_version:
            raise ConditionalWriteConflict("the lock file changed since it was read")

    def _version_now(self) -> str:
        current = self.read()
        if current is None:
            raise OSError(errno.ENOENT, "the lock file vanished right after it was written", self.path)
        return current.version


# --------------------------------------------------------------------------------- S3


def _is_s3fs(fs) -> bool:
    try:
        from s3fs import S3FileSystem
    except ImportError:
        return False
    return isinstance(fs, S3FileSystem)


def s3_conditional_writes_supported() -> bool:
    """Whether the installed botocore sends ``IfMatch``/``IfNoneMatch`` on PutObject (s3fs drops
    parameters botocore does not know, which would make a conditional write a plain one)."""
    try:
        import botocore.session

        model = botocore.session.get_session().get_service_model("s3")
        members = model.operation_model("PutObject").input_shape.members
    except Exception:  # noqa: BLE001 - no model, no conditional writes
        return False
    return "IfMatch" in members and "IfNoneMatch" in members


class S3LockStore:
    """The lock object on S3, written with S3's conditional requests."""

    conditional = True

    def __init__(self, fs, path: str):
        self.fs = fs
        self.bucket, _, self.key = path.partition("/")

    def read(self) -> StoredLock | None:
        from fsspec.asyn import sync

        async def get():
            response = await self.fs._call_s3("get_object", Bucket=self.bucket, Key=self.key)
            try:
                body = await response["Body"].read()
            finally:
                response["Body"].close()
            return body, response["ETag"], response["LastModified"].timestamp()

        try:
            data, etag, modified = sync(self.fs.loop, get)
        except FileNotFoundError:
            return None
        return StoredLock(data, etag, modified)

    def _put(self, data: bytes, **condition: str) -> str:
        try:
            response = self.fs.call_s3("put_object", Bucket=self.bucket, Key=self.key, Body=data, **condition)
        except Exception as error:
            if is_conflict(error):
                raise ConditionalWriteConflict(_s3_status(error)) from error
            raise
        return response["ETag"]

    def create(self, data: bytes) -> str:
        return self._put(data, IfNoneMatch="*")

    def replace(self, data: bytes, expected_version: str) -> str:
        return self._put(data, IfMatch=expected_version)

    def delete(self, expected_version: str) -> None:
        try:
            self.fs.call_s3("delete_object", Bucket=self.bucket, Key=self.key, IfMatch=expected_version)
        except FileNotFoundError:
            raise ConditionalWriteConflict("the lock object is gone") from None
        except Exception as error:
            if is_conflict(error):
                raise ConditionalWriteConflict(_s3_status(error)) from error
            if not _not_implemented(error):
                raise
            # A store without conditional deletes: compare, then delete (a narrow race, and only
            # at release, when this run is done writing).
            current = self.read()
            if current is None or current.version != expected_version:
                raise ConditionalWriteConflict("the lock object changed since it was written") from None
            self.fs.call_s3("delete_object", Bucket=self.bucket, Key=self.key)
        finally:
            self.fs.invalidate_cache(posixpath.dirname(f"{self.bucket}/{self.key}"))


def _not_implemented(error: BaseException) -> bool:
    current: BaseException | None = error
    while current is not None:
        response = getattr(current, "response", None)
        if isinstance(response, dict):
            code = str(response.get("Error", {}).get("Code", ""))
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            return code in {"NotImplemented", "InvalidArgument", "InvalidRequest"} or status == 501
        current = current.__cause__
    return False


def _s3_status(error: BaseException) -> str:
    current: BaseException | None = error
    while current is not None:
        response = getattr(current, "response", None)
        if isinstance(response, dict):
            code = response.get("Error", {}).get("Code", "")
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode", "")
            return f"HTTP {status} {code}".strip()
        current = current.__cause__
    return type(error).__name__


# --------------------------------------------------------------------------------- others


class PlainLockStore:
    """Any other fsspec store: unconditional writes (the caller verifies by reading back)."""

    conditional = False

    def __init__(self, fs, path: str):
        self.fs = fs
        self.path = path

    def read(self) -> StoredLock | None:
        self.fs.invalidate_cache(posixpath.dirname(self.path))
        try:
            data = self.fs.cat_file(self.path)
        except FileNotFoundError:
            return None
        try:
            modified = self.fs.modified(self.path).timestamp()
        except (NotImplementedError, OSError, AttributeError):
            modified = 0.0
        return StoredLock(data, hashlib.blake2b(data, digest_size=8).hexdigest(), modified)

    def _write(self, data: bytes) -> str:
        self.fs.pipe_file(self.path, data)
        self.fs.invalidate_cache(posixpath.dirname(self.path))
        return hashlib.blake2b(data, digest_size=8).hexdigest()

    def create(self, data: bytes) -> str:
        if self.read() is not None:
            raise ConditionalWriteConflict("the lock file exists")
        return self._write(data)

    def replace(self, data: bytes, expected_version: str) -> str:
        current = self.read()
        if current is None or current.version != expected_version:
            raise ConditionalWriteConflict("the lock file changed since it was read")
        return self._write(data)

    def delete(self, expected_version: str) -> None:
        current = self.read()
        if current is None or current.version != expected_version:
            raise ConditionalWriteConflict("the lock file changed since it was read")
        self.fs.rm_file(self.path)
