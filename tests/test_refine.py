"""PAMR's fast paths (clipdiy.segmentation.refine) against independent computations (SPEC 8.8).

The sparse matrix against one filled in entry by entry with explicit loops; every way of running
the iterations (all classes at once, chunks of classes, shifted sums; even and odd iteration
counts, which end in different buffers) against the per-image float64 transcription in
tests/reference_naclip.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import clipdiy.segmentation.refine as refine
from clipdiy.segmentation.refine import NEIGHBOUR_STEPS, pamr, pamr_affinity, pamr_matrix
from reference_naclip import reference_pamr


def test_pamr_matrix_holds_each_pixels_neighbour_weights_in_their_columns():
    batch, height, width, dilations = 2, 7, 9, (1, 3)
    images = torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(0))
    affinity = pamr_affinity(images, dilations)
    expected = np.zeros((batch * height * width,) * 2)
    for b in range(batch):
        for y in range(height):
            for x in range(width):
                row = (b * height + y) * width + x
                k = 0
                for d in dilations:
                    for dy, dx in NEIGHBOUR_STEPS:
                        ny = min(max(y + d * dy, 0), height - 1)  # replicate padding
                        nx = min(max(x + d * dx, 0), width - 1)
                        expected[row, (b * height + ny) * width + nx] += affinity[b, k, y, x].item()
                        k += 1
    matrix = pamr_matrix(affinity, dilations)
    assert matrix.layout == torch.sparse_csr and matrix.shape == expected.shape
    assert np.abs(matrix.to_dense().double().numpy() - expected).max() < 1e-7
    assert np.allclose(expected.sum(axis=1), 1.0)  # softmax over neighbours: rows sum to 1


@pytest.mark.parametrize("iterations", [0, 1, 2, 5])
@pytest.mark.parametrize(
    "path, max_elements",
    [
        ("sparse, all classes", 128_000_000),
        # pixels * 16 entries take half the budget: the rest holds 2 buffers of 8 of the 19 classes.
        ("sparse, chunks of 8", 2 * (2 * 37 * 45) * 16),
        ("shifted sums", 1),
    ],
)
def test_every_pamr_path_matches_the_transcription(monkeypatch, path, max_elements, iterations):
    generator = torch.Generator().manual_seed(3)
    images = torch.rand(2, 3, 37, 45, generator=generator)
    logits = torch.randn(2, 19, 37, 45, generator=generator)
    taken = []
    for name in ("_pamr_sparse", "_pamr_shifted"):
        original = getattr(refine, name)
        monkeypatch.setattr(refine, name, lambda *args, _f=original, _n=name: taken.append((_n, args[-1])) or _f(*args))
    expected = [reference_pamr(images[b].numpy(), logits[b].numpy(), iterations=iterations, dilations=(2, 4)) for b in range(2)]
    # Either layout in, the same values out, in the layout that came in (pixel-major: channels-last).
    for layout in (torch.contiguous_format, torch.channels_last):
        taken.clear()
        refined = pamr(images, logits.contiguous(memory_format=layout), iterations, (2, 4), max_elements)
        if path == "shifted sums":
            assert taken == [("_pamr_shifted", 1)]
        else:
            assert taken == [("_pamr_sparse", 8 if "chunks" in path else (128_000_000 - 2 * 37 * 45 * 16) // (2 * 2 * 37 * 45))]
        assert refined.shape == logits.shape and refined.dtype == torch.float32
        assert refined.is_contiguous(memory_format=layout)
        for b in range(2):
            assert np.abs(refined[b].double().numpy() - expected[b]).max() < 1e-5
