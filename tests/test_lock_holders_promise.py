"""A lock is judged stale by its holder's own promise, not the taker's setting (issue 26, finding 6).

The holder gives up writing once ``stale_after_s - heartbeat_s`` pass without a renewal (its
watchdog), so no one may call its lock stale before ``stale_after_s``: the lock document carries
the holder's ``stale_after_s`` and every taker waits at least that long. ``jobs/review.py import``
judged by its own 60 s and took the lock of a job running with ``--log-every 120`` (stale after
480 s) whose heartbeat was 100 s old; the job then lost its lock and exited 1.
"""

from __future__ import annotations

import json
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from clipdiy.output_layout import OutputLayout
from clipdiy.pipeline.control.lock import LockInfo, OutputLock, OutputLockedError


def _held_elsewhere(layout: OutputLayout, *, stale_after_s: float, heartbeat_s: float, heartbeat_age_s: float) -> None:
    """The lock document a job on another host writes (its real OutputLock), last renewed
    ``heartbeat_age_s`` ago."""
    holder = OutputLock(layout, "night-1", stale_after_s=stale_after_s, heartbeat_s=heartbeat_s)
    holder.info.host = "another-host"
    holder.info.heartbeat_at = time.time() - heartbeat_age_s
    with open(layout.lock_path(), "wb") as handle:
        handle.write(holder.info.encode())


def test_review_import_does_not_take_the_lock_of_a_job_with_a_slow_heartbeat(tmp_path):
    from test_review_hostile import labels_and_export

    from clipdiy.pipeline.control.corrections import import_corrections

    labels, export = labels_and_export(tmp_path)
    layout = OutputLayout.open(str(labels))
    # `label.py --log-every 120`: heartbeat every 120 s, stale after max(300, 4 x 120) = 480 s;
    # its last renewal 100 s ago (a slow store, a long GC pause: well within its promise).
    _held_elsewhere(layout, stale_after_s=480.0, heartbeat_s=120.0, heartbeat_age_s=100.0)
    before = open(layout.lock_path(), "rb").read()
    with pytest.raises(OutputLockedError, match="in use by run night-1"):
        import_corrections(str(export), str(labels), run_id="h-1")
    assert open(layout.lock_path(), "rb").read() == before, "the job's lock is untouched"
    assert not (labels / "runs" / "h-1").exists()


@given(holder_beat=st.floats(0.01, 600), ratio=st.floats(2, 20), age_share=st.floats(0, 0.999),
       taker_stale=st.floats(0.02, 3600), taker_ratio=st.floats(2, 20))
def test_a_holder_before_its_own_deadline_is_never_stale_to_any_taker(holder_beat, ratio, age_share, taker_stale,
                                                                      taker_ratio, tmp_path_factory):
    """Whatever the two runs' settings: while the holder's watchdog has not given up (its last
    renewal less than ``stale_after_s - heartbeat_s`` ago), no taker calls the lock stale."""
    holder_stale = holder_beat * ratio
    age = age_share * (holder_stale - holder_beat)
    layout = OutputLayout.open("/nonexistent-output")
    holder = OutputLock(layout, "night", stale_after_s=holder_stale, heartbeat_s=holder_beat, store=_NoStore())
    holder.info.host = "another-host"
    holder.info.heartbeat_at = time.time() - age
    taker = OutputLock(layout, "other", stale_after_s=taker_stale, heartbeat_s=taker_stale / taker_ratio, store=_NoStore())
    seen = LockInfo.parse(holder.info.encode())
    assert taker.stale_reason(seen) is None
    # ... and once both the holder's and the taker's thresholds have passed, it is stale.
    seen.heartbeat_at = time.time() - max(holder_stale, taker_stale) - 1
    assert taker.stale_reason(seen) is not None


class _NoStore:
    conditional = True


def test_a_lock_document_of_an_older_version_still_reads():
    old = json.dumps({"run_id": "r", "host": "h", "pid": 1, "token": "t", "acquired_at": 1.0, "heartbeat_at": 2.0})
    info = LockInfo.parse(old.encode())
    assert info is not None and info.run_id == "r" and info.stale_after_s is None
