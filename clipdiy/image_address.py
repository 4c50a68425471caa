"""Where a label row's image bytes are, and reading them back with one ranged read.

A row of a labels output names its source image's bytes (schema v2, ``schemas/``):

- a loose object (``source_format`` null or ``files``; every v1 row): the object at ``uri``;
- a WebDataset tar member (``webdataset``): ``source_length`` bytes at ``source_offset`` (the
  member's data, past its tar header) of the shard at ``source_uri``;
- a Parquet cell (``parquet``): row ``source_row`` of row group ``source_row_group`` of the file
  at ``source_uri``, in its image column (a binary column or Hugging Face's ``{bytes, path}``
  struct).

:class:`ImageAddress` is that address as a typed value (:meth:`ImageAddress.from_row`), and
:class:`ImageFetcher` reads it: the one place every reader of labels (the feed, the exports,
previews, the report's thumbnails, the Label Studio export) gets an image, so none of them reads
a whole shard. What one fetch costs:

- tar member: one ranged GET of exactly the member's bytes;
- loose object: one GET of at most ``max_bytes + 1`` bytes (ranged, as the job reads it);
- Parquet cell: one ranged GET of that row group's image column chunk (the file's footer is read
  once per file and kept, for the last :data:`FOOTERS_KEPT` files, by the fetcher).

The ranged GET also tells the object's whole size (S3's ``Content-Range``; a local file's stat),
so a shard rewritten since labelling (its size, or its ETag, no longer the row's
``source_size`` / ``source_etag``) is refused without a second request: its offsets would point
at other bytes. (A loose object is not checked so: rewritten, it is still the image at its
``uri``, and the feed compares its pixel size with the row's.) Every refusal is an :class:`ImageFetchError` naming the image id and the public
URI (never a credential: rows hold none, and messages are redacted).

This module sits below :mod:`clipdiy.labels` and :mod:`clipdiy.pipeline`; it imports neither.
"""

from __future__ import annotations

import collections
import functools
import io
import os
import re
import threading
from dataclasses import dataclass
from typing import Any

from clipdiy.storage import StorageOptions, is_s3, open_filesystem, with_retries
from clipdiy.uris import redact_text

#: Default bound of the bytes one fetch reads: 256 MiB (the job's ``--max-image-bytes`` default).
DEFAULT_MAX_IMAGE_BYTES = 256 * 1024**2
#: Parquet footers a fetcher keeps (one per file; a footer is a few KB to a few MB).
FOOTERS_KEPT = 8
#: Bytes of a Parquet file's tail read to find its footer (a second read if the footer is longer).
FOOTER_TAIL_BYTES = 64 * 1024

FILES, WEBDATASET, PARQUET = "files", "webdataset", "parquet"
FORMATS = (FILES, WEBDATASET, PARQUET)
#: The row columns an address is made from (schema v2 appends the ``source_*`` ones; a v1 row
#: reads them as null, which is a loose object at ``uri``).
ADDRESS_COLUMNS = ("image_id", "uri", "source_size", "source_etag", "source_format", "source_uri",
                   "source_offset", "source_length", "source_row_group", "source_row")


class ImageFetchError(ValueError):
    """An image cannot be fetched by its row's address: the address is incomplete or points
    past the file, the bytes exceed the bound, or the file changed since labelling. The message
    names the image id (``image_id``) and the public URI; ``reason`` is a short machine tag
    (``no_address``, ``beyond_file``, ``too_large``, ``changed``, ``not_image_column``)."""

    def __init__(self, image_id: str | None, reason: str, message: str):
        # The message may quote a row's address (rows read here need not be ours) and a
        # library's text (finding 7): redacted as text.
        super().__init__(redact_text(f"image {image_id!r}: {message}"))
        self.image_id, self.reason = image_id, reason


