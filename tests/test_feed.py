"""The training feed: exact round trips, filters, streaming, Ray Data, COCO and VOC exports."""

from __future__ import annotations

import datetime as dt
import io
import json

import numpy as np
import pytest
import torch.utils.data
from labels_fixtures import VOC_NAMES, LabelItem, write_image, write_labels_output
from PIL import Image
from s3_server import s3_bucket, s3_server  # noqa: F401  (pytest fixtures)

from clipdiy.labels.feed import FeedFilter, LabelDataset, LabelIterableDataset, export_coco, export_voc_masks, read_labels
from clipdiy.labels.palette import voc_palette

CAT, DOG, PERSON = 8, 12, 15
T0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


def _scene(seed: int, height: int = 48, width: int = 64):
    rng = np.random.default_rng(seed)
    rgb = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    label = np.zeros((height, width), np.uint8)
    label[5:30, 10:40] = CAT
    label[25:45, 30:60] = DOG
    if seed % 2:
        label[:10, :10] = PERSON
    return rgb, label


@pytest.fixture()
def corpus(tmp_path):
    """Six labelled PNG photos (exact pixels) with known masks, scores and saliency, one error row."""
    images, items = {}, []
    for index in range(6):
        rgb, label = _scene(index)
        uri = write_image(tmp_path / f"img{index}.png", rgb)
        saliency = np.full(label.shape, 0.1 + 0.15 * index, np.float32)  # fg fraction 0.10 .. 0.85
        scores = {0: 0.9, CAT: 0.3 + 0.1 * index, DOG: 0.8, PERSON: 0.2}
        items.append(LabelItem(f"photos/img{index}.png", uri, label, mask_scores=scores, saliency=saliency))
        images[f"photos/img{index}.png"] = (rgb, label)
    items.append(LabelItem("photos/broken.png", str(tmp_path / "broken.png"), error_kind="truncated"))
    output = str(tmp_path / "labels")
    write_labels_output(output, items, rows_per_shard=3, started=T0)
    return output, images


def test_round_trip_is_exact(corpus):
    output, images = corpus
    dataset = LabelDataset(output)
    assert len(dataset) == 6  # the error row carries no labels
    assert dataset.class_names == VOC_NAMES
    for index, record in enumerate(dataset.records):
        image, label = dataset[index]
        rgb, expected = images[record["image_id"]]
        assert image.dtype == np.uint8 and np.array_equal(image, rgb)
        assert label.dtype == np.uint8 and np.array_equal(label, expected)


def test_filters_select_what_they_say(corpus):
    output, images = corpus
    ids = lambda f: [r["image_id"] for r in LabelDataset(output, f).records]  # noqa: E731
    assert ids(FeedFilter(min_foreground_fraction=0.5)) == [f"photos/img{i}.png" for i in (3, 4, 5)]  # 0.55, 0.70, 0.85
    assert ids(FeedFilter(classes=("person",))) == [f"photos/img{i}.png" for i in (1, 3, 5)]
    assert ids(FeedFilter(classes=("Cat",), min_class_score=0.55)) == [f"photos/img{i}.png" for i in (3, 4, 5)]
    assert ids(FeedFilter(classes=("person",), min_class_score=0.5)) == []
    assert len(ids(FeedFilter(min_class_score=0.5))) == 6  # dog (0.8) everywhere

    dataset = LabelDataset(output, FeedFilter(classes=("cat", "person")))
    _, label = dataset[0]
    _, expected = images[dataset.records[0]["image_id"]]
    assert (label[expected == DOG] == 255).all()  # another class's object: ignored, not background
    assert np.array_equal(label[expected != DOG], expected[expected != DOG])

    dataset = LabelDataset(output, FeedFilter(ignore_below=0.45))
    for index, record in enumerate(dataset.records):
        _, label = dataset[index]
        _, expected = images[record["image_id"]]
        cat_score = 0.3 + 0.1 * int(record["image_id"][-5])
        low = {PERSON} | ({CAT} if cat_score < 0.45 else set())  # person 0.2; cat 0.3 / 0.4 in img0 / img1
        ignored = np.isin(expected, list(low))
        assert (label[ignored] == 255).all() and np.array_equal(label[~ignored], expected[~ignored])


