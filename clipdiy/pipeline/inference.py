"""Inference stage: a callable class for ``Dataset.map_batches`` on an actor pool.

Each actor loads the models once (``create_segmenter``) and receives the text embeddings the
driver computed once for the whole run, so no actor encodes prompts. It runs
``Segmenter.predict`` on the ok rows of a batch and passes error rows through. A model failure
on a batch is retried image by image, and images that still fail become error rows of kind
``model``; the job goes on.
"""

from __future__ import annotations

import logging
import pickle

import numpy as np
import pyarrow as pa

from clipdiy.config import SegmenterConfig

logger = logging.getLogger(__name__)

#: Above this many pixels at full resolution, FOUND's attention (quadratic in the pixel count)
#: dominates the run: a 4 MP photo costs ~125x a 640 x 480 one (fit to timings on a 2-core CPU).
#: The actor says so once.
LARGE_SALIENCY_PIXELS = 4_000_000


class SegmentBatch:
    """``map_batches`` callable: decoded rows (pickled PreparedImage payloads) -> model outputs.

    text_embeddings: C x D float32, L2-normalised (computed once per run by the driver).
    num_threads:     torch intra-op threads on a CPU actor (its reserved CPUs).
    """

    _warn_large = False  # set in __init__ when saliency runs at full resolution

    def __init__(self, segmenter_config: SegmenterConfig, text_embeddings: np.ndarray, num_threads: int | None = None):
        import torch

        from clipdiy.segmenter import create_segmenter

        if num_threads and not torch.cuda.is_available():
            torch.set_num_threads(max(1, int(num_threads)))
        self.segmenter = create_segmenter(
            segmenter_config, text_embeddings=torch.from_numpy(np.array(text_embeddings, dtype=np.float32))
        )
        logger.info("segmenter loaded on %s", self.segmenter.device)
        self._warn_large = (
            getattr(self.segmenter, "saliency", None) is not None
            and segmenter_config.saliency.backend != "none"
            and segmenter_config.saliency.max_side is None
        )

    def _check_saliency_cost(self, prepared: list) -> None:
        """Warn once per actor when full-resolution saliency meets a large photo."""
        if not self._warn_large:
            return
        for item in prepared:
            if item.saliency_input is None:
                continue
            height, width = item.saliency_input.shape[:2]
            if height * width > LARGE_SALIENCY_PIXELS:
                logger.warning(
                    "a %d x %d image goes through FOUND at full resolution (the faithful default), whose cost "
                    "grows with the square of the pixel count; --saliency-max-side 1024 bounds it",
                    width, height,
                )
                self._warn_large = False
                return

    def _predict_each(self, prepared: list) -> list:
        """Outputs image by image; a failing image gives its exception instead of an output."""
        results = []
        for item in prepared:
            try:
                results.extend(self.segmenter.predict([item]))
            except Exception as error:  # becomes this image's error row (kind "model")
                logger.exception("segmenter failed on one image")
                self._release_memory()
                results.append(error)
        return results

    def _release_memory(self) -> None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def __call__(self, batch: pa.Table) -> pa.Table:
        status = batch.column("status").to_pylist()
        ok = [i for i, s in enumerate(status) if s == "ok"]
        payloads = batch.column("payload")
        prepared = [pickle.loads(payloads[i].as_buffer()) for i in ok]
        self._check_saliency_cost(prepared)
        try:
            outputs: list = self.segmenter.predict(prepared)
        except Exception:  # retried image by image below, so one bad image only costs itself
            logger.exception("segmenter failed on a batch of %d images; retrying them one by one", len(prepared))
            self._release_memory()
            outputs = self._predict_each(prepared)
        del prepared

        new_payload: list[bytes | None] = [None] * batch.num_rows
        error_kind = batch.column("error_kind").to_pylist()
        error = batch.column("error").to_pylist()
        for i, output in zip(ok, outputs):
            if isinstance(output, Exception):
                status[i] = "error"
                error_kind[i] = "model"
                error[i] = f"{type(output).__name__}: {output}".splitlines()[0]
            else:
                new_payload[i] = pickle.dumps(output, protocol=pickle.HIGHEST_PROTOCOL)
        columns = {
            "status": pa.array(status, pa.string()),
            "error_kind": pa.array(error_kind, pa.string()),
            "error": pa.array(error, pa.string()),
            "payload": pa.array(new_payload, pa.large_binary()),
        }
        for name, column in columns.items():
            batch = batch.set_column(batch.schema.get_field_index(name), name, column)
        return batch

