"""The training loop: Model Garden's ``RetinaNetTask.train_step`` per replica, under a strategy.

One ``tf.function`` call a step returns the mean loss over the replicas, the optimizer's step
counter, the loss scale and the batch each replica stepped on (the first step's goes to the
summary as ``replica_batches``), the loop's only read from the device. Every ``log_every`` steps
the running losses go to TensorBoard under the OD API's names and to the log; checkpoints and
validation follow the step counter.

Non-finite values: a NaN or inf loss stops the run at once (``training diverged: loss is nan at
step N``). With float16 the dynamic loss scale skips the update of a step whose gradients
overflow and halves the scale; the step still counts (Keras' ``LossScaleOptimizer`` advances
``iterations``, as in Model Garden's own loop), so a skip shows as a smaller loss scale. A few
skips early in a run are normal, so the loop allows ``MAX_SKIPPED_STEPS`` in a row - more than the
15 halvings from the initial scale 2**15 down to 1 - and then stops with ``training diverged:
gradients are not finite for N steps in a row at step N``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tasks.errors import PersoncarError
from tasks.logs import log

MAX_SKIPPED_STEPS = 20


def train_loop(tf: Any, task: Any, exp: Any, model: Any, optimizer: Any, metrics: Any, manager: Any, strategy: Any,
               r: dict[str, Any], model_dir: Path, *, start_step: int, log_every: int, validator: Any,
               on_checkpoint: Callable[[Path], None] | None) -> dict[str, Any]:
    """Train from ``start_step`` to the run's steps; the last losses, the time and the skipped steps."""
    total = r["steps"]
    dataset = strategy.distribute_datasets_from_function(lambda ctx: task.build_inputs(exp.task.train_data, ctx))
    train_step = _train_step(tf, task, model, optimizer, metrics, strategy)
    box_weight = float(exp.task.losses.box_loss_weight)
    writer = tf.summary.create_file_writer(str(model_dir / "train"))
    step, skipped, in_a_row = start_step, 0, 0
    scale = _loss_scale(tf, optimizer)
    replica_batches: list[int] = []
    interval_start, interval_steps = time.monotonic(), 0
    run_start = time.monotonic()
    last: dict[str, float] = {}
    if step >= total:
        log.info("train: already at step %d of %d, nothing to train", step, total)
    iterator = iter(dataset)
    while step < total:
        loss, counter, batches, new_scale = (x.numpy() for x in train_step(iterator))
        loss, step = float(loss), int(counter)
        replica_batches = replica_batches or [int(b) for b in batches]
        if not math.isfinite(loss):
            raise PersoncarError(
                f"training diverged: loss is {loss} at step {step} (lower --learning-rate or check the boxes; "
                f"last checkpoint {manager.latest_checkpoint})")
        if new_scale < scale:  # the loss scale skipped the update: non-finite gradients
            skipped, in_a_row = skipped + 1, in_a_row + 1
            log.info("train: step %d skipped by the loss scale (non-finite gradients), loss scale now %g",
                     step, float(new_scale))
            if in_a_row >= MAX_SKIPPED_STEPS:
                raise PersoncarError(
                    f"training diverged: gradients are not finite for {in_a_row} steps in a row at step {step} "
                    f"(loss {loss:.4g}; lower --learning-rate or check the boxes; last checkpoint "
                    f"{manager.latest_checkpoint})")
        else:
            in_a_row = 0
        scale = new_scale
        interval_steps += 1
        if step % log_every == 0 or step == total:
            last = _log_interval(tf, writer, metrics, optimizer, r, step, box_weight, interval_steps,
                                 time.monotonic() - interval_start)
            interval_start, interval_steps = time.monotonic(), 0
        if manager.save(checkpoint_number=step) and on_checkpoint:
            on_checkpoint(model_dir)
        validator.maybe(step)
    writer.flush()
    return {"step": step, "losses": last, "seconds": time.monotonic() - run_start, "skipped_steps": skipped,
            "replica_batches": replica_batches}


def _train_step(tf: Any, task: Any, model: Any, optimizer: Any, metrics: Any, strategy: Any) -> Any:
    @tf.function
    def train_step(iterator: Any) -> Any:
        def step_fn(inputs: Any) -> Any:
            loss = task.train_step(inputs, model, optimizer, metrics=metrics)[task.loss]
            return loss, tf.shape(inputs[0])[0]

        loss, batch = strategy.run(step_fn, args=(next(iterator),))
        batches = tf.stack(strategy.experimental_local_results(batch))  # the images each replica stepped on
        return (strategy.reduce(tf.distribute.ReduceOp.MEAN, loss, axis=None), optimizer.iterations.read_value(),
                batches, _loss_scale(tf, optimizer))

    return train_step


def _loss_scale(tf: Any, optimizer: Any) -> Any:
    """The dynamic loss scale now (1.0 without one)."""
    if isinstance(optimizer, tf.keras.mixed_precision.LossScaleOptimizer):
        return tf.cast(optimizer.loss_scale, tf.float32)
    return tf.constant(1.0)


def _log_interval(tf: Any, writer: Any, metrics: Any, optimizer: Any, r: dict[str, Any], step: int,
                  box_weight: float, steps: int, seconds: float) -> dict[str, float]:
    """Running losses to TensorBoard and the log; the metrics start again."""
    last = od_losses({m.name: float(m.result().numpy()) for m in metrics}, box_weight)
    lr_fn = optimizer.learning_rate
    lr = float(lr_fn(step - 1).numpy()) if callable(lr_fn) else float(lr_fn)
    ips = steps * r["global_batch_size"] / max(seconds, 1e-9)
    with writer.as_default(step=step):
        for name, value in last.items():
            tf.summary.scalar(name, value)
        tf.summary.scalar("learning_rate", lr)
        tf.summary.scalar("images_per_second", ips)
    log.info("train: step %d/%d loss %.4f (cls %.4f, loc %.4f, reg %.4f) lr %.5f %.2f images/s",
             step, r["steps"], last["Loss/total_loss"], last["Loss/classification_loss"],
             last["Loss/localization_loss"], last["Loss/regularization_loss"], lr, ips)
    for m in metrics:
        m.reset_states()
    return last


def od_losses(values: dict[str, float], box_weight: float) -> dict[str, float]:
    """Model Garden's running means, renamed to the OD API's loss summaries."""
    return {
        "Loss/classification_loss": values["cls_loss"],
        "Loss/localization_loss": box_weight * values["box_loss"],
        "Loss/regularization_loss": values["total_loss"] - values["model_loss"],
        "Loss/total_loss": values["total_loss"],
    }
