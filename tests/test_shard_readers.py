"""Reading corpora where they lie (issue 24): the tar reader's samples and offsets against Python's
tarfile, hostile shards costing their rows only, img2dataset sidecars, Parquet of image bytes,
brace patterns, format detection, and the per-shard planning rules. No Ray here."""

from __future__ import annotations

import io
import string
import tarfile

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from shard_builders import (
    corrupt_row_group,
    data_offsets,
    hostile_shards,
    parquet_images,
    tar_bytes,
    write_img2dataset_shard,
)

from clipdiy.errors import InputError
from clipdiy.storage import StorageOptions
from clipdiy.pipeline.planning.incremental import (
    DONE,
    EARLIER_DONE_IDS,
    EARLIER_RUNS,
    RETRY,
    SKIP_IDS,
    SOURCE_KEY,
    earlier_sample_tags,
    shard_earlier_state,
    split_pending_shards,
)
from clipdiy.pipeline.sources.formats import brace_regex, detect_input_format, expand_braces, iter_shard_sources
from clipdiy.pipeline.sources.parquet_images import iter_parquet_samples
from clipdiy.pipeline.sources.webdataset import iter_shard_samples, read_sidecar
from clipdiy.pipeline.stages.decode import decode_image

KEYS = st.text(alphabet=string.ascii_lowercase + string.digits + "_-", min_size=1, max_size=12)
OTHER_EXTENSIONS = ("txt", "json", "cls", "seg.npy")
#: The preference the documentation promises (docs/job/corpora.md), written out here.
PREFERENCE = ["jpg", "jpeg", "png", "webp"]


@st.composite
def shards(draw):
    """A tar of unique-key samples, each with 0-3 members of the preferred image types or others,
    in random order, with names up to 150 characters (GNU long names / pax paths)."""
    keys = draw(st.lists(KEYS, min_size=1, max_size=6, unique=True))
    folder = draw(st.sampled_from(["", "sub/", "a" * 90 + "/"]))
    samples = []
    for key in keys:
        extensions = draw(st.lists(st.sampled_from(PREFERENCE + list(OTHER_EXTENSIONS)), max_size=3, unique=True))
        members = [(f"{folder}{key}.{ext}", draw(st.binary(min_size=0, max_size=700))) for ext in extensions]
        samples.append((folder + key, members))
    fmt = draw(st.sampled_from([tarfile.GNU_FORMAT, tarfile.PAX_FORMAT]))
    return samples, tar_bytes([m for _, members in samples for m in members], fmt)


@settings(max_examples=40)
@given(shards())
def test_every_sample_gets_one_row_with_the_offset_and_bytes_tarfile_finds(shard):
    samples, raw = shard
    reference = data_offsets(raw)
    rows = list(iter_shard_samples(io.BytesIO(raw), "s.tar"))
    members_by_key = {key: members for key, members in samples if members}
    assert [r.sample_key for r in rows] == list(members_by_key)
    for row in rows:
        members = dict(members_by_key[row.sample_key])
        images = [f"{row.sample_key}.{ext}" for ext in PREFERENCE if f"{row.sample_key}.{ext}" in members]
        assert row.image_id == f"s.tar/{row.sample_key}"
        if not images:
            assert row.error_kind == "not_image" and row.data is None
            continue
        chosen = images[0]
        assert (row.offset, row.length) == reference[chosen]
        assert row.data == members[chosen] == raw[row.offset: row.offset + row.length]


@settings(max_examples=40)
@given(shards(), st.floats(0.0, 1.0))
def test_a_tar_cut_anywhere_costs_only_the_samples_after_the_cut(shard, where):
    samples, raw = shard
    cut = int(len(raw) * where)
    reference = data_offsets(raw)
    rows = list(iter_shard_samples(io.BytesIO(raw[:cut]), "s.tar"))  # never raises
    ok = [r for r in rows if r.data is not None]
    for row in ok:
        assert row.offset + row.length <= cut and row.data == raw[row.offset: row.offset + row.length]
    # Every sample whose members all lie before the cut (headers included) keeps its image.
    for key, members in samples:
        images = [f"{key}.{e}" for e in PREFERENCE if f"{key}.{e}" in dict(members)]
        last_end = max((reference[n][0] + reference[n][1] for n, _ in members), default=0)
        if images and last_end + 512 <= cut and members:
            assert any(r.sample_key == key and r.data is not None for r in rows), key
    assert len({r.image_id for r in rows}) == len(rows)
    assert sum(r.error_kind in ("truncated", "corrupt") for r in rows) <= 1


