"""Splitting an object-store prefix into key ranges that several tasks list at once.

A listing by key range (``ListObjectsV2`` with ``StartAfter``, stopped at the range's last key)
does not care how keys are laid out: a flat prefix of content-hash names (``images/<sha>.jpg``),
a deep folder tree and keys with empty path segments (``a//x.jpg``) are all one sorted sequence
of strings. The ranges are consecutive intervals between sorted boundary strings, so whatever
the boundaries are, every key falls in exactly one range: the boundaries only decide how even
the ranges are, never which keys are listed.

Boundaries come from the leading characters of the keys: a breadth-first walk of the key trie
(the node ``images/3`` holds the keys that start with it) that asks the store only for single
keys (``MaxKeys=1`` after a given string: :meth:`KeyProbe.first_after`) and, before splitting a
node, whether it holds more than ``min_keys`` keys (one page with ``Prefix`` = the node). A node
with at most ``min_keys`` keys is not split; the walk stops once it has ``parts`` nodes, or after
``max_requests`` requests. For hex names, 64 parts cost about 90 requests, about 36 of them one
after another (nodes are split concurrently, see :func:`split_boundaries`). Each node's keys lie
between its own string and the next node's, which is what makes the ranges of even nodes about
even.
"""

from __future__ import annotations

import collections
import concurrent.futures
import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

#: A node holding at most this many keys (one ListObjectsV2 page, S3's most per request, so the
#: check is one request) is listed by one task. Each range's last request reads up to a page
#: past its end: splitting costs about a page per part, nothing beside 100M keys' 100,000 pages.
SPLIT_MIN_KEYS = 1000
#: Requests the split may make per part asked for (a bound for names with long shared stems).
REQUESTS_PER_PART = 16
#: Nodes split at once (each by a thread waiting on the store).
MAX_CONCURRENT_SPLITS = 16


@dataclass(frozen=True)
class KeyRange:
    """The keys ``k`` with ``start_after < k <= end_at`` (None: unbounded on that side).

    ``start_after`` is S3's exclusive ``StartAfter``; the listing stops after ``end_at``.
    """

    start_after: str | None = None
    end_at: str | None = None

    def __contains__(self, key: str) -> bool:
        return (self.start_after is None or key > self.start_after) and (self.end_at is None or key <= self.end_at)

    def past_end(self, key: str) -> bool:
        """True when ``key`` and every later key lie beyond this range."""
        return self.end_at is not None and key > self.end_at


def ranges_between(boundaries: list[str]) -> list[KeyRange]:
    """The consecutive ranges that ``boundaries`` (any strings) cut the key space into:
    ``(None, b0], (b0, b1], ..., (bn, None)``; disjoint and together covering every key."""
    cuts: list[str | None] = [None, *sorted(set(boundaries)), None]
    return [KeyRange(lo, hi) for lo, hi in zip(cuts[:-1], cuts[1:])]


class KeyProbe(Protocol):
    """The two questions the split asks the store, about keys below one prefix."""

    def first_after(self, after: str) -> str | None:
        """The smallest key greater than ``after``, or None."""

    def holds_more_than(self, node: str, count: int) -> bool:
        """Whether more than ``count`` keys start with ``node``."""


class S3KeyProbe:
    """:class:`KeyProbe` over ``ListObjectsV2`` for the keys of ``bucket`` that start with
    ``prefix``, counting its requests."""

    def __init__(self, fs, bucket: str, prefix: str):
        self.fs, self.bucket, self.prefix = fs, bucket, prefix
        self.requests = 0
        self._lock = threading.Lock()

    def _list(self, **request) -> dict:
        with self._lock:
            self.requests += 1
        return self.fs.call_s3("list_objects_v2", self.fs.req_kw, Bucket=self.bucket, **request)

    def first_after(self, after: str) -> str | None:
        contents = self._list(Prefix=self.prefix, StartAfter=after, MaxKeys=1).get("Contents", ())
        return contents[0]["Key"] if contents else None

    def holds_more_than(self, node: str, count: int) -> bool:
        # One page: exact up to S3's 1,000 keys a request (a larger count reads as 1,000).
        return bool(self._list(Prefix=node, MaxKeys=count).get("IsTruncated"))


