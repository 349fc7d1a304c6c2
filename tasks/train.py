"""Train SSD ResNet-FPN (Model Garden's RetinaNet) on the TFRecords: start, validate, checkpoint, export.

The model is a config (``tasks/configs/<model>.yaml``) applied to a Model Garden experiment; run
parameters override it. The loop is Model Garden's ``RetinaNetTask.train_step`` under a
``tf.distribute`` strategy (MirroredStrategy for more than one GPU) with a
``tf.train.CheckpointManager``: a re-run resumes from the latest checkpoint. A fresh run starts
from the last promoted model (``warm_start``), a pretrained checkpoint or scratch
(:mod:`tasks.checkpoints`). Every ``validate_every`` steps the val split is evaluated with COCO
metrics (OD API names, to TensorBoard under ``validation/``); the checkpoint with the best
mAP@.50IOU is kept under ``best/`` and is the one exported. Losses go to TensorBoard under the OD
API's names, and to the log at a steady interval.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from tasks import devices
from tasks.artifacts import write_bytes_atomic, write_json_atomic
from tasks.config import CLASSES, RunConfig, load_model_config
from tasks.devices import Compute
from tasks.errors import PersoncarError
from tasks.logs import log

EXPORT_SUBDIR = "exported"


class OutOfMemoryError(PersoncarError):
    """The accelerator ran out of memory: a smaller batch or input fixes it, a retry does not."""

    exit_code = 3


def _setup_tf() -> Any:
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # Model Garden needs Keras 2 (tf-keras)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    import tasks.zoo_model  # noqa: F401  (registers the zoo's backbone, decoder and experiment)

    return tf


def gpus_available() -> int:
    tf = _setup_tf()
    return len(tf.config.list_physical_devices("GPU"))


def train_images(data_dir: str | Path) -> int | None:
    """Images in the train split, from the TFRecord manifest (None when there is none)."""
    manifest = Path(data_dir) / "manifest.json"
    if not manifest.is_file():
        return None
    return int(json.loads(manifest.read_text())["splits"]["train"]["images"])


def _backbone_override(exp: Any, depth_name: str | None) -> dict[str, Any]:
    """The backbone's depth override (RunConfig has checked that the model's backbone type comes in it)."""
    return {exp.task.model.backbone.type: {"model_id": int(depth_name.removeprefix("resnet"))}} if depth_name else {}


def build_experiment(run: RunConfig, data_dir: str | Path, *, gpus: int | None = None,
                     compute: Compute | None = None) -> Any:
    """Model Garden ExperimentConfig for this run: the model's YAML, then the run's overrides.

    ``compute`` (default: what ``gpus`` implies, :func:`tasks.devices.plan`) sets the runtime:
    replicas, precision and loss scale, XLA.
    """
    _setup_tf()
    from official.core import exp_factory
    from official.vision import registry_imports  # noqa: F401  (registers the experiments)

    spec = load_model_config(run.model)
    c = compute or devices.plan(gpus if gpus is not None else gpus_available())
    data_dir = Path(data_dir)
    r = run.resolved(train_images=train_images(data_dir), gpus=c.replicas)
    exp = exp_factory.get_exp_config(spec["experiment"])
    exp.override(spec["override"], is_strict=True)
    size = r["image_size"]
    exp.override({
        "runtime": {
            # float32 on CPU; mixed float16 with a dynamic loss scale and XLA on GPU (tasks.devices)
            "mixed_precision_dtype": c.precision,
            "loss_scale": c.loss_scale,
            "enable_xla": c.xla,
            "num_gpus": c.replicas if c.device == "gpu" else 0,
            "distribution_strategy": "mirrored" if c.replicas > 1 else "one_device",
        },
        "task": {
            "init_checkpoint": "",  # never Model Garden's GCS default: tasks.checkpoints loads starts
            "annotation_file": str(data_dir / "val.coco.json"),
            "model": {"input_size": [size, size, 3], "backbone": _backbone_override(exp, r["backbone"])},
            "train_data": {
                "input_path": str(data_dir / "train-*.tfrecord"),
                "global_batch_size": r["global_batch_size"],
                "dtype": c.precision,
                "shuffle_buffer_size": 1000,
                "seed": r["seed"],
                **({} if r["augment"] else
                   {"parser": {"aug_rand_hflip": False, "aug_scale_min": 1.0, "aug_scale_max": 1.0}}),
            },
            "validation_data": {
                "input_path": str(data_dir / "val-*.tfrecord"),
                "global_batch_size": r["replicas"] * min(8, r["batch_size"]),
                "dtype": "float32",
                "drop_remainder": False,
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


def _oom(exc: BaseException, r: dict[str, Any]) -> OutOfMemoryError:
    return OutOfMemoryError(
        f"out of accelerator memory at batch_size {r['batch_size']} per GPU x {r['replicas']} replica(s), "
        f"{r['image_size']}x{r['image_size']} inputs: lower batch_size (per GPU) or image_size "
        f"({type(exc).__name__})")


def train(data: str | Path, model_dir: str | Path, run: RunConfig, *, log_every: int = 10,
          checkpoint_every: int | None = None, keep_checkpoints: int = 3, export: bool = True,
          gpus: int | None = None, cpu_replicas: int | None = None,
          on_checkpoint: Callable[[Path], None] | None = None,
          start: dict[str, Any] | None = None, where: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train until the run's steps (resuming from the latest checkpoint), validate, export the best.

    Writes to MODEL_DIR: ``ckpt-N`` checkpoints (last ``keep_checkpoints``), ``best/ckpt-N`` (best
    validation mAP@.50IOU), TensorBoard events under ``train/`` and ``validation/``,
    ``validation.json``, ``experiment.yaml``, ``train_summary.json`` and ``exported/``
    (SavedModel). ``start`` is where a fresh run starts (:func:`resolve_start`; default: from the
    run config without a promoted model); ``where``: how a remote start checkpoint is reached
    (:mod:`tasks.storage`). ``on_checkpoint`` is called after every save (the trainer pod uploads the
    model dir there). ``cpu_replicas`` runs the GPU code paths on that many CPU devices
    (:mod:`tasks.devices`).
    """
    if log_every < 1:
        raise PersoncarError(f"log_every must be >= 1, got {log_every}")
    data, model_dir = Path(data), Path(model_dir)
    if not sorted(data.glob("train-*.tfrecord")):
        raise PersoncarError(f"{data}: no train-*.tfrecord shards (was it built with --val-fraction 1?)")
    if devices.requested_cpu_replicas(cpu_replicas):
        devices.allow_xla_on_cpu()  # read once, when TensorFlow sets up its devices: before _setup_tf
    tf = _setup_tf()
    gpus = gpus_available() if gpus is None else gpus
    compute = devices.plan(gpus, cpu_replicas)
    r = run.resolved(train_images=train_images(data), gpus=compute.replicas)
    with devices.configured(tf, compute):
        exp = build_experiment(run, data, compute=compute)
        model_dir.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(model_dir / "experiment.yaml", yaml.safe_dump(exp.as_dict(), sort_keys=True).encode())
        tf.keras.utils.set_random_seed(r["seed"])
        log.info("train: %s, %d steps (%s epochs of %s images) at global batch %d (%d per replica x %d), LR %.5f; "
                 "%s, %s%s", run.model, r["steps"], r["epochs"], r["train_images"], r["global_batch_size"],
                 r["batch_size"], r["replicas"], r["learning_rate"], compute.device, compute.policy,
                 ", XLA" if compute.xla else "")
        try:
            return _train(tf, exp, r, data, model_dir, run, compute, log_every=log_every,
                          checkpoint_every=checkpoint_every or max(1, min(1000, r["steps"] // 5)),
                          keep=keep_checkpoints, export=export, on_checkpoint=on_checkpoint,
                          start=start if start is not None else resolve_start(run), where=where)
        except tf.errors.ResourceExhaustedError as exc:
            raise _oom(exc, r) from exc


def _train(tf: Any, exp: Any, r: dict[str, Any], data: Path, model_dir: Path, run: RunConfig, compute: Compute, *,
           log_every: int, checkpoint_every: int, keep: int, export: bool,
           on_checkpoint: Callable[[Path], None] | None, start: dict[str, Any],
           where: dict[str, Any] | None) -> dict[str, Any]:
    from official.core import task_factory

    from tasks.train_loop import train_loop
    from tasks.validation import Validator

    total = r["steps"]
    strategy = devices.strategy(tf, compute)
    with strategy.scope():
        task = task_factory.get_task(exp.task, logging_dir=str(model_dir))
        model = task.build_model()
        optimizer = task.create_optimizer(exp.trainer.optimizer_config, exp.runtime)
        metrics = task.build_metrics(training=True)
        ckpt = tf.train.Checkpoint(model=model, optimizer=optimizer, **_module_items(model))
        manager = tf.train.CheckpointManager(ckpt, str(model_dir), max_to_keep=keep,
                                             step_counter=optimizer.iterations, checkpoint_interval=checkpoint_every)
        started = _start(ckpt, manager, model, exp, start, total, where)
    start_step = int(optimizer.iterations.numpy())
    done = _finished_summary(model_dir, total, manager.latest_checkpoint, export)
    if start_step >= total and done is not None:
        log.info("train: already trained to step %d with its export; keeping %s", start_step,
                 model_dir / "train_summary.json")
        return done
    validator = Validator(task, exp, model, ckpt, model_dir, data, strategy, every=r["validate_every"],
                          total=total, on_save=on_checkpoint)
    effect = devices.in_effect(tf, strategy, model, optimizer)
    log.info("train: %(replicas)d replica(s) on %(devices)s, %(precision)s, loss scale %(loss_scale)s "
             "(%(loss_scale_value)s), XLA %(xla)s", effect)
    loop = train_loop(tf, task, exp, model, optimizer, metrics, manager, strategy, r, model_dir,
                      start_step=start_step, log_every=log_every, validator=validator, on_checkpoint=on_checkpoint)
    step, last, seconds = loop["step"], loop["losses"], loop["seconds"]
    if manager.latest_checkpoint is None or int(manager.latest_checkpoint.rsplit("-", 1)[1]) != step:
        manager.save(checkpoint_number=step, check_interval=False)
    validator.final(step)
    chosen = validator.best_checkpoint() or manager.latest_checkpoint
    summary = {
        "model": run.model,
        "zoo_name": load_model_config(run.model).get("zoo_name"),
        "backbone_depth": _backbone_depth(exp),
        "steps": step,
        "start_step": start_step,
        "trained_steps": step - start_step,
        "epochs": r["epochs"],
        "train_images": r["train_images"],
        "seconds": round(seconds, 2),
        "seconds_per_step": round(seconds / max(step - start_step, 1), 4),
        "images_per_second": round((step - start_step) * r["global_batch_size"] / max(seconds, 1e-9), 3),
        "batch_size": r["batch_size"],
        "global_batch_size": r["global_batch_size"],
        "image_size": r["image_size"],
        "learning_rate": r["learning_rate"],
        "final_losses": last,
        "checkpoint": manager.latest_checkpoint,
        "exported_checkpoint": os.path.relpath(chosen, model_dir),
        "exported_step": int(chosen.rsplit("-", 1)[1]),
        "best_validation": validator.best,
        "validations": len(validator.history),
        "started_from": started,
        "gpus": compute.replicas if compute.device == "gpu" else 0,
        "device": compute.device,
        **devices.in_effect(tf, strategy, model, optimizer),  # replicas, precision, loss scale (final value), XLA
        "skipped_steps": loop["skipped_steps"],
        "replica_batches": loop["replica_batches"],  # per replica, as the first step received them
    }
    if export:
        summary["saved_model"] = str(export_saved_model(exp, model_dir, chosen))
    write_json_atomic(model_dir / "train_summary.json", summary)
    if on_checkpoint:
        on_checkpoint(model_dir)
    log.info("train: done, %d steps in %.1f s; exported step %d%s", step - start_step, seconds,
             summary["exported_step"], f" (best mAP@.50IOU {validator.best['value']:.4f})" if validator.best else "")
    return summary


def _module_items(model: Any) -> dict[str, Any]:
    """Backbone, decoder and head at the checkpoint's top level, as Model Garden's loaders expect them."""
    return {k: v for k, v in (("backbone", model.backbone), ("decoder", model.decoder), ("head", model.head))
            if v is not None}


def _backbone_depth(exp: Any) -> int:
    return int(exp.task.model.backbone.get().model_id)


def _start(ckpt: Any, manager: Any, model: Any, exp: Any, start: dict[str, Any], total: int,
           where: dict[str, Any] | None) -> dict[str, Any]:
    """Resume from MODEL_DIR's latest checkpoint, else load ``start``; what the run started from."""
    from tasks import checkpoints

    summary_path = Path(manager.directory) / "train_summary.json"
    if manager.latest_checkpoint:
        ckpt.restore(manager.latest_checkpoint).expect_partial()
        step = int(ckpt.optimizer.iterations.numpy())
        log.info("train: resuming from %s (step %d of %d)", manager.latest_checkpoint, step, total)
        previous = json.loads(summary_path.read_text()).get("started_from") if summary_path.is_file() else None
        return previous or _read_start(Path(manager.directory)) or {"kind": "resumed", "description": "resumed"}
    if start.get("kind") == "scratch":
        log.info("train: starting from %s", start.get("description", "scratch"))
        out = {"kind": "scratch", "description": start.get("description", "scratch")}
    else:
        loaded = checkpoints.initialize(model, exp.task.model, start["uri"], start.get("modules"), where=where)
        out = {**{k: v for k, v in start.items() if k != "reason"}, **loaded}
    write_json_atomic(Path(manager.directory) / "started_from.json", out)  # survives a kill before the summary
    return out


def _read_start(model_dir: Path) -> dict[str, Any] | None:
    path = model_dir / "started_from.json"
    return json.loads(path.read_text()) if path.is_file() else None


def resolve_start(run: RunConfig, *, promoted: dict[str, Any] | None = None) -> dict[str, Any]:
    """Where a fresh run starts: ``{"kind": promoted|pretrained|checkpoint|scratch, "uri", "modules", "description"}``.

    ``promoted`` is the publish index entry of the last promoted run (``publish.previous_run``);
    with ``warm_start: promoted`` its model is used when it is the same model config and backbone.
    """
    spec = load_model_config(run.model)
    reason = None
    if run.warm_start == "promoted" and promoted is not None:
        m = promoted.get("model") or {}
        if m.get("checkpoint") and m.get("name") == run.model and m.get("backbone") == run.backbone:
            return {"kind": "promoted", "uri": m["checkpoint"], "modules": "all", "run_id": promoted.get("run_id"),
                    "description": f"the promoted run {promoted.get('run_id')} ({m['checkpoint']})"}
        reason = (f"the promoted run {promoted.get('run_id')} is {m.get('name')}/{m.get('backbone') or 'default'}"
                  f", this run {run.model}/{run.backbone or 'default'}" if m.get("checkpoint")
                  else f"the promoted run {promoted.get('run_id')} recorded no checkpoint")
        log.info("train: not warm-starting: %s", reason)
    if run.init_checkpoint == "scratch":
        return {"kind": "scratch", "description": "scratch (init_checkpoint: scratch)", "reason": reason}
    if run.init_checkpoint == "pretrained":
        pre = spec.get("pretrained")
        if not pre:
            return {"kind": "scratch", "description": f"scratch ({run.model} has no published checkpoint)",
                    "reason": reason}
        return {"kind": "pretrained", "uri": pre["url"], "modules": run.init_checkpoint_modules or pre.get("modules"),
                "description": f"{pre.get('trained_on', 'a pretrained checkpoint')}, {pre.get('published_score', '')}"
                               f" ({pre['url']})", "reason": reason}
    return {"kind": "checkpoint", "uri": run.init_checkpoint, "modules": run.init_checkpoint_modules,
            "description": run.init_checkpoint, "reason": reason}


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


def export_saved_model(exp: Any, model_dir: Path, checkpoint: str) -> Path:
    """SavedModel for serving: uint8 image batch in; float32 boxes and scores, classes, num detections out.

    The serving graph computes in float32 without XLA, as Model Garden's own export does, also after
    a mixed-precision run.
    """
    import shutil
    import tempfile

    from official.vision.serving import export_saved_model_lib

    final = model_dir / EXPORT_SUBDIR
    for stale in model_dir.glob(".exported-*"):  # left by an export that was killed
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=".exported-", dir=model_dir))
    tf = _setup_tf()
    try:
        size = exp.task.model.input_size[:2]
        with devices.serving(tf):  # a float32 graph, whatever the run trained in (the variables are float32)
            export_saved_model_lib.export_inference_graph(
                input_type="image_tensor", batch_size=1, input_image_size=list(size), params=exp,
                checkpoint_path=checkpoint, export_dir=str(tmp))
        (tmp / "labels.json").write_text(json.dumps({str(k): v for k, v in CLASSES.items()}))
        (tmp / "checkpoint.txt").write_text(os.path.relpath(checkpoint, model_dir) + "\n")
        if final.exists():
            shutil.rmtree(final)
        tmp.replace(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("train: exported SavedModel of %s to %s", Path(checkpoint).name, final)
    return final
