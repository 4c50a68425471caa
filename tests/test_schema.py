"""The output schemas are data in schemas/, and the package reads those very files."""

from __future__ import annotations

import json

import pyarrow as pa

from clipdiy import schema


def test_label_schema_is_built_from_the_repository_file():
    document = json.loads((schema.repository_schema_dir() / schema.LABEL_SCHEMA_FILE).read_text())
    arrow = schema.label_schema()
    assert arrow.names == [field["name"] for field in document["fields"]]
    assert arrow.metadata[b"clipdiy.schema_version"] == document["version"].encode()
    for field in document["fields"]:
        assert arrow.field(field["name"]).nullable == field["nullable"]


def test_label_schema_types():
    arrow = schema.label_schema()
    masks = arrow.field("masks").type
    assert pa.types.is_list(masks)
    entry = masks.value_type
    assert [entry.field(i).name for i in range(entry.num_fields)] == [
        "class_id", "class_name", "rle_size", "rle_counts", "area", "bbox", "score"
    ]
    assert arrow.field("run_started_at").type == pa.timestamp("us", tz="UTC")
    assert arrow.field("class_scores").type == pa.list_(pa.float32())


def test_manifest_schema_document_is_readable():
    document = schema.schema_document(schema.MANIFEST_SCHEMA_FILE)
    names = {field["name"] for field in document["fields"]}
    assert {"run_id", "counts", "shards", "options", "versions"} <= names
