"""Object storage for the labelling job: options, filesystems, retried reads.

Everything here goes through fsspec, so ``s3://``, ``gs://`` (with ``gcsfs`` installed), local
paths and ``file://`` URIs behave alike. What the inputs are and how they are listed lives in
:mod:`clipdiy.pipeline.sources.listing`; this module opens filesystems and reads objects, retrying the
failures a later attempt can cure.

Credentials are never handled here: they come from the environment or the cloud role chain
(botocore's default chain: env variables, ``~/.aws``, instance/pod roles). :class:`StorageOptions`
holds only non-secret settings, so it can travel to Ray workers and be printed freely.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from clipdiy.errors import InputError
from clipdiy.locations import Location, as_location

logger = logging.getLogger(__name__)

# Errno values of failures that a later attempt can cure (network and server-side trouble).
_TRANSIENT_ERRNOS = frozenset(
    getattr(errno, name)
    for name in ("ECONNRESET", "ECONNREFUSED", "ECONNABORTED", "ETIMEDOUT", "EPIPE", "EAGAIN",
                 "EHOSTUNREACH", "ENETUNREACH", "ENETDOWN", "EREMOTEIO", "EBUSY")
    if hasattr(errno, name)
)
# S3 error codes that mean "slow down" or "server trouble" rather than "your request is wrong".
_TRANSIENT_S3_CODES = frozenset(
    {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "RequestTimeout",
     "RequestTimeTooSkewed", "InternalError", "ServiceUnavailable", "503", "500", "502", "504"}
)


@dataclass(frozen=True)
class StorageOptions:
    """Non-secret settings for reaching object storage; credentials come from the environment.

    ``endpoint_url``: an S3-compatible endpoint (MinIO, Ceph, moto, R2, ...); None = AWS.
    ``anon``: unsigned requests (public buckets), no credentials looked up at all.
    ``profile``: a named profile of ``~/.aws/config`` / ``~/.aws/credentials``.
    ``region``: the bucket region, where the endpoint needs one.
    ``connect_timeout`` / ``read_timeout`` (s) and ``max_attempts`` (botocore's own retries)
    bound how long one request can take, so nothing hangs on an unreachable store.
    """

    endpoint_url: Location | None = None
    anon: bool = False
    profile: str | None = None
    region: str | None = None
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    max_attempts: int = 5

    def __post_init__(self) -> None:
        # A user-given endpoint (a flag, the environment) becomes a Location where it enters:
        # its ``user:password@`` is then never shown (repr, describe, messages).
        object.__setattr__(self, "endpoint_url", as_location(self.endpoint_url))

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: Any) -> StorageOptions:
        """Options from the environment, with explicit (non-None) ``overrides`` (e.g. CLI flags).

        Reads ``AWS_ENDPOINT_URL_S3`` (else ``AWS_ENDPOINT_URL``), ``AWS_PROFILE``, ``AWS_REGION``
        (else ``AWS_DEFAULT_REGION``) and ``CLIPDIY_S3_ANON`` (1/true/yes). Never reads secrets.
        """
        env = os.environ if environ is None else environ
        anon_text = env.get("CLIPDIY_S3_ANON", "").strip().lower()
        values: dict[str, Any] = {
            "endpoint_url": env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None,
            "anon": anon_text in {"1", "true", "yes", "on"},
            "profile": env.get("AWS_PROFILE") or None,
            "region": env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or None,
        }
        unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise TypeError(f"unknown storage options: {sorted(unknown)}")
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def storage_options(self, protocol: str) -> dict[str, Any]:
        """Keyword arguments for ``fsspec.filesystem(protocol, ...)``; empty for local files."""
        if protocol in ("s3", "s3a"):
            opts: dict[str, Any] = {
                "anon": self.anon,
                "config_kwargs": {
                    "connect_timeout": self.connect_timeout,
                    "read_timeout": self.read_timeout,
                    "retries": {"max_attempts": self.max_attempts, "mode": "standard"},
                },
            }
            if self.endpoint_url:
                opts["endpoint_url"] = self.endpoint_url.reveal_for_read()
            if self.profile and not self.anon:
                opts["profile"] = self.profile
            if self.region:
                opts["client_kwargs"] = {"region_name": self.region}
            return opts
        if protocol in ("gs", "gcs"):
            opts = {"timeout": self.read_timeout}
            if self.anon:
                opts["token"] = "anon"
            if self.endpoint_url:
                opts["endpoint_url"] = self.endpoint_url.reveal_for_read()
            return opts
        return {}

    def __repr__(self) -> str:
        # The endpoint shows its public form (a Location): never its user:password@.
        endpoint = self.endpoint_url.public if self.endpoint_url else None
        return (
            f"StorageOptions(endpoint_url={endpoint!r}, anon={self.anon}, "
            f"profile={self.profile!r}, region={self.region!r}, "
            f"connect_timeout={self.connect_timeout}, read_timeout={self.read_timeout}, "
            f"max_attempts={self.max_attempts})"
        )

    __str__ = __repr__

    def describe(self) -> dict[str, Any]:
        """A JSON-able summary for run manifests (no secrets; userinfo stripped from the URL)."""
        return {
            "endpoint_url": self.endpoint_url.public if self.endpoint_url else None,
            "anon": self.anon,
            "profile": self.profile,
            "region": self.region,
        }


# --------------------------------------------------------------------------------- filesystems


def open_filesystem(uri: str | Location, options: StorageOptions | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem for ``uri`` and the path within it (protocol stripped, no trailing ``/``).

    ``uri``: a :class:`~clipdiy.locations.Location` (opened in its readable form) or a plain path.
    Raises :class:`InputError` when the protocol's fsspec package is not installed (e.g.
    ``gcsfs`` for ``gs://``).
    """
    options = options or StorageOptions()
    where = as_location(uri)  # what a message names
    uri = where.reveal_for_read()
    protocol = _protocol_of(uri)
    try:
        cls = fsspec.get_filesystem_class(protocol)
    except (ImportError, ValueError) as exc:
        package = {"gs": "gcsfs", "gcs": "gcsfs", "s3": "s3fs", "s3a": "s3fs",
                   "az": "adlfs", "abfs": "adlfs"}.get(protocol)
        hint = f"; install it with `pip install {package}`" if package else ""
        raise InputError(f"cannot open {where}: no filesystem for {protocol}://{hint} ({exc})") from exc
    fs = cls(**options.storage_options(protocol))
    path = cls._strip_protocol(uri)
    if path not in ("/", "") and not (isinstance(fs, LocalFileSystem) and re.fullmatch(r"[A-Za-z]:/", path)):
        path = path.rstrip("/")
    return fs, path


def path_within(fs: fsspec.AbstractFileSystem, location: str | Location) -> str:
    """The path of ``location`` within ``fs``, a filesystem :func:`open_filesystem` gave for
    its protocol (a reader keeps one per protocol)."""
    return fs._strip_protocol(as_location(location).reveal_for_read())


def _protocol_of(uri: str) -> str:
    match = re.match(r"^([A-Za-z][A-Za-z0-9+.\-]*)://", uri)
    return match.group(1).lower() if match else "file"


def full_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """``path`` of ``fs`` as a URI with its protocol (``file://`` for local paths)."""
    if isinstance(fs, LocalFileSystem):
        return "file://" + path
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return f"{protocol}://{path}"


def is_s3(fs: fsspec.AbstractFileSystem) -> bool:
    """True for s3fs (whose raw ``call_s3`` the listing pages through)."""
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    return "s3" in protocols and hasattr(fs, "call_s3")


# --------------------------------------------------------------------------------- reading


def is_transient(exc: BaseException) -> bool:
    """Whether a storage error is worth retrying: connection trouble, timeouts, 5xx, throttling.

    Missing objects, permission errors and bad requests are not: they fail the same way again.
    """
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError,
                        FileExistsError)):
        return False
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if _transient_one(current):
            return True
        current = current.__cause__ or current.__context__
    return False


