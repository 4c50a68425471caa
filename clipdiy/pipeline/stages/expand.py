"""Shard-expanding stage (Ray Data): pending shard rows -> one row per sample, bytes inline.

A task takes one shard (a tar or a Parquet file) and streams it: the tar through one buffered
sequential read (:data:`READ_BLOCK_BYTES` per ranged GET: a 500 MB shard of 10,000 images is ~60
requests), a Parquet file a row group at a time. Samples leave in blocks of ``block_rows``, so a
task holds one block of images, never a shard; Ray Data's streaming backpressure pauses a task
whose blocks are not consumed. The decode stage then decodes the inline bytes instead of reading.

A row's listing columns are the shard's (``uri``, ``source_size/etag/mtime``: its version);
its address columns (``source_*``, ``sample_key``, ``origin_url``) say where the bytes lie.
A shard that cannot be opened costs one row (``image_id`` = the shard's id).

Why not Ray Data's ``read_webdataset``/``read_parquet``: the rows must carry each image's
address (the member's data offset in the tar; not in ``read_webdataset``'s output), a shard's
damage must cost its rows rather than fail the read task, non-adjacent members of one key must
be an error row (ray#44068), and planning is per shard against OUTPUT's rows, so the read
takes the shard rows the planning left (with the samples to skip), not a path list.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pyarrow as pa

from clipdiy.pipeline.stages.health import classify_read_failure, read_error
from clipdiy.pipeline.sources.webdataset import ShardSample, is_compressed_name, iter_shard_samples, read_sidecar
from clipdiy.storage import StorageOptions, open_filesystem
from clipdiy.locations import Location
from clipdiy.uris import redact_text

logger = logging.getLogger(__name__)

#: Bytes per ranged GET of a streamed tar (fsspec read-ahead block).
READ_BLOCK_BYTES = 8 << 20
#: Column of the expanded rows holding the image bytes (dropped by the decode stage).
IMAGE_BYTES = "image_bytes"
#: Columns holding the error a sample has before any decoding (dropped by the decode stage).
PRESET_KIND, PRESET_ERROR = "preset_error_kind", "preset_error"
#: Per pending shard row: image ids already labelled (a resumed run), not expanded again.
SKIP_IDS = "skip_ids"

#: The address columns of the label row (schema v2), in order.
ADDRESS_FIELDS = [
    pa.field("source_format", pa.string()),
    pa.field("source_uri", pa.string()),
    pa.field("source_offset", pa.int64()),
    pa.field("source_length", pa.int64()),
    pa.field("source_row_group", pa.int32()),
    pa.field("source_row", pa.int64()),
    pa.field("sample_key", pa.string()),
    pa.field("origin_url", pa.string()),
]
SAMPLE_SCHEMA = pa.schema(
    [
        pa.field("uri", pa.string()),
        pa.field("image_id", pa.string()),
        pa.field("source_size", pa.int64()),
        pa.field("source_etag", pa.string()),
        pa.field("source_mtime", pa.timestamp("us", tz="UTC")),
        *ADDRESS_FIELDS,
        pa.field(IMAGE_BYTES, pa.large_binary()),
        pa.field(PRESET_KIND, pa.string()),
        pa.field(PRESET_ERROR, pa.string()),
    ]
)


class ExpandShards:
    """``map_batches`` function: shard rows -> sample rows (:data:`SAMPLE_SCHEMA`), a generator."""

    def __init__(self, storage: StorageOptions, input_format: str, block_rows: int, max_image_bytes: int | None,
                 image_column: str | None = None, id_column: str | None = None, health=None):
        self.storage = storage
        self.input_format = input_format
        self.block_rows = block_rows
        self.max_image_bytes = max_image_bytes
        self.image_column = image_column or "image"
        self.id_column = id_column
        # The run's RunHealth actor: a shard read is a read like a loose object's, so a store
        # that fails every shard stops the run (--stop-after-failed-reads) instead of writing a
        # row per shard.
        self.health = health

    def _report(self, failure: str | None, sample: str | None = None) -> None:
        if self.health is None:
            return
        if failure is None:
            self.health.record_reads.remote(1, {})
            return
        import ray

        from clipdiy.errors import RunFailedError

        verdict = ray.get(self.health.record_reads.remote(0, {failure: 1}, sample))
        if verdict is not None:
            raise RunFailedError(verdict)

    def __call__(self, batch: pa.Table) -> Iterator[pa.Table]:
        names = batch.column_names
        for row in batch.to_pylist():
            skip = frozenset(row.get(SKIP_IDS) or ()) if SKIP_IDS in names else frozenset()
            block = _SampleColumns()
            for sample, extra in self._samples(row, skip):
                block.add(sample, extra)
                if block.rows >= self.block_rows:
                    yield block.table(row, self.input_format)
                    block = _SampleColumns()
            if block.rows:
                yield block.table(row, self.input_format)

    def _samples(self, shard: dict, skip: frozenset) -> Iterator[tuple[ShardSample, dict]]:
        shard_id, public = shard["image_id"], shard["uri"]
        signed = shard.get("signed_uri")
        location = Location(signed if signed else public)
        opened = False  # a failure after the open is the shard's damage, not a failed read
        try:
            fs, path = open_filesystem(location, self.storage)
            if self.input_format == "parquet":
                with fs.open(path, "rb") as handle:
                    opened = True
                    self._report(None)
                    for sample, group, row in self._parquet(handle, shard_id, skip):
                        yield sample, {"row_group": group, "row": row}
                return
            sidecar = read_sidecar(fs, path)
            compressed = is_compressed_name(path)
            # A streamed read: fsspec's read-ahead cache fetches READ_BLOCK_BYTES per request.
            with fs.open(path, "rb", block_size=READ_BLOCK_BYTES, cache_type="readahead") as handle:
                opened = True
                self._report(None)
                for sample in iter_shard_samples(handle, shard_id, max_image_bytes=self.max_image_bytes, skip_ids=skip,
                                                 sidecar=sidecar, compressed_name=compressed):
                    yield sample, {}
        except Exception as error:  # noqa: BLE001 - a shard that does not read costs one row, naming it
            failure = classify_read_failure(error)
            kind, message = read_error(error, failure)
            # A library's exception may quote the location it was given (finding 7): named by
            # its public form, and any other URI in it redacted as text.
            message = redact_text(message.replace(location.reveal_for_read(), public))
            logger.warning("cannot read shard %s: %s", public, message)
            if not opened:
                self._report(failure, f"{public}: {message}")
            if shard_id not in skip:
                yield ShardSample(shard_id, None, error_kind=kind, error=f"shard {public}: {message}"), {}

    def _parquet(self, handle, shard_id: str, skip: frozenset):
        from clipdiy.pipeline.sources.parquet_images import iter_parquet_samples

        yield from iter_parquet_samples(handle, shard_id, image_column=self.image_column, id_column=self.id_column,
                                        max_image_bytes=self.max_image_bytes, skip_ids=skip)


class _SampleColumns:
    """One block of a shard's samples, gathered column by column: the shard's own columns (its
    listing and version, the format) are filled once per block, not copied into a dict per sample."""

    def __init__(self):
        self.rows = 0
        self.columns: dict[str, list] = {name: [] for name in (
            "image_id", "source_offset", "source_length", "source_row_group", "source_row", "sample_key",
            "origin_url", IMAGE_BYTES, PRESET_KIND, PRESET_ERROR)}

    def add(self, sample: ShardSample, extra: dict) -> None:
        columns = self.columns
        columns["image_id"].append(sample.image_id)
        columns["source_offset"].append(sample.offset)
        columns["source_length"].append(sample.length)
        columns["source_row_group"].append(extra.get("row_group"))
        columns["source_row"].append(extra.get("row"))
        columns["sample_key"].append(sample.sample_key)
        columns["origin_url"].append(sample.origin_url)
        columns[IMAGE_BYTES].append(sample.data)
        columns[PRESET_KIND].append(sample.error_kind)
        # A sample's error may quote a library's exception text (finding 7): redacted as text.
        columns[PRESET_ERROR].append(redact_text(sample.error))
        self.rows += 1

    def table(self, shard: dict, input_format: str) -> pa.Table:
        """The block as :data:`SAMPLE_SCHEMA` rows of ``shard`` (a pending shard row)."""
        shared = {"uri": shard["uri"], "source_size": shard["source_size"], "source_etag": shard["source_etag"],
                  "source_mtime": shard["source_mtime"], "source_format": input_format, "source_uri": shard["uri"]}
        arrays = []
        for field in SAMPLE_SCHEMA:
            if field.name in shared:
                arrays.append(pa.repeat(pa.scalar(shared[field.name], type=field.type), self.rows))
            else:
                arrays.append(pa.array(self.columns[field.name], type=field.type))
        return pa.Table.from_arrays(arrays, schema=SAMPLE_SCHEMA)
