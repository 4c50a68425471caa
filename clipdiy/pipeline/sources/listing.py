"""Listing the job's input: which objects a prefix, glob or manifest names, streamed.

Three kinds of input are understood:

- a **prefix** (a directory, a bucket, or ``s3://bucket/some/prefix``): every object below it,
  recursively; the image id is the path relative to the prefix (``/`` separators);
- a **glob** (``s3://bucket/photos/**/*.jpg``; ``*`` stays within one path segment, ``**``
  crosses segments): the matching objects; the image id is the path relative to the directory
  before the first wildcard segment;
- a **manifest**, a file ending in ``.txt``/``.lst`` (one URI or path per line; blank lines and
  ``#`` comments skipped; relative entries resolved against the manifest's folder) or
  ``.parquet``/``.pq`` (a ``uri`` column, optional ``size``, ``etag``, ``mtime`` columns). The
  image id of an entry is its path relative to the manifest's folder when it lies below that
  folder, else the entry's full URI. This keeps ids stable when the manifest grows (a common
  root computed over the entries would change whenever a new entry widens it, and re-label
  everything on the next incremental run). An image listed more than once is yielded once (its
  first entry), so a run never writes two rows for one image; the repeats are counted in the log.

Listings stream: S3 prefixes are paged through ``ListObjectsV2`` one page (1,000 keys) at a
time, local folders are walked one directory at a time, manifests are read line by line or
batch by batch. Order is deterministic: prefixes and globs yield objects in lexicographic order
of their full path (S3's own key order, which the local walk reproduces); manifests yield
entries in file order.

A large prefix is listed by several tasks at once (:mod:`clipdiy.pipeline.sources.listing_parts`); the
walks of each store are in :mod:`clipdiy.pipeline.sources.walks`, manifests in
:mod:`clipdiy.pipeline.sources.manifests`, the pre-flight check in :mod:`clipdiy.pipeline.sources.input_check`.
"""

from __future__ import annotations

import dataclasses
import posixpath
import re
from collections.abc import Collection, Iterator
from typing import Any

from fsspec.utils import glob_translate

from clipdiy.errors import InputError
from clipdiy.locations import Location
from clipdiy.pipeline.sources.manifests import is_manifest, iter_manifest
from clipdiy.pipeline.sources.key_ranges import KeyRange
from clipdiy.pipeline.sources.objects import GLOB_CHARS, SourceObject, source_object
from clipdiy.pipeline.sources.walks import walk_files
from clipdiy.storage import StorageOptions, is_s3, open_filesystem, with_retries


#: Extensions (lower case) listed from prefixes and globs. Matching is case-insensitive and by
#: name only: a text file named ``x.jpg`` is listed, and the job gives it an error row.
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff",
     ".ppm", ".pgm", ".pbm", ".pnm"}
)


def iter_sources(
    input_uri: str | Location,
    options: StorageOptions | None = None,
    *,
    extensions: Collection[str] | None = IMAGE_EXTENSIONS,
    unique: bool = True,
) -> Iterator[SourceObject]:
    """Stream the input objects of ``input_uri`` (prefix, glob or manifest) in a fixed order.

    ``extensions`` filters prefix and glob listings by name (case-insensitive; None = every
    file); hidden files and folders (names starting with ``.``) below the root are skipped. Manifest entries are never filtered: each listed entry is meant to get a row.
    ``unique``: a manifest's repeated entries are dropped here, with a set of 16-byte digests
    that grows with the manifest (~70 bytes an entry); False leaves them to the caller (the
    job's planning drops them with a hash-partitioned join on the cluster).
    A generator: nothing is listed before the first item is asked for, and at most one listing
    page (S3) or one directory's names (local) is held at a time.
    """
    fs, path = open_filesystem(input_uri, options)
    wanted = None if extensions is None else frozenset(e.lower() for e in extensions)
    if GLOB_CHARS.search(path):
        yield from _iter_glob(fs, path, wanted)
    elif is_manifest(fs, path):
        yield from iter_manifest(fs, path, options or StorageOptions(), unique)
    else:
        yield from _iter_prefix(fs, path, wanted)


def is_listed(relative: str, wanted: frozenset[str] | None) -> bool:
    # Hidden files and folders (.DS_Store, macOS ._x.jpg twins, .cache/) are never inputs.
    if relative.startswith(".") or "/." in relative:
        return False
    return wanted is None or posixpath.splitext(relative)[1].lower() in wanted


def iter_key_range_sources(fs, path: str, wanted, key_range: KeyRange) -> Iterator[SourceObject]:
    """The objects of the S3 prefix or glob ``path`` whose keys lie in ``key_range``, with the
    ids :func:`iter_sources` gives them."""
    walk = _iter_glob if GLOB_CHARS.search(path) else _iter_prefix
    yield from walk(fs, path, wanted, key_range)


def _iter_prefix(fs, root: str, wanted, key_range: KeyRange | None = None) -> Iterator[SourceObject]:
    emitted = False
    stem = root.rstrip("/") + "/" if root else ""
    for full, info in walk_files(fs, root, key_stem=stem, key_range=key_range):
        emitted = True
        if is_listed(full[len(stem):], wanted):
            yield source_object(fs, full, full[len(stem):], info)
    if not emitted and key_range is None and root and fs.isfile(root):
        # The input is a single object; its id is its name.
        info = fs.info(root)
        if is_listed(posixpath.basename(root), wanted):
            yield source_object(fs, root, posixpath.basename(root), info)


def _iter_glob(fs, pattern: str, wanted, key_range: KeyRange | None = None) -> Iterator[SourceObject]:
    root, stem = glob_root(pattern)
    if is_s3(fs) and "/" not in stem:
        raise InputError(f"wildcards in a bucket name are not supported: s3://{pattern}")
    matcher = re.compile(glob_translate(pattern))
    root_len = len(root.rstrip("/")) + 1
    # S3 takes the literal stem before the first wildcard as a server-side prefix filter.
    for full, info in walk_files(fs, root, key_stem=stem, key_range=key_range):
        if matcher.match(full) and is_listed(full[root_len:], wanted):
            yield source_object(fs, full, full[root_len:], info)


def glob_root(pattern: str) -> tuple[str, str]:
    """(the folder before the first wildcard segment, the literal text before the wildcard)."""
    stem = pattern[: GLOB_CHARS.search(pattern).start()]
    root = stem.rsplit("/", 1)[0] if "/" in stem else ""
    return (root or "/") if pattern.startswith("/") else root, stem


def describe_source(source: SourceObject, options: StorageOptions | None = None, **retry: Any) -> SourceObject:
    """``source`` with size, ETag and mtime filled from the store (for bare manifest entries).

    Raises FileNotFoundError / PermissionError like :func:`read_bytes`.
    """
    fs, path = open_filesystem(source.location, options)
    info = with_retries(lambda: fs.info(path), what=f"stat {source.uri}", **retry)
    fresh = source_object(fs, path, source.image_id, info)
    return dataclasses.replace(source, size=fresh.size, etag=fresh.etag, mtime=fresh.mtime)
