"""An input object of the job (:class:`SourceObject`) and how a store's listing entry becomes one."""

from __future__ import annotations

import datetime as dt
import os
import re
from dataclasses import dataclass, field
from typing import Any

from clipdiy.locations import Location, as_location
from clipdiy.storage import full_uri

#: Characters that make an input a glob rather than a prefix or a manifest.
GLOB_CHARS = re.compile(r"[*?\[]")


@dataclass(frozen=True)
class SourceObject:
    """One input object: where it is, its stable id, and what identifies its content version.

    ``uri``: full URI (``s3://bucket/key``, ``file:///abs/path``) without any credential (see
    :func:`clipdiy.uris.public_uri`): what rows and logs show; ``image_id``: the path relative
    to the input root with ``/`` separators (or the public URI itself, see :mod:`clipdiy.pipeline.sources.listing`);
    ``size`` in bytes, ``etag`` (quotes stripped), ``mtime`` (UTC) where the store reports them
    (None for manifest entries without those columns: such an entry's version is unknown, so a
    later run treats it as labelled once any row has its id; :func:`~clipdiy.pipeline.sources.listing.describe_source` stats one).
    ``listing_entry``: the entry's number in a manifest (0-based, blank lines and comments not
    counted, repeats counted); None for prefixes and globs.
    ``signed_uri``: the entry as listed when it carries a credential (a presigned query, a
    ``user:password@``), the only way to read it, as a :class:`~clipdiy.locations.Location`
    (which shows only its public form); None when ``uri`` reads the object. It goes from the
    listing to the read (the listing's ``signed_uri`` column, :func:`signed_column`) and nowhere else.
    """

    uri: str
    image_id: str
    size: int | None = None
    etag: str | None = None
    mtime: dt.datetime | None = None
    listing_entry: int | None = None
    signed_uri: Location | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "signed_uri", as_location(self.signed_uri))

    @property
    def location(self) -> Location:
        """The location to read the object from (its signed one where it has one)."""
        return self.signed_uri or Location(self.uri)


def signed_column(sources: list[SourceObject]) -> list[str | None]:
    """The listing's ``signed_uri`` column of ``sources``: the readable form of each signed
    location (None for the others), which only the decode stage reads back (as a Location)."""
    return [None if s.signed_uri is None else s.signed_uri.reveal_for_read() for s in sources]


def source_object(fs, full: str, image_id: str, info: dict) -> SourceObject:
    etag = info.get("ETag") or info.get("etag")
    return SourceObject(
        uri=full_uri(fs, as_text(full)),
        image_id=as_text(image_id),
        size=as_size(info.get("size")),
        etag=etag.strip('"') if isinstance(etag, str) else None,
        mtime=as_utc(info.get("LastModified") or info.get("mtime") or info.get("updated")
                      or info.get("last_modified") or info.get("created")),
    )


#: The largest size a listing keeps (the listing's ``source_size`` is an int64).
_MAX_SIZE = 2**63 - 1


def as_utc(value: Any) -> dt.datetime | None:
    """A listed modification time as an aware UTC datetime: a datetime, seconds since the epoch
    or ISO 8601 text; None for anything else, or out of the range of a datetime (a manifest's
    ``mtime`` of 10**18): a version left unknown, never an error of the listing."""
    if value is None or isinstance(value, bool):
        return None
    try:
        if isinstance(value, dt.datetime):
            return value.replace(tzinfo=dt.timezone.utc) if value.tzinfo is None else value.astimezone(dt.timezone.utc)
        if isinstance(value, (int, float)):
            return dt.datetime.fromtimestamp(float(value), tz=dt.timezone.utc)
        if isinstance(value, str):
            return as_utc(dt.datetime.fromisoformat(value.replace("Z", "+00:00")))
    except (ValueError, OverflowError, OSError):
        return None
    return None


def as_size(value: Any) -> int | None:
    """A listed size in bytes: a whole number from 0 to 2**63 - 1 (an int, an integral float or
    decimal digits); None for anything else (negative, fractional, text, out of range)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    elif isinstance(value, str) and value.strip().isdigit() and value.strip().isascii():
        value = int(value.strip())
    return value if isinstance(value, int) and 0 <= value <= _MAX_SIZE else None


def as_text(name: str | bytes) -> str:
    """A path or name as UTF-8 text. A name that is not UTF-8 (a local file name in Latin-1,
    which Python holds with surrogate escapes, or raw bytes from a manifest) shows each byte
    that is not UTF-8 as ``\\xNN``: unique, stable, writable; :func:`as_os_path` reverses it
    for the read."""
    raw = name if isinstance(name, bytes) else name.encode("utf-8", "surrogateescape")
    return raw.decode("utf-8", "backslashreplace")


_ESCAPED_BYTE = re.compile(r"\\x([89a-f][0-9a-f])")


def as_os_path(path: str) -> str | bytes:
    """The local path that :func:`as_text` made ``path`` from: bytes when it holds escaped bytes
    that are not UTF-8 (``\\x80``-``\\xff``) and no file has the escaped name itself."""
    if not _ESCAPED_BYTE.search(path) or os.path.lexists(path):
        return path
    parts = _ESCAPED_BYTE.split(path)
    return b"".join(bytes([int(part, 16)]) if i % 2 else part.encode("utf-8") for i, part in enumerate(parts))