@dataclass(frozen=True)
class ImageAddress:
    """Where one image's bytes are (see the module docstring).

    ``uri``: the object read (the loose image, the tar shard or the Parquet file), public;
    ``offset``/``length``: the tar member's data range; ``row_group``/``row``: the Parquet cell;
    ``expected_size``/``expected_etag``: the object's size and ETag when the row was labelled
    (None: unknown, not checked).
    """

    image_id: str
    format: str
    uri: str
    offset: int | None = None
    length: int | None = None
    row_group: int | None = None
    row: int | None = None
    expected_size: int | None = None
    expected_etag: str | None = None

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ImageFetchError(self.image_id, "no_address", f"unknown source_format {self.format!r} (known: {', '.join(FORMATS)})")
        if not self.uri:
            raise ImageFetchError(self.image_id, "no_address", f"the row names no {'uri' if self.format == FILES else 'source_uri'}")
        needed = {WEBDATASET: ("offset", "length"), PARQUET: ("row_group", "row")}.get(self.format, ())
        missing = [name for name in needed if getattr(self, name) is None]
        if missing:
            raise ImageFetchError(self.image_id, "no_address", f"a {self.format} row without its source_{' / source_'.join(missing)}")
        negative = [name for name in ("offset", "length", "row_group", "row") if (getattr(self, name) or 0) < 0]
        if negative:
            raise ImageFetchError(self.image_id, "beyond_file", f"negative source_{negative[0]} in its address")

    @classmethod
    def from_row(cls, row: dict) -> ImageAddress:
        """The address a label row (a dict of its columns; v1 rows too) gives its image."""
        image_id = row.get("image_id")
        form = row.get("source_format") or FILES
        etag = row.get("source_etag")
        common = {"image_id": image_id, "format": form, "expected_size": _int(row.get("source_size")),
                  "expected_etag": etag.strip('"') if isinstance(etag, str) and etag else None}
        if form == FILES:
            return cls(uri=row.get("uri"), **common)
        return cls(uri=row.get("source_uri"), offset=_int(row.get("source_offset")),
                   length=_int(row.get("source_length")), row_group=_int(row.get("source_row_group")),
                   row=_int(row.get("source_row")), **common)

    @classmethod
    def of(cls, source: ImageAddress | dict | str) -> ImageAddress:
        """An address from an address, a row, or a bare URI (a loose object, version unknown)."""
        if isinstance(source, ImageAddress):
            return source
        if isinstance(source, dict):
            return cls.from_row(source)
        return cls(image_id=source, format=FILES, uri=source)

    def describe(self) -> str:
        """The address in words, for messages (public URI only)."""
        if self.format == WEBDATASET:
            return f"bytes {self.offset}..{self.offset + self.length} of {self.uri}"
        if self.format == PARQUET:
            return f"row {self.row} of row group {self.row_group} of {self.uri}"
        return self.uri


def _int(value: Any) -> int | None:
    return None if value is None else int(value)


@dataclass(frozen=True)
class RangeRead:
    """What one ranged read returned: the bytes, the object's whole size and ETag where the store
    reported them (None where it did not)."""

    data: bytes
    total_size: int | None
    etag: str | None


_CONTENT_RANGE = re.compile(r"bytes\s+(?:\d+-\d+|\*)/(\d+)")


