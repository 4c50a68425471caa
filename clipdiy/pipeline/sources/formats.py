"""Input formats (``--input-format files|webdataset|parquet``): detection, brace patterns, and
the listing of shard inputs (tar shards, Parquet files), one listing row per shard or file.

- ``files``: loose image objects (:mod:`clipdiy.pipeline.sources.listing`), one row each.
- ``webdataset``: ``.tar`` shards: a prefix, a glob, a manifest of shard URIs, or a brace
  pattern as the WebDataset tools write it (``s3://b/laion/{00000..09999}.tar``, also
  ``{a,b,c}``). An img2dataset output folder is a prefix of this kind (its ``.parquet``
  sidecars and ``_stats.json`` files are not shards).
- ``parquet``: Parquet files whose ``--image-column`` holds the image bytes.

A shard's listing row is a :class:`~clipdiy.pipeline.sources.objects.SourceObject` like a
loose image's: its id (path relative to the input root) and version (size, ETag, mtime) are
what the planning compares; its samples are read by :mod:`clipdiy.pipeline.stages.expand`.
"""

from __future__ import annotations

import itertools
import posixpath
import re
from collections.abc import Iterator

from clipdiy.errors import InputError
from clipdiy.locations import Location, as_location
from clipdiy.pipeline.sources.listing import IMAGE_EXTENSIONS, iter_sources
from clipdiy.pipeline.sources.manifests import is_manifest
from clipdiy.pipeline.sources.objects import GLOB_CHARS, SourceObject, source_object
from clipdiy.storage import StorageOptions, open_filesystem

INPUT_FORMATS = ("files", "webdataset", "parquet")
#: Names of tar shards (lower case); compressed ones are listed, and refused with one row each.
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar.zst")
PARQUET_SUFFIXES = (".parquet", ".pq")
_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(\d+)\.\.(\d+)$")
#: Objects of a prefix looked at to detect its format.
DETECT_SAMPLE = 200


def has_braces(uri: str) -> bool:
    return any(_RANGE.match(m.group(1)) or "," in m.group(1) for m in _BRACE.finditer(uri))


def _alternatives(body: str) -> list[str]:
    match = _RANGE.match(body)
    if match:
        start, end = match.group(1), match.group(2)
        width = len(start) if start.startswith("0") or len(start) == len(end) else 0
        return [str(n).zfill(width) for n in range(int(start), int(end) + 1)]
    return body.split(",")


def brace_regex(pattern: str) -> re.Pattern:
    """A regex matching the paths a brace pattern names (ranges as ``\\d+`` of the same width)."""
    out, last = [], 0
    for match in _BRACE.finditer(pattern):
        out.append(re.escape(pattern[last: match.start()]))
        body = match.group(1)
        range_match = _RANGE.match(body)
        if range_match:
            out.append(r"(\d+)")
        else:
            out.append("(" + "|".join(re.escape(a) for a in body.split(",")) + ")")
        last = match.end()
    out.append(re.escape(pattern[last:]))
    return re.compile("".join(out) + "$")


def expand_braces(pattern: str) -> Iterator[str]:
    """Every path a brace pattern names, in order (``{00000..00002}`` -> 00000, 00001, 00002)."""
    pieces, last = [], 0
    for match in _BRACE.finditer(pattern):
        pieces.append([pattern[last: match.start()]])
        pieces.append(_alternatives(match.group(1)))
        last = match.end()
    pieces.append([pattern[last:]])
    for combination in itertools.product(*pieces):
        yield "".join(combination)


def _glob_of(pattern: str) -> str:
    return _BRACE.sub("*", pattern)


def is_shard_name(name: str, input_format: str) -> bool:
    lower = name.lower()
    return lower.endswith(TAR_SUFFIXES if input_format == "webdataset" else PARQUET_SUFFIXES)


