"""The run report: one self-contained HTML page about every finished run of a labels output.

A *night* is one finished run of the labelling job (runs are what a nightly schedule starts); a
run of human corrections (``jobs/review.py import``, manifest option ``source = human``) is not a
night: its rows imported since the newest night count among the lowest-scoring images'
candidates (they win over the rows they correct), but it adds no point to the nightly plots, no drift and no model change. A night that
labelled nothing (every image skipped) shows its counts and no model: it is no model change and
moves no class (drift compares the nights that labelled something). For each night the page
shows what the run did (images seen, labelled, errors by kind, skipped; wall time and images/s;
method, precision and the model fingerprint), what it produced (each class's share of the
labelled pixels and the images it wins, with the nights where a class moved by more than
``ReportConfig.drift_threshold`` against the median of the previous nights called out), how sure
the model was (histograms of mask scores, of each image's mean mask score and of the foreground
fraction), and the lowest-scoring images with their overlays (the previews' rendering,
:func:`clipdiy.labels.preview.render_image`). Plots are PNGs embedded as base64; the page needs nothing
else.

Reads and memory follow the newest night, not the history. A run's numbers count every row it
wrote (as its manifest does), so they never change once it is finished: each run is read once,
shard by shard (its columns reduced with pyarrow and numpy to fixed-size per-class sums and
histogram counts; no row outlives its shard), and its aggregates are kept under
``OUTPUT/_report/`` (:mod:`clipdiy.labels.report_cache`, which says when a kept file is not
trusted). Runs are taken one at a time; a night keeps only the manifest fields the page shows.
The lowest-scoring images are the only rows read each time: those of the newest night that
labelled something and of the runs after it, among the rows that count today (the latest write
of each image, :mod:`clipdiy.labels.row_index`, exact over those runs), the K lowest kept so far.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from clipdiy.labels.night_stats import (  # noqa: F401 - names this module has always offered
    AGGREGATE_COLUMNS,
    MASK_FIELDS,
    MODEL_COLUMNS,
    NIGHT_MANIFEST_FIELDS,
    NightStats,
    _aggregate_shard,
    mean_mask_scores,
    model_fingerprint,
)
from clipdiy.labels.report_cache import RunSummary, StatsCache, is_correction_run  # noqa: F401
from clipdiy.labels.row_index import build_row_index
from clipdiy.labels.runs import read_shard, run_folders
from clipdiy.labels.store import load_image
from clipdiy.locations import Location
from clipdiy.storage import StorageOptions
from clipdiy.uris import redact_text

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReportConfig:
    """``drift_threshold``: a class is called out on a night when its pixel share or its share of
    images won differs from the median of the previous nights by more than this (absolute, 0.05 =
    5 percentage points); ``lowest``: how many lowest-scoring images get a thumbnail;
    ``bins``: histogram bins over [0, 1]; ``classes_plotted``: the classes with the largest
    overall pixel share drawn in the per-class plots (every class is in the tables);
    ``thumbnail_size``: longer side of a thumbnail's panels (px); ``max_keys_in_memory``: see below."""

    drift_threshold: float = 0.05
    lowest: int = 12
    bins: int = 40
    classes_plotted: int = 8
    thumbnail_size: int = 160
    #: Passed to :func:`~clipdiy.labels.row_index.build_row_index`: the keys of the latest-write
    #: pass, the report's largest holding, spill to local disk above this many rows. The readers'
    #: default (2M rows) peaks near 650 MB at 2M rows; 100k keeps the report near 230 MB at any
    #: size (benchmarks/bench_report.py), for a few seconds more.
    max_keys_in_memory: int | None = 100_000
    #: A thumbnail's source is read only up to this many bytes (the job's --max-image-bytes
    #: default); a larger source, like any source that cannot be read or decoded now, gets no thumbnail.
    max_source_bytes: int = 256 * 1024**2
    #: Keep each run's aggregates under OUTPUT/_report/ and read them from there next time
    #: (:mod:`clipdiy.labels.report_cache`); off, every report reads every run's shards.
    cache: bool = True


