"""COCO evaluation of a detections file against the val split's ground truth.

``personcar evaluate --annotations GT.json --detections DET.json --out DIR`` writes:

- ``OUT/metrics.json``: pycocotools ``COCOeval`` results under the TensorFlow Object Detection
  API's metric names (``DetectionBoxes_Precision/mAP``, ``.../mAP@.50IOU``, ...), AP per class
  (``DetectionBoxes_PerformanceByCategory/mAP/<class>``) and AP per class at IoU .50 and .75
  (``DetectionBoxes_PerformanceByCategory/mAP@.50IOU/<class>``, ``.../mAP@.75IOU/<class>``).
  A value of -1 is COCO's "no ground truth in this bucket".
- ``OUT/pr_curves.json``: per class, the interpolated precision at COCO's 101 recall thresholds
  (``COCOeval.eval['precision']``, all areas, 100 detections) at IoU .50 and .75.
- ``OUT/error_analysis.json``: false positives by type, missed boxes by size and the worst images,
  at ``score_threshold`` (:mod:`tasks.error_analysis`).
- ``OUT/detections.json``: a byte copy of the evaluated detections, so the folder is complete
  on its own (the report draws samples from it).

COCO metrics use every detection; only the error analysis applies the score threshold.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

from tasks.error_analysis import error_analysis
from tasks.artifacts import StageOutputs, atomic_dir, check_output_dir, write_json_atomic
from tasks.errors import PersoncarError
from tasks.logs import log

# what evaluate writes into OUT (the detections may already be there: predict can write them)
OUTPUTS = StageOutputs("evaluate", "error_analysis.json", keys=("false_positives", "false_negatives"),
                       names=("metrics.json", "pr_curves.json", "error_analysis.json", "detections.json"))

METRIC_PREFIX = "DetectionBoxes_Precision/"
RECALL_PREFIX = "DetectionBoxes_Recall/"
PER_CLASS_PREFIX = "DetectionBoxes_PerformanceByCategory/"
#: the headline metrics under the short names the runs index, the reports and the sweeps use
SHORT_METRICS = {name: METRIC_PREFIX + name for name in ("mAP", "mAP@.50IOU", "mAP@.75IOU")}
#: the per-class columns of the reports and sweeps, and the short metric each shows
CLASS_METRICS = {"AP": "mAP", "AP@.50": "mAP@.50IOU", "AP@.75": "mAP@.75IOU"}

# Order of COCOeval.stats for iouType "bbox".
COCO_STAT_NAMES = (
    "DetectionBoxes_Precision/mAP",
    "DetectionBoxes_Precision/mAP@.50IOU",
    "DetectionBoxes_Precision/mAP@.75IOU",
    "DetectionBoxes_Precision/mAP (small)",
    "DetectionBoxes_Precision/mAP (medium)",
    "DetectionBoxes_Precision/mAP (large)",
    "DetectionBoxes_Recall/AR@1",
    "DetectionBoxes_Recall/AR@10",
    "DetectionBoxes_Recall/AR@100",
    "DetectionBoxes_Recall/AR@100 (small)",
    "DetectionBoxes_Recall/AR@100 (medium)",
    "DetectionBoxes_Recall/AR@100 (large)",
)



def per_class_key(class_name: str, iou: str | None = None) -> str:
    """``DetectionBoxes_PerformanceByCategory/mAP/<class>`` (``iou`` ``".50"`` or ``".75"``: at that IoU)."""
    metric = "mAP" if iou is None else f"mAP@{iou}IOU"
    return f"{PER_CLASS_PREFIX}{metric}/{class_name}"


def split_per_class_key(key: str) -> tuple[str, str] | None:
    """``(metric, class)`` of a per-class metric name (``mAP@.50IOU``, ``person``), or None for any other key."""
    if not key.startswith(PER_CLASS_PREFIX):
        return None
    metric, _, cls = key[len(PER_CLASS_PREFIX):].partition("/")
    return (metric, cls) if cls else None


# --------------------------------------------------------------------------- inputs


def _load_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise PersoncarError(f"{path}: {what} file not found")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PersoncarError(f"{path}: {what} file is not valid JSON ({e})") from e


def is_num(v: Any) -> bool:
    """A finite int or float, not a bool: a usable box coordinate, score or metric."""
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def as_num(v: Any) -> float | None:
    """``v`` as a float when :func:`is_num`, else None."""
    return float(v) if is_num(v) else None


def load_metrics(path: str | Path) -> dict[str, Any]:
    """A ``metrics.json`` written by :func:`evaluate`, or a one-line PersoncarError."""
    path = Path(path)
    if not path.is_file():
        raise PersoncarError(f"{path}: not found; run `personcar evaluate` for this run first")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise PersoncarError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise PersoncarError(f"{path}: must be a JSON object of metric names to values")
    return data


def load_ground_truth(path: str | Path) -> dict[str, Any]:
    """Read and check a COCO ground-truth file; areas must be in pixels."""
    path = Path(path)
    gt = _load_json(path, "ground truth")
    if not isinstance(gt, dict):
        raise PersoncarError(f"{path}: ground truth must be a COCO object with images, annotations, categories")
    for key in ("images", "annotations", "categories"):
        if not isinstance(gt.get(key), list):
            raise PersoncarError(f"{path}: ground truth has no '{key}' list (COCO format required)")
    if not gt["categories"]:
        raise PersoncarError(f"{path}: ground truth has no categories")
    image_ids = set()
    for i, img in enumerate(gt["images"]):
        if not isinstance(img, dict) or "id" not in img:
            raise PersoncarError(f"{path}: images[{i}] has no 'id'")
        if img["id"] in image_ids:
            raise PersoncarError(f"{path}: images[{i}] repeats image id {img['id']!r} (ids must be unique)")
        image_ids.add(img["id"])
    cat_ids = {c.get("id") for c in gt["categories"] if isinstance(c, dict)}
    for i, ann in enumerate(gt["annotations"]):
        ann_id = ann.get("id", f"#{i}") if isinstance(ann, dict) else f"#{i}"
        if not isinstance(ann, dict):
            raise PersoncarError(f"{path}: annotations[{i}] is not an object")
        bbox = ann.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(is_num(v) for v in bbox)):
            raise PersoncarError(f"{path}: annotation id {ann_id} has no valid bbox [x, y, w, h]")
        if not is_num(ann.get("area")):
            raise PersoncarError(
                f"{path}: annotation id {ann_id} has no numeric 'area'; COCO size buckets need "
                "pixel areas (w*h)")
        if ann.get("image_id") not in image_ids:
            raise PersoncarError(f"{path}: annotation id {ann_id} refers to unknown image_id {ann.get('image_id')!r}")
        if ann.get("category_id") not in cat_ids:
            raise PersoncarError(
                f"{path}: annotation id {ann_id} refers to unknown category_id {ann.get('category_id')!r}")
        if "id" not in ann:
            raise PersoncarError(f"{path}: annotations[{i}] has no 'id'")
    _check_pixel_areas(path, gt["annotations"])
    return gt


def _check_pixel_areas(path: Path, anns: list[dict[str, Any]]) -> None:
    """Refuse areas given as fractions of the image (the openimages-personcar defect)."""
    if not anns or not all(a["area"] <= 1.0 for a in anns):
        return
    big = [a for a in anns if a["bbox"][2] * a["bbox"][3] > 1.0]
    if not big:
        return
    a = max(big, key=lambda a: a["bbox"][2] * a["bbox"][3])
    w, h = a["bbox"][2], a["bbox"][3]
    raise PersoncarError(
        f"{path}: annotation areas look like fractions of the image, not pixels (all {len(anns)} "
        f"areas <= 1.0, e.g. annotation id {a.get('id')} has area {a['area']:.4g} for a {w:g}x{h:g} px "
        "box); COCO would file every box as small and report -1 for medium/large: recompute "
        "'area' as w*h in pixels (the tfrecords stage's val.coco.json does)")


def load_detections(path: str | Path, gt: dict[str, Any], gt_path: str | Path) -> list[dict[str, Any]]:
    """Read and check a COCO results file against the ground truth's images and categories."""
    path = Path(path)
    dets = _load_json(path, "detections")
    if not isinstance(dets, list):
        raise PersoncarError(
            f"{path}: detections must be a JSON list of {{image_id, category_id, bbox, score}}")
    image_ids = {img["id"] for img in gt["images"]}
    cat_ids = {c["id"] for c in gt["categories"]}
    out = []
    for i, d in enumerate(dets):
        if not isinstance(d, dict):
            raise PersoncarError(f"{path}: detection #{i} is not an object")
        if d.get("image_id") not in image_ids:
            raise PersoncarError(
                f"{path}: detection #{i} refers to image_id {d.get('image_id')!r}, which is not in "
                f"the ground truth {gt_path}")
        if d.get("category_id") not in cat_ids:
            raise PersoncarError(
                f"{path}: detection #{i} has category_id {d.get('category_id')!r}, not one of the "
                f"ground truth's categories {sorted(cat_ids)}")
        bbox = d.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(is_num(v) for v in bbox)
                and bbox[2] >= 0 and bbox[3] >= 0):
            raise PersoncarError(f"{path}: detection #{i} has no valid bbox [x, y, w, h] (pixels, w, h >= 0)")
        if not is_num(d.get("score")):
            raise PersoncarError(f"{path}: detection #{i} has no numeric score")
        out.append({"image_id": d["image_id"], "category_id": d["category_id"],
                    "bbox": [float(v) for v in bbox], "score": float(d["score"])})
    return out


