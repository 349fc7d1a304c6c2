"""Validation during training: COCO metrics on the val split every N steps, and the best checkpoint.

The live model predicts the val TFRecords through Model Garden's own validation input pipeline
(the same resize as serving); detections are mapped back to original pixels and scored with the
project's COCO evaluation (``tasks.evaluate``: OD API metric names, every box counted). Each
validation goes to TensorBoard (``MODEL_DIR/validation/``) and to ``MODEL_DIR/validation.json``
(the history, kept across resumes); the checkpoint with the best mAP@.50IOU is kept in
``MODEL_DIR/best/`` and is the one the run exports.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tasks.artifacts import write_json_atomic
from tasks.logs import log

BEST_METRIC = "DetectionBoxes_Precision/mAP@.50IOU"
CURVE_METRICS = ("DetectionBoxes_Precision/mAP", "DetectionBoxes_Precision/mAP@.50IOU",
                 "DetectionBoxes_Precision/mAP@.75IOU", "DetectionBoxes_Recall/AR@100")


class Validator:
    """Evaluates ``model`` on ``DATA/val-*.tfrecord`` every ``every`` steps (0: never)."""

    def __init__(self, task: Any, exp: Any, model: Any, ckpt: Any, model_dir: Path, data: Path, strategy: Any, *,
                 every: int, total: int, on_save: Callable[[Path], None] | None = None) -> None:
        import tensorflow as tf

        self.tf, self.task, self.exp, self.model, self.strategy = tf, task, exp, model, strategy
        self.model_dir, self.data, self.total, self.on_save = model_dir, data, total, on_save
        self.path = model_dir / "validation.json"
        gt_path = data / "val.coco.json"
        has_val = bool(sorted(data.glob("val-*.tfrecord"))) and gt_path.is_file()
        if every and not has_val:
            log.info("validation: no val split in %s; training without validation", data)
        self.every = every if has_val else 0
        saved = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self.history: list[dict[str, Any]] = saved.get("history", [])
        self.best: dict[str, Any] | None = saved.get("best")
        self.manager = tf.train.CheckpointManager(ckpt, str(model_dir / "best"), max_to_keep=1)
        if self.best and not self.manager.latest_checkpoint:
            self.best = None  # the best checkpoint is gone: start the comparison afresh
        self.writer = tf.summary.create_file_writer(str(model_dir / "validation")) if self.every else None
        self._gt = None
        self._infer = None
        if self.every:
            from tasks.evaluate import load_ground_truth

            self._gt = load_ground_truth(gt_path)

    def maybe(self, step: int) -> None:
        if self.every and step % self.every == 0:
            self.run(step)

    def final(self, step: int) -> None:
        """Validate the last step unless it just was (so the run's end always competes for best)."""
        if self.every and not any(h["step"] == step for h in self.history):
            self.run(step)

    def best_checkpoint(self) -> str | None:
        return self.manager.latest_checkpoint if self.best else None

    def run(self, step: int) -> dict[str, float]:
        from tasks.evaluate import metrics_from_eval, run_cocoeval

        t0 = time.monotonic()
        dets = self.predict()
        ev = run_cocoeval(self._gt, dets)
        metrics = metrics_from_eval(ev, self._gt["categories"])
        with self.writer.as_default(step=step):
            for name, value in metrics.items():
                self.tf.summary.scalar(name, value)
        self.writer.flush()
        value = metrics[BEST_METRIC]
        improved = self.best is None or value > self.best["value"]
        if improved:
            saved = self.manager.save(checkpoint_number=step)
            self.best = {"step": step, "metric": BEST_METRIC, "value": value, "checkpoint": Path(saved).name}
        self.history = [h for h in self.history if h["step"] != step] + [
            {"step": step, "detections": len(dets), **{k: metrics[k] for k in CURVE_METRICS}}]
        write_json_atomic(self.path, {"metric": BEST_METRIC, "every": self.every, "best": self.best,
                                      "history": self.history})
        if improved and self.on_save:
            self.on_save(self.model_dir)
        log.info("validation: step %d/%d mAP %.4f, mAP@.50IOU %.4f, mAP@.75IOU %.4f (%d detections, %.1f s)%s",
                 step, self.total, metrics["DetectionBoxes_Precision/mAP"], value,
                 metrics["DetectionBoxes_Precision/mAP@.75IOU"], len(dets), time.monotonic() - t0,
                 " new best" if improved else f"; best {self.best['value']:.4f} at step {self.best['step']}")
        return metrics

    def predict(self) -> list[dict[str, Any]]:
        """COCO results of the live model on the val split, boxes in original pixels."""
        tf = self.tf
        if self._infer is None:
            @tf.function
            def infer(images: Any, image_info: Any, anchors: Any) -> dict[str, Any]:
                out = self.model(images, image_shape=image_info[:, 1, :], anchor_boxes=anchors, training=False)
                return {k: tf.cast(out[k], tf.float32) for k in
                        ("detection_boxes", "detection_scores", "detection_classes", "num_detections")}

            self._infer = infer
        results: list[dict[str, Any]] = []
        for images, labels in self.task.build_inputs(self.exp.task.validation_data):
            out = self._infer(images, labels["image_info"], labels["anchor_boxes"])
            scale = labels["image_info"][:, 2, :].numpy()  # [y, x] resize factors
            ids = labels["groundtruths"]["source_id"].numpy()
            for b in range(int(images.shape[0])):
                n = int(out["num_detections"][b])
                boxes = out["detection_boxes"][b][:n].numpy() / [scale[b][0], scale[b][1], scale[b][0], scale[b][1]]
                for (y0, x0, y1, x1), c, s in zip(boxes, out["detection_classes"][b][:n].numpy(),
                                                  out["detection_scores"][b][:n].numpy(), strict=True):
                    if x1 > x0 and y1 > y0:
                        results.append({"image_id": int(ids[b]), "category_id": int(c), "score": float(s),
                                        "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)]})
        return results
