"""The run report (jobs/report.py): its numbers against an independent count over the shards, the
class moves it calls out, the lowest-scoring images, and the page in headless Chromium."""

from __future__ import annotations

import collections
import datetime as dt
import html.parser
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import REPO_ROOT
from labels_fixtures import VOC_NAMES, LabelItem, write_image, write_labels_output
from pipeline_support import cli_args, load_job

CAT, DOG, PERSON = 8, 12, 15
H, W = 20, 30
CHROMIUM_APT = "apt-get update && apt-get install -y chromium"
#: Set to a path to keep the browser's screenshot of the page (the README's picture).
SCREENSHOT_ENV = "CLIPDIY_REPORT_SCREENSHOT"


def load_report_job():
    return load_job("report")


def _scene(cat: int = 0, dog: int = 0, person: int = 0) -> np.ndarray:
    """A 20 x 30 label map: ``cat``, then ``dog``, then ``person`` pixels in column-major order, the rest background."""
    flat = np.zeros(H * W, np.uint8)
    flat[:cat] = CAT
    flat[cat : cat + dog] = DOG
    flat[cat + dog : cat + dog + person] = PERSON
    return flat.reshape(W, H).T.copy()


def _set_model(run_dir: Path, **values: str) -> None:
    """Rewrite a run's shards as if another model had written them."""
    for shard in sorted(run_dir.glob("part-*.parquet")):
        table = pq.read_table(shard)
        for name, value in values.items():
            table = table.set_column(table.schema.get_field_index(name), name,
                                     pa.array([value] * table.num_rows, table.schema.field(name).type))
        pq.write_table(table, shard)


def _set_manifest(run_dir: Path, skipped: int, total_s: float, images_per_second: float) -> None:
    path = run_dir / "_MANIFEST.json"
    manifest = json.loads(path.read_text())
    manifest["counts"]["skipped"] = skipped
    manifest["timings"] = {"listing": 1.0, "labelling": total_s - 1.0, "total": total_s, "images_per_second": images_per_second}
    path.write_text(json.dumps(manifest))


@pytest.fixture()
def nights(tmp_path):
    """Three nights: a and b alike, c with another model, many more cats, and image 0 relabelled
    with the lowest score of all."""
    photo = write_image(tmp_path / "photo.png", np.full((H, W, 3), 128, np.uint8))
    output = tmp_path / "labels"
    day = lambda d: dt.datetime(2026, 3, d, 2, 0, tzinfo=dt.timezone.utc)  # noqa: E731
    a = [LabelItem(f"img{i}.jpg", photo, _scene(cat=40, dog=100 + 20 * i, person=60), mask_scores={CAT: 0.5 + 0.05 * i})
         for i in range(4)]
    a.append(LabelItem("bad0.jpg", photo, error_kind="truncated", error="truncated JPEG"))
    b = [LabelItem(f"img{i}.jpg", photo, _scene(cat=40, dog=110 + 20 * (i - 4), person=60)) for i in range(4, 8)]
    b += [LabelItem("bad1.jpg", photo, error_kind="corrupt"), LabelItem("bad2.jpg", photo, error_kind="not_image")]
    c = [LabelItem(f"img{i}.jpg", photo, _scene(cat=300, dog=20), mask_scores={CAT: 0.3 + 0.01 * i, DOG: 0.35})
         for i in range(8, 12)]
    c.append(LabelItem("img0.jpg", photo, _scene(cat=200, person=100), mask_scores={0: 0.2, CAT: 0.1, PERSON: 0.15}))
    for run_id, items, d, skipped, total_s, speed in (("night-a", a, 1, 0, 600.0, 2.5), ("night-b", b, 2, 5, 540.0, 3.0),
                                                      ("night-c", c, 3, 11, 300.0, 4.25)):
        run_dir = Path(write_labels_output(str(output), items, run_id=run_id, started=day(d), rows_per_shard=2))
        _set_manifest(run_dir, skipped, total_s, speed)
    _set_model(output / "runs" / "night-c", clip_model="ViT-L-14", precision="bf16", method="clipdiy")
    return output


# ------------------------------------------------------------------ independent count

