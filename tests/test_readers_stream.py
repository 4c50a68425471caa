"""Readers stream and agree: one row per image (the latest write) on every path, even for two
rows of one image inside one run, and no reader holds the whole output."""

from __future__ import annotations

import datetime as dt
import json
import weakref

import numpy as np
import pyarrow as pa
import pytest
from labels_fixtures import VOC_NAMES, LabelItem, add_shard, write_image, write_labels_output
from PIL import Image

from clipdiy.labels import evaluation, feed, preview, store
from clipdiy.labels.evaluation import evaluate
from clipdiy.labels.feed import LabelDataset, LabelIterableDataset, export_coco, export_voc_masks
from clipdiy.labels.ground_truth import VocGroundTruth
from clipdiy.labels.palette import to_palette_image
from clipdiy.labels.preview import PreviewConfig, render_output
from clipdiy.labels.row_index import REVIEW_KEY_COLUMNS
from clipdiy.labels.store import latest_rows, read_rows

CAT, DOG, PERSON = 8, 12, 15
T0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
H, W = 24, 32


def _label(class_id: int) -> np.ndarray:
    label = np.zeros((H, W), np.uint8)
    label[4:20, 6:26] = class_id
    return label


@pytest.fixture()
def twice_in_one_run(tmp_path):
    """``a.png`` labelled by an earlier run (person), then twice by run ``r2``: by attempt 1
    (cat) and by attempt 2 (dog, the latest write). ``b.png`` once (cat). GT: dog for a, cat for b."""
    uris = {key: write_image(tmp_path / f"{key}.png", np.full((H, W, 3), 100 + i, np.uint8)) for i, key in enumerate("ab")}
    output = str(tmp_path / "labels")
    write_labels_output(output, [LabelItem("a.png", uris["a"], _label(PERSON))], run_id="r1", started=T0)
    later = T0 + dt.timedelta(days=1)
    write_labels_output(output, [LabelItem("a.png", uris["a"], _label(CAT)), LabelItem("b.png", uris["b"], _label(CAT))],
                        run_id="r2", started=later)
    add_shard(output, "r2", "part-002-0f0f0f0f.parquet", [LabelItem("a.png", uris["a"], _label(DOG))], started=later)
    gt = tmp_path / "gt"
    gt.mkdir()
    to_palette_image(_label(DOG)).save(gt / "a.png")
    to_palette_image(_label(CAT)).save(gt / "b.png")
    return output, VocGroundTruth(str(gt))


def test_shard_write_order_is_the_attempt_then_the_name():
    from clipdiy.labels.row_index import shard_write_order

    names = ["part-010-aa.parquet", "part-002-zz.parquet", "part-1000-00.parquet", "part-00000.parquet", "part-002-aa.parquet"]
    assert sorted(names, key=shard_write_order) == [
        "part-00000.parquet", "part-002-aa.parquet", "part-002-zz.parquet", "part-010-aa.parquet", "part-1000-00.parquet"]


def test_latest_rows_keeps_the_last_row_of_a_run():
    table = pa.table({"image_id": ["a", "b", "a", "a"], "run_id": ["r2", "r2", "r2", "r1"],
                      "run_started_at": pa.array([2, 2, 2, 9], pa.timestamp("us", tz="UTC")), "n": [0, 1, 2, 3]})
    assert latest_rows(table).column("n").to_pylist() == [1, 3]  # a: run r1 started last; b: its only row
    assert latest_rows(table.slice(0, 3)).column("n").to_pylist() == [1, 2]  # a twice in r2: the later row


def test_every_local_reader_returns_the_latest_write_once(twice_in_one_run, tmp_path):
    output, gt = twice_in_one_run
    rows = read_rows(output)
    assert sorted(rows.column("image_id").to_pylist()) == ["a.png", "b.png"]

    dataset = LabelDataset(output)
    assert [r["image_id"] for r in dataset.records] == ["a.png", "b.png"]
    assert np.array_equal(dataset[0][1], _label(DOG)) and np.array_equal(dataset[1][1], _label(CAT))

    streamed = sorted((int(label.max()), int(label.sum())) for _, label in LabelIterableDataset(output))
    assert streamed == sorted([(DOG, int(_label(DOG).astype(int).sum())), (CAT, int(_label(CAT).astype(int).sum()))])

    assert export_voc_masks(output, str(tmp_path / "voc")) == {"images": 2}
    assert np.array_equal(np.asarray(Image.open(tmp_path / "voc" / "a.png")), _label(DOG))

    assert export_coco(output, str(tmp_path / "coco.json")) == {"images": 2, "annotations": 2}
    document = json.loads((tmp_path / "coco.json").read_text())
    assert [(a["image_id"], a["category_id"]) for a in document["annotations"]] == [(1, DOG), (2, CAT)]

    report = evaluate(output, gt, use_ray=False).to_dict()
    assert report["counts"]["evaluated"] == 2 and report["miou"] == 100.0

    summary = render_output(output, str(tmp_path / "preview"), PreviewConfig(size=32, sample=2, tile=32))
    assert [e["image_id"] for e in summary["entries"]] == ["a.png", "b.png"]
    assert summary["entries"][0]["classes"][1][0] == VOC_NAMES[DOG]


