"""The report's pictures: TensorBoard scalars read without TensorFlow, and matplotlib / Pillow plots.

``read_scalars`` parses event files with TensorBoard's protos (the trainer image is not needed to
build a report); every plot is written as a PNG with no timestamp, so a rebuild is byte-identical.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tasks.evaluate import SHORT_METRICS, is_num
from tasks.logs import log

MAP, MAP50, MAP75 = SHORT_METRICS["mAP"], SHORT_METRICS["mAP@.50IOU"], SHORT_METRICS["mAP@.75IOU"]
SAMPLE_SCORE_THRESHOLD = 0.3
MAX_SAMPLES = 8
LOSS_TAGS = ("Loss/classification_loss", "Loss/localization_loss", "Loss/regularization_loss",
             "Loss/total_loss", "learning_rate")
CLASS_COLOURS = {"person": (230, 57, 70), "car": (29, 114, 243)}
OTHER_COLOURS = [(42, 157, 143), (244, 162, 97), (131, 56, 236), (255, 190, 11), (58, 134, 255)]
PNG_METADATA = {"Software": None}


def _mpl_text(s: Any) -> str:
    """Text for matplotlib: no mathtext from the data."""
    return str(s).replace("$", r"\$")


def _grid(n: int, width: float, height: float):
    from matplotlib.figure import Figure

    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(width * cols, height * rows), dpi=100, layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat)[:n]


# --------------------------------------------------------------------------- TensorBoard scalars


def _iter_records(path: Path) -> Iterator[bytes]:
    """Records of a TFRecord-framed event file; stops at a truncated or corrupt tail."""
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

    with open(path, "rb") as f:
        while True:
            header = f.read(8)
            if len(header) < 8:
                return
            crc = f.read(4)
            if len(crc) < 4 or struct.unpack("<I", crc)[0] != masked_crc32c(header):
                log.warning("%s: corrupt record header, reading stops there", path)
                return
            (n,) = struct.unpack("<Q", header)
            data = f.read(n)
            if len(data) < n or len(f.read(4)) < 4:
                log.warning("%s: truncated last record (file still being written?)", path)
                return
            yield data


def read_scalars(train_dir: str | Path) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """Scalars of every TensorBoard event file under ``train_dir``: ``{subdir: {tag: [(step, value)]}}``.

    Reads both TF1-style ``simple_value`` summaries and TF2 ``tf.summary.scalar`` tensor summaries
    with TensorBoard's protos, without importing TensorFlow. Sub-folder ``train/`` gives run
    ``"train"``, files directly in ``train_dir`` give ``"."``. A step logged twice (a resumed run)
    keeps its last value.
    """
    from tensorboard.compat.proto import event_pb2
    from tensorboard.util import tensor_util

    train_dir = Path(train_dir)
    files = sorted(p for p in train_dir.rglob("*") if p.is_file() and "tfevents" in p.name)
    runs: dict[str, dict[str, dict[int, float]]] = {}
    for path in files:
        run = path.parent.relative_to(train_dir).as_posix()
        plugins: dict[str, str] = {}
        tags = runs.setdefault(run, {})
        for rec in _iter_records(path):
            try:
                ev = event_pb2.Event.FromString(rec)
            except Exception:  # a damaged record is skipped, not fatal
                continue
            if not ev.HasField("summary"):
                continue
            for v in ev.summary.value:
                if v.metadata.plugin_data.plugin_name:
                    plugins[v.tag] = v.metadata.plugin_data.plugin_name
                kind = v.WhichOneof("value")
                if kind == "simple_value":
                    value = float(v.simple_value)
                elif kind == "tensor" and plugins.get(v.tag, "scalars") == "scalars":
                    try:
                        arr = tensor_util.make_ndarray(v.tensor)
                    except Exception:  # not a number tensor
                        continue
                    if arr.size != 1 or arr.dtype.kind not in "fiub":
                        continue
                    value = float(arr.reshape(-1)[0])
                else:
                    continue
                tags.setdefault(v.tag, {})[int(ev.step)] = value
    return {run: {tag: sorted(points.items()) for tag, points in tags.items()}
            for run, tags in runs.items() if tags}


def _loss_tags(scalars: dict[str, dict[str, list[tuple[int, float]]]]) -> list[str]:
    present = {t for tags in scalars.values() for t in tags}
    ordered = [t for t in LOSS_TAGS if t in present]
    ordered += sorted(t for t in present if t not in ordered and "loss" in t.lower())
    return ordered[:9]


def _ema(values: list[float], weight: float = 0.6) -> list[float]:
    out, last = [], None
    for v in values:
        last = v if last is None else weight * last + (1 - weight) * v
        out.append(last)
    return out


def plot_losses(scalars: dict[str, dict[str, list[tuple[int, float]]]], path: Path) -> bool:
    tags = _loss_tags(scalars)
    if not tags:
        return False
    fig, axes = _grid(len(tags), 4.2, 3.0)
    colours = ["#1d72f3", "#e63946", "#2a9d8f", "#f4a261"]
    for ax, tag in zip(axes, tags, strict=True):
        for i, (run, series) in enumerate(sorted(scalars.items())):
            if tag not in series:
                continue
            steps, values = [s for s, _ in series[tag]], [v for _, v in series[tag]]
            c, label = colours[i % len(colours)], _mpl_text(run if run != "." else "train")
            if len(values) > 10 and "loss" in tag.lower():  # the schedule is drawn as it is
                ax.plot(steps, values, color=c, alpha=0.3, linewidth=1)
                ax.plot(steps, _ema(values), color=c, linewidth=2, label=label)
            else:
                ax.plot(steps, values, color=c, linewidth=2, marker="o", markersize=3, label=label)
        ax.set_title(_mpl_text(tag), fontsize=10)
        ax.set_xlabel("step", fontsize=9)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
        if len(scalars) > 1:
            ax.legend(fontsize=8)
    fig.savefig(path, format="png", metadata=PNG_METADATA)
    return True


def _pr_points(c: dict[str, Any]) -> tuple[list[float], list[float]] | None:
    """A curve's recall and precision up to the recall it reached; None where there is nothing to draw."""
    if not c.get("has_ground_truth") or not c.get("precision"):
        return None
    pts = [(r, p) for r, p in zip(c["recall"], c["precision"], strict=False)
           if r <= c.get("max_recall", 1.0) + 1e-9] or [(0.0, 0.0)]
    return [r for r, _ in pts], [p for _, p in pts]


