"""Does it learn on real images? Memorise random subsets of the real images and print mAP per subset.

Each subset of ``--images`` real photos from ``../shared/data/personcar`` goes through the
pipeline's own validation (Great Expectations; pixel areas recomputed, zero-size boxes quarantined)
and TFRecords (all images as train, and again as the evaluation split), trains the given model
without augmentation and evaluates on the same images. A pipeline whose labels, boxes, class ids,
anchors and evaluation line up memorises them (mAP@.50IOU >= 0.95).

    .venv/bin/python benchmarks/bench_memorise.py --subsets 3 --images 4 --batch-size 4 --steps 300 --image-size 640
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared" / "data" / "personcar"
TINY = "ssd_resnet26_v1_fpn_256x256_tiny"


def subset(coco: dict, image_ids: list[int]) -> dict:
    keep = set(image_ids)
    return {**coco, "images": [im for im in coco["images"] if im["id"] in keep],
            "annotations": [a for a in coco["annotations"] if a["image_id"] in keep]}


def memorise(work: Path, image_ids: list[int], *, model: str, steps: int, image_size: int | None,
             learning_rate: float, batch_size: int, seed: int) -> dict:
    """Validate + TFRecords + train (no augmentation) + evaluate on the same images; the figures."""
    from tasks.config import RunConfig
    from tasks.predict import evaluate_model
    from tasks.tfrecords import build_tfrecords
    from tasks.train import train
    from tasks.validate import validate_annotations

    coco = json.loads((SHARED / "bbox-annotations.sample112.json").read_text())
    raw = work / "subset.json"
    raw.write_text(json.dumps(subset(coco, image_ids)))
    validate_annotations(raw, work / "validate", images=SHARED / "images", max_quarantine_fraction=0.2)
    clean = work / "validate" / "annotations.clean.json"
    build_tfrecords(clean, SHARED / "images", work / "train_tfr", val_fraction=0.0)
    build_tfrecords(clean, SHARED / "images", work / "eval_tfr", val_fraction=1.0)
    t0 = time.monotonic()
    run = RunConfig(model=model, steps=steps, image_size=image_size, learning_rate=learning_rate,
                    batch_size=batch_size, augment=False, seed=seed, init_checkpoint="scratch", validate_every=0)
    summary = train(work / "train_tfr", work / "model", run, log_every=50)
    metrics = evaluate_model(work / "model", work / "eval_tfr", work / "eval")["metrics"]
    boxes = len(json.loads(clean.read_text())["annotations"])
    return {"images": len(image_ids), "boxes": boxes, "steps": steps, "seconds": round(time.monotonic() - t0, 1),
            "mAP@.50IOU": round(metrics["DetectionBoxes_Precision/mAP@.50IOU"], 4),
            "mAP": round(metrics["DetectionBoxes_Precision/mAP"], 4),
            "final_losses": {k.split("/")[1]: round(v, 4) for k, v in summary["final_losses"].items()}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--subsets", type=int, default=3)
    p.add_argument("--images", type=int, default=6)
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--model", default=TINY)
    p.add_argument("--image-size", type=int)
    p.add_argument("--learning-rate", type=float, default=0.03)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seed", type=int, default=0, help="first subset seed (subset k uses seed + k)")
    p.add_argument("--run-seed", type=int, help="seed of every run (default: the subset's seed)")
    a = p.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for noisy in ("absl", "tensorflow", "great_expectations"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    ids = sorted(im["id"] for im in json.loads((SHARED / "bbox-annotations.sample112.json").read_text())["images"])
    rows = []
    for k in range(a.subsets):
        seed = a.seed + k
        chosen = sorted(random.Random(seed).sample(ids, a.images))
        with tempfile.TemporaryDirectory(prefix="memorise-") as tmp:
            row = {"subset_seed": seed, "image_ids": chosen,
                   **memorise(Path(tmp), chosen, model=a.model, steps=a.steps, image_size=a.image_size,
                              learning_rate=a.learning_rate, batch_size=a.batch_size,
                              seed=seed if a.run_seed is None else a.run_seed)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"{a.model} at {a.image_size or 'its default size'}, {a.steps} steps, batch {a.batch_size}, LR "
          f"{a.learning_rate}: mAP@.50IOU " + ", ".join(f"{r['mAP@.50IOU']:.3f}" for r in rows)
          + f" ({sum(r['seconds'] for r in rows) / len(rows):.0f} s a subset)")


if __name__ == "__main__":
    main()