def test_hostile_shards_each_cost_their_rows(tmp_path, coco_images):
    good = coco_images[0].read_bytes()
    big = coco_images[1].read_bytes()
    limit = (len(good) + len(big)) // 2 if len(big) > len(good) else None
    if limit is None:
        good, big = big, good
        limit = (len(good) + len(big)) // 2
    expected = hostile_shards(tmp_path, good, big)
    for name, wanted in expected.items():
        rows = list(iter_shard_samples(open(tmp_path / name, "rb"), name, max_image_bytes=limit,
                                       compressed_name=name.endswith(".gz")))
        kinds = {}
        for row in rows:
            kind = row.error_kind
            if kind is None:  # the decoder's verdict on the bytes read
                result = decode_image(row.data, mode="aspect", max_pixels=10**8, saliency_max_side=64)
                kind = result.error_kind
            kinds[row.image_id] = kind
        assert {i for i, k in kinds.items() if k is None} == {f"{name}/{k}" for k in wanted["ok"]}, name
        assert {i: k for i, k in kinds.items() if k is not None} == wanted["errors"], name


def test_skip_ids_are_neither_read_nor_yielded():
    raw = tar_bytes([("a.jpg", b"1"), ("b.jpg", b"2"), ("c.jpg", b"3")])
    rows = list(iter_shard_samples(io.BytesIO(raw), "s.tar", skip_ids={"s.tar/b"}))
    assert [r.image_id for r in rows] == ["s.tar/a", "s.tar/c"]


def test_img2dataset_sidecar_skips_failed_downloads_and_drops_credentials(tmp_path):
    import fsspec

    keys = write_img2dataset_shard(tmp_path, 3, [b"\xff\xd8\xff1", b"\xff\xd8\xff2"], failed=2)
    fs = fsspec.filesystem("file")
    sidecar = read_sidecar(fs, str(tmp_path / "00003.tar"))
    rows = list(iter_shard_samples(open(tmp_path / "00003.tar", "rb"), "00003.tar", sidecar=sidecar))
    assert [r.sample_key for r in rows] == keys
    for row in rows:
        assert row.origin_url == f"https://images.example.com/{row.sample_key}.jpg?w=1"
    # A failed download that has a member anyway is skipped too (the sidecar decides).
    raw = tar_bytes([("000030002.jpg", b"x"), ("000030000.jpg", b"y")])
    rows = list(iter_shard_samples(io.BytesIO(raw), "00003.tar", sidecar=sidecar))
    assert [r.sample_key for r in rows] == ["000030000"]


@pytest.mark.parametrize("struct", [True, False])
def test_parquet_rows_by_row_group_null_cells_and_a_corrupt_row_group(tmp_path, struct):
    images = [b"\xff\xd8\xffA", None, b"\xff\xd8\xffC", b"", b"\xff\xd8\xffE", b"\xff\xd8\xffF"]
    path = tmp_path / "train.parquet"
    parquet_images(path, images, struct=struct, row_group_size=2)
    with open(path, "rb") as handle:
        rows = list(iter_parquet_samples(handle, "train.parquet", image_column="image"))
    assert [(s.image_id, g, r) for s, g, r in rows] == [
        (f"train.parquet/{n}", n // 2, n % 2) for n in range(6)]
    assert [s.data for s, _, _ in rows] == [b"\xff\xd8\xffA", None, b"\xff\xd8\xffC", None, b"\xff\xd8\xffE", b"\xff\xd8\xffF"]
    assert [s.error_kind for s, _, _ in rows] == [None, "empty", None, "empty", None, None]

    corrupt_row_group(path, 1)
    with open(path, "rb") as handle:
        rows = list(iter_parquet_samples(handle, "train.parquet", image_column="image"))
    assert [s.error_kind for s, _, _ in rows] == [None, "empty", "corrupt", "corrupt", None, None]
    assert rows[4][0].data == b"\xff\xd8\xffE"


def test_parquet_id_column_and_a_wrong_image_column(tmp_path):
    path = tmp_path / "p.parquet"
    parquet_images(path, [b"1", b"2"], struct=True, ids=["cat-1", "dog-7"])
    with open(path, "rb") as handle:
        rows = list(iter_parquet_samples(handle, "p.parquet", image_column="image", id_column="id"))
    assert [(s.image_id, s.sample_key) for s, _, _ in rows] == [("p.parquet/cat-1", "cat-1"), ("p.parquet/dog-7", "dog-7")]
    with open(path, "rb") as handle:
        rows = list(iter_parquet_samples(handle, "p.parquet", image_column="img"))
    assert len(rows) == 1 and rows[0][0].error_kind == "unsupported" and "'img'" in rows[0][0].error


@settings(max_examples=30)
@given(st.integers(0, 500), st.integers(0, 30), st.integers(1, 6))
def test_brace_ranges_expand_and_match_like_the_webdataset_tools(start, span, width):
    end = start + span
    pattern = f"b/{{{start:0{width}d}..{end:0{width}d}}}.tar"
    names = list(expand_braces(pattern))
    assert names == [f"b/{n:0{width}d}.tar" for n in range(start, end + 1)]
    regex = brace_regex(pattern)
    assert all(regex.match(n) for n in names)
    assert not regex.match(f"b/{start:0{width}d}.tar.gz") and not regex.match("b/x.tar")


def test_brace_pattern_lists_the_present_shards_with_ids_relative_to_the_root(tmp_path):
    for n in (0, 1, 2, 12):
        (tmp_path / f"{n:05d}.tar").write_bytes(tar_bytes([("a.jpg", b"x")]))
    (tmp_path / "00001.parquet").write_bytes(b"")
    sources = list(iter_shard_sources(f"{tmp_path}/{{00000..00009}}.tar", "webdataset"))
    assert [s.image_id for s in sources] == ["00000.tar", "00001.tar", "00002.tar"]
    assert all(s.size and s.mtime for s in sources)


def test_format_detection_and_a_wrong_guess_is_one_clear_line(tmp_path):
    shards_dir = tmp_path / "i2d"
    shards_dir.mkdir()
    write_img2dataset_shard(shards_dir, 0, [b"1"])
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "a.jpg").write_bytes(b"x")
    parquet_images(tmp_path / "hf.parquet", [b"1"], struct=True)
    manifest = tmp_path / "list.parquet"
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"uri": [str(photos / "a.jpg")]}), manifest)
    assert detect_input_format(str(shards_dir)) == "webdataset"
    assert detect_input_format(f"{shards_dir}/{{00000..00009}}.tar") == "webdataset"
    assert detect_input_format(str(photos)) == "files"
    assert detect_input_format(str(tmp_path / "hf.parquet")) == "parquet"
    assert detect_input_format(str(manifest)) == "files"
    with pytest.raises(InputError) as refused:
        detect_input_format(str(photos), requested="webdataset")
    message = str(refused.value)
    assert "\n" not in message and "--input-format files" in message
    with pytest.raises(InputError, match="--input-format webdataset"):
        detect_input_format(str(shards_dir), requested="parquet")