def _transient_one(exc: BaseException) -> bool:
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    name = type(exc).__name__
    module = type(exc).__module__ or ""
    if name in {"FSTimeoutError", "ServerDisconnectedError", "ClientPayloadError", "IncompleteRead",
                "ResponseParserError"}:
        return True
    if module.startswith(("botocore", "aiobotocore", "urllib3", "aiohttp")) and (
        "Connection" in name or "Timeout" in name or name in {"HTTPClientError", "ProtocolError"}
    ):
        return True
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        code = str(response.get("Error", {}).get("Code", ""))
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in _TRANSIENT_S3_CODES or (isinstance(status, int) and (status >= 500 or status == 429)):
            return True
    status = getattr(exc, "status", None) or getattr(exc, "code", None)
    if isinstance(status, int) and (status >= 500 or status == 429):
        return True
    return isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS


def with_retries(
    call: Callable[[], Any],
    *,
    attempts: int = 4,
    backoff: float = 0.5,
    max_backoff: float = 10.0,
    what: str = "storage call",
    sleep: Callable[[float], None] = time.sleep,
) -> Any:
    """``call()``, retried up to ``attempts`` times in all on transient errors, with exponential
    backoff (``backoff * 2**i``, jittered, capped at ``max_backoff``). Other errors raise at once."""
    if attempts < 1:
        raise ValueError("attempts must be >= 1")
    for attempt in range(attempts):
        try:
            return call()
        except Exception as exc:
            if attempt + 1 >= attempts or not is_transient(exc):
                raise
            delay = min(max_backoff, backoff * (2**attempt)) * (0.5 + random.random() / 2)
            # Logged on Ray workers too, where no log filter runs: the error described, never quoted.
            logger.warning("%s failed (%s); retry %d/%d in %.1fs", what, describe_error(exc), attempt + 1, attempts - 1, delay)
            sleep(delay)
    raise AssertionError("unreachable")


