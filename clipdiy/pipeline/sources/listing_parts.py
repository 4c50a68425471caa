"""A large prefix listed by several tasks at once: :func:`listing_parts` splits it into disjoint
parts, and :func:`iter_part_sources` lists one part with the same ids as
:func:`~clipdiy.pipeline.sources.listing.iter_sources`. On S3 the parts are key ranges
(:mod:`clipdiy.pipeline.sources.key_ranges`), so a flat prefix (``images/<sha>.jpg``) or a glob over one
splits as well as a folder tree, and keys with empty path segments (``a//x.jpg``) are listed
once like any other; elsewhere they are folders (the files directly in a folder, or everything
below one)."""

from __future__ import annotations

import itertools
import posixpath
from collections.abc import Collection, Iterator
from dataclasses import dataclass

from clipdiy.locations import Location
from clipdiy.pipeline.sources.manifests import is_manifest
from clipdiy.pipeline.sources.key_ranges import SPLIT_MIN_KEYS, KeyRange, S3KeyProbe, split_ranges
from clipdiy.pipeline.sources.listing import IMAGE_EXTENSIONS, glob_root, is_listed, iter_key_range_sources, iter_sources
from clipdiy.pipeline.sources.objects import GLOB_CHARS, SourceObject, source_object
from clipdiy.pipeline.sources.walks import folder_level, walk_files
from clipdiy.storage import StorageOptions, is_s3, open_filesystem


@dataclass(frozen=True)
class ListingPart:
    """A piece of a prefix listing that one task lists (picklable).

    ``folder``: None for the whole input, listed as :func:`iter_sources` lists it, restricted to
    the S3 keys ``start_after < key <= end_at`` when either is set (a :class:`KeyRange`, full
    keys without the bucket); else a local or other non-S3 folder below the input's prefix
    (filesystem path, no trailing ``/``). ``recursive``: every file below ``folder``, or only
    the files directly in it.
    """

    folder: str | None = None
    recursive: bool = True
    start_after: str | None = None
    end_at: str | None = None

    @property
    def key_range(self) -> KeyRange | None:
        if self.start_after is None and self.end_at is None:
            return None
        return KeyRange(self.start_after, self.end_at)


def listing_parts(
    input_uri: str | Location,
    options: StorageOptions | None = None,
    *,
    min_parts: int = 64,
    max_depth: int = 3,
    split_min_keys: int = SPLIT_MIN_KEYS,
) -> Iterator[ListingPart]:
    """Disjoint parts whose listings (:func:`iter_part_sources`) together give exactly
    :func:`iter_sources`'s objects, with the same ids (in another order).

    On S3 a prefix or glob is split into about ``min_parts`` key ranges (see
    :mod:`clipdiy.pipeline.sources.key_ranges`; a stretch of at most ``split_min_keys`` keys is not
    split), whatever its folders. Elsewhere only a prefix with sub-folders is split; a glob, a
    manifest, a single object or a folder without sub-folders is one part, the whole input.
    The folder split goes breadth first, one folder
    level at a time, until a level holds ``min_parts`` folders or ``max_depth`` levels are split:
    each folder of the levels above gives a part of its own files (not recursive), each folder of
    the last level a recursive part. At most ``min_parts`` folder names are held; beyond that the
    parts stream. A generator: nothing is listed before the first part is asked for.
    """
    fs, path = open_filesystem(input_uri, options)
    if is_manifest(fs, path):
        yield ListingPart()
        return
    if is_s3(fs):
        yield from _key_range_parts(fs, path, min_parts, split_min_keys)
        return
    if GLOB_CHARS.search(path):
        yield ListingPart()
        return
    root_subfolders = _subfolders(fs, path)
    first = next(root_subfolders, None)
    if first is None:
        yield ListingPart()
        return
    level = [path]
    for depth in range(1, max_depth + 1):
        children: list[str] = []
        streaming = False
        for folder in level:
            yield ListingPart(folder, recursive=False)
            # The root's folders are listed once: the peek above goes on here.
            subfolders = itertools.chain([first], root_subfolders) if folder == path and depth == 1 else _subfolders(fs, folder)
            for sub in subfolders:
                if streaming:
                    yield ListingPart(sub)
                    continue
                children.append(sub)
                if depth == max_depth or len(children) >= min_parts:
                    streaming = True
                    yield from (ListingPart(child) for child in children)
                    children.clear()
        if streaming or not children:
            return
        level = children


def _key_range_parts(fs, path: str, parts: int, min_keys: int) -> Iterator[ListingPart]:
    # The keys the whole listing pages through: below the prefix, or from the glob's literal stem.
    key_stem = glob_root(path)[1] if GLOB_CHARS.search(path) else path.rstrip("/") + "/"
    bucket, slash, prefix = key_stem.partition("/")
    if not bucket or not slash:
        yield ListingPart()  # a bucket-less or wildcard-bucket input: iter_sources says why
        return
    ranges = list(split_ranges(S3KeyProbe(fs, bucket, prefix), prefix, parts, min_keys=min_keys))
    if len(ranges) == 1:
        yield ListingPart()
        return
    for key_range in ranges:
        yield ListingPart(start_after=key_range.start_after, end_at=key_range.end_at)


def iter_part_sources(
    input_uri: str | Location,
    part: ListingPart,
    options: StorageOptions | None = None,
    *,
    extensions: Collection[str] | None = IMAGE_EXTENSIONS,
) -> Iterator[SourceObject]:
    """The objects of one part of ``input_uri``'s listing (see :func:`listing_parts`), ids
    relative to the input's prefix as :func:`iter_sources` gives them; lexicographic order."""
    if part.folder is None and part.key_range is not None:
        fs, path = open_filesystem(input_uri, options)
        wanted = None if extensions is None else frozenset(e.lower() for e in extensions)
        yield from iter_key_range_sources(fs, path, wanted, part.key_range)
        return
    if part.folder is None:
        yield from iter_sources(input_uri, options, extensions=extensions)
        return
    fs, root = open_filesystem(input_uri, options)
    stem = root.rstrip("/") + "/" if root else ""
    wanted = None if extensions is None else frozenset(e.lower() for e in extensions)
    if part.recursive:
        files = walk_files(fs, part.folder, key_stem=part.folder.rstrip("/") + "/")
    else:
        files = ((full, info) for full, info in folder_level(fs, part.folder) if info is not None)
    for full, info in files:
        if is_listed(full[len(stem):], wanted):
            yield source_object(fs, full, full[len(stem):], info)


def _subfolders(fs, folder: str) -> Iterator[str]:
    """The folders directly in ``folder`` (not hidden), in lexicographic order."""
    for full, info in folder_level(fs, folder):
        if info is None and not posixpath.basename(full).startswith("."):
            yield full