def independent_count(output: Path) -> dict:
    """Per run: rows, ok, errors by kind; per class pixels (masks decoded with pycocotools) and
    images won; the latest row of each image: its run and image score. Plain Python over rows."""
    from pycocotools import mask as mask_utils

    runs = {}
    latest: dict[str, tuple] = {}
    for manifest_path in sorted(output.glob("runs/*/_MANIFEST.json")):
        manifest = json.loads(manifest_path.read_text())
        names = manifest["vocabulary"]["class_names"]
        run = {"rows": 0, "ok": 0, "errors": collections.Counter(), "pixels": collections.Counter(),
               "wins": collections.Counter(), "models": set(), "manifest": manifest}
        for shard in manifest["shards"]:
            for row in pq.read_table(output / shard["path"]).to_pylist():
                run["rows"] += 1
                run["models"].add((row["clip_model"], row["precision"], row["method"]))
                if row["status"] != "ok":
                    run["errors"][row["error_kind"]] += 1
                    continue
                run["ok"] += 1
                areas = {}
                weighted = 0.0
                for m in row["masks"]:
                    decoded = mask_utils.decode({"size": list(m["rle_size"]), "counts": m["rle_counts"].encode()})
                    areas[m["class_id"]] = int(decoded.sum())
                    run["pixels"][names[m["class_id"]]] += int(decoded.sum())
                    weighted += m["score"] * int(decoded.sum())
                others = {c: a for c, a in areas.items() if c != 0}
                winner = max(others, key=lambda c: others[c]) if others else 0
                run["wins"][names[winner]] += 1
                key = (row["run_started_at"], row["run_id"])
                if row["image_id"] not in latest or latest[row["image_id"]][0] < key:
                    latest[row["image_id"]] = (key, row["run_id"], weighted / sum(areas.values()))
        runs[manifest["run_id"]] = run
    return {"runs": runs, "latest_scores": {image: (run_id, score) for image, (_, run_id, score) in latest.items()}}


class _Page(html.parser.HTMLParser):
    """The nights table (run -> key -> text), the classes table (class -> run -> text), the
    called-out moves, the lowest images in order, and the script's picture count."""

    def __init__(self):
        super().__init__()
        self.nights, self.classes = collections.defaultdict(dict), collections.defaultdict(dict)
        self.drifts, self.lowest, self.shown = [], [], ""
        self._cell, self._text, self._row_run, self._row_class, self._in_shown = None, "", None, None, False
        self.images = 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images += 1
        if tag == "tr":
            self._row_run, self._row_class = attrs.get("data-run"), attrs.get("data-class")
        if tag == "td" and (self._row_run and "data-k" in attrs or self._row_class and "data-run" in attrs):
            self._cell, self._text = attrs, ""
        if tag == "li" and "data-class" in attrs:
            self.drifts.append((attrs["data-run"], attrs["data-class"], attrs["data-measure"]))
        if tag == "div" and attrs.get("class") == "low":
            self.lowest.append(attrs["data-image-id"])
        self._in_shown = attrs.get("id") == "shown"

    def handle_data(self, data):
        if self._cell is not None:
            self._text += data
        if self._in_shown:
            self.shown += data

    def handle_endtag(self, tag):
        if tag == "td" and self._cell is not None:
            if self._row_run:
                self.nights[self._row_run][self._cell["data-k"]] = self._text
            else:
                self.classes[self._row_class][self._cell["data-run"]] = self._text
            self._cell = None


def check_numbers(page: _Page, expected: dict) -> None:
    """Every number the page shows per night and per class equals the independent count."""
    runs = expected["runs"]
    assert sorted(page.nights) == sorted(runs)
    for run_id, run in runs.items():
        shown = page.nights[run_id]
        manifest = run["manifest"]
        assert int(shown["seen"]) == run["rows"], run_id
        assert int(shown["ok"]) == run["ok"], run_id
        errors = ", ".join(f"{k} {v}" for k, v in sorted(run["errors"].items())) or "0"
        assert shown["errors"] == errors, run_id
        assert int(shown["skipped"]) == manifest["counts"]["skipped"]
        assert shown["wall"] == f"{manifest['timings'].get('total', 0) / 60:.1f}"
        assert float(shown["speed"] or 0) == manifest["timings"].get("images_per_second", 0)
        (model,) = run["models"]
        assert shown["precision"] == str(model[1]) and shown["method"] == str(model[2])
        total_pixels = sum(run["pixels"].values())
        for name in set(run["pixels"]) | set(run["wins"]):
            assert page.classes[name][run_id] == f"{100 * run['pixels'][name] / total_pixels:.2f}% / {run['wins'][name]}", (name, run_id)
    # Classes no night has are left out of the table.
    assert set(page.classes) == {name for run in runs.values() for name in run["pixels"]}


# ------------------------------------------------------------------ tests

def test_report_numbers_equal_an_independent_count(nights, tmp_path):
    page_path = tmp_path / "report.html"
    assert load_report_job().main(["--output", str(nights), "--html", str(page_path), "--lowest", "3"]) == 0
    page = _Page()
    page.feed(page_path.read_text())
    expected = independent_count(nights)
    check_numbers(page, expected)
    # The lowest image scores of the newest night (c) among the rows that count, lowest first:
    # img0 relabelled by c has the lowest score of all (night a's row of it no longer counts).
    scores = {image: score for image, (run_id, score) in expected["latest_scores"].items() if run_id == "night-c"}
    assert page.lowest == sorted(scores, key=lambda image: (scores[image], image))[:3]
    assert page.lowest[0] == "img0.jpg"
    # Night c's model differs from b's, and the table says so.
    assert page.nights["night-c"]["model"].endswith("(changed)")
    assert not page.nights["night-b"]["model"].endswith("(changed)")
    assert page.nights["night-a"]["model"] == page.nights["night-b"]["model"]


