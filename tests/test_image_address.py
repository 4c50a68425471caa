"""Fetching an image back by its row's address (clipdiy.image_address): tar members and Parquet
cells built here with tarfile and pyarrow, read byte-identical on local files and on moto S3
with one ranged GET per image; hostile addresses refused with the image id named."""

from __future__ import annotations

import io
import json
import tarfile
import threading
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from clipdiy.image_address import ImageAddress, ImageFetcher, ImageFetchError

ROW_GROUP = 3  # rows per Parquet row group in these files


def jpeg(seed: int) -> bytes:
    """A small JPEG of its own size and content."""
    rng = np.random.default_rng(seed)
    height, width = 16 + 4 * (seed % 5), 20 + 3 * (seed % 7)
    pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def write_tar(path: Path, images: dict[str, bytes]) -> dict[str, tuple[int, int]]:
    """A WebDataset shard (KEY.jpg, KEY.txt, KEY.json per sample); returns each key's
    (data offset, length) of its .jpg member as tarfile reads them back (not our code)."""
    with tarfile.open(path, "w") as tar:
        for key, data in images.items():
            for name, payload in ((f"{key}.jpg", data), (f"{key}.txt", f"caption {key}".encode()),
                                  (f"{key}.json", json.dumps({"key": key}).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    with tarfile.open(path, "r") as tar:
        return {m.name[:-4]: (m.offset_data, m.size) for m in tar.getmembers() if m.name.endswith(".jpg")}


def write_parquet(path: Path, images: list[bytes], layout: str = "struct") -> None:
    """Hugging Face's layout (``image``: {bytes, path}) or a plain binary column, with an id and
    a caption column beside it, :data:`ROW_GROUP` rows a row group."""
    if layout == "struct":
        image = pa.array([{"bytes": b, "path": f"{i}.jpg"} for i, b in enumerate(images)],
                         type=pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    else:
        image = pa.array(images, type=pa.binary())
    table = pa.table({"id": pa.array(range(len(images)), pa.int64()), "image": image,
                      "caption": [f"caption {i}" for i in range(len(images))]})
    pq.write_table(table, path, row_group_size=ROW_GROUP)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("address-corpus")
    images = {f"{i:06d}": jpeg(i) for i in range(7)}
    ranges = write_tar(root / "00000.tar", images)
    write_parquet(root / "train-0.parquet", list(images.values()))
    write_parquet(root / "plain-0.parquet", list(images.values()), layout="binary")
    return {"root": root, "images": images, "ranges": ranges}


def tar_address(corpus, key: str, uri: str | None = None, **changes) -> ImageAddress:
    offset, length = corpus["ranges"][key]
    fields = {"image_id": f"00000.tar/{key}", "format": "webdataset", "uri": uri or str(corpus["root"] / "00000.tar"),
              "offset": offset, "length": length, "expected_size": (corpus["root"] / "00000.tar").stat().st_size}
    fields.update(changes)
    return ImageAddress(**fields)


def parquet_address(corpus, number: int, name: str = "train-0.parquet", uri: str | None = None, **changes) -> ImageAddress:
    fields = {"image_id": f"{name}/{number}", "format": "parquet", "uri": uri or str(corpus["root"] / name),
              "row_group": number // ROW_GROUP, "row": number % ROW_GROUP,
              "expected_size": (corpus["root"] / name).stat().st_size}
    fields.update(changes)
    return ImageAddress(**fields)


# ---------------------------------------------------------------- addresses from rows


def test_address_from_rows_of_each_format_and_v1_rows():
    v1 = ImageAddress.from_row({"image_id": "a.jpg", "uri": "s3://b/a.jpg", "source_size": 10, "source_etag": '"e"'})
    assert (v1.format, v1.uri, v1.expected_size, v1.expected_etag) == ("files", "s3://b/a.jpg", 10, "e")
    member = ImageAddress.from_row({"image_id": "s/0.tar/k", "uri": "s3://b/s/0.tar/k", "source_format": "webdataset",
                                    "source_uri": "s3://b/s/0.tar", "source_offset": 512, "source_length": 99,
                                    "source_size": 10240})
    assert (member.uri, member.offset, member.length, member.expected_size) == ("s3://b/s/0.tar", 512, 99, 10240)
    cell = ImageAddress.from_row({"image_id": "p/0", "uri": "x", "source_format": "parquet", "source_uri": "s3://b/p.parquet",
                                  "source_row_group": 2, "source_row": 5})
    assert (cell.uri, cell.row_group, cell.row) == ("s3://b/p.parquet", 2, 5)


@pytest.mark.parametrize("row, reason", [
    ({"image_id": "k", "source_format": "webdataset", "source_uri": "/s.tar", "source_length": 3}, "no_address"),
    ({"image_id": "k", "source_format": "parquet", "source_uri": "/p.parquet", "source_row": 3}, "no_address"),
    ({"image_id": "k", "source_format": "webdataset", "source_offset": 0, "source_length": 3}, "no_address"),
    ({"image_id": "k", "source_format": "zip", "source_uri": "/s.zip"}, "no_address"),
    ({"image_id": "k", "source_format": "webdataset", "source_uri": "/s.tar", "source_offset": -1, "source_length": 3},
     "beyond_file"),
])
def test_incomplete_addresses_are_refused_naming_the_image(row, reason):
    with pytest.raises(ImageFetchError) as caught:
        ImageAddress.from_row(row)
    assert caught.value.reason == reason and "'k'" in str(caught.value)


# ---------------------------------------------------------------- local files


def test_tar_members_and_parquet_cells_read_back_byte_identical(corpus):
    fetcher = ImageFetcher()
    for number, (key, data) in enumerate(corpus["images"].items()):
        assert fetcher.fetch(tar_address(corpus, key)) == data
        assert fetcher.fetch(parquet_address(corpus, number)) == data
        assert fetcher.fetch(parquet_address(corpus, number, "plain-0.parquet")) == data


@settings(max_examples=60)
@given(offset=st.integers(0, 12000), length=st.integers(0, 3000))
def test_any_range_of_a_shard_is_its_bytes_or_a_beyond_file_error(corpus, offset, length):
    """Neighbours of the shard's end: a range inside reads exactly those bytes (sliced here), one
    that ends past it is refused naming the image, whether or not the row knows the shard's size."""
    shard = corpus["root"] / "00000.tar"
    content = shard.read_bytes()
    for expected_size in (len(content), None):
        address = tar_address(corpus, "000000", offset=offset, length=length, expected_size=expected_size)
        if offset + length <= len(content):
            assert ImageFetcher().fetch(address) == content[offset:offset + length]
        else:
            with pytest.raises(ImageFetchError) as caught:
                ImageFetcher().fetch(address)
            assert caught.value.reason == "beyond_file" and "'00000.tar/000000'" in str(caught.value)


def test_a_member_over_the_bound_is_refused_unread(corpus, monkeypatch):
    address = tar_address(corpus, "000003")
    reads = []
    monkeypatch.setattr("clipdiy.image_address._local_range", lambda *a: reads.append(a))
    with pytest.raises(ImageFetchError) as caught:
        ImageFetcher(max_bytes=address.length - 1).fetch(address)
    assert caught.value.reason == "too_large" and "00000.tar/000003" in str(caught.value) and not reads


def test_a_parquet_row_group_over_the_bound_is_refused(corpus):
    with pytest.raises(ImageFetchError) as caught:
        ImageFetcher(max_bytes=100).fetch(parquet_address(corpus, 4))
    assert caught.value.reason == "too_large" and "train-0.parquet/4" in str(caught.value)


def test_cells_past_the_file_are_refused(corpus):
    for changes in ({"row_group": 3}, {"row_group": 2, "row": 1}):  # 7 rows: groups of 3, 3, 1
        with pytest.raises(ImageFetchError) as caught:
            ImageFetcher().fetch(parquet_address(corpus, 0, **changes))
        assert caught.value.reason == "beyond_file" and "train-0.parquet/0" in str(caught.value)


def test_a_shard_changed_since_labelling_is_refused(corpus, tmp_path):
    grown = tmp_path / "00000.tar"
    grown.write_bytes((corpus["root"] / "00000.tar").read_bytes() + b"\0" * 512)
    for address in (tar_address(corpus, "000001", uri=str(grown)),):
        with pytest.raises(ImageFetchError) as caught:
            ImageFetcher().fetch(address)
        assert caught.value.reason == "changed" and "00000.tar/000001" in str(caught.value)
    rewritten = tmp_path / "train-0.parquet"
    write_parquet(rewritten, list(corpus["images"].values())[:5])
    with pytest.raises(ImageFetchError) as caught:
        ImageFetcher().fetch(parquet_address(corpus, 1, uri=str(rewritten)))
    assert caught.value.reason == "changed" and "train-0.parquet/1" in str(caught.value)


def test_a_parquet_file_without_one_image_column_is_refused(tmp_path):
    path = tmp_path / "two.parquet"
    pq.write_table(pa.table({"a": pa.array([b"x"]), "b": pa.array([b"y"]), "c": ["text"]}), path)
    with pytest.raises(ImageFetchError) as caught:
        ImageFetcher().fetch(ImageAddress("two/0", "parquet", str(path), row_group=0, row=0))
    assert caught.value.reason == "not_image_column" and "'two/0'" in str(caught.value)
    pq.write_table(pa.table({"thumb": pa.array([b"x"]), "image": pa.array([b"y"])}), path)
    assert ImageFetcher().fetch(ImageAddress("two/0", "parquet", str(path), row_group=0, row=0)) == b"y"


def test_other_fsspec_stores_read_by_address(corpus, tmp_path):
    """A store that is neither S3 nor local (fsspec's memory store): its own ranged reads; a
    Parquet file longer than the footer's first tail read too."""
    import fsspec

    memory = fsspec.filesystem("memory")
    big = [jpeg(1000 + i) for i in range(120)]
    write_parquet(tmp_path / "big.parquet", big)
    assert (tmp_path / "big.parquet").stat().st_size > 2 * 64 * 1024
    for path in (corpus["root"] / "00000.tar", corpus["root"] / "train-0.parquet", tmp_path / "big.parquet"):
        memory.pipe_file(f"/address-test/{path.name}", path.read_bytes())
    fetcher = ImageFetcher()
    for number, (key, data) in enumerate(corpus["images"].items()):
        assert fetcher.fetch(tar_address(corpus, key, uri="memory://address-test/00000.tar")) == data
        assert fetcher.fetch(parquet_address(corpus, number, uri="memory://address-test/train-0.parquet")) == data
    for number in (0, 59, 119):
        address = ImageAddress(f"big/{number}", "parquet", "memory://address-test/big.parquet",
                               row_group=number // ROW_GROUP, row=number % ROW_GROUP)
        assert fetcher.fetch(address) == big[number]


def test_a_loose_object_is_read_whole_within_the_bound(tmp_path):
    path = tmp_path / "a.jpg"
    path.write_bytes(b"12345")
    assert ImageFetcher(max_bytes=5).fetch(str(path)) == b"12345"
    with pytest.raises(ImageFetchError) as caught:
        ImageFetcher(max_bytes=4).fetch({"image_id": "a.jpg", "uri": str(path)})
    assert caught.value.reason == "too_large" and "'a.jpg'" in str(caught.value)


# ---------------------------------------------------------------- moto S3, requests counted


@contextmanager
def counted_requests():
    """Every HTTP request the in-process moto server answers: (method, path, Range header)."""
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication

    seen: list[tuple[str, str, str | None]] = []
    lock = threading.Lock()
    original = DomainDispatcherApplication.__call__

    def counting(app, environ, start_response):
        with lock:
            seen.append((environ["REQUEST_METHOD"], environ.get("PATH_INFO", ""), environ.get("HTTP_RANGE")))
        return original(app, environ, start_response)

    DomainDispatcherApplication.__call__ = counting
    try:
        yield seen
    finally:
        DomainDispatcherApplication.__call__ = original


@pytest.fixture(scope="module")
def s3_corpus(corpus, s3_server):
    bucket = s3_server.make_bucket()
    for name in ("00000.tar", "train-0.parquet", "plain-0.parquet"):
        s3_server.put_bytes(bucket, f"shards/{name}", (corpus["root"] / name).read_bytes())
    return f"s3://{bucket}/shards"


def test_s3_tar_members_one_ranged_get_each(corpus, s3_corpus, s3_server):
    fetcher = ImageFetcher(s3_server.options)
    fetcher.fetch(tar_address(corpus, "000000", uri=f"{s3_corpus}/00000.tar"))  # the client's first call is not counted
    with counted_requests() as seen:
        for key, data in corpus["images"].items():
            assert fetcher.fetch(tar_address(corpus, key, uri=f"{s3_corpus}/00000.tar")) == data
    offset_ranges = [f"bytes={o}-{o + n - 1}" for o, n in corpus["ranges"].values()]
    assert [(m, r) for m, _, r in seen] == [("GET", r) for r in offset_ranges]


def test_s3_parquet_cells_one_ranged_get_each_after_the_footer(corpus, s3_corpus, s3_server):
    fetcher = ImageFetcher(s3_server.options)
    fetcher.fetch(tar_address(corpus, "000000", uri=f"{s3_corpus}/00000.tar"))  # client started
    with counted_requests() as seen:
        for number, data in enumerate(corpus["images"].values()):
            assert fetcher.fetch(parquet_address(corpus, number, uri=f"{s3_corpus}/train-0.parquet")) == data
    assert all(method == "GET" and ranged for method, _, ranged in seen)
    assert len(seen) == 1 + len(corpus["images"])  # the footer once, then one row group's column each


def test_s3_hostile_addresses_name_the_image_and_no_credential(corpus, s3_corpus, s3_server):
    from s3_server import DUMMY_KEY_ID, DUMMY_SECRET

    size = (corpus["root"] / "00000.tar").stat().st_size
    uri = f"{s3_corpus}/00000.tar"
    cases = [
        (tar_address(corpus, "000002", uri=uri, offset=size + 10, expected_size=None), "beyond_file"),
        (tar_address(corpus, "000002", uri=uri, offset=size - 5, expected_size=None), "beyond_file"),
        (tar_address(corpus, "000002", uri=uri, expected_size=size + 1), "changed"),
        (tar_address(corpus, "000002", uri=uri, expected_etag="not-the-etag"), "changed"),
        (tar_address(corpus, "000002", uri=uri, length=10**9), "too_large"),
    ]
    fetcher = ImageFetcher(s3_server.options, max_bytes=10**6)
    for address, reason in cases:
        with pytest.raises(ImageFetchError) as caught:
            fetcher.fetch(address)
        message = str(caught.value)
        assert caught.value.reason == reason and "'00000.tar/000002'" in message
        assert DUMMY_SECRET not in message and DUMMY_KEY_ID not in message
