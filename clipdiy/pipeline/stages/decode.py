"""CPU decode stage: source bytes -> a prepared image, or the reason it cannot be labelled.

Every failure becomes an error kind (the ``error_kind`` column) and a message; nothing raises out
of a batch, so one bad object never stops the job. The decompression-bomb guard reads the pixel
count from the header (``Image.open`` is lazy) before any pixel is decoded.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import logging
import pickle
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
from PIL import Image, ImageFile, UnidentifiedImageError

from clipdiy.errors import InvalidImageError
from clipdiy.locations import Location
from clipdiy.pipeline.config import DEFAULT_MAX_WORKER_DEATHS
from clipdiy.pipeline.stages.expand import IMAGE_BYTES, PRESET_ERROR, PRESET_KIND
from clipdiy.segmentation.images import to_rgb_uint8
from clipdiy.segmentation.prepared import PreparedImage, prepare_image
from clipdiy.segmentation.segmenter import prepare_input

logger = logging.getLogger(__name__)

#: The error kinds of the label-row schema (``schemas/label_row.v2.json``). ``not_found``: the
#: object does not exist (an answer, not retried: see ``incremental.py``); ``timed_out``: its
#: read took longer than ``--read-deadline-s`` (a stalled or trickling store; later runs try it
#: again a bounded number of times); ``unreadable``: any other failed read; ``invalid_uri``: a
#: manifest entry that is not a URI one can read; ``worker_lost``: the image killed its process
#: more often than ``--max-worker-deaths`` allows; ``duplicate``: a second sample of one key in a shard.
ERROR_KINDS = ("empty", "truncated", "corrupt", "not_image", "too_large", "not_found", "timed_out", "unreadable",
               "invalid_uri", "unsupported", "model", "worker_lost", "duplicate")

# Leading bytes of the formats Pillow reads: an object that starts like an image but will not
# decode is "corrupt"; anything else is "not_image".
_MAGIC = (
    b"\xff\xd8\xff",  # JPEG
    b"\x89PNG\r\n\x1a\n",
    b"GIF87a",
    b"GIF89a",
    b"BM",
    b"II*\x00",  # TIFF little-endian
    b"MM\x00*",  # TIFF big-endian
    b"RIFF",  # WebP
    b"P1", b"P2", b"P3", b"P4", b"P5", b"P6",  # PNM
)


@dataclass
class DecodeResult:
    """``prepared`` on success; else ``error_kind`` (one of :data:`ERROR_KINDS`) and ``error``."""

    prepared: PreparedImage | None = None
    error_kind: str | None = None
    error: str | None = None


class ImageDecodeError(Exception):
    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def _looks_like_image(data: bytes) -> bool:
    return data.startswith(_MAGIC)


def _classify_decode_failure(error: BaseException, data: bytes) -> str:
    text = str(error).lower()
    if isinstance(error, EOFError) or "truncated" in text or "premature end" in text:
        return "truncated"
    return "corrupt" if _looks_like_image(data) else "not_image"


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """The fully decoded PIL image of ``data`` (first frame), EXIF orientation not yet applied.

    Raises :class:`ImageDecodeError` with the error kind.
    """
    if not data:
        raise ImageDecodeError("empty", "the object is empty (0 bytes)")
    # Our guard replaces Pillow's process-wide limit (checked on the header below), and truncated
    # files must fail rather than decode half grey; both settings are restored afterwards.
    pillow_limit, pillow_truncated = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES
    Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = None, False
    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        if width * height > max_pixels:
            raise ImageDecodeError(
                "too_large",
                f"{width} x {height} = {width * height} pixels exceeds the guard of {max_pixels} (--max-pixels)",
            )
        image.load()
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageDecodeError("too_large", f"decompression bomb guard: {error}") from error
    except UnidentifiedImageError as error:
        kind = "corrupt" if _looks_like_image(data) else "not_image"
        what = "unreadable image header" if kind == "corrupt" else "not an image Pillow can read"
        raise ImageDecodeError(kind, f"{what} ({len(data)} bytes)") from error
    except MemoryError as error:
        raise ImageDecodeError("too_large", "out of memory while decoding") from error
    except Exception as error:  # noqa: BLE001 - any failure to decode these bytes is this image's row
        # Pillow reports broken streams with many types (OSError, SyntaxError, struct.error, ...).
        raise ImageDecodeError(_classify_decode_failure(error, data), _message(error)) from error
    finally:
        Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = pillow_limit, pillow_truncated
    return image


def _message(error: BaseException) -> str:
    """A readable one-line message of an exception (its type and first line)."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def _invalid(error: InvalidImageError) -> DecodeResult:
    return DecodeResult(error_kind=error.kind if error.kind in ERROR_KINDS else "unsupported", error=str(error))


