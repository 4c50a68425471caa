"""The key pass of ``build_row_index`` over more rows than it may hold: spilled to disk and resolved
id range by id range, it picks exactly the rows a brute-force reading of the rule picks, holds at
most ``max_keys_in_memory`` keys at once, and leaves nothing on disk."""

from __future__ import annotations

import datetime as dt
import os
import random
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from labels_fixtures import LabelItem, add_shard, write_labels_output

from clipdiy.labels import key_partitions, row_index
from clipdiy.labels.row_index import build_row_index
from clipdiy.labels.runs import Run, list_runs

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


# ---------------------------------------------------------------- the rule, by brute force

def _attempt(shard_path: str) -> int:
    match = re.match(r"part-(\d+)-", os.path.basename(shard_path))
    return int(match.group(1)) if match else 0


def brute_force(shards: list[tuple[str, str, list[dict]]], kept=lambda row: True):
    """(losers, sorted_positions) by plain Python over every row, straight from the documented
    rule: the latest ``run_started_at``, then the greatest ``run_id``, then the later attempt
    (``part-AAA-``), then the later shard name, then the later row. ``shards``: (run_id, shard
    path, rows as dicts with ``image_id`` and ``run_started_at``) in reading order."""
    best: dict[str, tuple] = {}
    position = 0
    for number, (_, path, rows) in enumerate(shards):
        for row_number, row in enumerate(rows):
            rank = (row["run_started_at"], row["run_id"], _attempt(path), os.path.basename(path), row_number)
            if row["image_id"] not in best or rank > best[row["image_id"]][0]:
                best[row["image_id"]] = (rank, number, row_number, position, kept(row))
            position += 1
    winners = {(number, row_number) for _, number, row_number, _, _ in best.values()}
    losers = {}
    for number, (_, _, rows) in enumerate(shards):
        lost = [r for r in range(len(rows)) if (number, r) not in winners]
        if lost:
            losers[number] = lost
    ordered = [best[image_id][3] for image_id in sorted(best) if best[image_id][4]]
    return losers, ordered


def assert_index(index, expected_losers, expected_positions):
    assert {k: v.tolist() for k, v in index.losers.items()} == expected_losers
    if expected_positions is not None:
        assert index.sorted_positions.dtype == np.int64
        assert index.sorted_positions.tolist() == expected_positions


# ---------------------------------------------------------------- random multi-run outputs

def _random_output(root: str, seed: int) -> None:
    """Three to four runs over a small id space: ids repeated across runs, across shards of a run,
    inside one shard, in a later attempt's shard; two runs started at the same instant (the run_id
    decides); ok and error rows; non-ASCII ids."""
    rng = random.Random(seed)
    names = [f"img/{i:03d}.png" for i in range(25)] + ["img/é.png", "img/Ω.png", "img/z-ß.png"]
    label = np.ones((2, 2), np.uint8)

    def items(count: int) -> list[LabelItem]:
        return [LabelItem(rng.choice(names), "unused", label if rng.random() < 0.6 else None) for _ in range(count)]

    starts = [T0, T0 + dt.timedelta(days=2), T0 + dt.timedelta(days=1), T0 + dt.timedelta(days=1)]
    for number, started in enumerate(starts[: rng.randint(3, 4)]):
        run_id = f"run-{rng.choice('abcdef')}{number}"
        write_labels_output(root, items(rng.randint(5, 40)), run_id=run_id, started=started,
                            rows_per_shard=rng.randint(1, 9))
        for attempt in range(rng.randint(0, 2)):
            add_shard(root, run_id, f"part-{attempt + 1:03d}-{rng.randrange(16**8):08x}.parquet", items(rng.randint(1, 8)),
                      started=started)


def _read_all_rows(runs) -> list[tuple[str, str, list[dict]]]:
    return [(run.run_id, shard, pq.read_table(shard, columns=["image_id", "run_id", "run_started_at", "status"]).to_pylist())
            for run in runs for shard in run.shards]


def _keep_ok(table: pa.Table) -> np.ndarray:
    return np.asarray(table.column("status").to_numpy(zero_copy_only=False) == "ok")