def _pr_panel(ax: Any, title: str, legend_loc: str) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc=legend_loc)
    ax.set(xlim=(0, 1.0), ylim=(0, 1.02))
    ax.set_xlabel("recall", fontsize=9)
    ax.set_ylabel("precision", fontsize=9)
    ax.set_title(_mpl_text(title), fontsize=10)
    ax.grid(alpha=0.3)
    ax.tick_params(labelsize=8)


def plot_pr_curves(curves: dict[str, Any], path: Path) -> bool:
    classes = curves.get("classes") or {}
    if not classes:
        return False
    fig, axes = _grid(len(classes), 4.4, 3.6)
    for ax, (name, entry) in zip(axes, classes.items(), strict=True):
        for key, colour, style in (("iou_0.50", "#1d72f3", "-"), ("iou_0.75", "#e63946", "--")):
            c = entry.get(key) or {}
            if (xy := _pr_points(c)) is None:
                continue
            ap = c.get("ap")
            ax.plot(*xy, style, color=colour, linewidth=2,
                    label=f"IoU {c.get('iou', key[-4:])}: AP {ap:.3f}" if is_num(ap) else f"IoU {key[-4:]}")
        if not ax.lines:
            ax.text(0.5, 0.5, "no ground truth", ha="center", va="center", transform=ax.transAxes)
        _pr_panel(ax, name, "best")  # the legend clear of the curves
    fig.savefig(path, format="png", metadata=PNG_METADATA)
    return True


SWEEP_COLOURS = ["#1d72f3", "#e63946", "#2a9d8f", "#f4a261", "#8338ec", "#6c757d", "#ffbe0b", "#3a86ff"]


def plot_sweep_pr(curves: dict[str, dict[str, Any]], path: Path, key: str = "iou_0.50") -> bool:
    """One figure for a sweep: a panel per class, a line per candidate (precision/recall at IoU .50)."""
    classes = list(dict.fromkeys(c for doc in curves.values() for c in (doc.get("classes") or {})))
    if not classes:
        return False
    fig, axes = _grid(len(classes), 4.8, 3.8)
    for ax, cls in zip(axes, classes, strict=True):
        for i, (name, doc) in enumerate(curves.items()):
            c = ((doc.get("classes") or {}).get(cls) or {}).get(key) or {}
            if (xy := _pr_points(c)) is None:
                continue
            ap = c.get("ap")
            ax.plot(*xy, color=SWEEP_COLOURS[i % len(SWEEP_COLOURS)],
                    linewidth=2, label=_mpl_text(f"{name}: AP {ap:.3f}" if is_num(ap) else name))
        _pr_panel(ax, f"{cls} (IoU {key[-4:]})", "upper right")
    fig.savefig(path, format="png", metadata=PNG_METADATA)
    return True


def plot_validation(history: list[dict[str, Any]], best_step: int | None, path: Path) -> bool:
    """mAP and mAP@.50IOU on the val split against the training step; the exported step marked."""
    points = sorted((h for h in history if isinstance(h, dict) and is_num(h.get("step"))), key=lambda h: h["step"])
    if not points:
        return False
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 3.4), dpi=100, layout="tight")
    ax = fig.subplots()
    steps = [h["step"] for h in points]
    for key, label in ((MAP50, "mAP@.50IOU"), (MAP, "mAP@[.50:.95]"), (MAP75, "mAP@.75IOU")):
        ax.plot(steps, [h.get(key, float("nan")) for h in points], marker="o", ms=3, label=label)
    if best_step is not None:
        ax.axvline(best_step, color="#444", ls="--", lw=1, label=f"exported (step {best_step:,})")
    ax.set(xlabel="training step", ylabel="val split", ylim=(0, 1))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.savefig(path, format="png", metadata=PNG_METADATA)
    return True


