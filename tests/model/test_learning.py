"""Model tests: the detector really learns (memorises real images), resumes, exports and predicts.

The learning check trains the tiny config (the production architecture, anchors and losses with a
half-width ResNet-26) on a seeded random subset of 4 real images from ``../shared/data/personcar``,
at production's 640 px and without augmentation, and evaluates on the same images (TFRecords built
with --val-fraction 0 and 1): reaching mAP@.50IOU >= 0.95 proves that labels, box coordinates,
class ids, anchors and evaluation line up from the JSON through the TFRecords, the model and
COCOeval. The batch holds as many images as the subset, so the batch-norm statistics the model
trains with are the ones its moving averages converge to, and evaluation (which uses the averages)
sees the model that training fitted, and every step follows the same full gradient. With 6 images
at batch 4 the same 300 steps ended at 0.84 mAP@.50IOU on one machine and 0.61 on another for the
same seeds, the classification loss still at 0.07 at step 250 (1.0 for 4 images at batch 4).
With flip and scale jitter runs ended anywhere between 0.65 and 0.94. At 512 px the check
plateaued at 0.92-0.95 (the real data's small boxes, docs/training.md). The training runs with one
TensorFlow thread per pool: with the default pools, multi-threaded reductions made two runs of the
same seeds part at step 4 and end anywhere from 0.917 to 1.000 (docs/training.md, section 8).
The default config stays SSD ResNet-152 at 640 (tests/unit/test_config.py).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tasks.tfrecords import build_tfrecords

pytestmark = pytest.mark.slow
TINY = "ssd_resnet26_v1_fpn_256x256_tiny"
SUBSET_SEED, SUBSET_IMAGES = 0, 4
#: production's input size and anchors; the whole subset in every batch (see the module's docstring)
LEARN = {"steps": 300, "image_size": 640, "learning_rate": 0.03, "batch_size": SUBSET_IMAGES}


def real_subset(shared_data: Path, root: Path, seed: int = SUBSET_SEED, n: int = SUBSET_IMAGES) -> dict:
    """``n`` random real images (seeded) as a COCO file and an image folder of their own."""
    coco = json.loads((shared_data / "bbox-annotations.sample112.json").read_text())
    ids = sorted(random.Random(seed).sample(sorted(im["id"] for im in coco["images"]), n))
    keep = set(ids)
    coco["images"] = [im for im in coco["images"] if im["id"] in keep]
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] in keep]
    images = root / "images"
    images.mkdir(parents=True)
    for im in coco["images"]:
        (images / im["file_name"]).symlink_to(shared_data / "images" / im["file_name"])
    raw = root / "subset.json"
    raw.write_text(json.dumps(coco))
    return {"ids": ids, "raw": raw, "images": images}


def train_single_threaded(data: Path, model_dir: Path) -> dict:
    """``personcar train`` with LEARN in a process of its own, one TensorFlow thread per pool
    (``TF_NUM_INTRAOP_THREADS`` / ``TF_NUM_INTEROP_THREADS``, read when TensorFlow starts: this
    worker's TensorFlow may already run); the run's summary line."""
    cmd = [sys.executable, "-m", "tasks.cli", "train", "--data", str(data), "--model-dir", str(model_dir),
           "--model", TINY, "--no-augment", "--seed", "1", "--init-checkpoint", "scratch", "--log-every", "50",
           *(x for k, v in LEARN.items() for x in ("--" + k.replace("_", "-"), str(v)))]
    env = {**os.environ, "TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    print(done.stderr[-3000:])
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def overfit(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> dict:
    from tasks.predict import evaluate_model
    from tasks.validate import validate_annotations

    root = tmp_path_factory.mktemp("overfit")
    subset = real_subset(shared_data, root / "data")
    validate_annotations(subset["raw"], root / "validate", images=subset["images"], max_quarantine_fraction=0.2)
    clean = root / "validate" / "annotations.clean.json"
    build_tfrecords(clean, subset["images"], root / "train_tfr", val_fraction=0.0)
    build_tfrecords(clean, subset["images"], root / "eval_tfr", val_fraction=1.0)
    start = time.monotonic()
    summary = train_single_threaded(root / "train_tfr", root / "model")
    metrics = evaluate_model(root / "model", root / "eval_tfr", root / "eval")["metrics"]
    seconds = time.monotonic() - start
    boxes = len(json.loads(clean.read_text())["annotations"])
    print(f"memorise {SUBSET_IMAGES} real images (ids {subset['ids']}, {boxes} boxes): mAP@.50IOU "
          f"{metrics['DetectionBoxes_Precision/mAP@.50IOU']:.3f}, mAP {metrics['DetectionBoxes_Precision/mAP']:.3f} "
          f"after {LEARN['steps']} steps in {seconds:.0f} s")
    return {"root": root, "summary": summary, "metrics": metrics, "images": subset["images"], "ids": subset["ids"]}


def test_memorising_real_images_reaches_map50_of_at_least_0_95(overfit: dict) -> None:
    m = overfit["metrics"]
    assert m["DetectionBoxes_Precision/mAP@.50IOU"] >= 0.95, m
    assert m["DetectionBoxes_PerformanceByCategory/mAP/person"] > 0.5
    assert m["DetectionBoxes_PerformanceByCategory/mAP/car"] > 0.5


def test_losses_fall_and_are_logged_under_od_api_names(overfit: dict) -> None:
    from tasks.report import read_scalars

    flat = read_scalars(overfit["root"] / "model")["train"]
    for tag in ("Loss/classification_loss", "Loss/localization_loss", "Loss/regularization_loss",
                "Loss/total_loss", "learning_rate"):
        assert tag in flat, sorted(flat)
    total = [v for _, v in flat["Loss/total_loss"]]
    assert total[-1] < 0.8 * total[0]
    for tag in ("Loss/classification_loss", "Loss/localization_loss"):  # memorised: both near zero
        values = [v for _, v in flat[tag]]
        assert values[-1] < 0.2 * values[0], (tag, values)
    assert overfit["summary"]["steps"] == LEARN["steps"]


def test_saved_model_predicts_the_same_on_images_and_on_tfrecords(overfit: dict, tmp_path: Path) -> None:
    from tasks.predict import predict

    on_records = predict(overfit["root"] / "model", tmp_path / "a.json", data=overfit["root"] / "eval_tfr")
    on_images = predict(overfit["root"] / "model", tmp_path / "b.json", images=overfit["images"])
    key = lambda d: (d["image_id"], d["category_id"], d["score"])
    assert sorted(on_records, key=key) == sorted(on_images, key=key)
    assert {d["image_id"] for d in on_images} == set(overfit["ids"])
    saved = overfit["root"] / "model" / "exported"
    assert (saved / "saved_model.pb").is_file()
    assert json.loads((tmp_path / "a.json").read_text()) == on_records


def test_checkpoints_are_kept_to_the_last_few(overfit: dict) -> None:
    index = sorted(p.name for p in (overfit["root"] / "model").glob("ckpt-*.index"))
    assert 1 <= len(index) <= 3 and f"ckpt-{LEARN['steps']}.index" in index


def test_saved_model_and_detections_file_evaluate_to_the_same_numbers(overfit: dict, tmp_path: Path) -> None:
    from tasks.cli import main
    from tasks.evaluate import evaluate
    from tasks.predict import predict

    root = overfit["root"]
    predict(root / "model", tmp_path / "det.json", data=root / "eval_tfr")
    from_file = evaluate(root / "eval_tfr" / "val.coco.json", tmp_path / "det.json", tmp_path / "a")
    assert from_file["metrics"] == overfit["metrics"]
    assert main(["evaluate", "--model-dir", str(root / "model"), "--data", str(root / "eval_tfr"),
                 "--out", str(tmp_path / "b")]) == 0
    a = json.loads((tmp_path / "a" / "metrics.json").read_text())
    b = json.loads((tmp_path / "b" / "metrics.json").read_text())
    c = json.loads((root / "eval" / "metrics.json").read_text())
    assert a == b == c
