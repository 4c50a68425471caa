"""Faults injected into the inference actors of a test's Ray workers.

:func:`runtime_env` gives a Ray runtime env whose ``worker_process_setup_hook`` (:func:`install`)
wraps ``SegmentBatch.__call__`` in every worker process; :func:`set_fault` arms a fault, read
from a file at every batch (worker processes outlive one job). The first batch holding ``image_id``
(across all processes and restarts: the first to create ``marker`` wins) gets the fault:

- ``cuda``: from then on every ``predict`` of that process raises a CUDA error, as a
  device-side assert leaves the device unusable;
- ``kill``: the actor's process is killed (SIGKILL);
- ``hang``: the actor writes its node id to ``<marker>.node`` and waits (up to 2 minutes) for
  its node to be removed.

:func:`set_killers` arms faults of another kind, which fire every time (no marker): the process
that touches a named image is killed (SIGKILL), as the kernel's OOM killer ends a process that
an image makes allocate too much. ``decode``: a decode task, as it starts on the image (any
batch); ``inference``: an inference actor, as it predicts a batch holding the image; ``rows``: a
row-building task, as it starts on the image's row (after registering it with the ledger).

:func:`set_device_memory` gives every inference actor a device of ``capacity`` bytes: a
``predict`` whose images' estimates (``working_bytes``) sum above it raises
``torch.OutOfMemoryError``; each call is logged (images, bytes, raised) to a JSON-lines file.

Faults of the output side (:func:`set_output_fault`), once (the first process to create
``marker`` fires it), as a decode task starts on a named image:

- ``fill``: the file system of a folder fills up (a file is written there until ENOSPC);
- ``readonly``: the file system mounted at a folder is remounted read-only (needs root);

and :func:`set_writer_killer`: the process writing the ``nth`` shard of a run (counted across the
cluster) is killed (SIGKILL), ``before`` it writes the file or ``after`` it was renamed into place
(before the task returns its stats).
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

ENV = "CLIPDIY_TEST_FAULT"
TESTS = Path(__file__).resolve().parent
CUDA_MESSAGE = "CUDA error: device-side assert triggered (fault injected by the test)"


def runtime_env(spec_file: Path) -> dict:
    """Ray's runtime env for a job whose faults :func:`set_fault` writes to ``spec_file``."""
    path = os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH", "")) if p)
    return {"worker_process_setup_hook": "fault_injection.install",
            "env_vars": {ENV: str(spec_file), "PYTHONPATH": path}}


def set_fault(spec_file: Path, action: str, image_id: str, marker: Path) -> None:
    """Arm one fault for the next batch holding ``image_id`` (read at every batch)."""
    spec_file.write_text(json.dumps({"action": action, "image_id": image_id, "marker": str(marker)}))


def set_killers(spec_file: Path, decode: str | None = None, inference: str | None = None,
                rows: str | None = None) -> None:
    """Kill the process that touches ``decode`` in a decode task, ``inference`` in an actor, or
    ``rows`` in a row-building task, every time (read at every image or batch)."""
    spec_file.write_text(json.dumps({"action": "killers", "decode": decode, "inference": inference, "rows": rows}))


def set_device_memory(spec_file: Path, capacity: int, log: Path, bytes_per_pixel: int | None = None) -> None:
    """Inference actors' predict calls run out of memory above ``capacity`` bytes of estimates;
    ``bytes_per_pixel``: the method's estimate replaced by this many bytes a pixel of the
    original (small test photos then need what large ones do, against a bound of whole GB)."""
    spec_file.write_text(json.dumps({"action": "memory", "capacity": capacity, "log": str(log),
                                     "bytes_per_pixel": bytes_per_pixel}))


def _with_device_memory(stage, spec: dict) -> None:
    """Wrap the actor's ``segmenter.predict`` (once) with the device of ``spec``'s capacity."""
    segmenter = stage.segmenter
    already = getattr(segmenter, "_fault_spec", None) is not None
    segmenter._fault_spec = spec
    if spec.get("bytes_per_pixel"):
        segmenter.working_bytes = lambda p: spec["bytes_per_pixel"] * p.original_size[0] * p.original_size[1]
    if already:
        return
    predict = segmenter.predict

    def on_small_device(prepared, *args, **kwargs):
        import torch

        spec = segmenter._fault_spec
        need = sum(int(segmenter.working_bytes(p)) for p in prepared)
        raised = need > spec["capacity"]
        with open(spec["log"], "a") as log:
            log.write(json.dumps({"images": len(prepared), "bytes": need, "raised": raised, "pid": os.getpid()}) + "\n")
        if raised:
            raise torch.OutOfMemoryError(f"CUDA out of memory (injected: {need} > {spec['capacity']} bytes)")
        return predict(prepared, *args, **kwargs)

    segmenter.predict = on_small_device


