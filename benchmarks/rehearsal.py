"""Scale rehearsal of the whole job: N generated small images through ``jobs/label.py`` (tiny
random-init CLIP, ``--saliency none``), then ``--added`` new images and a second run.

Per run it reports: wall time of the driver process, the job's own planning and labelling times
(the run manifest's ``timings``: on a first run, with nothing in OUTPUT, ``planning_before_labelling_s``
is only the building of the lazy listing dataset, as the listing streams into decoding and its
time is inside ``labelling_s``; on later runs it is the listing and the anti-join), time from the driver's start to the first
written shard (shard file mtimes), rows written, and the driver's peak RSS (``ru_maxrss`` of
the ``jobs/label.py`` driver itself; the embedded Ray's workers are separate processes, not counted).

    python benchmarks/rehearsal.py --images 100000 --added 1000   # the issue's size (hours on 2 cores)
    python benchmarks/rehearsal.py --images 2000 --added 100       # what fits a shared 2-core box
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "tests"))  # model_factories: random-init checkpoints


def make_images(folder: Path, start: int, stop: int, side: int = 48) -> None:
    """Images ``start..stop-1``: small random-colour JPEGs, 1,000 per sub-folder."""
    rng = np.random.default_rng(start)
    for i in range(start, stop):
        sub = folder / f"{i // 1000:04d}"
        sub.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (side, side + 16, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(sub / f"{i:07d}.jpg", quality=80)


def run_job(corpus: Path, output: Path, clip, extra: list[str]) -> dict:
    # The driver reports its own peak RSS (RUSAGE_CHILDREN would also count Ray's processes).
    wrapper = ("import resource, runpy, sys\n"
               "sys.argv = sys.argv[1:]\n"
               "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\n"
               "finally:\n    print('DRIVER_PEAK_RSS_MB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,"
               " file=sys.stderr)\n")
    args = [sys.executable, "-c", wrapper, str(REPO_ROOT / "jobs" / "label.py"), "--input", str(corpus), "--output", str(output),
            "--clip-model", clip.model, "--clip-checkpoint", str(clip.checkpoint), "--saliency", "none",
            "--num-cpus", "2", *extra]
    if clip.model_config:
        args += ["--clip-model-config", str(clip.model_config)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO_ROOT))
    env.pop("RAY_ADDRESS", None)
    before = {p for p in output.glob("runs/*/part-*.parquet")}
    started_wall = time.time()
    started = time.monotonic()
    done = subprocess.run(args, check=False, capture_output=True, text=True, env=env)
    seconds = time.monotonic() - started
    if done.returncode:
        raise SystemExit(f"label.py failed (rc {done.returncode}):\n{done.stderr[-3000:]}")
    peak_mb = float(done.stderr.rsplit("DRIVER_PEAK_RSS_MB", 1)[1].split()[0])
    new_shards = [p for p in output.glob("runs/*/part-*.parquet") if p not in before]
    manifest_path = max(output.glob("runs/*/_MANIFEST.json"), key=lambda p: p.stat().st_mtime)
    manifest = json.loads(manifest_path.read_text())
    first_shard = min((p.stat().st_mtime for p in new_shards), default=None)
    return {
        "wall_s": round(seconds, 1),
        "planning_before_labelling_s": manifest["timings"]["listing"],
        "labelling_s": manifest["timings"]["labelling"],
        "first_shard_after_s": None if first_shard is None else round(first_shard - started_wall, 1),
        "listed": manifest["counts"]["listed"],
        "skipped": manifest["counts"]["skipped"],
        "rows_written": sum(s["rows"] for s in manifest["shards"]),
        "driver_peak_rss_mb": round(peak_mb),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--added", type=int, default=1_000)
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "clipdiy-rehearsal"))
    parser.add_argument("--job-args", default="--batch-size 32 --decode-batch-size 32 --rows-per-file 1000",
                        help="extra jobs/label.py arguments")
    args = parser.parse_args()

    from model_factories import make_clip_config

    workdir = Path(args.workdir)
    corpus, output = workdir / f"images-{args.images}", workdir / f"labels-{args.images}"
    clip = make_clip_config(workdir / "clip", arch="tiny")
    if not (corpus / "READY").exists():
        started = time.monotonic()
        make_images(corpus, 0, args.images)
        (corpus / "READY").write_text("")
        print(f"generated {args.images:,} images in {time.monotonic() - started:.0f} s", flush=True)
    extra = args.job_args.split()
    first = run_job(corpus, output, clip, extra)
    print(f"run 1 ({args.images:,} images): {json.dumps(first)}", flush=True)
    make_images(corpus, args.images, args.images + args.added)
    second = run_job(corpus, output, clip, extra)
    print(f"run 2 (+{args.added:,} images): {json.dumps(second)}", flush=True)


if __name__ == "__main__":
    main()
