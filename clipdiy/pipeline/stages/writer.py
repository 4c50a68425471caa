"""Shard writer stage: label rows -> Parquet shards with deterministic names, written atomically.

Used as a ``map_batches`` task with ``batch_size = rows_per_file``, so no shard holds more rows
than that. Each call writes one shard and returns one stats row (:data:`SHARD_STATS_SCHEMA`),
which the driver collects for progress and the run manifest.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from clipdiy.locations import Location, as_location
from clipdiy.output_layout import OutputLayout, shard_name
from clipdiy.schema import label_schema
from clipdiy.storage import StorageOptions

SHARD_STATS_SCHEMA = pa.schema(
    [
        pa.field("path", pa.string()),  # relative to OUTPUT
        pa.field("rows", pa.int64()),
        pa.field("ok", pa.int64()),
        pa.field("error", pa.int64()),
        pa.field("bytes", pa.int64()),
        # JSON {error kind: rows}: the driver's error budget names the dominant kind from it.
        pa.field("error_kinds", pa.string()),
    ]
)
#: The stats fields a run manifest records per shard (``error_kinds`` serves only the driver).
MANIFEST_SHARD_FIELDS = ("path", "rows", "ok", "error", "bytes")

def encode_shard(table: pa.Table) -> bytes:
    """Parquet bytes of a label-row table (zstd; the schema's metadata kept)."""
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


def shard_stats(path: str, table: pa.Table, size: int) -> dict:
    ok = int(pc.sum(pc.equal(table.column("status"), "ok")).as_py() or 0)
    kinds = pc.value_counts(pc.drop_null(table.column("error_kind"))).to_pylist() if ok < table.num_rows else []
    error_kinds = json.dumps({entry["values"]: entry["counts"] for entry in kinds}, sort_keys=True)
    return {"path": path, "rows": table.num_rows, "ok": ok, "error": table.num_rows - ok, "bytes": size,
            "error_kinds": error_kinds}


@dataclass(frozen=True)
class ShardTarget:
    """Where one run attempt writes: OUTPUT, its storage options, the run id and attempt number."""

    output: Location  # OUTPUT as given (a str is taken as one): travels pickled to the writers
    storage: StorageOptions
    run_id: str
    attempt: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "output", as_location(self.output))


def write_shard(batch: pa.Table, *, target: ShardTarget) -> pa.Table:
    """Write ``batch`` (label rows) as one shard; return its one-row stats table."""
    table = batch.select(label_schema().names).cast(label_schema())
    # Named by the batch's content (its image ids): a retried task sees the same batches and
    # rewrites the same names, so a retry never duplicates rows, and two batches never collide.
    digest = hashlib.sha256("\n".join(table.column("image_id").to_pylist()).encode("utf-8")).hexdigest()[:20]
    layout = OutputLayout.open(target.output, target.storage)
    path = layout.path("runs", target.run_id, shard_name(target.attempt, digest))
    data = encode_shard(table)
    layout.write_bytes_atomic(path, data)
    return pa.Table.from_pylist([shard_stats(layout.relative(path), table, len(data))], schema=SHARD_STATS_SCHEMA)
