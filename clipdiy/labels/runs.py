"""The runs of a labels output: which runs there are, which shards each holds, reading one shard.

Paths follow :mod:`clipdiy.output_layout`, the rules the job writes by: ``OUTPUT/runs/<run_id>/``
holds a run's committed ``part-*.parquet`` shards and, written last, ``_MANIFEST.json``; a run
without it is unfinished.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from clipdiy.output_layout import MANIFEST_FILE, RUNS_DIR, SHARD_PREFIX, SHARD_SUFFIX
from clipdiy.schema import label_schema
from clipdiy.storage import StorageOptions, open_filesystem


@dataclass(frozen=True)
class Run:
    """One run of a labels output.

    ``path``: the run folder inside ``fs``; ``shards``: its Parquet files inside ``fs``;
    ``manifest``: the parsed ``_MANIFEST.json``, ``None`` for an unfinished run.
    """

    run_id: str
    path: str
    shards: tuple[str, ...]
    manifest: dict | None
    fs: Any = field(repr=False, compare=False)

    @property
    def finished(self) -> bool:
        return self.manifest is not None

    @property
    def class_names(self) -> tuple[str, ...] | None:
        """The run's vocabulary (index = class id), from its manifest."""
        if self.manifest is None:
            return None
        names = self.manifest.get("vocabulary", {}).get("class_names")
        return tuple(names) if names else None


def _load_manifest(fs: Any, run_path: str) -> dict | None:
    manifest_path = posixpath.join(run_path, MANIFEST_FILE)
    if not fs.exists(manifest_path):
        return None
    with fs.open(manifest_path, "rb") as file:
        manifest = json.load(file)
    if manifest.get("status", "finished") != "finished":
        return None
    return manifest


def _run_at(fs: Any, output_root: str, run_path: str) -> Run:
    manifest = _load_manifest(fs, run_path)
    # Committed shards only: in-flight files are named ``.tmp-*``.
    shards = sorted(
        p for p in fs.ls(run_path, detail=False)
        if posixpath.basename(p).startswith(SHARD_PREFIX) and p.endswith(SHARD_SUFFIX)
    )
    if manifest is not None and manifest.get("shards"):
        # A finished run is exactly the shards its manifest lists (paths relative to OUTPUT):
        # stray files of a killed attempt are not part of it.
        listed = []
        for shard in manifest["shards"]:
            relative = shard["path"] if isinstance(shard, dict) else str(shard)
            candidates = [posixpath.join(output_root, relative), posixpath.join(run_path, posixpath.basename(relative))]
            found = next((c for c in candidates if fs.exists(c)), None)
            if found is None:
                raise FileNotFoundError(f"run {posixpath.basename(run_path)}: manifest lists shard {relative!r}, which is missing")
            listed.append(found)
        shards = sorted(listed)
    run_id = manifest.get("run_id", posixpath.basename(run_path)) if manifest else posixpath.basename(run_path)
    return Run(run_id=run_id, path=run_path, shards=tuple(shards), manifest=manifest, fs=fs)


@dataclass(frozen=True)
class RunFolder:
    """One run folder of a labels output, not read yet: ``path`` inside ``fs``; ``output_root``
    the OUTPUT it belongs to (where the job's paths are relative to)."""

    fs: Any = field(repr=False, compare=False)
    output_root: str = ""
    path: str = ""

    @property
    def name(self) -> str:
        return posixpath.basename(self.path)

    def load(self) -> Run:
        """The run: its manifest read (``None`` when unfinished) and its shards found."""
        return _run_at(self.fs, self.output_root, self.path)


def run_folders(outputs: str | Sequence[str], *, storage: StorageOptions | None = None) -> Iterator[RunFolder]:
    """The run folders of one or more labels outputs, one at a time, nothing read in them: a
    reader that needs one run at a time (the report) holds one manifest, not all of them.

    Each URI is either an output root (holding ``runs/``) or one run folder."""
    uris = [outputs] if isinstance(outputs, str) else list(outputs)
    if not uris:
        raise ValueError("no labels output given")
    for uri in uris:
        fs, root = open_filesystem(uri, storage)
        if not fs.exists(root):
            raise FileNotFoundError(f"labels output {uri} does not exist")
        runs_dir = posixpath.join(root, RUNS_DIR)
        fs.invalidate_cache(runs_dir)  # a job may be adding a run now: never a stale listing
        if fs.isdir(runs_dir):
            # One listing with details (no request per entry to ask whether it is a folder).
            entries = fs.ls(runs_dir, detail=True)
            for path in sorted(e["name"].rstrip("/") for e in entries if e.get("type") == "directory"):
                yield RunFolder(fs, root, path)
        else:
            # A run folder given directly: OUTPUT is two levels up.
            yield RunFolder(fs, posixpath.dirname(posixpath.dirname(root)), root)


def list_runs(
    outputs: str | Sequence[str], *, finished_only: bool = True, storage: StorageOptions | None = None
) -> list[Run]:
    """The runs of one or more labels outputs (:func:`run_folders`, each read).

    With ``finished_only`` (the default), runs without a manifest are left out.
    """
    runs = [folder.load() for folder in run_folders(outputs, storage=storage)]
    if finished_only:
        runs = [r for r in runs if r.finished]
    return runs


def vocabulary_of(runs: Sequence[Run]) -> tuple[str, ...]:
    """The one vocabulary (class names, index = class id) shared by the runs' manifests."""
    names = {r.class_names for r in runs if r.class_names is not None}
    if not names:
        raise ValueError("none of the runs has a manifest naming its vocabulary; pass the vocabulary explicitly")
    if len(names) > 1:
        raise ValueError(f"the runs use different vocabularies: {sorted(len(n) for n in names)} classes; read them separately")
    return names.pop()


def read_shard(run: Run, shard: str, columns: Sequence[str] | None = None, optional: Sequence[str] = ()) -> pa.Table:
    """One Parquet shard of a run as a table. A column of the label schema that the shard
    predates (``source``, say, in rows written before it existed) comes back all null.
    ``optional`` columns (with ``columns``) come too where the shard or the label schema has
    them, and are left out otherwise (the image address columns: a row without them is a loose
    object at its ``uri``, :mod:`clipdiy.image_address`)."""
    with run.fs.open(shard, "rb") as file:
        if not columns:
            return pq.read_table(file)
        parquet = pq.ParquetFile(file)
        present = set(parquet.schema_arrow.names)
        known = present | set(label_schema().names)
        columns = list(dict.fromkeys([*columns, *(c for c in optional if c in known)]))
        table = parquet.read(columns=[c for c in columns if c in present])
    for name in columns:
        if name not in present:
            schema = label_schema()
            if name not in schema.names:
                raise KeyError(f"{shard} has no column {name!r}, and the label schema has none either")
            table = table.append_column(schema.field(name), pa.nulls(table.num_rows, schema.field(name).type))
    return table.select(list(columns))
