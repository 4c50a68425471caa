"""Listing an S3 prefix in parts (key ranges) on a moto server: every key exactly once, whatever
the layout: keys with empty path segments (``a//x.jpg``), a flat prefix of content-hash names,
a glob over it. The local filesystem cannot hold these layouts, hence S3."""

from __future__ import annotations

import bisect
import collections
import hashlib

import pytest

from clipdiy.pipeline.sources.key_ranges import KeyRange, ranges_between, split_boundaries
from clipdiy.pipeline.sources.listing import iter_sources
from clipdiy.pipeline.sources.listing_parts import ListingPart, iter_part_sources, listing_parts


def _put(s3_server, bucket: str, keys: list[str]) -> None:
    # One filesystem, concurrent puts: a few hundred keys in about a second.
    s3_server.filesystem().pipe({f"{bucket}/{key}": key.encode() for key in keys})


def _listed_by_parts(uri, options, **split) -> tuple[list[ListingPart], collections.Counter]:
    parts = list(listing_parts(uri, options, **split))
    return parts, collections.Counter(s.image_id for part in parts for s in iter_part_sources(uri, part, options))


def _assert_consecutive_ranges(parts: list[ListingPart]) -> None:
    """Disjoint and covering: each range starts where the one before ends, from -inf to +inf."""
    assert all(part.folder is None for part in parts)
    assert parts[0].start_after is None and parts[-1].end_at is None
    assert [p.end_at for p in parts[:-1]] == [p.start_after for p in parts[1:]]
    assert all(p.start_after < p.end_at for p in parts[1:-1])


EMPTY_SEGMENTS = ["photos/a//x.jpg", "photos/a/y.jpg", "photos/a///w.jpg", "photos//v.jpg", "photos/b/z.jpg",
                  "photos/b//c/u.jpg", "photos/c/\u00e9t\u00e9 x+y%20.jpg"]


@pytest.mark.parametrize("split", [{}, {"min_parts": 2, "split_min_keys": 1}, {"min_parts": 64, "split_min_keys": 1}])
def test_keys_with_empty_path_segments_are_listed_once_each(s3_server, s3_bucket, split):
    _put(s3_server, s3_bucket, EMPTY_SEGMENTS + ["photosx/not-below.jpg"])
    uri = f"s3://{s3_bucket}/photos"
    expected = collections.Counter(key.removeprefix("photos/") for key in EMPTY_SEGMENTS)
    parts, listed = _listed_by_parts(uri, s3_server.options, **split)
    assert listed == expected
    assert collections.Counter(s.image_id for s in iter_sources(uri, s3_server.options)) == expected
    if split:
        assert len(parts) > 1
        _assert_consecutive_ranges(parts)


def _hash_names(count: int) -> list[str]:
    return [hashlib.sha1(str(i).encode()).hexdigest() + ".jpg" for i in range(count)]


def test_a_flat_prefix_is_split_into_key_ranges_listing_each_key_once(s3_server, s3_bucket):
    names = _hash_names(120)
    _put(s3_server, s3_bucket, [f"images/{name}" for name in names] + ["images-other/x.jpg", "images/notes.txt"])
    for uri, expected_names in ((f"s3://{s3_bucket}/images", names), (f"s3://{s3_bucket}/images/*.jpg", names),
                                (f"s3://{s3_bucket}/images/a*.jpg", [n for n in names if n.startswith("a")])):
        parts = list(listing_parts(uri, s3_server.options, min_parts=8, split_min_keys=4))
        sizes = [collections.Counter(s.image_id for s in iter_part_sources(uri, part, s3_server.options)) for part in parts]
        assert sum(sizes, collections.Counter()) == collections.Counter(expected_names), uri
        _assert_consecutive_ranges(parts)
        # One folder, yet split, and no range holds more than a fraction of the names: for the
        # whole prefix, sixteen first characters, evenly drawn.
        many = len(expected_names) > 8 * 4
        assert len(parts) >= (8 if many else 2), uri
        assert max(sum(size.values()) for size in sizes) <= len(expected_names) // (3 if many else 1.5), uri


def test_a_prefix_with_few_keys_is_one_part(s3_server, s3_bucket):
    _put(s3_server, s3_bucket, [f"images/{name}" for name in _hash_names(20)])
    assert list(listing_parts(f"s3://{s3_bucket}/images", s3_server.options, min_parts=16, split_min_keys=20)) == [
        ListingPart()
    ]


class SortedKeys:
    """The store as a sorted list of keys, answering the split's two questions like S3 does."""

    def __init__(self, keys):
        self.keys = sorted(keys)

    def first_after(self, after):
        i = bisect.bisect_right(self.keys, after)
        return self.keys[i] if i < len(self.keys) else None

    def holds_more_than(self, node, count):
        i = bisect.bisect_left(self.keys, node)
        return sum(1 for key in self.keys[i : i + count + 1] if key.startswith(node)) > count


@pytest.mark.parametrize(
    "keys",
    [
        [f"img-{i:06d}.jpg" for i in range(500)],  # a long shared stem, then digits
        ["a", "a0", "a/", "b", "b\x00", "b0", "c"] * 1 + [f"a{c}{i}" for c in "/0ab" for i in range(40)],  # keys equal to nodes
        [f"{chr(0x4e00 + i % 50)}{chr(0x10000 + i)}{i}.png" for i in range(300)],  # beyond the BMP
    ],
)
def test_key_ranges_cover_every_key_once_for_any_names(keys):
    store = SortedKeys(keys)
    boundaries = split_boundaries(store, "", 16, min_keys=4)
    assert boundaries == sorted(set(boundaries)) and len(boundaries) >= 2
    ranges = ranges_between(boundaries)
    counts = collections.Counter(next(i for i, r in enumerate(ranges) if key in r) for key in keys)
    assert sum(counts.values()) == len(keys)
    # Each key is in exactly one range.
    assert all(sum(key in r for r in ranges) == 1 for key in keys)


def test_key_range_bounds():
    key_range = KeyRange("b", "d")
    assert ["a" in key_range, "b" in key_range, "b0" in key_range, "d" in key_range, "d0" in key_range] == [
        False, False, True, True, False
    ]
    assert key_range.past_end("d0") and not key_range.past_end("d")


def test_the_jobs_listing_tasks_get_the_key_ranges_and_list_each_key_once(s3_server, s3_bucket):
    """The Ray Data UDFs of the job's listing (split, then one part per task), called as the
    dataset calls them: the ranges travel as table columns."""
    import pyarrow as pa

    from clipdiy.locations import Location
    from clipdiy.pipeline.planning.pending import _list_parts, _split_listing

    names = _hash_names(60)
    _put(s3_server, s3_bucket, [f"flat/{name}" for name in names] + ["flat/a//b.jpg"])
    uri = f"s3://{s3_bucket}/flat"
    parts = pa.concat_tables(_split_listing(pa.table({"input": [uri]}), input_uri=Location(uri), storage=s3_server.options, min_parts=8,
                                            split_min_keys=4))
    assert parts.num_rows >= 8
    listed = collections.Counter(
        image_id
        for row in range(parts.num_rows)
        for block in _list_parts(parts.slice(row, 1), input_uri=Location(uri), storage=s3_server.options, block_rows=7, keyed=False)
        for image_id in block.column("image_id").to_pylist()
    )
    assert listed == collections.Counter(names + ["a//b.jpg"])
