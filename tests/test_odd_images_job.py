"""Images no model input is shaped like, through the real CLI, for both methods, twice.

1 x 5000, 5000 x 1, 3 x 9000 and 1 x 1 pixel images (NACLIP's rescale gave the first three a
model input 0 or 1 pixel high, and OpenCV or the encoder failed the decode task, hence the run)
and a photo whose EXIF block is corrupt (``struct.error`` from Pillow) in one input folder: each
run exits 0 with one row per file; the odd sizes are labelled at their own size, the corrupt EXIF
is a ``corrupt`` row; a second run that retries every error row exits 0 again.
"""

from __future__ import annotations

import pytest
from odd_images import write_odd_images
from pipeline_support import cli_args, label_main, local_ray, manifests, read_all_rows

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_local():
    with local_ray() as ray:
        yield ray


@pytest.mark.parametrize("method", ["clipdiy", "naclip"])
def test_odd_images_are_rows_and_never_fail_the_run(ray_local, method, coco_images, tiny_clip_config, tmp_path):
    corpus = tmp_path / "odd"
    sizes = write_odd_images(corpus, coco_images[4])
    files = sorted(p.name for p in corpus.iterdir())
    output = tmp_path / "labels"
    args = cli_args(corpus, output, tiny_clip_config, "--method", method, "--batch-size", "2",
                    "--decode-batch-size", "2")[2:]

    assert label_main(args) == 0
    rows = read_all_rows(output).to_pylist()
    assert sorted(r["image_id"] for r in rows) == files, "one row per file"
    by_id = {r["image_id"]: r for r in rows}
    for name, (width, height) in sizes.items():
        row = by_id[name]
        assert row["status"] == "ok", (name, row["error_kind"], row["error"])
        assert (row["width"], row["height"]) == (width, height)
        assert sum(mask["area"] for mask in row["masks"]) == width * height  # every pixel labelled
    assert (by_id["corrupt_exif.jpg"]["status"], by_id["corrupt_exif.jpg"]["error_kind"]) == ("error", "corrupt")

    # A later night that retries every error row reads the corrupt photo again: exit 0 again.
    assert label_main(args + ["--retry-errors", "all"]) == 0
    runs = manifests(output)
    assert len(runs) == 2
    second = max(runs, key=lambda run: runs[run]["started_at"])
    again = read_all_rows(output, second).to_pylist()
    assert [(r["image_id"], r["error_kind"]) for r in again] == [("corrupt_exif.jpg", "corrupt")]
