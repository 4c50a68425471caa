"""The OUTPUT lock admits one live writer: conditional take-over and heartbeat (local disk and a
real moto S3), a holder that cannot renew gives up before anyone may take over, an empty lock
file does not block forever, a refused conditional write is a one-line refusal, and a lost lock
ends the job with exit 1."""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import time

import pytest
from pipeline_support import LABEL_SCRIPT

from clipdiy.errors import ClipdiyError
from clipdiy.output_layout import OutputLayout
from clipdiy.pipeline.control.lock import LockInfo, LockLostError, OutputLock, OutputLockedError
from clipdiy.pipeline.control.lock_store import ConditionalWriteConflict, S3LockStore, is_conflict

STALE_S = 2.0
BEAT_S = 0.2


@pytest.fixture(params=["local", "s3"])
def layout(request, tmp_path):
    if request.param == "local":
        layout = OutputLayout.open(str(tmp_path / "labels"))
        layout.ensure_dir(layout.root)
        return layout
    server = request.getfixturevalue("s3_server")
    bucket = request.getfixturevalue("s3_bucket")
    return OutputLayout.open(f"s3://{bucket}/labels", server.options)


def make_lock(layout, run_id, **overrides):
    options = {"stale_after_s": STALE_S, "heartbeat_s": BEAT_S, "settle_s": 0, "takeover_grace_s": 0}
    options.update(overrides)
    return OutputLock(layout, run_id, **options)


def lock_document(layout) -> dict | None:
    return layout.read_json(layout.lock_path())


def foreign_lock(run_id: str, heartbeat_age_s: float) -> bytes:
    """The lock document of a run on another host whose last heartbeat is ``heartbeat_age_s`` old."""
    beat = time.time() - heartbeat_age_s
    return LockInfo(run_id, "another-host", 4242, f"token-{run_id}", beat, beat).encode()


def put_raw(layout, data: bytes) -> None:
    if layout.is_local:
        with open(layout.lock_path(), "wb") as handle:
            handle.write(data)
    else:
        layout.fs.pipe_file(layout.lock_path(), data)
        layout.fs.invalidate_cache()


class UnreachableWrites:
    """A lock store whose writes fail like an unreachable store (reads still work)."""

    def __init__(self, store):
        self.inner = store
        self.conditional = store.conditional

    def read(self):
        return self.inner.read()

    def create(self, data):
        raise ConnectionResetError(errno.ECONNRESET, "connection reset by peer")

    replace = delete = lambda self, *args: self.create(None)


