"""Where a detector goes wrong: false positives by type, missed boxes by size, the worst images.

Kept hand-written because pycocotools only reports averages: COCOeval has no per-detection error
type, and the report needs counts a reader can act on (duplicates mean NMS, confusions mean the
classes, localisation means the box head, background means the score threshold or the data).

Detections scoring at least ``score_threshold`` are matched to the ground truth greedily by score
(same class, IoU >= ``iou_match``, ties in file order, as COCOeval does); crowd boxes absorb their
matches. Each unmatched detection gets the first type that applies: ``duplicate`` (overlaps a
same-class box already matched), ``confusion`` (overlaps a box of another class), ``localisation``
(IoU in [0.1, ``iou_match``) with a same-class box), else ``background``. Missed boxes are counted
by COCO size bucket of their pixel ``area``.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any

SIZE_BUCKETS = ("small", "medium", "large")
FP_TYPES = ("localisation", "confusion", "duplicate", "background")
LOCALISATION_MIN_IOU = 0.1


def size_bucket(area: float) -> str:
    """COCO's size bucket of a pixel area."""
    if area < 32**2:
        return "small"
    if area < 96**2:
        return "medium"
    return "large"


def _iou(a: list[float], b: list[float]) -> float:
    iw = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    ih = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union > 0 else 0.0


def _outcome(d: dict[str, Any], real: list[dict[str, Any]], crowd: list[dict[str, Any]], matched: set[int],
             iou_match: float) -> str:
    """``"tp"`` (and ``matched`` grows), ``"ignored"`` (a crowd box) or the false positive's type."""
    same = [(j, _iou(d["bbox"], g["bbox"])) for j, g in enumerate(real) if g["category_id"] == d["category_id"]]
    if free := [(j, v) for j, v in same if j not in matched and v >= iou_match]:
        matched.add(max(free, key=lambda t: (t[1], -t[0]))[0])
        return "tp"
    if any(_iou(d["bbox"], g["bbox"]) >= iou_match for g in crowd if g["category_id"] == d["category_id"]):
        return "ignored"
    if any(j in matched and v >= iou_match for j, v in same):
        return "duplicate"
    if any(g["category_id"] != d["category_id"] and _iou(d["bbox"], g["bbox"]) >= iou_match for g in real):
        return "confusion"
    if any(LOCALISATION_MIN_IOU <= v < iou_match for _, v in same):
        return "localisation"
    return "background"


class _Tally:
    """Counts per class over the whole split, and the images with errors."""

    def __init__(self, names: list[str]):
        self.names = names
        self.tp: Counter[str] = Counter()
        self.fp = {n: Counter() for n in names}
        self.fn = {n: Counter() for n in names}
        self.gt_by_size = {n: Counter() for n in names}
        self.ignored = 0
        self.per_image: list[dict[str, Any]] = []

    def image(self, img: dict[str, Any], gts: list[dict[str, Any]], dets: list[dict[str, Any]],
              names: dict[Any, str], iou_match: float) -> None:
        real = [g for g in gts if not g.get("iscrowd", 0)]
        crowd = [g for g in gts if g.get("iscrowd", 0)]
        matched: set[int] = set()
        img_fp, img_fn, img_tp = Counter(), Counter(), 0
        for d in sorted(dets, key=lambda d: -d["score"]):  # stable: ties keep file order, as COCOeval does
            cname, kind = names[d["category_id"]], _outcome(d, real, crowd, matched, iou_match)
            if kind == "tp":
                self.tp[cname] += 1
                img_tp += 1
            elif kind == "ignored":
                self.ignored += 1
            else:
                self.fp[cname][kind] += 1
                img_fp[kind] += 1
        for j, g in enumerate(real):
            cname, bucket = names[g["category_id"]], size_bucket(float(g["area"]))
            self.gt_by_size[cname][bucket] += 1
            if j not in matched:
                self.fn[cname][bucket] += 1
                img_fn[bucket] += 1
        if n_err := sum(img_fp.values()) + sum(img_fn.values()):
            self.per_image.append({
                "image_id": img["id"], "file_name": str(img.get("file_name", img["id"])), "errors": n_err,
                "false_positives": sum(img_fp.values()), "false_negatives": sum(img_fn.values()),
                "true_positives": img_tp,
                "false_positives_by_type": {k: img_fp[k] for k in FP_TYPES},
                "false_negatives_by_size": {k: img_fn[k] for k in SIZE_BUCKETS},
            })

    def summary(self, worst_k: int) -> dict[str, Any]:
        def total(counter_by_class: dict[str, Counter], keys: tuple[str, ...]) -> dict[str, int]:
            return {k: sum(c[k] for c in counter_by_class.values()) for k in keys}

        def by_class(counter_by_class: dict[str, Counter], keys: tuple[str, ...]) -> dict[str, dict[str, int]]:
            return {n: {k: counter_by_class[n][k] for k in keys} for n in self.names}

        self.per_image.sort(key=lambda r: (-r["errors"], r["file_name"], str(r["image_id"])))
        return {
            "detections_ignored_crowd": self.ignored,
            "true_positives": {"total": sum(self.tp.values()), "by_class": {n: self.tp[n] for n in self.names}},
            "false_positives": {"total": sum(sum(c.values()) for c in self.fp.values()),
                                "by_type": total(self.fp, FP_TYPES), "by_class": by_class(self.fp, FP_TYPES)},
            "false_negatives": {
                "total": sum(sum(c.values()) for c in self.fn.values()),
                "by_size": total(self.fn, SIZE_BUCKETS), "by_class": by_class(self.fn, SIZE_BUCKETS),
                "ground_truth_by_size": total(self.gt_by_size, SIZE_BUCKETS),
                "ground_truth_by_class": by_class(self.gt_by_size, SIZE_BUCKETS),
            },
            "worst_images": self.per_image[:max(worst_k, 0)],
        }


def error_analysis(gt: dict[str, Any], dets: list[dict[str, Any]], *, iou_match: float = 0.5,
                   score_threshold: float = 0.3, worst_k: int = 10) -> dict[str, Any]:
    """Classify false positives and false negatives of the detections scoring >= ``score_threshold``."""
    names = {c["id"]: str(c.get("name", c["id"])) for c in gt["categories"]}
    gts_by_image: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for a in gt["annotations"]:
        gts_by_image[a["image_id"]].append(a)
    dets_by_image: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    kept = [d for d in dets if d["score"] >= score_threshold]
    for d in kept:
        dets_by_image[d["image_id"]].append(d)
    tally = _Tally(list(names.values()))
    for img in sorted(gt["images"], key=lambda i: (str(type(i["id"])), i["id"])):
        tally.image(img, gts_by_image.get(img["id"], []), dets_by_image.get(img["id"], []), names, iou_match)
    return {
        "score_threshold": score_threshold, "iou_match": iou_match, "localisation_min_iou": LOCALISATION_MIN_IOU,
        "detections_considered": len(kept), "detections_below_threshold": len(dets) - len(kept),
        **tally.summary(worst_k),
    }
