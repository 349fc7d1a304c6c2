"""COCO evaluation and error analysis on hand-built cases, cross-checked with pycocotools."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest

from tasks.errors import PersoncarError
from tasks.evaluate import COCO_STAT_NAMES, evaluate, per_class_key

CATEGORIES = [{"id": 1, "name": "person", "supercategory": "none"},
              {"id": 2, "name": "car", "supercategory": "none"}]


def make_gt(boxes: list[tuple[int, int, list[float]]], n_images: int = 3) -> dict:
    """``boxes``: (image_id, category_id, [x, y, w, h]); pixel areas."""
    return {
        "images": [{"id": i, "file_name": f"image_{i + 1:09d}.jpg", "width": 640, "height": 480}
                   for i in range(n_images)],
        "annotations": [{"id": k + 1, "image_id": im, "category_id": c, "bbox": b,
                         "area": b[2] * b[3], "iscrowd": 0, "segmentation": []}
                        for k, (im, c, b) in enumerate(boxes)],
        "categories": CATEGORIES,
    }


def write(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj))
    return path


def coco_direct(gt_path: Path, det_path: Path, cat_ids: list[int] | None = None):
    """pycocotools used the documented way: COCO(file), loadRes(file), COCOeval."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_path))
        dt = gt.loadRes(str(det_path))
        ev = COCOeval(gt, dt, "bbox")
        if cat_ids is not None:
            ev.params.catIds = cat_ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


# Boxes covering every COCO size bucket for both classes.
ALL_SIZES = [
    (0, 1, [10, 10, 20, 20]),      # small person
    (0, 2, [100, 100, 50, 40]),    # medium car
    (0, 1, [300, 50, 120, 250]),   # large person
    (1, 2, [5, 300, 25, 25]),      # small car
    (1, 1, [200, 200, 60, 60]),    # medium person
    (2, 2, [50, 50, 300, 200]),    # large car
    (2, 1, [400, 300, 40, 90]),    # medium person
]


def test_ground_truth_as_detections_scores_one(tmp_path: Path) -> None:
    gt = make_gt(ALL_SIZES)
    dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
            for a in gt["annotations"]]
    res = evaluate(write(tmp_path / "gt.json", gt), write(tmp_path / "det.json", dets), tmp_path / "out")

    m = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert m == res["metrics"]
    for name in COCO_STAT_NAMES:
        if name.endswith("AR@1"):
            continue  # AR@1 is capped by images holding several boxes
        assert m[name] == pytest.approx(1.0), name
    for cls in ("person", "car"):
        for iou in (None, ".50", ".75"):
            assert m[per_class_key(cls, iou)] == pytest.approx(1.0)
    curves = json.loads((tmp_path / "out" / "pr_curves.json").read_text())
    assert len(curves["recall_thresholds"]) == 101
    for cls in ("person", "car"):
        for iou in ("iou_0.50", "iou_0.75"):
            c = curves["classes"][cls][iou]
            assert c["precision"] == [1.0] * 101 and c["max_recall"] == 1.0
    errors = json.loads((tmp_path / "out" / "error_analysis.json").read_text())
    assert errors["false_positives"]["total"] == 0 and errors["false_negatives"]["total"] == 0
    assert errors["true_positives"]["total"] == len(ALL_SIZES)
    assert errors["worst_images"] == []


@pytest.mark.parametrize("ids", ["from_zero", "shuffled_with_zero"])
def test_ground_truth_as_detections_is_one_whatever_the_annotation_ids(tmp_path: Path, ids: str) -> None:
    """pycocotools alone scores a match to annotation id 0 as a miss (the real file starts at 0)."""
    gt = make_gt(ALL_SIZES)
    new_ids = list(range(len(ALL_SIZES))) if ids == "from_zero" else [7, 0, 3, 12, 1, 5, 9]
    for a, new_id in zip(gt["annotations"], new_ids, strict=True):
        a["id"] = new_id
    dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
            for a in gt["annotations"]]
    gt_path, det_path = write(tmp_path / "gt.json", gt), write(tmp_path / "det.json", dets)
    m = evaluate(gt_path, det_path, tmp_path / "out")["metrics"]
    assert m["DetectionBoxes_Precision/mAP"] == 1.0
    assert m["DetectionBoxes_Precision/mAP@.50IOU"] == 1.0
    assert m["DetectionBoxes_Recall/AR@100"] == 1.0
    # the undercount is real: pycocotools on the same files misses the box with id 0
    assert coco_direct(gt_path, det_path).stats[0] < 1.0