# --------------------------------------------------------------------------- COCO metrics


def _coco_objects(gt: dict[str, Any], dets: list[dict[str, Any]]):
    """pycocotools COCO objects for the ground truth and the results (what ``COCO.loadRes`` builds,
    but also for an empty results list, which ``loadRes`` cannot take)."""
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        # COCOeval stores the id of the matched ground truth and tests it for truth, so a match to
        # annotation id 0 counts as no match: number the ground truth 1..N for the evaluation.
        renumbered = [{**a, "id": i} for i, a in enumerate(gt["annotations"], start=1)]
        coco_gt.dataset = {"images": gt["images"], "annotations": renumbered, "categories": gt["categories"]}
        coco_gt.createIndex()
        coco_dt = COCO()
        anns = []
        for i, d in enumerate(dets):
            x, y, w, h = d["bbox"]
            anns.append({**d, "bbox": [x, y, w, h], "area": w * h, "id": i + 1, "iscrowd": 0})
        coco_dt.dataset = {"images": list(gt["images"]), "categories": list(gt["categories"]),
                           "annotations": anns}
        coco_dt.createIndex()
    return coco_gt, coco_dt


def _mean_valid(a) -> float:
    import numpy as np

    v = a[a > -1]
    return float(np.mean(v)) if v.size else -1.0


