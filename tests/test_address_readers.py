"""The readers of labels fetch each image by its row's address: label rows pointing into a tar
shard and a Parquet file (built here) give the feed, previews, the report's thumbnails and the
Label Studio export the very images, by one ranged read each (counted on moto); a stale address
costs that image only, named."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pytest
from labels_fixtures import LabelItem, write_labels_output
from PIL import Image
from test_image_address import (
    ROW_GROUP,
    counted_requests,
    jpeg,
    write_parquet,
    write_tar,
)

from clipdiy.labels.feed import (
    LabelDataset,
    LabelIterableDataset,
    export_coco,
    export_voc_masks,
)
from clipdiy.labels.preview import PreviewConfig, render_output
from clipdiy.labels.report import ReportConfig, collect, render_html
from clipdiy.labels.review import export_tasks

COUNT = 6


def decoded(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def label_map(data: bytes, seed: int) -> np.ndarray:
    height, width = decoded(data).shape[:2]
    label = np.zeros((height, width), np.int64)
    label[: height // 2, : width // 2] = 8 + seed % 3
    return label


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict:
    """Six images in a tar shard and the same six in a Hugging Face-layout Parquet file."""
    root = tmp_path_factory.mktemp("readers")
    images = {f"k{i:04d}": jpeg(100 + i) for i in range(COUNT)}
    ranges = write_tar(root / "00000.tar", images)
    write_parquet(root / "train.parquet", list(images.values()))
    return {"root": root, "images": images, "ranges": ranges}


def write_output(output: str, sources: dict, shard_uri: str, parquet_uri: str, **options) -> dict[str, bytes]:
    """A labels output with one row per image per source, each row carrying its address; the
    rows' ``uri`` names no object (only the address can find the bytes). Returns the expected
    bytes by image id."""
    items, columns, expected = [], {}, {}
    tar_size = (sources["root"] / "00000.tar").stat().st_size
    parquet_size = (sources["root"] / "train.parquet").stat().st_size
    for number, (key, data) in enumerate(sources["images"].items()):
        offset, length = sources["ranges"][key]
        for image_id, address in (
            (f"shards/00000.tar/{key}", {"source_format": "webdataset", "source_uri": shard_uri, "source_offset": offset,
                                         "source_length": length, "source_size": tar_size}),
            (f"hf/train.parquet/{number}", {"source_format": "parquet", "source_uri": parquet_uri,
                                            "source_row_group": number // ROW_GROUP, "source_row": number % ROW_GROUP,
                                            "source_size": parquet_size}),
        ):
            items.append(LabelItem(image_id, f"{shard_uri}-nothing-here/{image_id}", label_map(data, number)))
            columns[image_id] = address
            expected[image_id] = data
    write_labels_output(output, items, columns=columns, **options)
    return expected


def test_feed_yields_the_addressed_images(sources, tmp_path):
    output = str(tmp_path / "labels")
    expected = write_output(output, sources, str(sources["root"] / "00000.tar"), str(sources["root"] / "train.parquet"))
    dataset = LabelDataset(output)
    assert len(dataset) == len(expected)
    for index in range(len(dataset)):
        image, _ = dataset[index]
        want = decoded(expected[dataset.records[index]["image_id"]])
        assert image.shape == want.shape and np.array_equal(image, want)
    streamed = sorted(image.tobytes() for image, _ in LabelIterableDataset(output))  # in shard order
    assert streamed == sorted(decoded(data).tobytes() for data in expected.values())


def test_preview_and_report_thumbnails_fetch_by_address(sources, tmp_path):
    output = str(tmp_path / "labels")
    write_output(output, sources, str(sources["root"] / "00000.tar"), str(sources["root"] / "train.parquet"))
    summary = render_output(output, str(tmp_path / "preview"), PreviewConfig(size=64, tile=32))
    assert (summary["pictures"], summary["errors"]) == (2 * COUNT, 0)
    page = render_html(collect(output, ReportConfig(lowest=4, thumbnail_size=48)))
    assert len(re.findall(r'<div class="low" data-image-id="[^"]+"><img ', page)) == 4
    assert "source image unreadable now" not in page


def test_label_studio_export_writes_the_addressed_images(sources, tmp_path):
    output = str(tmp_path / "labels")
    expected = write_output(output, sources, str(sources["root"] / "00000.tar"), str(sources["root"] / "train.parquet"))
    summary = export_tasks(output, str(tmp_path / "tasks.json"), str(tmp_path / "tasks.xml"), count=2 * COUNT)
    assert summary["images_written"] == 2 * COUNT
    import json

    for task in json.loads((tmp_path / "tasks.json").read_text()):
        path = Path(task["data"]["image"])
        assert path == tmp_path / "tasks_images" / (task["data"]["image_id"] + ".jpg")
        assert path.read_bytes() == expected[task["data"]["image_id"]]


def test_coco_and_voc_exports_copy_the_addressed_images(sources, tmp_path):
    import json

    output = str(tmp_path / "labels")
    expected = write_output(output, sources, str(sources["root"] / "00000.tar"), str(sources["root"] / "train.parquet"))
    counts = export_coco(output, str(tmp_path / "coco.json"), images_to=str(tmp_path / "images"))
    document = json.loads((tmp_path / "coco.json").read_text())
    assert counts["images"] == len(expected) == len(document["images"])
    for entry in document["images"]:
        image_id = entry["file_name"].removesuffix(".jpg")
        assert (tmp_path / "images" / entry["file_name"]).read_bytes() == expected[image_id]
    export_voc_masks(output, str(tmp_path / "voc" / "SegmentationClass"), images_to=str(tmp_path / "voc" / "JPEGImages"))
    for image_id, data in expected.items():
        assert (tmp_path / "voc" / "JPEGImages" / f"{image_id}.jpg").read_bytes() == data
        assert (tmp_path / "voc" / "SegmentationClass" / f"{image_id}.png").is_file()


def test_a_changed_shard_costs_its_images_only(sources, tmp_path):
    shard = tmp_path / "00000.tar"
    shard.write_bytes((sources["root"] / "00000.tar").read_bytes())
    output = str(tmp_path / "labels")
    write_output(output, sources, str(shard), str(sources["root"] / "train.parquet"))
    shard.write_bytes(shard.read_bytes() + b"\0" * 10240)  # the shard grew after labelling
    summary = render_output(output, str(tmp_path / "preview"), PreviewConfig(size=64, tile=32))
    assert summary["pictures"] == COUNT  # the Parquet file's images
    failed = [e for e in summary["entries"] if e["error"]]
    assert sorted(e["image_id"] for e in failed) == sorted(f"shards/00000.tar/{k}" for k in sources["images"])
    assert all(f"'{e['image_id']}'" in e["error"] and "changed since it was labelled" in e["error"] for e in failed)
    dataset = LabelDataset(output)
    with pytest.raises(ValueError, match="shards/00000.tar/k0000"):
        [dataset[i] for i in range(len(dataset))]


def test_on_s3_the_feed_reads_one_ranged_get_per_image(sources, tmp_path, s3_server, s3_bucket):
    for name in ("00000.tar", "train.parquet"):
        s3_server.put_bytes(s3_bucket, f"corpus/{name}", (sources["root"] / name).read_bytes())
    output = str(tmp_path / "labels")
    expected = write_output(output, sources, f"s3://{s3_bucket}/corpus/00000.tar", f"s3://{s3_bucket}/corpus/train.parquet")
    dataset = LabelDataset(output, storage=s3_server.options)
    ids = [dataset.records[i]["image_id"] for i in range(len(dataset))]
    with counted_requests() as seen:
        images = [dataset[i][0] for i in range(len(dataset))]
    assert all(np.array_equal(image, decoded(expected[image_id])) for image, image_id in zip(images, ids))
    assert all(method == "GET" and ranged for method, _, ranged in seen)
    members = [r for _, path, r in seen if path.endswith("00000.tar")]
    cells = [r for _, path, r in seen if path.endswith("train.parquet")]
    assert len(members) == COUNT  # one ranged GET per tar member: its exact bytes
    assert sorted(members) == sorted(f"bytes={o}-{o + n - 1}" for o, n in sources["ranges"].values())
    assert len(cells) <= COUNT + 1  # the footer once (if this process has not read it yet), one read per cell
    assert len(seen) == len(members) + len(cells)

    # The Label Studio export: a copy of each image, by one ranged GET of its member or cell.
    with counted_requests() as seen:
        export_tasks(output, str(tmp_path / "tasks.json"), str(tmp_path / "tasks.xml"), count=2 * COUNT,
                     storage=s3_server.options)
    assert sorted(r for _, path, r in seen if path.endswith("00000.tar")) == sorted(members)
    assert len([r for _, path, r in seen if path.endswith("train.parquet")]) == COUNT  # the footer is kept
    for image_id, data in expected.items():
        assert (tmp_path / "tasks_images" / f"{image_id}.jpg").read_bytes() == data


def test_ray_feed_functions_carry_the_address(sources, tmp_path):
    """What ``read_labels`` runs in its Ray tasks (shard reader, then pairing), called here
    without Ray: the address columns travel from the shard to the image read."""
    import pyarrow as pa
    from labels_fixtures import VOC_NAMES

    from clipdiy.image_address import ADDRESS_COLUMNS
    from clipdiy.labels.feed import FEED_COLUMNS, FeedFilter, _PairBatch, _Selector
    from clipdiy.labels.runs import list_runs
    from clipdiy.labels.store import _ReadWinners

    output = str(tmp_path / "labels")
    expected = write_output(output, sources, str(sources["root"] / "00000.tar"), str(sources["root"] / "train.parquet"))
    (run,) = list_runs(output)
    tasks = pa.Table.from_pylist([{"fs": 0, "path": shard, "losers": []} for shard in run.shards])
    table = _ReadWinners([run.fs], FEED_COLUMNS, ADDRESS_COLUMNS)(tasks)
    pairs = _PairBatch(_Selector(VOC_NAMES, FeedFilter()), None)(table)
    assert sorted(pairs["image_id"]) == sorted(expected)
    for image_id, image in zip(pairs["image_id"], pairs["image"]):
        assert np.array_equal(image, decoded(expected[image_id]))


@pytest.mark.parametrize("form", ["webdataset", "parquet"])
def test_the_jobs_shard_rows_fetch_back_their_own_bytes(sources, form):
    """The contract between the job's shard reader (pipeline/stages/expand) and the fetcher:
    every address the reader writes reads back, by one ranged read, the bytes it labelled."""
    import datetime as dt

    import pyarrow as pa

    from clipdiy.image_address import ImageFetcher
    from clipdiy.pipeline.stages.expand import IMAGE_BYTES, ExpandShards

    path = sources["root"] / ("00000.tar" if form == "webdataset" else "train.parquet")
    shard = {"image_id": path.name, "uri": f"file://{path}", "source_size": path.stat().st_size, "source_etag": None,
             "source_mtime": dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)}
    rows = pa.concat_tables(ExpandShards(None, form, 4, None)(pa.Table.from_pylist([shard]))).to_pylist()
    assert sorted(row[IMAGE_BYTES] for row in rows) == sorted(sources["images"].values())
    fetcher = ImageFetcher()
    for row in rows:
        assert fetcher.fetch(row) == row[IMAGE_BYTES]