def acquire_when_free(lock: OutputLock, timeout: float) -> None:
    """Try ``lock.acquire()`` until the current holder's lock is stale (polls; no fixed sleep)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            lock.acquire()
            return
        except OutputLockedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def test_a_holder_that_cannot_renew_stops_before_another_run_takes_over(layout):
    lost = []
    first = make_lock(layout, "run-a", on_lost=lambda error: lost.append((time.monotonic(), error)))
    first.acquire()
    try:
        first.store = UnreachableWrites(first.store)  # the first driver's heartbeats fail from now on
        second = make_lock(layout, "run-b")
        acquire_when_free(second, timeout=30)
        took_over = time.monotonic()
        try:
            # Never two writers: the first had given up (and said so) before the second took over.
            assert first.lost and lost and lost[0][0] < took_over
            assert isinstance(lost[0][1], LockLostError) and lost[0][1].exit_status == 1
            assert "could not be renewed" in str(lost[0][1])
            with pytest.raises(LockLostError, match="lost its lock"):
                first.check()
            assert lock_document(layout)["token"] == second.info.token

            # The store is back: the first driver's late heartbeat cannot overwrite the new holder.
            first.store = first.store.inner
            first.renew()
            assert lock_document(layout)["token"] == second.info.token
            first.release()  # and its release leaves the new holder's lock alone
            assert lock_document(layout)["token"] == second.info.token
            second.check()
        finally:
            second.release()
    finally:
        first.release()
    assert lock_document(layout) is None
    assert len(lost) == 1


def test_a_heartbeat_that_finds_the_lock_taken_loses_it_without_writing(layout):
    lost = []
    holder = make_lock(layout, "run-a", heartbeat_s=60, stale_after_s=300, on_lost=lost.append)
    holder.acquire()
    try:
        put_raw(layout, foreign_lock("run-x", heartbeat_age_s=0))  # someone else's lock now
        holder.renew()
        assert holder.lost and len(lost) == 1 and "taken by run run-x" in str(lost[0])
        assert lock_document(layout)["token"] == "token-run-x"
        with pytest.raises(LockLostError):
            holder.check()
    finally:
        holder.release()
    assert lock_document(layout)["token"] == "token-run-x"


def test_renewing_keeps_the_lock_and_moves_the_heartbeat(layout):
    holder = make_lock(layout, "run-a", heartbeat_s=60, stale_after_s=300)
    with holder:
        first_beat = lock_document(layout)["heartbeat_at"]
        holder.renew()
        holder.renew()
        assert not holder.lost
        document = lock_document(layout)
        assert document["token"] == holder.info.token and document["heartbeat_at"] > first_beat
    assert lock_document(layout) is None


def test_a_takeover_the_store_refuses_is_a_one_line_refusal(layout):
    """Two runs judge one dead lock stale; the other writes first: this one's conditional write
    is refused (412 on S3) and it refuses to start, in one line, leaving the winner's lock."""
    put_raw(layout, foreign_lock("dead", heartbeat_age_s=999))
    late = make_lock(layout, "run-late")
    winner = make_lock(layout, "run-winner")
    real_read = late.store.read
    reads = []

    def read_then_lose_the_race():
        stored = real_read()
        if not reads:  # right after this run's look, the other run takes the dead lock over
            winner.acquire()
        reads.append(stored)
        return stored

    late.store.read = read_then_lose_the_race
    try:
        with pytest.raises(OutputLockedError) as refused:
            late.acquire()
        message = str(refused.value)
        assert "\n" not in message and isinstance(refused.value, ClipdiyError)
        assert "run run-winner" in message and "took the lock first" in message
        assert lock_document(layout)["token"] == winner.info.token
        assert not late._threads  # no heartbeat of the refused run
    finally:
        winner.release()


@pytest.mark.parametrize("content", [b"", b"{", b'{"run_id": "half"}'])
def test_an_empty_or_corrupt_lock_file_blocks_only_for_the_grace_period(layout, content):
    put_raw(layout, content)
    with pytest.raises(OutputLockedError, match="empty or unreadable") as refused:
        make_lock(layout, "run-early", corrupt_grace_s=600).acquire()
    assert "\n" not in str(refused.value)

    if layout.is_local:  # a file left by a driver killed two minutes ago
        old = time.time() - 120
        os.utime(layout.lock_path(), (old, old))
        taker = make_lock(layout, "run-late", stale_after_s=60, heartbeat_s=1)
    else:  # S3 keeps LastModified itself: a grace of 0 makes any existing file old enough
        taker = make_lock(layout, "run-late", corrupt_grace_s=0)
    with taker:
        assert lock_document(layout)["token"] == taker.info.token
    assert lock_document(layout) is None


def test_a_local_lock_file_is_never_left_empty(tmp_path, monkeypatch):
    """The local create writes the whole document before the lock file exists (link of a
    written temporary file): a driver killed at any point leaves no empty lock."""
    layout = OutputLayout.open(str(tmp_path / "labels"))
    layout.ensure_dir(layout.root)
    lock = make_lock(layout, "run-a")
    seen_at_link = []
    real_link = os.link

    def link(source, target):
        seen_at_link.append((os.path.exists(target), open(source, "rb").read()))
        return real_link(source, target)

    monkeypatch.setattr(os, "link", link)
    with lock:
        assert seen_at_link == [(False, lock_document_bytes(layout))]


def lock_document_bytes(layout) -> bytes:
    with open(layout.lock_path(), "rb") as handle:
        return handle.read()


