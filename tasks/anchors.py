"""Anchor coverage: can the model's anchors match the data's boxes at all?

RetinaNet labels an anchor positive when its IoU with a ground-truth box reaches the matcher's
threshold (0.5); a box whose best anchor stays below it is still force-matched to that anchor, but
the regression must then cover a large change of shape and position, and small boxes that no anchor
fits are where a detector of this family loses most of its recall. The share of boxes whose best
anchor reaches the threshold is the "best possible recall" (BPR) that YOLOv5's autoanchor checks
before training; here it is computed from the validated boxes and the model config (input size,
pyramid levels, anchor size, scales and aspect ratios), position-aware: every box is compared with
the anchors centred on the grid points around its centre, on every level, as the labeler sees them
after the fixed-shape resize.

Pure numpy (no TensorFlow): it runs in validation, in the report and in ``benchmarks/``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

MATCH_IOU = 0.5  # Model Garden's RetinaNet labeler (the zoo's argmax matcher) threshold
COVERAGE_WARNING = 0.85  # below this share of boxes, validation warns before any GPU time


@dataclass(frozen=True)
class AnchorSpec:
    """What decides the anchors: ``anchor_size`` x stride x 2**(i / num_scales), per aspect ratio."""

    image_size: int
    min_level: int = 3
    max_level: int = 7
    anchor_size: float = 4.0
    num_scales: int = 2
    aspect_ratios: tuple[float, ...] = (1.0, 2.0, 0.5)

    @classmethod
    def from_model(cls, model_spec: dict[str, Any], image_size: int | None = None) -> AnchorSpec:
        """From a model config (``tasks/configs/*.yaml`` resolved); ``image_size`` overrides its input."""
        m = model_spec["override"]["task"]["model"]
        a = m.get("anchor", {})
        size = image_size or model_spec.get("defaults", {}).get("image_size") or m["input_size"][0]
        return cls(image_size=int(size), min_level=int(m.get("min_level", 3)), max_level=int(m.get("max_level", 7)),
                   anchor_size=float(a.get("anchor_size", 4.0)), num_scales=int(a.get("num_scales", 2)),
                   aspect_ratios=tuple(float(r) for r in a.get("aspect_ratios", (1.0, 2.0, 0.5))))

    def shapes(self, level: int) -> np.ndarray:
        """[A, 2] anchor (width, height) in input pixels on a level, in Model Garden's order."""
        stride = 2**level
        out = []
        for scale in range(self.num_scales):
            base = self.anchor_size * stride * 2 ** (scale / self.num_scales)
            for ratio in self.aspect_ratios:
                out.append((base * math.sqrt(ratio), base / math.sqrt(ratio)))
        return np.asarray(out, dtype=np.float64)

    def smallest_anchor(self) -> float:
        return float(self.anchor_size * 2**self.min_level)

    def describe(self) -> str:
        return (f"{self.image_size}x{self.image_size}, levels {self.min_level}-{self.max_level}, anchor size "
                f"{self.anchor_size:g}, {self.num_scales} scales, ratios {'/'.join(f'{r:g}' for r in self.aspect_ratios)}")


def resized_boxes(coco: dict[str, Any], image_size: int) -> np.ndarray:
    """[N, 4] (cx, cy, w, h) of every box with positive size, after the fixed ``image_size`` resize."""
    sizes = {img["id"]: (float(img["width"]), float(img["height"])) for img in coco["images"]}
    rows = []
    for a in coco["annotations"]:
        x, y, w, h = (float(v) for v in a["bbox"])
        if w <= 0 or h <= 0 or a.get("image_id") not in sizes:
            continue
        iw, ih = sizes[a["image_id"]]
        sx, sy = image_size / iw, image_size / ih
        rows.append(((x + w / 2) * sx, (y + h / 2) * sy, w * sx, h * sy))
    return np.asarray(rows, dtype=np.float64).reshape(-1, 4)


def best_anchor_iou(boxes: np.ndarray, spec: AnchorSpec) -> np.ndarray:
    """For each (cx, cy, w, h) box, the IoU of its best anchor over all levels, shapes and nearby centres."""
    if not len(boxes):
        return np.zeros(0)
    cx, cy, w, h = (boxes[:, i : i + 1] for i in range(4))  # [N, 1]
    x0, y0, x1, y1 = cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2
    best = np.zeros(len(boxes))
    for level in range(spec.min_level, spec.max_level + 1):
        stride = 2.0**level
        cells = max(1, math.ceil(spec.image_size / stride))
        shapes = spec.shapes(level)  # [A, 2]
        aw, ah = shapes[:, 0][None, :], shapes[:, 1][None, :]  # [1, A]
        kx = np.floor(cx / stride - 0.5)
        ky = np.floor(cy / stride - 0.5)
        for dx in (0, 1):
            for dy in (0, 1):
                ax = (np.clip(kx + dx, 0, cells - 1) + 0.5) * stride
                ay = (np.clip(ky + dy, 0, cells - 1) + 0.5) * stride
                iw = np.clip(np.minimum(x1, ax + aw / 2) - np.maximum(x0, ax - aw / 2), 0, None)
                ih = np.clip(np.minimum(y1, ay + ah / 2) - np.maximum(y0, ay - ah / 2), 0, None)
                inter = iw * ih
                iou = inter / (w * h + aw * ah - inter)
                best = np.maximum(best, iou.max(axis=1))
    return best


def anchor_coverage(coco: dict[str, Any], spec: AnchorSpec, *, match_iou: float = MATCH_IOU) -> dict[str, Any]:
    """Best-possible-recall summary of ``coco``'s boxes for the anchors of ``spec``."""
    boxes = resized_boxes(coco, spec.image_size)
    best = best_anchor_iou(boxes, spec)
    short = np.minimum(boxes[:, 2], boxes[:, 3]) if len(boxes) else np.zeros(0)
    covered = best >= match_iou
    by_side = {}
    for name, lo, hi in (("under_16px", 0, 16), ("16_to_32px", 16, 32), ("32_to_96px", 32, 96), ("over_96px", 96, math.inf)):
        sel = (short >= lo) & (short < hi)
        by_side[name] = {"boxes": int(sel.sum()),
                         "coverage": round(float(covered[sel].mean()), 4) if sel.any() else None}
    n = len(boxes)
    return {
        "anchors": spec.describe(),
        "image_size": spec.image_size,
        "smallest_anchor_px": spec.smallest_anchor(),
        "match_iou": match_iou,
        "boxes": n,
        "coverage": round(float(covered.mean()), 4) if n else None,
        "mean_best_iou": round(float(best.mean()), 4) if n else None,
        "boxes_below_match_iou": int(n - covered.sum()),
        "by_shorter_side": by_side,
        "warning_below": COVERAGE_WARNING,
    }


def coverage_warning(cov: dict[str, Any]) -> str | None:
    """A sentence when the coverage is below :data:`COVERAGE_WARNING`, else None."""
    if cov.get("coverage") is None or cov["coverage"] >= cov.get("warning_below", COVERAGE_WARNING):
        return None
    small = cov["by_shorter_side"]["under_16px"]
    return (f"only {cov['coverage']:.1%} of {cov['boxes']} boxes have an anchor with IoU >= {cov['match_iou']:g} "
            f"at {cov['anchors']} (boxes with a side under 16 px after resizing: {small['boxes']}, of which "
            f"{(small['coverage'] or 0):.0%} covered); a larger image size or smaller anchors fit this data better")


def coverage_for_run(annotations: Any, model: str, image_size: int | None = None) -> dict[str, Any]:
    """Anchor coverage of a COCO file (path or dict) for a model config at its (or the given) input size."""
    import json
    from pathlib import Path

    from tasks.config import load_model_config

    coco = json.loads(Path(annotations).read_text()) if not isinstance(annotations, dict) else annotations
    spec = AnchorSpec.from_model(load_model_config(model), image_size)
    return {"model": model, **anchor_coverage(coco, spec)}


def write_coverage(annotations: Any, out_dir: Any, model: str, image_size: int | None = None) -> dict[str, Any]:
    """``OUT/anchor_coverage.json`` for the validated boxes; logs a warning below the threshold."""
    from pathlib import Path

    from tasks.artifacts import write_json_atomic
    from tasks.logs import log

    cov = coverage_for_run(annotations, model, image_size)
    warning = coverage_warning(cov)
    cov["warning"] = warning
    write_json_atomic(Path(out_dir) / "anchor_coverage.json", cov)
    if warning:
        log.warning("anchor coverage: %s", warning)
    else:
        log.info("anchor coverage: %.1f%% of %d boxes have an anchor with IoU >= %g (%s)", 100 * cov["coverage"],
                 cov["boxes"], cov["match_iou"], cov["anchors"])
    return cov
