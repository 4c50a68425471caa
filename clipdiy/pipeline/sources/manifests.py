"""Manifest inputs: a ``.txt``/``.lst`` file (one URI or path a line) or a ``.parquet``/``.pq`` file
(a ``uri`` column, optional ``size``, ``etag``, ``mtime``), read line by line or batch by batch.

Ids are relative to the manifest's folder (see :mod:`clipdiy.pipeline.sources.listing`); an image listed
more than once is yielded once.
"""

from __future__ import annotations

import hashlib
import logging
import os
import posixpath
from collections.abc import Iterator

import pyarrow as pa
from fsspec.implementations.local import LocalFileSystem

from clipdiy.errors import InputError
from clipdiy.locations import Location
from clipdiy.pipeline.sources.objects import (
    GLOB_CHARS,
    SourceObject,
    as_size,
    as_text,
    as_utc,
)
from clipdiy.storage import StorageOptions, full_uri, open_filesystem

logger = logging.getLogger(__name__)


TEXT_MANIFEST_SUFFIXES = (".txt", ".lst")


PARQUET_MANIFEST_SUFFIXES = (".parquet", ".pq")


def iter_manifest(fs, manifest_path: str, options: StorageOptions, unique: bool = True) -> Iterator[SourceObject]:
    base_dir = posixpath.dirname(manifest_path)
    base_uri = full_uri(fs, base_dir)
    if manifest_path.lower().endswith(PARQUET_MANIFEST_SUFFIXES):
        entries = _parquet_manifest_entries(fs, manifest_path)
    else:
        entries = _text_manifest_entries(fs, manifest_path)
    # 16-byte digests of the ids seen: a repeated entry is dropped; ~70 bytes per entry in memory.
    seen: set[bytes] = set()
    repeated = 0
    for number, (entry, size, etag, mtime) in enumerate(entries):
        # An unparsable entry keeps a text-redacted public form; the decode stage gives it an
        # error row (invalid_uri, Location.parse_error).
        location = Location(_resolve_entry(fs, entry, base_dir))
        uri = location.public
        # The id never holds a credential, and a URL signed anew each night keeps its id.
        image_id = uri.removeprefix(base_uri.rstrip("/") + "/")
        if unique:
            digest = hashlib.blake2b(image_id.encode("utf-8"), digest_size=16).digest()
            if digest in seen:
                repeated += 1
                continue
            seen.add(digest)
        yield SourceObject(uri=uri, image_id=image_id, size=as_size(size),
                           etag=etag.strip('"') if isinstance(etag, str) else None,
                           mtime=as_utc(mtime), listing_entry=number,
                           signed_uri=location if location.is_signed else None)
    if repeated:
        logger.warning("manifest %s lists %d entries more than once; each image is labelled once",
                       Location(full_uri(fs, manifest_path)), repeated)


def _resolve_entry(fs, entry: str, base_dir: str) -> str:
    if "://" in entry:
        if entry.startswith("file://"):
            return "file://" + LocalFileSystem._strip_protocol(entry)
        return entry
    if isinstance(fs, LocalFileSystem):
        path = entry if os.path.isabs(entry) else posixpath.join(base_dir, entry)
        return "file://" + LocalFileSystem._strip_protocol(posixpath.normpath(path))
    # An object store's key is text, not a path: "a//x.jpg" and "a/../x.jpg" are keys of their
    # own, so an entry is joined as written (no normpath, which would read another object and
    # merge two ids); only a leading "./" (this folder) is dropped.
    while entry.startswith("./"):
        entry = entry[2:]
    if entry.startswith("/"):  # relative to the manifest's bucket
        return full_uri(fs, base_dir.split("/", 1)[0] + "/" + entry[1:])
    return full_uri(fs, (base_dir + "/" if base_dir else "") + entry)


def _text_manifest_entries(fs, path: str):
    # Read as bytes: one line that is not UTF-8 is one entry (its bytes shown as \xNN by
    # as_text), not an error of the whole manifest.
    with fs.open(path, "rb") as handle:
        for line in handle:
            entry = as_text(line).strip()
            if entry and not entry.startswith("#"):
                yield entry, None, None, None


def _parquet_manifest_entries(fs, path: str):
    import pyarrow.parquet as pq

    where = Location(full_uri(fs, path))
    with fs.open(path, "rb") as handle:
        try:
            parquet = pq.ParquetFile(handle)
        except Exception as error:  # noqa: BLE001 - any file Arrow cannot open: one clear line
            raise InputError(f"manifest {where} is not a Parquet file Arrow can read ({type(error).__name__})") from None
        names = set(parquet.schema_arrow.names)
        if "uri" not in names:
            raise InputError(f"manifest {where} has no 'uri' column (columns: {sorted(names)})")
        columns = ["uri"] + [c for c in ("size", "etag", "mtime") if c in names]
        batches = parquet.iter_batches(columns=columns, batch_size=8192)
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except Exception as error:  # noqa: BLE001 - a cell Arrow cannot convert (a timestamp out of range)
                raise InputError(f"manifest {where}: a row group cannot be read "
                                 f"({type(error).__name__}: {str(error)[:200]})") from None
            data = {name: _cells(batch.column(name)) for name in columns}
            for i, uri in enumerate(data["uri"]):
                uri = _cell_text(uri)
                if uri is None or not uri.strip():
                    continue
                yield (uri.strip(),
                       data["size"][i] if "size" in data else None,
                       data["etag"][i] if "etag" in data else None,
                       data["mtime"][i] if "mtime" in data else None)


def _cells(column: pa.Array) -> list:
    """The Python values of a manifest column, a cell that has none (a timestamp out of a
    datetime's range) given as what :func:`as_utc` and :func:`as_size` take: a timestamp column
    as seconds since the epoch, any other cell that cannot convert as None."""
    if pa.types.is_timestamp(column.type):
        per_second = {"s": 1, "ms": 10**3, "us": 10**6, "ns": 10**9}[column.type.unit]
        return [None if value is None else value / per_second for value in column.cast(pa.int64()).to_pylist()]
    try:
        return column.to_pylist()
    except Exception:  # noqa: BLE001 - one cell Arrow cannot give as Python: that cell is unknown
        values = []
        for i in range(len(column)):
            try:
                values.append(column[i].as_py())
            except Exception:  # noqa: BLE001
                values.append(None)
        return values


def _cell_text(value) -> str | None:
    """A ``uri`` cell as text: bytes (a binary column) shown by :func:`as_text`, numbers as written."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return as_text(value)
    return str(value)


def is_manifest_input(input_uri: str | Location, options: StorageOptions | None = None) -> bool:
    """True when ``input_uri`` names a manifest (``.txt``/``.lst``/``.parquet``/``.pq`` file)."""
    fs, path = open_filesystem(input_uri, options)
    return is_manifest(fs, path)


def manifest_entries_estimate(input_uri: str | Location, options: StorageOptions | None = None) -> int:
    """About how many entries a manifest holds, without reading it: a Parquet manifest's row
    count from its footer, a text manifest's size over 32 bytes a line."""
    fs, path = open_filesystem(input_uri, options)
    if path.lower().endswith(PARQUET_MANIFEST_SUFFIXES):
        import pyarrow.parquet as pq

        with fs.open(path, "rb") as handle:
            return pq.ParquetFile(handle).metadata.num_rows
    return int(fs.size(path) or 0) // 32


def is_manifest(fs, path: str) -> bool:
    return (not GLOB_CHARS.search(path)
            and path.lower().endswith(TEXT_MANIFEST_SUFFIXES + PARQUET_MANIFEST_SUFFIXES)
            and fs.isfile(path))
