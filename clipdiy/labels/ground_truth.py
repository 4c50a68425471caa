"""Ground truth in the two standard forms, as semantic maps (H x W uint8, 255 = ignore).

- PASCAL VOC: a folder of palette PNGs (``SegmentationClass/<stem>.png``), pixel value = class id,
  255 = ignore. Mode ``P``/``L`` PNGs are read as ids; RGB PNGs are mapped back through the VOC
  palette.
- COCO (COCO-Object): an instances JSON. Class 0 is background, then the categories in id order.
  Instances are painted in the order the JSON lists them and each claims only pixels no earlier
  instance holds (first instance wins on overlap); a crowd instance claims its pixels as 255
  (ignored) in the same order. Polygons are rasterised exactly as pycocotools does (a port of
  ``maskApi.c: rleFrPoly``), RLE and uncompressed RLE decode through :mod:`clipdiy.rle`, so
  pycocotools is not a dependency.

Images are matched to labels by file stem (``image_id`` without folders and extension).
"""

from __future__ import annotations

import io
import json
import math
import posixpath
from collections import defaultdict
from typing import Any, Protocol

import numpy as np
from PIL import Image

from clipdiy import rle
from clipdiy.labels.palette import IGNORE, voc_palette
from clipdiy.labels.store import stem
from clipdiy.storage import StorageOptions, open_filesystem, read_uri

VOC_CLASS_NAMES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)


class GroundTruth(Protocol):
    """Semantic ground truth: ``class_names[i]`` names GT class ``i`` (0 = background)."""

    class_names: tuple[str, ...]

    def keys(self) -> list[str]:
        """The file stems of the annotated images."""

    def load(self, key: str) -> np.ndarray:
        """H x W uint8 class ids of one image, 255 = ignore."""


class VocGroundTruth:
    """A folder of VOC-style class-map PNGs (any fsspec URI)."""

    def __init__(self, masks_uri: str, class_names: tuple[str, ...] = VOC_CLASS_NAMES, storage: StorageOptions | None = None):
        self.class_names = tuple(class_names)
        self._fs, root = open_filesystem(masks_uri, storage)
        paths = sorted(p for p in self._fs.find(root) if p.lower().endswith(".png"))
        if not paths:
            raise FileNotFoundError(f"no PNG class maps under {masks_uri}")
        self._paths: dict[str, str] = {}
        for path in paths:
            key = stem(path)
            if key in self._paths:
                raise ValueError(f"two ground-truth maps share the name {key!r}: {self._paths[key]} and {path}")
            self._paths[key] = path

    def keys(self) -> list[str]:
        return list(self._paths)

    def load(self, key: str) -> np.ndarray:
        with self._fs.open(self._paths[key], "rb") as file:
            image = Image.open(io.BytesIO(file.read()))
            image.load()
        if image.mode in ("P", "L"):
            ids = np.asarray(image)
        elif image.mode in ("RGB", "RGBA"):
            ids = _ids_from_colours(np.asarray(image.convert("RGB")), self._paths[key])
        else:
            raise ValueError(f"{self._paths[key]}: ground-truth PNG mode {image.mode} is not a class map (need P, L or RGB)")
        bad = (ids >= len(self.class_names)) & (ids != IGNORE)
        if bad.any():
            raise ValueError(f"{self._paths[key]}: class ids {sorted(set(ids[bad].tolist()))[:5]} exceed the {len(self.class_names)} GT classes")
        return ids.astype(np.uint8)


def _ids_from_colours(rgb: np.ndarray, name: str) -> np.ndarray:
    palette = voc_palette().astype(np.int64)
    codes = (palette[:, 0] << 16) | (palette[:, 1] << 8) | palette[:, 2]
    lookup = {int(c): i for i, c in enumerate(codes)}
    pixel_codes = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2]
    unique, inverse = np.unique(pixel_codes, return_inverse=True)
    missing = [hex(int(c)) for c in unique if int(c) not in lookup]
    if missing:
        raise ValueError(f"{name}: colours {missing[:5]} are not in the VOC palette")
    return np.asarray([lookup[int(c)] for c in unique], dtype=np.uint8)[inverse].reshape(rgb.shape[:2])


class CocoGroundTruth:
    """COCO instances JSON merged into COCO-Object semantic maps (see the module docstring)."""

    def __init__(self, instances_uri: str, storage: StorageOptions | None = None):
        data = json.loads(read_uri(instances_uri, storage))
        categories = sorted(data["categories"], key=lambda c: c["id"])
        self.class_names = ("background", *(c["name"] for c in categories))
        self._class_of = {c["id"]: i + 1 for i, c in enumerate(categories)}
        self._images: dict[str, dict] = {}
        for image in data["images"]:
            key = stem(image["file_name"])
            if key in self._images:
                raise ValueError(f"two COCO images share the name {key!r}")
            self._images[key] = image
        self._annotations: dict[Any, list[dict]] = defaultdict(list)
        for annotation in data.get("annotations", []):
            self._annotations[annotation["image_id"]].append(annotation)

    def keys(self) -> list[str]:
        return list(self._images)

    def load(self, key: str) -> np.ndarray:
        image = self._images[key]
        height, width = int(image["height"]), int(image["width"])
        label = np.zeros((height, width), dtype=np.uint8)
        claimed = np.zeros((height, width), dtype=bool)
        for annotation in self._annotations.get(image["id"], []):
            mask = annotation_mask(annotation["segmentation"], height, width) & ~claimed
            label[mask] = IGNORE if annotation.get("iscrowd", 0) else self._class_of[annotation["category_id"]]
            claimed |= mask
        return label


