"""Model tests: the GPU code paths (MirroredStrategy, mixed float16 with loss scaling, XLA) run on the CPU.

``--cpu-replicas 2`` (or ``PERSONCAR_CPU_REPLICAS=2``) trains on two logical CPU devices under
``MirroredStrategy`` with the mixed float16 policy, a dynamic loss scale and XLA, the settings of
a GPU run (tasks/devices.py). Logical devices can only be set before TensorFlow initialises its
devices, so those runs are fresh ``personcar train`` processes, never this one: the first is killed
(SIGKILL) once it has written a checkpoint, the second resumes from it, ends at the requested steps
and exports; the export predicts float32 boxes that evaluate. Batch and learning rate are read from
what the run did (the batch each replica stepped on, the logged learning rate), not from its config.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.config import RunConfig
from tasks.errors import PersoncarError
from tasks.tfrecords import build_tfrecords
from tests.conftest import REPO, wait_until

pytestmark = pytest.mark.slow
TINY = "ssd_resnet26_v1_fpn_256x256_tiny"
STEPS = 2
RUN = {"model": TINY, "image_size": 128, "batch_size": 2, "init_checkpoint": "scratch", "validate_every": 0}


def _train_cmd(data: Path, model_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "tasks.cli", "train", "--data", str(data), "--model-dir", str(model_dir),
            "--model", TINY, "--image-size", "128", "--batch-size", "2", "--steps", str(STEPS),
            "--init-checkpoint", "scratch", "--validate-every", "0", "--log-every", "1", "--checkpoint-every", "1",
            *extra]


def _latest_checkpoint_step(model_dir: Path) -> int | None:
    """The step of the checkpoint the manager's state file names (written after the checkpoint itself)."""
    state = model_dir / "checkpoint"
    m = re.search(r'^model_checkpoint_path: "ckpt-(\d+)"', state.read_text(), re.M) if state.is_file() else None
    return int(m.group(1)) if m else None


def _float16_nodes(saved_model: Path) -> list[str]:
    """Nodes of the serving graph (and its functions) that compute in float16."""
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    proto.ParseFromString((saved_model / "saved_model.pb").read_bytes())
    half = 19  # DT_HALF
    graph = proto.meta_graphs[0].graph_def
    nodes = [*graph.node, *(n for f in graph.library.function for n in f.node_def)]
    return [n.name for n in nodes
            if any(a.type == half or half in a.list.type for a in n.attr.values())]


