"""The samples of one WebDataset tar shard, streamed: key rule, image choice, damage, sidecar.

- A sample is a run of adjacent members sharing a key, WebDataset's ``__key__`` rule: the member
  name up to the first ``.`` of its last path segment (``a/b/0001.seg.png`` -> key ``a/b/0001``,
  extension ``seg.png``). Names without a ``.`` in their last segment are not sample members.
- Its image is the member whose extension (lower case) comes first in :data:`IMAGE_PREFERENCE`;
  other members (``.txt``, ``.json``, ...) are skipped unread.
- A key that comes back after another key (members of one key not adjacent, or a repeated
  sample) is a ``duplicate``: one error row for the second occurrence, whose image id gets
  ``#2``, ``#3``... so that no two rows of the shard share an id.
- A sample without an image member, an image member above ``max_image_bytes`` (not read),
  damage in the tar (:class:`~clipdiy.pipeline.sources.tar_members.TarDamage`) each cost one
  error row; the samples before the damage keep theirs. A shard that cannot be opened, is not a
  tar, or is compressed costs one row standing for the shard (``image_id`` = the shard's id,
  ``sample_key`` null).
- img2dataset sidecar (``NNNNN.parquet`` beside ``NNNNN.tar``, columns ``key``, ``status``,
  ``url``): samples whose status is not ``success`` are skipped; the ``url`` travels with the
  row, credentials dropped.

Memory per shard: one member's header and at most one image's bytes, plus the set of keys seen
(a shard's keys, ~10,000, not the corpus's) and the sidecar's key -> (status, url) map.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from typing import BinaryIO

from clipdiy.locations import Location
from clipdiy.pipeline.sources.tar_members import TarDamage, TarStream

#: Image member extensions, most preferred first (the member taken when a sample has several).
IMAGE_PREFERENCE: tuple[str, ...] = (
    "jpg", "jpeg", "png", "webp", "jpe", "jfif", "bmp", "gif", "tif", "tiff", "ppm", "pgm", "pbm", "pnm",
)
_RANK = {extension: rank for rank, extension in enumerate(IMAGE_PREFERENCE)}
#: WebDataset's split of a member name into key and extension (its ``base_plus_ext``).
_KEY_RULE = re.compile(r"^((?:.*/|)[^./]+)[.]([^/]*)$")
#: Leading bytes of gzip, bzip2, xz, zstd: a compressed tar, whatever its name.
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00", b"\x28\xb5\x2f\xfd")


def split_key(name: str) -> tuple[str, str] | None:
    """(key, extension) of a member name by WebDataset's rule, or None for a name without one."""
    match = _KEY_RULE.match(name)
    return (match.group(1), match.group(2)) if match else None


def image_rank(extension: str) -> int | None:
    """The place of an extension in :data:`IMAGE_PREFERENCE` (case-insensitive; for ``seg.png``,
    its last part), or None when it names no image type."""
    return _RANK.get(extension.lower().rsplit(".", 1)[-1])


@dataclass
class ShardSample:
    """One row's worth of a shard: the image's bytes, or why there are none."""

    image_id: str
    sample_key: str | None
    offset: int | None = None
    length: int | None = None
    data: bytes | None = None
    error_kind: str | None = None
    error: str | None = None
    origin_url: str | None = None


@dataclass(frozen=True)
class Sidecar:
    """img2dataset's per-sample metadata of one shard: ``status`` and ``url`` by key."""

    entries: dict[str, tuple[str | None, str | None]]

    def skipped(self, key: str) -> bool:
        status = self.entries.get(key, ("success", None))[0]
        return status is not None and status != "success"

    def url(self, key: str) -> str | None:
        url = self.entries.get(key, (None, None))[1]
        if not url:
            return None
        location = Location(url)
        # A url that cannot be parsed is not written: its redaction by text is a best effort.
        return None if location.parse_error is not None else location.public


def sidecar_path(shard_path: str) -> str:
    """``NNNNN.parquet`` beside ``NNNNN.tar`` (img2dataset's layout)."""
    return posixpath.splitext(shard_path)[0] + ".parquet"


def read_sidecar(fs, shard_path: str) -> Sidecar | None:
    """The sidecar of a shard, or None when there is none. Reads the ``key``, ``status`` and
    ``url`` columns only (a shard's sidecar: ~10,000 rows)."""
    import pyarrow.parquet as pq

    path = sidecar_path(shard_path)
    try:
        with fs.open(path, "rb") as handle:
            parquet = pq.ParquetFile(handle)
            columns = [c for c in ("key", "status", "url") if c in parquet.schema_arrow.names]
            if "key" not in columns:
                return None
            table = parquet.read(columns=columns)
    except FileNotFoundError:
        return None
    keys = [str(k) if k is not None else None for k in table.column("key").to_pylist()]
    status = table.column("status").to_pylist() if "status" in columns else [None] * len(keys)
    urls = table.column("url").to_pylist() if "url" in columns else [None] * len(keys)
    return Sidecar({k: (s, u) for k, s, u in zip(keys, status, urls, strict=True) if k is not None})