@dataclass
class _Lowest:
    """The K rows with the lowest image score seen so far: (score, shard number, row number)."""

    k: int
    score: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float64))
    shard: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    row: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    def offer(self, score: np.ndarray, shard: int, rows: np.ndarray) -> None:
        if self.k <= 0 or score.size == 0:
            return
        score = np.concatenate([self.score, score])
        shards = np.concatenate([self.shard, np.full(rows.size, shard, np.int64)])
        rows = np.concatenate([self.row, rows])
        if score.size > self.k:
            keep = np.argpartition(score, self.k - 1)[: self.k]
            score, shards, rows = score[keep], shards[keep], rows[keep]
        order = np.lexsort((rows, shards, score))
        self.score, self.shard, self.row = score[order], shards[order], rows[order]


@dataclass
class Drift:
    """A class that moved on a night: ``measure`` is "pixel share" or "images won";
    ``value`` that night's share, ``median`` the median over the previous nights."""

    night: int
    run_id: str
    class_name: str
    measure: str
    value: float
    median: float
    model_changed: bool


def model_changes(nights: Sequence[NightStats]) -> list[bool]:
    """For each night: whether its model differs from that of the last earlier night that
    labelled something (a night that labelled nothing has no model, and changes nothing)."""
    changed, previous = [], None
    for night in nights:
        changed.append(night.labelled and previous is not None and night.model != previous)
        if night.labelled:
            previous = night.model
    return changed


def drifts(nights: Sequence[NightStats], class_names: Sequence[str], threshold: float) -> list[Drift]:
    """Every (night, class, measure) whose share differs from the median of the previous nights'
    shares by more than ``threshold``; only nights that labelled something count, on both sides
    (the first of them has no previous nights and is never called out)."""
    found = []
    changed = model_changes(nights)
    counted = [i for i, night in enumerate(nights) if night.labelled]
    for measure, shares in (("pixel share", _by_name(nights, class_names, "pixel_share")),
                            ("images won", _by_name(nights, class_names, "win_share"))):
        for k in range(1, len(counted)):
            i = counted[k]
            median = np.median(shares[counted[:k]], axis=0)
            for c in np.flatnonzero(np.abs(shares[i] - median) > threshold).tolist():
                found.append(Drift(i, nights[i].run_id, class_names[c], measure, float(shares[i, c]), float(median[c]),
                                   changed[i]))
    return sorted(found, key=lambda d: (d.night, d.measure, -abs(d.value - d.median)))


def _by_name(nights: Sequence[NightStats], class_names: Sequence[str], attribute: str) -> np.ndarray:
    """nights x classes array of a per-class attribute, columns in ``class_names`` order (nights
    with other vocabularies are matched by name; a class a night lacks counts 0)."""
    column = {name: i for i, name in enumerate(class_names)}
    out = np.zeros((len(nights), len(class_names)))
    for i, night in enumerate(nights):
        values = getattr(night, attribute)
        for c, name in enumerate(night.class_names):
            out[i, column[name]] += values[c]
    return out


@dataclass
class ReportData:
    """What the page shows: the nights in start order, the union vocabulary, the lowest-scoring
    rows (dicts, with ``image_score``), drifts, and how long reading took."""

    nights: list[NightStats]
    class_names: tuple[str, ...]
    lowest: list[dict]
    drifts: list[Drift]
    shards: int
    rows: int
    seconds: float
    #: Runs of human corrections (not nights; those since the newest night are read for ``lowest``).
    corrections: int = 0
    #: Runs whose aggregates came from the cache under OUTPUT (:mod:`clipdiy.labels.report_cache`).
    cached: int = 0
    #: Shard files this report read (runs not in the cache, the newest night's rows, thumbnails' rows).
    shards_read: int = 0