class ObjectTooLargeError(Exception):
    """An object holds more bytes than the read allows (``max_bytes``); the store answered."""


class ReadTimedOutError(TimeoutError):
    """Reading one object took longer than its whole time allowed (``deadline_s``, retries
    included): a store that stalls or trickles bytes costs one bounded read, not a night."""


def describe_error(error: BaseException) -> str:
    """A one-line account of a storage error that never quotes a library's own text (which may
    hold the signed location, re-encoded beyond any pattern): the exception's type, then what is
    structured on it and its causes, e.g. ``ClientResponseError (HTTP 503)``,
    ``FileNotFoundError (S3 NoSuchKey, HTTP 404)``, ``ConnectionResetError (ECONNRESET)``.
    The errors this module raises itself (:class:`ObjectTooLargeError`,
    :class:`ReadTimedOutError`) keep their message, which it wrote."""
    if isinstance(error, (ObjectTooLargeError, ReadTimedOutError)):
        return str(error)
    details: list[str] = []
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        response = getattr(current, "response", None)
        if isinstance(response, dict):
            code = response.get("Error", {}).get("Code")
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            details += [f"S3 {code}"] if isinstance(code, str) and code.isalnum() else []
            details += [f"HTTP {status}"] if isinstance(status, int) else []
        status = getattr(current, "status", None)
        if isinstance(status, int) and not isinstance(status, bool):
            details.append(f"HTTP {status}")
        number = getattr(current, "errno", None)
        if isinstance(number, int) and number in errno.errorcode:
            details.append(errno.errorcode[number])
        if current is not error and type(current).__name__ not in details:
            details.append(type(current).__name__)
        current = current.__cause__ or current.__context__
    unique = list(dict.fromkeys(details))
    return type(error).__name__ + (f" ({', '.join(unique)})" if unique else "")