def _next_char(char: str) -> str | None:
    """The character after ``char`` in code-point order (UTF-8 byte order), skipping surrogates."""
    code = ord(char) + 1
    if 0xD800 <= code <= 0xDFFF:
        code = 0xE000
    return chr(code) if code <= 0x10FFFF else None


class _Requests:
    """The requests a split may still make (shared by the threads that probe)."""

    def __init__(self, left: int):
        self.left = left
        self._lock = threading.Lock()

    def take(self) -> bool:
        with self._lock:
            self.left -= 1
            return self.left >= 0


def _children(probe: KeyProbe, node: str, requests: _Requests) -> list[str]:
    """``node`` + c for each character c that follows ``node`` in some key, in order: one
    request per child (skip to the first key after every key that starts with ``node`` + c).
    A key equal to the string skipped to hides that one character: harmless (balance only)."""
    children = []
    after = node
    while requests.take():
        key = probe.first_after(after)
        if key is None or not key.startswith(node):
            break
        child = key[: len(node) + 1]
        children.append(child)
        following = _next_char(child[-1])
        if following is None:
            break
        after = node + following
    return children


def _split(probe: KeyProbe, node: str, min_keys: int, requests: _Requests) -> list[str]:
    """The children of ``node``; empty when it is not split (few keys, or none after it)."""
    if not requests.take() or not probe.holds_more_than(node, min_keys):
        return []
    return _children(probe, node, requests)


def split_boundaries(
    probe: KeyProbe, root: str, parts: int, *, min_keys: int = SPLIT_MIN_KEYS, max_requests: int | None = None
) -> list[str]:
    """Up to about ``parts`` sorted boundary strings for the keys that start with ``root``
    (nodes of the key trie, see the module docstring); empty when ``root`` holds at most
    ``min_keys`` keys. Holds O(``parts``) strings.

    Nodes are split breadth first, in rounds: a round splits at once (threads: each node's
    requests wait on one another, different nodes' do not) as many nodes as should bring the
    count to ``parts`` at the fan-out seen so far, so the requests that wait on one another are
    about two nodes' worth, not one per split node."""
    requests = _Requests(max_requests if max_requests is not None else REQUESTS_PER_PART * max(parts, 1))
    done: list[str] = []  # nodes not split further: few keys, or a key with nothing after it
    queue = collections.deque([root])
    split_nodes = children_seen = 0
    with concurrent.futures.ThreadPoolExecutor(MAX_CONCURRENT_SPLITS) as pool:
        while queue and len(done) + len(queue) < parts and requests.left > 0:
            fan_out = children_seen / split_nodes if split_nodes else 1.0
            count = math.ceil((parts - len(done) - len(queue)) / max(fan_out - 1, 1.0))
            batch = [queue.popleft() for _ in range(min(len(queue), count, MAX_CONCURRENT_SPLITS))]
            for node, children in zip(batch, pool.map(lambda n: _split(probe, n, min_keys, requests), batch)):
                if children:
                    split_nodes, children_seen = split_nodes + 1, children_seen + len(children)
                    queue.extend(children)
                else:
                    done.append(node)
    nodes = sorted(done + list(queue))
    # The first node's own keys follow the smallest boundary: the range before it is empty.
    return nodes[1:] if len(nodes) > 1 else []


def split_ranges(probe: KeyProbe, root: str, parts: int, **options) -> Iterator[KeyRange]:
    """Disjoint key ranges that together cover every key (see :func:`split_boundaries`)."""
    yield from ranges_between(split_boundaries(probe, root, parts, **options))