def is_compressed_name(name: str) -> bool:
    lower = name.lower()
    return lower.endswith((".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar.zst"))


class _PeekStream:
    """A stream whose first bytes were read to sniff compression, given back before the rest."""

    def __init__(self, head: bytes, stream: BinaryIO):
        self._head, self._stream = head, stream

    def read(self, n: int) -> bytes:
        if self._head:
            data, self._head = self._head[:n], self._head[n:]
            return data
        return self._stream.read(n)


def iter_shard_samples(
    stream: BinaryIO,
    shard_id: str,
    *,
    max_image_bytes: int | None = None,
    skip_ids: Collection[str] = (),
    sidecar: Sidecar | None = None,
    compressed_name: bool = False,
) -> Iterator[ShardSample]:
    """The rows of the tar shard read from ``stream`` (see the module docstring), in tar order.

    ``skip_ids``: image ids already labelled (a resumed run): neither read nor yielded.
    """
    head = stream.read(6)
    if compressed_name or head.startswith(_COMPRESSED_MAGIC):
        yield ShardSample(shard_id, None, error_kind="unsupported", error=(
            "a compressed tar shard: not read (ranged reads of its images need a plain tar; "
            "decompress it to .tar)"))
        return
    tar = TarStream(_PeekStream(head, stream))
    seen: dict[str, int] = {}
    pending: _Pending | None = None
    try:
        for member in tar.members():
            parts = split_key(member.name)
            if parts is None:
                continue
            key, extension = parts
            if pending is None or key != pending.key:
                if pending is not None:
                    yield from pending.finish(sidecar)
                pending = _Pending.start(shard_id, key, seen, skip_ids, sidecar)
            pending.add(tar, member, extension, max_image_bytes)
    except TarDamage as damage:
        message = f"damaged tar shard {shard_id}: {damage}"
        if pending is not None and pending.reading:
            pending.fail(damage.kind, message)
            yield from pending.finish(sidecar)
            return
        if pending is not None:
            yield from pending.finish(sidecar)
        yield ShardSample(shard_id, None, error_kind=damage.kind, error=message)
        return
    if pending is not None:
        yield from pending.finish(sidecar)


@dataclass
class _Pending:
    """The sample being read: its best image member so far."""

    key: str
    image_id: str
    skip: bool
    duplicate: int = 1
    rank: int | None = None
    offset: int | None = None
    length: int | None = None
    data: bytes | None = None
    error_kind: str | None = None
    error: str | None = None
    reading: bool = False
    extensions: tuple[str, ...] = ()

    @classmethod
    def start(cls, shard_id: str, key: str, seen: dict[str, int], skip_ids: Collection[str], sidecar) -> _Pending:
        occurrence = seen.get(key, 0) + 1
        seen[key] = occurrence
        image_id = f"{shard_id}/{key}" if occurrence == 1 else f"{shard_id}/{key}#{occurrence}"
        skip = image_id in skip_ids or (sidecar is not None and occurrence == 1 and sidecar.skipped(key))
        return cls(key=key, image_id=image_id, skip=skip, duplicate=occurrence)

    def add(self, tar: TarStream, member, extension: str, max_image_bytes: int | None) -> None:
        self.extensions += (extension,)
        rank = image_rank(extension)
        if self.skip or self.duplicate > 1 or rank is None or (self.rank is not None and rank >= self.rank):
            return
        self.rank, self.offset, self.length = rank, member.offset, member.size
        self.data = None
        self.error_kind = self.error = None
        if max_image_bytes is not None and member.size > max_image_bytes:
            self.error_kind = "too_large"
            self.error = f"the member {member.name!r} holds {member.size} bytes, more than --max-image-bytes {max_image_bytes}; not read"
            return
        self.reading = True
        self.data = tar.read_data(member)
        self.reading = False

    def fail(self, kind: str, message: str) -> None:
        self.data, self.error_kind, self.error = None, kind, message

    def finish(self, sidecar: Sidecar | None) -> Iterator[ShardSample]:
        if self.skip:
            return
        origin = sidecar.url(self.key) if sidecar is not None else None
        row = ShardSample(self.image_id, self.key, self.offset, self.length, self.data, self.error_kind, self.error, origin)
        if self.duplicate > 1:
            row.data, row.error_kind = None, "duplicate"
            row.error = (f"key {self.key!r} appears again after other keys in the shard (occurrence {self.duplicate}): "
                         "members of one sample must be adjacent; the first occurrence is labelled")
        elif self.rank is None and self.error_kind is None:
            row.error_kind = "not_image"
            found = ", ".join(sorted(set(self.extensions))) or "none"
            row.error = f"sample {self.key!r} has no image member (extensions: {found}; read: {', '.join(IMAGE_PREFERENCE)})"
        yield row

