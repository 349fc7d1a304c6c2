"""The metrics report of a run: ``personcar report --run-dir DIR --out DIR``.

Reads a run folder (every part optional except ``evaluate/metrics.json``)::

    RUN/config.json                       run parameters
    RUN/download/download_manifest.json   source, sha256, size, image count
    RUN/validate/validation.json          validation outcome (+ RUN/validate/data_docs/index.html)
    RUN/tfrecords/manifest.json           split counts
    RUN/tfrecords/val.coco.json           val ground truth (for the sample detections)
    RUN/download/trainval/images/         the images (for the sample detections)
    RUN/train/**/events.out.tfevents.*    TensorBoard scalars (loss curves)
    RUN/train/train_summary.json          steps, seconds, images/s, final losses, start, exported step
    RUN/train/validation.json             validation during training (the curve, the best step)
    RUN/validate/anchor_coverage.json     share of boxes the anchors can match
    RUN/evaluate/metrics.json, pr_curves.json, error_analysis.json, detections.json

and writes ``OUT/report.html`` (self-contained: inline CSS, plots as PNG data URIs, no script, no
external request), ``OUT/report.md`` (plots beside it), ``OUT/metrics.json`` (a copy) and the plots
``loss_curves.png``, ``pr_curves.png``, ``sample_detections.png``. A missing part is reported as
"not available". Every string that comes from the data is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import json
import math
import shutil
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

from tasks.artifacts import StageOutputs, atomic_dir, check_output_dir
from tasks.evaluate import load_metrics
from tasks.logs import log

GENERATOR = '<meta name="generator" content="personcar report">'
OUTPUTS = StageOutputs("report", "report.html", text=GENERATOR,
                       names=("report.html", "report.md", "metrics.json", "loss_curves.png", "pr_curves.png",
                              "sample_detections.png", "validation_curve.png", "data_docs"))

MAP = "DetectionBoxes_Precision/mAP"
MAP50 = "DetectionBoxes_Precision/mAP@.50IOU"
MAP75 = "DetectionBoxes_Precision/mAP@.75IOU"

#: The seed's published result (SSD ResNet152 V1, TF OD API, 10k steps).
BASELINE: dict[str, float] = {MAP50: 0.038, MAP75: 0.0042}
BASELINE_LABEL = "seed baseline (SSD ResNet152 V1 FPN, TF OD API, 10k steps)"

SAMPLE_SCORE_THRESHOLD = 0.3
MAX_SAMPLES = 8
LOSS_TAGS = ("Loss/classification_loss", "Loss/localization_loss", "Loss/regularization_loss",
             "Loss/total_loss", "learning_rate")
CLASS_COLOURS = {"person": (230, 57, 70), "car": (29, 114, 243)}
OTHER_COLOURS = [(42, 157, 143), (244, 162, 97), (131, 56, 236), (255, 190, 11), (58, 134, 255)]
NOT_AVAILABLE = "not available"

CSS = """
body{font-family:-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:0;background:#f6f7f9;color:#1d2733}
main{max-width:1200px;margin:0 auto;padding:24px}
h1{font-size:26px;margin:0 0 4px}h2{font-size:20px;margin:32px 0 8px;border-bottom:2px solid #d8dde4;padding-bottom:4px}
h3{font-size:16px;margin:18px 0 6px}
table{border-collapse:collapse;margin:8px 0;font-size:14px}
th,td{border:1px solid #d8dde4;padding:4px 10px;text-align:left;vertical-align:top}
th{background:#eef1f5}td.num{text-align:right;font-variant-numeric:tabular-nums}
.na{color:#7a8694;font-style:italic}.better{color:#13795b}.worse{color:#b42318}
.verdict{padding:10px 14px;border-radius:6px;font-weight:600;margin:12px 0}
.promoted{background:#e3f6ec;border:1px solid #13795b}.held{background:#fdecea;border:1px solid #b42318}
.ok{color:#13795b;font-weight:600}.fail{color:#b42318;font-weight:600}
img.plot{max-width:100%;height:auto;border:1px solid #e1e5ea;background:#fff}
.swatch{display:inline-block;width:14px;height:14px;border-radius:2px;margin:0 4px -2px 10px}
.muted{color:#5b6775;font-size:13px}code{background:#eef1f5;padding:1px 4px;border-radius:3px}
"""
CSP = ("default-src 'none'; img-src data:; style-src 'unsafe-inline'; base-uri 'none'; "
       "form-action 'none'")


# --------------------------------------------------------------------------- small helpers


class Safe(str):
    """An HTML fragment built here from escaped parts; inserted as is."""


def esc(x: Any) -> str:
    """HTML-escape anything (quotes included)."""
    return x if isinstance(x, Safe) else html.escape(str(x), quote=True)


def md(x: Any) -> str:
    """Escape text for a Markdown table cell (no raw HTML, no cell breaks)."""
    s = html.escape(str(x), quote=False).replace("|", "\\|").replace("`", "\\`")
    return " ".join(s.split())


def fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        if v == -1.0:
            return "n/a"
        return f"{v:.{digits}f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


class Delta(str):
    """A signed difference; shown green when positive, red when negative."""


def fmt_delta(v: Any, ref: Any) -> str:
    if not (_is_num(v) and _is_num(ref)) or v == -1 or ref == -1:
        return ""
    return Delta(f"{v - ref:+.4f}")


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _mpl_text(s: Any) -> str:
    """Text for matplotlib: no mathtext from the data."""
    return str(s).replace("$", r"\$")


def _read_json(path: Path, notes: list[str]) -> Any | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        notes.append(f"{path.name}: unreadable ({e.__class__.__name__})")
        log.warning("%s: unreadable, shown as not available: %s", path, e)
        return None


def _flatten(d: Any, prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    if isinstance(d, dict):
        for k, v in d.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            if isinstance(v, dict) and v:
                out.extend(_flatten(v, key))
            else:
                out.append((key, v))
    return out


def _value_text(v: Any) -> str:
    if isinstance(v, (dict, list)):
        s = json.dumps(v, sort_keys=True)
        return s if len(s) <= 200 else s[:197] + "..."
    return fmt(v) if isinstance(v, bool) else str(v)


class Doc:
    """Builds the HTML and Markdown versions of the report side by side."""

    def __init__(self) -> None:
        self.html: list[str] = []
        self.md: list[str] = []

    def h(self, level: int, text: str, anchor: str | None = None) -> None:
        ident = f' id="{esc(anchor)}"' if anchor else ""
        self.html.append(f"<h{level}{ident}>{esc(text)}</h{level}>")
        self.md.append(f"\n{'#' * level} {md(text)}\n")

    def p(self, text: Any, cls: str | None = None, md_text: str | None = None) -> None:
        c = f' class="{cls}"' if cls else ""
        self.html.append(f"<p{c}>{esc(text)}</p>")
        self.md.append(f"{md_text if md_text is not None else md(text)}\n")

    def na(self, what: str) -> None:
        self.p(f"{what}: {NOT_AVAILABLE}", cls="na", md_text=f"_{md(what)}: {NOT_AVAILABLE}_")

    def raw(self, html_text: str, md_text: str = "") -> None:
        self.html.append(html_text)
        if md_text:
            self.md.append(md_text)

    def table(self, headers: list[str], rows: list[list[Any]], numeric: set[int] | None = None) -> None:
        numeric = numeric or set()
        head = "".join(f"<th>{esc(h)}</th>" for h in headers)
        body = []
        for r in rows:
            cells = []
            for i, c in enumerate(r):
                cls = []
                if i in numeric:
                    cls.append("num")
                text = c if isinstance(c, Safe) else (fmt(c) if not isinstance(c, str) else c)
                if text == "n/a" or text == NOT_AVAILABLE:
                    cls.append("na")
                if isinstance(c, Delta) and c.strip("+-0.") and c[0] in "+-":
                    cls.append("better" if c[0] == "+" else "worse")
                attr = f' class="{" ".join(cls)}"' if cls else ""
                cells.append(f"<td{attr}>{esc(text)}</td>")
            body.append("<tr>" + "".join(cells) + "</tr>")
        self.html.append(f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>")
        md_rows = ["| " + " | ".join(md(h) for h in headers) + " |",
                   "|" + "|".join("---:" if i in numeric else "---" for i in range(len(headers))) + "|"]
        for r in rows:
            md_rows.append("| " + " | ".join(
                md(_strip_tags(c) if isinstance(c, Safe) else (fmt(c) if not isinstance(c, str) else c))
                for c in r) + " |")
        self.md.append("\n".join(md_rows) + "\n")

    def image(self, png: Path, alt: str) -> None:
        data = base64.b64encode(png.read_bytes()).decode("ascii")
        self.html.append(f'<img class="plot" alt="{esc(alt)}" src="data:image/png;base64,{data}">')
        self.md.append(f"![{md(alt)}]({quote(png.name)})\n")


def _strip_tags(s: str) -> str:
    import re

    return html.unescape(re.sub(r"<[^>]*>", "", s))


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
            except Exception:  # noqa: BLE001 - a damaged record is skipped, not fatal
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
                    except Exception:  # noqa: BLE001
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
    from matplotlib.figure import Figure

    tags = _loss_tags(scalars)
    if not tags:
        return False
    cols = min(3, len(tags))
    rows = math.ceil(len(tags) / cols)
    fig = Figure(figsize=(4.2 * cols, 3.0 * rows), dpi=100, layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    colours = ["#1d72f3", "#e63946", "#2a9d8f", "#f4a261"]
    for ax, tag in zip(axes.flat, tags):
        for i, (run, series) in enumerate(sorted(scalars.items())):
            if tag not in series:
                continue
            steps = [s for s, _ in series[tag]]
            values = [v for _, v in series[tag]]
            c = colours[i % len(colours)]
            label = _mpl_text(run if run != "." else "train")
            if len(values) > 10:
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
    for ax in list(axes.flat)[len(tags):]:
        ax.set_visible(False)
    fig.savefig(path, format="png", metadata={"Software": None})
    return True


def plot_pr_curves(curves: dict[str, Any], path: Path) -> bool:
    from matplotlib.figure import Figure

    classes = curves.get("classes") or {}
    if not classes:
        return False
    n = len(classes)
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(4.4 * cols, 3.6 * rows), dpi=100, layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, (name, entry) in zip(axes.flat, classes.items()):
        drew = False
        for key, colour, style in (("iou_0.50", "#1d72f3", "-"), ("iou_0.75", "#e63946", "--")):
            c = entry.get(key) or {}
            if not c.get("has_ground_truth") or not c.get("precision"):
                continue
            max_r = c.get("max_recall", 1.0)
            pts = [(r, p) for r, p in zip(c["recall"], c["precision"]) if r <= max_r + 1e-9]
            if not pts:
                pts = [(0.0, 0.0)]
            ax.plot([r for r, _ in pts], [p for _, p in pts], style, color=colour, linewidth=2,
                    label=f"IoU {c.get('iou', key[-4:])}: AP {fmt(c.get('ap'), 3)}")
            drew = True
        if not drew:
            ax.text(0.5, 0.5, "no ground truth", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlim(0, 1.0)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("recall", fontsize=9)
        ax.set_ylabel("precision", fontsize=9)
        ax.set_title(_mpl_text(name), fontsize=10)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
        if drew:
            ax.legend(fontsize=8, loc="lower left")
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    fig.savefig(path, format="png", metadata={"Software": None})
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


def draw_samples(gt: dict[str, Any], detections: list[dict[str, Any]], images_dir: Path, path: Path,
                 *, score_threshold: float = SAMPLE_SCORE_THRESHOLD, max_images: int = MAX_SAMPLES,
                 cell: tuple[int, int] = (320, 240)) -> list[dict[str, Any]]:
    """Draw detections (score >= threshold, colour per class) and the ground truth (thin white) on up to
    ``max_images`` val images, as one grid PNG. Returns what was drawn, per image."""
    from PIL import Image, ImageDraw

    names = {c["id"]: str(c.get("name", c["id"])) for c in gt.get("categories", [])}
    colours = class_colours(gt.get("categories", []))
    root = images_dir.resolve()
    chosen = []
    def order(img: dict[str, Any]) -> tuple:
        i = img.get("id")
        return (0, i, "") if isinstance(i, int) else (1, 0, str(i))

    for img in sorted(gt.get("images", []), key=order):
        if len(chosen) >= max_images:
            break
        fname = str(img.get("file_name", ""))
        p = (images_dir / fname).resolve()
        if not fname or not p.is_relative_to(root) or not p.is_file():
            continue
        chosen.append((img, p))
    if not chosen:
        return []
    gts, dets = {}, {}
    for a in gt.get("annotations", []):
        gts.setdefault(a.get("image_id"), []).append(a)
    for d in detections:
        if isinstance(d, dict) and _is_num(d.get("score")) and d["score"] >= score_threshold:
            dets.setdefault(d.get("image_id"), []).append(d)

    cw, ch = cell
    caption_h = 18
    cols = min(4, len(chosen))
    rows = math.ceil(len(chosen) / cols)
    grid = Image.new("RGB", (cols * cw, rows * (ch + caption_h)), (32, 36, 42))
    font, small = _font(12), _font(10)
    drawn = []
    for i, (img, p) in enumerate(chosen):
        try:
            with Image.open(p) as im:
                im.draft("RGB", (cw, ch))
                w0 = float(img.get("width") or im.size[0])
                h0 = float(img.get("height") or im.size[1])
                im = im.convert("RGB")
                scale = min(cw / w0, ch / h0)
                tw, th = max(1, round(w0 * scale)), max(1, round(h0 * scale))
                thumb = im.resize((tw, th), Image.Resampling.BILINEAR)
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
            box = draw.textbbox((tx, ty), label, font=small)
            draw.rectangle(box, fill=colour)
            draw.text((tx, ty), label, fill=(255, 255, 255), font=small)
        r, c = divmod(i, cols)
        ox, oy = c * cw, r * (ch + caption_h)
        grid.paste(thumb, (ox + (cw - tw) // 2, oy + (ch - th) // 2))
        caption = str(img.get("file_name"))
        if len(caption) > 44:
            caption = caption[:41] + "..."
        ImageDraw.Draw(grid).text((ox + 4, oy + ch + 2), caption, fill=(230, 230, 230), font=font)
        drawn.append({"image_id": img.get("id"), "file_name": str(img.get("file_name")),
                      "detections": len(own), "ground_truth": len(gts.get(img.get("id"), []))})
    if not drawn:
        return []
    grid.save(path, format="PNG", optimize=False)
    return drawn


# --------------------------------------------------------------------------- the report


def _normalise_previous(previous: dict[str, Any] | None) -> tuple[dict[str, Any] | None, str]:
    if not previous:
        return None, "previous run"
    label = "previous run"
    if isinstance(previous.get("run_id"), str):
        label = f"previous run ({previous['run_id']})"
    metrics = previous.get("metrics") if isinstance(previous.get("metrics"), dict) else previous
    return metrics, label


def _metric_rows(metrics: dict[str, Any], baseline: dict[str, Any], previous: dict[str, Any] | None):
    rows = []
    for key, value in metrics.items():
        b = baseline.get(key)
        row = [key, value, b if b is not None else "", fmt_delta(value, b)]
        if previous is not None:
            pv = previous.get(key)
            row += [pv if pv is not None else "", fmt_delta(value, pv)]
        rows.append(row)
    return rows


def build_report(run_dir: str | Path, out: str | Path, *, previous: dict | None = None,
                 baseline: dict | None = None, title: str | None = None,
                 gate: dict | None = None) -> dict[str, Any]:
    """Write OUT/report.html, OUT/report.md, OUT/metrics.json and the PNG plots for a run folder.

    ``previous``: metrics of the last published run (flat, or ``{"run_id", "metrics": {...}}``);
    ``baseline``: reference metrics (default :data:`BASELINE`, the seed's result);
    ``gate``: the quality gate's verdict, ``{"promoted": bool, "reason": str, ...}``.
    Returns ``{"out", "html", "markdown", "files", "metrics", "promoted", "not_available"}``
    (``metrics``: mAP, mAP@.50IOU, mAP@.75IOU; ``not_available``: the parts the run folder lacked).
    """
    run_dir, out = Path(run_dir), Path(out)
    check_output_dir(out, OUTPUTS)
    metrics_path = run_dir / "evaluate" / "metrics.json"
    metrics = load_metrics(metrics_path)
    baseline = dict(BASELINE if baseline is None else baseline)
    prev_metrics, prev_label = _normalise_previous(previous)
    notes: list[str] = []
    missing: list[str] = []

    config = _read_json(run_dir / "config.json", notes)
    if gate is None and isinstance(config, dict) and isinstance(config.get("gate"), dict) \
            and "promoted" in config["gate"]:
        gate = config["gate"]
    manifest = _read_json(run_dir / "download" / "download_manifest.json", notes)
    validation = _read_json(run_dir / "validate" / "validation.json", notes)
    data_docs = run_dir / "validate" / "data_docs" / "index.html"
    tf_manifest = _read_json(run_dir / "tfrecords" / "manifest.json", notes)
    val_gt = _read_json(run_dir / "tfrecords" / "val.coco.json", notes)
    train_summary = _read_json(run_dir / "train" / "train_summary.json", notes)
    curves = _read_json(run_dir / "evaluate" / "pr_curves.json", notes)
    errors = _read_json(run_dir / "evaluate" / "error_analysis.json", notes)
    detections = _read_json(run_dir / "evaluate" / "detections.json", notes)
    run_name = (str(config["run_id"]) if isinstance(config, dict) and config.get("run_id")
                else run_dir.resolve().name)
    title = title or f"personcar run {run_name}"
    log.info("building the report of %s into %s", run_dir, out)

    with atomic_dir(out, OUTPUTS) as tmp:
        shutil.copyfile(metrics_path, tmp / "metrics.json")
        doc = Doc()
        doc.raw(f"<h1>{esc(title)}</h1>", f"# {md(title)}\n")
        doc.p(f"Run folder: {run_dir.resolve().name}; plots and numbers from the run's stage outputs.",
              cls="muted")

        # Verdict and headline numbers.
        promoted = None
        if isinstance(gate, dict) and "promoted" in gate:
            promoted = bool(gate.get("promoted"))
            word = "PROMOTED" if promoted else "NOT PROMOTED"
            reason = str(gate.get("reason", ""))
            doc.raw(f'<div class="verdict {"promoted" if promoted else "held"}">Quality gate: {esc(word)}'
                    f'{" - " + esc(reason) if reason else ""}</div>',
                    f"**Quality gate: {word}**{' - ' + md(reason) if reason else ''}\n")
            extra = [[k, _value_text(v)] for k, v in _flatten(gate) if k not in ("promoted", "reason")]
            if extra:
                doc.table(["gate", "value"], extra)
        headline = [[name, metrics.get(key), baseline.get(key, "")]
                    for name, key in (("mAP@.50IOU", MAP50), ("mAP@.75IOU", MAP75), ("mAP@[.50:.95]", MAP))]
        doc.table(["headline", "this run", "seed baseline"], headline, numeric={1, 2})

        # Run parameters.
        doc.h(2, "Run parameters", "parameters")
        if isinstance(config, dict) and config:
            doc.table(["parameter", "value"], [[k, _value_text(v)] for k, v in _flatten(config)])
        else:
            doc.na("Run parameters (config.json)")
            missing.append("config")

        # Dataset and validation.
        doc.h(2, "Dataset", "dataset")
        if isinstance(manifest, dict):
            rows = [[k, _value_text(manifest[k])] for k in ("source", "sha256", "size_bytes", "images")
                    if k in manifest]
            rows += [[k, _value_text(v)] for k, v in manifest.items()
                     if k not in ("source", "sha256", "size_bytes", "images")]
            doc.table(["download", "value"], rows)
        else:
            doc.na("Download manifest")
            missing.append("download")
        splits = tf_manifest.get("splits") if isinstance(tf_manifest, dict) else None
        if isinstance(splits, dict) and splits:
            class_names = sorted({str(c) for s in splits.values() if isinstance(s, dict)
                                  for c in (s.get("per_class") or {})})
            rows = []
            for name, s in splits.items():
                s = s if isinstance(s, dict) else {}
                rows.append([name, s.get("images"), s.get("boxes")]
                            + [(s.get("per_class") or {}).get(c) for c in class_names])
            doc.h(3, "Splits (TFRecords)")
            doc.table(["split", "images", "boxes"] + [f"{c} boxes" for c in class_names], rows,
                      numeric=set(range(1, 3 + len(class_names))))
            if isinstance(tf_manifest.get("shards"), list):
                doc.p(f"{len(tf_manifest['shards'])} TFRecord shards", cls="muted")
        else:
            doc.na("Split counts (tfrecords/manifest.json)")
            missing.append("tfrecords")

        doc.h(3, "Validation")
        if isinstance(validation, dict):
            ok = bool(validation.get("success"))
            quarantined = validation.get("quarantined_annotation_ids") or []
            doc.raw(f'<p>Outcome: <span class="{"ok" if ok else "fail"}">{"passed" if ok else "failed"}'
                    f'</span>; {len(quarantined):,} annotations quarantined.</p>',
                    f"Outcome: **{'passed' if ok else 'failed'}**; {len(quarantined):,} annotations quarantined.\n")
            failures = validation.get("failures") or []
            if failures:
                rows = []
                for f in failures:
                    if not isinstance(f, dict):
                        rows.append(["", "", str(f)])
                        continue
                    ids = f.get("annotation_ids") or f.get("image_ids") or []
                    kind = "annotations" if f.get("annotation_ids") else "images" if f.get("image_ids") else ""
                    shown = ", ".join(str(i) for i in list(ids)[:10]) + (" ..." if len(ids) > 10 else "")
                    rows.append([str(f.get("check", "")), f"{len(ids):,} {kind}".strip() if ids else "",
                                 str(f.get("message", "")) + (f" (ids: {shown})" if ids else "")])
                doc.table(["check", "affected", "message"], rows)
            else:
                doc.p("No failed checks.")
            warnings = validation.get("warnings") or []
            if warnings:
                doc.table(["warning"], [[w if isinstance(w, str) else _value_text(w)] for w in warnings])
            counts = validation.get("counts")
            if isinstance(counts, dict) and counts:
                doc.table(["count", "value"], [[k, _value_text(v)] for k, v in _flatten(counts)])
        else:
            doc.na("Validation outcome (validate/validation.json)")
            missing.append("validation")
        if data_docs.is_file():
            # the Data Docs travel with the report, so the link works on S3 and from disk
            shutil.copytree(data_docs.parent, tmp / "data_docs")
            rel = "data_docs/index.html"
            doc.raw(f'<p><a href="{esc(rel)}">Great Expectations Data Docs</a></p>',
                    f"[Great Expectations Data Docs]({rel})\n")
        else:
            doc.na("Great Expectations Data Docs")

        coverage = _read_json(run_dir / "validate" / "anchor_coverage.json", notes)
        _anchor_coverage(doc, coverage)

        # Training.
        doc.h(2, "Training", "training")
        validation_history = _read_json(run_dir / "train" / "validation.json", notes)
        _start_and_validation(doc, train_summary, validation_history, tmp / "validation_curve.png")
        if isinstance(train_summary, dict):
            rows = [[k, _value_text(v) if not isinstance(v, float) else fmt(v)]
                    for k, v in _flatten(train_summary)]
            doc.table(["training", "value"], rows)
        else:
            doc.na("Training summary (train/train_summary.json)")
            missing.append("train_summary")
        loss_png = tmp / "loss_curves.png"
        scalars: dict = {}
        train_dir = run_dir / "train"
        if train_dir.is_dir():
            try:
                scalars = read_scalars(train_dir)
            except ImportError:
                notes.append("tensorboard is not installed: loss curves cannot be read")
        if scalars and plot_losses(scalars, loss_png):
            doc.image(loss_png, "Training loss curves")
            steps = max((s for tags in scalars.values() for pts in tags.values() for s, _ in pts), default=0)
            doc.p(f"From TensorBoard event files under train/ (last step {steps:,}); bold lines are "
                  "smoothed (EMA 0.6).", cls="muted")
        else:
            doc.na("Training loss curves (TensorBoard event files under train/)")
            missing.append("loss_curves")

        # Metrics.
        doc.h(2, "COCO metrics", "metrics")
        headers = ["metric", "this run", BASELINE_LABEL, "vs seed"]
        if prev_metrics is not None:
            headers += [prev_label, "vs previous"]
        doc.table(headers, _metric_rows(metrics, baseline, prev_metrics),
                  numeric=set(range(1, len(headers))))
        doc.p("n/a: no ground truth in that size bucket (COCO reports -1). Sizes by pixel area: "
              "small < 32², medium < 96², large above.", cls="muted")
        if prev_metrics is None:
            doc.na("Previous published run")

        doc.h(2, "Precision / recall", "pr")
        pr_png = tmp / "pr_curves.png"
        if isinstance(curves, dict) and plot_pr_curves(curves, pr_png):
            doc.image(pr_png, "Precision/recall curves per class at IoU .50 and .75")
        else:
            doc.na("Precision/recall curves (evaluate/pr_curves.json)")
            missing.append("pr_curves")

        # Samples.
        doc.h(2, "Sample detections", "samples")
        images_dir = run_dir / "download" / "trainval" / "images"
        samples: list[dict[str, Any]] = []
        sample_png = tmp / "sample_detections.png"
        if isinstance(val_gt, dict) and isinstance(detections, list) and images_dir.is_dir():
            samples = draw_samples(val_gt, detections, images_dir, sample_png)
        if samples:
            legend = "".join(
                f'<span class="swatch" style="background:rgb{c}"></span>{esc(n)}'
                for n, c in ((str(cat.get("name", cat["id"])), class_colours(val_gt["categories"])[cat["id"]])
                             for cat in sorted(val_gt.get("categories", []), key=lambda c: c["id"])))
            doc.raw(f'<p class="muted">Detections with score &ge; {SAMPLE_SCORE_THRESHOLD} in class colours'
                    f'{legend}<span class="swatch" style="background:#fff;border:1px solid #999"></span>'
                    "ground truth</p>",
                    f"Detections with score >= {SAMPLE_SCORE_THRESHOLD} in class colours; ground truth in white.\n")
            doc.image(sample_png, "Sample detections on val images")
            doc.table(["image", "detections drawn", "ground-truth boxes"],
                      [[s["file_name"], s["detections"], s["ground_truth"]] for s in samples], numeric={1, 2})
        else:
            doc.na("Sample detections (tfrecords/val.coco.json, evaluate/detections.json and the images)")
            missing.append("samples")

        # Error analysis.
        doc.h(2, "Error analysis", "errors")
        if isinstance(errors, dict):
            _error_tables(doc, errors)
        else:
            doc.na("Error analysis (evaluate/error_analysis.json)")
            missing.append("error_analysis")

        if notes:
            doc.h(2, "Notes")
            for n in notes:
                doc.p(n, cls="muted")

        page = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">" + GENERATOR +
                f'<meta http-equiv="Content-Security-Policy" content="{esc(CSP)}">'
                '<meta name="viewport" content="width=device-width, initial-scale=1">'
                f"<title>{esc(title)}</title><style>{CSS}</style></head><body><main>\n"
                + "\n".join(doc.html) + "\n</main></body></html>\n")
        (tmp / "report.html").write_text(page, encoding="utf-8")
        (tmp / "report.md").write_text("\n".join(doc.md).lstrip() + "\n", encoding="utf-8")
        written = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())

    files = {name: str(out / name) for name in written}
    summary = {
        "out": str(out),
        "html": str(out / "report.html"),
        "markdown": str(out / "report.md"),
        "files": files,
        "metrics": {"mAP": metrics.get(MAP), "mAP@.50IOU": metrics.get(MAP50), "mAP@.75IOU": metrics.get(MAP75)},
        "promoted": promoted,
        "not_available": missing,
    }
    log.info("report written: %s (mAP@.50IOU %s; %s)", out / "report.html", fmt(metrics.get(MAP50)),
             f"sections not available: {', '.join(missing)}" if missing else "all sections present")
    return summary


def _anchor_coverage(doc: Doc, cov: Any) -> None:
    doc.h(3, "Anchor coverage")
    if not isinstance(cov, dict) or cov.get("coverage") is None:
        doc.na("Anchor coverage (validate/anchor_coverage.json)")
        return
    doc.p(f"{cov['coverage']:.1%} of {cov['boxes']:,} validated boxes have an anchor with IoU >= {cov['match_iou']} "
          f"({cov['anchors']}; mean best IoU {cov['mean_best_iou']:.3f}).")
    if cov.get("warning"):
        doc.raw(f'<p class="fail">{esc(cov["warning"])}</p>', f"**Warning:** {md(cov['warning'])}\n")
    rows = [[name.replace("_", " "), b["boxes"], "" if b["coverage"] is None else f"{b['coverage']:.1%}"]
            for name, b in (cov.get("by_shorter_side") or {}).items()]
    doc.table(["shorter side after resizing", "boxes", "covered"], rows, numeric={1, 2})


def plot_validation(history: list[dict[str, Any]], best_step: int | None, path: Path) -> bool:
    """mAP and mAP@.50IOU on the val split against the training step; the exported step marked."""
    points = sorted((h for h in history if isinstance(h, dict) and _is_num(h.get("step"))), key=lambda h: h["step"])
    if not points:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.4), dpi=100)
    steps = [h["step"] for h in points]
    for key, label in ((MAP50, "mAP@.50IOU"), (MAP, "mAP@[.50:.95]"), (MAP75, "mAP@.75IOU")):
        ax.plot(steps, [h.get(key, float("nan")) for h in points], marker="o", ms=3, label=label)
    if best_step is not None:
        ax.axvline(best_step, color="#444", ls="--", lw=1, label=f"exported (step {best_step:,})")
    ax.set_xlabel("training step")
    ax.set_ylabel("val split")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def _start_and_validation(doc: Doc, summary: Any, validation: Any, png: Path) -> None:
    summary = summary if isinstance(summary, dict) else {}
    started = summary.get("started_from") if isinstance(summary.get("started_from"), dict) else None
    if started:
        loaded = (f"; {started['variables']:,} variables of the {'+'.join(started.get('modules') or [])} loaded"
                  if started.get("variables") else "")
        doc.p(f"Started from: {started.get('description', started.get('kind'))}{loaded}.")
    best = validation.get("best") if isinstance(validation, dict) else None
    exported = summary.get("exported_step")
    if isinstance(best, dict) and _is_num(best.get("value")):
        doc.p(f"Exported: step {best['step']:,}, the best {best.get('metric', MAP50).split('/')[-1]} on the val "
              f"split during training ({fmt(best['value'])}) of {len(validation.get('history') or [])} validations.")
    elif exported is not None:
        doc.p(f"Exported: step {exported:,} (the last; no validation during training).")
    history = validation.get("history") if isinstance(validation, dict) else None
    if isinstance(history, list) and plot_validation(history, best.get("step") if isinstance(best, dict) else None,
                                                     png):
        doc.image(png, "Validation mAP during training")
    else:
        doc.na("Validation during training (train/validation.json)")


def _error_tables(doc: Doc, e: dict[str, Any]) -> None:
    thr = e.get("score_threshold")
    doc.p(f"Detections with score >= {thr} matched at IoU >= {e.get('iou_match')}: "
          f"{fmt(e.get('detections_considered'))} considered, "
          f"{fmt(e.get('detections_below_threshold'))} below the threshold.", cls="muted")
    fp = e.get("false_positives") or {}
    by_class = fp.get("by_class") or {}
    types = list((fp.get("by_type") or {}).keys())
    if types:
        doc.h(3, f"False positives: {fmt(fp.get('total'))}")
        rows = [[cls] + [counts.get(t) for t in types] + [sum(v for v in counts.values() if _is_num(v))]
                for cls, counts in by_class.items()]
        rows.append(["all classes"] + [fp["by_type"].get(t) for t in types] + [fp.get("total")])
        doc.table(["class"] + types + ["total"], rows, numeric=set(range(1, len(types) + 2)))
        doc.p("localisation: IoU 0.1-0.5 with a box of the same class; confusion: IoU >= 0.5 with a box "
              "of another class; duplicate: IoU >= 0.5 with a box already matched; background: none.",
              cls="muted")
    fn = e.get("false_negatives") or {}
    sizes = list((fn.get("by_size") or {}).keys())
    if sizes:
        doc.h(3, f"Missed boxes (false negatives): {fmt(fn.get('total'))}")
        gt_by_class = fn.get("ground_truth_by_class") or {}
        rows = []
        for cls, counts in (fn.get("by_class") or {}).items():
            row: list[Any] = [cls]
            for s in sizes:
                total = (gt_by_class.get(cls) or {}).get(s)
                missed = counts.get(s)
                row.append(f"{missed} / {total}" if total else fmt(missed))
            rows.append(row)
        totals = fn.get("ground_truth_by_size") or {}
        rows.append(["all classes"] + [f"{fn['by_size'].get(s)} / {totals.get(s)}" if totals.get(s)
                                       else fmt(fn["by_size"].get(s)) for s in sizes])
        doc.table(["class"] + [f"{s} (missed / all)" for s in sizes], rows, numeric=set(range(1, len(sizes) + 1)))
    worst = e.get("worst_images") or []
    if worst:
        doc.h(3, f"Worst {len(worst)} images by error count")
        doc.table(["image", "errors", "false positives", "missed", "true positives"],
                  [[w.get("file_name", ""), w.get("errors"), w.get("false_positives"),
                    w.get("false_negatives"), w.get("true_positives")] for w in worst],
                  numeric={1, 2, 3, 4})
    elif fp or fn:
        doc.p("No image has an error at this threshold.")
