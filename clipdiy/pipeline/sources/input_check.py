"""The input's pre-flight check: fail fast, in one line, when the input cannot be labelled."""

from __future__ import annotations

import dataclasses
import queue
import threading
from collections.abc import Callable, Collection
from typing import Any

from clipdiy.errors import InputError
from clipdiy.pipeline.sources.manifests import is_manifest
from clipdiy.pipeline.sources.listing import IMAGE_EXTENSIONS, glob_root, iter_sources
from clipdiy.pipeline.sources.objects import GLOB_CHARS, SourceObject
from clipdiy.storage import StorageOptions, describe_error, is_s3, is_transient, open_filesystem
from clipdiy.locations import Location, as_location


def check_input_reachable(
    input_uri: str | Location,
    options: StorageOptions | None = None,
    *,
    extensions: Collection[str] | None = IMAGE_EXTENSIONS,
    timeout: float = 60.0,
) -> SourceObject:
    """Fail fast, with one clear line, when the input cannot be labelled; else its first object.

    Raises :class:`InputError` when the bucket, prefix or manifest does not exist, access is
    denied, the store does not answer within ``timeout`` seconds, or nothing (no image) is
    there. Requests use short connect timeouts and few retries, and the whole check is bounded
    by ``timeout``, so an unreachable endpoint never hangs the job.
    """
    options = options or StorageOptions()
    quick = dataclasses.replace(
        options,
        connect_timeout=min(options.connect_timeout, 5.0),
        read_timeout=min(options.read_timeout, max(timeout / 2, 1.0)),
        max_attempts=min(options.max_attempts, 2),
    )
    where = as_location(input_uri)
    endpoint = f" at {options.endpoint_url}" if options.endpoint_url else ""
    result = _run_bounded(lambda: _first_source(where, quick, extensions), timeout)
    if result is _TIMED_OUT:
        raise InputError(f"input {where} is unreachable: no answer from the store{endpoint} within {timeout:g} s")
    if isinstance(result, BaseException):
        raise InputError(f"input {where}{endpoint}: {_explain(result)}") from result
    first, manifest = result
    if first is None:
        if manifest:
            raise InputError(f"manifest {where} lists no entries")
        what = "no images (extensions: " + ", ".join(sorted(extensions)) + ")" if extensions else "no files"
        raise InputError(f"input {where} holds {what}: check the path or pattern")
    return first


_TIMED_OUT = object()


def _first_source(input_uri: Location, options, extensions):
    fs, path = open_filesystem(input_uri, options)
    if GLOB_CHARS.search(path):
        root, _ = glob_root(path)
        if not is_s3(fs) and not fs.isdir(root):
            raise FileNotFoundError(f"{root} does not exist")
    else:
        if is_s3(fs):
            bucket = path.split("/", 1)[0]
            if not bucket:
                raise InputError("cannot list all of S3: name a bucket (s3://bucket/prefix)")
            # Distinguishes a missing bucket from an empty prefix (raises FileNotFoundError).
            fs.call_s3("head_bucket", Bucket=bucket)
        elif not fs.exists(path):
            raise FileNotFoundError(f"{input_uri} does not exist")
    manifest = is_manifest(fs, path)
    return next(iter_sources(input_uri, options, extensions=extensions), None), manifest


def _run_bounded(call: Callable[[], Any], timeout: float) -> Any:
    # A daemon thread, so a hung request cannot keep the process alive after we give up on it.
    box: queue.Queue = queue.Queue(maxsize=1)

    def target() -> None:
        try:
            box.put(call())
        except Exception as exc:  # noqa: BLE001 (handed to the caller, raised there as an InputError)
            box.put(exc)

    threading.Thread(target=target, name="clipdiy-input-check", daemon=True).start()
    try:
        return box.get(timeout=timeout)
    except queue.Empty:
        return _TIMED_OUT


def _explain(exc: BaseException) -> str:
    if isinstance(exc, InputError):
        return str(exc)
    if isinstance(exc, FileNotFoundError):
        return "does not exist (no such bucket, folder, object or manifest)"
    if isinstance(exc, PermissionError):
        return "access denied (check the credentials in the environment or profile, or --anon for public buckets)"
    if type(exc).__name__ == "NoCredentialsError":
        return "no credentials found (set AWS_* variables, a profile, a cloud role, or use anonymous access)"
    # Described from its type and codes, never its text (which may quote a signed location).
    if is_transient(exc):
        return f"unreachable ({describe_error(exc)})"
    return f"cannot be read ({describe_error(exc)})"


def check_input_format(input_uri: str | Location, options: StorageOptions | None = None, requested: str | None = None,
                       *, timeout: float = 60.0) -> str:
    """The input's format (``files``, ``webdataset``, ``parquet``: ``requested``, checked, else
    detected; :mod:`clipdiy.pipeline.sources.formats`), after the pre-flight check of that
    format: raises :class:`InputError` in one line when the guess is wrong, or when the input
    holds no image (``files``), no ``.tar`` shard or no Parquet file."""
    from clipdiy.pipeline.sources.formats import detect_input_format, iter_shard_sources

    options = options or StorageOptions()
    where = as_location(input_uri)
    quick = dataclasses.replace(
        options,
        connect_timeout=min(options.connect_timeout, 5.0),
        read_timeout=min(options.read_timeout, max(timeout / 2, 1.0)),
        max_attempts=min(options.max_attempts, 2),
    )
    detected = _run_bounded(lambda: detect_input_format(input_uri, quick, requested), timeout)
    if detected is _TIMED_OUT or (isinstance(detected, BaseException) and not isinstance(detected, InputError)):
        if requested in (None, "files"):
            # The store did not answer the detection: the files check says why, in its words.
            check_input_reachable(input_uri, options, timeout=timeout)
            return "files"
        if detected is _TIMED_OUT:
            raise InputError(f"input {where} is unreachable: no answer from the store within {timeout:g} s")
    if isinstance(detected, BaseException):
        raise InputError(f"input {where}: {_explain(detected)}") from detected
    if detected == "files":
        check_input_reachable(input_uri, options, timeout=timeout)
        return detected
    first = _run_bounded(lambda: next(iter_shard_sources(input_uri, detected, quick), None), timeout)
    if first is _TIMED_OUT:
        raise InputError(f"input {where} is unreachable: no answer from the store within {timeout:g} s")
    if isinstance(first, BaseException):
        raise InputError(f"input {where}: {_explain(first)}") from first
    if first is None:
        what = ".tar shards" if detected == "webdataset" else "Parquet files"
        raise InputError(f"input {where} holds no {what}: check the path or pattern, or --input-format")
    return detected
