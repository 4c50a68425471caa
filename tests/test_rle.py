"""COCO RLE: round trip, and byte-identical to pycocotools."""

from __future__ import annotations

import numpy as np
import pytest
from pycocotools import mask as coco_mask

from clipdiy import rle


def _masks():
    rng = np.random.default_rng(0)
    yield np.zeros((5, 7), bool)
    yield np.ones((5, 7), bool)
    yield np.eye(6, dtype=bool)
    for _ in range(60):
        height, width = rng.integers(1, 70, size=2)
        yield rng.random((height, width)) < rng.uniform(0.05, 0.95)
    # Long runs exercise the multi-byte and negative-delta paths of the string packing.
    big = np.zeros((480, 640), bool)
    big[100:400, 50:600] = True
    big[200:220, :] = False
    yield big


@pytest.mark.parametrize("mask", list(_masks()), ids=lambda m: f"{m.shape[0]}x{m.shape[1]}")
def test_encode_matches_pycocotools_and_round_trips(mask):
    ours = rle.encode(mask)
    theirs = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    assert ours["counts"] == theirs["counts"].decode("ascii")
    assert ours["size"] == [int(v) for v in theirs["size"]]
    np.testing.assert_array_equal(rle.decode(ours), mask)
    np.testing.assert_array_equal(coco_mask.decode({"size": ours["size"], "counts": ours["counts"]}), mask)
    assert rle.area(ours) == int(mask.sum())
    if mask.any():
        np.testing.assert_allclose(rle.bbox_of_mask(mask), coco_mask.toBbox(theirs))


def test_decode_accepts_uncompressed_and_bytes():
    mask = np.zeros((4, 3), bool)
    mask[1:3, 1] = True
    encoded = rle.encode(mask)
    np.testing.assert_array_equal(rle.decode({"size": [4, 3], "counts": encoded["counts"].encode()}), mask)
    uncompressed = {"size": [4, 3], "counts": rle.run_lengths(mask).tolist()}
    np.testing.assert_array_equal(rle.decode(uncompressed), mask)


def test_decode_rejects_counts_of_the_wrong_size():
    with pytest.raises(ValueError, match="expected 12"):
        rle.decode({"size": [4, 3], "counts": [5, 2]})


def test_encode_rejects_non_2d():
    with pytest.raises(ValueError, match="2-D"):
        rle.encode(np.zeros((2, 2, 2), bool))


def _label_maps():
    rng = np.random.default_rng(1)
    yield np.zeros((1, 1), np.uint16)
    yield np.full((4, 9), 7, np.uint16)
    for _ in range(40):
        height, width = rng.integers(1, 50, size=2)
        classes = int(rng.integers(1, 8))
        if rng.random() < 0.5:  # noisy labels: many short runs
            yield rng.integers(0, classes, size=(height, width)).astype(np.uint16)
        else:  # blocks, so that runs cross column boundaries
            blocks = rng.integers(0, classes, size=(height // 6 + 1, width // 6 + 1))
            yield np.kron(blocks, np.ones((6, 6), np.int64))[:height, :width].astype(np.uint16)
    big = np.zeros((480, 640), np.uint16)  # long runs: multi-byte counts, negative deltas
    big[100:400, 50:600] = 3
    big[200:220, :] = 12
    yield big


@pytest.mark.parametrize("label_map", list(_label_maps()), ids=lambda m: f"{m.shape[0]}x{m.shape[1]}")
def test_label_map_encoding_matches_pycocotools_per_class(label_map):
    encoded = rle.encode_label_map(label_map)
    assert [class_id for class_id, *_ in encoded] == np.unique(label_map).tolist()
    for class_id, ours, area, bbox in encoded:
        theirs = coco_mask.encode(np.asfortranarray((label_map == class_id).astype(np.uint8)))
        assert ours["counts"] == theirs["counts"].decode("ascii")
        assert ours["size"] == [int(v) for v in theirs["size"]]
        assert area == int(coco_mask.area(theirs))
        assert bbox == [float(v) for v in coco_mask.toBbox(theirs)]
