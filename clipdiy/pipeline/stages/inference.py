"""Inference stage: a callable class for ``Dataset.map_batches`` on an actor pool.

Each actor loads the models once (``create_segmenter``) and receives the text embeddings the
driver computed once for the whole run, so no actor encodes prompts. It runs
``Segmenter.predict`` on the ok rows of a batch and passes error rows through. A model failure
on a batch is retried image by image, and images that still fail become error rows of kind
``model``; the job goes on.

Memory: a batch runs in groups whose images' summed estimates (``Segmenter.working_bytes``) fit
``--max-image-memory-gb``, so images that each fit but together do not are split before they run.
A group that still runs out of memory is halved, down to single images; an image out of memory on
its own (twice, the cache released in between) is a ``too_large`` row, and the actor goes on.
Every image that fits alone is labelled exactly as alone (the methods decide per image).

A CUDA error that poisons the actor (a device-side assert, an illegal address: every later
call on that device fails too) is not about the images: the actor's process exits, Ray restarts the actor (Ray Data's actor pools
default to ``max_restarts=-1``) and retries its batch on the fresh one. The run's
:class:`~clipdiy.pipeline.stages.health.RunHealth` counts poisonings per batch, so a batch that poisons
a fresh actor as well gets ``model`` error rows (and the actor restarts before its next batch)
instead of restarting actors forever.

An actor that cannot load the models (weights missing on its node, a bad path) fails at its
start with the driver's one-line refusal, and the job stops (:func:`actor_start_refusals` turns it
back into an :class:`~clipdiy.errors.ActorStartError`).
"""

from __future__ import annotations

import logging
import os
import pickle
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pyarrow as pa

from clipdiy.errors import ActorStartError, ClipdiyError
from clipdiy.pipeline.config import DEFAULT_MAX_WORKER_DEATHS
from clipdiy.pipeline.stages import health
from clipdiy.pipeline.stages.attempts import AttemptLedger, WorkerLost
from clipdiy.pipeline.stages.health import is_out_of_memory, one_line_error
from clipdiy.pipeline.stages.rows import saliency_preview
from clipdiy.segmentation.config import SegmenterConfig

logger = logging.getLogger(__name__)

#: Above this many pixels at full resolution, FOUND's attention (quadratic in the pixel count)
#: dominates the run: a 4 MP photo costs ~125x a 640 x 480 one (fit to timings on a 2-core CPU).
#: The actor says so once.
LARGE_SALIENCY_PIXELS = 4_000_000

#: Opens the message of an actor that cannot load the models. Ray gives the driver only the text
#: of an error raised in an actor's constructor, so the driver finds the refusal by this marker.
ACTOR_START_REFUSED = "inference actor cannot load the models: "


def actor_start_refusal(error: BaseException) -> str | None:
    """The one-line refusal an inference actor started with, found in ``error`` or its causes."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        text = str(current)
        at = text.rfind(ACTOR_START_REFUSED)
        if at >= 0:
            return text[at + len(ACTOR_START_REFUSED):].splitlines()[0].strip()
        current = current.__cause__ or current.__context__
    return None


@contextmanager
def actor_start_refusals() -> Iterator[None]:
    """Around the driver's consumption of the dataset: an actor's start refusal, which reaches
    the driver as Ray's actor-died error, is raised as :class:`ActorStartError` (one line)."""
    try:
        yield
    except ClipdiyError:
        raise
    except Exception as error:
        message = actor_start_refusal(error)
        if message is None:
            raise
        raise ActorStartError(message) from error


#: Messages of CUDA errors after which the device (context) is unusable for this process.
_POISONING_MARKERS = (
    "device-side assert", "illegal memory access", "illegal address", "illegal instruction",
    "misaligned address", "unspecified launch failure", "cuda error", "cudnn_status",
    "cublas_status", "nccl error", "uncorrectable ecc", "hardware stack error",
)
#: A batch that poisons this many (fresh) actors gets error rows instead of another restart.
POISONINGS_PER_BATCH = 2


class TooLarge(Exception):
    """Stands for the output of an image too large for the worker's memory (a ``too_large`` row):
    over the bound by its estimate, or out of memory on its own."""