class ImageFetcher:
    """Reads images by address (:meth:`fetch`); one per process is enough (:func:`fetcher_for`).

    Holds a filesystem per protocol and the footers of the last :data:`FOOTERS_KEPT` Parquet
    files it read from: nothing that grows with the corpus. Safe to use from several threads.
    ``max_bytes``: no fetch reads more (a tar member's length, a loose object, a Parquet row
    group's image column chunk); ``attempts``: tries per read on transient storage errors.
    """

    def __init__(self, storage: StorageOptions | None = None, *, max_bytes: int | None = DEFAULT_MAX_IMAGE_BYTES,
                 attempts: int = 4):
        self.storage, self.max_bytes, self.attempts = storage, max_bytes, attempts
        self._filesystems: dict[str, Any] = {}
        self._footers: collections.OrderedDict[str, tuple[Any, int | None]] = collections.OrderedDict()
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:  # picklable for Ray tasks: the caches stay behind
        return {"storage": self.storage, "max_bytes": self.max_bytes, "attempts": self.attempts}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["storage"], max_bytes=state["max_bytes"], attempts=state["attempts"])

    # ------------------------------------------------------------------ public

    def fetch(self, source: ImageAddress | dict | str) -> bytes:
        """The image's encoded bytes (JPEG, PNG...) at the address of ``source`` (an address, a
        label row, or a loose object's URI). Raises :class:`ImageFetchError` for a bad or stale
        address; storage errors (not found, denied) raise as the store gives them, redacted."""
        address = ImageAddress.of(source)
        if address.format == WEBDATASET:
            return self._fetch_member(address)
        if address.format == PARQUET:
            return self._fetch_cell(address)
        return self._fetch_object(address)

    # ------------------------------------------------------------------ formats

    def _fetch_object(self, address: ImageAddress) -> bytes:
        limit = self.max_bytes
        read = self._read_range(address, 0, None if limit is None else limit + 1)
        if limit is not None and len(read.data) > limit:
            raise ImageFetchError(address.image_id, "too_large",
                                  f"{address.uri} holds more than {limit} bytes (the max-bytes bound); not read further")
        # No version check: a loose object rewritten since labelling is still the image at its
        # uri (the feed compares its size in pixels with the row's); a shard's offsets are not.
        return read.data

    def _fetch_member(self, address: ImageAddress) -> bytes:
        start, length = int(address.offset), int(address.length)
        self._check_length(address, length, "the tar member")
        if address.expected_size is not None and start + length > address.expected_size:
            raise ImageFetchError(address.image_id, "beyond_file",
                                  f"its address ({address.describe()}) ends past the shard's {address.expected_size} bytes")
        if length == 0:
            return b""
        read = self._read_range(address, start, start + length)
        self._check_version(address, read)
        if len(read.data) != length:
            raise ImageFetchError(address.image_id, "beyond_file",
                                  f"its address ({address.describe()}) ends past the end of the shard "
                                  f"(read {len(read.data)} of {length} bytes)")
        return read.data

    def _fetch_cell(self, address: ImageAddress) -> bytes:
        import pyarrow.parquet as pq

        metadata, total = self._footer(address)
        if address.row_group >= metadata.num_row_groups:
            raise ImageFetchError(address.image_id, "beyond_file",
                                  f"its address ({address.describe()}) names a row group past the file's {metadata.num_row_groups}")
        group = metadata.row_group(address.row_group)
        if address.row >= group.num_rows:
            raise ImageFetchError(address.image_id, "beyond_file",
                                  f"its address ({address.describe()}) names a row past the row group's {group.num_rows}")
        column, start, end = _image_column_range(address, metadata)
        self._check_length(address, end - start, "the row group's image column")
        read = self._read_range(address, start, end)
        self._check_version(address, read)
        if len(read.data) != end - start:
            raise ImageFetchError(address.image_id, "changed", f"{address.uri} is shorter than its footer says: it changed")
        sparse = _SparseFile(total if total is not None else end, {start: read.data})
        try:
            table = pq.ParquetFile(sparse, metadata=metadata).read_row_group(address.row_group, columns=[column])
        except ImageFetchError:
            raise
        except Exception as error:  # noqa: BLE001 - a corrupt chunk: this image's error, named
            raise ImageFetchError(address.image_id, "corrupt", f"cannot decode {address.describe()}: {error}") from None
        cell = table.column(0)[address.row].as_py()
        if isinstance(cell, dict):
            cell = cell.get("bytes")
        if not isinstance(cell, (bytes, bytearray)):
            raise ImageFetchError(address.image_id, "not_image_column",
                                  f"{address.describe()} holds no image bytes (column {column!r}: {type(cell).__name__})")
        return bytes(cell)

    def _footer(self, address: ImageAddress) -> tuple[Any, int | None]:
        """(the file's ``FileMetaData``, its size) from the cache or one or two tail reads."""
        import pyarrow.parquet as pq

        with self._lock:
            if address.uri in self._footers:
                self._footers.move_to_end(address.uri)
                return self._footers[address.uri]
        tail = self._read_range(address, -FOOTER_TAIL_BYTES, None)
        self._check_version(address, tail)
        total = tail.total_size if tail.total_size is not None else len(tail.data)
        data = tail.data
        if len(data) < 8 or data[-4:] != b"PAR1":
            raise ImageFetchError(address.image_id, "changed", f"{address.uri} does not end as a Parquet file")
        footer_length = int.from_bytes(data[-8:-4], "little") + 8
        if footer_length > len(data):
            self._check_length(address, footer_length, "the Parquet footer")
            data = self._read_range(address, total - footer_length, total).data
        try:
            metadata = pq.ParquetFile(_SparseFile(total, {total - len(data): data})).metadata
        except Exception as error:  # noqa: BLE001
            raise ImageFetchError(address.image_id, "changed", f"cannot read the footer of {address.uri}: {error}") from None
        with self._lock:
            self._footers[address.uri] = (metadata, total)
            while len(self._footers) > FOOTERS_KEPT:
                self._footers.popitem(last=False)
        return metadata, total

    # ------------------------------------------------------------------ checks

    def _check_length(self, address: ImageAddress, length: int, what: str) -> None:
        if self.max_bytes is not None and length > self.max_bytes:
            raise ImageFetchError(address.image_id, "too_large",
                                  f"{what} at {address.describe()} holds {length} bytes, more than the max-bytes "
                                  f"bound {self.max_bytes}; not read")

    def _check_version(self, address: ImageAddress, read: RangeRead) -> None:
        size_changed = (address.expected_size is not None and read.total_size is not None
                        and read.total_size != address.expected_size)
        etag_changed = (address.expected_etag is not None and read.etag is not None and read.etag != address.expected_etag)
        if size_changed or etag_changed:
            what = "shard" if address.format != FILES else "object"
            was = (f"{address.expected_size} bytes, now {read.total_size}" if size_changed
                   else f"ETag {address.expected_etag}, now {read.etag}")
            raise ImageFetchError(address.image_id, "changed",
                                  f"the {what} {address.uri} changed since it was labelled ({was}): its address "
                                  f"no longer points at the labelled image; label it again")

    # ------------------------------------------------------------------ reads

    def _filesystem(self, uri: str) -> tuple[Any, str]:
        protocol = uri.split("://", 1)[0].lower() if "://" in uri else "file"
        with self._lock:
            fs = self._filesystems.get(protocol)
        if fs is None:
            fs, path = open_filesystem(uri, self.storage)
            with self._lock:
                self._filesystems[protocol] = fs
            return fs, path
        return fs, fs._strip_protocol(uri)

    def _read_range(self, address: ImageAddress, start: int, end: int | None) -> RangeRead:
        """Bytes ``[start, end)`` of the object (``end`` None: to its end; ``start`` < 0: the
        last ``-start`` bytes), in one request, retried on transient errors."""
        fs, path = self._filesystem(address.uri)
        if is_s3(fs):
            call = functools.partial(_s3_range, fs, path, start, end)
        elif _is_local(fs):
            call = functools.partial(_local_range, fs, path, start, end)
        else:
            call = functools.partial(_other_range, fs, path, start, end)
        try:
            return with_retries(call, attempts=self.attempts, what=f"read {address.describe()} ({address.image_id})")
        except ImageFetchError:
            raise
        except _RangeNotSatisfiable:
            raise ImageFetchError(address.image_id, "beyond_file",
                                  f"its address ({address.describe()}) starts past the end of {address.uri}") from None


