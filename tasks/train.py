"""Train SSD ResNet-FPN (Model Garden's RetinaNet) on the TFRecords, with checkpoints and resume.

The model is a config (``tasks/configs/<model>.yaml``) applied to Model Garden's
``retinanet_resnetfpn_coco`` experiment; run parameters override it. The loop is Model Garden's
``RetinaNetTask.train_step`` under a ``tf.distribute`` strategy (MirroredStrategy for more than one
GPU) with a ``tf.train.CheckpointManager``: a re-run resumes from the latest checkpoint. Losses go to
TensorBoard under the OD API's names, and to the log at a steady interval.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tasks.artifacts import write_json_atomic
from tasks.config import CLASSES, RunConfig, load_model_config
from tasks.errors import PersoncarError
from tasks.logs import log

LOSS_NAMES = {  # OD API summary name -> how to get it from Model Garden's losses
    "Loss/classification_loss": "cls_loss",
    "Loss/localization_loss": "box_loss",  # times box_loss_weight, see _od_losses
    "Loss/regularization_loss": "reg_loss",
    "Loss/total_loss": "total_loss",
}
EXPORT_SUBDIR = "exported"


def _setup_tf() -> Any:
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # Model Garden needs Keras 2 (tf-keras)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    return tf


def gpus_available() -> int:
    tf = _setup_tf()
    return len(tf.config.list_physical_devices("GPU"))


def build_experiment(run: RunConfig, data_dir: str | Path, *, gpus: int | None = None) -> Any:
    """Model Garden ExperimentConfig for this run: the model's YAML, then the run's overrides."""
    _setup_tf()
    from official.core import exp_factory
    from official.vision import registry_imports  # noqa: F401  (registers the experiments)

    spec = load_model_config(run.model)
    r = run.resolved()
    exp = exp_factory.get_exp_config(spec["experiment"])
    exp.override(spec["override"], is_strict=True)
    data_dir = Path(data_dir)
    size = r["image_size"]
    on_gpu = (gpus if gpus is not None else gpus_available()) > 0
    depth = int(r["backbone"].removeprefix("resnet")) if r["backbone"] else exp.task.model.backbone.resnet.model_id
    exp.override({
        "runtime": {
            # float32 on CPU; mixed precision and XLA on GPU
            "mixed_precision_dtype": "float16" if on_gpu else "float32",
            "loss_scale": "dynamic" if on_gpu else None,
            "enable_xla": on_gpu,
            "num_gpus": gpus or 0,
            "distribution_strategy": "mirrored" if (gpus or 0) > 1 else "one_device",
        },
        "task": {
            "init_checkpoint": r["init_checkpoint"] or "",  # never the GCS default
            "init_checkpoint_modules": "backbone",
            "annotation_file": str(data_dir / "val.coco.json"),
            "model": {"input_size": [size, size, 3], "backbone": {"resnet": {"model_id": depth}}},
            "train_data": {
                "input_path": str(data_dir / "train-*.tfrecord"),
                "global_batch_size": r["batch_size"],
                "dtype": "float16" if on_gpu else "float32",
                "shuffle_buffer_size": 1000,
                "seed": r["seed"],
                **({} if r["augment"] else
                   {"parser": {"aug_rand_hflip": False, "aug_scale_min": 1.0, "aug_scale_max": 1.0}}),
            },
            "validation_data": {
                "input_path": str(data_dir / "val-*.tfrecord"),
                "global_batch_size": max(1, min(8, r["batch_size"])),
                "dtype": "float32",
            },
        },
        "trainer": {
            "train_steps": r["steps"],
            "optimizer_config": {
                "learning_rate": {"cosine": {"initial_learning_rate": r["learning_rate"], "decay_steps": r["steps"]}},
                "warmup": {"linear": {"warmup_steps": r["warmup_steps"], "warmup_learning_rate": r["warmup_learning_rate"]}},
            },
        },
    }, is_strict=True)
    exp.task.export_config.output_normalized_coordinates = True
    exp.validate()
    return exp


def _strategy(tf: Any, gpus: int) -> Any:
    if gpus > 1:
        log.info("train: MirroredStrategy over %d GPUs", gpus)
        return tf.distribute.MirroredStrategy()
    return tf.distribute.OneDeviceStrategy("/gpu:0" if gpus == 1 else "/cpu:0")


def train(data: str | Path, model_dir: str | Path, run: RunConfig, *, log_every: int = 10,
          checkpoint_every: int | None = None, keep_checkpoints: int = 3, export: bool = True,
          gpus: int | None = None, on_checkpoint: Callable[[Path], None] | None = None) -> dict[str, Any]:
    """Train until ``run.steps`` (resuming from the latest checkpoint) and export a SavedModel.

    Writes to MODEL_DIR: ``ckpt-N`` checkpoints (last ``keep_checkpoints``), TensorBoard events
    under ``train/``, ``experiment.yaml``, ``train_summary.json`` and ``exported/`` (SavedModel).
    ``on_checkpoint`` is called after every save (the trainer pod uploads the model dir there).
    """
    data, model_dir = Path(data), Path(model_dir)
    if not sorted(data.glob("train-*.tfrecord")):
        raise PersoncarError(f"{data}: no train-*.tfrecord shards (was it built with --val-fraction 1?)")
    tf = _setup_tf()
    from official.core import task_factory

    gpus = gpus_available() if gpus is None else gpus
    exp = build_experiment(run, data, gpus=gpus)
    r = run.resolved()
    total = r["steps"]
    checkpoint_every = checkpoint_every or max(1, min(1000, total // 5))
    model_dir.mkdir(parents=True, exist_ok=True)
    _write_experiment_yaml(exp, model_dir)
    if exp.runtime.mixed_precision_dtype == "float16":
        tf.keras.mixed_precision.set_global_policy("mixed_float16")
    if exp.runtime.enable_xla:
        tf.config.optimizer.set_jit("autoclustering")  # XLA clusters inside the step, on GPU
    tf.keras.utils.set_random_seed(r["seed"])

    strategy = _strategy(tf, gpus)
    with strategy.scope():
        task = task_factory.get_task(exp.task, logging_dir=str(model_dir))
        model = task.build_model()
        optimizer = task.create_optimizer(exp.trainer.optimizer_config, exp.runtime)
        metrics = task.build_metrics(training=True)
        ckpt = tf.train.Checkpoint(model=model, optimizer=optimizer)
        manager = tf.train.CheckpointManager(ckpt, str(model_dir), max_to_keep=keep_checkpoints,
                                             step_counter=optimizer.iterations,
                                             checkpoint_interval=checkpoint_every)
        if manager.latest_checkpoint:
            ckpt.restore(manager.latest_checkpoint).expect_partial()
            log.info("train: resuming from %s (step %d of %d)", manager.latest_checkpoint,
                     int(optimizer.iterations.numpy()), total)
        else:
            task.initialize(model)
            log.info("train: starting from %s", r["init_checkpoint"] or "scratch")
    start_step = int(optimizer.iterations.numpy())
    done = _finished_summary(model_dir, total, manager.latest_checkpoint, export)
    if start_step >= total and done is not None:
        log.info("train: already trained to step %d with its export; keeping %s", start_step,
                 model_dir / "train_summary.json")
        return done
    dataset = strategy.distribute_datasets_from_function(lambda ctx: task.build_inputs(exp.task.train_data, ctx))
    box_weight = float(exp.task.losses.box_loss_weight)

    @tf.function
    def train_step(iterator: Any) -> Any:
        def step_fn(inputs: Any) -> Any:
            logs = task.train_step(inputs, model, optimizer, metrics=metrics)
            return logs[task.loss]

        per_replica = strategy.run(step_fn, args=(next(iterator),))
        return strategy.reduce(tf.distribute.ReduceOp.MEAN, per_replica, axis=None)

    writer = tf.summary.create_file_writer(str(model_dir / "train"))
    lr_fn = optimizer.learning_rate
    step = start_step
    interval_start, interval_steps = time.monotonic(), 0
    run_start = time.monotonic()
    last: dict[str, float] = {}
    if step >= total:
        log.info("train: already at step %d of %d, nothing to train", step, total)
    iterator = iter(dataset)
    while step < total:
        loss = float(train_step(iterator).numpy())
        step = int(optimizer.iterations.numpy())
        interval_steps += 1
        if not math.isfinite(loss):
            raise PersoncarError(
                f"training diverged: loss is {loss} at step {step} (lower --learning-rate or check the boxes; "
                f"last checkpoint {manager.latest_checkpoint})")
        if step % log_every == 0 or step == total:
            elapsed = time.monotonic() - interval_start
            values = {m.name: float(m.result().numpy()) for m in metrics}
            last = _od_losses(values, box_weight)
            lr = float(lr_fn(step - 1).numpy()) if callable(lr_fn) else float(lr_fn)
            ips = interval_steps * r["batch_size"] / max(elapsed, 1e-9)
            with writer.as_default(step=step):
                for name, value in last.items():
                    tf.summary.scalar(name, value)
                tf.summary.scalar("learning_rate", lr)
                tf.summary.scalar("images_per_second", ips)
            log.info("train: step %d/%d loss %.4f (cls %.4f, loc %.4f, reg %.4f) lr %.5f %.2f images/s",
                     step, total, last["Loss/total_loss"], last["Loss/classification_loss"],
                     last["Loss/localization_loss"], last["Loss/regularization_loss"], lr, ips)
            for m in metrics:
                m.reset_states()
            interval_start, interval_steps = time.monotonic(), 0
        if manager.save(checkpoint_number=step) and on_checkpoint:
            on_checkpoint(model_dir)
    writer.flush()
    if manager.latest_checkpoint is None or int(manager.latest_checkpoint.rsplit("-", 1)[1]) != step:
        manager.save(checkpoint_number=step, check_interval=False)
    seconds = time.monotonic() - run_start
    summary = {
        "model": run.model,
        "zoo_name": load_model_config(run.model).get("zoo_name"),
        "backbone_depth": exp.task.model.backbone.resnet.model_id,
        "steps": step,
        "start_step": start_step,
        "trained_steps": step - start_step,
        "seconds": round(seconds, 2),
        "seconds_per_step": round(seconds / max(step - start_step, 1), 4),
        "batch_size": r["batch_size"],
        "image_size": r["image_size"],
        "final_losses": last,
        "checkpoint": manager.latest_checkpoint,
        "gpus": gpus,
    }
    if export:
        summary["saved_model"] = str(export_saved_model(exp, model_dir, manager.latest_checkpoint))
    write_json_atomic(model_dir / "train_summary.json", summary)
    if on_checkpoint:
        on_checkpoint(model_dir)
    log.info("train: done, %d steps in %.1f s", step - start_step, seconds)
    return summary


def _finished_summary(model_dir: Path, total: int, checkpoint: str | None, export: bool) -> dict[str, Any] | None:
    """The summary of a run that already reached ``total`` steps (and exported), else None."""
    path = model_dir / "train_summary.json"
    if checkpoint is None or not path.is_file():
        return None
    summary = json.loads(path.read_text())
    if summary.get("steps") != total or Path(summary.get("checkpoint") or "").name != Path(checkpoint).name:
        return None
    if export and not (model_dir / EXPORT_SUBDIR / "saved_model.pb").is_file():
        return None
    return summary


def _od_losses(values: dict[str, float], box_weight: float) -> dict[str, float]:
    """Model Garden's running means, renamed to the OD API's loss summaries."""
    return {
        "Loss/classification_loss": values["cls_loss"],
        "Loss/localization_loss": box_weight * values["box_loss"],
        "Loss/regularization_loss": values["total_loss"] - values["model_loss"],
        "Loss/total_loss": values["total_loss"],
    }


def _write_experiment_yaml(exp: Any, model_dir: Path) -> None:
    import yaml

    tmp = model_dir / ".experiment.yaml.tmp"
    tmp.write_text(yaml.safe_dump(exp.as_dict(), sort_keys=True))
    tmp.replace(model_dir / "experiment.yaml")


def export_saved_model(exp: Any, model_dir: Path, checkpoint: str) -> Path:
    """SavedModel for serving: uint8 image batch in; boxes, classes, scores, num detections out."""
    import shutil
    import tempfile

    from official.vision.serving import export_saved_model_lib

    final = model_dir / EXPORT_SUBDIR
    for stale in model_dir.glob(".exported-*"):  # left by an export that was killed
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=".exported-", dir=model_dir))
    try:
        size = exp.task.model.input_size[:2]
        export_saved_model_lib.export_inference_graph(
            input_type="image_tensor", batch_size=1, input_image_size=list(size), params=exp,
            checkpoint_path=checkpoint, export_dir=str(tmp))
        (tmp / "labels.json").write_text(json.dumps({str(k): v for k, v in CLASSES.items()}))
        if final.exists():
            shutil.rmtree(final)
        tmp.replace(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("train: exported SavedModel to %s", final)
    return final
