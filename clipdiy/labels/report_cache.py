"""The run report's per-run aggregates, computed once and kept under OUTPUT.

A finished run's aggregates (:class:`~clipdiy.labels.night_stats.NightStats`: counts, errors,
models, per-class sums, histograms) depend on that run's own rows only, so the report computes
them the first time it sees the run and writes them to ``OUTPUT/_report/<run folder>.json``; a
later report reads that small file (a few KB) instead of the run's shards and manifest. So a
nightly report reads, per old run, one file info and one small file: its bytes do not grow with
the rows of the history, and it holds one manifest at a time, never all of them.

A cached file is used only when all of these hold, else the run is read again and the file
rewritten (never a wrong report):

- its ``format`` is :data:`FORMAT` (a file of another format version is recomputed);
- its checksum (SHA-256 of its payload) matches: a torn, truncated or edited file is recomputed;
- it names the same run folder and the same ``bins``;
- its ``manifest`` identity equals that of the run's ``_MANIFEST.json`` now (size, modification
  time and inode locally; size, ETag and modification time on object stores): a run whose
  manifest was written again (released again, resumed, corrected in place) is recomputed;
- its payload reads back as a night whose counts add up (:meth:`NightStats.from_document`).

Writes are atomic (a temporary name then a rename locally, one PUT on object stores,
:meth:`~clipdiy.output_layout.OutputLayout.write_bytes_atomic`), so a reader sees a whole file
or none; two reports writing one file write the same bytes. The report takes no lock: a job
writing a new run is never blocked, and a run without its manifest yet (unfinished) is neither
read nor cached. Where OUTPUT cannot be written (read-only), the report says so once and goes on
reading every run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
from dataclasses import dataclass, field

from fsspec.implementations.local import LocalFileSystem

from clipdiy.errors import OutputWriteError
from clipdiy.labels.night_stats import (
    AGGREGATE_COLUMNS,
    NIGHT_MANIFEST_FIELDS,
    NightStats,
    _aggregate_shard,
)
from clipdiy.labels.runs import Run, RunFolder, read_shard
from clipdiy.output_layout import MANIFEST_FILE, OutputLayout
from clipdiy.uris import redact_document, redact_text

logger = logging.getLogger(__name__)

#: The folder under OUTPUT holding the cached aggregates, one file per run folder.
CACHE_DIR = "_report"
#: The format of a cached file; a file of any other is recomputed. Raise it whenever what a
#: file holds, or how a night is aggregated, changes.
FORMAT = 1
#: The file-info fields that identify a manifest's content on object stores (those present).
_IDENTITY_FIELDS = ("size", "ETag", "etag", "LastModified", "last_modified", "mtime", "VersionId", "generation",
                    "md5Hash")


def is_correction_run(run: Run) -> bool:
    """A run written by ``jobs/review.py import`` (human corrections), not by the labelling job."""
    return (run.manifest or {}).get("options", {}).get("source") == "human"


@dataclass
class RunSummary:
    """What the report needs of one finished run without reading it again: ``night`` is its
    aggregates (``None`` for a run of human corrections, which is not a night); ``shards`` its
    number of shards; ``folder`` where to read it when the report needs its rows."""

    run_id: str
    started_at: str
    correction: bool
    shards: int
    night: NightStats | None
    folder: RunFolder = field(repr=False)

    @property
    def order(self) -> tuple[str, str]:
        """The report's order of runs: start, then id."""
        return (self.started_at, self.run_id)


def manifest_identity(folder: RunFolder) -> dict | None:
    """What identifies the run's manifest as written now, from its file info alone (its body is
    not read); ``None`` when it has none (an unfinished run)."""
    path = posixpath.join(folder.path, MANIFEST_FILE)
    if isinstance(folder.fs, LocalFileSystem):
        try:
            stat = os.stat(path)
        except FileNotFoundError:
            return None
        # Nanosecond times and the inode: a rewrite in place changes ctime, a rename the inode.
        return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "ctime_ns": stat.st_ctime_ns, "ino": stat.st_ino}
    folder.fs.invalidate_cache(folder.path)
    try:
        info = folder.fs.info(path)
    except FileNotFoundError:
        return None
    return {name: str(info[name]) for name in _IDENTITY_FIELDS if info.get(name) is not None}