def test_hand_built_case_agrees_with_pycocotools(tmp_path: Path) -> None:
    gt = make_gt([
        (0, 1, [10, 10, 100, 200]),
        (0, 2, [300, 200, 120, 80]),
        (1, 1, [50, 60, 30, 40]),
        (1, 2, [200, 100, 70, 50]),
    ], n_images=2)
    dets = [
        {"image_id": 0, "category_id": 1, "bbox": [10, 10, 100, 200], "score": 0.9},   # perfect
        {"image_id": 0, "category_id": 2, "bbox": [330, 205, 120, 80], "score": 0.8},  # shifted
        {"image_id": 0, "category_id": 1, "bbox": [450, 20, 60, 60], "score": 0.95},   # false positive
        {"image_id": 1, "category_id": 1, "bbox": [53, 58, 30, 44], "score": 0.6},     # close
        {"image_id": 1, "category_id": 2, "bbox": [215, 100, 70, 50], "score": 0.4},   # shifted
    ]
    gt_path, det_path = write(tmp_path / "gt.json", gt), write(tmp_path / "det.json", dets)
    m = evaluate(gt_path, det_path, tmp_path / "out")["metrics"]

    ev = coco_direct(gt_path, det_path)
    for i, name in enumerate(COCO_STAT_NAMES):
        assert m[name] == pytest.approx(float(ev.stats[i]), abs=1e-12), name
    # The case is not trivial: neither perfect nor zero.
    assert 0.0 < m["DetectionBoxes_Precision/mAP"] < 1.0
    assert m["DetectionBoxes_Precision/mAP@.50IOU"] != m["DetectionBoxes_Precision/mAP@.75IOU"]

    # Per class AP: COCOeval restricted to one category gives the same number.
    for cid, name in ((1, "person"), (2, "car")):
        one = coco_direct(gt_path, det_path, cat_ids=[cid])
        assert m[per_class_key(name)] == pytest.approx(float(one.stats[0]), abs=1e-12)
        assert m[per_class_key(name, ".50")] == pytest.approx(float(one.stats[1]), abs=1e-12)
        assert m[per_class_key(name, ".75")] == pytest.approx(float(one.stats[2]), abs=1e-12)

    curves = json.loads((tmp_path / "out" / "pr_curves.json").read_text())
    for k, name in enumerate(("person", "car")):
        for label, t in (("iou_0.50", 0), ("iou_0.75", 5)):
            expected = ev.eval["precision"][t, :, k, 0, 2]
            assert np.allclose(curves["classes"][name][label]["precision"], expected)
            assert curves["classes"][name][label]["recall"] == pytest.approx(list(ev.params.recThrs))


def test_empty_detections_give_zero_metrics(tmp_path: Path) -> None:
    gt = make_gt(ALL_SIZES)
    res = evaluate(write(tmp_path / "gt.json", gt), write(tmp_path / "det.json", []), tmp_path / "out")
    for name in COCO_STAT_NAMES:
        assert res["metrics"][name] == 0.0, name
    assert res["metrics"][per_class_key("car")] == 0.0
    errors = json.loads((tmp_path / "out" / "error_analysis.json").read_text())
    assert errors["false_negatives"]["total"] == len(ALL_SIZES)
    assert errors["false_negatives"]["by_size"] == {"small": 2, "medium": 3, "large": 2}
    assert json.loads((tmp_path / "out" / "detections.json").read_text()) == []


