"""One large photo through the real job: ``jobs/label.py --method naclip --vocabulary
naclip-coco-object`` on an embedded local Ray with default settings (PAMR on, the default tile
side and ``--max-image-memory-gb``), and what its Ray workers held.

The photo (default 12247 x 8165, just under the 100-MP decode guard) is a COCO test photo upscaled
with noise (tests/large_photo_reference.py), written to ``--workdir``; the model is a random CLIP
with the real ViT-B/16 image tower and a tiny text tower (``vitb16-small-text`` of
tests/model_factories.py: a ViT-B/16 text side would add half an hour of CPU for COCO-Object's
words and templates and nothing to the photo's cost), loaded from its checkpoint through the
users' path. While
the job runs, the script reads every Ray worker's peak resident memory from the kernel (``VmHWM``
in /proc, polled once a second: exact peaks, not samples) and the labelling worker's resident
memory once its ``__init__`` is over (the model and text side loaded, the photo not yet
resized: "model"); "above the model" is the difference. Then it checks the row: ``ok``, the
photo's own size, masks covering every
pixel once, and on windows of the photo (corners, seeded random windows, corners where four tiles
meet) exactly the whole-photo path's labels computed without tiles, where their margin exceeds
float rounding.

    flock /tmp/ray-tests.lock python benchmarks/label_large_photo_job.py            # 100 MP
    flock /tmp/ray-tests.lock python benchmarks/label_large_photo_job.py --size 6000 4000
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))


def worker_peaks(stop: threading.Event, peaks: dict[int, dict]) -> None:
    """Until ``stop``: every Ray worker process (title ``ray::...``) -> its titles, peak resident
    bytes (VmHWM) and CPU seconds, read once a second."""
    ticks = os.sysconf("SC_CLK_TCK")
    while not stop.is_set():
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                title = (entry / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
                if not title.startswith("ray::"):
                    continue
                status = (entry / "status").read_text()
                hwm = next(int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmHWM:"))
                rss = next(int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmRSS:"))
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                cpu = (int(fields[11]) + int(fields[12])) / ticks
            except (OSError, StopIteration, IndexError, ValueError):
                continue
            record = peaks.setdefault(int(entry.name), {"titles": set(), "peak": 0, "cpu": 0.0, "ready": None})
            if record["ready"] is None and "__init__" not in title and any("__init__" in t for t in record["titles"]):
                record["ready"] = rss  # the first sample after the actor's __init__: the model loaded
            record["titles"].add(title.split(" ")[0])
            record["peak"] = max(record["peak"], hwm)
            record["cpu"] = max(record["cpu"], cpu)
        stop.wait(1.0)


def run_job(photos: Path, output: Path, clip, threads: int) -> tuple[float, dict[int, dict]]:
    """The job on ``photos`` (a subprocess, its own embedded Ray); (wall seconds, worker peaks)."""
    from pipeline_support import cli_args

    command = cli_args(photos, output, clip, "--method", "naclip", "--vocabulary", "naclip-coco-object", "--torch-threads", str(threads))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    peaks: dict[int, dict] = {}
    stop = threading.Event()
    poller = threading.Thread(target=worker_peaks, args=(stop, peaks), daemon=True)
    poller.start()
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    stop.set()
    poller.join()
    if done.returncode != 0:
        sys.exit(f"the job failed (exit {done.returncode}): {done.stderr.strip().splitlines()[-3:]}")
    return seconds, peaks


def labelling_worker(peaks: dict[int, dict]) -> dict:
    """The worker that ran the segmenter: the one whose titles name the inference stage, else the
    largest (Ray Data's actor titles carry the callable class's name)."""
    inference = [p for p in peaks.values() if any("SegmentBatch" in t or "MapWorker" in t for t in p["titles"])]
    return max(inference or peaks.values(), key=lambda p: p["peak"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, nargs=2, default=[12247, 8165], metavar=("WIDTH", "HEIGHT"))
    parser.add_argument("--arch", default="vitb16-small-text")
    parser.add_argument("--threads", type=int, default=2, help="--torch-threads of the job's CPU actor")
    parser.add_argument("--windows", type=int, default=6, help="seeded random windows checked (besides corners)")
    parser.add_argument("--workdir", default="/tmp/label_large_photo_job")
    args = parser.parse_args()

    import numpy as np
    from large_photo_reference import (
        deferred_forward,
        make_large_photo,
        random_windows,
        window_labels,
    )
    from model_factories import make_clip_config
    from PIL import Image
    from pipeline_support import label_map_from_masks, read_all_rows

    from clipdiy.segmentation.config import SaliencyConfig, SegmenterConfig
    from clipdiy.segmentation.images import to_rgb_uint8
    from clipdiy.segmentation.segmenter import create_segmenter, prepare_input

    width, height = args.size
    work = Path(args.workdir)
    clip = make_clip_config(work / f"clip-{args.arch}", arch=args.arch)
    large = work / f"photo-{width}x{height}"
    photo = large / "photo.jpg"
    if not photo.exists():
        large.mkdir(parents=True, exist_ok=True)
        source = min((REPO / "tests" / "data").rglob("*.jpg"))
        make_large_photo(source, photo, width, height, seed=100)

    print(f"# {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}; {args.arch} random; {width} x {height} "
          f"({width * height / 1e6:.1f} MP), {photo.stat().st_size / 1e6:.0f} MB JPEG; torch threads {args.threads}", flush=True)
    output = work / f"labels-{width}x{height}-{time.time_ns()}"
    seconds, peaks = run_job(large, output, clip, args.threads)
    worker = labelling_worker(peaks)
    model = worker["ready"] or 0
    print(f"job wall {seconds:.0f} s (load now {os.getloadavg()[0]:.1f})")
    print(f"labelling worker {sorted(worker['titles'])}: peak {worker['peak'] / 1e9:.2f} GB, CPU {worker['cpu']:.0f} s; "
          f"after its __init__ (model): {model / 1e9:.2f} GB; above the model: {(worker['peak'] - model) / 1e9:.2f} GB")
    for record in sorted(peaks.values(), key=lambda p: -p["peak"])[:4]:
        print(f"  worker {sorted(record['titles'])}: peak {record['peak'] / 1e9:.2f} GB, CPU {record['cpu']:.0f} s")

    (row,) = read_all_rows(output).to_pylist()
    print(f"row: status {row['status']}, {row['width']} x {row['height']}, refine {row['refine']}, {len(row['masks'])} masks")
    assert row["status"] == "ok", row.get("error")
    assert (row["height"], row["width"]) == (height, width)
    labels = label_map_from_masks(row["masks"], height, width)
    assert (labels >= 0).all(), "a pixel in no mask"
    config = SegmenterConfig(method="naclip", vocabulary="naclip-coco-object", clip=clip, saliency=SaliencyConfig(backend="none"), device="cpu")
    segmenter = create_segmenter(config)
    with Image.open(photo) as image:
        prepared = prepare_input(to_rgb_uint8(image), config)
    estimate = segmenter.working_bytes(prepared)
    forward = deferred_forward(segmenter, prepared)
    tiles = segmenter.method.plan_tiles((height, width))
    side = 160
    corners = sorted({(t.rows.start, t.cols.start) for t in tiles if t.rows.start and t.cols.start})[:: max(1, len(tiles) // 4)][:3]
    windows = random_windows(height, width, side, count=args.windows, seed=100)
    windows += [((y - side // 2, y + side // 2), (x - side // 2, x + side // 2)) for y, x in corners]
    checked = decided = 0
    for rows, cols in windows:
        expected = window_labels(segmenter, forward, rows, cols)
        got = labels[rows[0] : rows[1], cols[0] : cols[1]]
        np.testing.assert_array_equal(got[expected.decided], expected.labels[expected.decided], err_msg=f"window {rows} x {cols}")
        checked += expected.decided.size
        decided += int(expected.decided.sum())
    print(f"{len(tiles)} tiles; estimate {estimate / 1e9:.2f} GB; {len(windows)} windows of {side} px: labels equal to the "
          f"whole-photo path on all {decided} decided pixels ({decided / checked:.1%} of {checked})")
    print(json.dumps({"size": [width, height], "seconds": seconds, "worker_peak_gb": worker["peak"] / 1e9, "model_gb": model / 1e9,
                      "above_model_gb": (worker["peak"] - model) / 1e9, "worker_cpu_s": worker["cpu"], "estimate_gb": estimate / 1e9,
                      "tiles": len(tiles)}))


if __name__ == "__main__":
    main()