def collect(outputs: str | Sequence[str], config: ReportConfig = ReportConfig(),
            storage: StorageOptions | None = None) -> ReportData:
    """Every finished run of ``outputs`` into :class:`ReportData`: each run's aggregates from the
    cache under OUTPUT or, the first time, from its shards (one run, one shard at a time); the
    lowest-scoring images from the newest night (:func:`lowest_rows`)."""
    started = time.perf_counter()
    cache = StatsCache(config.bins, enabled=config.cache)
    summaries = []
    for folder in run_folders(outputs, storage=storage):
        summary = cache.summary(folder)
        if summary is not None:
            summaries.append(summary)
    if not summaries:
        raise FileNotFoundError(f"no finished runs in {outputs}")
    summaries.sort(key=lambda s: s.order)
    ordered = [s.night for s in summaries if s.night is not None]
    if not ordered:
        raise FileNotFoundError(f"no finished runs of the labelling job in {outputs} (only corrections)")
    class_names = tuple(dict.fromkeys(name for night in ordered for name in night.class_names))
    lowest, shards_read = lowest_rows(summaries, config)
    return ReportData(ordered, class_names, lowest, drifts(ordered, class_names, config.drift_threshold),
                      sum(s.shards for s in summaries), sum(n.rows for n in ordered), time.perf_counter() - started,
                      sum(s.correction for s in summaries), cache.hits, cache.shards_read + shards_read)


def _microseconds(started_at: str) -> int | None:
    """A manifest's ``started_at`` (ISO 8601) in microseconds since the epoch (UTC when it names
    no zone); ``None`` when it is not a time."""
    try:
        when = dt.datetime.fromisoformat(started_at)
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return (when - dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)) // dt.timedelta(microseconds=1)


def lowest_rows(summaries: Sequence[RunSummary], config: ReportConfig) -> tuple[list[dict], int]:
    """The ``config.lowest`` lowest-scoring rows of the newest night that labelled something and
    of the runs after it (later nights, human corrections), among the rows that count today,
    lowest first (dicts with ``image_score``); and the number of shards read.

    Only those runs are read, so the report's reads do not grow with the history. The latest-write
    rule is exact over them (:mod:`clipdiy.labels.row_index`): a model row of the newest night
    wins over every row of an earlier run, and a later run's rows are all read. A human correction
    of an image version older than that night is left out (whether a night in between relabelled
    it is in runs not read)."""
    nights = [s for s in summaries if s.night is not None]
    if config.lowest <= 0 or not nights:
        return [], 0
    first = next((s for s in reversed(nights) if s.night.labelled), nights[-1])
    runs = [run for run in (s.folder.load() for s in summaries if s.order >= first.order) if run.finished]
    if not any(run.shards for run in runs):
        return [], 0
    floor = _microseconds(first.started_at)
    index = build_row_index(runs, max_keys_in_memory=config.max_keys_in_memory)
    lowest = _Lowest(config.lowest)
    for number, (run, shard) in enumerate(index.shards):
        table = read_shard(run, shard, ["masks", "source", "corrected_run_started_at"])
        image_score = mean_mask_scores(table)
        candidates = np.isfinite(image_score)
        human = pc.equal(table.column("source"), "human").fill_null(False).to_numpy(zero_copy_only=False)
        if human.any():
            corrected = pc.cast(pc.cast(table.column("corrected_run_started_at"), pa.timestamp("us", "UTC")), pa.int64())
            corrected = corrected.to_numpy(zero_copy_only=False).astype(np.float64)  # null -> NaN: left out
            older = np.isnan(corrected) | (corrected < floor) if floor is not None else np.ones_like(human)
            candidates &= ~(human & older)
        del table
        winners = index.winners(number)
        if winners is not None:
            candidates &= winners
        positions = np.flatnonzero(candidates)
        lowest.offer(image_score[positions], number, positions)
    # Each shard holding some of them read once (the K rows, every column, for their thumbnails).
    records: dict[tuple[int, int], dict] = {}
    for shard in np.unique(lowest.shard).tolist():
        run, path = index.shards[shard]
        wanted = lowest.row[lowest.shard == shard]
        for row, record in zip(wanted.tolist(), read_shard(run, path).take(pa.array(wanted)).to_pylist()):
            records[(shard, row)] = record
    rows = []
    for score, shard, row in zip(lowest.score.tolist(), lowest.shard.tolist(), lowest.row.tolist()):
        rows.append({**records[(shard, row)], "image_score": score})
    return rows, len(index.shards) + len(np.unique(lowest.shard))


# ---------------------------------------------------------------- plots

def _figure(width: float = 5.4, height: float = 3.0):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height), dpi=100)


