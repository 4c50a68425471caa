"""The blocks the decode tasks take over shards are the size they are over loose objects, whatever
the shard's size: a shard is no longer one decode task (issue 24, the job's cost over shards).

A decode task's retry budget (``attempts.ray_task_retries``) counts on a task holding at most
``LISTING_BATCHES_PER_BLOCK`` decode batches (plus a remainder Ray Data bundles in front of a
full block); before the cut, Ray Data joined a shard's yielded blocks into one block of up to
128 MiB, so a shard of 500 thumbnails was one decode task of 500 rows."""

from __future__ import annotations

import tempfile
from collections import defaultdict
from pathlib import Path

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pipeline_support import local_ray
from shard_builders import write_img2dataset_shard

from clipdiy.pipeline.config import LISTING_BATCHES_PER_BLOCK

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_for_blocks():
    with local_ray() as ray:
        yield ray


def _decode_task_rows(folder: Path, decode_batch_size: int) -> tuple[dict[str, int], list[str]]:
    """Rows per task of a stand-in for the decode stage (its batch size, compute and CPU), and
    the image ids it saw, over the shards in ``folder`` expanded as the job's plan does."""
    import ray
    import ray.data

    from clipdiy.pipeline.planning.incremental import listing_table
    from clipdiy.pipeline.sources.formats import iter_shard_sources
    from clipdiy.pipeline.stages.dataset import expand_shards

    from clipdiy.pipeline.stages.stage_configs import ReadConfig
    from clipdiy.storage import StorageOptions

    read = ReadConfig(storage=StorageOptions(), input_format="webdataset", batch_size=decode_batch_size,
                      concurrency=None, max_pixels=10**8, max_image_bytes=None, read_attempts=1, read_deadline_s=None)
    pending = ray.data.from_arrow(listing_table(list(iter_shard_sources(str(folder), "webdataset"))))

    def decode_stand_in(batch: pa.Table) -> pa.Table:
        task = ray.get_runtime_context().get_task_id()
        return pa.table({"task": [task] * batch.num_rows, "image_id": batch.column("image_id")})

    seen = expand_shards(pending, read).map_batches(
        decode_stand_in, batch_size=decode_batch_size, batch_format="pyarrow", num_cpus=1,
        compute=ray.data.TaskPoolStrategy(size=2)).to_arrow_refs()
    table = pa.concat_tables(ray.get(seen))
    per_task: dict[str, int] = defaultdict(int)
    for task in table.column("task").to_pylist():
        per_task[task] += 1
    return dict(per_task), table.column("image_id").to_pylist()


@settings(max_examples=4)
@given(shard_sizes=st.lists(st.integers(1, 300), min_size=1, max_size=3), decode_batch_size=st.sampled_from([2, 4, 8]))
def test_decode_tasks_over_shards_hold_at_most_a_listing_block_whatever_the_shard_size(
        ray_for_blocks, shard_sizes, decode_batch_size):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        expected = []
        for number, size in enumerate(shard_sizes):
            keys = write_img2dataset_shard(folder, number, [b"\xff\xd8\xff%d" % i for i in range(size)], failed=0)
            expected += [f"{number:05d}.tar/{key}" for key in keys]
        per_task, seen = _decode_task_rows(folder, decode_batch_size)
    assert sorted(seen) == sorted(expected)  # every sample once
    block = decode_batch_size * LISTING_BATCHES_PER_BLOCK
    # A block, and at most a remainder smaller than one batch that Ray Data bundles in front of it.
    assert max(per_task.values()) < block + decode_batch_size, (per_task, shard_sizes)
