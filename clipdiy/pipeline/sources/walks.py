"""Walks of a folder tree on the three kinds of store, one listing page or folder at a time.

S3 is paged through ``ListObjectsV2`` (1,000 keys a request), local folders are read one at a
time with ``os.scandir``, other fsspec filesystems one ``ls`` at a time. Every walk yields files
in lexicographic order of their full path (S3's own key order, which the others reproduce).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from fsspec.implementations.local import LocalFileSystem

from clipdiy.errors import InputError
from clipdiy.pipeline.sources.key_ranges import KeyRange
from clipdiy.storage import is_s3


S3_PAGE_SIZE = 1000  # keys per ListObjectsV2 request (S3's maximum)


def walk_files(fs, root: str, key_stem: str, key_range: KeyRange | None = None) -> Iterator[tuple[str, dict]]:
    """(full path, info) of every file below ``root`` whose path starts with ``key_stem``,
    in lexicographic order of the full path; on S3 only the keys in ``key_range``."""
    if is_s3(fs):
        yield from _walk_s3(fs, key_stem, key_range or KeyRange())
    elif isinstance(fs, LocalFileSystem):
        yield from _walk_local(root or "/", key_stem)
    else:
        yield from _walk_generic(fs, root, key_stem)


def _walk_s3(fs, key_stem: str, key_range: KeyRange) -> Iterator[tuple[str, dict]]:
    bucket, _, prefix = key_stem.partition("/")
    if not bucket:
        raise InputError("cannot list all of S3: name a bucket (s3://bucket/prefix)")
    request = {"Bucket": bucket, "Prefix": prefix, "MaxKeys": S3_PAGE_SIZE}
    if key_range.start_after is not None:
        request["StartAfter"] = key_range.start_after
    while True:
        # One page per request; the page is dropped before the next one is fetched.
        page = fs.call_s3("list_objects_v2", fs.req_kw, **request)
        for entry in page.get("Contents", ()):
            key = entry["Key"]
            if key_range.past_end(key):
                return
            if key.endswith("/"):
                continue  # a folder marker object, not a file
            yield f"{bucket}/{key}", {"size": entry.get("Size"), "ETag": entry.get("ETag"),
                                      "LastModified": entry.get("LastModified")}
        if not page.get("IsTruncated"):
            return
        request["ContinuationToken"] = page["NextContinuationToken"]


def _walk_local(directory: str, key_stem: str) -> Iterator[tuple[str, dict]]:
    base = directory.replace(os.sep, "/").rstrip("/") + "/"
    for name in local_names(directory):
        path = base + name.rstrip("/")
        if name.endswith("/"):
            if _may_contain(path + "/", key_stem):
                yield from _walk_local(path, key_stem)
        elif path.startswith(key_stem) and (info := local_info(path)) is not None:
            yield path, info


def local_names(directory: str) -> list[str]:
    """The names in a local folder, sorted, folders with a trailing ``/`` (empty when it is not
    a folder, or was removed since its parent was read)."""
    try:
        with os.scandir(directory) as it:
            # Sorting a directory's entries by name + "/" for folders reproduces the
            # lexicographic order of full paths (S3's order) across the whole tree. Only
            # names are kept: a folder of 50,000 files costs a few MB while it is walked.
            return sorted(e.name + "/" if _is_dir(e) else e.name for e in it)
    except (NotADirectoryError, FileNotFoundError):
        return []


def local_info(path: str) -> dict | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None  # deleted (or a dangling link) since the directory was read
    return {"size": st.st_size, "mtime": st.st_mtime}


def _is_dir(entry: os.DirEntry) -> bool:
    # Directory symlinks are not followed: they can form loops.
    try:
        return entry.is_dir(follow_symlinks=False)
    except OSError:
        return False


def _may_contain(directory: str, key_stem: str) -> bool:
    return directory.startswith(key_stem) or key_stem.startswith(directory)


def _walk_generic(fs, directory: str, key_stem: str) -> Iterator[tuple[str, dict]]:
    # Other fsspec filesystems: one directory listing at a time.
    for name, info in generic_entries(fs, directory):
        if name.endswith("/"):
            if _may_contain(name, key_stem):
                yield from _walk_generic(fs, name.rstrip("/"), key_stem)
        elif name.startswith(key_stem):
            yield name, info


def generic_entries(fs, directory: str) -> list[tuple[str, dict]]:
    """(path, info) of what an fsspec folder holds, sorted as :func:`local_names`: folders with
    a trailing ``/``, the folder itself (some filesystems list it) left out."""
    try:
        listing = fs.ls(directory, detail=True)
    except FileNotFoundError:
        return []
    entries = sorted(
        ((info["name"].rstrip("/") + ("/" if info.get("type") == "directory" else "")), info)
        for info in listing
    )
    return [(name, info) for name, info in entries if not (name.endswith("/") and name.rstrip("/") == directory.rstrip("/"))]


def folder_level(fs, folder: str) -> Iterator[tuple[str, dict | None]]:
    """One folder level, in lexicographic order: (path, info) of each file directly in
    ``folder``, and (path, None) of each folder in it. Paths without a trailing ``/``.
    Not for S3 (split by key range): there a common prefix ``a//`` is a folder whose name,
    without its trailing ``/``, is its parent's."""
    if isinstance(fs, LocalFileSystem):
        base = (folder or "/").replace(os.sep, "/").rstrip("/") + "/"
        for name in local_names(folder or "/"):
            if name.endswith("/"):
                yield base + name.rstrip("/"), None
            elif (info := local_info(base + name)) is not None:
                yield base + name, info
    else:
        for name, info in generic_entries(fs, folder):
            yield (name.rstrip("/"), None) if name.endswith("/") else (name, info)