def _png_data(figure) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _night_axis(axis, nights: Sequence[NightStats]) -> None:
    """Night labels on x, and a dashed line with the new fingerprint where the model changed."""
    axis.set_xticks(range(len(nights)))
    axis.set_xticklabels([_plain(_night_label(n)) for n in nights], rotation=30, ha="right", fontsize=7)
    for i, changed in enumerate(model_changes(nights)):
        if changed:
            axis.axvline(i - 0.5, color="black", linestyle="--", linewidth=1)
            axis.annotate(f"model {nights[i].model[:8]}", (i - 0.5, 1.0), xycoords=("data", "axes fraction"),
                          fontsize=7, rotation=90, va="top", ha="right")


def _plain(text: str) -> str:
    """``text`` as matplotlib draws it literally: a ``$`` would start mathtext, which raises on
    names like ``$\\foo$`` or ``a$_$b`` (class names come from the user's vocabulary)."""
    return text.replace("$", r"\$")


def _night_label(night: NightStats) -> str:
    return f"{night.started_at[:16].replace('T', ' ')}\n{night.run_id[-12:]}"


def plot_images(nights: Sequence[NightStats]) -> str:
    fig, ax = _figure()
    x = np.arange(len(nights))
    ok = np.array([n.ok for n in nights])
    errors = np.array([n.rows - n.ok for n in nights])
    skipped = np.array([int(n.counts.get("skipped", 0)) for n in nights])
    ax.bar(x, ok, color="#4c72b0", label="labelled (ok)")
    ax.bar(x, errors, bottom=ok, color="#c44e52", label="error rows")
    ax.plot(x, skipped, "o-", color="#55a868", label="skipped (labelled before)")
    ax.set_ylabel("images")
    ax.legend(fontsize=7, loc="upper left")
    _night_axis(ax, nights)
    return _png_data(fig)


def plot_errors(nights: Sequence[NightStats]) -> str:
    fig, ax = _figure()
    kinds = sorted({k for n in nights for k in n.errors})
    bottom = np.zeros(len(nights))
    for kind in kinds:
        values = np.array([n.errors.get(kind, 0) for n in nights], float)
        ax.bar(np.arange(len(nights)), values, bottom=bottom, label=kind)
        bottom += values
    if not kinds:
        ax.text(0.5, 0.5, "no errors", transform=ax.transAxes, ha="center")
    else:
        ax.legend(fontsize=7, loc="upper left")
    ax.set_ylabel("error rows")
    _night_axis(ax, nights)
    return _png_data(fig)


def plot_speed(nights: Sequence[NightStats]) -> str:
    fig, ax = _figure()
    x = np.arange(len(nights))
    ax.plot(x, [float(n.timings.get("images_per_second", 0) or 0) for n in nights], "o-", color="#4c72b0")
    ax.set_ylabel("images/s (labelling)", color="#4c72b0")
    twin = ax.twinx()
    twin.plot(x, [float(n.timings.get("total", 0) or 0) / 60 for n in nights], "s--", color="#dd8452")
    twin.set_ylabel("wall time (min)", color="#dd8452")
    _night_axis(ax, nights)
    return _png_data(fig)


def _plotted_classes(data: ReportData, config: ReportConfig) -> list[int]:
    total = _by_name(data.nights, data.class_names, "class_pixels").sum(axis=0)
    order = np.argsort(-total, kind="stable")[: config.classes_plotted]
    return [int(c) for c in order if total[c] > 0]


def plot_classes(data: ReportData, config: ReportConfig, attribute: str, measure: str, ylabel: str) -> str:
    fig, ax = _figure(5.4, 3.2)
    shares = _by_name(data.nights, data.class_names, attribute)
    x = np.arange(len(data.nights))
    called = {(d.night, d.class_name) for d in data.drifts if d.measure == measure}
    for c in _plotted_classes(data, config):
        name = data.class_names[c]
        line, = ax.plot(x, 100 * shares[:, c], "o-", markersize=3, label=_plain(name))
        marked = [i for i in range(len(x)) if (i, name) in called]
        if marked:
            ax.plot(marked, 100 * shares[marked, c], "o", markersize=10, markerfacecolor="none",
                    markeredgecolor="red", markeredgewidth=1.5)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    _night_axis(ax, data.nights)
    return _png_data(fig)


