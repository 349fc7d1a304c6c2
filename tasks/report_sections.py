"""The report's sections below the top: values as readable cells, and the facts of each stage.

Every builder returns plain data (strings, numbers, lists, ``table`` dicts) for the templates;
nothing here writes HTML or Markdown.
"""

from __future__ import annotations

import base64
import math
from pathlib import Path
from typing import Any

from tasks.report_plots import (MAP50, SAMPLE_SCORE_THRESHOLD, class_colours, draw_samples, is_num, plot_losses,
                                plot_validation, read_scalars)

NOT_AVAILABLE = "not available"

# (key in config.json, label, text when unset); "resolved" holds what an unset value became
PARAMETERS = (
    ("dataset_source", "Dataset archive", "default"), ("dataset_sha256", "Expected SHA-256", "not checked"),
    ("max_quarantine_fraction", "Quarantine limit (share of boxes)", "default"), ("val_fraction", "Val share", "default"),
    ("num_shards", "TFRecord shards", "automatic"), ("seed", "Seed", "default"), ("model", "Model", "default"),
    ("backbone", "Backbone", "the model's"), ("image_size", "Input size (px)", "the model's"),
    ("epochs", "Epochs", "from steps"), ("steps", "Steps", "from epochs"),
    ("batch_size", "Batch per GPU", "the model's"), ("global_batch_size", "Global batch", "-"),
    ("learning_rate", "Peak learning rate", "the model's"), ("warmup_steps", "Warm-up steps", "-"),
    ("validate_every", "Validate every (steps)", "the model's"), ("augment", "Augmentation", "default"),
    ("warm_start", "Warm start", "default"), ("init_checkpoint", "Initial checkpoint", "default"),
    ("init_checkpoint_modules", "Modules loaded", "all it holds"), ("publish_dest", "Published to", "default"),
    ("promotion_margin", "Promotion margin", "default"), ("backend", "Execution backend", "default"),
)
LABELS = {k: label for k, label, _ in PARAMETERS} | {
    "run_id": "Run id", "source": "Source", "sha256": "SHA-256", "size_bytes": "Archive size (bytes)",
    "images": "Images", "images_per_second": "Images / s", "seconds_per_step": "Seconds / step",
    "trained_steps": "Steps trained here", "start_step": "First step", "gpus": "GPUs", "zoo_name": "Zoo model",
    "xla": "XLA", "replica_batches": "Batch per replica"}
SKIP_PARAMETERS = {"run_id", "resolved", "replicas", "warmup_learning_rate", "steps_per_epoch", "train_images"}
SKIP_TRAINING = {"started_from", "best_validation", "validations", "exported_step"}


# --------------------------------------------------------------------------- values and cells


def fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return "n/a" if v == -1.0 else f"{v:.{digits}f}" if math.isfinite(v) else str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, dict):
        return ", ".join(f"{label(k).lower()} {fmt(x, digits)}" for k, x in v.items()) or "–"
    if isinstance(v, list):
        s = ", ".join(fmt(x, digits) for x in v)
        return s if len(s) <= 200 else s[:197] + "..."
    return str(v)


def label(key: Any) -> str:
    """A readable name for a data key: ``images_per_second`` -> ``Images / s``, ``Loss/total_loss`` -> ``Total loss``."""
    key = str(key)
    if key in LABELS:
        return LABELS[key]
    text = key.removeprefix("Loss/").replace("_", " ").strip()
    return text[:1].upper() + text[1:]


def cell(v: Any, digits: int = 4, cls: str = "") -> dict[str, str]:
    if isinstance(v, dict) and set(v) == {"t", "c"}:
        return v
    text = fmt(v, digits) if not isinstance(v, str) else v
    num = "num" if is_num(v) or cls == "num" else ""
    return {"t": text, "c": " ".join(c for c in (num, "na" if text in ("n/a", NOT_AVAILABLE) else "",
                                                 cls if cls != "num" else "") if c)}


