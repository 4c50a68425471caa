"""A batch that does not fit falls back to the images in it (issue 25, section 2), without Ray.

The inference actor runs a batch in groups whose summed estimates fit ``--max-image-memory-gb``
(split before anything runs); a group that still runs out of memory is halved down to single
images; an image out of memory on its own is a ``too_large`` row and the actor goes on. Checked
with a stand-in segmenter whose device holds ``capacity`` bytes: any call whose images need more
raises ``torch.OutOfMemoryError``.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clipdiy.pipeline.stages.inference import SegmentBatch


@dataclass(frozen=True)
class Item:
    """A prepared image as the stand-in sees it: its size and the bytes labelling it needs."""

    original_size: tuple[int, int]
    need: int
    saliency_input: None = None


class Device:
    """A segmenter on a device of ``capacity`` bytes; an image's output is a function of the image
    alone (as the methods' are), so a split that changed a label would show."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.calls: list[list[int]] = []
        self.ooms = 0

    def working_bytes(self, item: Item) -> int:
        return item.need

    def predict(self, prepared):
        import torch

        self.calls.append([p.need for p in prepared])
        if sum(p.need for p in prepared) > self.capacity:
            self.ooms += 1
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return [{"label": (p.original_size, p.need)} for p in prepared]


class _Exited(Exception):
    pass


def _stage(segmenter, bound: int | None) -> SegmentBatch:
    stage = SegmentBatch.__new__(SegmentBatch)
    stage.segmenter = segmenter
    stage.max_image_bytes_in_memory = bound
    stage._local_poisonings = None
    stage._exit_before_next = False

    def exit_process():
        raise _Exited()

    stage._exit = exit_process
    return stage


def _batch(needs: list[int]) -> pa.Table:
    items = [Item((10 + i, 20), need) for i, need in enumerate(needs)]
    return pa.table({
        "image_id": [f"{i}.jpg" for i in range(len(needs))],
        "status": ["ok"] * len(needs),
        "error_kind": pa.nulls(len(needs), pa.string()),
        "error": pa.nulls(len(needs), pa.string()),
        "payload": pa.array([pickle.dumps(item) for item in items], pa.large_binary()),
    })


def _labels(out: pa.Table) -> list:
    return [pickle.loads(p)["label"] if p is not None else None for p in out.column("payload").to_pylist()]


@settings(max_examples=60, deadline=None)
@given(needs=st.lists(st.integers(1, 100), min_size=1, max_size=12),
       capacity=st.integers(1, 250), bound=st.integers(1, 400))
def test_every_image_that_fits_alone_is_labelled_as_alone_and_no_other_costs_the_actor(needs, capacity, bound):
    device = Device(capacity)
    out = _stage(device, bound)(_batch(needs))  # never exits: memory is not a poisoned device
    rows = out.to_pylist()
    for i, (row, need) in enumerate(zip(rows, needs)):
        if need > bound:  # refused by the estimate before any work
            assert (row["status"], row["error_kind"]) == ("error", "too_large") and "--max-image-memory-gb" in row["error"]
        elif need > capacity:  # fits the bound but not the device, even alone
            assert (row["status"], row["error_kind"]) == ("error", "too_large") and "on its own" in row["error"]
        else:
            assert row["status"] == "ok", row["error"]
            assert _labels(out)[i] == ((10 + i, 20), need)  # exactly the output of the image alone
    # Split before it runs: no call holds several images whose estimates exceed the bound.
    assert all(len(call) == 1 or sum(call) <= bound for call in device.calls)


def test_images_that_each_fit_but_not_together_are_split_before_they_run():
    device = Device(capacity=100)
    out = _stage(device, bound=100)(_batch([40, 40, 40, 40, 40]))
    assert [r["status"] for r in out.to_pylist()] == ["ok"] * 5
    assert device.ooms == 0 and device.calls == [[40, 40], [40, 40], [40]]


def test_out_of_memory_halves_down_to_single_images_without_restarting_the_actor():
    device = Device(capacity=30)  # the estimate (no bound) says nothing: the device decides
    out = _stage(device, bound=None)(_batch([20, 20, 20, 50]))
    rows = out.to_pylist()
    assert [r["status"] for r in rows] == ["ok", "ok", "ok", "error"]
    assert rows[3]["error_kind"] == "too_large" and "ran out of memory on its own" in rows[3]["error"]
    # whole, halves, quarters; the image over the device alone tried twice.
    assert device.calls == [[20, 20, 20, 50], [20, 20], [20], [20], [20, 50], [20], [50], [50]]


def test_a_failure_that_is_not_memory_still_costs_only_its_image():
    class OneBad(Device):
        def predict(self, prepared):
            if any(p.need == 13 for p in prepared):
                raise ValueError("expected 3 channels")
            return super().predict(prepared)

    out = _stage(OneBad(capacity=10**6), bound=None)(_batch([1, 13, 2]))
    assert [(r["status"], r["error_kind"]) for r in out.to_pylist()] == [("ok", None), ("error", "model"), ("ok", None)]


@pytest.mark.parametrize("message", ["CUDA out of memory. Tried to allocate 20.00 MiB",
                                     "[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"])
def test_out_of_memory_is_recognised_on_the_device_and_the_host(message):
    from clipdiy.pipeline.stages.inference import is_out_of_memory, is_poisoning_error

    assert is_out_of_memory(RuntimeError(message)) and is_out_of_memory(MemoryError())
    assert not is_poisoning_error(RuntimeError(message))