class _RangeNotSatisfiable(Exception):
    """The store answered 416: the range starts past the object's end."""


def _is_local(fs: Any) -> bool:
    from fsspec.implementations.local import LocalFileSystem

    return isinstance(fs, LocalFileSystem)


def _local_range(fs: Any, path: str, start: int, end: int | None) -> RangeRead:
    with open(path, "rb") as file:
        size = os.fstat(file.fileno()).st_size
        begin = max(0, size + start) if start < 0 else start
        file.seek(begin)
        data = file.read(-1 if end is None else max(0, end - begin))
    return RangeRead(data, size, None)


def _other_range(fs: Any, path: str, start: int, end: int | None) -> RangeRead:
    """Any other fsspec store: its own ranged read, which reports no size (no version check),
    but for a suffix (a Parquet footer), where the size is needed to place the tail: asked first."""
    if start < 0:
        size = int(fs.size(path))
        begin = max(0, size + start)
        return RangeRead(fs.cat_file(path, start=begin, end=size), size, None)
    return RangeRead(fs.cat_file(path, start=start, end=end), None, None)


def _s3_range(fs: Any, path: str, start: int, end: int | None) -> RangeRead:
    """One ranged GetObject through s3fs's client, keeping the response's Content-Range (the
    object's size) and ETag, which ``cat_file`` drops."""
    from fsspec.asyn import sync

    bucket, key, version = fs.split_path(path)
    if start < 0:
        header = f"bytes={start}"  # suffix range: the last -start bytes
    else:
        header = f"bytes={start}-" + ("" if end is None else str(end - 1))

    async def call() -> RangeRead:
        try:
            response = await fs._call_s3("get_object", Bucket=bucket, Key=key, Range=header,
                                         **({"VersionId": version} if version else {}))
        except OSError as error:
            if not _is_invalid_range(error):
                raise
            if start == 0:  # S3 answers 416 to any range of an empty object
                return RangeRead(b"", 0, None)
            raise _RangeNotSatisfiable() from None
        try:
            data = await response["Body"].read()
        finally:
            response["Body"].close()
        match = _CONTENT_RANGE.match(response.get("ContentRange") or "")
        total = int(match.group(1)) if match else (int(response["ContentLength"]) if "ContentLength" in response and start == 0 and end is None else None)
        etag = response.get("ETag")
        return RangeRead(data, total, etag.strip('"') if isinstance(etag, str) else None)

    return sync(fs.loop, call)


