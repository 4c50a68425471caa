"""The run report under the cases an audit found (issue 26, finding 8).

- a run of human corrections (``jobs/review.py import``) is not a night: no drift, no "latest
  night", no speed point, no model change from it;
- a night that labelled nothing (every image skipped) is no model change and moves no class;
- a thumbnail whose source cannot be shown (a decompression bomb, a source over the byte bound,
  any read error) costs that thumbnail only;
- class names with matplotlib mathtext (``$...$``, ``_``, ``^``, ``\\``) plot as they are (generated);
- the output location is shown without its credentials; the nights keep only the manifest
  fields the page shows.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from labels_fixtures import LabelItem, write_image, write_labels_output
from test_report import (
    CAT,
    DOG,
    H,
    W,
    _Page,
    _scene,
    _set_manifest,
    load_report_job,
)

from clipdiy.labels.report import ReportConfig, collect, render_html

day = lambda d: dt.datetime(2026, 3, d, 2, 0, tzinfo=dt.timezone.utc)


def _two_nights(tmp_path: Path) -> tuple[Path, str]:
    photo = write_image(tmp_path / "photo.png", np.full((H, W, 3), 128, np.uint8))
    output = tmp_path / "labels"
    for run_id, d, cat in (("night-a", 1, 40), ("night-b", 2, 44)):
        items = [LabelItem(f"{run_id}-{i}.jpg", photo, _scene(cat=cat, dog=100, person=60)) for i in range(3)]
        _set_manifest(Path(write_labels_output(str(output), items, run_id=run_id, started=day(d))), 0, 100.0, 2.0)
    return output, photo


def _page(output: Path, tmp_path: Path, *extra: str) -> _Page:
    page_path = tmp_path / "report.html"
    assert load_report_job().main(["--output", str(output), "--html", str(page_path), "--drift-threshold", "0.05",
                                   *extra]) == 0
    page = _Page()
    page.feed(page_path.read_text())
    page.text = page_path.read_text()
    return page


def test_a_human_correction_run_is_not_a_night(tmp_path):
    output, photo = _two_nights(tmp_path)
    # A correction run imported after night b: one row, all cat (a big "move"), with the
    # importer's manifest (source human, timings zero).
    human = LabelItem("night-b-0.jpg", photo, _scene(cat=H * W))
    run_dir = Path(write_labels_output(str(output), [human], run_id="20260303T000000Z-human", started=day(3)))
    manifest = json.loads((run_dir / "_MANIFEST.json").read_text())
    manifest["options"] = {"source": "human", "tool": "label-studio"}
    manifest["timings"] = {"total": 0.2, "listing": 0.0, "labelling": 0.0, "images_per_second": 0.0}
    (run_dir / "_MANIFEST.json").write_text(json.dumps(manifest))
    page = _page(output, tmp_path)
    assert set(page.nights) == {"night-a", "night-b"}, "the correction run is not a night"
    assert page.drifts == [], "a correction is no class move"
    assert "Latest night night-b" in page.text
    assert "1 human-correction run" in page.text


def test_a_night_that_labelled_nothing_is_no_model_change_and_moves_no_class(tmp_path):
    output, photo = _two_nights(tmp_path)
    # Night c: everything skipped (labelled before): no row, a manifest only.
    empty = Path(write_labels_output(str(output), [], run_id="night-c", started=day(3)))
    _set_manifest(empty, 6, 30.0, 0.0)
    page = _page(output, tmp_path)
    assert set(page.nights) == {"night-a", "night-b", "night-c"}
    assert not page.nights["night-c"]["model"].endswith("(changed)")
    assert page.drifts == [], "an empty night moves no class"
    assert "(changed)" not in page.text.split('id="glance"')[1].split("</p>")[0]
    # A night after the empty one, with the same model as a and b: no change either.
    items = [LabelItem(f"d-{i}.jpg", photo, _scene(cat=42, dog=100, person=60)) for i in range(3)]
    _set_manifest(Path(write_labels_output(str(output), items, run_id="night-d", started=day(4))), 0, 100.0, 2.0)
    page = _page(output, tmp_path)
    assert not page.nights["night-d"]["model"].endswith("(changed)")
    assert page.drifts == []


def test_a_thumbnail_that_cannot_be_shown_costs_that_thumbnail_only(tmp_path):
    from PIL import Image

    output, photo = _two_nights(tmp_path)
    bomb = tmp_path / "bomb.png"
    Image.new("1", (20000, 20000)).save(bomb)  # 400 Mpx: PIL's decompression-bomb error, a few KB on disk
    big = tmp_path / "big.png"
    write_image(big, np.random.default_rng(0).integers(0, 255, (200, 200, 3), np.uint8))
    items = [LabelItem("bomb.jpg", str(bomb), _scene(cat=1, dog=1), mask_scores={0: 0.01, CAT: 0.01, DOG: 0.01}),
             LabelItem("big.jpg", str(big), _scene(cat=1, dog=2), mask_scores={0: 0.02, CAT: 0.02, DOG: 0.02}),
             LabelItem("fine.jpg", photo, _scene(cat=1, dog=3), mask_scores={0: 0.03, CAT: 0.03, DOG: 0.03})]
    _set_manifest(Path(write_labels_output(str(output), items, run_id="night-c", started=day(3))), 0, 100.0, 2.0)
    config = ReportConfig(lowest=3, max_source_bytes=big.stat().st_size - 1)
    data = collect(str(output), config)
    assert [r["image_id"] for r in data.lowest] == ["bomb.jpg", "big.jpg", "fine.jpg"]
    page = render_html(data, config, source=str(output))
    lows = page.split('id="lowest"')[1]
    assert lows.count("source image unreadable now") == 2
    assert lows.count("<img ") == 1


def test_the_output_location_is_shown_without_credentials(tmp_path):
    output, _ = _two_nights(tmp_path)
    data = collect(str(output), ReportConfig(lowest=0))
    page = render_html(data, ReportConfig(lowest=0), source="s3://AKIAEXAMPLE:wJalrXUtnFEMI@bucket/labels?X-Amz-Signature=abc123")
    assert "wJalrXUtnFEMI" not in page and "abc123" not in page and "AKIAEXAMPLE" not in page
    for night in data.nights:
        assert set(night.manifest) <= {"counts", "timings", "started_at", "options"}, "only what the page shows is kept"


_PLAIN = st.text(st.sampled_from("ab %#&~"), max_size=3)
_MATHTEXT = st.builds(lambda a, b, c: f"{a}${b}${c}", _PLAIN, st.text(st.sampled_from("ab_^\\{}$"), min_size=1, max_size=4),
                      _PLAIN)


@settings(max_examples=5)
@given(names=st.lists(_MATHTEXT, min_size=2, max_size=3, unique=True))
def test_class_names_with_mathtext_plot_as_they_are(names, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("mathtext")
    photo = write_image(tmp_path / "photo.png", np.full((H, W, 3), 128, np.uint8))
    vocabulary = ("background", *names)
    output = tmp_path / "labels"
    label = (np.arange(W)[None, :].repeat(H, 0) * len(vocabulary) // W).astype(np.uint8)  # a stripe per class
    write_labels_output(str(output), [LabelItem("a.jpg", photo, label)], run_id="night-a", started=day(1),
                        class_names=vocabulary)
    data = collect(str(output), ReportConfig(lowest=0))
    assert data.class_names == vocabulary
    page = render_html(data, ReportConfig(lowest=0), source=str(output))
    assert page.count("data:image/png;base64,") >= 6
