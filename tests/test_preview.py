"""Previews: picture sizes and colours, the contact sheet, the HTML page in headless Chromium, S3."""

from __future__ import annotations

import datetime as dt
import html.parser
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO_ROOT
from labels_fixtures import VOC_NAMES, LabelItem, label_row, write_image, write_labels_output
from PIL import Image
from s3_server import s3_bucket, s3_server  # noqa: F401  (pytest fixtures)

from clipdiy.labels.palette import voc_palette
from clipdiy.labels.preview import CAPTION, GAP, PreviewConfig, preview_size, render_image, render_output

CAT, DOG = 8, 12
GREY = 128
CHROMIUM_APT = "apt-get update && apt-get install -y chromium"


def _scene(height=60, width=90):
    label = np.zeros((height, width), np.uint8)
    label[10:40, 10:40] = CAT
    label[20:60, 50:90] = DOG
    saliency = (label != 0).astype(np.float32)
    return np.full((height, width, 3), GREY, np.uint8), label, saliency


def test_picture_has_expected_size_and_mask_colours():
    image, label, saliency = _scene()
    row = label_row(LabelItem("a.png", "a.png", label, saliency=saliency), VOC_NAMES, "r", dt.datetime.now(dt.timezone.utc))
    config = PreviewConfig(size=180, alpha=0.5)  # scale 2: every label pixel becomes a 2 x 2 block
    picture = np.asarray(render_image(row, image, config))
    assert (picture.shape[1], picture.shape[0]) == preview_size(label.shape, 3, config) == (2 * (180 + GAP) + 240, 120)
    palette = voc_palette().astype(int)
    overlay_part = picture[:120, :180].astype(int)
    for class_id in (CAT, DOG):
        inside = np.kron(label == class_id, np.ones((2, 2), bool))
        inside[1:-1, 1:-1] &= inside[:-2, 1:-1] & inside[2:, 1:-1] & inside[1:-1, :-2] & inside[1:-1, 2:]  # away from edges
        expected = np.rint(0.5 * GREY + 0.5 * palette[class_id])
        assert inside.sum() > 500
        assert np.abs(overlay_part[inside] - expected).max() <= 1
    background = np.kron(label == 0, np.ones((2, 2), bool))
    assert (overlay_part[background] == GREY).all()  # background is not tinted
    saliency_part = picture[:120, 180 + GAP : 2 * 180 + GAP, 0]
    assert saliency_part[30, 40] > 200 and saliency_part[5, 5] < 50  # white = foreground
    legend = picture[:, 2 * (180 + GAP) :]
    for class_id in (CAT, DOG):
        assert (np.abs(legend.reshape(-1, 3).astype(int) - palette[class_id]).sum(axis=1) == 0).sum() >= 100  # a swatch


@pytest.fixture()
def labelled(tmp_path):
    items = []
    for index in range(5):
        image, label, saliency = _scene(60 + 10 * index, 90)
        uri = write_image(tmp_path / f"photo{index}.png", image)
        items.append(LabelItem(f"set/photo{index}.png", uri, label, mask_scores={0: 0.9, CAT: 0.1 + 0.2 * index, DOG: 0.8},
                               saliency=saliency))
    items.append(LabelItem("set/bad.jpg", str(tmp_path / "bad.jpg"), error_kind="truncated", error="truncated JPEG <b>"))
    output = str(tmp_path / "labels")
    write_labels_output(output, items, rows_per_shard=2)
    return output, items


def test_render_output_writes_pictures_and_contact_sheet(labelled, tmp_path):
    output, items = labelled
    config = PreviewConfig(size=90, sample=4, tile=64)
    summary = render_output(output, str(tmp_path / "preview"), config)
    assert summary["listed"] == 6 and summary["pictures"] == 5 and summary["errors"] == 1
    for entry, item in zip(sorted((e for e in summary["entries"] if e["picture"]), key=lambda e: e["image_id"]), items):
        picture = Image.open(tmp_path / "preview" / entry["picture"])
        picture.load()
        assert picture.size == preview_size(item.label_map.shape, 3, config)
    sheet = Image.open(tmp_path / "preview" / "contact_sheet.png")
    assert sheet.size == (2 * 64, 2 * (64 + CAPTION))  # 4 tiles: 2 columns x 2 rows
    cat = np.all(np.asarray(sheet.convert("RGB")).astype(int) == np.rint(0.5 * GREY + 0.5 * voc_palette()[CAT]), axis=-1)
    assert cat.sum() > 4 * 100  # the masks show on every tile


class _Rows(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.rows, self.headers, self.shown = [], [], ""
        self._in_shown = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "tr" and "data-image-id" in attrs:
            self.rows.append(attrs["data-image-id"])
        if tag == "th":
            self.headers.append(attrs.get("data-dir"))
        self._in_shown = attrs.get("id") == "shown"

    def handle_data(self, data):
        if self._in_shown:
            self.shown += data


def test_html_page_loads_in_headless_chromium_and_lists_every_image(labelled, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip(f"Chromium is not installed (Debian: `{CHROMIUM_APT}`)")
    output, items = labelled
    render_output(output, str(tmp_path / "preview"), PreviewConfig(size=90, sample=4, tile=64))
    page = tmp_path / "preview" / "index.html"
    done = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run", f"--user-data-dir={tmp_path / 'chromium-profile'}",
         "--virtual-time-budget=5000", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    dom = _Rows()
    dom.feed(done.stdout)
    assert sorted(dom.rows) == sorted(i.image_id for i in items)  # every image listed
    assert dom.shown.strip() == "5 of 5 pictures shown"  # the browser decoded every picture
    # The script ran and sorted by confidence, worst first; the error row (no confidence) last.
    assert "asc" in dom.headers
    assert dom.rows == [f"set/photo{i}.png" for i in range(5)] + ["set/bad.jpg"]
    assert "truncated JPEG &lt;b&gt;" in done.stdout


def test_preview_from_and_to_object_storage(s3_server, s3_bucket):
    s3, bucket = s3_server, s3_bucket
    image, label, saliency = _scene()
    s3.put_bytes(bucket, "photos/p.png", _png_bytes(image))
    output = f"s3://{bucket}/labels"
    write_labels_output(output, [LabelItem("photos/p.png", f"s3://{bucket}/photos/p.png", label, saliency=saliency)],
                        storage_options=s3.options.storage_options("s3"))
    done = subprocess.run(
        [sys.executable, str(REPO_ROOT / "jobs" / "preview.py"), "--labels", output, "--output", f"s3://{bucket}/preview",
         "--endpoint-url", s3.endpoint_url, "--size", "90"],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "1 images listed, 1 pictures" in done.stdout
    fs = s3.filesystem()
    assert sorted(p.split("/", 1)[1] for p in fs.find(f"{bucket}/preview")) == [
        "preview/contact_sheet.png", "preview/images/00000-p.png", "preview/index.html"]
    picture = Image.open(fs.open(f"{bucket}/preview/images/00000-p.png"))
    assert picture.size == preview_size(label.shape, 3, PreviewConfig(size=90))


def _png_bytes(rgb: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()
