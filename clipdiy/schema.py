"""The versioned output schemas, read from ``schemas/*.json``: the one place they are defined.

The JSON files are data that users read too; this module turns the label-row schema into a
``pyarrow.Schema``. ``clipdiy/schemas`` is a link to the repository's ``schemas/`` folder, so the
package reads the very files users read, from a checkout or installed.
"""

from __future__ import annotations

import functools
import json
from importlib import resources
from pathlib import Path
from typing import Any

import pyarrow as pa

#: Version 2 appends nullable columns (``source_format`` .. ``origin_url``: where a sample of a
#: tar shard or Parquet file lies); rows of version 1 read with those columns null.
LABEL_SCHEMA_VERSION = "2"
LABEL_SCHEMA_FILE = f"label_row.v{LABEL_SCHEMA_VERSION}.json"
#: The run manifest's schema is versioned on its own (unchanged by label-row version 2).
MANIFEST_SCHEMA_VERSION = "1"
MANIFEST_SCHEMA_FILE = f"run_manifest.v{MANIFEST_SCHEMA_VERSION}.json"

_SCALARS = {
    "string": pa.string(),
    "int32": pa.int32(),
    "int64": pa.int64(),
    "float32": pa.float32(),
    "float64": pa.float64(),
    "bool": pa.bool_(),
    "binary": pa.binary(),
    "timestamp[us, UTC]": pa.timestamp("us", tz="UTC"),
}


def _arrow_type(spec: Any) -> pa.DataType:
    if isinstance(spec, str):
        if spec not in _SCALARS:
            raise ValueError(f"unknown schema type {spec!r}")
        return _SCALARS[spec]
    if "list" in spec:
        return pa.list_(_arrow_type(spec["list"]))
    if "struct" in spec:
        return pa.struct([_arrow_field(f) for f in spec["struct"]])
    raise ValueError(f"unknown schema type {spec!r}")


def _arrow_field(spec: dict) -> pa.Field:
    return pa.field(spec["name"], _arrow_type(spec["type"]), nullable=spec.get("nullable", True))


def schema_document(filename: str) -> dict:
    """The JSON document of a packaged schema file (e.g. ``label_row.v1.json``)."""
    text = resources.files("clipdiy").joinpath("schemas", filename).read_text(encoding="utf-8")
    return json.loads(text)


@functools.cache
def label_schema() -> pa.Schema:
    """The Arrow schema of a label row, with the schema version in its metadata."""
    doc = schema_document(LABEL_SCHEMA_FILE)
    fields = [_arrow_field(f) for f in doc["fields"]]
    return pa.schema(fields, metadata={"clipdiy.schema": doc["name"], "clipdiy.schema_version": doc["version"]})


def repository_schema_dir() -> Path:
    """``schemas/`` at the repository root (present in a source checkout only)."""
    return Path(__file__).resolve().parent.parent / "schemas"
