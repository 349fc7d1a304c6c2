"""Fine-tuning versus from scratch, on CPU: the same steps on the real images, evaluated on held-out ones.

1. Train the tiny config on a generated sample (``personcar sample``): a checkpoint of this
   project's own, standing in for a pretrained start.
2. Validate the 112 real images of ``../shared/data/personcar`` and split them (``--val-fraction``).
3. Train the tiny config on the real train split twice, the same steps and seed: from that
   checkpoint (``init_checkpoint``, all modules) and from scratch.
4. Evaluate both on the held-out real images; print mAP and losses side by side.

    .venv/bin/python benchmarks/bench_finetune.py [--pretrain-steps 400] [--steps 300] [--image-size 512]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared" / "data" / "personcar"
TINY = "ssd_resnet26_v1_fpn_256x256_tiny"
KEYS = ("DetectionBoxes_Precision/mAP", "DetectionBoxes_Precision/mAP@.50IOU", "DetectionBoxes_Precision/mAP@.75IOU",
        "DetectionBoxes_Recall/AR@100")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pretrain-images", type=int, default=64)
    p.add_argument("--pretrain-steps", type=int, default=400)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--image-size", type=int, default=512)
    p.add_argument("--val-fraction", type=float, default=0.25)
    p.add_argument("--seed", type=int, default=3)
    a = p.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for noisy in ("absl", "tensorflow", "great_expectations"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from tasks.config import RunConfig
    from tasks.predict import evaluate_model
    from tasks.sample import make_sample
    from tasks.tfrecords import build_tfrecords
    from tasks.train import resolve_start, train
    from tasks.validate import validate_annotations

    with tempfile.TemporaryDirectory(prefix="finetune-") as tmp:
        root = Path(tmp)
        t0 = time.monotonic()
        make_sample(root / "sample", images=a.pretrain_images, seed=a.seed)
        sample = root / "sample" / "trainval"
        validate_annotations(sample / "annotations" / "bbox-annotations.json", root / "sample_val",
                             images=sample / "images")
        build_tfrecords(root / "sample_val" / "annotations.clean.json", sample / "images", root / "sample_tfr",
                        val_fraction=0.0)
        pre = RunConfig(model=TINY, steps=a.pretrain_steps, image_size=a.image_size, init_checkpoint="scratch",
                        seed=a.seed, validate_every=0)
        pre_summary = train(root / "sample_tfr", root / "pretrained", pre, log_every=50, export=False)
        print(f"pretrained on {a.pretrain_images} generated images for {a.pretrain_steps} steps in "
              f"{time.monotonic() - t0:.0f} s: losses {pre_summary['final_losses']}", flush=True)

        validate_annotations(SHARED / "bbox-annotations.sample112.json", root / "real_val", images=SHARED / "images",
                             max_quarantine_fraction=0.05)
        real = root / "real_tfr"
        manifest = build_tfrecords(root / "real_val" / "annotations.clean.json", SHARED / "images", real,
                                   val_fraction=a.val_fraction, seed=a.seed)
        splits = {k: v["images"] for k, v in manifest["splits"].items()}
        rows = {}
        for name, start in (("fine-tuned from the sample checkpoint", str(root / "pretrained")),
                            ("from scratch", "scratch")):
            run = RunConfig(model=TINY, steps=a.steps, image_size=a.image_size, init_checkpoint=start,
                            init_checkpoint_modules="all" if start != "scratch" else None, seed=a.seed,
                            validate_every=0)
            t1 = time.monotonic()
            summary = train(real, root / name.split()[0], run, log_every=50, start=resolve_start(run))
            metrics = evaluate_model(root / name.split()[0], real, root / f"eval-{name.split()[0]}")["metrics"]
            rows[name] = {"seconds": round(time.monotonic() - t1), **{k.split("/")[-1]: round(metrics[k], 4)
                                                                      for k in KEYS},
                          **{k.split("/")[-1]: round(v, 4) for k, v in summary["final_losses"].items()}}
            print(json.dumps({name: rows[name]}), flush=True)
    print(f"\nreal images: {splits['train']} train / {splits['val']} held out; tiny config at {a.image_size} px, "
          f"{a.steps} steps, augmentation on, seed {a.seed}\n")
    cols = list(next(iter(rows.values())))
    print("| start | " + " | ".join(cols) + " |")
    print("| --- | " + " | ".join("---" for _ in cols) + " |")
    for name, r in rows.items():
        print(f"| {name} | " + " | ".join(str(r[c]) for c in cols) + " |")


if __name__ == "__main__":
    main()