@pytest.mark.parametrize("seed", range(6))
def test_partitioned_key_pass_picks_the_rows_the_rule_picks(tmp_path, seed):
    root = str(tmp_path / "labels")
    _random_output(root, seed)
    runs = list_runs(root)
    shards = _read_all_rows(runs)
    rows = sum(len(r) for _, _, r in shards)
    assert rows > 7 * 5  # many partitions at a threshold of 7
    assert len({row["image_id"] for _, _, r in shards for row in r}) < rows  # repeated ids

    losers, ordered = brute_force(shards)
    _, ordered_ok = brute_force(shards, kept=lambda row: row["status"] == "ok")
    for limit in (7, 1, 10**9):  # partitioned (many partitions; every id its own) and in memory
        index = build_row_index(runs, sort_by_id=True, max_keys_in_memory=limit, spill_dir=str(tmp_path))
        assert [shard for _, shard in index.shards] == [shard for _, shard, _ in shards]
        assert index.offsets[-1] == rows
        assert_index(index, losers, ordered)
        filtered = build_row_index(runs, sort_by_id=True, row_filter=_keep_ok, filter_columns=("status",),
                                   max_keys_in_memory=limit)
        assert_index(filtered, losers, ordered_ok)
        assert build_row_index(runs, max_keys_in_memory=limit).sorted_positions is None
    assert sorted(os.listdir(tmp_path)) == ["labels"]  # the spilled keys are gone


# ---------------------------------------------------------------- synthetic keys, many rows

class SyntheticKeys:
    """``read`` for :func:`build_row_index` over synthetic shards, building each shard's key table
    afresh on every read (as a Parquet read would), so keys kept by the code show up in Arrow's
    memory pool; records the pool's peak above its level before the pass."""

    def __init__(self, shards: list[tuple[str, str, list[dict]]]):
        self.shards = {path: rows for _, path, rows in shards}
        paths: dict[str, list[str]] = {}
        for run_id, path, _ in shards:
            paths.setdefault(run_id, []).append(path)
        self.runs = [Run(run_id=r, path="/" + r, shards=tuple(p), manifest={}, fs=None) for r, p in paths.items()]
        self.base = pa.total_allocated_bytes()
        self.peak = 0

    def sample(self) -> None:
        self.peak = max(self.peak, pa.total_allocated_bytes() - self.base)

    def __call__(self, run, shard, columns):
        self.sample()
        rows = self.shards[shard]
        table = pa.table({
            "image_id": pa.array([r["image_id"] for r in rows], pa.string()),
            "run_id": pa.array([r["run_id"] for r in rows], pa.string()),
            "run_started_at": pa.array([r["run_started_at"] for r in rows], pa.timestamp("us", tz="UTC")),
        })
        return table.select(list(columns))


def _synthetic(ids: list[str], shard_rows: int, runs: int = 3, seed: int = 0) -> list[tuple[str, str, list[dict]]]:
    """``ids`` spread over ``runs`` runs (in shards of ``shard_rows``), later runs relabelling a
    random fifth of them; attempt names shuffled so the write order is not the listing order."""
    rng = random.Random(seed)
    shards = []
    for number in range(runs):
        run_id = f"r{number}"
        started = T0 + dt.timedelta(hours=rng.choice([0, 1, 1]))
        chosen = ids if number == 0 else [i for i in ids if rng.random() < 0.2]
        for first in range(0, len(chosen), shard_rows):
            path = f"/{run_id}/part-{rng.randint(0, 2):03d}-{first:08d}.parquet"
            shards.append((run_id, path, [{"image_id": i, "run_id": run_id, "run_started_at": started}
                                          for i in chosen[first:first + shard_rows]]))
    return shards


class _Sizes(list):
    def on_hold(self) -> None:
        pass


@pytest.fixture()
def resolved_sizes(monkeypatch) -> list[int]:
    """The rows of every key table (or batch of one id's rows) the resolution holds at once;
    ``sizes.on_hold()`` is called at each."""
    sizes = _Sizes()
    resolve, resolve_one = row_index._resolve, row_index._resolve_one_id

    def counted(keys, run_rank):
        sizes.on_hold()
        sizes.append(keys.num_rows)
        return resolve(keys, run_rank)

    def counted_one(batches, run_rank):
        def each():
            for batch in batches:
                sizes.on_hold()
                sizes.append(len(batch))
                yield batch
        return resolve_one(each(), run_rank)

    monkeypatch.setattr(row_index, "_resolve", counted)
    monkeypatch.setattr(row_index, "_resolve_one_id", counted_one)
    return sizes


