"""Helpers shared by the labelling-job tests: a local Ray, job configs, reading the output."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clipdiy.pipeline.config import LabelJobConfig
from clipdiy.segmentation.config import SaliencyConfig, SegmenterConfig

REPO_ROOT = Path(__file__).resolve().parent.parent
LABEL_SCRIPT = REPO_ROOT / "jobs" / "label.py"


def start_local_ray(**init_options):
    """A 2-CPU local Ray (the inference pool takes one CPU, decode tasks the other; rows and writes
    reserve none);
    ``init_options`` go to ``ray.init`` (a runtime env, say)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, **init_options)
    return ray


@contextmanager
def local_ray(**init_options) -> Iterator:
    """:func:`start_local_ray` for the block (a module fixture's body), shut down after it."""
    ray = start_local_ray(**init_options)
    try:
        yield ray
    finally:
        ray.shutdown()


def load_job(name: str):
    """``jobs/<name>.py`` imported as a module in this process (its ``main`` runs here, on the test's Ray)."""
    spec = importlib.util.spec_from_file_location(f"{name}_job", REPO_ROOT / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_label_job():
    """``jobs/label.py`` imported as a module in this process (its ``main`` uses the test's Ray)."""
    return load_job("label")


def label_main(args: list[str]) -> int:
    """``jobs/label.py``'s ``main(args)`` in this process: the exit status."""
    return load_label_job().main(args)


def copy_images(folder: Path, images: list[Path], count: int) -> list[str]:
    """The first ``count`` of ``images`` copied into a new ``folder``: their sorted file names."""
    folder.mkdir()
    for path in images[:count]:
        shutil.copy(path, folder / path.name)
    return sorted(path.name for path in images[:count])


def segmenter_config(clip, saliency: SaliencyConfig | None = None, vocabulary: str = "voc") -> SegmenterConfig:
    return SegmenterConfig(
        vocabulary=vocabulary, clip=clip, saliency=saliency or SaliencyConfig(backend="none"), crop_batch_size=128
    )


def job_config(input_uri, output_uri, segmenter: SegmenterConfig, **overrides) -> LabelJobConfig:
    options = {
        "decode_batch_size": 4,
        "inference_batch_size": 4,
        "rows_per_file": 10,
        "min_actors": 1,
        "max_actors": 1,
        "cpus_per_actor": 1.0,
        "heartbeat_s": 2.0,
        "lock_stale_after_s": 60.0,
    }
    options.update(overrides)
    return LabelJobConfig(input=str(input_uri), output=str(output_uri), segmenter=segmenter, **options)


def cli_args(input_uri, output_uri, clip, *extra: str) -> list[str]:
    """``python jobs/label.py`` arguments for a test model (``clip``: a ClipConfig of a checkpoint)."""
    args = [sys.executable, str(LABEL_SCRIPT), "--input", str(input_uri), "--output", str(output_uri),
            "--clip-model", clip.model, "--clip-checkpoint", str(clip.checkpoint), "--saliency", "none",
            "--num-cpus", "2", "--log-every", "2"]
    if clip.model_config:
        args += ["--clip-model-config", str(clip.model_config)]
    return args + list(extra)


def shard_files(output: Path, run_id: str | None = None) -> list[Path]:
    pattern = f"runs/{run_id or '*'}/part-*.parquet"
    return sorted(Path(output).glob(pattern))


def read_all_rows(output: Path, run_id: str | None = None) -> pa.Table:
    files = shard_files(output, run_id)
    assert files, f"no shards under {output}"
    return pa.concat_tables([pq.read_table(f) for f in files])


def manifests(output: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(Path(output).glob("runs/*/_MANIFEST.json"))}


def label_map_from_masks(masks: list[dict], height: int, width: int) -> np.ndarray:
    """H x W uint16 label map rebuilt from a row's RLE masks with pycocotools (-1 where none)."""
    from pycocotools import mask as mask_utils

    out = np.full((height, width), -1, dtype=np.int32)
    for entry in masks:
        rle = {"size": list(entry["rle_size"]), "counts": entry["rle_counts"].encode("ascii")}
        decoded = mask_utils.decode(rle).astype(bool)
        assert decoded.shape == (height, width)
        assert int(decoded.sum()) == entry["area"]
        assert not (out[decoded] >= 0).any(), "masks of one image overlap"
        out[decoded] = entry["class_id"]
    return out


def reference_label_maps(config, paths):
    """(``Segmenter.segment`` result per file name, the segmenter), single-threaded like the
    job's CPU actor so that the float sums run in the same order."""
    import torch
    from PIL import Image

    from clipdiy.segmentation.segmenter import create_segmenter

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        segmenter = create_segmenter(config)
        results = {}
        for path in paths:
            with Image.open(path) as image:
                results[path.name] = segmenter.segment([image])[0]
        return results, segmenter
    finally:
        torch.set_num_threads(threads)


def check_rows_match_library(rows, reference, segmenter):
    """Each row's masks decode to the library's label map; scores agree."""
    import pytest

    for row in rows:
        expected = reference[row["image_id"]]
        height, width = expected.size
        assert (row["height"], row["width"]) == (height, width)
        rebuilt = label_map_from_masks(row["masks"], height, width)
        assert (rebuilt >= 0).all(), "masks do not cover the image"
        np.testing.assert_array_equal(rebuilt, expected.label_map.astype(np.int32), err_msg=row["image_id"])
        assert [m["class_id"] for m in row["masks"]] == expected.present_classes().tolist()
        for mask in row["masks"]:
            assert mask["class_name"] == segmenter.class_names[mask["class_id"]]
            assert mask["score"] == pytest.approx(float(expected.mask_scores[mask["class_id"]]), abs=1e-6)
        np.testing.assert_allclose(row["class_scores"], expected.class_scores, atol=1e-6)
        assert row["foreground_fraction"] == pytest.approx(expected.foreground_fraction, abs=1e-6)
