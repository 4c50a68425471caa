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

A large prefix is listed by several tasks at once: :func:`listing_parts` splits it into
disjoint folders (the files directly in a folder, or everything below one), and
:func:`iter_part_sources` lists one part with the same ids as :func:`iter_sources`.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import itertools
import logging
import os
import posixpath
import queue
import re
import threading
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from typing import Any

from fsspec.implementations.local import LocalFileSystem
from fsspec.utils import glob_translate

from clipdiy.errors import InputError
from clipdiy.storage import (
    StorageOptions,
    full_uri,
    is_s3,
    is_transient,
    open_filesystem,
    with_retries,
)
from clipdiy.uris import UnparsableUriError, public_uri, redact_uri

logger = logging.getLogger(__name__)

#: Extensions (lower case) listed from prefixes and globs. Matching is case-insensitive and by
#: name only: a text file named ``x.jpg`` is listed, and the job gives it an error row.
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff",
     ".ppm", ".pgm", ".pbm", ".pnm"}
)
TEXT_MANIFEST_SUFFIXES = (".txt", ".lst")
PARQUET_MANIFEST_SUFFIXES = (".parquet", ".pq")
_GLOB_CHARS = re.compile(r"[*?\[]")
S3_PAGE_SIZE = 1000  # keys per ListObjectsV2 request (S3's maximum)



@dataclass(frozen=True)
class SourceObject:
    """One input object: where it is, its stable id, and what identifies its content version.

    ``uri``: full URI (``s3://bucket/key``, ``file:///abs/path``) without any credential (see
    :func:`clipdiy.uris.public_uri`): what rows and logs show; ``image_id``: the path relative
    to the input root with ``/`` separators (or the public URI itself, see the module docstring);
    ``size`` in bytes, ``etag`` (quotes stripped), ``mtime`` (UTC) where the store reports them
    (None for manifest entries without those columns: such an entry's version is unknown, so a
    later run treats it as labelled once any row has its id; :func:`describe_source` stats one).
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


# --------------------------------------------------------------------------------- listing


def iter_sources(
    input_uri: str,
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
    if _GLOB_CHARS.search(path):
        yield from _iter_glob(fs, path, wanted)
    elif _is_manifest(fs, path):
        yield from _iter_manifest(fs, path, options or StorageOptions(), unique)
    else:
        yield from _iter_prefix(fs, path, wanted)


def _keep(relative: str, wanted: frozenset[str] | None) -> bool:
    # Hidden files and folders (.DS_Store, macOS ._x.jpg twins, .cache/) are never inputs.
    if relative.startswith(".") or "/." in relative:
        return False
    return wanted is None or posixpath.splitext(relative)[1].lower() in wanted


def _iter_prefix(fs, root: str, wanted) -> Iterator[SourceObject]:
    emitted = False
    stem = root.rstrip("/") + "/" if root else ""
    for full, info in _walk_files(fs, root, key_stem=stem):
        emitted = True
        if _keep(full[len(stem):], wanted):
            yield _source(fs, full, full[len(stem):], info)
    if not emitted and root and fs.isfile(root):
        # The input is a single object; its id is its name.
        info = fs.info(root)
        if _keep(posixpath.basename(root), wanted):
            yield _source(fs, root, posixpath.basename(root), info)


def _iter_glob(fs, pattern: str, wanted) -> Iterator[SourceObject]:
    root, stem = _glob_root(pattern)
    if is_s3(fs) and "/" not in stem:
        raise InputError(f"wildcards in a bucket name are not supported: s3://{pattern}")
    matcher = re.compile(glob_translate(pattern))
    root_len = len(root.rstrip("/")) + 1
    # S3 takes the literal stem before the first wildcard as a server-side prefix filter.
    for full, info in _walk_files(fs, root, key_stem=stem):
        if matcher.match(full) and _keep(full[root_len:], wanted):
            yield _source(fs, full, full[root_len:], info)


def _glob_root(pattern: str) -> tuple[str, str]:
    """(the folder before the first wildcard segment, the literal text before the wildcard)."""
    stem = pattern[: _GLOB_CHARS.search(pattern).start()]
    root = stem.rsplit("/", 1)[0] if "/" in stem else ""
    return (root or "/") if pattern.startswith("/") else root, stem


def _walk_files(fs, root: str, key_stem: str) -> Iterator[tuple[str, dict]]:
    """(full path, info) of every file below ``root`` whose path starts with ``key_stem``,
    in lexicographic order of the full path."""
    if is_s3(fs):
        yield from _walk_s3(fs, key_stem)
    elif isinstance(fs, LocalFileSystem):
        yield from _walk_local(root or "/", key_stem)
    else:
        yield from _walk_generic(fs, root, key_stem)


def _walk_s3(fs, key_stem: str) -> Iterator[tuple[str, dict]]:
    bucket, _, prefix = key_stem.partition("/")
    if not bucket:
        raise InputError("cannot list all of S3: name a bucket (s3://bucket/prefix)")
    request = {"Bucket": bucket, "Prefix": prefix, "MaxKeys": S3_PAGE_SIZE}
    while True:
        # One page per request; the page is dropped before the next one is fetched.
        page = fs.call_s3("list_objects_v2", fs.req_kw, **request)
        for entry in page.get("Contents", ()):
            key = entry["Key"]
            if key.endswith("/"):
                continue  # a folder marker object, not a file
            yield f"{bucket}/{key}", {"size": entry.get("Size"), "ETag": entry.get("ETag"),
                                      "LastModified": entry.get("LastModified")}
        if not page.get("IsTruncated"):
            return
        request["ContinuationToken"] = page["NextContinuationToken"]


def _walk_local(directory: str, key_stem: str) -> Iterator[tuple[str, dict]]:
    base = directory.replace(os.sep, "/").rstrip("/") + "/"
    for name in _local_names(directory):
        path = base + name.rstrip("/")
        if name.endswith("/"):
            if _may_contain(path + "/", key_stem):
                yield from _walk_local(path, key_stem)
        elif path.startswith(key_stem) and (info := _local_info(path)) is not None:
            yield path, info


def _local_names(directory: str) -> list[str]:
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


def _local_info(path: str) -> dict | None:
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
    for name, info in _generic_entries(fs, directory):
        if name.endswith("/"):
            if _may_contain(name, key_stem):
                yield from _walk_generic(fs, name.rstrip("/"), key_stem)
        elif name.startswith(key_stem):
            yield name, info


def _generic_entries(fs, directory: str) -> list[tuple[str, dict]]:
    """(path, info) of what an fsspec folder holds, sorted as :func:`_local_names`: folders with
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


