"""Decode under generated damage to real photos (issue 26, section 1).

Invariant: whatever the bytes (a real photo in any format Pillow writes, then truncated,
bit-flipped, its header overwritten or spliced), the decode stage returns one result: a prepared
image, or an error kind of the row schema with a message; no exception leaves it.
"""

from __future__ import annotations

import io
import warnings

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from clipdiy.pipeline.stages.decode import ERROR_KINDS, DecodeBatch, decode_image


def _every_written_format(photo) -> dict[str, bytes]:
    """A small crop of a real photo saved in each format this Pillow can write."""
    Image.init()  # registers every plugin (Image.SAVE is filled lazily)
    image = Image.open(photo).convert("RGB").resize((48, 36))
    written = {}
    for name in sorted(Image.SAVE):
        buffer = io.BytesIO()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                image.save(buffer, format=name)
        except Exception:  # noqa: BLE001, S112 - a format that cannot hold this image (mode, size)
            continue
        written[name] = buffer.getvalue()
    return written


@pytest.fixture(scope="module")
def formats(coco_images):
    written = _every_written_format(coco_images[0])
    assert {"JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP", "PPM"} <= set(written)
    return written


@st.composite
def damaged(draw, originals: dict[str, bytes]):
    name = draw(st.sampled_from(sorted(originals)))
    data = bytearray(originals[name])
    for _ in range(draw(st.integers(1, 3))):
        how = draw(st.sampled_from(["truncate", "flip", "header", "splice"]))
        if how == "truncate" and data:
            del data[draw(st.integers(0, len(data) - 1)):]
        elif how == "flip" and data:
            for _ in range(draw(st.integers(1, 8))):
                at = draw(st.integers(0, len(data) - 1))
                data[at] ^= 1 << draw(st.integers(0, 7))
        elif how == "header":
            edit = draw(st.binary(min_size=1, max_size=16))
            at = draw(st.integers(0, min(64, len(data))))
            data[at:at + len(edit)] = edit
        else:
            at = draw(st.integers(0, len(data)))
            data[at:at] = draw(st.binary(max_size=32))
    return name, bytes(data)


def _check(result) -> None:
    if result.prepared is None:
        assert result.error_kind in ERROR_KINDS and isinstance(result.error, str) and result.error
    else:
        assert result.error_kind is None


def test_every_written_format_decodes_intact(formats):
    for data in formats.values():
        _check(decode_image(data, mode="faithful", max_pixels=10**7))


@settings(max_examples=150)
@given(data=st.data())
def test_damaged_photos_in_every_format_are_one_result_never_an_exception(formats, data):
    _, damaged_bytes = data.draw(damaged(formats))
    _check(decode_image(damaged_bytes, mode="faithful", max_pixels=10**7))


@settings(max_examples=10)
@given(data=st.data())
def test_the_decode_stage_gives_each_damaged_file_one_row(formats, data, tmp_path_factory):
    folder = tmp_path_factory.mktemp("damaged")
    files = []
    for i in range(4):
        name, payload = data.draw(damaged(formats))
        path = folder / f"{i}.{name.lower()}"
        path.write_bytes(payload)
        files.append(path)
    batch = pa.table({"image_id": [p.name for p in files], "uri": [f"file://{p}" for p in files],
                      "source_size": pa.array([p.stat().st_size for p in files], pa.int64())})
    out = DecodeBatch(None, "faithful", 10**7, 1, max_image_bytes=10**6)(batch).to_pylist()
    assert [row["image_id"] for row in out] == [p.name for p in files]
    for row in out:
        assert row["status"] in ("ok", "error")
        assert (row["status"] == "ok") == (row["error_kind"] is None)