def read_bytes(fs: fsspec.AbstractFileSystem, path: str | bytes, *, attempts: int = 4, backoff: float = 0.5,
               max_backoff: float = 10.0, what: str | None = None, max_bytes: int | None = None,
               deadline_s: float | None = None) -> bytes:
    """The whole object at ``path``, retrying transient errors (see :func:`is_transient`).

    ``max_bytes``: read at most ``max_bytes + 1`` bytes, and raise :class:`ObjectTooLargeError`
    if there were more, so that a multi-GB object named ``.jpg`` never sits in memory: a local
    file reads no further, S3 and GCS are asked for that range, and an HTTP(S) body is streamed
    and cut there (a server may ignore the Range header and send all of it).
    ``deadline_s``: the most seconds the read may take, all attempts and backoff included (on
    async stores: S3, GCS, HTTP(S)); past it the read is cancelled, its connection closed, and
    :class:`ReadTimedOutError` raised. A stalled or trickling server costs this much, once.
    An empty object reads as ``b""`` (a range of an empty S3 object is answered 416).
    FileNotFoundError, PermissionError and other permanent errors raise on the first attempt.
    ``what``: how retries are logged (default ``read <path>``; the job names the public URI).
    ``path`` may be bytes on a local filesystem (a file name that is not UTF-8).
    """
    what = what or f"read {as_location(path) if isinstance(path, str) else repr(path)}"
    if isinstance(fs, LocalFileSystem):
        data = with_retries(lambda: _read_local(path, max_bytes), attempts=attempts, backoff=backoff,
                            max_backoff=max_backoff, what=what)
    elif getattr(fs, "async_impl", False) and getattr(fs, "loop", None) is not None:
        data = _read_async(fs, path, attempts=attempts, backoff=backoff, max_backoff=max_backoff, what=what,
                           max_bytes=max_bytes, deadline_s=deadline_s)
    else:
        read = (lambda: fs.cat_file(path)) if max_bytes is None else (lambda: fs.cat_file(path, start=0, end=max_bytes + 1))
        data = with_retries(read, attempts=attempts, backoff=backoff, max_backoff=max_backoff, what=what)
    if max_bytes is not None and len(data) > max_bytes:
        raise ObjectTooLargeError(f"the object holds more than {max_bytes} bytes (--max-image-bytes)")
    return data


def _read_local(path: str | bytes, max_bytes: int | None) -> bytes:
    with open(path, "rb") as handle:
        return handle.read() if max_bytes is None else handle.read(max_bytes + 1)


def _read_async(fs, path: str, *, attempts: int, backoff: float, max_backoff: float, what: str,
                max_bytes: int | None, deadline_s: float | None) -> bytes:
    """:func:`read_bytes` on an async fsspec store: the attempts run as one coroutine on the
    store's event loop, under one ``asyncio`` timeout that cancels whatever is in flight."""
    import asyncio

    from fsspec.asyn import sync

    async def attempt_all() -> bytes:
        for attempt in range(attempts):
            try:
                return await _read_once(fs, path, max_bytes)
            except Exception as exc:
                if attempt + 1 >= attempts or not is_transient(exc):
                    raise
                delay = min(max_backoff, backoff * (2**attempt)) * (0.5 + random.random() / 2)
                logger.warning("%s failed (%s); retry %d/%d in %.1fs",
                               what, describe_error(exc), attempt + 1, attempts - 1, delay)
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def bounded() -> bytes | None:
        if deadline_s is None:
            return await attempt_all()
        try:
            return await asyncio.wait_for(attempt_all(), timeout=deadline_s)
        except TimeoutError:
            return None  # raised below: fsspec's sync() would turn a TimeoutError into its own

    data = sync(fs.loop, bounded)
    if data is None:
        raise ReadTimedOutError(f"the read took longer than {deadline_s:g} s, retries included (--read-deadline-s): "
                                "the store stalled or sent too slowly; not read")
    return data