def delta(v: Any, ref: Any, digits: int = 4) -> dict[str, str]:
    if not (is_num(v) and is_num(ref)) or -1 in (v, ref):
        return {"t": "", "c": "num"}
    d = round(v - ref, digits)
    return {"t": f"{d:+.{digits}f}", "c": "num " + ("better" if d > 0 else "worse" if d < 0 else "")}


def table(headers: list[str], rows: list[list[Any]], numeric: set[int] = frozenset(), digits: int = 4) -> dict:
    return {"headers": headers, "numeric": [i in numeric for i in range(len(headers))],
            "rows": [[cell(v, digits, "num" if i in numeric else "") for i, v in enumerate(r)] for r in rows]}


def flatten(d: dict[str, Any], skip: set[str] = frozenset(), prefix: str = "") -> list[list[str]]:
    rows = []
    for k, v in d.items():
        if k in skip:
            continue
        name = f"{prefix}: {label(k).lower()}" if prefix else label(k)
        rows += flatten(v, prefix=name) if isinstance(v, dict) and v else [[name, v]]
    return rows


def image(png: Path, alt: str) -> dict[str, str]:
    return {"file": png.name, "alt": alt, "data": base64.b64encode(png.read_bytes()).decode("ascii")}


def parameters(config: dict[str, Any], summary: Any = None) -> dict:
    """The run's parameters as asked; where training started from something else (the train
    summary's ``started_from``), the warm-start and initial-checkpoint rows say so."""
    resolved = config.get("resolved") if isinstance(config.get("resolved"), dict) else {}
    started = summary.get("started_from") if isinstance(summary, dict) else None
    unused = _unused_start(config, started) if isinstance(started, dict) else {}
    rows, seen = [], set(SKIP_PARAMETERS)
    for key, name, unset in PARAMETERS:
        seen.add(key)
        chosen, used = config.get(key), resolved.get(key)
        if key not in config and key not in resolved:
            continue
        if key == "validate_every" and 0 in (chosen, used):
            text = "never"
        elif chosen is not None:
            text = param_text(chosen)
        elif used is not None:
            text = f"{param_text(used)} ({'model default' if key in config else 'derived'})"
        else:
            text = unset
        rows.append([name, f"{text}; {unused[key]}" if key in unused else text])
    rows += [[label(k), param_text(v)] for k, v in config.items() if k not in seen]
    return table(["parameter", "value"], rows)


def _unused_start(config: dict[str, Any], started: dict[str, Any]) -> dict[str, str]:
    """``{parameter: why training did not start from it}`` for the warm-start and checkpoint rows."""
    kind, out = started.get("kind"), {}
    asked_checkpoint = config.get("init_checkpoint") not in (None, "scratch")
    if config.get("warm_start") == "promoted" and kind != "promoted":
        out["warm_start"] = f"not used: {started.get('reason') or 'no promoted run to start from'}"
    if kind == "promoted" and asked_checkpoint:
        out["init_checkpoint"] = "not used: warm-started from the promoted run"
    elif kind == "scratch" and asked_checkpoint:
        out["init_checkpoint"] = f"not used: training started from {started.get('description', 'scratch')}"
    if kind in ("promoted", "scratch"):
        out["init_checkpoint_modules"] = "not used"
    return out


