"""Bad and unusual images mixed into a corpus: the job completes with one row per input.

Broken objects get error rows with their kind; unusual but valid ones (CMYK, 16-bit, palette,
EXIF-rotated) are labelled exactly as the library labels them.
"""

from __future__ import annotations

import io
import shutil
import struct
import zlib

import numpy as np
import pytest
from PIL import Image
from pipeline_support import (
    check_rows_match_library,
    job_config,
    manifests,
    read_all_rows,
    reference_label_maps,
    segmenter_config,
    start_local_ray,
)

from clipdiy.pipeline.stages.decode import ERROR_KINDS, decode_image

EXPECTED_ERRORS = {
    "empty.jpg": "empty",
    "truncated.jpg": "truncated",
    "text.jpg": "not_image",
    "bomb.png": "too_large",
    "corrupt.png": "corrupt",
}
EXPECTED_OK = ["a_good.jpg", "b_good.jpg", "cmyk.jpg", "gray16.png", "palette.png", "exif_rotated.jpg"]


def _png_claiming(width: int, height: int) -> bytes:
    """A valid tiny PNG whose header claims ``width`` x ``height`` (a decompression bomb's header)."""
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    ihdr = 8  # after the signature: length (4), "IHDR" (4), data (13), crc (4)
    body = bytearray(data[ihdr + 4 : ihdr + 8 + 13])
    body[4:12] = struct.pack(">II", width, height)
    data[ihdr + 4 : ihdr + 8 + 13] = body
    data[ihdr + 8 + 13 : ihdr + 8 + 13 + 4] = struct.pack(">I", zlib.crc32(bytes(body)) & 0xFFFFFFFF)
    return bytes(data)