def _shard_rows(uri, rows):
    """Label rows of one shard version: (image_id, status, error_kind)."""
    n = len(rows)
    return pa.table({
        "image_id": [r[0] for r in rows], "status": [r[1] for r in rows], "error_kind": [r[2] for r in rows],
        "source_size": pa.array([10] * n, pa.int64()), "source_etag": ["e"] * n,
        "source_mtime": pa.array([0] * n, pa.timestamp("us", tz="UTC")), "uri": [uri] * n, "source_uri": [uri] * n,
    })


def test_a_shard_is_done_when_every_sample_is_and_read_again_skipping_the_done_ones():
    cured = _shard_rows("s3://b/0.tar", [("0.tar/a", "ok", None), ("0.tar/b", "error", "unreadable"),
                                         ("0.tar/b", "ok", None)])  # b cured by a later run
    state = shard_earlier_state(earlier_sample_tags(cured, "transient"))
    assert state.column(EARLIER_RUNS).to_pylist() == [DONE]
    partial = _shard_rows("s3://b/1.tar", [("1.tar/a", "ok", None), ("1.tar/b", "error", "corrupt"),
                                           ("1.tar", "error", "unreadable")])  # stream failed after b
    state = shard_earlier_state(earlier_sample_tags(partial, "transient"))
    assert state.column(EARLIER_RUNS).to_pylist() == [RETRY]
    assert state.column(EARLIER_DONE_IDS).to_pylist() == [["1.tar/a", "1.tar/b"]]
    assert state.column(SOURCE_KEY)[0].as_py().startswith("s3://b/1.tar")
    joined = pa.table({
        "uri": ["s3://b/0.tar", "s3://b/1.tar", "s3://b/2.tar"], "image_id": ["0.tar", "1.tar", "2.tar"],
        "source_size": pa.array([10] * 3, pa.int64()), "source_etag": ["e"] * 3,
        "source_mtime": pa.array([0] * 3, pa.timestamp("us", tz="UTC")), "listing_entry": pa.nulls(3, pa.int64()),
        "signed_uri": pa.nulls(3, pa.string()),
        EARLIER_RUNS: pa.array([DONE, RETRY, None], pa.int8()),
        EARLIER_DONE_IDS: pa.array([["0.tar/a", "0.tar/b"], ["1.tar/a", "1.tar/b"], None], pa.list_(pa.string())),
        "attempt_ids": pa.array([None, None, ["2.tar/x"]], pa.list_(pa.string())),
    })
    pending, counts = split_pending_shards(joined)
    assert pending.column("image_id").to_pylist() == ["1.tar", "2.tar"]
    assert pending.column(SKIP_IDS).to_pylist() == [["1.tar/a", "1.tar/b"], ["2.tar/x"]]
    assert (counts.listed, counts.skipped, counts.retried) == (3, 1, 1)


