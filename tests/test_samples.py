"""The quick start's sample photos come with the installation, and re-runs see the same input."""

from __future__ import annotations

from PIL import Image

from clipdiy.segmentation.samples import sample_photos, samples_manifest


def test_sample_photos_are_real_images():
    photos = sample_photos()
    assert len(photos) == 3
    for path in photos:
        with Image.open(path) as image:
            image.verify()


def test_samples_manifest_is_stable(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    first = samples_manifest()
    assert first.startswith(str(tmp_path))
    lines = open(first).read().splitlines()
    assert lines == [str(p) for p in sample_photos()]
    assert samples_manifest() == first
