"""Readers over a large labels output: peak RSS and rows/s at two sizes (issue 10, "readers stream").

1. A small real output: ``jobs/label.py`` with a tiny random CLIP (tests/model_factories.py),
   ``--saliency none``, ``--vocabulary coco``, on the COCO sample photos (tests/data) scaled down to
   160 px (so reading the images does not dominate).
2. Synthetic outputs of N rows built by copying those real rows with unique ids
   (``copies/<stem>-<j>.jpg``; the real rows keep their ids, so evaluation scores them): run
   ``a`` with N rows, then a later run ``b`` relabelling 1% of the images (copies of other real
   rows), in shards of 1,000 rows named as the job names them.
3. Each reader in its own Python process (peak RSS = that process's VmHWM): iterate
   ``LabelIterableDataset``, build ``LabelDataset`` and read item 0, ``export_coco``,
   ``export_voc_masks``, local ``evaluate`` (COCO ground truth of the sample); plus ``baseline``,
   a process that only imports the readers.

    python benchmarks/bench_readers.py                          # N = 20000 and 200000
    python benchmarks/bench_readers.py --sizes 20000 --code ../old-checkout   # another clipdiy's readers
    python benchmarks/bench_readers.py --key-pass --sizes 200000 2000000 --max-keys 100000

``--key-pass`` measures the key pass alone (``build_row_index(..., sort_by_id=True)``) on synthetic
keys (no Parquet: each shard's key table is built afresh when read, 1,000 rows a shard, run ``a``
with N ids in a scrambled order, run ``b`` relabelling 1%), each in its own process: held in
memory (``max_keys_in_memory`` above N) and spilled to disk (``--max-keys``), with ``sort_by_id``
(as ``LabelDataset`` and ``export_coco``: 8 bytes a row of result) and without (losers only, as
the streaming readers).

Run from the repository root. ``--code`` puts another checkout's ``clipdiy`` first on the child
processes' path (e.g. the code before this change) to compare.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
COCO_SAMPLE = REPO_ROOT / "tests" / "data" / "coco-val2017-sample"
READERS = ("baseline", "iterable", "dataset", "coco", "voc", "evaluate")
SHARD_ROWS = 1000


def real_output(work: Path) -> Path:
    """The job's own output on the sample photos (cached in ``work``)."""
    output = work / "real"
    if list(output.glob("runs/*/_MANIFEST.json")):
        return output
    sys.path.insert(0, str(REPO_ROOT / "tests"))
    from model_factories import make_clip_config
    from PIL import Image

    images = work / "images"
    images.mkdir(parents=True, exist_ok=True)
    for photo in sorted((COCO_SAMPLE / "images").glob("*.jpg")):
        with Image.open(photo) as image:
            image.thumbnail((160, 160))
            image.save(images / photo.name, quality=90)
    clip = make_clip_config(work / "clip", arch="tiny")
    command = [sys.executable, str(REPO_ROOT / "jobs" / "label.py"), "--input", str(images), "--output", str(output),
               "--clip-model", clip.model, "--clip-checkpoint", clip.checkpoint, "--clip-model-config", clip.model_config,
               "--saliency", "none", "--vocabulary", "coco", "--num-cpus", "2"]
    subprocess.run(command, check=True, cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    return output


def synthetic_output(real: Path, work: Path, rows: int) -> Path:
    """``rows`` copies of the real rows in run ``a``, 1% of them relabelled by run ``b``."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    output = work / f"synthetic-{rows}"
    if (output / "runs" / "b" / "_MANIFEST.json").exists():
        return output
    shutil.rmtree(output, ignore_errors=True)
    real_rows = pa.concat_tables([pq.read_table(p) for p in sorted(real.glob("runs/*/part-*.parquet"))])
    real_rows = real_rows.filter(pc.equal(real_rows.column("status"), "ok"))
    manifest = json.loads(next(real.glob("runs/*/_MANIFEST.json")).read_text())
    stems = [posixpath_stem(i) for i in real_rows.column("image_id").to_pylist()]
    n_real = real_rows.num_rows

    def image_ids(positions: np.ndarray) -> list[str]:
        return [real_rows.column("image_id")[j].as_py() if j < n_real else f"copies/{stems[j % n_real]}-{j:07d}.jpg"
                for j in positions.tolist()]

    def write_run(run_id: str, started: str, positions: np.ndarray, source_offset: int) -> None:
        run_dir = output / "runs" / run_id
        run_dir.mkdir(parents=True)
        shards = []
        for first in range(0, len(positions), SHARD_ROWS):
            chunk = positions[first:first + SHARD_ROWS]
            table = real_rows.take(pa.array((chunk + source_offset) % n_real))
            table = table.set_column(table.schema.get_field_index("image_id"), "image_id", pa.array(image_ids(chunk)))
            table = table.set_column(table.schema.get_field_index("run_id"), "run_id", pa.array([run_id] * len(chunk)))
            stamp = pa.array([np.datetime64(started.replace("+00:00", ""), "us")] * len(chunk)).cast(
                real_rows.schema.field("run_started_at").type)
            table = table.set_column(table.schema.get_field_index("run_started_at"), "run_started_at", stamp)
            digest = hashlib.sha256("\n".join(table.column("image_id").to_pylist()).encode()).hexdigest()[:16]
            relative = f"runs/{run_id}/part-001-{digest}.parquet"
            pq.write_table(table.cast(real_rows.schema), output / relative)
            shards.append({"path": relative, "rows": len(chunk), "ok": len(chunk), "error": 0, "bytes": 0})
        (run_dir / "_MANIFEST.json").write_text(json.dumps(
            {**manifest, "run_id": run_id, "started_at": started, "finished_at": started, "shards": shards}))

    write_run("a", "2026-01-01T00:00:00+00:00", np.arange(rows), 0)
    relabelled = np.random.default_rng(0).choice(rows, size=rows // 100, replace=False)
    write_run("b", "2026-01-02T00:00:00+00:00", np.sort(relabelled), 1)
    return output


def posixpath_stem(image_id: str) -> str:
    import posixpath

    return posixpath.splitext(posixpath.basename(image_id))[0]


def child(reader: str, labels: str, scratch: str) -> dict:
    """Run one reader in this process; its result, rows, seconds and peak RSS."""
    from clipdiy.labels.evaluation import evaluate
    from clipdiy.labels.feed import LabelDataset, LabelIterableDataset, export_coco, export_voc_masks
    from clipdiy.labels.ground_truth import CocoGroundTruth

    start = time.perf_counter()
    if reader == "baseline":
        result, rows = None, 0
    elif reader == "iterable":
        rows = sum(1 for _ in LabelIterableDataset(labels))
        result = rows
    elif reader == "dataset":
        dataset = LabelDataset(labels)
        image, label = dataset[0]
        rows, result = len(dataset), [len(dataset), list(label.shape)]
    elif reader == "coco":
        result = export_coco(labels, os.path.join(scratch, "coco.json"))
        rows = result["images"]
    elif reader == "voc":
        result = export_voc_masks(labels, os.path.join(scratch, "voc"))
        rows = result["images"]
    elif reader == "evaluate":
        report = evaluate(labels, CocoGroundTruth(str(COCO_SAMPLE / "annotations" / "instances.json")), use_ray=False)
        result = report.counts
        rows = result["evaluated"] + result["unmatched"] + result["label_errors"]
    else:
        raise ValueError(reader)
    seconds = time.perf_counter() - start
    return {"reader": reader, "rows": rows, "seconds": round(seconds, 2),
            "rows_per_s": round(rows / seconds) if rows and seconds else None,
            "peak_rss_mb": round(peak_rss_kb() / 1024, 1), "result": result}


def key_pass_child(rows: int, max_keys: int, sort_by_id: bool) -> dict:
    """``build_row_index`` over ``rows`` synthetic keys in this process; seconds and peak RSS."""
    import numpy as np
    import pyarrow as pa

    from clipdiy.labels.runs import Run
    from clipdiy.labels.row_index import build_row_index

    def ids(numbers: np.ndarray) -> pa.Array:
        return pa.array(np.char.mod("s3://bucket/corpus/images/%010d.jpg", numbers))

    relabelled = np.sort(np.random.default_rng(0).choice(rows, size=rows // 100, replace=False))
    plan = {"a": (rows, 0), "b": (relabelled, 3_600_000_000)}  # run a: every id (not held: 8 bytes a row)

    def read(run, shard, columns):
        numbers, started = plan[run.run_id]
        first = int(shard.rsplit("-", 1)[1].split(".")[0])
        if isinstance(numbers, int):
            chunk = np.arange(first, min(first + SHARD_ROWS, numbers))
        else:
            chunk = numbers[first:first + SHARD_ROWS]
        chunk = chunk * 7919 % rows  # a bijection: ids in scrambled order
        return pa.table({"image_id": ids(chunk), "run_id": pa.array([run.run_id] * len(chunk)),
                         "run_started_at": pa.array(np.full(len(chunk), started, "datetime64[us]"))}).select(list(columns))

    runs = [Run(run_id=name, path=f"/{name}", manifest={}, fs=None,
                shards=tuple(f"/{name}/part-001-{first:010d}.parquet"
                             for first in range(0, numbers if isinstance(numbers, int) else len(numbers), SHARD_ROWS)))
            for name, (numbers, _) in plan.items()]
    start = time.perf_counter()
    index = build_row_index(runs, sort_by_id=sort_by_id, read=read, max_keys_in_memory=max_keys)
    seconds = time.perf_counter() - start
    assert index.num_winners == rows and (not sort_by_id or len(index.sorted_positions) == rows)
    return {"rows": index.num_rows, "seconds": round(seconds, 2), "rows_per_s": round(index.num_rows / seconds),
            "peak_rss_mb": round(peak_rss_kb() / 1024, 1)}


def key_pass(sizes: list[int], max_keys: int) -> None:
    """Each size held in memory and spilled, each in its own process."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    imports_only = ("import sys; sys.path.insert(0, 'benchmarks'); import bench_readers as b; "
                    "import clipdiy.labels.row_index, clipdiy.labels.store; print(b.peak_rss_kb())")
    done = subprocess.run([sys.executable, "-c", imports_only],
                          capture_output=True, text=True, env=env, cwd=REPO_ROOT, check=True)
    print(f"baseline (imports only): peak RSS {int(done.stdout.split()[-1]) / 1024:.1f} MB", flush=True)
    for size in sizes:
        for label, limit, sort in (("in memory, sort_by_id", 10**12, "sort"),
                                   (f"spilled ({max_keys} keys), sort_by_id", max_keys, "sort"),
                                   (f"spilled ({max_keys} keys), losers only", max_keys, "")):
            done = subprocess.run([sys.executable, __file__, "--child", "keypass", "--labels", str(size), "--scratch",
                                   f"{limit},{sort}"], capture_output=True, text=True, env=env, cwd=REPO_ROOT, check=True)
            result = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"N={size:>9}  {label:<38} peak RSS {result['peak_rss_mb']:>7.1f} MB  {result['seconds']:>6.1f} s  "
                  f"{result['rows_per_s']:>8} rows/s (rows incl. the 1% relabelled)", flush=True)


