"""The report's per-run aggregates kept under OUTPUT/_report (issue 26, finding 8: memory and
reads that do not grow with the history).

- over generated histories of nights (relabelled images, error rows, empty nights, shards of
  any size), the report read from the cache equals the report read from the shards, and both
  equal an independent count over the rows (pycocotools); the second report reads no shard of
  a run older than the newest night;
- a cache file that is torn, bit-flipped, of another format version, of another number of bins,
  or of a run released again is not used: the run is read again and the file rewritten;
- a job writing a new run meanwhile is neither blocked nor read half-written; an OUTPUT where
  the cache cannot be written still gets a right report;
- on S3 (moto), the cache is kept and found again, and a manifest written again is noticed.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from labels_fixtures import LabelItem, write_image, write_labels_output
from test_report import CAT, DOG, PERSON, H, W, _scene, independent_count

from clipdiy.labels import report_cache
from clipdiy.labels.report import ReportConfig, collect
from clipdiy.output_layout import OutputLayout

ERROR_KINDS = ("truncated", "corrupt", "not_image", "not_found")


def _day(d: int) -> dt.datetime:
    return dt.datetime(2026, 3, 1, 2, 0, tzinfo=dt.timezone.utc) + dt.timedelta(days=d)


# An item: (image number, None for an error row or (cat, dog, person) pixels, a score or error kind).
# Classes of one image have distinct areas: which of two equal masks wins an image is not defined.
_PIXELS = st.tuples(st.integers(0, 200), st.integers(0, 200), st.integers(0, 200)).filter(
    lambda p: len({x for x in p if x}) == sum(1 for x in p if x))
_ITEM = st.tuples(st.integers(0, 7), st.one_of(st.none(), _PIXELS), st.integers(0, 10**6))
_NIGHT = st.tuples(st.lists(_ITEM, max_size=6, unique_by=lambda item: item[0]), st.integers(1, 4))
HISTORIES = st.lists(_NIGHT, min_size=1, max_size=4)


def write_history(output: Path, photo: str, history) -> None:
    """Night ``k`` of ``history`` as run ``night-k`` started on day ``k``; an image's score is
    the same for all its masks (so its image score is that value) and distinct across rows."""
    for k, (items, rows_per_shard) in enumerate(history):
        labelled = []
        for number, pixels, draw in items:
            image_id = f"img{number}.jpg"
            if pixels is None:
                labelled.append(LabelItem(image_id, photo, error_kind=ERROR_KINDS[draw % len(ERROR_KINDS)]))
                continue
            score = round(0.05 + 0.9 * ((draw * 7919 + k * 104729 + number * 13) % 100_003) / 100_003, 6)
            labelled.append(LabelItem(image_id, photo, _scene(*pixels), mask_scores=dict.fromkeys(range(21), score)))
        write_labels_output(str(output), labelled, run_id=f"night-{k}", started=_day(k), rows_per_shard=rows_per_shard)


def night_documents(data) -> list[dict]:
    return [night.to_document() for night in data.nights]


def lowest_of(data) -> list[tuple[str, str, float]]:
    return [(row["run_id"], row["image_id"], round(row["image_score"], 6)) for row in data.lowest]


def expected_lowest(output: Path, k: int) -> list[tuple[str, str, float]]:
    """Independently: every row of every run in plain Python; the latest row of each image (by
    run start); those of the newest night that labelled something and of the nights after it,
    with masks; the k with the lowest score (all masks of a row share its score)."""
    rows = []
    for manifest_path in sorted(output.glob("runs/*/_MANIFEST.json")):
        manifest = json.loads(manifest_path.read_text())
        for shard in manifest["shards"]:
            rows += pq.read_table(output / shard["path"], columns=["run_id", "run_started_at", "image_id", "status",
                                                                  "masks"]).to_pylist()
    latest = {}
    for row in rows:
        if row["image_id"] not in latest or (latest[row["image_id"]]["run_started_at"], latest[row["image_id"]]["run_id"]) < (
                row["run_started_at"], row["run_id"]):
            latest[row["image_id"]] = row
    labelled = [row["run_started_at"] for row in rows if row["status"] == "ok"]
    starts = sorted({row["run_started_at"] for row in rows})
    since = max(labelled) if labelled else (starts[-1] if starts else None)
    kept = [row for row in latest.values() if row["masks"] and since is not None and row["run_started_at"] >= since]
    kept.sort(key=lambda row: row["masks"][0]["score"])
    return [(row["run_id"], row["image_id"], round(row["masks"][0]["score"], 6)) for row in kept[:k]]


def check_against_independent_count(data, output: Path) -> None:
    runs = independent_count(output)["runs"]
    assert [night.run_id for night in data.nights] == sorted(runs)
    for night in data.nights:
        run = runs[night.run_id]
        assert (night.rows, night.ok, night.errors) == (run["rows"], run["ok"], dict(run["errors"])), night.run_id
        pixels = dict(zip(night.class_names, night.class_pixels.tolist()))
        wins = dict(zip(night.class_names, night.class_wins.tolist()))
        assert {name: value for name, value in pixels.items() if value} == dict(run["pixels"]), night.run_id
        assert {name: value for name, value in wins.items() if value} == dict(run["wins"]), night.run_id


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(history=HISTORIES, lowest=st.integers(1, 4))
def test_a_report_from_the_cache_equals_one_from_the_shards_and_an_independent_count(history, lowest, tmp_path_factory):
    work = tmp_path_factory.mktemp("history")
    photo = write_image(work / "photo.png", np.full((H, W, 3), 128, np.uint8))
    output = work / "labels"
    write_history(output, photo, history)
    config = ReportConfig(lowest=lowest)
    first = collect(str(output), config)
    assert first.cached == 0
    second = collect(str(output), config)
    scratch = collect(str(output), ReportConfig(lowest=lowest, cache=False))
    assert second.cached == len(history), "every run from the cache"
    assert night_documents(second) == night_documents(scratch) == night_documents(first)
    assert (second.shards, second.rows) == (scratch.shards, scratch.rows)
    assert lowest_of(second) == lowest_of(scratch) == expected_lowest(output, lowest)
    check_against_independent_count(second, output)
    # What the second report read: the shards of the newest night that labelled something and
    # of the nights after it, and the lowest rows' shards again; no shard of an older night.
    newest = max((k for k, (items, _) in enumerate(history) if any(p is not None for _, p, _ in items)), default=len(history) - 1)
    recent = [shard for k in range(newest, len(history)) for shard in sorted((output / "runs" / f"night-{k}").glob("part-*.parquet"))]
    shown = {(row["run_id"], row["image_id"]) for row in second.lowest}
    holding = [shard for shard in recent if shown & set(zip(*pq.read_table(shard, columns=["run_id", "image_id"]).to_pydict().values()))]
    assert second.shards_read == len(recent) + len(holding)


def _two_nights(tmp_path: Path) -> Path:
    photo = write_image(tmp_path / "photo.png", np.full((H, W, 3), 128, np.uint8))
    output = tmp_path / "labels"
    write_history(output, photo, [([(i, (40 + i, 100, 60), i) for i in range(4)] + [(5, None, 0)], 2),
                                  ([(i, (10 * i, 55, 65), 10 + i) for i in range(2, 7)], 3)])
    return output


def _cache_file(output: Path, run: str) -> Path:
    return output / report_cache.CACHE_DIR / f"{run}.json"


def _flip(path: Path, position: int, bit: int) -> None:
    data = bytearray(path.read_bytes())
    data[position % len(data)] ^= 1 << bit
    path.write_bytes(bytes(data))


def _truncate(path: Path, position: int, bit: int) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: position % len(data)])


def _other_format(path: Path, position: int, bit: int) -> None:
    document = json.loads(path.read_text())
    document["format"] = report_cache.FORMAT - 1 - position % 3
    path.write_text(json.dumps(document))


def _forged_numbers(path: Path, position: int, bit: int) -> None:
    """Numbers changed and the checksum made to match: only the manifest identity and the
    counts' consistency are left to catch it; here they must (the rows no longer add up)."""
    document = json.loads(path.read_text())
    document["payload"]["night"]["ok"] += 1 + position % 5
    document["checksum"] = report_cache._checksum(document["payload"])
    path.write_text(json.dumps(document))