def is_poisoning_error(error: BaseException) -> bool:
    """A CUDA error after which this process cannot use its device any more (not out of memory)."""
    if is_out_of_memory(error):
        return False
    if type(error).__name__ in {"AcceleratorError", "CudaError"}:
        return True
    text = str(error).lower()
    return any(marker in text for marker in _POISONING_MARKERS)


class SegmentBatch:
    """``map_batches`` callable: decoded rows (pickled PreparedImage payloads) -> model outputs.

    text_embeddings: C x D float32, L2-normalised (computed once per run by the driver).
    num_threads:     torch intra-op threads on a CPU actor (its reserved CPUs).
    """

    _warn_large = False  # set in __init__ when saliency runs at full resolution
    health = None  # the run's RunHealth actor handle (None: counts kept in this process only)
    _exit_before_next = False  # a batch poisoned the device and got error rows: restart first
    _local_poisonings: dict[str, int] | None = None
    max_worker_deaths = DEFAULT_MAX_WORKER_DEATHS  # deaths on a batch before it goes image by image
    max_image_bytes_in_memory: int | None = None  # an image whose method needs more: a too_large row

    def __init__(
        self,
        segmenter_config: SegmenterConfig,
        text_embeddings: np.ndarray,
        num_threads: int | None = None,
        health=None,
        max_worker_deaths: int = DEFAULT_MAX_WORKER_DEATHS,
        max_image_bytes_in_memory: int | None = None,
    ):
        import torch

        from clipdiy.segmentation.segmenter import create_segmenter

        if health is not None:  # first, so that a run stopped while this actor loads can end it
            import ray

            health.register_actor.remote(ray.get_runtime_context().current_actor)
        if num_threads and not torch.cuda.is_available():
            torch.set_num_threads(max(1, int(num_threads)))
        try:
            self.segmenter = create_segmenter(
                segmenter_config, text_embeddings=torch.from_numpy(np.array(text_embeddings, dtype=np.float32))
            )
        except ClipdiyError as error:  # weights or vocabulary this node cannot load: stop the job
            first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise ActorStartError(ACTOR_START_REFUSED + first_line) from error
        self.health = health
        self.max_worker_deaths = max_worker_deaths
        self.max_image_bytes_in_memory = max_image_bytes_in_memory
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

    def _predict(self, prepared: list, key: str) -> list:
        """Outputs (or, per image, the exception that stands for its error row) of a batch, in order.

        The batch runs in groups whose summed working memory fits the bound (:meth:`_memory_groups`),
        so images that each fit but together do not are split before anything runs. A group that
        still runs out of memory is halved, down to single images (:meth:`_predict_halving`); an
        image is computed on its own exactly as in a batch (the methods decide per image), so a
        split changes no label."""
        outputs: list = []
        for group in self._memory_groups(prepared):
            outputs.extend(self._predict_halving([prepared[i] for i in group], key))
            if self._exit_before_next:  # the device is poisoned: the rest gets no more calls
                return outputs + [outputs[-1]] * (len(prepared) - len(outputs))
        return outputs

    def _memory_groups(self, prepared: list) -> list[list[int]]:
        """Consecutive index groups of ``prepared`` whose summed estimate
        (``Segmenter.working_bytes``) stays within the bound: one group when there is no bound or
        no estimate. (An image over the bound alone was refused before, as ``too_large``.)"""
        estimate = getattr(self.segmenter, "working_bytes", None)
        bound = self.max_image_bytes_in_memory
        if bound is None or estimate is None or len(prepared) < 2:
            return [list(range(len(prepared)))]
        groups: list[list[int]] = [[]]
        held = 0
        for index, item in enumerate(prepared):
            need = int(estimate(item))
            if groups[-1] and held + need > bound:
                groups.append([])
                held = 0
            groups[-1].append(index)
            held += need
        if len(groups) > 1:
            logger.info("a batch of %d images needs more than --max-image-memory-gb %g at once: run as %d groups",
                        len(prepared), bound / 1024**3, len(groups))
        return groups

    def _predict_halving(self, prepared: list, key: str) -> list:
        """Outputs of ``prepared`` (one predict call), in halves while it runs out of memory; an
        image out of memory on its own is tried once more after the cache is released, then it
        is an :class:`TooLarge` (a ``too_large`` row), and the actor goes on. A failure
        other than memory is retried image by image, so one bad image only costs itself."""
        try:
            return self.segmenter.predict(prepared)
        except Exception as error:
            if is_poisoning_error(error):
                return self._poisoned(error, key, len(prepared))
            if not is_out_of_memory(error):
                logger.exception("segmenter failed on a batch of %d images; retrying them one by one", len(prepared))
                self._release_memory()
                return self._predict_each(prepared, key)
            self._release_memory()
            if len(prepared) > 1:
                half = len(prepared) // 2
                logger.warning("out of memory on a batch of %d images; retrying it in halves", len(prepared))
                first = self._predict_halving(prepared[:half], key)
                if self._exit_before_next:
                    return first + [first[-1]] * (len(prepared) - half)
                return first + self._predict_halving(prepared[half:], key)
            return self._predict_alone_again(prepared[0], error, key)

    def _predict_alone_again(self, item, error: BaseException, key: str) -> list:
        """One image ran out of memory on its own: once more (the allocator's cache released, a
        fragmented heap is not the image's fault), else its row says so."""
        try:
            return self.segmenter.predict([item])
        except Exception as again:
            if is_poisoning_error(again):
                return self._poisoned(again, key, 1)
            self._release_memory()
            if not is_out_of_memory(again):
                logger.exception("segmenter failed on one image")
                return [again]
            height, width = item.original_size
            logger.warning("out of memory labelling a %d x %d image on its own: a too_large row", width, height)
            return [TooLarge(
                f"labelling this {width} x {height} image ran out of memory on its own, twice "
                f"({one_line_error(again)}); not labelled (a worker with more memory can label it)")]

    def _predict_each(self, prepared: list, key: str) -> list:
        """Outputs image by image; a failing image gives its exception instead of an output."""
        results = []
        for item in prepared:
            try:
                results.extend(self.segmenter.predict([item]))
            except Exception as error:  # becomes this image's error row (kind "model")
                if is_poisoning_error(error):
                    return results + self._poisoned(error, key, len(prepared) - len(results))
                self._release_memory()
                if is_out_of_memory(error):
                    results.extend(self._predict_alone_again(item, error, key))
                    continue
                logger.exception("segmenter failed on one image")
                results.append(error)
        return results

    def _poisoned(self, error: BaseException, key: str, count: int) -> list:
        """The device is unusable: exit (Ray restarts the actor, retries the batch), or, when this
        batch poisoned a fresh actor before, give its images ``model`` rows and exit before the next."""
        message = f"{type(error).__name__}: {error}".splitlines()[0]
        if self.health is not None:
            import ray

            times = ray.get(self.health.record_poisoning.remote(key))
        else:
            self._local_poisonings = self._local_poisonings or {}
            times = self._local_poisonings[key] = self._local_poisonings.get(key, 0) + 1
        if times < POISONINGS_PER_BATCH:
            logger.error("%s poisoned this actor's device; exiting so that Ray restarts it and retries the batch", message)
            self._exit()
        logger.error(
            "%s poisoned the device on this batch %d times; its %d images get model error rows and the actor "
            "restarts before its next batch", message, times, count,
        )
        self._exit_before_next = True
        return [error] * count

    def _exit(self) -> None:
        """End this actor's process as a crash, so that Ray restarts the actor and retries its tasks
        (``ray.actor.exit_actor`` would be an intended exit, which Ray does not restart)."""
        for handler in logging.getLogger().handlers:
            handler.flush()
        sys.stderr.flush()
        os._exit(1)

    def _release_memory(self) -> None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _too_large(self, prepared: list) -> list[str | None]:
        """Per image, the ``too_large`` message when the method's working memory for it (its
        estimate) exceeds the bound, else None."""
        estimate = getattr(self.segmenter, "working_bytes", None)
        if self.max_image_bytes_in_memory is None or estimate is None:
            return [None] * len(prepared)
        messages: list[str | None] = []
        for item in prepared:
            need = estimate(item)
            height, width = item.original_size
            messages.append(
                None if need <= self.max_image_bytes_in_memory else
                f"labelling this {width} x {height} image would hold about {need / 1024**3:.1f} GiB at once, "
                f"more than --max-image-memory-gb {self.max_image_bytes_in_memory / 1024**3:g}; not labelled"
            )
        return messages

    def _predict_images(self, image_ids: list[str], prepared: list, key: str) -> list:
        """Outputs (or exceptions) of the images ``image_ids`` (one per prepared input)."""
        return self._predict(prepared, key)

    def _predict_one_by_one(self, image_ids: list[str], payloads: list, key: str, attempt) -> list:
        """Earlier attempts at this batch died: each image on its own, registered before it is
        unpickled and touched (and none after the last, so a death while packing the outputs falls
        on no image); those counted deaths followed get a ``worker_lost`` row instead."""
        outputs: list = []
        for image_id, payload in zip(image_ids, payloads):
            if image_id in attempt.lost:
                outputs.append(WorkerLost(attempt.lost_message(image_id)))
                continue
            attempt.start(image_id)
            item = pickle.loads(payload.as_buffer())
            refusal = self._too_large([item])[0]
            if refusal is not None:
                outputs.append(TooLarge(refusal))
                continue
            self._check_saliency_cost([item])
            outputs.extend(self._predict_images([image_id], [item], key))
            del item
        attempt.start(None)
        return outputs

    def __call__(self, batch: pa.Table) -> pa.Table:
        from clipdiy.segmentation.segmenter import ModelOutput

        if self._exit_before_next:
            self._exit()
        image_ids = batch.column("image_id").to_pylist()
        attempt = AttemptLedger(self.health, "inference", self.max_worker_deaths).begin(image_ids)
        status = batch.column("status").to_pylist()
        ok = [i for i, s in enumerate(status) if s == "ok"]
        payloads = batch.column("payload")
        error_kind = batch.column("error_kind").to_pylist()
        error = batch.column("error").to_pylist()
        key = health.batch_key(image_ids)
        if attempt.one_by_one:
            # Image by image from the start, unpickling included: the estimate's refusal
            # (too_large) happens inside each image's turn.
            outputs = self._predict_one_by_one([image_ids[i] for i in ok], [payloads[i] for i in ok], key, attempt)
        else:
            prepared = [pickle.loads(payloads[i].as_buffer()) for i in ok]
            # An image whose working memory would exceed the bound is refused before any work: an
            # OOM kill would cost the actor, and the batch's other images their retries.
            refused = self._too_large(prepared)
            for i, message in zip(ok, refused):
                if message is not None:
                    status[i], error_kind[i], error[i] = "error", "too_large", message
            prepared = [item for item, message in zip(prepared, refused) if message is None]
            ok = [i for i, message in zip(ok, refused) if message is None]
            self._check_saliency_cost(prepared)
            outputs = self._predict_images([image_ids[i] for i in ok], prepared, key) if prepared else []
            del prepared

        new_payload: list[bytes | None] = [None] * batch.num_rows
        for i, output in zip(ok, outputs):
            if isinstance(output, WorkerLost):
                status[i], error_kind[i], error[i] = "error", "worker_lost", str(output)
            elif isinstance(output, TooLarge):
                status[i], error_kind[i], error[i] = "error", "too_large", str(output)
            elif isinstance(output, Exception):
                status[i] = "error"
                error_kind[i] = "model"
                error[i] = f"{type(output).__name__}: {output}".splitlines()[0]
            else:
                if isinstance(output, ModelOutput):  # (the tests' stand-in segmenters give other objects)
                    # Rows keep only a 64-px preview of the saliency map: ship that, not the full map.
                    output.saliency = saliency_preview(output.saliency, output.original_size)
                new_payload[i] = pickle.dumps(output, protocol=pickle.HIGHEST_PROTOCOL)
        columns = {
            "status": pa.array(status, pa.string()),
            "error_kind": pa.array(error_kind, pa.string()),
            "error": pa.array(error, pa.string()),
            "payload": pa.array(new_payload, pa.large_binary()),
        }
        for name, column in columns.items():
            batch = batch.set_column(batch.schema.get_field_index(name), name, column)
        attempt.end()
        return batch

