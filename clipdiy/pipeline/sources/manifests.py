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

from fsspec.implementations.local import LocalFileSystem

from clipdiy.errors import InputError
from clipdiy.pipeline.sources.objects import GLOB_CHARS, SourceObject, as_utc
from clipdiy.storage import StorageOptions, full_uri, open_filesystem
from clipdiy.uris import UnparsableUriError, public_uri, redact_uri

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
        location = _resolve_entry(fs, entry, base_dir)
        try:
            uri = public_uri(location)
        except UnparsableUriError:
            uri = redact_uri(location)  # the decode stage gives it an error row (invalid_uri)
        # The id never holds a credential, and a URL signed anew each night keeps its id.
        image_id = uri.removeprefix(base_uri.rstrip("/") + "/")
        if unique:
            digest = hashlib.blake2b(image_id.encode("utf-8"), digest_size=16).digest()
            if digest in seen:
                repeated += 1
                continue
            seen.add(digest)
        yield SourceObject(uri=uri, image_id=image_id, size=size,
                           etag=etag.strip('"') if isinstance(etag, str) else None,
                           mtime=as_utc(mtime), listing_entry=number,
                           signed_uri=None if location == uri else location)
    if repeated:
        logger.warning("manifest %s lists %d entries more than once; each image is labelled once",
                       redact_uri(full_uri(fs, manifest_path)), repeated)


def _resolve_entry(fs, entry: str, base_dir: str) -> str:
    if "://" in entry:
        if entry.startswith("file://"):
            return "file://" + LocalFileSystem._strip_protocol(entry)
        return entry
    if isinstance(fs, LocalFileSystem):
        path = entry if os.path.isabs(entry) else posixpath.join(base_dir, entry)
        return "file://" + LocalFileSystem._strip_protocol(posixpath.normpath(path))
    if entry.startswith("/"):  # relative to the manifest's bucket
        path = base_dir.split("/", 1)[0] + "/" + entry.lstrip("/")
    else:
        path = posixpath.join(base_dir, entry)
    return full_uri(fs, posixpath.normpath(path))


def _text_manifest_entries(fs, path: str):
    with fs.open(path, "rt", encoding="utf-8") as handle:
        for line in handle:
            entry = line.strip()
            if entry and not entry.startswith("#"):
                yield entry, None, None, None


def _parquet_manifest_entries(fs, path: str):
    import pyarrow.parquet as pq

    with fs.open(path, "rb") as handle:
        parquet = pq.ParquetFile(handle)
        names = set(parquet.schema_arrow.names)
        if "uri" not in names:
            raise InputError(f"manifest {full_uri(fs, path)} has no 'uri' column (columns: {sorted(names)})")
        columns = ["uri"] + [c for c in ("size", "etag", "mtime") if c in names]
        for batch in parquet.iter_batches(columns=columns, batch_size=8192):
            data = batch.to_pydict()
            for i, uri in enumerate(data["uri"]):
                if uri is None or not str(uri).strip():
                    continue
                yield (str(uri).strip(),
                       data["size"][i] if "size" in data else None,
                       data["etag"][i] if "etag" in data else None,
                       data["mtime"][i] if "mtime" in data else None)


def is_manifest_input(input_uri: str, options: StorageOptions | None = None) -> bool:
    """True when ``input_uri`` names a manifest (``.txt``/``.lst``/``.parquet``/``.pq`` file)."""
    fs, path = open_filesystem(input_uri, options)
    return is_manifest(fs, path)


def manifest_entries_estimate(input_uri: str, options: StorageOptions | None = None) -> int:
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
