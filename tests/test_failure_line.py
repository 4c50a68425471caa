"""The job's last line names the root cause of a failure, not the Ray wrapper that carried it
(issue 26, section 2): no terminal colour codes, no ``RayTaskError``, the file a write failed on,
no credentials. Fast: Ray's exception classes are built without a cluster."""

from __future__ import annotations

import errno
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from clipdiy.errors import OutputWriteError
from clipdiy.output_layout import OutputLayout
from clipdiy.pipeline.control.failure import describe_failure, one_line, root_cause


def _as_ray_delivers(error: Exception) -> Exception:
    """``error`` raised in a Ray task, as the driver receives it (a RayTaskError subclass of the
    cause's class, whose text is the task name in colours and the remote traceback)."""
    from ray.exceptions import RayTaskError

    text = "\x1b[36mray::MapBatches(build_rows)->MapBatches(write_shard)()\x1b[39m (pid=1, ip=10.0.0.1)"
    return RayTaskError("MapBatches(write_shard)", text + "\n  File x\n" + str(error), error).as_instanceof_cause()


def test_a_full_disk_in_a_write_task_is_named_with_its_file(tmp_path, monkeypatch):
    layout = OutputLayout.open(str(tmp_path / "labels"))
    path = layout.path("runs", "r1", "part-001-abc.parquet")

    def full(fd, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", lambda fd: full(fd, b""))
    with pytest.raises(OutputWriteError) as raised:
        layout.write_bytes_atomic(path, b"x" * 10)
    assert str(raised.value) == f"writing {path} failed: [Errno 28] No space left on device"
    assert not [p for p in (tmp_path / "labels" / "runs" / "r1").iterdir()], "no temporary file left"
    delivered = _as_ray_delivers(raised.value)
    line = describe_failure(delivered)
    assert line == f"OutputWriteError: writing {path} failed: [Errno 28] No space left on device"
    assert isinstance(root_cause(delivered), OutputWriteError)


def test_an_oserror_under_wrappers_is_the_cause():
    inner = PermissionError(errno.EACCES, "Permission denied", "/out/runs/x/_MANIFEST.json")
    try:
        try:
            raise inner
        except OSError as error:
            raise RuntimeError("\x1b[31mwrapper\x1b[0m") from error
    except RuntimeError as outer:
        assert describe_failure(outer) == "PermissionError: [Errno 13] Permission denied: '/out/runs/x/_MANIFEST.json'"


@given(text=st.text(st.characters(blacklist_categories=("Cs",)), max_size=40), colour=st.integers(0, 107))
def test_one_line_has_no_escape_codes_and_no_newline(text, colour):
    line = one_line(f"\x1b[{colour}m{text}\x1b[0m\nsecond line")
    assert "\x1b[" not in line and "\n" not in line
    assert line == line.strip()


def test_a_credential_in_the_cause_is_redacted():
    error = OSError(errno.EIO, "I/O error", "s3://AKIAEXAMPLE:wJalrXUtn@bucket/labels/x.parquet")
    line = describe_failure(_as_ray_delivers(error))
    assert "wJalrXUtn" not in line and "[Errno 5] I/O error" in line


def test_ray_datas_retry_note_is_not_the_message():
    note = ("\nFailed to apply UDF transform after 1/1 attempts (total backoff 0.0s).\nTo change retry attempts, "
            "configure `ray.data.DataContext.get_current()` if you believe this to be transient.")
    assert describe_failure(KeyError("image_id" + note)) == "KeyError: 'image_id'"
    assert describe_failure(ValueError("bad value" + note)) == "ValueError: bad value"