@settings(max_examples=16, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(damage=st.sampled_from([_flip, _truncate, _other_format, _forged_numbers]), position=st.integers(0, 10**6),
       bit=st.integers(0, 7), run=st.sampled_from(["night-0", "night-1"]))
def test_a_damaged_cache_file_is_recomputed_never_used(damage, position, bit, run, tmp_path_factory, caplog):
    output = _two_nights(tmp_path_factory.mktemp("damaged"))
    scratch = collect(str(output), ReportConfig(cache=False))
    collect(str(output))  # writes the cache
    damage(_cache_file(output, run), position, bit)
    with caplog.at_level(logging.WARNING, logger="clipdiy.labels.report_cache"):
        data = collect(str(output))
    assert night_documents(data) == night_documents(scratch)
    assert lowest_of(data) == lowest_of(scratch)
    assert data.cached == 1, "the damaged file was not used"
    assert run in caplog.text
    again = collect(str(output))
    assert again.cached == 2 and night_documents(again) == night_documents(scratch)


def test_a_cache_file_of_another_format_or_bins_is_recomputed(tmp_path, caplog):
    output = _two_nights(tmp_path)
    collect(str(output))
    _other_format(_cache_file(output, "night-0"), 0, 0)
    with caplog.at_level(logging.WARNING, logger="clipdiy.labels.report_cache"):
        data = collect(str(output))
    assert data.cached == 1 and "format" in caplog.text and "night-0" in caplog.text
    assert json.loads(_cache_file(output, "night-0").read_text())["format"] == report_cache.FORMAT
    # Another number of bins is another aggregate: recomputed, with the histograms it asks for.
    other = collect(str(output), ReportConfig(bins=7))
    assert other.cached == 0 and all(len(n.mask_score_hist) == 7 for n in other.nights)
    assert night_documents(other) == night_documents(collect(str(output), ReportConfig(bins=7, cache=False)))


def test_a_run_released_again_is_read_again(tmp_path):
    """A run whose manifest is written again (its rows rewritten first, as a resumed run does)
    is not taken from the cache: the report shows its new rows."""
    output = _two_nights(tmp_path)
    before = collect(str(output))
    assert collect(str(output)).cached == 2
    photo = write_image(tmp_path / "other.png", np.full((H, W, 3), 100, np.uint8))
    # night-0 again: other rows, the same run id and start (same-size manifest, even).
    write_labels_output(str(output), [LabelItem(f"img{i}.jpg", photo, _scene(cat=300)) for i in range(4)]
                        + [LabelItem("img5.jpg", photo, error_kind="corrupt")],
                        run_id="night-0", started=_day(0), rows_per_shard=2)
    after = collect(str(output))
    assert after.cached == 1
    assert night_documents(after) != night_documents(before)
    assert night_documents(after) == night_documents(collect(str(output), ReportConfig(cache=False)))
    check_against_independent_count(after, output)
    assert after.nights[0].class_wins[CAT] == 4 and after.nights[0].class_wins[DOG] == 0


def test_a_run_being_written_is_not_blocked_nor_read(tmp_path):
    """A job holding the lock and writing night-2 (shards, no manifest yet): the report neither
    waits for it, nor reads it, nor caches it; once finished, the next report has it."""
    output = _two_nights(tmp_path)
    lock = output / "_LOCK.json"
    lock.write_text(json.dumps({"run_id": "night-2", "heartbeat": dt.datetime.now(dt.timezone.utc).isoformat()}))
    photo = write_image(tmp_path / "photo2.png", np.full((H, W, 3), 90, np.uint8))
    items = [LabelItem(f"new{i}.jpg", photo, _scene(person=100)) for i in range(3)]
    write_labels_output(str(output), items, run_id="night-2", started=_day(2), finished=False)
    data = collect(str(output))
    assert [n.run_id for n in data.nights] == ["night-0", "night-1"]
    assert not _cache_file(output, "night-2").exists()
    assert lock.read_text().startswith('{"run_id": "night-2"'), "the lock is the job's"
    write_labels_output(str(output), items, run_id="night-2", started=_day(2))
    later = collect(str(output))
    assert [n.run_id for n in later.nights] == ["night-0", "night-1", "night-2"] and later.cached == 2
    assert {row["image_id"] for row in later.lowest} <= {"new0.jpg", "new1.jpg", "new2.jpg"}


def test_an_output_where_the_cache_cannot_be_written_still_gets_its_report(tmp_path, monkeypatch, caplog):
    from clipdiy.errors import OutputWriteError

    output = _two_nights(tmp_path)

    def refuse(self, path, data):
        raise OutputWriteError(f"writing {path} failed: [Errno 30] Read-only file system", 30)

    monkeypatch.setattr(OutputLayout, "write_bytes_atomic", refuse)
    with caplog.at_level(logging.WARNING, logger="clipdiy.labels.report_cache"):
        data = collect(str(output))
    assert caplog.text.count("cannot keep its per-run aggregates") == 1, "said once, not per run"
    assert night_documents(data) == night_documents(collect(str(output), ReportConfig(cache=False)))
    assert not (output / report_cache.CACHE_DIR).exists()


def test_the_cache_on_object_storage(s3_server, s3_bucket, tmp_path):
    """On S3 the manifest's identity is its ETag and size: a manifest written again is noticed."""
    photo = write_image(tmp_path / "photo.png", np.full((H, W, 3), 128, np.uint8))
    output = f"s3://{s3_bucket}/labels"
    options = s3_server.options.storage_options("s3")
    for k in range(2):
        write_labels_output(output, [LabelItem(f"img{i}.jpg", photo, _scene(cat=10 * (i + k), dog=50, person=PERSON))
                                     for i in range(3)], run_id=f"night-{k}", started=_day(k), storage_options=options)
    first = collect(output, storage=s3_server.options)
    second = collect(output, storage=s3_server.options)
    assert (first.cached, second.cached) == (0, 2)
    assert night_documents(first) == night_documents(second)
    fs = s3_server.filesystem()
    key = f"{s3_bucket}/labels/runs/night-0/_MANIFEST.json"
    manifest = json.loads(fs.cat_file(key))
    manifest["counts"]["skipped"] = 7
    fs.pipe_file(key, json.dumps(manifest).encode())
    third = collect(output, storage=s3_server.options)
    assert third.cached == 1 and third.nights[0].counts["skipped"] == 7


def test_the_lowest_images_are_the_newest_nights_as_they_count_today(tmp_path):
    """Among the newest night's rows and the corrections imported since: a correction of that
    night's row replaces it; a correction of an older image version is left out (whether a
    night between relabelled the image is not read); older nights' rows are not candidates."""
    photo = write_image(tmp_path / "photo.png", np.full((H, W, 3), 128, np.uint8))
    output = tmp_path / "labels"

    def items(scores: dict[int, float]) -> list[LabelItem]:
        return [LabelItem(f"img{i}.jpg", photo, _scene(cat=40, dog=100), mask_scores=dict.fromkeys(range(21), s))
                for i, s in scores.items()]

    write_labels_output(str(output), items({0: 0.3, 1: 0.4, 2: 0.5}), run_id="night-a", started=_day(1))
    write_labels_output(str(output), items({2: 0.2, 3: 0.6, 4: 0.7}), run_id="night-b", started=_day(2))
    human = {"img3.jpg": {"source": "human", "corrected_run_started_at": _day(2)},
             "img0.jpg": {"source": "human", "corrected_run_started_at": _day(1)}}
    run_dir = Path(write_labels_output(str(output), items({3: 0.9, 0: 0.95}), run_id="night-b-human", started=_day(3),
                                       columns=human))
    manifest = json.loads((run_dir / "_MANIFEST.json").read_text())
    manifest["options"] = {"source": "human", "tool": "label-studio"}
    (run_dir / "_MANIFEST.json").write_text(json.dumps(manifest))
    for cache in (True, False, True):
        data = collect(str(output), ReportConfig(lowest=10, cache=cache))
        assert lowest_of(data) == [("night-b", "img2.jpg", 0.2), ("night-b", "img4.jpg", 0.7),
                                   ("night-b-human", "img3.jpg", 0.9)]
        assert [n.run_id for n in data.nights] == ["night-a", "night-b"] and data.corrections == 1


def test_the_command_line_keeps_the_cache_unless_told_not_to(tmp_path, capsys):
    from test_report import load_report_job

    output = _two_nights(tmp_path)
    job = load_report_job()
    assert job.main(["--output", str(output), "--html", str(tmp_path / "a.html"), "--no-cache"]) == 0
    assert not (output / report_cache.CACHE_DIR).exists()
    assert job.main(["--output", str(output), "--html", str(tmp_path / "b.html")]) == 0
    assert job.main(["--output", str(output), "--html", str(tmp_path / "c.html")]) == 0
    assert sorted(p.name for p in (output / report_cache.CACHE_DIR).iterdir()) == ["night-0.json", "night-1.json"]
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert "(2 runs from the cache under OUTPUT/_report" in last
    assert "2 runs from the cache under OUTPUT/_report" in (tmp_path / "c.html").read_text()