def _source(fs, full: str, image_id: str, info: dict) -> SourceObject:
    etag = info.get("ETag") or info.get("etag")
    return SourceObject(
        uri=full_uri(fs, full),
        image_id=image_id,
        size=None if info.get("size") is None else int(info["size"]),
        etag=etag.strip('"') if isinstance(etag, str) else None,
        mtime=_as_utc(info.get("LastModified") or info.get("mtime") or info.get("updated")
                      or info.get("last_modified") or info.get("created")),
    )


def _as_utc(value: Any) -> dt.datetime | None:
    if value is None:
        return None
    if isinstance(value, dt.datetime):
        return value.replace(tzinfo=dt.timezone.utc) if value.tzinfo is None else value.astimezone(dt.timezone.utc)
    if isinstance(value, (int, float)):
        return dt.datetime.fromtimestamp(float(value), tz=dt.timezone.utc)
    if isinstance(value, str):
        try:
            return _as_utc(dt.datetime.fromisoformat(value.replace("Z", "+00:00")))
        except ValueError:
            return None
    return None


# --------------------------------------------------------------------------------- parts


@dataclass(frozen=True)
class ListingPart:
    """A piece of a prefix listing that one task lists (picklable).

    ``folder``: None for the whole input, listed as :func:`iter_sources` lists it; else a folder
    below the input's prefix (filesystem path, no trailing ``/``). ``recursive``: every file
    below ``folder``, or only the files directly in it.
    """

    folder: str | None = None
    recursive: bool = True


def listing_parts(
    input_uri: str, options: StorageOptions | None = None, *, min_parts: int = 64, max_depth: int = 3
) -> Iterator[ListingPart]:
    """Disjoint parts whose listings (:func:`iter_part_sources`) together give exactly
    :func:`iter_sources`'s objects, with the same ids (in another order).

    Only a prefix with sub-folders is split; a glob, a manifest, a single object or a folder
    without sub-folders is one part, the whole input. The split goes breadth first, one folder
    level at a time, until a level holds ``min_parts`` folders or ``max_depth`` levels are split:
    each folder of the levels above gives a part of its own files (not recursive), each folder of
    the last level a recursive part. At most ``min_parts`` folder names are held; beyond that the
    parts stream. A generator: nothing is listed before the first part is asked for. On S3 each
    split folder is listed with a delimiter, so its own files are listed twice (once here, once
    by its part): corpora keep their files in the leaves, where nothing is listed twice.
    """
    fs, path = open_filesystem(input_uri, options)
    if _GLOB_CHARS.search(path) or _is_manifest(fs, path):
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


