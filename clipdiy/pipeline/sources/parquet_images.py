"""The rows of one Parquet file of images (the Hugging Face layout), read a row group at a time.

``image_column``: a binary column, or a struct with a ``bytes`` field (Hugging Face's
``{bytes, path}`` image feature). ``id_column`` (optional): the sample's id; without it the id
is the row's number in the file. A row's image id is ``<file id>/<id>``; its address is the row
group and the row within it.

Damage costs rows, not the run: a null or empty cell is an ``empty`` row (bytes that are not an
image get their row from the decoder); a row group that does not read is one ``corrupt`` row per
row it holds (the footer says how many); a file whose footer does not read is one row standing
for the file. Memory: one row group's two columns at a time.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator

import pyarrow as pa

from clipdiy.pipeline.sources.webdataset import ShardSample


def _image_bytes(column: pa.ChunkedArray | pa.Array) -> list[bytes | None]:
    """The image bytes of a column that is binary or a struct with a ``bytes`` field."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if pa.types.is_struct(column.type):
        column = column.field("bytes")
    return column.to_pylist()


def check_image_column(schema: pa.Schema, image_column: str, id_column: str | None) -> str | None:
    """Why ``schema`` cannot be read with these columns, or None."""
    if image_column not in schema.names:
        return f"no column {image_column!r} (columns: {', '.join(schema.names[:20])}); set --image-column"
    kind = schema.field(image_column).type
    binary = pa.types.is_binary(kind) or pa.types.is_large_binary(kind)
    if not binary and not (pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0):
        return f"column {image_column!r} is {kind}, neither binary nor a {{bytes, path}} struct"
    if id_column is not None and id_column not in schema.names:
        return f"no id column {id_column!r} (columns: {', '.join(schema.names[:20])})"
    return None


def iter_parquet_samples(
    handle, file_id: str, *, image_column: str, id_column: str | None = None,
    max_image_bytes: int | None = None, skip_ids: Collection[str] = (),
) -> Iterator[tuple[ShardSample, int, int]]:
    """(sample, row group, row in group) for every row of the Parquet file open in ``handle``."""
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(handle)
    except Exception as error:  # noqa: BLE001 - a file that is not Parquet costs its one row
        yield ShardSample(file_id, None, error_kind="corrupt", error=f"not a readable Parquet file: {type(error).__name__}: {error}"), None, None
        return
    problem = check_image_column(parquet.schema_arrow, image_column, id_column)
    if problem is not None:
        yield ShardSample(file_id, None, error_kind="unsupported", error=f"Parquet file {file_id}: {problem}"), None, None
        return
    columns = [image_column] + ([id_column] if id_column else [])
    first_row = 0
    for group in range(parquet.metadata.num_row_groups):
        rows = parquet.metadata.row_group(group).num_rows
        try:
            table = parquet.read_row_group(group, columns=columns)
            images = _image_bytes(table.column(image_column))
            ids = [None if v is None else str(v) for v in table.column(id_column).to_pylist()] if id_column else None
            if len(images) != rows:
                raise ValueError(f"row group {group} holds {len(images)} rows, its footer says {rows}")
        except Exception as error:  # noqa: BLE001 - a damaged row group costs its rows only
            message = f"row group {group} of {file_id} does not read: {type(error).__name__}: {str(error)[:200]}"
            for row in range(rows):
                key = str(first_row + row)
                image_id = f"{file_id}/{key}"
                if image_id not in skip_ids:
                    yield ShardSample(image_id, key, error_kind="corrupt", error=message), group, row
            first_row += rows
            continue
        for row, data in enumerate(images):
            key = ids[row] if ids is not None and ids[row] is not None else str(first_row + row)
            image_id = f"{file_id}/{key}"
            if image_id in skip_ids:
                continue
            sample = ShardSample(image_id, key, data=data)
            if not data:
                sample.data, sample.error_kind, sample.error = None, "empty", f"the {image_column!r} cell is null or empty"
            elif max_image_bytes is not None and len(data) > max_image_bytes:
                sample.data, sample.error_kind = None, "too_large"
                sample.error = f"the cell holds {len(data)} bytes, more than --max-image-bytes {max_image_bytes}"
            yield sample, group, row
        first_row += rows