def iter_shard_sources(input_uri: str | Location, input_format: str, options: StorageOptions | None = None) -> Iterator[SourceObject]:
    """The shards (tars) or Parquet files of ``input_uri``, one listing row each, in listing order.

    A brace pattern is listed as the glob it spans (one listing of the folder, no request per
    named shard) and filtered to the names it expands to; a named shard that is absent is no row
    (a range written wider than the shards present is common)."""
    input_uri = as_location(input_uri)
    if has_braces(input_uri.public):
        fs, path = open_filesystem(input_uri, options)
        matcher = brace_regex(path)
        wanted = set(expand_braces(path)) if _count_expansions(path) <= 1_000_000 else None
        for source in iter_sources(Location(_glob_of(input_uri.reveal_for_read())), options, extensions=None):
            source_path = fs._strip_protocol(source.uri)
            if matcher.match(source_path) and (wanted is None or source_path in wanted):
                yield source
        return
    fs, path = open_filesystem(input_uri, options)
    if input_format == "parquet" and path.lower().endswith(PARQUET_SUFFIXES) and not GLOB_CHARS.search(path):
        # One Parquet file of images (iter_sources would take it for a manifest of URIs).
        yield source_object(fs, path, posixpath.basename(path), fs.info(path))
        return
    for source in iter_sources(input_uri, options, extensions=None):
        if source.listing_entry is not None or is_shard_name(source.uri.split("?", 1)[0], input_format):
            yield source


def _count_expansions(pattern: str) -> int:
    total = 1
    for match in _BRACE.finditer(pattern):
        total *= len(_alternatives(match.group(1))) if not _RANGE.match(match.group(1)) else (
            int(_RANGE.match(match.group(1)).group(2)) - int(_RANGE.match(match.group(1)).group(1)) + 1)
    return total


def _kind_of(name: str) -> str | None:
    lower = name.lower().split("?", 1)[0]
    if lower.endswith(TAR_SUFFIXES):
        return "webdataset"
    if lower.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if posixpath.splitext(lower)[1] in IMAGE_EXTENSIONS:
        return "files"
    return None


def detect_input_format(input_uri: str | Location, options: StorageOptions | None = None, requested: str | None = None) -> str:
    """The input's format: ``requested`` when given (checked), else guessed from the input's
    name, or from the names of its first objects (a prefix or manifest). Raises
    :class:`InputError` in one line when the input holds nothing of the requested format."""
    if requested is not None and requested not in INPUT_FORMATS:
        raise InputError(f"--input-format must be one of {', '.join(INPUT_FORMATS)}, got {requested!r}")
    where = as_location(input_uri)
    guess = _guess(where, options)
    if requested is None:
        return guess or "files"
    if guess is not None and guess != requested:
        found = {"files": "image files", "webdataset": ".tar shards", "parquet": "Parquet files"}[guess]
        raise InputError(f"input {where} holds {found}, not {requested} input: "
                         f"use --input-format {guess}, or point --input at the {requested} data")
    return requested


def _guess(input_uri: Location, options: StorageOptions | None) -> str | None:
    if has_braces(input_uri.public):
        return _kind_of(input_uri.public) or "webdataset"
    fs, path = open_filesystem(input_uri, options)
    own = _kind_of(path)
    if own == "parquet" and not GLOB_CHARS.search(path):
        return "files" if is_manifest(fs, path) and _is_uri_manifest(fs, path) else "parquet"
    if own is not None:
        return own
    counts: dict[str, int] = {}
    for source in itertools.islice(iter_sources(input_uri, options, extensions=None), DETECT_SAMPLE):
        kind = _kind_of(source.uri)
        if kind is not None:
            counts[kind] = counts.get(kind, 0) + 1
    if not counts:
        return None
    # Loose images win over shards; an img2dataset folder's .parquet sidecars lose to its tars.
    for kind in ("files", "webdataset", "parquet"):
        if counts.get(kind):
            return kind
    return None


def _is_uri_manifest(fs, path: str) -> bool:
    """A ``.parquet`` input with a ``uri`` column is a manifest of loose objects."""
    import pyarrow.parquet as pq

    try:
        with fs.open(path, "rb") as handle:
            return "uri" in pq.ParquetFile(handle).schema_arrow.names
    except FileNotFoundError:
        return True  # the pre-flight check names the missing file
