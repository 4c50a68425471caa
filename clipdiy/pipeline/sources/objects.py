"""An input object of the job (:class:`SourceObject`) and how a store's listing entry becomes one."""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass, field
from typing import Any

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
    ``user:password@``), the only way to read it; None when ``uri`` reads the object. Never
    written or logged (not in the repr): it goes from the listing to the read and nowhere else.
    """

    uri: str
    image_id: str
    size: int | None = None
    etag: str | None = None
    mtime: dt.datetime | None = None
    listing_entry: int | None = None
    signed_uri: str | None = field(default=None, repr=False)

    @property
    def readable_uri(self) -> str:
        """The location to read the object from (may hold a credential: never show it)."""
        return self.signed_uri or self.uri


def source_object(fs, full: str, image_id: str, info: dict) -> SourceObject:
    etag = info.get("ETag") or info.get("etag")
    return SourceObject(
        uri=full_uri(fs, full),
        image_id=image_id,
        size=None if info.get("size") is None else int(info["size"]),
        etag=etag.strip('"') if isinstance(etag, str) else None,
        mtime=as_utc(info.get("LastModified") or info.get("mtime") or info.get("updated")
                      or info.get("last_modified") or info.get("created")),
    )


def as_utc(value: Any) -> dt.datetime | None:
    if value is None:
        return None
    if isinstance(value, dt.datetime):
        return value.replace(tzinfo=dt.timezone.utc) if value.tzinfo is None else value.astimezone(dt.timezone.utc)
    if isinstance(value, (int, float)):
        return dt.datetime.fromtimestamp(float(value), tz=dt.timezone.utc)
    if isinstance(value, str):
        try:
            return as_utc(dt.datetime.fromisoformat(value.replace("Z", "+00:00")))
        except ValueError:
            return None
    return None