def test_class_moves_against_the_median_of_earlier_nights_are_called_out(nights, tmp_path):
    page_path = tmp_path / "report.html"
    assert load_report_job().main(["--output", str(nights), "--html", str(page_path), "--drift-threshold", "0.1"]) == 0
    page = _Page()
    page.feed(page_path.read_text())
    # By hand (pixel shares of 2400 pixels in a and b, 3000 in c): cat 6.7%, 6.7% -> 46.7%;
    # dog 21.7%, 23.3% -> 2.7%; background 61.7%, 60.0% -> 47.3%; person 10%, 10% -> 3.3% (6.7
    # points, under 10). Images won: dog wins every image of a and b, cat every image of c. Night
    # b moved nothing by 10 points against a.
    assert sorted(page.drifts) == sorted([
        ("night-c", "cat", "pixel share"), ("night-c", "dog", "pixel share"), ("night-c", "background", "pixel share"),
        ("night-c", "cat", "images won"), ("night-c", "dog", "images won"),
    ])


def _chromium() -> str:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip(f"Chromium is not installed (Debian: `{CHROMIUM_APT}`)")
    return chromium


def open_in_chromium(page_path: Path, profile: Path, screenshot: Path | None = None) -> str:
    """The page's DOM after its script ran in headless Chromium; a screenshot too when asked."""
    chromium = _chromium()
    common = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
              "--disable-component-update", "--no-first-run", f"--user-data-dir={profile}", "--virtual-time-budget=5000"]
    done = subprocess.run([*common, "--dump-dom", page_path.as_uri()], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    if screenshot is not None:
        shot = subprocess.run([*common, "--hide-scrollbars", "--window-size=1100,1500", f"--screenshot={screenshot}",
                               page_path.as_uri()], capture_output=True, text=True, timeout=120)
        assert shot.returncode == 0 and screenshot.is_file(), shot.stderr[-2000:]
    return done.stdout


def test_report_page_opens_in_headless_chromium(nights, tmp_path):
    page_path = tmp_path / "report.html"
    assert load_report_job().main(["--output", str(nights), "--html", str(page_path), "--lowest", "4"]) == 0
    screenshot = tmp_path / "report.png"
    dom = open_in_chromium(page_path, tmp_path / "profile", screenshot)
    page = _Page()
    page.feed(dom)
    # 3 night plots, 2 class plots, 3 histograms, 4 thumbnails: all decoded by the browser.
    assert page.images == 12
    assert page.shown.strip() == "12 of 12 pictures shown"
    check_numbers(page, independent_count(nights))
    from PIL import Image

    with Image.open(screenshot) as shot:
        assert shot.size == (1100, 1500)
        pixels = np.asarray(shot.convert("RGB"))
    assert (pixels.std(axis=(0, 1)) > 10).all()  # not a blank page
    if os.environ.get(SCREENSHOT_ENV):
        with Image.open(screenshot) as shot:
            shot.convert("RGB").quantize(64).save(os.environ[SCREENSHOT_ENV], optimize=True)


@pytest.mark.slow
def test_report_of_a_real_job_output_and_a_later_night(tmp_path, coco_images, tiny_clip_config):
    """The labelling job's own output (4 COCO photos, one broken file), then a night written by
    another model: the report's numbers equal the count over the shards, and the page opens."""
    images = tmp_path / "images"
    images.mkdir()
    for path in coco_images[:4]:
        shutil.copy(path, images / path.name)
    (images / "broken.jpg").write_bytes(coco_images[0].read_bytes()[:300])
    output = tmp_path / "labels"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO_ROOT))
    env.pop("RAY_ADDRESS", None)
    job = subprocess.run([*cli_args(images, output, tiny_clip_config), "--vocabulary", "voc"],
                         capture_output=True, text=True, timeout=600, env=env, cwd=REPO_ROOT)
    assert job.returncode == 0, job.stderr[-3000:]
    photo = write_image(tmp_path / "photo.png", np.full((H, W, 3), 128, np.uint8))
    write_labels_output(str(output), [LabelItem(f"later{i}.jpg", photo, _scene(cat=300)) for i in range(3)],
                        VOC_NAMES, run_id="zz-later", started=dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=1))
    page_path = tmp_path / "report.html"
    report = subprocess.run([sys.executable, str(REPO_ROOT / "jobs" / "report.py"), "--output", str(output),
                             "--html", str(page_path)], capture_output=True, text=True, timeout=300, env=env, cwd=REPO_ROOT)
    assert report.returncode == 0, report.stderr[-3000:]
    assert "rows in" in report.stdout and " s" in report.stdout  # says how long it took
    expected = independent_count(output)
    real = next(r for r in expected["runs"] if r != "zz-later")
    assert expected["runs"][real]["rows"] == 5 and expected["runs"][real]["errors"]
    page = _Page()
    page.feed(open_in_chromium(page_path, tmp_path / "profile"))
    check_numbers(page, expected)
    assert page.nights["zz-later"]["model"].endswith("(changed)")
    assert page.shown.strip() == f"{page.images} of {page.images} pictures shown"
