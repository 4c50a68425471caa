"""Where the suite's own data lives: inside the repository, so a bare clone passes its tests.

``tests/data/`` holds the 32 COCO val2017 photos with their instance annotations and the real FOUND
head (see ``tests/data/README.md`` for sources and licences). Nothing in the suite reads outside
the repository.
"""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
TEST_DATA = REPO_ROOT / "tests" / "data"
COCO_SAMPLE = TEST_DATA / "coco-val2017-sample"
SAMPLE_IMAGES = COCO_SAMPLE / "images"
FOUND_HEAD = TEST_DATA / "weights" / "found_decoder.pt"
