"""Finding 11 of issue 26: a night where most reads find nothing is a systemic fault.

The decode stage asks the run's health actor, for each batch with missing objects, whether they
are answers (``not_found`` rows, never read again) or the symptom of a storm (``unreadable``
rows, read again); a storm stops the run with exit 1. Tested on the plain class, driven as the
decode stage drives it, under generated read sequences.
"""

from __future__ import annotations

import types

import pyarrow as pa
from hypothesis import given, settings
from hypothesis import strategies as st

from clipdiy.pipeline.stages.health import NOT_FOUND_STORM, NOT_FOUND_WINDOW, RunHealth


def drive(health: RunHealth, batches: list[tuple[int, int]]) -> list[bool]:
    """Each batch's (found, missing) as the decode stage reports it; whether its missing
    objects were taken as answers."""
    trusted = []
    for found, missing in batches:
        trusted.append(health.judge_not_found(found, missing, "s3://b/x.jpg: FileNotFoundError") if missing else True)
        health.record_reads(found, {"not_found": missing} if missing else {})
    return trusted


def test_three_photos_then_three_hundred_missing_stop_the_run_and_no_row_is_an_answer():
    """The audit's case: before the fix, exit 0 and 300 permanent not_found rows."""
    health = RunHealth(stop_after_failed_reads=200, first_attempt=False)  # a resumed run: the streak ignores them
    batches = [(3, 5)] + [(0, 8)] * 37 + [(0, 3)]
    trusted = drive(health, batches)
    assert not any(trusted)
    assert health.verdict() is not None and "most reads find nothing" in health.verdict()
    assert health.finish() == health.verdict()


def test_a_small_night_with_one_deleted_object_ends_well():
    health = RunHealth(stop_after_failed_reads=200, first_attempt=True)
    trusted = drive(health, [(7, 1)])
    assert health.finish() is None
    assert trusted == [True]  # found reads reach the store: the deleted photo is an answer (issue 18)
    assert drive(RunHealth(stop_after_failed_reads=200, first_attempt=True), [(1, 2)]) == [False]  # more missing than found


healthy_batches = st.tuples(st.integers(0, 16), st.integers(0, 16)).filter(lambda b: b[1] <= b[0])
storm_batches = st.integers(1, 16).map(lambda missing: (0, missing))


@settings(max_examples=200)
@given(first=st.integers(10, 16), healthy=st.lists(healthy_batches, max_size=60), storm=st.lists(storm_batches, max_size=60))
def test_missing_objects_are_answers_in_a_healthy_run_and_a_storm_stops_it(first, healthy, storm):
    """A run whose batches each find at least as many objects as they miss (its first batch
    finding 10 or more) trusts every missing object and goes on; once every read misses, at
    most half a window of them are taken as answers, and a storm of a window's reads stops it."""
    health = RunHealth(stop_after_failed_reads=10**9, first_attempt=False)
    trusted_healthy = drive(health, [(first, 0), *healthy])
    assert all(trusted_healthy) and health.verdict() is None
    trusted_storm = drive(health, storm)
    storm_missing = [missing for _, missing in storm]
    answered = sum(m for m, t in zip(storm_missing, trusted_storm, strict=True) if t)
    assert answered <= NOT_FOUND_WINDOW // 2 + 16
    if sum(storm_missing) >= NOT_FOUND_WINDOW:
        assert health.verdict() is not None
    if health.verdict() is not None:  # never a verdict on fewer missing objects than a storm
        assert sum(storm_missing) + sum(missing for _, missing in healthy) >= NOT_FOUND_STORM


class _Direct:
    """A RunHealth called as the decode stage calls its actor (``.remote``), in this process."""

    def __init__(self, health: RunHealth):
        from clipdiy.pipeline.stages.attempts import LedgerShard

        self.health = health
        self.shards = (LedgerShard(),)  # the attempt ledger, a plain instance
        self.reads = self  # RunHealthHandles.reads: the read-health actor's calls

    def __getattr__(self, name):
        return types.SimpleNamespace(remote=getattr(self.health, name))


def _decode(tmp_path, health: RunHealth, photos: list, missing: int) -> list[dict]:
    import shutil

    from clipdiy.pipeline.stages.decode import DecodeBatch

    names = []
    for photo in photos:
        shutil.copy(photo, tmp_path / photo.name)
        names.append(photo.name)
    names += [f"gone-{i}.jpg" for i in range(missing)]
    batch = pa.table({"image_id": names, "uri": [f"file://{tmp_path}/{name}" for name in names]})
    decode = DecodeBatch(None, "faithful", 10**8, 1, saliency_max_side=64, health=_Direct(health))
    return decode(batch).drop_columns(["payload"]).to_pylist()


def test_the_decode_stage_writes_missing_objects_of_a_storm_as_unreadable(tmp_path, coco_images, monkeypatch):
    """Through the decode stage: a batch of 3 photos and 12 missing files gives no ``not_found``
    row (the rows say why, and are read again); a batch of 12 photos and 2 missing files does."""
    import ray

    monkeypatch.setattr(ray, "get", lambda value, timeout=None: value)
    storm = _decode(tmp_path, RunHealth(200, first_attempt=False), coco_images[:3], 12)
    kinds = [row["error_kind"] for row in storm]
    assert kinds == [None] * 3 + ["unreadable"] * 12
    assert all("not taken as an answer" in row["error"] for row in storm[3:])
    healthy = _decode(tmp_path, RunHealth(200, first_attempt=False), coco_images[:12], 2)
    assert [row["error_kind"] for row in healthy] == [None] * 12 + ["not_found"] * 2
