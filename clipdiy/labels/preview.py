"""Pictures of a labels output that people can look at.

For each chosen image, one PNG: the photo with its label map overlaid in the VOC class palette
(background pixels are left untinted so the photo stays readable; other classes are blended with
``alpha``), the soft saliency map beside it (white = foreground), and a legend of the present
classes with their mask scores and areas. A contact sheet puts a sample of the overlays on one
grid. A static HTML page (no network assets, plain JS) lists every chosen image with its status,
confidence (pixel-weighted mean of its mask scores), per-class scores, foreground fraction, the
error of an error row and, given an evaluation report, its mIoU against ground truth; clicking a
column header sorts by it, and the page opens sorted worst first.
"""

from __future__ import annotations

import html
import io
import math
import posixpath
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from PIL import Image, ImageDraw, ImageFont

from clipdiy.labels.ground_truth import resize_nearest
from clipdiy.labels.palette import class_colour, colorize
from clipdiy.labels.row_index import RowIndex, build_row_index
from clipdiy.labels.runs import list_runs, read_shard
from clipdiy.labels.store import decode_label_map, decode_saliency, load_image
from clipdiy.storage import StorageOptions, open_filesystem

GAP = 4
LINE = 18
CAPTION = 16


@dataclass(frozen=True)
class PreviewConfig:
    """``size``: longer side of each panel (px); ``alpha``: mask opacity over the photo;
    ``legend_width`` (px); ``sample``: images on the contact sheet, ``tile``: their cell size;
    ``limit``: at most this many images get a picture and a row on the page (a seeded sample
    when there are more); ``seed`` drives both samples."""

    size: int = 384
    alpha: float = 0.5
    legend_width: int = 240
    sample: int = 16
    tile: int = 192
    limit: int = 500
    seed: int = 0


def _font(size: int = 13) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def panel_size(height: int, width: int, size: int) -> tuple[int, int]:
    """(h, w) of a panel: the image scaled so its longer side is ``size``."""
    scale = size / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def overlay(image: np.ndarray, label: np.ndarray, alpha: float) -> np.ndarray:
    """H x W x 3 uint8 photo with the non-background classes of an H x W label map blended in."""
    colours = colorize(label).astype(np.float32)
    blended = np.rint((1 - alpha) * image.astype(np.float32) + alpha * colours).astype(np.uint8)
    return np.where((label != 0)[..., None], blended, image)


def legend_entries(row: dict) -> list[tuple[int, str, float, float]]:
    """(class id, name, mask score, area fraction) of each present class, largest first."""
    total = max(1, int(row["width"]) * int(row["height"]))
    entries = [(int(m["class_id"]), m["class_name"], float(m["score"]), int(m["area"]) / total) for m in row["masks"] or []]
    return sorted(entries, key=lambda e: -e[3])


def render_image(row: dict, image: np.ndarray, config: PreviewConfig = PreviewConfig()) -> Image.Image:
    """One ok row as a picture: overlay | saliency | legend (see :func:`preview_size`)."""
    label = decode_label_map(row)
    ph, pw = panel_size(*label.shape, config.size)
    photo = np.asarray(Image.fromarray(image).resize((pw, ph), Image.BILINEAR))
    blended = overlay(photo, resize_nearest(label, (ph, pw)), config.alpha)
    saliency = decode_saliency(row.get("saliency_png"), (ph, pw))
    entries = legend_entries(row)
    width, height = preview_size(label.shape, len(entries), config)
    canvas = Image.new("RGB", (width, height), "white")
    canvas.paste(Image.fromarray(blended), (0, 0))
    if saliency is not None:
        canvas.paste(Image.fromarray(np.rint(saliency * 255).astype(np.uint8)).convert("RGB"), (pw + GAP, 0))
    else:
        ImageDraw.Draw(canvas).text((pw + GAP + 8, 8), "no saliency", fill="black", font=_font())
    draw = ImageDraw.Draw(canvas)
    x0 = 2 * (pw + GAP)
    draw.text((x0 + 4, 2), "class  score  area", fill="black", font=_font())
    for index, (class_id, name, score, area) in enumerate(entries):
        y = LINE * (index + 1) + 2
        draw.rectangle((x0 + 4, y + 2, x0 + 16, y + 14), fill=class_colour(class_id), outline="black")
        draw.text((x0 + 22, y), f"{name[:18]}  {score:.2f}  {100 * area:.0f}%", fill="black", font=_font())
    return canvas


def preview_size(label_shape: tuple[int, int], classes: int, config: PreviewConfig) -> tuple[int, int]:
    """(width, height) of :func:`render_image`'s picture for an image of ``label_shape`` (H, W)."""
    ph, pw = panel_size(*label_shape, config.size)
    return 2 * (pw + GAP) + config.legend_width, max(ph, LINE * (classes + 1) + 4)


