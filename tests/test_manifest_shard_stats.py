"""Finishing a resumed run: the manifest's shard records of earlier attempts are counted by Ray
tasks, not read shard after shard by the driver, and agree with the shards themselves."""

from __future__ import annotations

import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from labels_fixtures import LabelItem, write_labels_output


@pytest.fixture(scope="module")
def ray_session():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _independent_records(output, run_id) -> dict[str, dict]:
    """Rows, ok and bytes of each shard file, from the files themselves (not the code under test)."""
    records = {}
    folder = os.path.join(output, "runs", run_id)
    for name in sorted(os.listdir(folder)):
        if name.startswith("part-") and name.endswith(".parquet"):
            statuses = pq.ParquetFile(os.path.join(folder, name)).read(columns=["status"]).column("status").to_pylist()
            ok = statuses.count("ok")
            records[f"runs/{run_id}/{name}"] = {
                "path": f"runs/{run_id}/{name}", "rows": len(statuses), "ok": ok, "error": len(statuses) - ok,
                "bytes": os.path.getsize(os.path.join(folder, name)),
            }
    return records


@pytest.mark.slow  # starts Ray
def test_a_resumed_runs_shard_records_are_counted_in_tasks_and_match_the_shards(ray_session, tmp_path, monkeypatch):
    from clipdiy.output_layout import OutputLayout
    from clipdiy.pipeline.planning.manifest import shard_records

    label = np.zeros((4, 4), np.uint8)
    errors = {"error_kind": "decode", "error": "cannot identify image file"}
    items = [LabelItem(f"{i:03d}.jpg", f"file:///in/{i:03d}.jpg", None if i % 3 == 0 else label,
                       **(errors if i % 3 == 0 else {})) for i in range(40)]
    output = str(tmp_path / "labels")
    write_labels_output(output, items, run_id="run-r", finished=False, rows_per_shard=3)  # 14 shards
    expected = _independent_records(output, "run-r")
    assert len(expected) == 14 and sum(r["error"] for r in expected.values()) == 14
    # This process wrote the last shard (its record is known); the earlier attempts wrote the rest.
    mine = max(expected)
    known = {mine: dict(expected[mine])}

    driver_reads = []
    for name in ("read_table", "ParquetFile", "read_metadata"):
        real = getattr(pq, name)
        monkeypatch.setattr(pq, name, lambda *a, _real=real, _name=name, **k: driver_reads.append(_name) or _real(*a, **k))
    records = shard_records(OutputLayout.open(output), "run-r", known, tasks=4)

    assert records == [expected[path] for path in sorted(expected)]
    assert driver_reads == []  # the driver listed the folder and read no shard