def run_cocoeval(gt: dict[str, Any], dets: list[dict[str, Any]]):
    """Run COCOeval (bbox); returns the evaluated ``COCOeval`` object."""
    from pycocotools.cocoeval import COCOeval

    coco_gt, coco_dt = _coco_objects(gt, dets)
    ev = COCOeval(coco_gt, coco_dt, iouType="bbox")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    for line in buf.getvalue().splitlines():
        if line.strip().startswith("Average"):
            log.info("COCO %s", line.strip())
    return ev


def _iou_index(ev, iou: float) -> int:
    import numpy as np

    idx = np.where(np.isclose(ev.params.iouThrs, iou))[0]
    if not idx.size:
        raise ValueError(f"IoU {iou} is not one of COCOeval's thresholds")
    return int(idx[0])


def metrics_from_eval(ev, categories: list[dict[str, Any]]) -> dict[str, float]:
    """OD API metric names from an evaluated COCOeval, plus AP per class (overall, .50, .75)."""
    metrics = {name: float(v) for name, v in zip(COCO_STAT_NAMES, ev.stats, strict=True)}
    precision = ev.eval["precision"]  # [T, R, K, A, M]
    area_all = ev.params.areaRngLbl.index("all")
    max_det = len(ev.params.maxDets) - 1  # 100
    t50, t75 = _iou_index(ev, 0.5), _iou_index(ev, 0.75)
    cat_index = {cid: k for k, cid in enumerate(ev.params.catIds)}
    names = {c["id"]: str(c.get("name", c["id"])) for c in categories}
    for cid in sorted(names):
        k = cat_index[cid]
        p = precision[:, :, k, area_all, max_det]
        metrics[per_class_key(names[cid])] = _mean_valid(p)
    for iou, t in ((".50", t50), (".75", t75)):
        for cid in sorted(names):
            k = cat_index[cid]
            metrics[per_class_key(names[cid], iou)] = _mean_valid(precision[t, :, k, area_all, max_det])
    return metrics