def _garbled_png(image: Image.Image) -> bytes:
    """A PNG whose compressed pixel data is overwritten in the middle: complete, but corrupt."""
    buffer = io.BytesIO()
    image.resize((64, 48)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    middle = len(data) // 2
    data[middle : middle + 200] = np.random.default_rng(0).integers(0, 256, 200, dtype=np.uint8).tobytes()
    return bytes(data)


def make_corpus(folder, coco_images) -> None:
    folder.mkdir()
    shutil.copy(coco_images[0], folder / "a_good.jpg")
    shutil.copy(coco_images[1], folder / "b_good.jpg")
    (folder / "empty.jpg").write_bytes(b"")
    jpeg = coco_images[2].read_bytes()
    (folder / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (folder / "text.jpg").write_text("this is not an image, just text with a .jpg name\n")
    (folder / "bomb.png").write_bytes(_png_claiming(100_000, 100_000))
    with Image.open(coco_images[3]) as image:
        rgb = image.convert("RGB")
    (folder / "corrupt.png").write_bytes(_garbled_png(rgb))
    rgb.convert("CMYK").save(folder / "cmyk.jpg", quality=95)
    gray16 = (np.asarray(rgb.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    Image.fromarray(gray16).save(folder / "gray16.png")  # mode I;16
    rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=64).save(folder / "palette.png")
    with Image.open(coco_images[4]) as image:
        exif = image.getexif()
        exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
        image.save(folder / "exif_rotated.jpg", exif=exif, quality=95)


def test_decode_classifies_each_bad_input(coco_images, tmp_path):
    corpus = tmp_path / "corpus"
    make_corpus(corpus, coco_images)
    for name, kind in EXPECTED_ERRORS.items():
        result = decode_image((corpus / name).read_bytes(), mode="faithful", max_pixels=100_000_000)
        assert result.prepared is None and result.error_kind == kind, (name, result.error_kind, result.error)
        assert kind in ERROR_KINDS and result.error
    for name in EXPECTED_OK:
        result = decode_image((corpus / name).read_bytes(), mode="faithful", max_pixels=100_000_000)
        assert result.error is None, (name, result.error)
        assert result.prepared.saliency_input.dtype == np.uint8 and result.prepared.saliency_input.shape[2] == 3
        assert result.prepared.saliency_input.shape[:2] == result.prepared.original_size  # full resolution
    # The guard reads the header: a real image over the limit is refused before decoding.
    small = decode_image((corpus / "a_good.jpg").read_bytes(), mode="faithful", max_pixels=1000)
    assert small.error_kind == "too_large"
    with Image.open(corpus / "exif_rotated.jpg") as stored:
        width, height = stored.size
    rotated = decode_image((corpus / "exif_rotated.jpg").read_bytes(), mode="faithful", max_pixels=100_000_000)
    assert rotated.prepared.original_size == (width, height)


@pytest.mark.slow
def test_job_completes_on_a_corpus_with_bad_inputs(coco_images, tiny_clip_config, tmp_path):
    from clipdiy.pipeline.control.run import run_labelling

    corpus = tmp_path / "corpus"
    make_corpus(corpus, coco_images)
    output = tmp_path / "labels"
    config = segmenter_config(tiny_clip_config)
    ray = start_local_ray()
    try:
        summary = run_labelling(job_config(corpus, output, config, rows_per_file=4))
    finally:
        ray.shutdown()

    inputs = len(EXPECTED_ERRORS) + len(EXPECTED_OK)
    assert (summary.seen, summary.ok, summary.error) == (inputs, len(EXPECTED_OK), len(EXPECTED_ERRORS))
    rows = {r["image_id"]: r for r in read_all_rows(output).to_pylist()}
    assert len(rows) == inputs
    for name, kind in EXPECTED_ERRORS.items():
        row = rows[name]
        assert (row["status"], row["error_kind"]) == ("error", kind), (name, row["error"])
        assert row["error"] and row["masks"] is None and row["class_scores"] is None
        assert row["vocabulary_hash"] and row["clip_model"]  # error rows still say which run/models
    ok_rows = [rows[name] for name in EXPECTED_OK]
    assert all(r["status"] == "ok" for r in ok_rows)
    reference, segmenter = reference_label_maps(config, [corpus / name for name in EXPECTED_OK])
    check_rows_match_library(ok_rows, reference, segmenter)
    with Image.open(corpus / "exif_rotated.jpg") as stored:
        width, height = stored.size
    assert (rows["exif_rotated.jpg"]["width"], rows["exif_rotated.jpg"]["height"]) == (height, width)

    manifest = manifests(output)[summary.run_id]
    assert manifest["counts"]["ok"] == len(EXPECTED_OK) and manifest["counts"]["error"] == len(EXPECTED_ERRORS)


def test_a_model_failure_costs_only_the_failing_image(coco_images):
    """A batch whose predict fails is retried image by image; the culprit gets a ``model`` row."""
    import pickle

    import pyarrow as pa

    from clipdiy.pipeline.stages.decode import decoded_columns
    from clipdiy.pipeline.stages.inference import SegmentBatch

    results = [decode_image(path.read_bytes(), mode="faithful", max_pixels=100_000_000) for path in coco_images[:3]]
    results.append(decode_image(b"", mode="faithful", max_pixels=100_000_000))
    poison = results[1].prepared.original_size
    assert poison not in (results[0].prepared.original_size, results[2].prepared.original_size)

    class FlakySegmenter:
        def predict(self, prepared):
            if any(p.original_size == poison for p in prepared):
                raise ValueError("cannot reshape the crops of this image")  # not a device failure
            return [{"size": p.original_size} for p in prepared]

    batch = pa.table({"image_id": [f"{i}.jpg" for i in range(4)], **decoded_columns(results)})
    stage = SegmentBatch.__new__(SegmentBatch)
    stage.segmenter = FlakySegmenter()
    out = stage(batch).to_pylist()
    assert [r["status"] for r in out] == ["ok", "error", "ok", "error"]
    assert (out[1]["error_kind"], out[3]["error_kind"]) == ("model", "empty")
    assert "cannot reshape" in out[1]["error"] and out[1]["payload"] is None
    assert pickle.loads(out[0]["payload"]) == {"size": results[0].prepared.original_size}


def test_a_corrupt_exif_block_is_the_images_error_row(coco_images):
    """Mutated EXIF bytes of a real photo make Pillow's exif_transpose raise struct.error (which
    escaped the decode stage and failed the task): now a ``corrupt`` row saying what broke."""
    import struct

    from odd_images import corrupt_exif_jpeg, exif_photo, exif_transpose_error

    intact, _, _ = exif_photo(coco_images[4])
    assert exif_transpose_error(intact) is None
    data = corrupt_exif_jpeg(coco_images[4])
    assert isinstance(exif_transpose_error(data), struct.error)  # Pillow itself, not our code
    result = decode_image(data, mode="faithful", max_pixels=100_000_000)
    assert result.prepared is None and result.error_kind == "corrupt"
    assert result.error.startswith("EXIF or mode conversion failed: error:"), result.error


def test_any_exception_while_preparing_an_image_is_its_unsupported_row(coco_images, monkeypatch):
    """An exception of any type from the method's preparation (here OpenCV's ``cv2.error``, which
    NACLIP's resize raised on a 1 x 5000 strip) is the image's ``unsupported`` row."""
    import cv2

    from clipdiy.segmentation.config import SegmenterConfig

    def failing_resize(*args, **kwargs):
        raise cv2.error("(-215:Assertion failed) inv_scale_x > 0 in function 'resize'")

    monkeypatch.setattr(cv2, "resize", failing_resize)
    result = decode_image(coco_images[0].read_bytes(), mode="faithful", max_pixels=100_000_000,
                          config=SegmenterConfig(method="naclip"))
    assert (result.prepared, result.error_kind) == (None, "unsupported")
    with Image.open(coco_images[0]) as image:
        width, height = image.size
    assert result.error == (f"naclip cannot prepare a {width} x {height} image: "
                            "error: (-215:Assertion failed) inv_scale_x > 0 in function 'resize'")


def test_objects_over_max_image_bytes_get_too_large_rows_without_being_read(coco_images, tmp_path, s3_server, s3_bucket):
    """The listed size is checked before reading (an object listed as larger is not read, even
    though its bytes would decode); an object listed smaller, or not at all, is read only up to
    the bound plus one byte, locally and on S3 (a ranged read)."""
    import pyarrow as pa

    from clipdiy.pipeline.stages.decode import DecodeBatch
    from clipdiy.storage import ObjectTooLargeError, open_filesystem, read_bytes

    photo = coco_images[0].read_bytes()
    bound = len(photo) + 10
    big = photo + b"\0" * 1000  # decodes (JPEG ignores trailing bytes), but over the bound
    (tmp_path / "photo.jpg").write_bytes(photo)
    (tmp_path / "big.jpg").write_bytes(big)
    s3_server.put_bytes(s3_bucket, "bound/photo.jpg", photo)
    s3_server.put_bytes(s3_bucket, "bound/big.jpg", big)
    uris = [f"file://{tmp_path}/photo.jpg", f"file://{tmp_path}/photo.jpg", f"file://{tmp_path}/big.jpg",
            f"s3://{s3_bucket}/bound/photo.jpg", f"s3://{s3_bucket}/bound/big.jpg"]
    listed = [len(photo), bound + 1, None, len(photo), len(photo)]  # the second and last are wrong listings
    batch = pa.table({"uri": uris, "image_id": [f"{i}.jpg" for i in range(5)],
                      "source_size": pa.array(listed, pa.int64())})
    decode = DecodeBatch(s3_server.options, "faithful", 100_000_000, 1, max_image_bytes=bound)
    rows = decode(batch).to_pylist()
    assert [(r["status"], r["error_kind"]) for r in rows] == [
        ("ok", None), ("error", "too_large"), ("error", "too_large"), ("ok", None), ("error", "too_large")]
    assert rows[1]["error"] == f"the object holds {bound + 1} bytes, more than --max-image-bytes {bound}; not read"
    assert rows[2]["error"] == rows[4]["error"] == (
        f"the object holds more than {bound} bytes (--max-image-bytes); not read further")

    # The reads themselves stop at the bound plus one byte.
    fs, path = open_filesystem(f"s3://{s3_bucket}/bound/big.jpg", s3_server.options)
    with pytest.raises(ObjectTooLargeError):
        read_bytes(fs, path, max_bytes=bound)
    assert read_bytes(fs, path, max_bytes=len(big)) == big