def test_s3_conflict_statuses_are_conflicts_and_other_errors_are_not():
    class ClientError(Exception):
        def __init__(self, code, status):
            super().__init__(code)
            self.response = {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}

    def wrapped(code, status):  # what s3fs raises: an OSError caused by botocore's ClientError
        error = OSError(errno.EIO, "translated")
        error.__cause__ = ClientError(code, status)
        return error

    assert is_conflict(wrapped("ConditionalRequestConflict", 409))
    assert is_conflict(wrapped("PreconditionFailed", 412))
    assert is_conflict(FileExistsError("exists"))
    assert not is_conflict(wrapped("SlowDown", 503))
    assert not is_conflict(wrapped("AccessDenied", 403))

    class FakeS3:
        def __init__(self, error):
            self.error = error

        def call_s3(self, method, **request):
            raise self.error

    store = S3LockStore(FakeS3(wrapped("ConditionalRequestConflict", 409)), "bucket/labels/_LOCK.json")
    with pytest.raises(ConditionalWriteConflict, match="409"):
        store.replace(b"{}", '"etag"')
    store = S3LockStore(FakeS3(wrapped("SlowDown", 503)), "bucket/labels/_LOCK.json")
    with pytest.raises(OSError):
        store.create(b"{}")


def test_a_lost_lock_ends_the_job_with_exit_1_in_one_line(tmp_path, monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("label_job", LABEL_SCRIPT)
    label = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(label)
    import clipdiy.pipeline.control.run as run

    def losing_run(config, **kwargs):
        assert callable(kwargs.get("on_lock_lost"))  # the CLI stops the driver as soon as it is lost
        raise LockLostError(f"{config.output}: this run lost its lock (taken by run x) and stopped writing")

    monkeypatch.setattr(run, "run_labelling", losing_run)
    status = label.main(["--input", str(tmp_path), "--output", str(tmp_path / "out")])
    assert status == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("label.py: error: ") and "lost its lock" in err[-1]
    assert not any("Traceback" in line for line in err)

    monkeypatch.setattr(run, "run_labelling", lambda config, **kw: (_ for _ in ()).throw(OutputLockedError("busy")))
    assert label.main(["--input", str(tmp_path), "--output", str(tmp_path / "out")]) == 2


def test_lock_documents_round_trip():
    info = LockInfo("r", "h", 1, "t", 1.0, 2.0)
    assert LockInfo.parse(info.encode()) == info
    assert json.loads(info.encode())["token"] == "t"
    assert LockInfo.parse(b"") is None and LockInfo.parse(b"[]") is None


@pytest.mark.slow
def test_a_job_whose_lock_is_taken_mid_run_stops_with_exit_1(coco_images, tiny_clip_config, tmp_path):
    """End to end: another run takes the lock of a working job; the job's next heartbeat finds it
    taken, the driver stops at once (its Ray work with it) with one error line and exit 1, and
    it neither finishes the run nor touches the other run's lock."""
    import shutil
    import subprocess

    from pipeline_support import REPO_ROOT, cli_args, manifests, shard_files

    corpus = tmp_path / "images"
    corpus.mkdir()
    for copy in range(3):
        for path in coco_images:
            shutil.copy(path, corpus / f"{copy}_{path.name}")
    output = tmp_path / "labels"
    args = cli_args(corpus, output, tiny_clip_config, "--batch-size", "1", "--decode-batch-size", "1",
                    "--rows-per-file", "2", "--log-every", "1")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop("RAY_ADDRESS", None)
    log = tmp_path / "job.log"
    with open(log, "wb") as handle:
        job = subprocess.Popen(args, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT,
                               start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not shard_files(output):
            assert job.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "no shard within 300 s"
            time.sleep(0.05)
        intruder = foreign_lock("intruder", heartbeat_age_s=0)
        (output / "_LOCK.json").write_bytes(intruder)  # another driver took the lock over
        status = job.wait(timeout=120)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, 9)
    text = log.read_text()
    assert status == 1, text[-3000:]
    assert "Traceback" not in text
    errors = [line for line in text.splitlines() if line.startswith("label.py: error:")]
    assert len(errors) == 1 and "lost its lock" in errors[0] and "run intruder" in errors[0], text[-2000:]
    assert (output / "_LOCK.json").read_bytes() == intruder
    assert not manifests(output), "a run that lost its lock must not finish"