def test_the_partitioned_key_pass_holds_at_most_the_threshold(tmp_path, resolved_sizes):
    ids = [f"s3://bucket/corpus/{i * 7919 % 40_000:06d}-{i % 13}.jpg" for i in range(20_000)]
    shards = _synthetic(ids, shard_rows=100)
    rows = sum(len(r) for _, _, r in shards)
    id_bytes = sum(len(r["image_id"]) + 4 for _, _, rs in shards for r in rs)
    limit = 500
    reads = SyntheticKeys(shards)

    resolved_sizes.on_hold = reads.sample
    index = build_row_index(reads.runs, sort_by_id=True, read=reads, max_keys_in_memory=limit, spill_dir=str(tmp_path))

    assert_index(index, *brute_force(shards))
    assert sum(resolved_sizes) == rows and len(resolved_sizes) >= rows / limit  # every row resolved, in many pieces
    assert max(resolved_sizes) <= limit
    # Arrow memory while it ran: a few thresholds' worth of keys, far from all the ids.
    assert reads.peak < id_bytes / 4, (reads.peak, id_bytes)
    assert os.listdir(tmp_path) == []


def test_in_memory_key_pass_is_what_the_bound_above_would_catch(resolved_sizes):
    """The measure of the test above sees the keys when they are all held (below the threshold)."""
    ids = [f"s3://bucket/corpus/{i * 7919 % 40_000:06d}-{i % 13}.jpg" for i in range(20_000)]
    shards = _synthetic(ids, shard_rows=100)
    id_bytes = sum(len(r["image_id"]) + 4 for _, _, rs in shards for r in rs)
    reads = SyntheticKeys(shards)
    resolved_sizes.on_hold = reads.sample
    build_row_index(reads.runs, sort_by_id=True, read=reads, max_keys_in_memory=10**9)
    assert resolved_sizes == [sum(len(r) for _, _, r in shards)]
    assert reads.peak >= id_bytes / 2


@pytest.mark.parametrize("kind", ["long shared prefix", "one id", "few ids", "prefix runs"])
def test_skewed_ids_resolve_exactly(kind, tmp_path, resolved_sizes):
    prefix = "s3://bucket/" + "deep/" * 60
    ids = {
        "long shared prefix": [prefix + f"{i % 97:04d}.jpg" for i in range(600)],
        "one id": [prefix + "same.jpg"] * 600,
        "few ids": [prefix + ("a" if i % 10 else "b") for i in range(600)],  # 90% of rows on one id
        "prefix runs": [prefix + "x" * (i % 50) for i in range(600)],  # ids that are prefixes of each other
    }[kind]
    shards = _synthetic(ids, shard_rows=37, seed=3)
    reads = SyntheticKeys(shards)
    expected = brute_force(shards)
    for limit in (7, 50, 10**9):
        resolved_sizes.clear()
        index = build_row_index(reads.runs, sort_by_id=True, read=reads, max_keys_in_memory=limit, spill_dir=str(tmp_path))
        assert_index(index, *expected)
        assert sum(resolved_sizes) == index.num_rows and max(resolved_sizes) <= limit
    assert os.listdir(tmp_path) == []


def test_spilled_keys_are_removed_when_the_pass_fails(tmp_path):
    shards = _synthetic([f"id{i:04d}" for i in range(300)], shard_rows=10)
    reads = SyntheticKeys(shards)
    calls = []

    def failing(run, shard, columns):
        calls.append(shard)
        if len(calls) == 20:  # after 190 rows: well past the threshold, keys on disk
            raise OSError("shard unreadable")
        return reads(run, shard, columns)

    with pytest.raises(OSError, match="unreadable"):
        build_row_index(reads.runs, read=failing, max_keys_in_memory=50, spill_dir=str(tmp_path))
    assert os.listdir(tmp_path) == []


def test_bucket_of_orders_ids_as_arrow_sorts_them():
    """Buckets ascend with the id in Arrow's byte order; each cut value has a bucket of its own."""
    ids = pa.array(["", "a", "ab", "b", "b\x00", "ba", "é", "z", None, "a", "ab"])
    cuts = pa.array(["a", "b", "é"])
    buckets = key_partitions.bucket_of(ids, cuts).tolist()
    # "z" (0x7a) sorts before "é" (0xc3 0xa9) in bytes; the null id last.
    assert buckets == [0, 1, 2, 3, 4, 4, 5, 4, 6, 1, 2]
