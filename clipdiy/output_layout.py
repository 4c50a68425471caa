"""Where a labelling job keeps things under OUTPUT, and how files get there atomically.

::

    OUTPUT/_LOCK.json                              held while a run writes (see lock.py)
    OUTPUT/runs/<run_id>/_RUN.json                 written when the run starts (and on resume)
    OUTPUT/runs/<run_id>/part-AAA-<digest>.parquet  label shards (attempt, digest of their image ids)
    OUTPUT/runs/<run_id>/_MANIFEST.json            written last: the run is finished
    OUTPUT/_report/<run_id>.json                   the run report's aggregates of a finished run
                                                   (clipdiy.labels.report_cache; the job never reads it)

Readers list ``part-*.parquet`` only; in-flight files have names starting with ``.tmp-``, and
on object stores a file appears in one PUT, so a killed writer never leaves a shard that counts.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import uuid
from dataclasses import dataclass
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from clipdiy.errors import OutputWriteError
from clipdiy.locations import Location, as_location
from clipdiy.storage import StorageOptions, open_filesystem
from clipdiy.uris import redact_document, redact_text

RUNS_DIR = "runs"
LOCK_FILE = "_LOCK.json"
RUN_STATE_FILE = "_RUN.json"
MANIFEST_FILE = "_MANIFEST.json"
SHARD_PREFIX = "part-"
SHARD_SUFFIX = ".parquet"
TEMP_PREFIX = ".tmp-"


def shard_name(attempt: int, digest: str) -> str:
    """Deterministic shard file name (attempt number, digest of the shard's image ids): a retried
    write task rewrites the same names."""
    return f"{SHARD_PREFIX}{attempt:03d}-{digest}{SHARD_SUFFIX}"


def _write_failed(where: str, error: OSError) -> OutputWriteError:
    """The error of a failed write under OUTPUT: where, and the system's reason (a failed
    ``write()`` names no file of its own)."""
    reason = f"[Errno {error.errno}] {error.strerror}" if error.errno and error.strerror else str(error)
    # ``where`` is public (OutputLayout.where); the system's reason is a library's text, which
    # may quote a path or URL it was given (finding 7): redacted as text.
    return OutputWriteError(f"writing {where} failed: {redact_text(reason)}", error.errno)


@dataclass
class OutputLayout:
    """OUTPUT on its filesystem: ``fs`` and ``root`` (path without protocol)."""

    fs: fsspec.AbstractFileSystem
    root: str
    uri: Location  # OUTPUT as given: messages name it by its public form

    def __post_init__(self) -> None:
        self.uri = as_location(self.uri)

    @classmethod
    def open(cls, output_uri: str | Location, options: StorageOptions | None = None) -> OutputLayout:
        fs, root = open_filesystem(output_uri, options)
        if isinstance(fs, LocalFileSystem):
            root = os.path.abspath(root).replace(os.sep, "/")
        return cls(fs=fs, root=root, uri=output_uri)

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def runs_dir(self) -> str:
        return self.path(RUNS_DIR)

    def run_dir(self, run_id: str) -> str:
        return self.path(RUNS_DIR, run_id)

    def lock_path(self) -> str:
        return self.path(LOCK_FILE)

    def run_state_path(self, run_id: str) -> str:
        return self.path(RUNS_DIR, run_id, RUN_STATE_FILE)

    def manifest_path(self, run_id: str) -> str:
        return self.path(RUNS_DIR, run_id, MANIFEST_FILE)

    def relative(self, path: str) -> str:
        return posixpath.relpath(path, self.root)

    def where(self, path: str) -> str:
        """``path`` as a user names it in a message: a local path, or OUTPUT's URI joined with the
        path under it (credentials redacted)."""
        if self.is_local:
            return path
        return posixpath.join(self.uri.public.rstrip("/"), self.relative(path))

    def ensure_dir(self, path: str) -> None:
        # Object stores have no folders (and makedirs could create a bucket): local only.
        if self.is_local:
            os.makedirs(path, exist_ok=True)

    def run_ids(self) -> list[str]:
        """Ids of every run folder under OUTPUT/runs (finished or not), sorted."""
        # Other processes write here: never answer from fsspec's listing cache.
        self.fs.invalidate_cache(self.runs_dir())
        try:
            entries = self.fs.ls(self.runs_dir(), detail=True)
        except FileNotFoundError:
            return []
        return sorted(
            posixpath.basename(entry["name"].rstrip("/")) for entry in entries if entry.get("type") == "directory"
        )

    def shard_paths(self, run_id: str) -> list[str]:
        """The committed shards of a run, sorted by name."""
        return [path for path, _ in self.shard_sizes(run_id)]

    def shard_sizes(self, run_id: str) -> list[tuple[str, int]]:
        """(path, bytes) of the committed shards of a run, sorted by name: one listing, no
        request per shard."""
        self.fs.invalidate_cache(self.run_dir(run_id))
        try:
            entries = self.fs.ls(self.run_dir(run_id), detail=True)
        except FileNotFoundError:
            return []
        return sorted(
            (entry["name"], int(entry.get("size") or 0))
            for entry in entries
            if posixpath.basename(entry["name"]).startswith(SHARD_PREFIX) and entry["name"].endswith(SHARD_SUFFIX)
        )

    def exists(self, path: str) -> bool:
        self.fs.invalidate_cache(posixpath.dirname(path))
        return self.fs.exists(path)

    def write_bytes_atomic(self, path: str, data: bytes) -> None:
        """Write ``data`` so readers see the whole file or nothing.

        Local: a temporary name in the same folder, then ``os.replace``. Object stores: one PUT
        (a multipart upload is also only visible once completed).
        """
        if self.is_local:
            directory = posixpath.dirname(path)
            os.makedirs(directory, exist_ok=True)
            temp = posixpath.join(directory, f"{TEMP_PREFIX}{uuid.uuid4().hex}-{posixpath.basename(path)}")
            try:
                with open(temp, "wb") as handle:
                    handle.write(data)
                    handle.flush()
                    os.fsync(handle.fileno())
                os.replace(temp, path)
            except OSError as error:
                raise _write_failed(path, error) from error
            finally:
                with contextlib.suppress(OSError):  # a read-only file system cannot unlink either
                    if os.path.exists(temp):
                        os.unlink(temp)
        else:
            try:
                self.fs.pipe_file(path, data)
            except OSError as error:
                raise _write_failed(self.where(path), error) from error
            self.fs.invalidate_cache(posixpath.dirname(path))

    def write_json_atomic(self, path: str, document: dict[str, Any]) -> None:
        """Write a JSON document atomically; every string in it redacted (no credential is written)."""
        document = redact_document(document)
        self.write_bytes_atomic(path, (json.dumps(document, indent=2, sort_keys=True, default=str) + "\n").encode())

    def read_json(self, path: str) -> dict[str, Any] | None:
        """The JSON document at ``path``, or None when there is none."""
        self.fs.invalidate_cache(posixpath.dirname(path))
        try:
            with self.fs.open(path, "rb") as handle:
                return json.loads(handle.read().decode("utf-8"))
        except FileNotFoundError:
            return None

    def invalidate(self) -> None:
        self.fs.invalidate_cache()