def plot_histogram(data: ReportData, attribute: str, xlabel: str) -> str:
    """One line per model fingerprint (nights with the same model summed): a model change shows
    as a second line."""
    fig, ax = _figure(4.2, 2.6)
    by_model: dict[str, np.ndarray] = {}
    for night in data.nights:
        by_model[night.model] = by_model.get(night.model, 0) + getattr(night, attribute)
    edges = np.linspace(0, 1, data.nights[0].bins + 1)
    drawn = False
    for model, counts in by_model.items():
        if counts.sum():
            ax.stairs(counts, edges, label=f"model {model[:8]} ({int(counts.sum())})")
            drawn = True
    if drawn:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no values", transform=ax.transAxes, ha="center")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    return _png_data(fig)


# ---------------------------------------------------------------- page

def _thumbnail(row: dict, config: ReportConfig, storage: StorageOptions | None) -> str | None:
    """The row's overlay as base64 PNG, or None when its source cannot be shown now. Whatever
    the reason (moved, 403, over ``max_source_bytes``, a decompression bomb, a file that no longer
    decodes), it costs this thumbnail only: the page is about the runs, not this one source."""
    from clipdiy.labels.preview import PreviewConfig, render_image

    try:
        # By the row's address (one ranged read, bounded); PIL's bomb guard stays on in load_image.
        image = load_image(row, storage, max_bytes=config.max_source_bytes)
        picture = render_image(row, image, PreviewConfig(size=config.thumbnail_size, legend_width=200))
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG")
    except Exception as error:  # noqa: BLE001 - see the docstring; said in the page and the log
        # The row's uri is shown as a Location (rows read here need not be ours); the error is
        # a library's text (finding 7), redacted as text.
        logger.warning("no thumbnail for %s: %s", Location(str(row.get("uri"))),
                       redact_text(f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"))
        return None
    return base64.b64encode(buffer.getvalue()).decode("ascii")


_STYLE = ("body{font-family:sans-serif;margin:1em;max-width:1100px}table{border-collapse:collapse;font-size:12px}"
          "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}th{background:#eee}td.t{text-align:left}"
          "p.m{color:#444;font-size:13px;margin:.2em 0 .8em}figure{margin:.5em 0}.drift{color:#b00}"
          ".low{display:inline-block;margin:4px;vertical-align:top;font-size:11px}"
          ".grid{display:flex;flex-wrap:wrap;gap:8px}.grid figure{width:500px}.grid img{max-width:100%}"
          ".glance{font-size:16px;background:#f4f4f4;padding:.5em;border-left:4px solid #4c72b0}")

# Says in the page how many embedded pictures the browser decoded (the browser test reads it).
_SCRIPT = """window.addEventListener('load', () => {
  const pictures = Array.from(document.querySelectorAll('img'));
  const shown = pictures.filter(p => p.complete && p.naturalWidth > 0).length;
  document.getElementById('shown').textContent = shown + ' of ' + pictures.length + ' pictures shown';
});"""

MEANINGS = {
    "seen": "rows the run wrote (over all its attempts): ok + error rows.",
    "ok": "images labelled: rows with status ok, each holding one mask per present class.",
    "errors": "rows with status error, by kind (empty, truncated, corrupt, not_image, too_large, not_found, "
              "unreadable, invalid_uri, unsupported, model, worker_lost; docs/job/failures.md: What a bad input costs): one bad image costs one error row.",
    "skipped": "listed images the run did not label because an earlier run had (incremental runs).",
    "wall": "the run's wall time from start to manifest (minutes), over its last attempt.",
    "speed": "images/s: rows written by the run's last attempt divided by its labelling time.",
    "method": "segmentation method (clipdiy or naclip), and the precision the model ran in.",
    "model": "model fingerprint: the first 12 hex digits of a hash of the model columns of the rows "
             f"({', '.join(MODEL_COLUMNS)}); a change of model is a dashed line on the plots.",
    "pixel share": "a class's pixels over all pixels of the night's ok images (background included).",
    "images won": "share of the night's ok images whose largest non-background mask is the class "
                  "(background wins an image with no other class).",
    "drift": "a class is called out on a night when its share differs from the median of the previous "
             "nights' shares by more than the threshold (percentage points).",
    "mask score": "a mask's score: the mean class probability over the mask's pixels (model resolution).",
    "image score": "an image's score: the area-weighted mean of its masks' scores; the lowest are shown below.",
    "foreground": "foreground fraction: the mean of the soft foreground map (clipdiy: the saliency map; "
                  "naclip: 1 - background probability).",
}


def _meaning(key: str) -> str:
    return f'<p class="m"><b>{html.escape(key)}</b>: {html.escape(MEANINGS[key])}</p>'


def _img(data: str, alt: str, *meanings: str) -> str:
    """A plot with the lines saying what it shows (``meanings``: keys of :data:`MEANINGS` or text)."""
    caption = "".join(_meaning(m) if m in MEANINGS else f'<p class="m">{html.escape(m)}</p>' for m in meanings)
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"><figcaption>{caption}</figcaption></figure>'


def _glance(data: ReportData, threshold: str) -> str:
    """One line on the latest night, against the one before."""
    last = data.nights[-1]
    moves = [d for d in data.drifts if d.night == len(data.nights) - 1]
    errors = last.rows - last.ok
    text = (f"Latest night {last.run_id} ({last.started_at[:16].replace('T', ' ')}): {last.ok} images labelled, "
            f"{errors} error rows ({100 * errors / max(1, last.rows):.1f}%), "
            f"{last.timings.get('images_per_second', '?')} images/s, "
            + (f"model {last.model}" if last.labelled else "no model (nothing labelled)"))
    if model_changes(data.nights)[-1]:
        text += " (changed)"
    text += f"; {len(moves)} class moves over {threshold} points."
    return f'<p id="glance" class="glance">{html.escape(text)}</p>'


def _redact_sources(source: str) -> str:
    """The outputs as the page names them: each without credentials."""
    return ", ".join(Location(part.strip()).public for part in source.split(",")) if source else source


def _corrections_note(data: ReportData) -> str:
    if not data.corrections:
        return ""
    return f" (and {data.corrections} human-correction run{'s' if data.corrections > 1 else ''}, not nights)"


def render_html(data: ReportData, config: ReportConfig = ReportConfig(), storage: StorageOptions | None = None,
                source: str = "") -> str:
    """The page (a string); thumbnails are read and rendered here."""
    e = html.escape
    nights = data.nights
    head = ["night (started)", "run", "seen", "ok", "errors", "skipped", "wall (min)", "images/s", "method",
            "precision", "model"]
    keys = ["started", "run", "seen", "ok", "errors", "skipped", "wall", "speed", "method", "precision", "model"]
    table_rows = []
    changes = model_changes(nights)
    for i, n in enumerate(nights):
        errors = ", ".join(f"{k} {v}" for k, v in sorted(n.errors.items())) or "0"
        changed = changes[i]
        cells = [n.started_at, n.run_id, n.rows, n.ok, errors, n.counts.get("skipped", ""),
                 f"{float(n.timings.get('total', 0) or 0) / 60:.1f}", n.timings.get("images_per_second", ""),
                 n.model_value("method"), n.model_value("precision"), n.model + (" (changed)" if changed else "")]
        table_rows.append(f'<tr data-run="{e(n.run_id)}">' + "".join(
            f'<td class="{"t" if j in (0, 1, 4, 8, 9, 10) else ""}" data-k="{keys[j]}">{e(str(c))}</td>'
            for j, c in enumerate(cells)) + "</tr>")
    night_table = (f'<table id="nights"><tr>{"".join(f"<th>{e(h)}</th>" for h in head)}</tr>{"".join(table_rows)}</table>'
                   + "".join(_meaning(k) for k in ("seen", "ok", "errors", "skipped", "wall", "speed", "method", "model")))

    shares = _by_name(nights, data.class_names, "pixel_share")
    wins = _by_name(nights, data.class_names, "class_wins")
    class_head = "<tr><th>class</th>" + "".join(f"<th>{e(_night_label(n))}</th>" for n in nights) + "</tr>"
    class_rows = []
    for c, name in enumerate(data.class_names):
        if not shares[:, c].any() and not wins[:, c].any():
            continue
        class_rows.append(f'<tr data-class="{e(name)}"><td class="t">{e(name)}</td>' + "".join(
            f'<td data-run="{e(nights[i].run_id)}">{100 * shares[i, c]:.2f}% / {int(wins[i, c])}</td>'
            for i in range(len(nights))) + "</tr>")
    drift_items = "".join(
        f'<li class="drift" data-run="{e(d.run_id)}" data-class="{e(d.class_name)}" data-measure="{e(d.measure)}">{e(d.run_id)}: <b>{e(d.class_name)}</b> {e(d.measure)} {100 * d.value:.1f}% against '
        f'a median of {100 * d.median:.1f}% over the previous nights{" (the model changed that night)" if d.model_changed else ""}</li>'
        for d in data.drifts) or "<li>none</li>"

    lows = []
    for row in data.lowest:
        picture = _thumbnail(row, config, storage)
        body = (f'<img alt="{e(row["image_id"])}" src="data:image/png;base64,{picture}">' if picture
                else "<i>source image unreadable now</i>")
        lows.append(f'<div class="low" data-image-id="{e(row["image_id"])}">{body}<br>{e(row["image_id"])}<br>'
                    f'score {row["image_score"]:.3f} · run {e(row["run_id"])}</div>')

    threshold = f"{100 * config.drift_threshold:g}"
    sections = [
        f"<h1>clipdiy run report</h1><p>{e(_redact_sources(source))}: {len(nights)} finished runs, {data.rows} rows "
        f"in {data.shards} shards{_corrections_note(data)}, read in <span id=\"seconds\">{data.seconds:.1f}</span> s "
        f"({data.cached} runs from the cache under OUTPUT/_report, {data.shards_read} shards read; "
        f"generated {dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds')}).</p>",
        _glance(data, threshold),
        "<h2>Nights</h2>", night_table,
        '<div class="grid">',
        _img(plot_images(nights), "images per night",
             "Bars: ok and error rows each night; line: images skipped because earlier runs labelled them."),
        _img(plot_errors(nights), "errors by kind", "errors"),
        _img(plot_speed(nights), "speed", "speed", "wall"),
        "</div><h2>Classes</h2><div class=\"grid\">",
        _img(plot_classes(data, config, "pixel_share", "pixel share", "pixel share (%)"), "pixel share per class",
             "pixel share"),
        _img(plot_classes(data, config, "win_share", "images won", "images won (% of ok images)"), "images won per class",
             "images won"),
        "</div>",
        f"<h3>Moved by more than {threshold} points (red circles)</h3><ul id=\"drifts\">{drift_items}</ul>", _meaning("drift"),
        f'<table id="classes">{class_head}{"".join(class_rows)}</table>'
        '<p class="m">Each cell: pixel share / images won that night.</p>',
        "<h2>Scores</h2><div class=\"grid\">",
        _img(plot_histogram(data, "mask_score_hist", "mask score"), "mask scores", "mask score"),
        _img(plot_histogram(data, "image_score_hist", "image score"), "image scores", "image score"),
        _img(plot_histogram(data, "foreground_hist", "foreground fraction"), "foreground fraction", "foreground"),
        "</div>",
        f"<h2>The {len(lows)} lowest-scoring images of the newest night</h2>"
        '<p class="m">Overlay | saliency | classes with mask score and area (the previews\' rendering); '
        "lowest image score first, among the rows of the newest night that labelled something (and of "
        "the runs since) that count today (the latest write of each image).</p>",
        f'<div id="lowest">{"".join(lows)}</div>',
    ]
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>clipdiy run report</title>"
            f"<style>{_STYLE}</style><script>{_SCRIPT}</script></head><body>{''.join(sections)}"
            '<p id="shown"></p></body></html>\n')


def write_report(outputs: str | Sequence[str], destination: str, config: ReportConfig = ReportConfig(),
                 storage: StorageOptions | None = None) -> ReportData:
    """Collect, render and write the page to ``destination`` (any fsspec URI). Returns the data."""
    from clipdiy.storage import open_filesystem

    data = collect(outputs, config, storage)
    page = render_html(data, config, storage, source=outputs if isinstance(outputs, str) else ", ".join(outputs))
    fs, path = open_filesystem(destination, storage)
    fs.pipe_file(path, page.encode("utf-8"))
    return data