def _is_invalid_range(error: BaseException) -> bool:
    """Whether an S3 error (s3fs's OSError, or botocore's ClientError behind it) is a 416."""
    seen: BaseException | None = error
    while seen is not None:
        response = getattr(seen, "response", None)
        if isinstance(response, dict) and (response.get("Error", {}).get("Code") == "InvalidRange"
                                           or response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 416):
            return True
        seen = seen.__cause__ or seen.__context__
    return "range is not satisfiable" in str(error).lower() or "InvalidRange" in str(error)


class _SparseFile(io.RawIOBase):
    """A read-only file of ``size`` bytes of which only some windows are known ({start: bytes}):
    what pyarrow reads a Parquet footer or column chunk from after one ranged read. A read
    outside the windows is a bug here (pyarrow wanted more than the column chunk): it raises."""

    def __init__(self, size: int, windows: dict[int, bytes]):
        super().__init__()
        self._size, self._windows, self._position = size, dict(windows), 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._size}[whence]
        self._position = base + offset
        return self._position

    def size(self) -> int:
        return self._size

    def readinto(self, buffer: Any) -> int:
        wanted = min(len(buffer), max(0, self._size - self._position))
        if wanted == 0:
            return 0
        for start, data in self._windows.items():
            if start <= self._position and self._position + wanted <= start + len(data):
                begin = self._position - start
                buffer[:wanted] = data[begin:begin + wanted]
                self._position += wanted
                return wanted
        raise OSError(f"read of bytes {self._position}..{self._position + wanted} outside the ranges fetched")


def _image_column_range(address: ImageAddress, metadata: Any) -> tuple[str, int, int]:
    """(the image column's name, the byte range of its chunk in the row group): the one binary
    column, or the one struct column with a binary ``bytes`` field (Hugging Face's image); where
    there are several, the one named ``image`` (the job's ``--image-column`` default). The rows do
    not record another ``--image-column``: a file with several such columns none named ``image``
    is refused (``not_image_column``)."""
    schema = metadata.schema
    leaves: dict[str, list[int]] = {}  # top-level column -> its leaf columns (a struct has several)
    names = []
    for index in range(len(schema)):
        leaf = schema.column(index)
        parts = leaf.path.split(".")
        leaves.setdefault(parts[0], []).append(index)
        if leaf.physical_type == "BYTE_ARRAY" and leaf.logical_type.type == "NONE" and (
                len(parts) == 1 or (len(parts) == 2 and parts[1] == "bytes")):
            names.append(parts[0])
    names = sorted(set(names))
    if len(names) > 1 and "image" in names:
        names = ["image"]  # the job's --image-column default
    if len(names) != 1:
        raise ImageFetchError(address.image_id, "not_image_column",
                              f"{address.uri} has {'no' if not names else 'more than one'} image column "
                              f"(a binary column or a {{bytes, path}} struct){': ' + ', '.join(names) if names else ''}")
    group = metadata.row_group(address.row_group)
    start, end = None, 0
    for index in leaves[names[0]]:
        chunk = group.column(index)
        first = chunk.dictionary_page_offset if chunk.has_dictionary_page else chunk.data_page_offset
        start = first if start is None else min(start, first)
        end = max(end, first + chunk.total_compressed_size)
    return names[0], int(start), int(end)


@functools.lru_cache(maxsize=8)
def fetcher_for(storage: StorageOptions | None = None, max_bytes: int | None = DEFAULT_MAX_IMAGE_BYTES) -> ImageFetcher:
    """The process's fetcher for these options (kept, so its filesystems and Parquet footers are
    reused across calls)."""
    return ImageFetcher(storage, max_bytes=max_bytes)


def fetch_image_bytes(source: ImageAddress | dict | str, storage: StorageOptions | None = None, *,
                      max_bytes: int | None = DEFAULT_MAX_IMAGE_BYTES) -> bytes:
    """The encoded bytes of one image by its row's address (see :meth:`ImageFetcher.fetch`)."""
    return fetcher_for(storage, max_bytes).fetch(source)


__all__ = ["ADDRESS_COLUMNS", "DEFAULT_MAX_IMAGE_BYTES", "FORMATS", "ImageAddress", "ImageFetchError", "ImageFetcher",
           "fetch_image_bytes", "fetcher_for"]
