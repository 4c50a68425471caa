"""Tar shards, img2dataset folders and Parquet files of images that tests build themselves
(good ones and the hostile ones of issue 24, section 3)."""

from __future__ import annotations

import gzip
import io
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


def tar_bytes(members: list[tuple[str, bytes]], fmt: int = tarfile.GNU_FORMAT) -> bytes:
    """A tar holding ``members`` (name, data) in order, written by Python's tarfile."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def data_offsets(raw: bytes) -> dict[str, tuple[int, int]]:
    """name -> (data offset, size) of each regular member, as Python's tarfile reads them (the
    independent reference for the job's own reader)."""
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r:") as tar:
        return {m.name: (m.offset_data, m.size) for m in tar.getmembers() if m.isfile()}


def sample_members(key: str, image: bytes, caption: str = "a caption") -> list[tuple[str, bytes]]:
    """img2dataset's members of one sample: KEY.jpg, KEY.txt, KEY.json."""
    return [(f"{key}.jpg", image), (f"{key}.txt", caption.encode()), (f"{key}.json", b'{"key": "%s"}' % key.encode())]


def write_img2dataset_shard(folder: Path, number: int, images: list[bytes], *, failed: int = 1,
                            first_key: int = 0) -> list[str]:
    """``NNNNN.tar`` + ``NNNNN.parquet`` + ``NNNNN_stats.json`` as img2dataset writes them:
    ``images`` as successful samples, ``failed`` more keys with status ``failed_to_download``
    and no member. Returns the successful keys."""
    keys = [f"{number:05d}{first_key + i:04d}" for i in range(len(images) + failed)]
    members = [m for key, image in zip(keys, images) for m in sample_members(key, image)]
    (folder / f"{number:05d}.tar").write_bytes(tar_bytes(members))
    pq.write_table(
        pa.table({
            "key": keys,
            "status": ["success"] * len(images) + ["failed_to_download"] * failed,
            "url": [f"https://user:secret@images.example.com/{key}.jpg?X-Amz-Signature=s3cret&w=1" for key in keys],
            "caption": ["a caption"] * len(keys),
        }),
        folder / f"{number:05d}.parquet",
    )
    (folder / f"{number:05d}_stats.json").write_text('{"count": %d}' % len(keys))
    return keys[: len(images)]


def hostile_shards(folder: Path, good: bytes, big: bytes) -> dict[str, dict]:
    """Write the hostile tar shards of section 3 into ``folder``; returns, per shard name, the
    rows each must cost: ``ok`` sample keys labelled, ``errors`` {image id: error kind}."""
    expected: dict[str, dict] = {}

    raw = tar_bytes(sample_members("a", good) + sample_members("b", good) + sample_members("c", good))
    offsets = data_offsets(raw)
    cut = offsets["c.jpg"][0] + 100  # the last image member cut short
    (folder / "truncated.tar").write_bytes(raw[:cut])
    expected["truncated.tar"] = {"ok": ["a", "b"], "errors": {"truncated.tar/c": "truncated"}}

    (folder / "notatar.tar").write_bytes(b"this is not a tar file at all\n" * 50)
    expected["notatar.tar"] = {"ok": [], "errors": {"notatar.tar": "corrupt"}}

    members = [("x.jpg", b"plain text in a member named jpg"), ("noimage.txt", b"text only"), ("noimage.json", b"{}"),
               ("y.jpg", good), ("z.png", big), ("y.txt", b"late member of y")]
    (folder / "mixed.tar").write_bytes(tar_bytes(members))
    expected["mixed.tar"] = {"ok": ["y"], "errors": {"mixed.tar/x": "not_image", "mixed.tar/noimage": "not_image",
                                                     "mixed.tar/z": "too_large", "mixed.tar/y#2": "duplicate"}}

    (folder / "packed.tar.gz").write_bytes(gzip.compress(tar_bytes(sample_members("g", good))))
    expected["packed.tar.gz"] = {"ok": [], "errors": {"packed.tar.gz": "unsupported"}}
    return expected


def parquet_images(path: Path, images: list[bytes | None], *, struct: bool, ids: list[str] | None = None,
                   row_group_size: int = 2) -> None:
    """A Hugging Face-layout Parquet file: column ``image`` ({bytes, path} struct or binary)."""
    if struct:
        column = pa.array([None if b is None else {"bytes": b, "path": f"{i}.jpg"} for i, b in enumerate(images)],
                          pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())]))
    else:
        column = pa.array(images, pa.binary())
    table = pa.table({"image": column, **({"id": ids} if ids is not None else {})})
    pq.write_table(table, path, row_group_size=row_group_size, compression="none", write_statistics=False)


def corrupt_row_group(path: Path, group: int) -> None:
    """Overwrite the page header of ``group``'s image column chunk with garbage."""
    metadata = pq.ParquetFile(path).metadata
    offset = metadata.row_group(group).column(0).data_page_offset
    raw = bytearray(path.read_bytes())
    raw[offset: offset + 16] = b"\xff" * 16
    path.write_bytes(bytes(raw))
