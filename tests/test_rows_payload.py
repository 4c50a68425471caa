"""What the inference actors ship to the row tasks: only what the rows need, and the same rows."""

from __future__ import annotations

import datetime as dt
import pickle

import numpy as np
import pyarrow as pa

from clipdiy.segmentation.config import SaliencyConfig, SegmenterConfig
from clipdiy.pipeline.stages.decode import DecodeBatch
from clipdiy.pipeline.stages.inference import SegmentBatch
from clipdiy.pipeline.stages.rows import SALIENCY_PREVIEW_SIDE, RowContext, build_rows, label_fields
from clipdiy.storage import StorageOptions
from clipdiy.segmentation.segmenter import create_segmenter


def test_actor_ships_the_saliency_preview_and_the_rows_are_unchanged(tiny_clip_config, coco_images):
    config = SegmenterConfig(vocabulary="voc", clip=tiny_clip_config, saliency=SaliencyConfig(backend="none", max_side=32),
                             device="cpu")
    segmenter = create_segmenter(config)
    text = segmenter.text_embeddings.numpy()
    photos = coco_images[:3]
    listing = pa.table({"image_id": [p.name for p in photos], "uri": [str(p) for p in photos],
                        "source_size": [p.stat().st_size for p in photos], "source_etag": pa.nulls(3, pa.string()),
                        "source_mtime": pa.nulls(3, pa.timestamp("us", tz="UTC"))})
    decoded = DecodeBatch(StorageOptions(), config.mode, 10**8, 1, saliency_max_side=32, segmenter_config=config)(listing)
    shipped = SegmentBatch(config, text, num_threads=1)(decoded)

    context = RowContext("r", dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc), segmenter.provenance, segmenter.class_names)
    rows = build_rows(shipped, context).to_pylist()
    prepared = [pickle.loads(decoded.column("payload")[i].as_buffer()) for i in range(3)]
    for row, output, sent in zip(rows, segmenter.predict(prepared), shipped.column("payload")):
        assert output.saliency.shape == (256, 256)  # what the segmenter gives ...
        height, width = output.original_size
        preview = pickle.loads(sent.as_buffer()).saliency  # ... and what the actor ships
        assert preview.shape == (round(height * SALIENCY_PREVIEW_SIDE / max(height, width)),
                                 round(width * SALIENCY_PREVIEW_SIDE / max(height, width)))
        expected = label_fields(output, segmenter.class_names)  # rows from the full map
        assert row["saliency_png"] == expected["saliency_png"]
        assert row["masks"] == expected["masks"]
        np.testing.assert_array_equal(row["class_scores"], expected["class_scores"])