def test_the_expanding_stage_streams_a_shard_in_bounded_blocks_and_a_missing_one_costs_one_row(tmp_path):
    from clipdiy.pipeline.sources.formats import iter_shard_sources
    from clipdiy.pipeline.planning.incremental import listing_table
    from clipdiy.pipeline.stages.expand import SAMPLE_SCHEMA, ExpandShards

    keys = write_img2dataset_shard(tmp_path, 0, [b"\xff\xd8\xff%d" % i for i in range(7)], failed=0)
    write_img2dataset_shard(tmp_path, 1, [b"\xff\xd8\xff"], failed=0)
    listing = listing_table(list(iter_shard_sources(str(tmp_path), "webdataset")))
    (tmp_path / "00001.tar").unlink()  # gone between the listing and the read
    listing = listing.append_column(SKIP_IDS, pa.array([[f"00000.tar/{keys[2]}"], []], pa.list_(pa.string())))
    blocks = list(ExpandShards(StorageOptions(), "webdataset", 3, None)(listing))
    assert all(b.schema == SAMPLE_SCHEMA and b.num_rows <= 3 for b in blocks)
    rows = pa.concat_tables(blocks).to_pylist()
    assert [r["image_id"] for r in rows] == [f"00000.tar/{k}" for k in keys if k != keys[2]] + ["00001.tar"]
    assert rows[-1]["preset_error_kind"] == "not_found" and rows[-1]["sample_key"] is None
    assert all(r["source_uri"] == r["uri"] and r["source_format"] == "webdataset" for r in rows)




def test_a_manifest_of_shard_uris_is_a_webdataset_input(tmp_path):
    (tmp_path / "s").mkdir()
    for n in (0, 1):
        write_img2dataset_shard(tmp_path / "s", n, [b"x"])
    manifest = tmp_path / "shards.txt"
    manifest.write_text("# two shards\ns/00001.tar\n" + f"file://{tmp_path}/s/00000.tar\n")
    assert detect_input_format(str(manifest)) == "webdataset"
    sources = list(iter_shard_sources(str(manifest), "webdataset"))
    assert [s.image_id for s in sources] == ["s/00001.tar", "s/00000.tar"]


_texts = st.none() | st.text(alphabet=string.ascii_letters + ":/?=&@.", max_size=40)


@settings(max_examples=40)
@given(samples=st.lists(st.tuples(st.text(min_size=1, max_size=8), _texts, st.none() | st.integers(0, 2**40),
                                  st.none() | st.binary(max_size=16), _texts, _texts,
                                  st.none() | st.integers(0, 9)), max_size=12),
       etag=st.none() | st.text(max_size=6), mtime=st.none() | st.integers(0, 2**40), parquet=st.booleans())
def test_a_block_gathered_by_columns_equals_the_rows_written_out_one_by_one(samples, etag, mtime, parquet):
    """The expanding stage's blocks are built column by column; the table is the one a dict per
    sample would make: the shard's columns repeated, errors redacted, nulls kept."""
    import datetime as dt

    from clipdiy.pipeline.sources.webdataset import ShardSample
    from clipdiy.pipeline.stages.expand import SAMPLE_SCHEMA, _SampleColumns
    from clipdiy.uris import redact_text

    when = None if mtime is None else dt.datetime.fromtimestamp(mtime / 1e6, dt.timezone.utc)
    shard = {"uri": "s3://b/x/00000.tar", "image_id": "00000.tar", "source_size": 99, "source_etag": etag,
             "source_mtime": when}
    block, expected = _SampleColumns(), []
    for key, url, offset, data, kind, error, group in samples:
        sample = ShardSample(f"00000.tar/{key}", key, offset, None if offset is None else 7, data, kind, error, url)
        extra = {"row_group": group, "row": None if group is None else 3} if parquet else {}
        block.add(sample, extra)
        expected.append({
            "uri": shard["uri"], "image_id": sample.image_id, "source_size": 99, "source_etag": etag,
            "source_mtime": when, "source_format": "parquet" if parquet else "webdataset", "source_uri": shard["uri"],
            "source_offset": offset, "source_length": sample.length, "source_row_group": extra.get("row_group"),
            "source_row": extra.get("row"), "sample_key": key, "origin_url": url, "image_bytes": data,
            "preset_error_kind": kind, "preset_error": redact_text(error)})
    table = block.table(shard, "parquet" if parquet else "webdataset")
    assert table.schema == SAMPLE_SCHEMA and block.rows == len(samples)
    assert table.equals(pa.Table.from_pylist(expected, schema=SAMPLE_SCHEMA))
