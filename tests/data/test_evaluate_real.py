"""COCO evaluation on the real 112-image ground truth: pixel areas must reach COCOeval."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest

from tasks.errors import PersoncarError
from tasks.evaluate import evaluate

pytestmark = pytest.mark.realdata

MAP = "DetectionBoxes_Precision/mAP"
SIZES = ("small", "medium", "large")


@pytest.fixture(scope="module")
def raw_gt_path(shared_data: Path) -> Path:
    return shared_data / "bbox-annotations.sample112.json"


@pytest.fixture(scope="module")
def pixel_gt_path(raw_gt_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real annotations with ``area`` recomputed in pixels (w*h), as the tfrecords stage does."""
    gt = json.loads(raw_gt_path.read_text())
    for a in gt["annotations"]:
        a["area"] = a["bbox"][2] * a["bbox"][3]
    path = tmp_path_factory.mktemp("gt") / "val.coco.json"
    path.write_text(json.dumps(gt))
    return path


def synthetic_detections(gt: dict, seed: int = 5) -> list[dict]:
    """GT boxes jittered by a seeded RNG, 10% dropped, plus random false positives."""
    rng = np.random.default_rng(seed)
    sizes = {img["id"]: (img["width"], img["height"]) for img in gt["images"]}
    dets = []
    for a in gt["annotations"]:
        if rng.random() < 0.1:
            continue
        x, y, w, h = a["bbox"]
        dx, dy = rng.normal(0, 0.12, 2) * [w, h]
        sw, sh = np.exp(rng.normal(0, 0.12, 2))
        dets.append({"image_id": a["image_id"], "category_id": a["category_id"],
                     "bbox": [float(x + dx), float(y + dy), float(w * sw), float(h * sh)],
                     "score": float(rng.uniform(0.3, 1.0))})
    for image_id, (width, height) in sizes.items():
        for _ in range(2):
            w, h = rng.uniform(20, width / 3), rng.uniform(20, height / 3)
            dets.append({"image_id": image_id, "category_id": int(rng.integers(1, 3)),
                         "bbox": [float(rng.uniform(0, width - w)), float(rng.uniform(0, height - h)),
                                  float(w), float(h)],
                         "score": float(rng.uniform(0.05, 0.8))})
    return dets


def test_pixel_areas_give_a_size_breakdown(pixel_gt_path: Path, tmp_path: Path) -> None:
    gt = json.loads(pixel_gt_path.read_text())
    perfect = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
               for a in gt["annotations"]]
    (tmp_path / "perfect.json").write_text(json.dumps(perfect))
    best = evaluate(pixel_gt_path, tmp_path / "perfect.json", tmp_path / "perfect")["metrics"]
    assert best[MAP] == pytest.approx(1.0)

    (tmp_path / "det.json").write_text(json.dumps(synthetic_detections(gt)))
    res = evaluate(pixel_gt_path, tmp_path / "det.json", tmp_path / "out")
    m = res["metrics"]
    for size in SIZES:
        assert 0.0 < m[f"DetectionBoxes_Precision/mAP ({size})"] <= 1.0, size
        assert 0.0 < m[f"DetectionBoxes_Recall/AR@100 ({size})"] <= 1.0, size
    assert 0.0 < m[MAP] < best[MAP]
    assert m["DetectionBoxes_Precision/mAP@.50IOU"] > m["DetectionBoxes_Precision/mAP@.75IOU"] > 0
    for cls in ("person", "car"):
        assert 0.0 < m[f"DetectionBoxes_PerformanceByCategory/mAP/{cls}"] < 1.0

    e = json.loads((tmp_path / "out" / "error_analysis.json").read_text())
    gt_by_size = e["false_negatives"]["ground_truth_by_size"]
    assert sum(gt_by_size.values()) == len(gt["annotations"]) == 934
    assert all(gt_by_size[s] > 100 for s in SIZES)
    assert e["false_negatives"]["total"] > 0 and e["false_positives"]["total"] > 0
    assert len(e["worst_images"]) == 10
    assert all(w["file_name"].startswith("image_") for w in e["worst_images"])


def test_raw_fractional_areas_are_refused(raw_gt_path: Path, tmp_path: Path) -> None:
    gt = json.loads(raw_gt_path.read_text())
    (tmp_path / "det.json").write_text(json.dumps(synthetic_detections(gt)))
    with pytest.raises(PersoncarError, match=r"fractions of the image.*recompute 'area' as w\*h"):
        evaluate(raw_gt_path, tmp_path / "det.json", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_raw_areas_would_break_cocoeval_silently(raw_gt_path: Path, tmp_path: Path) -> None:
    """Why the check exists: pycocotools itself accepts the fractional areas and returns -1."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = json.loads(raw_gt_path.read_text())
    (tmp_path / "det.json").write_text(json.dumps(synthetic_detections(gt)))
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(raw_gt_path))
        ev = COCOeval(coco, coco.loadRes(str(tmp_path / "det.json")), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    assert ev.stats[4] == -1 and ev.stats[5] == -1  # APm, APl


def _ground_truth_as_detections(gt: dict) -> list[dict]:
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
            for a in gt["annotations"]]


def test_ground_truth_as_detections_scores_exactly_one_on_the_full_file(shared_data: Path, tmp_path: Path) -> None:
    """Every box counts, annotation id 0 included (COCOeval alone drops a match to id 0).

    The three zero-width boxes are left out: validation quarantines them and COCO cannot match them
    (their IoU with anything, themselves included, is 0/0)."""
    gt = json.loads((shared_data / "bbox-annotations.full.json").read_text())
    gt["annotations"] = [a for a in gt["annotations"] if a["bbox"][2] > 0 and a["bbox"][3] > 0]
    for a in gt["annotations"]:
        a["area"] = a["bbox"][2] * a["bbox"][3]
    assert min(a["id"] for a in gt["annotations"]) == 0
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "det.json").write_text(json.dumps(_ground_truth_as_detections(gt)))
    metrics = evaluate(tmp_path / "gt.json", tmp_path / "det.json", tmp_path / "out")["metrics"]
    for key in ("mAP", "mAP@.50IOU", "mAP@.75IOU"):
        assert metrics[f"DetectionBoxes_Precision/{key}"] == 1.0, (key, metrics)
    for name in ("person", "car"):
        assert metrics[f"DetectionBoxes_PerformanceByCategory/mAP/{name}"] == 1.0
    assert metrics["DetectionBoxes_Recall/AR@100"] == 1.0