def annotation_mask(segmentation: Any, height: int, width: int) -> np.ndarray:
    """H x W bool mask of a COCO segmentation: polygons, compressed or uncompressed RLE."""
    if isinstance(segmentation, list):
        mask = np.zeros((height, width), dtype=bool)
        for polygon in segmentation:
            if len(polygon) >= 6:
                mask |= rle.decode({"size": [height, width], "counts": polygon_counts(polygon, height, width).tolist()})
        return mask
    if isinstance(segmentation, dict):
        decoded = rle.decode(segmentation)
        if decoded.shape != (height, width):
            raise ValueError(f"RLE of size {segmentation['size']} in an image of {height} x {width}")
        return decoded
    raise ValueError(f"unknown COCO segmentation of type {type(segmentation).__name__}")


def polygon_counts(polygon: list[float], height: int, width: int) -> np.ndarray:
    """Uncompressed COCO RLE counts of one polygon ``[x0, y0, x1, y1, ...]``, exactly as
    pycocotools' ``rleFrPoly`` rasterises it (boundary upsampled x5, then downsampled)."""
    scale = 5.0
    xy = np.asarray(polygon, dtype=np.float64).reshape(-1, 2)
    x = np.trunc(scale * xy[:, 0] + 0.5).astype(np.int64)
    y = np.trunc(scale * xy[:, 1] + 0.5).astype(np.int64)
    x, y = np.append(x, x[0]), np.append(y, y[0])
    us, vs = [], []
    for j in range(len(xy)):
        xs, xe, ys, ye = int(x[j]), int(x[j + 1]), int(y[j]), int(y[j + 1])
        dx, dy = abs(xe - xs), abs(ys - ye)
        flip = (dx >= dy and xs > xe) or (dx < dy and ys > ye)
        if flip:
            xs, xe, ys, ye = xe, xs, ye, ys
        if dx >= dy:
            slope = (ye - ys) / dx if dx else 0.0
            t = np.arange(dx + 1)
            t = dx - t if flip else t
            us.append(t + xs)
            vs.append(np.trunc(ys + slope * t + 0.5).astype(np.int64))
        else:
            slope = (xe - xs) / dy
            t = np.arange(dy + 1)
            t = dy - t if flip else t
            vs.append(t + ys)
            us.append(np.trunc(xs + slope * t + 0.5).astype(np.int64))
    u, v = np.concatenate(us), np.concatenate(vs)
    u_now, u_before, v_now, v_before = u[1:], u[:-1], v[1:], v[:-1]
    step = u_now != u_before
    xd = np.where(u_now < u_before, u_now, u_now - 1).astype(np.float64)
    xd = (xd + 0.5) / scale - 0.5
    keep = step & (np.floor(xd) == xd) & (xd >= 0) & (xd <= width - 1)
    yd = np.minimum(v_now, v_before).astype(np.float64)
    yd = np.ceil(np.clip((yd + 0.5) / scale - 0.5, 0, height))
    starts = np.sort(np.append(xd[keep].astype(np.int64) * height + yd[keep].astype(np.int64), height * width))
    deltas = np.diff(starts, prepend=0).tolist()
    counts = [deltas[0]]
    j = 1
    while j < len(deltas):
        if deltas[j] > 0:
            counts.append(deltas[j])
            j += 1
        else:
            j += 1
            if j < len(deltas):
                counts[-1] += deltas[j]
                j += 1
    return np.asarray(counts, dtype=np.int64)


def load_ground_truth(gt: str, gt_format: str | None = None, class_names: tuple[str, ...] | None = None,
                      storage: StorageOptions | None = None) -> GroundTruth:
    """A COCO instances JSON (``*.json``) or a VOC class-map folder, by ``gt_format`` or the URI."""
    fmt = gt_format or ("coco" if posixpath.splitext(gt)[1].lower() == ".json" else "voc")
    if fmt == "coco":
        return CocoGroundTruth(gt, storage)
    if fmt == "voc":
        return VocGroundTruth(gt, class_names or VOC_CLASS_NAMES, storage)
    raise ValueError(f"ground-truth format must be voc or coco, got {gt_format!r}")


def short_side_size(height: int, width: int, short_side: int) -> tuple[int, int]:
    """(H, W) with the short side ``short_side`` and the aspect kept (rounded half up, as mmcv)."""
    factor = short_side / min(height, width)
    return max(1, math.floor(height * factor + 0.5)), max(1, math.floor(width * factor + 0.5))


def resize_nearest(label: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of an H x W map to ``size`` = (H', W') by pixel centres (as PIL)."""
    height, width = label.shape
    if (height, width) == tuple(size):
        return label
    rows = np.minimum(((np.arange(size[0]) + 0.5) * height / size[0]).astype(np.int64), height - 1)
    cols = np.minimum(((np.arange(size[1]) + 0.5) * width / size[1]).astype(np.int64), width - 1)
    return label[rows[:, None], cols[None, :]]