# --------------------------------------------------------------------------- sample detections


def class_colours(categories: list[dict[str, Any]]) -> dict[int, tuple[int, int, int]]:
    out, spare = {}, iter(OTHER_COLOURS * 10)
    for c in sorted(categories, key=lambda c: c["id"]):
        out[c["id"]] = CLASS_COLOURS.get(str(c.get("name", "")).lower()) or next(spare)
    return out


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType sizes
        return ImageFont.load_default()


def _sample_images(gt: dict[str, Any], images_dir: Path, max_images: int) -> list[tuple[dict, Path]]:
    """Up to ``max_images`` val images that exist inside ``images_dir``, by image id."""
    root, chosen = images_dir.resolve(), []
    for img in sorted(gt.get("images", []), key=lambda i: (0, i["id"], "") if isinstance(i.get("id"), int)
                      else (1, 0, str(i.get("id")))):
        fname = str(img.get("file_name", ""))
        p = (images_dir / fname).resolve()
        if fname and p.is_relative_to(root) and p.is_file():
            chosen.append((img, p))
        if len(chosen) >= max_images:
            break
    return chosen


def _thumbnail(img: dict[str, Any], p: Path, cell: tuple[int, int]):
    from PIL import Image

    with Image.open(p) as im:
        im.draft("RGB", cell)
        w0, h0 = float(img.get("width") or im.size[0]), float(img.get("height") or im.size[1])
        scale = min(cell[0] / w0, cell[1] / h0)
        size = (max(1, round(w0 * scale)), max(1, round(h0 * scale)))
        return im.convert("RGB").resize(size, Image.Resampling.BILINEAR), scale


def draw_samples(gt: dict[str, Any], detections: list[dict[str, Any]], images_dir: Path, path: Path,
                 *, score_threshold: float = SAMPLE_SCORE_THRESHOLD, max_images: int = MAX_SAMPLES,
                 cell: tuple[int, int] = (320, 240)) -> list[dict[str, Any]]:
    """Draw detections (score >= threshold, colour per class) and the ground truth (thin white) on up to
    ``max_images`` val images, as one grid PNG. Returns what was drawn, per image."""
    from PIL import Image, ImageDraw

    chosen = _sample_images(gt, images_dir, max_images)
    if not chosen:
        return []
    names = {c["id"]: str(c.get("name", c["id"])) for c in gt.get("categories", [])}
    colours = class_colours(gt.get("categories", []))
    gts: dict[Any, list] = {}
    dets: dict[Any, list] = {}
    for a in gt.get("annotations", []):
        gts.setdefault(a.get("image_id"), []).append(a)
    for d in detections:
        if isinstance(d, dict) and is_num(d.get("score")) and d["score"] >= score_threshold:
            dets.setdefault(d.get("image_id"), []).append(d)
    (cw, ch), caption_h = cell, 18
    cols = min(4, len(chosen))
    grid = Image.new("RGB", (cols * cw, math.ceil(len(chosen) / cols) * (ch + caption_h)), (32, 36, 42))
    font, small = _font(12), _font(10)
    drawn = []
    for img, p in chosen:
        try:
            thumb, scale = _thumbnail(img, p, cell)
        except (OSError, ValueError) as e:
            log.warning("%s: cannot be drawn (%s)", p, e)
            continue
        draw = ImageDraw.Draw(thumb)
        for a in gts.get(img.get("id"), []):
            x, y, w, h = (float(v) * scale for v in a["bbox"])
            draw.rectangle([x, y, x + w, y + h], outline=(255, 255, 255), width=1)
        own = sorted(dets.get(img.get("id"), []), key=lambda d: d["score"])
        for d in own:
            x, y, w, h = (float(v) * scale for v in d["bbox"])
            colour = colours.get(d.get("category_id"), (255, 255, 255))
            draw.rectangle([x, y, x + w, y + h], outline=colour, width=3)
            label = f"{names.get(d.get('category_id'), d.get('category_id'))} {d['score']:.2f}"
            tx, ty = x + 2, max(0.0, y - 13)
            draw.rectangle(draw.textbbox((tx, ty), label, font=small), fill=colour)
            draw.text((tx, ty), label, fill=(255, 255, 255), font=small)
        r, c = divmod(len(drawn), cols)
        ox, oy = c * cw, r * (ch + caption_h)
        grid.paste(thumb, (ox + (cw - thumb.width) // 2, oy + (ch - thumb.height) // 2))
        caption = str(img.get("file_name"))
        caption = caption[:41] + "..." if len(caption) > 44 else caption
        ImageDraw.Draw(grid).text((ox + 4, oy + ch + 2), caption, fill=(230, 230, 230), font=font)
        drawn.append({"image_id": img.get("id"), "file_name": str(img.get("file_name")),
                      "detections": len(own), "ground_truth": len(gts.get(img.get("id"), []))})
    if drawn:
        grid.save(path, format="PNG", optimize=False)
    return drawn