def iter_part_sources(
    input_uri: str,
    part: ListingPart,
    options: StorageOptions | None = None,
    *,
    extensions: Collection[str] | None = IMAGE_EXTENSIONS,
) -> Iterator[SourceObject]:
    """The objects of one part of ``input_uri``'s listing (see :func:`listing_parts`), ids
    relative to the input's prefix as :func:`iter_sources` gives them; lexicographic order."""
    if part.folder is None:
        yield from iter_sources(input_uri, options, extensions=extensions)
        return
    fs, root = open_filesystem(input_uri, options)
    stem = root.rstrip("/") + "/" if root else ""
    wanted = None if extensions is None else frozenset(e.lower() for e in extensions)
    if part.recursive:
        files = _walk_files(fs, part.folder, key_stem=part.folder.rstrip("/") + "/")
    else:
        files = ((full, info) for full, info in _level(fs, part.folder) if info is not None)
    for full, info in files:
        if _keep(full[len(stem):], wanted):
            yield _source(fs, full, full[len(stem):], info)


def _subfolders(fs, folder: str) -> Iterator[str]:
    """The folders directly in ``folder`` (not hidden), in lexicographic order."""
    for full, info in _level(fs, folder):
        if info is None and not posixpath.basename(full).startswith("."):
            yield full


def _level(fs, folder: str) -> Iterator[tuple[str, dict | None]]:
    """One folder level, in lexicographic order: (path, info) of each file directly in
    ``folder``, and (path, None) of each folder in it. Paths without a trailing ``/``."""
    if is_s3(fs):
        bucket, _, prefix = folder.partition("/")
        request = {"Bucket": bucket, "Prefix": prefix.rstrip("/") + "/" if prefix else "", "Delimiter": "/",
                   "MaxKeys": S3_PAGE_SIZE}
        while True:
            page = fs.call_s3("list_objects_v2", fs.req_kw, **request)
            entries = [(f"{bucket}/{c['Prefix'].rstrip('/')}", None) for c in page.get("CommonPrefixes", ())]
            entries += [
                (f"{bucket}/{e['Key']}", {"size": e.get("Size"), "ETag": e.get("ETag"), "LastModified": e.get("LastModified")})
                for e in page.get("Contents", ())
                if not e["Key"].endswith("/")  # a folder marker object, not a file
            ]
            yield from sorted(entries, key=lambda entry: entry[0])
            if not page.get("IsTruncated"):
                return
            request["ContinuationToken"] = page["NextContinuationToken"]
    elif isinstance(fs, LocalFileSystem):
        base = (folder or "/").replace(os.sep, "/").rstrip("/") + "/"
        for name in _local_names(folder or "/"):
            if name.endswith("/"):
                yield base + name.rstrip("/"), None
            elif (info := _local_info(base + name)) is not None:
                yield base + name, info
    else:
        for name, info in _generic_entries(fs, folder):
            yield (name.rstrip("/"), None) if name.endswith("/") else (name, info)


# --------------------------------------------------------------------------------- manifests


def _iter_manifest(fs, manifest_path: str, options: StorageOptions, unique: bool = True) -> Iterator[SourceObject]:
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
                           mtime=_as_utc(mtime), listing_entry=number,
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


def describe_source(source: SourceObject, options: StorageOptions | None = None, **retry: Any) -> SourceObject:
    """``source`` with size, ETag and mtime filled from the store (for bare manifest entries).

    Raises FileNotFoundError / PermissionError like :func:`read_bytes`.
    """
    fs, path = open_filesystem(source.readable_uri, options)
    info = with_retries(lambda: fs.info(path), what=f"stat {source.uri}", **retry)
    fresh = _source(fs, path, source.image_id, info)
    return dataclasses.replace(source, size=fresh.size, etag=fresh.etag, mtime=fresh.mtime)




# --------------------------------------------------------------------------------- pre-flight


