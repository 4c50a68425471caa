"""Copies of source images beside an export, fetched by each row's address.

A sample of a WebDataset shard or a Parquet file is no file a training framework or Label Studio
can open. The exports that must name an image file (COCO and VOC with ``images_to``, the Label
Studio tasks) write a copy of it: its bytes fetched by the row's address with one ranged read
(:mod:`clipdiy.image_address`), never by reading its shard, written under a folder at the
image's relative path. One image at a time: nothing here holds more than one image.
"""

from __future__ import annotations

import io
import posixpath
from typing import Any

from PIL import Image

from clipdiy.image_address import fetch_image_bytes
from clipdiy.storage import StorageOptions

#: Extensions a copy keeps from its image id; any other id gets the extension of its bytes' type.
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})


def relative_path(image_id: str) -> str:
    """The image id as a relative path below an export folder (a manifest input's ids are URIs:
    their scheme is dropped). Refuses an id that would climb out of the folder."""
    relative = image_id.replace("\\", "/").split("://", 1)[-1].lstrip("/")
    if ".." in relative.split("/"):
        raise ValueError(f"image id {image_id!r} would write outside the export folder")
    return relative


def extension_of(data: bytes) -> str:
    """``.jpg``, ``.png``... from the image's own header; "" when Pillow does not know it."""
    try:
        found = Image.open(io.BytesIO(data)).format
    except Exception:  # noqa: BLE001 - not an image Pillow knows: the bytes as they are, no extension
        return ""
    return {"JPEG": ".jpg", "TIFF": ".tif"}.get(found, f".{found.lower()}") if found else ""


def copy_name(image_id: str, data: bytes) -> str:
    """Where a copy goes below the folder: the id's relative path, with the type's extension
    added when the id has no image extension (a tar sample's key, a Parquet row)."""
    relative = relative_path(image_id)
    if posixpath.splitext(relative)[1].lower() not in IMAGE_EXTENSIONS:
        relative += extension_of(data)
    return relative


def write_copy(row: dict, fs: Any, root: str, storage: StorageOptions | None = None) -> str:
    """Fetch the row's image by its address and write it at ``root/<copy_name>`` of ``fs``;
    returns that relative name."""
    data = fetch_image_bytes(row, storage)
    name = copy_name(row["image_id"], data)
    path = posixpath.join(root, name)
    if posixpath.dirname(path):
        fs.makedirs(posixpath.dirname(path), exist_ok=True)
    fs.pipe_file(path, data)
    return name