def contact_sheet(tiles: Sequence[tuple[str, Image.Image]], config: PreviewConfig = PreviewConfig()) -> Image.Image:
    """Overlay thumbnails on a grid (``ceil(sqrt(n))`` columns), each in a ``tile`` x ``tile`` cell
    (centred, aspect kept) with its image id below."""
    count = max(1, len(tiles))
    columns = math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    sheet = Image.new("RGB", (columns * config.tile, rows * (config.tile + CAPTION)), "white")
    draw = ImageDraw.Draw(sheet)
    for index, (name, picture) in enumerate(tiles):
        x, y = (index % columns) * config.tile, (index // columns) * (config.tile + CAPTION)
        thumb = picture.copy()
        thumb.thumbnail((config.tile, config.tile), Image.BILINEAR)
        sheet.paste(thumb, (x + (config.tile - thumb.width) // 2, y + (config.tile - thumb.height) // 2))
        draw.text((x + 2, y + config.tile + 1), name[-28:], fill="black", font=_font(11))
    return sheet


def _confidence(row: dict) -> float | None:
    masks = row.get("masks") or []
    area = sum(int(m["area"]) for m in masks)
    return sum(float(m["score"]) * int(m["area"]) for m in masks) / area if area else None


def _file_name(index: int, image_id: str) -> str:
    return f"{index:05d}-{re.sub(r'[^A-Za-z0-9._-]+', '_', posixpath.splitext(posixpath.basename(image_id))[0])[:60]}.png"


def _png(picture: Image.Image) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def chosen_rows(index: RowIndex, config: PreviewConfig) -> list[dict]:
    """The rows a preview shows, in ``image_id`` order: every winning row, or a seeded sample of
    ``config.limit`` of them. Only the chosen rows are read (their shards, one at a time)."""
    count = len(index.sorted_positions)
    chosen = np.arange(count)
    if count > config.limit:
        # The same draw as sampling the sorted rows themselves: sample() picks by index.
        chosen = np.sort(np.asarray(random.Random(config.seed).sample(range(count), config.limit), dtype=np.int64))
    rows: list[dict | None] = [None] * len(chosen)
    for shard, row_numbers, slots in index.by_shard(index.sorted_positions[chosen]):
        run, path = index.shards[shard]
        for slot, row in zip(slots.tolist(), read_shard(run, path).take(pa.array(row_numbers)).to_pylist()):
            rows[slot] = row
    return rows


def render_output(
    labels: str | Sequence[str], destination: str, config: PreviewConfig = PreviewConfig(), *,
    evaluation_report: dict | None = None, finished_only: bool = True, storage: StorageOptions | None = None,
) -> dict:
    """Render a labels output into ``destination`` (any fsspec URI): ``images/*.png``,
    ``contact_sheet.png`` and ``index.html``. Returns a summary (counts, and the entries listed)."""
    runs = list_runs(labels, finished_only=finished_only, storage=storage)
    if not runs:
        raise FileNotFoundError(f"no {'finished ' if finished_only else ''}runs in {labels}")
    rows = chosen_rows(build_row_index(runs, sort_by_id=True), config)
    miou = {i["image_id"]: i["miou"] for i in (evaluation_report or {}).get("images", [])}
    fs, root = open_filesystem(destination, storage)
    fs.makedirs(posixpath.join(root, "images"), exist_ok=True)
    entries, tiles = [], []
    for index, row in enumerate(rows):
        entry = {"image_id": row["image_id"], "uri": row["uri"], "status": row["status"], "picture": None,
                 "confidence": _confidence(row), "foreground": row.get("foreground_fraction"),
                 "classes": [(name, score) for _, name, score, _ in legend_entries(row)] if row["status"] == "ok" else [],
                 "miou": miou.get(row["image_id"]), "error": row.get("error") and f"{row.get('error_kind')}: {row['error']}"}
        if row["status"] == "ok":
            try:
                image = load_image(row, storage)  # by the row's address: one ranged read
            except (OSError, ValueError) as error:  # the source moved or broke since labelling: show it, go on
                entry["error"] = f"source image unreadable now: {error}"
            else:
                picture = render_image(row, image, config)
                entry["picture"] = f"images/{_file_name(index, row['image_id'])}"
                fs.pipe_file(posixpath.join(root, entry["picture"]), _png(picture))
                ph, pw = panel_size(int(row["height"]), int(row["width"]), config.size)
                tiles.append((row["image_id"], picture.crop((0, 0, pw, ph))))
        entries.append(entry)
    if tiles:
        chosen = sorted(random.Random(config.seed).sample(range(len(tiles)), min(config.sample, len(tiles))))
        fs.pipe_file(posixpath.join(root, "contact_sheet.png"), _png(contact_sheet([tiles[i] for i in chosen], config)))
    fs.pipe_file(posixpath.join(root, "index.html"), html_page(entries, sort_by="miou" if miou else "confidence").encode())
    return {"listed": len(entries), "pictures": len(tiles), "errors": sum(e["error"] is not None for e in entries),
            "contact_sheet": min(config.sample, len(tiles)), "entries": entries}


_SCRIPT = """
function sortBy(col, numeric) {
  const body = document.querySelector('#labels tbody');
  const rows = Array.from(body.rows);
  const th = document.querySelectorAll('#labels th')[col];
  const dir = th.dataset.dir === 'asc' ? -1 : 1;
  document.querySelectorAll('#labels th').forEach(h => delete h.dataset.dir);
  th.dataset.dir = dir === 1 ? 'asc' : 'desc';
  const key = r => r.cells[col].dataset.v;
  rows.sort((a, b) => {
    const x = key(a), y = key(b);
    if (numeric) {
      const p = x === '' ? Infinity : parseFloat(x), q = y === '' ? Infinity : parseFloat(y);
      return p === q ? 0 : (p < q ? -dir : dir);
    }
    return dir * x.localeCompare(y);
  });
  rows.forEach(r => body.appendChild(r));
}
document.addEventListener('DOMContentLoaded', () => {
  document.querySelectorAll('#labels th').forEach((th, i) =>
    th.addEventListener('click', () => sortBy(i, th.dataset.numeric === '1')));
  const first = document.querySelector('#labels th[data-default]');
  if (first) sortBy(Array.from(first.parentNode.children).indexOf(first), true);
});
window.addEventListener('load', () => {
  const pictures = Array.from(document.querySelectorAll('#labels img'));
  const shown = pictures.filter(p => p.complete && p.naturalWidth > 0).length;
  document.getElementById('shown').textContent = shown + ' of ' + pictures.length + ' pictures shown';
});
"""


def _cell(value, text: str | None = None) -> str:
    data = "" if value is None else (f"{value:.6f}" if isinstance(value, float) else str(value))
    return f'<td data-v="{html.escape(data)}">{text if text is not None else html.escape(data)}</td>'


def html_page(entries: Sequence[dict], sort_by: str = "confidence") -> str:
    """The static page listing ``entries`` (see :func:`render_output`), sorted worst first."""
    columns = [("picture", "preview", False), ("image_id", "image", False), ("status", "status", False),
               ("confidence", "confidence", True), ("miou", "mIoU vs GT", True), ("foreground", "foreground", True),
               ("classes", "classes (mask score)", False), ("error", "error", False)]
    head = "".join(
        f'<th data-numeric="{1 if numeric else 0}"{" data-default" if key == sort_by else ""}>{html.escape(title)}</th>'
        for key, title, numeric in columns)
    body = []
    for e in entries:
        picture = (f'<a href="{html.escape(e["picture"])}"><img src="{html.escape(e["picture"])}" '
                   f'alt="{html.escape(e["image_id"])}"></a>') if e["picture"] else ""
        classes = ", ".join(f"{html.escape(n)} {s:.2f}" for n, s in e["classes"])
        body.append(
            f'<tr class="{html.escape(e["status"])}" data-image-id="{html.escape(e["image_id"])}">'
            + _cell(e["picture"] or "", picture) + _cell(e["image_id"]) + _cell(e["status"])
            + _cell(e["confidence"], "" if e["confidence"] is None else f"{e['confidence']:.3f}")
            + _cell(e["miou"], "" if e["miou"] is None else f"{e['miou']:.1f}")
            + _cell(e["foreground"], "" if e["foreground"] is None else f"{e['foreground']:.2f}")
            + _cell(classes, classes) + _cell(e["error"] or "") + "</tr>")
    style = ("body{font-family:sans-serif;margin:1em}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
             "padding:4px;vertical-align:top}th{cursor:pointer;background:#eee}th[data-dir=asc]::after{content:' \\25B2'}"
             "th[data-dir=desc]::after{content:' \\25BC'}img{max-width:480px}tr.error{background:#fdd}")
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>clipdiy labels preview</title>"
            f"<style>{style}</style><script>{_SCRIPT}</script></head><body>"
            f"<h1>clipdiy labels preview</h1><p>{len(entries)} images; click a column to sort. "
            "<a href=\"contact_sheet.png\">contact sheet</a> <span id=\"shown\"></span></p>"
            f'<table id="labels"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'
            "</body></html>\n")
