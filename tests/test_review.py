"""Review round trip (jobs/review.py): tasks for Label Studio, human corrections back, and the
readers preferring a correction over the model rows of the image version it corrected; the whole
trip through a real Label Studio server."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import REPO_ROOT
from labels_fixtures import VOC_NAMES, LabelItem, write_image, write_labels_output
from pipeline_support import load_job

from clipdiy.labels import brush
from clipdiy.labels.feed import LabelDataset, export_coco

CAT, DOG = 8, 12
H, W = 24, 32
#: Where .ci/run installs Label Studio (its pins clash with the project's: its own environment).
LABEL_STUDIO_VENV = Path(os.environ.get("LABEL_STUDIO_VENV", REPO_ROOT / ".venv-label-studio"))
LABEL_STUDIO_INSTALL = "python3 -m venv .venv-label-studio && .venv-label-studio/bin/pip install label-studio==1.23.2"


def load_review_job():
    return load_job("review")


def _label(cat_columns: int, dog_columns: int) -> np.ndarray:
    label = np.zeros((H, W), np.uint8)
    label[4:20, :cat_columns] = CAT
    label[4:20, W - dog_columns:] = DOG
    return label


@pytest.fixture()
def output(tmp_path):
    """Three photos; mean mask scores (area-weighted) b < c < a."""
    items = []
    for name, cat, dog, cat_score in (("a", 8, 8, 0.9), ("b", 12, 4, 0.2), ("c", 4, 10, 0.4)):
        photo = write_image(tmp_path / f"{name}.png", np.full((H, W, 3), 100, np.uint8))
        items.append(LabelItem(f"photos/{name}.png", photo, _label(cat, dog), mask_scores={0: 0.5, CAT: cat_score, DOG: 0.6}))
    labels = tmp_path / "labels"
    write_labels_output(str(labels), items, run_id="model-1", rows_per_shard=2,
                        started=dt.datetime(2026, 5, 1, tzinfo=dt.timezone.utc))
    return labels, {item.image_id: item for item in items}


def _mean_score(item: LabelItem) -> float:
    scores = {0: 0.5, DOG: 0.6, **item.mask_scores}
    values, counts = np.unique(item.label_map, return_counts=True)
    return float(sum(scores[v] * c for v, c in zip(values.tolist(), counts.tolist())) / counts.sum())


def test_brush_rle_bits_are_label_studios():
    # A 1 x 2 mask [in, out]: 8 RGBA bytes, 255 x 4 then 0 x 4. Header: 32-bit count 8, 5-bit word
    # size - 1 = 7, run-field sizes - 1 = 2, 3, 7, 15; then two runs of 4 with 3-bit fields
    # ("1" "00" "011" + 8-bit value); zero-padded to whole bytes.
    bits = (f"{8:032b}" + f"{7:05b}" + "0010" + "0011" + "0111" + "1111"
            + "1" + "00" + "011" + "11111111" + "1" + "00" + "011" + "00000000")
    bits += "0" * (-len(bits) % 8)
    expected = [int(bits[i:i + 8], 2) for i in range(0, len(bits), 8)]
    mask = np.array([[True, False]])
    assert brush.encode(mask) == expected
    assert brush.decode(expected, 1, 2).tolist() == [[True, False]]
    # Runs over 2**16 bytes split; literal tokens decode too; random masks round-trip.
    rng = np.random.default_rng(0)
    for shape, p in (((300, 400), 0.0), ((300, 400), 1.0), ((37, 53), 0.3)):
        mask = rng.random(shape) < p
        assert (brush.decode(brush.encode(mask), *shape) == mask).all()
    literal = f"{4:032b}" + f"{7:05b}" + "0010001101111111" + "0" + "00" + "011" + "00000001" + "00000010" + "11111111" + "10000000"
    literal += "0" * (-len(literal) % 8)
    values = brush.decode_values([int(literal[i:i + 8], 2) for i in range(0, len(literal), 8)])
    assert values.tolist() == [1, 2, 255, 128]


def test_export_picks_the_lowest_mean_mask_scores_and_names_the_vocabulary(output, tmp_path):
    labels, items = output
    tasks_path = tmp_path / "tasks.json"
    assert load_review_job().main(["export", "--output", str(labels), "--to", str(tasks_path), "--count", "2"]) == 0
    tasks = json.loads(tasks_path.read_text())
    by_score = sorted(items, key=lambda image_id: _mean_score(items[image_id]))
    assert [t["data"]["image_id"] for t in tasks] == by_score[:2] == ["photos/b.png", "photos/c.png"]
    for task in tasks:
        item = items[task["data"]["image_id"]]
        (prediction,) = task["predictions"]
        assert prediction["score"] == pytest.approx(_mean_score(item))
        assert len(prediction["model_version"]) == 12
        names = [r["value"]["brushlabels"][0] for r in prediction["result"]]
        assert names == ["background", "cat", "dog"]
        for result in prediction["result"]:
            class_id = VOC_NAMES.index(result["value"]["brushlabels"][0])
            assert (result["original_height"], result["original_width"]) == (H, W)
            assert (brush.decode(result["value"]["rle"], H, W) == (item.label_map == class_id)).all()
            assert result["score"] == pytest.approx({0: 0.5, DOG: 0.6, **item.mask_scores}[class_id])
    config = ElementTree.fromstring((tmp_path / "tasks.xml").read_text())
    assert [label.get("value") for label in config.iter("Label")] == list(VOC_NAMES)
    assert config.find("BrushLabels").get("toName") == config.find("Image").get("name")
    # --classes dog: every image has dog; --min-class-score 0.85 on cat: only a.
    assert load_review_job().main(["export", "--output", str(labels), "--to", str(tasks_path), "--classes", "cat",
                                   "--min-class-score", "0.85"]) == 0
    assert [t["data"]["image_id"] for t in json.loads(tasks_path.read_text())] == ["photos/a.png"]


def _add_rows(labels: Path, run_id: str, started: dt.datetime, rows: list[dict]) -> None:
    """A finished run of these rows (any columns of the label schema), as jobs/review.py import writes one."""
    from clipdiy.schema import label_schema

    run = labels / "runs" / run_id
    run.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=label_schema()), run / "part-001-x.parquet")
    manifest = json.loads(next((labels / "runs").glob("*/_MANIFEST.json")).read_text())
    manifest.update(run_id=run_id, started_at=started.isoformat(),
                    shards=[{"path": f"runs/{run_id}/part-001-x.parquet", "rows": len(rows), "ok": len(rows), "error": 0, "bytes": 0}])
    (run / "_MANIFEST.json").write_text(json.dumps(manifest))


def test_a_correction_wins_over_the_model_rows_of_its_image_version_only(output, tmp_path):
    from labels_fixtures import label_row

    labels, items = output
    model_started = dt.datetime(2026, 5, 1, tzinfo=dt.timezone.utc)
    corrected = _label(0, 20)  # the person says: no cat, a larger dog
    human = label_row(LabelItem("photos/b.png", items["photos/b.png"].uri, corrected), VOC_NAMES, "h-1",
                      dt.datetime(2026, 5, 3, tzinfo=dt.timezone.utc))
    human.update(source="human", annotator="label-studio:1", annotated_at=dt.datetime(2026, 5, 2, tzinfo=dt.timezone.utc),
                 corrected_run_started_at=model_started)
    _add_rows(labels, "h-1", dt.datetime(2026, 5, 3, tzinfo=dt.timezone.utc), [human])
    # A model run started after the correction, relabelling a (changed image) only.
    relabelled = label_row(LabelItem("photos/a.png", items["photos/a.png"].uri, _label(2, 2)), VOC_NAMES, "model-2",
                           dt.datetime(2026, 5, 4, tzinfo=dt.timezone.utc))
    _add_rows(labels, "model-2", dt.datetime(2026, 5, 4, tzinfo=dt.timezone.utc), [relabelled])
    dataset = LabelDataset(str(labels))
    got = {dataset.records[i]["image_id"]: dataset[i][1] for i in range(len(dataset))}
    assert (got["photos/b.png"] == corrected).all()
    assert (got["photos/a.png"] == _label(2, 2)).all()
    assert (got["photos/c.png"] == items["photos/c.png"].label_map).all()
    # A model row of a later version of b (the image changed) wins over the older correction.
    later = label_row(LabelItem("photos/b.png", items["photos/b.png"].uri, _label(6, 6)), VOC_NAMES, "model-3",
                      dt.datetime(2026, 5, 5, tzinfo=dt.timezone.utc))
    _add_rows(labels, "model-3", dt.datetime(2026, 5, 5, tzinfo=dt.timezone.utc), [later])
    dataset = LabelDataset(str(labels))
    assert (dataset[[r["image_id"] for r in dataset.records].index("photos/b.png")][1] == _label(6, 6)).all()
    # A correction of the old version imported after that (exported before b changed) is stale:
    # it does not win over the newer version's model row, though its run is the latest.
    stale = dict(human, run_id="h-2", run_started_at=dt.datetime(2026, 5, 6, tzinfo=dt.timezone.utc))
    _add_rows(labels, "h-2", dt.datetime(2026, 5, 6, tzinfo=dt.timezone.utc), [stale])
    dataset = LabelDataset(str(labels))
    assert (dataset[[r["image_id"] for r in dataset.records].index("photos/b.png")][1] == _label(6, 6)).all()


# ---------------------------------------------------------------- a real Label Studio

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def label_studio(tmp_path_factory):
    """A Label Studio server on 127.0.0.1 with a temporary data directory; (url, email, password)."""
    executable = LABEL_STUDIO_VENV / "bin" / "label-studio"
    if not executable.exists():
        reason = f"Label Studio is not installed in {LABEL_STUDIO_VENV} (.ci/run installs it: `{LABEL_STUDIO_INSTALL}`)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    data = tmp_path_factory.mktemp("label-studio")
    port, email, password = _free_port(), "reviewer@example.com", "review-password-1"
    env = {**os.environ, "SENTRY_DSN": "", "FRONTEND_SENTRY_DSN": "",  # else it crashes at start (sentry-sdk 3)
           "LATEST_VERSION_CHECK": "false", "COLLECT_ANALYTICS": "false",  # nothing leaves the machine
           "LABEL_STUDIO_BASE_DATA_DIR": str(data), "DJANGO_DB": "sqlite"}
    log = open(data / "server.log", "wb")
    server = subprocess.Popen([str(executable), "start", "--host", "127.0.0.1", "--port", str(port), "--no-browser",
                               "--data-dir", str(data), "--username", email, "--password", password],
                              stdout=log, stderr=subprocess.STDOUT, env=env, cwd=data, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 420
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("Label Studio did not start:\n" + (data / "server.log").read_text()[-3000:])
            time.sleep(2)
        yield url, email, password
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


@pytest.mark.slow
def test_round_trip_through_label_studio(label_studio, output, tmp_path):
    from pycocotools import mask as mask_utils

    url, email, password = label_studio
    labels, items = output
    model_files = {p: p.read_bytes() for p in labels.rglob("*") if p.is_file()}
    work = tmp_path / "work"
    work.mkdir()
    assert load_review_job().main(["export", "--output", str(labels), "--to", str(work / "tasks.json"), "--count", "3"]) == 0
    # The one change: the cat mask of b loses its left half.
    edited = items["photos/b.png"].label_map == CAT
    edited[:, :6] = False
    np.save(work / "cat.npy", edited)
    (work / "edit.json").write_text(json.dumps({"image_id": "photos/b.png", "class_name": "cat", "mask": "cat.npy"}))
    driver = subprocess.run([str(LABEL_STUDIO_VENV / "bin" / "python"), str(REPO_ROOT / "tests" / "label_studio_driver.py"),
                             url, email, password, str(work)], capture_output=True, text=True, timeout=300)
    assert driver.returncode == 0, driver.stderr[-3000:]

    # Every mask Label Studio holds (decoded by its SDK) equals the pseudo-label (decoded by pycocotools).
    held = np.load(work / "predictions.npz")
    rows = {r["image_id"]: r for r in pa.concat_tables(pq.read_table(p) for p in sorted(labels.glob("runs/*/part-*"))).to_pylist()}
    expected_keys = set()
    for image_id, row in rows.items():
        for mask in row["masks"]:
            key = f"{image_id}|{mask['class_name']}"
            expected_keys.add(key)
            reference = mask_utils.decode({"size": list(mask["rle_size"]), "counts": mask["rle_counts"].encode()}).astype(bool)
            np.testing.assert_array_equal(held[key], reference, err_msg=key)
    assert set(held.files) == expected_keys
    described = json.loads((work / "predictions.json").read_text())
    for image_id, predictions in described.items():
        (prediction,) = predictions
        assert prediction["score"] == pytest.approx(_mean_score(items[image_id]), abs=1e-6)
        scores = {0: 0.5, DOG: 0.6, **items[image_id].mask_scores}
        assert [r["score"] for r in prediction["results"]] == pytest.approx(
            [scores[VOC_NAMES.index(r["class_name"])] for r in prediction["results"]])

    job = load_review_job()
    assert job.main(["import", "--from", str(work / "export.json"), "--output", str(labels)]) == 0
    # Nothing the model wrote changed; the corrections are a run of their own.
    assert all(path.read_bytes() == data for path, data in model_files.items())
    human_runs = [p.parent for p in labels.glob("runs/*/_MANIFEST.json") if p.parent.name != "model-1"]
    assert len(human_runs) == 1
    (human,) = pq.read_table(next(human_runs[0].glob("part-*.parquet"))).to_pylist()
    assert human["source"] == "human" and human["image_id"] == "photos/b.png"
    assert human["annotator"].startswith("label-studio:") and human["annotated_at"] is not None
    assert human["corrected_run_started_at"] == rows["photos/b.png"]["run_started_at"]

    # The feed returns the corrected mask: the cat's left half is in no mask now (255 = ignore).
    expected = items["photos/b.png"].label_map.copy()
    expected[:, :6][expected[:, :6] == CAT] = 255
    dataset = LabelDataset(str(labels))
    got = {dataset.records[i]["image_id"]: dataset[i][1] for i in range(len(dataset))}
    np.testing.assert_array_equal(got["photos/b.png"], expected)
    for image_id in ("photos/a.png", "photos/c.png"):
        np.testing.assert_array_equal(got[image_id], items[image_id].label_map)
    # The COCO export takes the human row too.
    coco = tmp_path / "coco.json"
    export_coco(str(labels), str(coco))
    document = json.loads(coco.read_text())
    image = next(i for i in document["images"] if i["file_name"].endswith("b.png"))
    cat = next(a for a in document["annotations"] if a["image_id"] == image["id"] and a["category_id"] == CAT)
    assert cat["area"] == int(edited.sum())