def decode_image(
    data: bytes, *, mode: str, max_pixels: int, saliency_max_side: int | None = None, config=None
) -> DecodeResult:
    """Bytes -> :class:`PreparedImage` (EXIF applied, RGB, original size kept, model and saliency inputs).

    ``config``: a :class:`~clipdiy.segmentation.config.SegmenterConfig` whose method prepares the input
    (``mode`` and ``saliency_max_side`` are then unused); ``None``: CLIP-DIY's preparation.

    Never raises (but for ``KeyboardInterrupt``/``SystemExit``): whatever goes wrong is this
    image's error row, named by the stage that failed. Bytes that do not decode, and a decoded
    image whose EXIF or mode is malformed, are ``truncated``/``corrupt``/``not_image``; an image the
    method cannot prepare is ``unsupported``; running out of memory is ``too_large``.
    """
    try:
        image = open_image(data, max_pixels)
    except ImageDecodeError as error:
        return DecodeResult(error_kind=error.kind, error=str(error))
    try:
        # EXIF orientation (a corrupt EXIF block raises struct.error, TypeError, ...) and any mode to RGB.
        rgb = to_rgb_uint8(image)
    except InvalidImageError as error:
        return _invalid(error)
    except MemoryError:
        return DecodeResult(error_kind="too_large", error="out of memory while converting the image to RGB")
    except Exception as error:  # noqa: BLE001 - the file decodes but its metadata or pixels are malformed
        return DecodeResult(error_kind=_classify_decode_failure(error, data), error=f"EXIF or mode conversion failed: {_message(error)}")
    try:
        if config is not None:
            return DecodeResult(prepared=prepare_input(rgb, config))
        return DecodeResult(prepared=prepare_image(rgb, mode, saliency_max_side))
    except InvalidImageError as error:
        return _invalid(error)
    except MemoryError:
        return DecodeResult(error_kind="too_large", error="out of memory while preparing the model input")
    except Exception as error:  # noqa: BLE001 - an image the method cannot take costs only its own row
        method = config.method if config is not None else "clipdiy"
        height, width = rgb.shape[:2]
        return DecodeResult(
            error_kind="unsupported", error=f"{method} cannot prepare a {width} x {height} image: {_message(error)}"
        )


#: Listing columns that may hold a credential or point at one: the decode stage reads them and
#: drops them, so that nothing after the read carries them.
_LOCATION_COLUMNS = ("signed_uri", "signed_entry", "listing_entry")
#: A shard sample's inline bytes and preset error (stages/expand.py): consumed here.
_INLINE_COLUMNS = (IMAGE_BYTES, PRESET_KIND, PRESET_ERROR)


#: Columns the decode stage adds to the listing columns.
DECODED_FIELDS = [
    pa.field("status", pa.string()),
    pa.field("error_kind", pa.string()),
    pa.field("error", pa.string()),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("payload", pa.large_binary()),  # pickled PreparedImage, later ModelOutput
]


def decoded_columns(results: list[DecodeResult]) -> dict[str, pa.Array]:
    """The decode-stage columns of a batch (``payload``: pickled PreparedImage of ok rows)."""
    columns: dict[str, list[Any]] = {f.name: [] for f in DECODED_FIELDS}
    for result in results:
        ok = result.prepared is not None
        columns["status"].append("ok" if ok else "error")
        columns["error_kind"].append(result.error_kind)
        columns["error"].append(result.error)
        if ok:
            height, width = result.prepared.original_size
            columns["width"].append(int(width))
            columns["height"].append(int(height))
            columns["payload"].append(pickle.dumps(result.prepared, protocol=pickle.HIGHEST_PROTOCOL))
        else:
            columns["width"].append(None)
            columns["height"].append(None)
            columns["payload"].append(None)
    return {f.name: pa.array(columns[f.name], type=f.type) for f in DECODED_FIELDS}