def peak_rss_kb() -> int:
    """This process's peak RSS since it started (VmHWM: ``ru_maxrss`` would carry over the
    parent's peak through fork and exec)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def measure(reader: str, labels: Path, work: Path, code: Path) -> dict:
    scratch = work / "scratch"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": str(code)}
    done = subprocess.run([sys.executable, __file__, "--child", reader, "--labels", str(labels), "--scratch", str(scratch)],
                          capture_output=True, text=True, env=env, cwd=REPO_ROOT)
    shutil.rmtree(scratch, ignore_errors=True)
    if done.returncode != 0:
        return {"reader": reader, "error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[20_000, 200_000])
    parser.add_argument("--readers", nargs="+", default=list(READERS), choices=READERS)
    parser.add_argument("--work", default="/tmp/clipdiy-bench-readers", help="cache of the outputs built")
    parser.add_argument("--code", default=str(REPO_ROOT), help="checkout whose clipdiy the readers run")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--labels", help=argparse.SUPPRESS)
    parser.add_argument("--scratch", help=argparse.SUPPRESS)
    parser.add_argument("--key-pass", action="store_true", help="measure build_row_index alone on synthetic keys")
    parser.add_argument("--max-keys", type=int, default=100_000, help="max_keys_in_memory of --key-pass's spilled runs")
    args = parser.parse_args()
    if args.child == "keypass":
        limit, sort = args.scratch.split(",")
        print(json.dumps(key_pass_child(int(args.labels), int(limit), bool(sort))))
        return 0
    if args.child:
        print(json.dumps(child(args.child, args.labels, args.scratch)))
        return 0
    if args.key_pass:
        key_pass(args.sizes, args.max_keys)
        return 0
    work = Path(args.work)
    real = real_output(work)
    results = {}
    for size in args.sizes:
        labels = synthetic_output(real, work, size)
        for reader in args.readers:
            result = measure(reader, labels, work, Path(args.code))
            results[(size, reader)] = result
            print(f"N={size:>7}  {reader:<9} " + (f"peak RSS {result['peak_rss_mb']:>7.1f} MB  {result['seconds']:>7.1f} s  "
                  f"{result['rows_per_s'] or 0:>7} rows/s  {json.dumps(result['result'])}" if "error" not in result
                  else f"ERROR {result['error']}"), flush=True)
    if len(args.sizes) > 1:
        small, large = min(args.sizes), max(args.sizes)
        print(f"\npeak RSS at N={large} / at N={small} (target <= 1.25):")
        for reader in args.readers:
            a, b = results[(small, reader)], results[(large, reader)]
            if "error" not in a and "error" not in b:
                print(f"  {reader:<9} {b['peak_rss_mb'] / a['peak_rss_mb']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