def check_input_reachable(
    input_uri: str,
    options: StorageOptions | None = None,
    *,
    extensions: Collection[str] | None = IMAGE_EXTENSIONS,
    timeout: float = 60.0,
) -> SourceObject:
    """Fail fast, with one clear line, when the input cannot be labelled; else its first object.

    Raises :class:`InputError` when the bucket, prefix or manifest does not exist, access is
    denied, the store does not answer within ``timeout`` seconds, or nothing (no image) is
    there. Requests use short connect timeouts and few retries, and the whole check is bounded
    by ``timeout``, so an unreachable endpoint never hangs the job.
    """
    options = options or StorageOptions()
    quick = dataclasses.replace(
        options,
        connect_timeout=min(options.connect_timeout, 5.0),
        read_timeout=min(options.read_timeout, max(timeout / 2, 1.0)),
        max_attempts=min(options.max_attempts, 2),
    )
    where = redact_uri(input_uri)
    endpoint = f" at {redact_uri(options.endpoint_url)}" if options.endpoint_url else ""
    result = _run_bounded(lambda: _first_source(input_uri, quick, extensions), timeout)
    if result is _TIMED_OUT:
        raise InputError(f"input {where} is unreachable: no answer from the store{endpoint} within {timeout:g} s")
    if isinstance(result, BaseException):
        raise InputError(f"input {where}{endpoint}: {_explain(result)}") from result
    first, is_manifest = result
    if first is None:
        if is_manifest:
            raise InputError(f"manifest {where} lists no entries")
        what = "no images (extensions: " + ", ".join(sorted(extensions)) + ")" if extensions else "no files"
        raise InputError(f"input {where} holds {what}: check the path or pattern")
    return first


_TIMED_OUT = object()


def _first_source(input_uri, options, extensions):
    fs, path = open_filesystem(input_uri, options)
    if _GLOB_CHARS.search(path):
        root, _ = _glob_root(path)
        if not is_s3(fs) and not fs.isdir(root):
            raise FileNotFoundError(f"{root} does not exist")
    else:
        if is_s3(fs):
            bucket = path.split("/", 1)[0]
            if not bucket:
                raise InputError("cannot list all of S3: name a bucket (s3://bucket/prefix)")
            # Distinguishes a missing bucket from an empty prefix (raises FileNotFoundError).
            fs.call_s3("head_bucket", Bucket=bucket)
        elif not fs.exists(path):
            raise FileNotFoundError(f"{input_uri} does not exist")
    is_manifest = _is_manifest(fs, path)
    return next(iter_sources(input_uri, options, extensions=extensions), None), is_manifest


def is_manifest_input(input_uri: str, options: StorageOptions | None = None) -> bool:
    """True when ``input_uri`` names a manifest (``.txt``/``.lst``/``.parquet``/``.pq`` file)."""
    fs, path = open_filesystem(input_uri, options)
    return _is_manifest(fs, path)


def manifest_entries_estimate(input_uri: str, options: StorageOptions | None = None) -> int:
    """About how many entries a manifest holds, without reading it: a Parquet manifest's row
    count from its footer, a text manifest's size over 32 bytes a line."""
    fs, path = open_filesystem(input_uri, options)
    if path.lower().endswith(PARQUET_MANIFEST_SUFFIXES):
        import pyarrow.parquet as pq

        with fs.open(path, "rb") as handle:
            return pq.ParquetFile(handle).metadata.num_rows
    return int(fs.size(path) or 0) // 32


def _is_manifest(fs, path: str) -> bool:
    return (not _GLOB_CHARS.search(path)
            and path.lower().endswith(TEXT_MANIFEST_SUFFIXES + PARQUET_MANIFEST_SUFFIXES)
            and fs.isfile(path))


def _run_bounded(call: Callable[[], Any], timeout: float) -> Any:
    # A daemon thread, so a hung request cannot keep the process alive after we give up on it.
    box: queue.Queue = queue.Queue(maxsize=1)

    def target() -> None:
        try:
            box.put(call())
        except Exception as exc:  # noqa: BLE001 (handed to the caller, raised there as an InputError)
            box.put(exc)

    threading.Thread(target=target, name="clipdiy-input-check", daemon=True).start()
    try:
        return box.get(timeout=timeout)
    except queue.Empty:
        return _TIMED_OUT




def _explain(exc: BaseException) -> str:
    if isinstance(exc, InputError):
        return str(exc)
    if isinstance(exc, FileNotFoundError):
        return "does not exist (no such bucket, folder, object or manifest)"
    if isinstance(exc, PermissionError):
        return "access denied (check the credentials in the environment or profile, or --anon for public buckets)"
    detail = str(exc).splitlines()[0] if str(exc) else ""
    if type(exc).__name__ == "NoCredentialsError":
        return "no credentials found (set AWS_* variables, a profile, a cloud role, or use anonymous access)"
    if is_transient(exc):
        return f"unreachable ({type(exc).__name__}: {detail})"
    return f"cannot be read ({type(exc).__name__}: {detail})"