async def _read_once(fs, path: str, max_bytes: int | None) -> bytes:
    """One attempt at reading ``path`` (at most ``max_bytes + 1`` bytes)."""
    if _is_http(fs):
        return await _read_http(fs, path, max_bytes)
    try:
        if max_bytes is None:
            return await fs._cat_file(path)
        return await fs._cat_file(path, start=0, end=max_bytes + 1)
    except Exception as exc:
        if max_bytes is not None and _is_empty_range(exc):
            return b""  # S3 answers 416 to a range of an empty object
        raise


def _is_http(fs) -> bool:
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    return "http" in protocols or "https" in protocols


def _is_empty_range(exc: BaseException) -> bool:
    for link in (exc, exc.__cause__, exc.__context__):
        response = getattr(link, "response", None)
        if isinstance(response, dict) and (
            response.get("Error", {}).get("Code") == "InvalidRange"
            or response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 416
        ):
            return True
    return False


class HTTPStatusError(OSError):
    """An HTTP(S) answer that is not a success (its ``status``; transient when >= 500 or 429)."""

    def __init__(self, status: int):
        super().__init__(f"HTTP {status}")
        self.status = status


async def _read_http(fs, url: str, max_bytes: int | None) -> bytes:
    """One GET of ``url``, the body streamed and cut after ``max_bytes + 1`` bytes, whether or
    not the server honoured the Range header (fsspec's own read takes the whole body first)."""
    kw = fs.kwargs.copy()
    headers = dict(kw.pop("headers", {}) or {})
    if max_bytes is not None:
        headers["Range"] = f"bytes=0-{max_bytes}"
    session = await fs.set_session()
    async with session.get(fs.encode_url(url), headers=headers, **kw) as response:
        if response.status in (404, 410, 401, 403):
            missing = response.status in (404, 410)
            error = (FileNotFoundError if missing else PermissionError)(
                errno.ENOENT if missing else errno.EACCES, f"HTTP {response.status}")
            error.status = response.status  # what describe_error shows
            raise error
        if response.status == 416 and max_bytes is not None:
            return b""  # a range of an empty body
        if response.status >= 400:
            raise HTTPStatusError(response.status)
        chunks, total = [], 0
        async for chunk in response.content.iter_chunked(1 << 16):
            chunks.append(chunk)
            total += len(chunk)
            if max_bytes is not None and total > max_bytes:
                break  # leaving the block closes the connection: no more of the body is read
        return b"".join(chunks)


def read_uri(uri: str | Location, options: StorageOptions | None = None, **retry: Any) -> bytes:
    """The whole object at a full URI (as in :attr:`SourceObject.uri`, or a signed
    :class:`~clipdiy.locations.Location`), with retries."""
    retry.setdefault("what", f"read {as_location(uri)}")
    fs, path = open_filesystem(uri, options)
    return read_bytes(fs, path, **retry)


def add_storage_arguments(parser) -> None:
    """The object-storage options every reader CLI takes (``jobs/evaluate.py``, ``preview.py``,
    ``report.py``, ``review.py``): credentials themselves come only from the environment."""
    parser.add_argument("--endpoint-url", help="S3-compatible endpoint URL (else AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL)")
    parser.add_argument("--anon", action="store_true", default=None, help="anonymous (unsigned) object-storage access")
    parser.add_argument("--profile", help="AWS profile for object storage (else AWS_PROFILE)")


def storage_from_arguments(args) -> StorageOptions:
    """:class:`StorageOptions` from the arguments :func:`add_storage_arguments` added, and the environment."""
    return StorageOptions.from_env(endpoint_url=args.endpoint_url, anon=args.anon, profile=args.profile)