def set_output_fault(spec_file: Path, action: str, image_id: str, folder: Path, marker: Path) -> None:
    """Arm ``fill`` or ``readonly`` of ``folder``'s file system for when a decode task reaches ``image_id``."""
    spec_file.write_text(json.dumps({"action": action, "image_id": image_id, "folder": str(folder),
                                     "marker": str(marker)}))


def set_writer_killer(spec_file: Path, nth: int, phase: str, counter: Path) -> None:
    """Kill the process writing the ``nth`` shard (1-based, counted in ``counter``), once."""
    spec_file.write_text(json.dumps({"action": "kill_writer", "nth": nth, "phase": phase, "counter": str(counter)}))


def fill_file_system(folder: str) -> None:
    """Write a file in ``folder`` until its file system is full."""
    block = b"\0" * (64 * 1024)
    with open(os.path.join(folder, "filler.bin"), "wb", buffering=0) as handle:
        try:
            while True:
                handle.write(block)
        except OSError:
            pass
    # Leave less than a page: small writes fail too (tmpfs allocates by page).
    for i in range(4096):
        try:
            with open(os.path.join(folder, f"filler-{i}.bin"), "wb", buffering=0) as handle:
                handle.write(b"\0" * 1024)
        except OSError:
            break


def _output_fault(image_id: str) -> None:
    spec = _spec()
    if not spec or spec["action"] not in ("fill", "readonly") or spec["image_id"] != image_id:
        return
    if not _claim(spec["marker"]):
        return
    if spec["action"] == "fill":
        fill_file_system(spec["folder"])
    else:
        import subprocess

        subprocess.run(["mount", "-o", "remount,ro", spec["folder"]], check=True, capture_output=True)


def _writer_killer(phase: str) -> None:
    spec = _spec()
    if not spec or spec["action"] != "kill_writer":
        return
    counter = spec["counter"] + "." + phase
    with open(counter, "a") as handle:  # one byte per shard write started (O_APPEND: atomic)
        handle.write("x")
    if os.path.getsize(counter) == spec["nth"] and spec["phase"] == phase and _claim(spec["counter"] + ".fired"):
        os.kill(os.getpid(), signal.SIGKILL)


def _spec() -> dict | None:
    try:
        return json.loads(Path(os.environ[ENV]).read_text())
    except (KeyError, FileNotFoundError, json.JSONDecodeError):
        return None


def _claim(marker: str) -> bool:
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False


def _fire(stage, spec: dict) -> None:
    action = spec["action"]
    if action == "cuda":
        def poisoned(*args, **kwargs):
            raise RuntimeError(CUDA_MESSAGE)

        stage.segmenter.predict = poisoned
    elif action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "hang":
        import ray

        Path(spec["marker"] + ".node").write_text(ray.get_runtime_context().get_node_id())
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # the node's removal ends this process
            time.sleep(0.2)
    else:
        raise ValueError(f"unknown fault {action!r}")


def _killer(stage: str) -> str | None:
    spec = _spec()
    return spec.get(stage) if spec and spec["action"] == "killers" else None


def install() -> None:
    if not os.environ.get(ENV):
        return
    from clipdiy.pipeline.stages import decode, inference

    original = inference.SegmentBatch.__call__

    def with_fault(self, batch):
        spec = _spec()
        if spec and spec["action"] == "memory":
            _with_device_memory(self, spec)
        elif (spec and spec["action"] in ("cuda", "kill", "hang") and spec["image_id"] in batch.column("image_id").to_pylist()
                and _claim(spec["marker"])):
            _fire(self, spec)
        return original(self, batch)

    inference.SegmentBatch.__call__ = with_fault

    decode_one = decode.DecodeBatch._decode_one

    def decode_or_die(self, image_id, *args, **kwargs):
        _output_fault(image_id)
        if _killer("decode") == image_id:
            os.kill(os.getpid(), signal.SIGKILL)
        return decode_one(self, image_id, *args, **kwargs)

    decode.DecodeBatch._decode_one = decode_or_die

    predict_images = inference.SegmentBatch._predict_images

    def predict_or_die(self, image_ids, *args, **kwargs):
        if _killer("inference") in image_ids:
            os.kill(os.getpid(), signal.SIGKILL)
        return predict_images(self, image_ids, *args, **kwargs)

    inference.SegmentBatch._predict_images = predict_or_die

    from clipdiy.pipeline.stages import attempts

    start = attempts.BatchAttempt.start

    def start_or_die(self, image_id):
        start(self, image_id)  # registered first: the ledger sees the death on this image
        if image_id is not None and self.key.startswith("rows:") and _killer("rows") == image_id:
            os.kill(os.getpid(), signal.SIGKILL)

    attempts.BatchAttempt.start = start_or_die

    from clipdiy.output_layout import SHARD_PREFIX, OutputLayout

    write_atomic = OutputLayout.write_bytes_atomic

    def write_or_die(self, path, data):
        shard = os.path.basename(path).startswith(SHARD_PREFIX)
        if shard:
            _writer_killer("before")
        write_atomic(self, path, data)
        if shard:
            _writer_killer("after")

    OutputLayout.write_bytes_atomic = write_or_die