@pytest.mark.slow
def test_ray_readers_agree_with_local_ones(twice_in_one_run):
    import ray

    from clipdiy.labels.feed import read_labels

    output, gt = twice_in_one_run
    local = evaluate(output, gt, use_ray=False)
    ray.init(num_cpus=1, include_dashboard=False, ignore_reinit_error=True)
    try:
        on_ray = evaluate(output, gt, use_ray=True)
        pairs = read_labels(output).take_all()
    finally:
        ray.shutdown()
    assert on_ray.backend == "ray"
    assert np.array_equal(on_ray.confusion, local.confusion)
    assert [r["image_id"] for r in on_ray.images] == [r["image_id"] for r in local.images] == ["a.png", "b.png"]
    assert sorted(p["image_id"] for p in pairs) == ["a.png", "b.png"]
    assert np.array_equal(next(p["label"] for p in pairs if p["image_id"] == "a.png"), _label(DOG))


# ---------------------------------------------------------------- no reader holds the output

SHARD_ROWS = 10
SHARDS = 12


@pytest.fixture()
def many_shards(tmp_path):
    """SHARDS x SHARD_ROWS rows in run r1; the first 15 images relabelled (dog) by a later run r2."""
    uri = write_image(tmp_path / "photo.png", np.full((H, W, 3), 90, np.uint8))
    output = str(tmp_path / "labels")
    items = [LabelItem(f"img{i:03d}.png", uri, _label(CAT)) for i in range(SHARDS * SHARD_ROWS)]
    write_labels_output(output, items, run_id="r1", started=T0, rows_per_shard=SHARD_ROWS)
    write_labels_output(output, [LabelItem(f"img{i:03d}.png", uri, _label(DOG)) for i in range(15)], run_id="r2",
                        started=T0 + dt.timedelta(days=1), rows_per_shard=SHARD_ROWS)
    gt = tmp_path / "gt"
    gt.mkdir()
    for i in (0, 50):
        to_palette_image(_label(DOG if i < 15 else CAT)).save(gt / f"img{i:03d}.png")
    return output, VocGroundTruth(str(gt))


class _ShardReads:
    """Instrumented ``read_shard``: tracks the row columns (anything beyond keys and status) of
    the tables it returned that are still alive, and every row read."""

    KEY_ONLY = {"image_id", "run_id", "run_started_at", "status", *REVIEW_KEY_COLUMNS}

    def __init__(self, real):
        self.real, self.live, self.peak_live, self.rows_read = real, {}, 0, 0

    def __call__(self, run, shard, columns=None, optional=()):
        table = self.real(run, shard, columns, optional)
        if columns is not None and set(columns) <= self.KEY_ONLY:
            return table
        self.peak_live = max(self.peak_live, sum(self.live.values()))  # what was held when this read came
        self.rows_read += table.num_rows
        key = id(table)
        self.live[key] = table.num_rows
        weakref.finalize(table, self.live.pop, key, None)
        return table


def _run_reader(name: str, output: str, gt, tmp_path):
    if name == "LabelDataset":
        dataset = LabelDataset(output)
        return [r["image_id"] for r in dataset.records]
    if name == "LabelIterableDataset":
        return sum(1 for _ in LabelIterableDataset(output, transform=lambda image, label: 0))
    if name == "export_coco":
        return export_coco(output, str(tmp_path / "coco.json"))
    if name == "export_voc_masks":
        return export_voc_masks(output, str(tmp_path / "voc"))
    if name == "evaluate":
        return evaluate(output, gt, use_ray=False).counts
    if name == "preview":
        return render_output(output, str(tmp_path / "preview"), PreviewConfig(size=32, sample=2, tile=32, limit=2))["listed"]
    raise AssertionError(name)


@pytest.mark.parametrize("reader", ["LabelDataset", "LabelIterableDataset", "export_coco", "export_voc_masks",
                                    "evaluate", "preview"])
def test_readers_hold_a_few_shards_at_most(reader, many_shards, tmp_path, monkeypatch):
    output, gt = many_shards
    reads = _ShardReads(store.read_shard)
    for module in (store, feed, preview, evaluation):
        monkeypatch.setattr(module, "read_shard", reads, raising=False)
    result = _run_reader(reader, output, gt, tmp_path)
    images = SHARDS * SHARD_ROWS
    expected = {"LabelDataset": [f"img{i:03d}.png" for i in range(images)], "LabelIterableDataset": images,
                "export_coco": {"images": images, "annotations": images}, "export_voc_masks": {"images": images},
                "evaluate": {"gt_images": 2, "evaluated": 2, "label_errors": 0, "missing": 0, "unmatched": images - 2,
                             "runs": 2},
                "preview": 2}[reader]
    assert result == expected
    assert reads.rows_read > 0
    assert reads.peak_live <= 2 * SHARD_ROWS, f"{reader} held {reads.peak_live} rows at once"
    if reader == "preview":  # --limit 2: only the shards of the two rows shown are read
        assert reads.rows_read <= 2 * SHARD_ROWS