def _checksum(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


class StatsCache:
    """Per-run summaries for one report: from ``OUTPUT/_report/`` where valid, else computed from
    the run's shards (and written there when ``write``). Counts what it did: ``hits`` (runs from
    the cache), ``computed`` (runs read), ``shards_read``, ``rejected`` (files found but not valid)."""

    def __init__(self, bins: int, *, enabled: bool = True):
        self.bins, self.enabled = bins, enabled
        self.hits = self.computed = self.shards_read = self.rejected = 0
        self._unwritable: set[str] = set()

    def path(self, folder: RunFolder) -> str:
        return posixpath.join(folder.output_root, CACHE_DIR, f"{folder.name}.json")

    def summary(self, folder: RunFolder) -> RunSummary | None:
        """The run's summary; ``None`` when the run is not finished."""
        identity = manifest_identity(folder)
        if identity is None:
            return None
        if self.enabled:
            cached = self._read(folder, identity)
            if cached is not None:
                self.hits += 1
                return cached
        # The identity was taken before the manifest is read: should the manifest change in
        # between, the file written below names the older identity and the next report
        # recomputes it.
        summary = self._compute(folder)
        if summary is not None and self.enabled:
            self._write(folder, identity, summary)
        return summary

    def _compute(self, folder: RunFolder) -> RunSummary | None:
        run = folder.load()
        if not run.finished:
            return None
        if run.class_names is None:
            raise ValueError(f"run {run.run_id}: its manifest names no vocabulary")
        self.computed += 1
        started_at = str(run.manifest.get("started_at", ""))
        correction = is_correction_run(run)
        night = None
        if not correction:
            kept = {name: run.manifest[name] for name in NIGHT_MANIFEST_FIELDS if name in run.manifest}
            night = NightStats(run.run_id, started_at, run.class_names, self.bins, kept)
            for shard in run.shards:
                table = read_shard(run, shard, AGGREGATE_COLUMNS)
                self.shards_read += 1
                _aggregate_shard(night, table)
                del table
            # As the cache keeps it (model values redacted): a report from the cache and one
            # from the shards show the same night.
            night = NightStats.from_document(redact_document(night.to_document()))
        return RunSummary(run.run_id, started_at, correction, len(run.shards), night, folder)

    def _read(self, folder: RunFolder, identity: dict) -> RunSummary | None:
        path = self.path(folder)
        try:
            with folder.fs.open(path, "rb") as file:
                document = json.loads(file.read().decode("utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as error:  # unreadable or not JSON (torn): read the run instead
            self._reject(folder, f"{type(error).__name__}: {error}")
            return None
        try:
            return self._decode(document, folder, identity)
        except ValueError as error:
            self._reject(folder, str(error))
            return None

    def _decode(self, document: object, folder: RunFolder, identity: dict) -> RunSummary:
        if not isinstance(document, dict) or not isinstance(document.get("payload"), dict):
            raise ValueError("not a cached run summary")  # noqa: TRY004 - one error for every malformed file
        if document.get("format") != FORMAT:
            raise ValueError(f"format {document.get('format')!r}, not {FORMAT}")
        payload = document["payload"]
        if document.get("checksum") != _checksum(payload):
            raise ValueError("checksum mismatch")
        if payload.get("folder") != folder.name or payload.get("bins") != self.bins:
            raise ValueError("another run folder or another number of bins")
        if payload.get("manifest") != identity:
            raise ValueError("the run's manifest changed since")
        night = None if payload.get("night") is None else NightStats.from_document(payload["night"])
        if night is not None and night.bins != self.bins:
            raise ValueError("another number of bins")
        correction, shards = payload.get("correction"), payload.get("shards")
        if not isinstance(correction, bool) or correction != (night is None) or not isinstance(shards, int) or shards < 0:
            raise ValueError("a malformed summary")
        return RunSummary(str(payload.get("run_id")), str(payload.get("started_at")), correction, shards, night, folder)

    def _reject(self, folder: RunFolder, reason: str) -> None:
        self.rejected += 1
        logger.warning("report cache %s not used (%s): reading run %s again", CACHE_DIR + "/" + folder.name + ".json",
                       redact_text(reason), folder.name)

    def _write(self, folder: RunFolder, identity: dict, summary: RunSummary) -> None:
        payload = {
            "folder": folder.name, "bins": self.bins, "manifest": identity, "run_id": summary.run_id,
            "started_at": summary.started_at, "correction": summary.correction, "shards": summary.shards,
            # Redacted in _compute (a weights URI in a model column could carry a credential).
            "night": None if summary.night is None else summary.night.to_document(),
        }
        document = {"format": FORMAT, "checksum": _checksum(payload), "payload": payload}
        layout = OutputLayout(fs=folder.fs, root=folder.output_root, uri=folder.output_root)
        try:
            layout.write_bytes_atomic(self.path(folder), json.dumps(document, sort_keys=True).encode())
        except (OSError, OutputWriteError) as error:
            if folder.output_root not in self._unwritable:
                self._unwritable.add(folder.output_root)
                logger.warning("the report cannot keep its per-run aggregates under %s (%s): every report reads "
                               "every run", redact_text(layout.where(layout.path(CACHE_DIR))), redact_text(str(error)))