def test_unknown_image_id_is_a_user_error_and_writes_nothing(tmp_path: Path) -> None:
    gt = make_gt(ALL_SIZES)
    dets = [{"image_id": 0, "category_id": 1, "bbox": [10, 10, 20, 20], "score": 0.9},
            {"image_id": 99, "category_id": 1, "bbox": [10, 10, 20, 20], "score": 0.9}]
    with pytest.raises(PersoncarError, match=r"detection #1 refers to image_id 99"):
        evaluate(write(tmp_path / "gt.json", gt), write(tmp_path / "det.json", dets), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_unknown_category_and_bad_files_are_user_errors(tmp_path: Path) -> None:
    gt_path = write(tmp_path / "gt.json", make_gt(ALL_SIZES))
    bad_cat = [{"image_id": 0, "category_id": 7, "bbox": [1, 1, 2, 2], "score": 0.5}]
    with pytest.raises(PersoncarError, match="category_id 7"):
        evaluate(gt_path, write(tmp_path / "d1.json", bad_cat), tmp_path / "out")
    with pytest.raises(PersoncarError, match="must be a JSON list"):
        evaluate(gt_path, write(tmp_path / "d2.json", {"detections": []}), tmp_path / "out")
    (tmp_path / "d3.json").write_text("[{")
    with pytest.raises(PersoncarError, match="not valid JSON"):
        evaluate(gt_path, tmp_path / "d3.json", tmp_path / "out")
    with pytest.raises(PersoncarError, match="not found"):
        evaluate(gt_path, tmp_path / "missing.json", tmp_path / "out")
    no_area = make_gt(ALL_SIZES)
    del no_area["annotations"][3]["area"]
    with pytest.raises(PersoncarError, match="annotation id 4 has no numeric 'area'"):
        evaluate(write(tmp_path / "gt2.json", no_area), write(tmp_path / "d4.json", []), tmp_path / "out")
    twice = make_gt(ALL_SIZES)
    twice["images"].append(dict(twice["images"][0]))
    with pytest.raises(PersoncarError, match=r"gt3.json: images\[\d+\] repeats image id 0"):
        evaluate(write(tmp_path / "gt3.json", twice), write(tmp_path / "d5.json", []), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_fractional_areas_are_refused_with_the_reason(tmp_path: Path) -> None:
    gt = make_gt(ALL_SIZES)
    for a in gt["annotations"]:
        a["area"] = a["bbox"][2] * a["bbox"][3] / (640 * 480)
    with pytest.raises(PersoncarError) as e:
        evaluate(write(tmp_path / "gt.json", gt), write(tmp_path / "det.json", []), tmp_path / "out")
    msg = str(e.value)
    assert "fractions of the image" in msg and "w*h" in msg and "gt.json" in msg
    assert "\n" not in msg
    # A file of genuinely tiny boxes (all <= 1 px) is not mistaken for fractional areas.
    tiny = make_gt([(0, 1, [10, 10, 1, 1]), (0, 2, [20, 20, 0.5, 1])])
    evaluate(write(tmp_path / "tiny.json", tiny), write(tmp_path / "det.json", []), tmp_path / "out")


def test_error_analysis_counts_each_error_type(tmp_path: Path) -> None:
    gt = make_gt([
        (0, 1, [10, 10, 100, 200]),    # person, large: matched
        (0, 2, [300, 200, 120, 80]),   # car, large (9600 px): matched
        (0, 1, [500, 400, 20, 20]),    # person, small: missed
        (1, 1, [100, 100, 50, 50]),    # person, medium: matched
    ])
    dets = [
        {"image_id": 0, "category_id": 1, "bbox": [10, 10, 100, 200], "score": 0.95},  # TP
        {"image_id": 0, "category_id": 1, "bbox": [12, 12, 100, 200], "score": 0.90},  # duplicate
        {"image_id": 0, "category_id": 1, "bbox": [300, 200, 120, 80], "score": 0.85},  # confusion
        {"image_id": 0, "category_id": 2, "bbox": [300, 200, 120, 80], "score": 0.80},  # TP
        {"image_id": 0, "category_id": 2, "bbox": [360, 200, 120, 80], "score": 0.60},  # localisation (IoU 1/3)
        {"image_id": 0, "category_id": 2, "bbox": [0, 400, 50, 50], "score": 0.70},   # background
        {"image_id": 0, "category_id": 2, "bbox": [200, 0, 50, 50], "score": 0.10},   # below threshold
        {"image_id": 1, "category_id": 1, "bbox": [100, 100, 50, 50], "score": 0.99},  # TP
        {"image_id": 2, "category_id": 1, "bbox": [5, 5, 40, 40], "score": 0.50},     # background
    ]
    res = evaluate(write(tmp_path / "gt.json", gt), write(tmp_path / "det.json", dets), tmp_path / "out",
                   worst_k=5)
    e = json.loads((tmp_path / "out" / "error_analysis.json").read_text())
    assert e["score_threshold"] == 0.3
    assert e["detections_below_threshold"] == 1 and e["detections_considered"] == 8
    assert e["true_positives"] == {"total": 3, "by_class": {"person": 2, "car": 1}}
    fp = e["false_positives"]
    assert fp["by_type"] == {"localisation": 1, "confusion": 1, "duplicate": 1, "background": 2}
    assert fp["by_class"]["person"] == {"localisation": 0, "confusion": 1, "duplicate": 1, "background": 1}
    assert fp["by_class"]["car"] == {"localisation": 1, "confusion": 0, "duplicate": 0, "background": 1}
    fn = e["false_negatives"]
    assert fn["total"] == 1 and fn["by_size"] == {"small": 1, "medium": 0, "large": 0}
    assert fn["by_class"]["person"]["small"] == 1
    assert fn["ground_truth_by_size"] == {"small": 1, "medium": 1, "large": 2}
    worst = e["worst_images"]
    assert [(w["file_name"], w["errors"]) for w in worst] == [
        ("image_000000001.jpg", 5), ("image_000000003.jpg", 1)]
    assert worst[0]["false_positives_by_type"] == {"localisation": 1, "confusion": 1, "duplicate": 1,
                                                   "background": 1}
    assert worst[0]["false_negatives_by_size"] == {"small": 1, "medium": 0, "large": 0}

    # The threshold is a parameter: at 0.05 the low-score box becomes a fifth... background FP.
    evaluate(tmp_path / "gt.json", tmp_path / "det.json", tmp_path / "out2", score_threshold=0.05, worst_k=1)
    e2 = json.loads((tmp_path / "out2" / "error_analysis.json").read_text())
    assert e2["false_positives"]["by_type"]["background"] == 3
    assert [w["file_name"] for w in e2["worst_images"]] == ["image_000000001.jpg"]
    # COCO metrics use every detection regardless of the threshold.
    m2 = json.loads((tmp_path / "out2" / "metrics.json").read_text())
    assert m2 == res["metrics"]


def test_rerun_is_identical_and_detections_inside_out_survive(tmp_path: Path) -> None:
    gt_path = write(tmp_path / "gt.json", make_gt(ALL_SIZES))
    out = tmp_path / "evaluate"
    out.mkdir()
    dets = [{"image_id": 0, "category_id": 1, "bbox": [11, 10, 20, 20], "score": 0.7},
            {"image_id": 2, "category_id": 2, "bbox": [60, 50, 300, 200], "score": 0.9}]
    raw = json.dumps(dets, indent=1)
    (out / "detections.json").write_text(raw)

    evaluate(gt_path, out / "detections.json", out)
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(first) == ["detections.json", "error_analysis.json", "metrics.json", "pr_curves.json"]
    assert first["detections.json"].decode() == raw
    evaluate(gt_path, out / "detections.json", out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evaluate", "gt.json"]