@pytest.fixture(scope="module")
def records(sample_dataset: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = tmp_path_factory.mktemp("multireplica") / "tfr"
    build_tfrecords(sample_dataset["clean"], sample_dataset["images"], data, val_fraction=0.34)
    return data


def test_two_replicas_mixed_float16_xla_are_killed_resume_export_and_evaluate(records: Path, tmp_path: Path) -> None:
    from tasks.cli import main
    from tasks.report import read_scalars

    model_dir = tmp_path / "m"
    # XLA logs its compilations; the second run reuses the first's compiled clusters (the step's compile
    # is most of a short run on the CPU)
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "0",
           "TF_XLA_FLAGS": f"--tf_xla_persistent_cache_directory={tmp_path / 'xla_cache'}"}
    env.pop("PERSONCAR_CPU_REPLICAS", None)
    first_log = tmp_path / "first.log"
    with first_log.open("w") as out:
        first = subprocess.Popen(_train_cmd(records, model_dir, "--cpu-replicas", "2", "--no-export"),
                                 cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            def checkpointed() -> int | None:
                if first.poll() is not None:
                    pytest.fail(f"training ended ({first.returncode}) before it was killed: {first_log.read_text()[-3000:]}")
                return _latest_checkpoint_step(model_dir)

            killed_at = wait_until(checkpointed, timeout=300, what=f"a checkpoint in {model_dir} (log {first_log})")
            first.send_signal(signal.SIGKILL)
        finally:
            first.kill()
            first.wait()
    assert first.returncode == -signal.SIGKILL
    resume_at = _latest_checkpoint_step(model_dir)
    assert resume_at is not None and killed_at <= resume_at < STEPS, (killed_at, resume_at)
    assert not (model_dir / "train_summary.json").exists()
    log = first_log.read_text()
    assert "2 replica(s) on ['/job:localhost/replica:0/task:0/device:CPU:0', " \
           "'/job:localhost/replica:0/task:0/device:CPU:1'], mixed_float16, loss scale dynamic" in log, log[-3000:]
    assert "Compiled cluster using XLA" in log  # XLA really compiled the step on the CPU

    second = subprocess.run(_train_cmd(records, model_dir), cwd=REPO, capture_output=True, text=True,
                            env={**env, "PERSONCAR_CPU_REPLICAS": "2"}, timeout=400)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"resuming from {model_dir / f'ckpt-{resume_at}'} (step {resume_at} of {STEPS})" in second.stderr
    summary = json.loads(second.stdout.strip().splitlines()[-1])
    assert (summary["start_step"], summary["steps"], summary["trained_steps"]) == (resume_at, STEPS, STEPS - resume_at)
    assert summary["checkpoint"] == str(model_dir / f"ckpt-{STEPS}")
    assert (summary["device"], summary["replicas"], summary["gpus"]) == ("cpu", 2, 0)
    assert summary["devices"] == [f"/job:localhost/replica:0/task:0/device:CPU:{i}" for i in (0, 1)]
    assert (summary["precision"], summary["compute_dtype"], summary["variable_dtype"]) == \
           ("mixed_float16", "float16", "float32")
    assert summary["loss_scale"] == "dynamic" and summary["loss_scale_value"] > 1
    assert summary["xla"] == "autoclustering"

    # the batch is per replica: each of the two replicas stepped on 2 images, a global batch of 4 ...
    assert (summary["batch_size"], summary["global_batch_size"], summary["replica_batches"]) == (2, 4, [2, 2])
    # ... and the learning rate follows the global batch (linear scaling): twice one replica's
    one = RunConfig(**RUN, steps=STEPS).resolved(train_images=summary["train_images"], gpus=1)
    lr = 2 * one["learning_rate"]
    assert summary["learning_rate"] == pytest.approx(lr)
    exp = (model_dir / "experiment.yaml").read_text()
    assert re.search(r"global_batch_size: 4\b", exp) and "mixed_precision_dtype: float16" in exp
    # the logged rate of the resumed steps: the cosine schedule from that peak (no warmup in 2 steps)
    logged = dict(read_scalars(model_dir)["train"]["learning_rate"])
    assert set(range(resume_at + 1, STEPS + 1)) <= set(logged), logged
    for step, value in logged.items():
        assert value == pytest.approx(lr * 0.5 * (1 + math.cos(math.pi * (step - 1) / STEPS))), (step, logged)

    saved = Path(summary["saved_model"])
    assert summary["exported_checkpoint"] == f"ckpt-{STEPS}" and (saved / "saved_model.pb").is_file()
    assert _float16_nodes(saved) == []  # the serving graph is float32 throughout
    import tensorflow as tf

    outputs = tf.saved_model.load(str(saved)).signatures["serving_default"].structured_outputs
    assert (outputs["detection_boxes"].dtype, outputs["detection_scores"].dtype) == (tf.float32, tf.float32)

    det = tmp_path / "det.json"
    assert main(["predict", "--model-dir", str(model_dir), "--data", str(records), "--out", str(det)]) == 0
    detections = json.loads(det.read_text())
    val_ids = set(json.loads((records / "manifest.json").read_text())["splits"]["val"]["image_ids"])
    assert detections and {d["image_id"] for d in detections} <= val_ids
    assert all(len(d["bbox"]) == 4 and all(isinstance(v, float) for v in d["bbox"]) for d in detections)
    assert main(["evaluate", "--annotations", str(records / "val.coco.json"), "--detections", str(det),
                 "--out", str(tmp_path / "ev")]) == 0
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert 0.0 <= metrics["DetectionBoxes_Precision/mAP@.50IOU"] <= 1.0
    assert "DetectionBoxes_PerformanceByCategory/mAP/car" in metrics


class _ToyTask:
    """Model Garden's ``train_step`` contract (loss scaled, gradients unscaled, applied) on a one-layer model."""

    loss = "loss"

    def __init__(self, tf, gradient_factor: float = 1.0, loss_factor: float = 1.0) -> None:
        self.tf, self.gradient_factor, self.loss_factor = tf, gradient_factor, loss_factor

    def build_inputs(self, params, ctx=None):
        tf = self.tf
        return tf.data.Dataset.from_tensors((tf.ones([2, 4]), tf.ones([2, 1]))).repeat()

    def train_step(self, inputs, model, optimizer, metrics=None):
        tf, factor = self.tf, self.gradient_factor

        @tf.custom_gradient
        def scaled_gradient(x):
            return x, lambda dy: dy * factor

        images, labels = inputs
        with tf.GradientTape() as tape:
            out = tf.cast(model(images, training=True), tf.float32)
            loss = scaled_gradient(tf.reduce_mean((out - labels) ** 2)) * self.loss_factor
            scaled = optimizer.get_scaled_loss(loss)
        grads = optimizer.get_unscaled_gradients(tape.gradient(scaled, model.trainable_variables))
        optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
        return {"loss": loss}


def _toy_loop(tmp_path: Path, **task: float) -> tuple:
    """``train_loop`` under a dynamic loss scale (mixed float16) on one CPU replica, with a toy task."""
    from types import SimpleNamespace

    from tasks import devices
    from tasks.train import _setup_tf
    from tasks.train_loop import train_loop

    tf = _setup_tf()
    compute = devices.Compute("cpu", 1, "float16", False)
    with devices.configured(tf, compute):
        strategy = devices.strategy(tf, compute)
        with strategy.scope():
            model = tf.keras.Sequential([tf.keras.layers.Dense(1, input_shape=(4,))])
            optimizer = tf.keras.mixed_precision.LossScaleOptimizer(tf.keras.optimizers.SGD(0.01))
        exp = SimpleNamespace(task=SimpleNamespace(train_data=None, losses=SimpleNamespace(box_loss_weight=1.0)))
        manager = SimpleNamespace(latest_checkpoint=None, save=lambda **_: False)
        validator = SimpleNamespace(maybe=lambda step: None)
        with pytest.raises(PersoncarError) as exc:
            train_loop(tf, _ToyTask(tf, **task), exp, model, optimizer, [], manager, strategy,
                       {"steps": 50, "global_batch_size": 2}, tmp_path, start_step=0, log_every=10**6,
                       validator=validator, on_checkpoint=None)
    return str(exc.value), float(optimizer.loss_scale.numpy()), int(optimizer.iterations.numpy())


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_loss_under_loss_scaling_stops_at_once(tmp_path: Path, value: float) -> None:
    message, scale, steps = _toy_loop(tmp_path, loss_factor=value)
    assert message.startswith(f"training diverged: loss is {value} at step 1 "), message
    assert steps == 1 and scale == 2.0**14  # stopped at the first step, not retried at smaller loss scales


def test_gradients_that_stay_non_finite_under_loss_scaling_stop_after_a_bounded_number_of_skips(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tasks import train_loop

    monkeypatch.setattr(train_loop, "MAX_SKIPPED_STEPS", 4)
    message, scale, steps = _toy_loop(tmp_path, gradient_factor=float("inf"))  # a finite loss, inf gradients
    assert message.startswith("training diverged: gradients are not finite for 4 steps in a row at step 4 "), message
    assert steps == 4 and scale == 2.0**15 / 2**4  # each skipped step halved the scale