class DecodeBatch:
    """``map_batches`` function: listing rows -> listing rows + decode columns (pyarrow batches).

    Opens one filesystem per process and input store; reads with retries on transient errors.
    """

    def __init__(
        self,
        storage_options,
        mode: str,
        max_pixels: int,
        read_attempts: int,
        saliency_max_side: int | None = None,
        health=None,
        segmenter_config=None,
        max_image_bytes: int | None = None,
        max_worker_deaths: int = DEFAULT_MAX_WORKER_DEATHS,
        read_deadline_s: float | None = None,
    ):
        self.read_deadline_s = read_deadline_s  # the most seconds one object's read takes, retries included
        self.segmenter_config = segmenter_config  # when given, its method prepares the inputs
        self.max_image_bytes = max_image_bytes  # larger objects get a too_large row, unread
        self.max_worker_deaths = max_worker_deaths
        self.storage_options = storage_options
        self.mode = mode
        self.max_pixels = max_pixels
        self.read_attempts = read_attempts
        self.saliency_max_side = saliency_max_side
        self.health = health  # the run's RunHealth actor (clipdiy.pipeline.stages.health), or None
        self._filesystems: dict[str, Any] = {}

    def _read(self, location: Location) -> bytes:
        """The bytes at ``location`` (the readable, maybe signed, URI; it names itself by its
        public form)."""
        from fsspec.implementations.local import LocalFileSystem

        from clipdiy.pipeline.sources.objects import as_os_path
        from clipdiy.storage import open_filesystem, path_within, read_bytes

        protocol = location.public.split("://", 1)[0] if location.has_scheme else "file"
        fs = self._filesystems.get(protocol)
        if fs is None:
            fs, path = open_filesystem(location, self.storage_options)
            self._filesystems[protocol] = fs
        else:
            path = path_within(fs, location)
        if isinstance(fs, LocalFileSystem):
            path = as_os_path(path)  # a listed name that is not UTF-8, back to its bytes
        return read_bytes(fs, path, attempts=self.read_attempts, what=f"read {location}",
                          max_bytes=self.max_image_bytes, deadline_s=self.read_deadline_s)

    def _report_reads(self, ok: int, failed: dict[str, int], sample: str | None) -> None:
        """Tell the run's health actor; raise RunFailedError once reads are broken run-wide."""
        if self.health is None:
            return
        from clipdiy.errors import RunFailedError
        from clipdiy.pipeline.stages.health import report_reads

        verdict = report_reads(self.health, ok, failed, sample)  # waits only when some failed
        if verdict is not None:
            raise RunFailedError(verdict)

    def _missing_are_answers(self, reads: _Reads) -> bool:
        """Whether this batch's missing objects are answers (see :meth:`RunHealth.judge_not_found`)."""
        if self.health is None:
            return True
        import ray

        return ray.get(self.health.judge_not_found.remote(reads.ok, reads.failed["not_found"], reads.sample))

    def _decode_one(
        self, image_id: str, uri: str, signed_uri: Location | None, entry: int | None, size: int | None, reads: _Reads,
        inline: tuple[bytes | None, str | None, str | None] | None = None,
    ) -> DecodeResult:
        """Read and decode one object: never raises but for the run's own errors. ``uri``: the
        public location (what messages name); ``signed_uri``: the readable one where it is signed;
        ``entry``: the manifest entry whose signed location the labelling looked up again.
        ``inline``: (bytes, error kind, error) of a sample the shard-expanding stage read
        (``clipdiy.pipeline.stages.expand``): decoded as is, nothing read here."""
        from clipdiy.pipeline.stages.health import classify_read_failure, one_line, read_error
        from clipdiy.storage import ObjectTooLargeError

        if inline is not None:
            data, preset_kind, preset_error = inline
            if preset_kind is not None:
                return DecodeResult(error_kind=preset_kind, error=preset_error)
            return decode_image(data or b"", mode=self.mode, max_pixels=self.max_pixels,
                                saliency_max_side=self.saliency_max_side, config=self.segmenter_config)
        if signed_uri is None and entry is not None:
            return DecodeResult(error_kind="unreadable", error=(
                f"entry {entry} of the manifest no longer lists this image (the manifest changed during the "
                f"run): not read; the next run labels it"))
        location = signed_uri or Location(uri)
        if location.parse_error is not None:
            return DecodeResult(error_kind="invalid_uri", error=location.parse_error)
        if size == 0:  # the listing says so: no read (a range of an empty S3 object is answered 416)
            reads.ok += 1
            return DecodeResult(error_kind="empty", error="the object is empty (0 bytes, as listed); not read")
        if self.max_image_bytes is not None and size is not None and size > self.max_image_bytes:
            reads.ok += 1  # the store answered (the listing): nothing read, nothing failed
            return DecodeResult(
                error_kind="too_large",
                error=f"the object holds {size} bytes, more than --max-image-bytes {self.max_image_bytes}; not read",
            )
        try:
            data = self._read(location)
        except ObjectTooLargeError as error:
            reads.ok += 1
            return DecodeResult(error_kind="too_large", error=f"{error}; not read further")
        except Exception as error:  # noqa: BLE001 - every storage failure becomes this image's error row
            failure = classify_read_failure(error)
            kind, message = read_error(error, failure)
            logger.warning("cannot read %s: %s", uri, message)
            reads.failed[failure] += 1
            reads.sample = reads.sample or one_line(f"{uri}: {message}")
            return DecodeResult(error_kind=kind, error=message)
        reads.ok += 1
        return decode_image(
            data,
            mode=self.mode,
            max_pixels=self.max_pixels,
            saliency_max_side=self.saliency_max_side,
            config=self.segmenter_config,
        )

    def __call__(self, batch: pa.Table) -> pa.Table:
        from clipdiy.pipeline.stages.attempts import AttemptLedger

        names = batch.column_names
        rows = batch.num_rows
        image_ids = batch.column("image_id").to_pylist()
        # The listed size (LISTING_SCHEMA's source_size; None where the listing has none).
        sizes = batch.column("source_size").to_pylist() if "source_size" in names else [None] * rows
        # The listing's signed locations, typed again: they name themselves by their public form.
        signed = ([None if text is None else Location(text) for text in batch.column("signed_uri").to_pylist()]
                  if "signed_uri" in names else [None] * rows)
        entries = batch.column("signed_entry").to_pylist() if "signed_entry" in names else [None] * rows
        # Samples of shards (stages/expand.py) carry their bytes, or the error found reading them.
        if IMAGE_BYTES in names:
            inline = list(zip(batch.column(IMAGE_BYTES).to_pylist(), batch.column(PRESET_KIND).to_pylist(),
                              batch.column(PRESET_ERROR).to_pylist(), strict=True))
            sizes = [None] * rows  # the listed size is the shard's
        else:
            inline = [None] * rows
        attempt = AttemptLedger(self.health, "decode", self.max_worker_deaths).begin(image_ids)
        results = []
        reads = _Reads()
        for image_id, uri, signed_uri, entry, size, sample in zip(
            image_ids, batch.column("uri").to_pylist(), signed, entries, sizes, inline, strict=True
        ):
            if image_id in attempt.lost:
                results.append(DecodeResult(error_kind="worker_lost", error=attempt.lost_message(image_id)))
                continue
            attempt.start(image_id)
            results.append(self._decode_one(image_id, uri, signed_uri, entry, size, reads, inline=sample))
        attempt.start(None)  # done with the images: a death from here on falls on none
        if reads.failed["not_found"] and not self._missing_are_answers(reads):
            results = [_untrusted(result) if result.error_kind == "not_found" else result for result in results]
        self._report_reads(reads.ok, dict(reads.failed), reads.sample)
        attempt.end()
        batch = batch.drop_columns([name for name in (*_LOCATION_COLUMNS, *_INLINE_COLUMNS) if name in names])
        for name, column in decoded_columns(results).items():
            batch = batch.append_column(name, column)
        return batch


def _untrusted(result: DecodeResult) -> DecodeResult:
    """A ``not_found`` row of a batch read while most reads found nothing: not an answer."""
    return DecodeResult(error_kind="unreadable", error=(
        f"{result.error}; not taken as an answer: most reads of this run found nothing (a wrong bucket, prefix or "
        "endpoint?); the next run reads it again"))


@dataclass
class _Reads:
    """A decode batch's read outcomes, for the run's health actor."""

    ok: int = 0
    failed: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    sample: str | None = None
