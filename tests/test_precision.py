"""Precision (SPEC 3.6): float32 by default on every device, fp16/bf16 only when asked; the precision
that produced a row is in the row and in the run's fingerprint, so a resumed run cannot mix them."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch
from pipeline_support import LABEL_SCRIPT, job_config, read_all_rows, segmenter_config, start_local_ray

from clipdiy.segmentation.config import SegmenterConfig


def test_float32_is_the_default_everywhere_and_auto_is_gone():
    assert SegmenterConfig().precision == "fp32"
    with pytest.raises(ValueError, match="precision must be one of fp32, fp16, bf16"):
        SegmenterConfig(precision="auto")
    import importlib.util

    spec = importlib.util.spec_from_file_location("label_cli", LABEL_SCRIPT)
    label_cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(label_cli)
    args = label_cli.build_parser().parse_args(["--input", "in/", "--output", "out/"])
    assert label_cli.config_from_args(args).segmenter.precision == "fp32"
    args = label_cli.build_parser().parse_args(["--input", "in/", "--output", "out/", "--precision", "bf16"])
    assert label_cli.config_from_args(args).segmenter.precision == "bf16"


def test_segmenter_records_its_precision_and_refuses_models_in_another(tiny_clip_config):
    from handcrafted_models import NotGreySaliency

    from clipdiy.segmentation.models.clip import create_clip_model
    from clipdiy.segmentation.segmenter import Segmenter
    from clipdiy.segmentation.vocabulary import load_vocabulary

    vocabulary = load_vocabulary("voc")
    clip = create_clip_model(tiny_clip_config, dtype=torch.bfloat16)
    segmenter = Segmenter(clip, NotGreySaliency(), vocabulary, SegmenterConfig(precision="bf16"))
    assert segmenter.provenance.precision == "bf16"
    with pytest.raises(ValueError, match=r"torch\.bfloat16.*precision=fp32"):
        Segmenter(clip, NotGreySaliency(), vocabulary, SegmenterConfig())


@pytest.mark.slow
def test_rows_and_fingerprint_carry_the_precision_and_a_resume_in_another_is_refused(
    coco_images, tiny_clip_config, tmp_path
):
    from clipdiy.pipeline.planning.manifest import RunConflictError
    from clipdiy.pipeline.control.run import run_labelling

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for path in coco_images[:2]:
        shutil.copy(path, corpus / path.name)
    output = tmp_path / "labels"
    fp32 = segmenter_config(tiny_clip_config)
    ray = start_local_ray()
    try:
        summary = run_labelling(job_config(corpus, output, fp32))
        rows = read_all_rows(output).to_pylist()
        assert len(rows) == 2 and {row["precision"] for row in rows} == {"fp32"}
        run_dir = output / "runs" / summary.run_id
        state = json.loads((run_dir / "_RUN.json").read_text())
        assert state["fingerprint"]["model"]["precision"] == "fp32"

        # The run as if killed before its manifest: resuming it in bf16 is refused, naming the entry.
        (run_dir / "_MANIFEST.json").unlink()
        bf16 = dataclasses.replace(fp32, precision="bf16")
        with pytest.raises(RunConflictError, match=rf"unfinished run {summary.run_id} .* different model\.precision;"):
            run_labelling(job_config(corpus, output, bf16))
        assert len(read_all_rows(output).to_pylist()) == 2  # nothing was written in bf16
    finally:
        ray.shutdown()