def param_text(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else fmt(v)


# --------------------------------------------------------------------------- the sections


def dataset(manifest: Any, tf_manifest: Any, missing: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {"download": None, "splits": None, "shards": None}
    if isinstance(manifest, dict):
        out["download"] = table(["download", "value"], [[k, fmt(v)] for k, v in flatten(manifest)])
    else:
        missing.append("download")
    splits = tf_manifest.get("splits") if isinstance(tf_manifest, dict) else None
    if not isinstance(splits, dict) or not splits:
        missing.append("tfrecords")
        return out
    splits = {n: s if isinstance(s, dict) else {} for n, s in splits.items()}
    names = sorted({str(c) for s in splits.values() for c in (s.get("per_class") or {})})
    rows = [[n, s.get("images"), s.get("boxes"), *((s.get("per_class") or {}).get(c) for c in names)]
            for n, s in splits.items()]
    out["splits"] = table(["split", "images", "boxes"] + [f"{c} boxes" for c in names], rows,
                          set(range(1, 3 + len(names))))
    out["shards"] = len(tf_manifest["shards"]) if isinstance(tf_manifest.get("shards"), list) else None
    return out


def validation(v: Any, missing: list[str]) -> dict[str, Any] | None:
    if not isinstance(v, dict):
        missing.append("validation")
        return None
    rows = []
    for f in v.get("failures") or []:
        f = f if isinstance(f, dict) else {"message": str(f)}
        ids = list(f.get("annotation_ids") or f.get("image_ids") or [])
        kind = ("annotation" if f.get("annotation_ids") else "image") + ("s" if len(ids) != 1 else "")
        shown = ", ".join(str(i) for i in ids[:10]) + (" ..." if len(ids) > 10 else "")
        rows.append([str(f.get("check", "")), f"{len(ids):,} {kind}" if ids else "",
                     str(f.get("message", "")) + (f" (ids: {shown})" if ids else "")])
    warnings = [f"{w.get('message') or w.get('check')}" + (f" ({w['check']})" if w.get("check") else "")
                if isinstance(w, dict) else str(w) for w in v.get("warnings") or []]
    counts = v.get("counts")
    n = len(v.get("quarantined_annotation_ids") or [])
    return {"passed": bool(v.get("success")), "quarantined": f"{n:,} annotation{'' if n == 1 else 's'} quarantined",
            "failures": table(["check", "affected", "message"], rows) if rows else None, "warnings": warnings,
            "counts": table(["count", "value"], flatten(counts)) if isinstance(counts, dict) and counts else None}


def coverage(cov: Any) -> dict[str, Any] | None:
    if not isinstance(cov, dict) or cov.get("coverage") is None:
        return None
    rows = [[name.replace("_", " "), b["boxes"], "" if b["coverage"] is None else f"{b['coverage']:.1%}"]
            for name, b in (cov.get("by_shorter_side") or {}).items()]
    return {"text": f"{cov['coverage']:.1%} of {cov['boxes']:,} validated boxes have an anchor with IoU >= "
                    f"{cov['match_iou']} ({cov['anchors']}; mean best IoU {cov['mean_best_iou']:.3f}).",
            "warning": cov.get("warning") or None,
            "table": table(["shorter side after resizing", "boxes", "covered"], rows, {1, 2})}


def training(run_dir: Path, tmp: Path, summary: Any, history: Any, notes: list[str], missing: list[str]) -> dict:
    out: dict[str, Any] = {"started": None, "exported": None, "curve": None, "summary": None, "losses": None}
    s = summary if isinstance(summary, dict) else {}
    started = s.get("started_from") if isinstance(s.get("started_from"), dict) else None
    if started:
        loaded = (f"; {started['variables']:,} variables of the {'+'.join(started.get('modules') or [])} loaded"
                  if started.get("variables") else "")
        out["started"] = f"Started from: {started.get('description', started.get('kind'))}{loaded}."
    best = history.get("best") if isinstance(history, dict) else None
    if isinstance(best, dict) and is_num(best.get("value")):
        out["exported"] = (f"Exported: step {best['step']:,}, the best {best.get('metric', MAP50).split('/')[-1]} on "
                           f"the val split during training ({fmt(best['value'])}) of "
                           f"{len(history.get('history') or [])} validations.")
    elif s.get("exported_step") is not None:
        out["exported"] = f"Exported: step {s['exported_step']:,} (the last; no validation during training)."
    points = history.get("history") if isinstance(history, dict) else None
    png = tmp / "validation_curve.png"
    if isinstance(points, list) and plot_validation(points, best.get("step") if isinstance(best, dict) else None, png):
        out["curve"] = image(png, "Validation mAP during training")
    if s:
        out["summary"] = table(["training", "value"], [[k, param_text(v)] for k, v in flatten(s, SKIP_TRAINING)])
    else:
        missing.append("train_summary")
    scalars: dict = {}
    if (run_dir / "train").is_dir():
        try:
            scalars = read_scalars(run_dir / "train")
        except ImportError:
            notes.append("tensorboard is not installed: the loss curves cannot be read.")
    if scalars and plot_losses(scalars, tmp / "loss_curves.png"):
        last = max((st for tags in scalars.values() for pts in tags.values() for st, _ in pts), default=0)
        out["losses"] = image(tmp / "loss_curves.png", "Training loss curves")
        out["loss_note"] = (f"From TensorBoard event files under train/ (last step {last:,}); bold lines are "
                            "smoothed (EMA 0.6).")
    else:
        missing.append("loss_curves")
    return out


def samples(val_gt: Any, detections: Any, images: Path, tmp: Path, missing: list[str]) -> dict | None:
    drawn = []
    if isinstance(val_gt, dict) and isinstance(detections, list) and images.is_dir():
        drawn = draw_samples(val_gt, detections, images, tmp / "sample_detections.png")
    if not drawn:
        missing.append("samples")
        return None
    colours = class_colours(val_gt["categories"])
    legend = [{"name": str(c.get("name", c["id"])), "rgb": "rgb({},{},{})".format(*colours[c["id"]])}
              for c in sorted(val_gt.get("categories", []), key=lambda c: c["id"])]
    return {"legend": legend, "threshold": SAMPLE_SCORE_THRESHOLD,
            "image": image(tmp / "sample_detections.png", "Sample detections on val images"),
            "table": table(["image", "detections drawn", "ground-truth boxes"],
                           [[s["file_name"], s["detections"], s["ground_truth"]] for s in drawn], {1, 2})}


def errors(e: Any, missing: list[str]) -> dict | None:
    if not isinstance(e, dict):
        missing.append("error_analysis")
        return None
    out: dict[str, Any] = {"intro": f"Detections with score >= {e.get('score_threshold')} matched at IoU >= "
                                    f"{e.get('iou_match')}: {fmt(e.get('detections_considered'))} considered, "
                                    f"{fmt(e.get('detections_below_threshold'))} below the threshold.",
                           "fp": None, "fn": None, "worst": None}
    fp, fn = e.get("false_positives") or {}, e.get("false_negatives") or {}
    types, sizes = list(fp.get("by_type") or {}), list(fn.get("by_size") or {})
    if types:
        rows = [[c] + [n.get(t) for t in types] + [sum(v for v in n.values() if is_num(v))]
                for c, n in (fp.get("by_class") or {}).items()]
        rows.append(["all classes"] + [fp["by_type"].get(t) for t in types] + [fp.get("total")])
        out["fp"] = {"title": f"False positives: {fmt(fp.get('total'))}",
                     "table": table(["class", *types, "total"], rows, set(range(1, len(types) + 2)))}
    if sizes:
        def missed(n: Any, total: Any) -> str:
            return fmt(n) if total is None else f"{n} / {total}"

        gt = fn.get("ground_truth_by_class") or {}
        rows = [[c] + [missed(n.get(s), (gt.get(c) or {}).get(s)) for s in sizes]
                for c, n in (fn.get("by_class") or {}).items()]
        rows.append(["all classes"] + [missed(fn["by_size"].get(s), (fn.get("ground_truth_by_size") or {}).get(s))
                                       for s in sizes])
        out["fn"] = {"title": f"Missed boxes (false negatives): {fmt(fn.get('total'))}",
                     "table": table(["class"] + [f"{s} (missed / all)" for s in sizes], rows,
                                    set(range(1, len(sizes) + 1)))}
    worst = e.get("worst_images") or []
    if worst:
        out["worst"] = {"title": f"Worst {len(worst)} images by error count" if len(worst) > 1 else "The image with errors", "table": table(
            ["image", "errors", "false positives", "missed", "true positives"],
            [[w.get("file_name", ""), w.get("errors"), w.get("false_positives"), w.get("false_negatives"),
              w.get("true_positives")] for w in worst], {1, 2, 3, 4})}
    out["clean"] = not worst and bool(fp or fn)
    return out
