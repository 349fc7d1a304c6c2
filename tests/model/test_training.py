"""Model tests of the training loop on the generated sample: resume, divergence, the experiment a
run config builds, validation during training with the best checkpoint, out-of-memory errors.

(The learning check on real images is tests/model/test_learning.py.)
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tasks.config import RunConfig
from tasks.errors import PersoncarError
from tasks.tfrecords import build_tfrecords

pytestmark = pytest.mark.slow
TINY = "ssd_resnet26_v1_fpn_256x256_tiny"


def test_resume_continues_from_the_last_checkpoint(sample_dataset: dict, tmp_path: Path) -> None:
    from tasks.train import train

    data = tmp_path / "tfr"
    build_tfrecords(sample_dataset["clean"], sample_dataset["images"], data, val_fraction=0.0)
    run = dict(model=TINY, image_size=128, batch_size=2)
    first = train(data, tmp_path / "m", RunConfig(steps=4, **run), log_every=2, checkpoint_every=2, export=False)
    assert (first["start_step"], first["steps"]) == (0, 4)
    second = train(data, tmp_path / "m", RunConfig(steps=6, **run), log_every=2, checkpoint_every=2, export=False)
    assert (second["start_step"], second["steps"], second["trained_steps"]) == (4, 6, 2)
    again = train(data, tmp_path / "m", RunConfig(steps=6, **run), export=False)
    assert again == second  # a finished run re-run keeps its summary: nothing trained, nothing lost
    assert json.loads((tmp_path / "m" / "train_summary.json").read_text()) == second


def test_non_finite_loss_stops_with_a_clear_error(sample_dataset: dict, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from official.vision.tasks.retinanet import RetinaNetTask

    from tasks.train import train

    original = RetinaNetTask.build_losses

    def exploding(self, *args, **kwargs):
        total, cls_loss, box_loss, model_loss = original(self, *args, **kwargs)
        return total * float("inf"), cls_loss, box_loss, model_loss

    monkeypatch.setattr(RetinaNetTask, "build_losses", exploding)
    data = tmp_path / "tfr"
    build_tfrecords(sample_dataset["clean"], sample_dataset["images"], data, val_fraction=0.0)
    with pytest.raises(PersoncarError, match=r"training diverged: loss is inf at step 1 "):
        train(data, tmp_path / "m", RunConfig(model=TINY, image_size=128, batch_size=2, steps=5), export=False)
    assert not list((tmp_path / "m").glob("ckpt-*.index"))  # nothing saved from a diverged state


def test_experiment_follows_the_run_config(tmp_path: Path) -> None:
    from tasks.train import build_experiment

    cpu = build_experiment(RunConfig(steps=100, batch_size=8), tmp_path, gpus=0)
    parser = cpu.task.train_data.parser
    assert (parser.aug_rand_hflip, parser.aug_scale_min, parser.aug_scale_max) == (True, 0.8, 1.2)
    assert cpu.runtime.mixed_precision_dtype == "float32" and not cpu.runtime.enable_xla
    model = cpu.task.model
    assert model.backbone.type == "resnet_v1" and model.backbone.resnet_v1.model_id == 152
    assert model.decoder.type == "ssd_fpn" and model.input_size == [640, 640, 3]
    assert model.detection_generator.box_coder_weights == [10.0, 10.0, 5.0, 5.0]
    assert (cpu.task.losses.huber_loss_delta, cpu.task.losses.box_loss_weight) == (1.0, 1)
    assert cpu.trainer.train_steps == 100 and cpu.task.train_data.global_batch_size == 8
    assert cpu.trainer.optimizer_config.learning_rate.cosine.initial_learning_rate == pytest.approx(0.04 * 8 / 64)
    assert cpu.task.train_data.input_path == str(tmp_path / "train-*.tfrecord")
    assert cpu.task.init_checkpoint == ""  # starts are loaded by tasks.checkpoints, never Model Garden's GCS default

    plain = build_experiment(RunConfig(model=TINY, augment=False), tmp_path, gpus=0).task.train_data.parser
    assert (plain.aug_rand_hflip, plain.aug_scale_min, plain.aug_scale_max) == (False, 1.0, 1.0)

    gpu = build_experiment(RunConfig(backbone="resnet50", batch_size=8, steps=10), tmp_path, gpus=2)
    assert gpu.runtime.mixed_precision_dtype == "float16" and gpu.runtime.enable_xla
    assert gpu.runtime.distribution_strategy == "mirrored" and gpu.runtime.num_gpus == 2
    assert gpu.task.model.backbone.resnet_v1.model_id == 50
    assert gpu.task.train_data.global_batch_size == 16  # 8 per GPU x 2
    assert gpu.trainer.optimizer_config.learning_rate.cosine.initial_learning_rate == pytest.approx(0.04 * 16 / 64)
    assert gpu.runtime.loss_scale == "dynamic" and gpu.task.train_data.dtype == "float16"
    # the GPU code paths on two logical CPUs (--cpu-replicas 2): the same settings, no GPU counted
    from tasks.devices import Compute

    two = build_experiment(RunConfig(backbone="resnet50", batch_size=8, steps=10), tmp_path,
                           compute=Compute("cpu", 2, "float16", True))
    assert (two.runtime.mixed_precision_dtype, two.runtime.loss_scale, two.runtime.enable_xla) == ("float16", "dynamic", True)
    assert (two.runtime.distribution_strategy, two.runtime.num_gpus) == ("mirrored", 0)
    assert two.task.train_data.global_batch_size == 16
    assert two.trainer.optimizer_config.learning_rate.cosine.initial_learning_rate == pytest.approx(0.04 * 16 / 64)
    with pytest.raises(PersoncarError, match="backbone: ssd_resnet152_v1_fpn_640x640's resnet_v1 backbone comes in depths"):
        build_experiment(RunConfig.from_params({"backbone": "resnet18"}), tmp_path, gpus=0)
    mg = build_experiment(RunConfig(model="retinanet_resnet50_fpn_640x640", backbone="resnet18"), tmp_path, gpus=0)
    assert (mg.task.model.backbone.type, mg.task.model.backbone.resnet.model_id) == ("resnet", 18)


def test_validation_during_training_keeps_and_exports_the_best_checkpoint(sample_dataset: dict,
                                                                          tmp_path: Path) -> None:
    from tasks.report import read_scalars
    from tasks.train import train

    data = tmp_path / "tfr"
    build_tfrecords(sample_dataset["clean"], sample_dataset["images"], data, val_fraction=0.34)
    summary = train(data, tmp_path / "m", RunConfig(model=TINY, image_size=128, batch_size=2, steps=12,
                                                    validate_every=4, learning_rate=0.02), log_every=4)
    val = json.loads((tmp_path / "m" / "validation.json").read_text())
    assert [h["step"] for h in val["history"]] == [4, 8, 12]
    best = max(val["history"], key=lambda h: h["DetectionBoxes_Precision/mAP@.50IOU"])
    assert val["best"]["value"] == best["DetectionBoxes_Precision/mAP@.50IOU"]
    assert summary["exported_step"] == val["best"]["step"] == int(summary["exported_checkpoint"].rsplit("-", 1)[1])
    assert summary["exported_checkpoint"].startswith("best/")
    assert (tmp_path / "m" / "exported" / "checkpoint.txt").read_text().strip() == summary["exported_checkpoint"]
    curves = read_scalars(tmp_path / "m")["validation"]
    assert [s for s, _ in curves["DetectionBoxes_Precision/mAP@.50IOU"]] == [4, 8, 12]
    assert "DetectionBoxes_Recall/AR@100" in curves


def test_out_of_memory_ends_with_one_line_that_says_what_to_lower(sample_dataset: dict, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import tensorflow as tf
    from official.vision.tasks.retinanet import RetinaNetTask

    from tasks.train import OutOfMemoryError, train

    def oom(self, *args, **kwargs):
        raise tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor with shape[8,256,160,160]")

    monkeypatch.setattr(RetinaNetTask, "train_step", oom)
    data = tmp_path / "tfr"
    build_tfrecords(sample_dataset["clean"], sample_dataset["images"], data, val_fraction=0.0)
    with pytest.raises(OutOfMemoryError) as exc:
        train(data, tmp_path / "m", RunConfig(model=TINY, image_size=128, batch_size=2, steps=3), export=False)
    text = str(exc.value)
    assert text.startswith("out of accelerator memory at batch_size 2 per GPU x 1 replica(s), 128x128 inputs: "
                           "lower batch_size (per GPU) or image_size") and "\n" not in text
    assert exc.value.exit_code == 3