def test_unfinished_runs_and_latest_run(corpus, tmp_path):
    output, images = corpus
    relabelled = np.full((48, 64), DOG, np.uint8)
    write_labels_output(output, [LabelItem("photos/img0.png", str(tmp_path / "img0.png"), relabelled)],
                        run_id="run-b", started=T0 + dt.timedelta(days=1))
    write_labels_output(output, [LabelItem("photos/new.png", str(tmp_path / "img1.png"), relabelled)],
                        run_id="run-c", started=T0 + dt.timedelta(days=2), finished=False)
    dataset = LabelDataset(output)
    assert len(dataset) == 6
    assert np.array_equal(dataset[0][1], relabelled)  # the changed image's latest labels
    assert dataset.records[0]["run_id"] == "run-b"
    everything = LabelDataset(output, FeedFilter(finished_only=False))
    assert [r["image_id"] for r in everything.records][-1] == "photos/new.png"


def test_iterable_dataset_streams_every_image_once_over_workers(corpus):
    output, images = corpus
    dataset = LabelIterableDataset(output, transform=lambda image, label: (torch.from_numpy(label).sum().item(), image.shape))
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=2)
    got = sorted(item[0] for item in loader)
    assert got == sorted(int(label.astype(np.int64).sum()) for _, label in images.values())
    ranks = [sorted(s for s, _ in LabelIterableDataset(output, rank=r, world_size=2, transform=lambda i, l: (int(l.sum()), 0)))
             for r in range(2)]
    assert sorted(ranks[0] + ranks[1]) == got and ranks[0] and ranks[1]


def test_coco_export_loads_in_pycocotools_with_equal_masks(corpus, tmp_path):
    from pycocotools.coco import COCO

    output, images = corpus
    destination = tmp_path / "export" / "instances.json"
    assert export_coco(output, str(destination)) == {"images": 6, "annotations": 15}  # 6 cats + 6 dogs + 3 persons
    coco = COCO(str(destination))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(VOC_NAMES[1:])
    for image in coco.dataset["images"]:
        rgb, label = images[image["file_name"]]
        annotations = coco.loadAnns(coco.getAnnIds(imgIds=image["id"]))
        assert sorted(a["category_id"] for a in annotations) == sorted(set(np.unique(label).tolist()) - {0})
        for annotation in annotations:
            assert np.array_equal(coco.annToMask(annotation).astype(bool), label == annotation["category_id"])
    assert json.loads(destination.read_text())["annotations"][0]["score"] > 0

    filtered = tmp_path / "filtered.json"
    assert export_coco(output, str(filtered), FeedFilter(ignore_below=0.5))["annotations"] == 6 + 4  # dogs; cats of img2..img5 (0.5 .. 0.8)


def test_voc_export_writes_palette_pngs_equal_to_labels(corpus, tmp_path):
    output, images = corpus
    destination = tmp_path / "voc"
    assert export_voc_masks(output, str(destination), FeedFilter(ignore_below=0.25)) == {"images": 6}
    assert (destination / "class_names.txt").read_text().splitlines() == list(VOC_NAMES)
    for image_id, (_, label) in images.items():
        png = Image.open(destination / image_id.replace(".png", ".png"))
        assert png.mode == "P"
        assert np.array_equal(np.asarray(png.getpalette(), np.uint8).reshape(-1, 3)[:256], voc_palette())
        assert np.array_equal(np.asarray(png), np.where(label == PERSON, 255, label))


@pytest.mark.slow
def test_ray_data_reader_yields_the_exact_pairs(corpus):
    import ray

    output, images = corpus
    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True)
    try:
        rows = read_labels(output, FeedFilter(classes=("person",))).take_all()
    finally:
        ray.shutdown()
    assert sorted(r["image_id"] for r in rows) == [f"photos/img{i}.png" for i in (1, 3, 5)]
    for row in rows:
        rgb, label = images[row["image_id"]]
        assert np.array_equal(row["image"], rgb)
        assert np.array_equal(row["label"], np.where(label == DOG, 255, np.where(label == CAT, 255, label)))


def test_feed_from_object_storage(s3_server, s3_bucket):
    rgb, label = _scene(3)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    s3_server.put_bytes(s3_bucket, "photos/a.png", buffer.getvalue())
    output = f"s3://{s3_bucket}/labels"
    write_labels_output(output, [LabelItem("photos/a.png", f"s3://{s3_bucket}/photos/a.png", label)],
                        storage_options=s3_server.options.storage_options("s3"))
    dataset = LabelDataset(output, storage=s3_server.options)
    image, got = dataset[0]
    assert np.array_equal(image, rgb) and np.array_equal(got, label)