def pr_curves_from_eval(ev, categories: list[dict[str, Any]]) -> dict[str, Any]:
    """Per class precision at COCO's recall thresholds, at IoU .50 and .75 (all areas, 100 dets)."""
    precision, recall, scores = ev.eval["precision"], ev.eval["recall"], ev.eval["scores"]
    area_all = ev.params.areaRngLbl.index("all")
    max_det = len(ev.params.maxDets) - 1
    cat_index = {cid: k for k, cid in enumerate(ev.params.catIds)}
    out: dict[str, Any] = {
        "recall_thresholds": [round(float(r), 6) for r in ev.params.recThrs],
        "area": "all",
        "max_detections": int(ev.params.maxDets[max_det]),
        "classes": {},
    }
    for c in sorted(categories, key=lambda c: c["id"]):
        k = cat_index[c["id"]]
        entry: dict[str, Any] = {"category_id": c["id"]}
        for label, iou in (("iou_0.50", 0.5), ("iou_0.75", 0.75)):
            t = _iou_index(ev, iou)
            p = precision[t, :, k, area_all, max_det]
            has_gt = bool((p > -1).any())
            entry[label] = {
                "iou": iou,
                "has_ground_truth": has_gt,
                "ap": _mean_valid(p),
                "max_recall": float(recall[t, k, area_all, max_det]) if has_gt else -1.0,
                "precision": [float(v) for v in p] if has_gt else [],
                "recall": out["recall_thresholds"] if has_gt else [],
                "scores": [float(v) for v in scores[t, :, k, area_all, max_det]] if has_gt else [],
            }
        out["classes"][str(c.get("name", c["id"]))] = entry
    return out


# --------------------------------------------------------------------------- stage


def evaluate(annotations: str | Path, detections: str | Path, out: str | Path, *,
             iou_match: float = 0.5, worst_k: int = 10, score_threshold: float = 0.3) -> dict[str, Any]:
    """Evaluate COCO results against COCO ground truth (pixel areas); write OUT/metrics.json,
    OUT/pr_curves.json, OUT/error_analysis.json and OUT/detections.json atomically.

    Returns ``{"out", "metrics", "files", "num_images", "num_ground_truth", "num_detections"}``.
    """
    annotations, detections, out = Path(annotations), Path(detections), Path(out)
    check_output_dir(out, OUTPUTS)
    if not 0.0 < iou_match <= 1.0:
        raise PersoncarError(f"iou_match must be in (0, 1], got {iou_match}")
    if not 0.0 <= score_threshold <= 1.0:
        raise PersoncarError(f"score_threshold must be in [0, 1], got {score_threshold}")
    gt = load_ground_truth(annotations)
    dets = load_detections(detections, gt, annotations)
    log.info("evaluating %d detections on %d images (%d ground-truth boxes) from %s",
             len(dets), len(gt["images"]), len(gt["annotations"]), annotations)
    if not dets:
        log.warning("%s: no detections; every metric is 0", detections)

    ev = run_cocoeval(gt, dets)
    metrics = metrics_from_eval(ev, gt["categories"])
    curves = pr_curves_from_eval(ev, gt["categories"])
    errors = error_analysis(gt, dets, iou_match=iou_match, score_threshold=score_threshold,
                            worst_k=worst_k)
    errors["num_images"] = len(gt["images"])

    # The detections may live inside OUT (predict writes there); copy them aside before OUT is replaced.
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.det-", dir=out.parent) as td:
        det_copy = Path(td) / "detections.json"
        shutil.copyfile(detections, det_copy)
        with atomic_dir(out, OUTPUTS) as tmp:
            write_json_atomic(tmp / "metrics.json", metrics)
            write_json_atomic(tmp / "pr_curves.json", curves)
            write_json_atomic(tmp / "error_analysis.json", errors)
            shutil.copyfile(det_copy, tmp / "detections.json")
    log.info("mAP %.4f, mAP@.50IOU %.4f, mAP@.75IOU %.4f; %d false positives, %d false negatives "
             "at score >= %.2f -> %s", metrics[COCO_STAT_NAMES[0]], metrics[COCO_STAT_NAMES[1]],
             metrics[COCO_STAT_NAMES[2]], errors["false_positives"]["total"],
             errors["false_negatives"]["total"], score_threshold, out)
    return {
        "out": str(out),
        "metrics": metrics,
        "files": {name: str(out / f"{name}.json")
                  for name in ("metrics", "pr_curves", "error_analysis", "detections")},
        "num_images": len(gt["images"]),
        "num_ground_truth": len(gt["annotations"]),
        "num_detections": len(dets),
    }
