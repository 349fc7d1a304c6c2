"""Where training starts: checkpoints of every kind, from every place, checked before any training.

A zoo (OD API) checkpoint is built with the zoo's variable names and shapes (``tests/zoo_checkpoint.py``,
from Keras' own ResNet and the OD API's object graph) and the converted model must compute what
the zoo network computes, number for number. Own, Model Garden classification-style and RetinaNet
checkpoints load from a path, ``s3://`` (moto's server over HTTP) and ``https://``-style URLs (a
local HTTP server); a checkpoint of another depth or head fails before training with the mismatch
named; a warm start from a promoted run begins near that run's last loss.
"""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest

from tasks.config import RunConfig
from tasks.errors import PersoncarError
from tasks.tfrecords import build_tfrecords
from tests.zoo_checkpoint import write_zoo_checkpoint, zoo_forward, zoo_variables

pytestmark = pytest.mark.slow
TINY = "ssd_resnet26_v1_fpn_256x256_tiny"
SIZE = 128
OWN_STEPS = 200  # enough to memorise the 12 generated images at 128 px: losses far below a fresh start's


def tiny_model(model: str = TINY, backbone: str | None = None, size: int = SIZE):
    """A built model of ``model`` (and its Model Garden experiment) without training."""
    from official.core import task_factory

    from tasks.train import build_experiment

    exp = build_experiment(RunConfig(model=model, backbone=backbone, image_size=size), Path("/nonexistent"), gpus=0)
    return task_factory.get_task(exp.task).build_model(), exp


def module_values(model, module: str) -> list[np.ndarray]:
    return [v.numpy() for v in getattr(model, module).variables]


@pytest.fixture(scope="module")
def zoo_ckpt(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("zoo")
    values = zoo_variables(depth=26, width=0.5, fpn=64, tower_convs=2)
    (root / "zoo" / "checkpoint").mkdir(parents=True)
    prefix = write_zoo_checkpoint(str(root / "zoo" / "checkpoint" / "ckpt-0"), values)
    archive = root / "ssd_tiny_coco17.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(root / "zoo", arcname="ssd_tiny_coco17")
    return {"values": values, "prefix": prefix, "archive": archive}


@pytest.fixture(scope="module")
def tfr(tmp_path_factory: pytest.TempPathFactory, sample_dataset: dict) -> Path:
    data = tmp_path_factory.mktemp("tfr") / "tfr"
    build_tfrecords(sample_dataset["clean"], sample_dataset["images"], data, val_fraction=0.0)
    return data


@pytest.fixture(scope="module")
def own_run(tfr: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A few steps of the tiny model: this project's own checkpoint layout."""
    from tasks.train import train

    model_dir = tmp_path_factory.mktemp("own") / "train"
    summary = train(tfr, model_dir, RunConfig(model=TINY, image_size=SIZE, batch_size=2, steps=OWN_STEPS,
                                              learning_rate=0.03, augment=False, init_checkpoint="scratch"),
                    log_every=20, export=False)
    return {"dir": model_dir, "prefix": str(model_dir / f"ckpt-{OWN_STEPS}"), "summary": summary}


def test_zoo_checkpoint_converts_to_the_same_network(zoo_ckpt: dict) -> None:
    from official.vision.ops import preprocess_ops

    from tasks.checkpoints import initialize

    model, exp = tiny_model()
    info = initialize(model, exp.task.model, str(zoo_ckpt["archive"]), "all")
    assert info["format"] == "od_api" and info["modules"] == ["backbone", "decoder", "head"]
    n_model = sum(len(getattr(model, m).variables) for m in ("backbone", "decoder", "head"))
    assert info["variables"] == n_model and info["zoo_class_slots"] == 91
    assert info["class_columns"] == {"person": 1, "car": 3}

    image = np.random.default_rng(3).uniform(0, 255, (SIZE, SIZE, 3)).astype(np.float32)
    zoo_cls, zoo_box = zoo_forward(zoo_ckpt["values"], image)
    z = (image - np.asarray(preprocess_ops.MEAN_RGB)) / np.asarray(preprocess_ops.STDDEV_RGB)
    feats = model.decoder(model.backbone(z[None].astype(np.float32), training=False), training=False)
    cls, box = model.head(feats, training=False)[:2]
    amap = info["anchor_map"]
    assert sorted(set(amap)) == [0, 2, 4]  # scale 3 anchors take the zoo's nearest (scale 4) shapes
    for level in range(3, 8):
        c = cls[str(level)].numpy()[0].reshape(*zoo_cls[level].shape[:2], len(amap), 3)
        b = box[str(level)].numpy()[0].reshape(*zoo_box[level].shape[:2], len(amap), 4)
        zc = zoo_cls[level].reshape(*zoo_cls[level].shape[:2], 6, 91)
        zb = zoo_box[level].reshape(*zoo_box[level].shape[:2], 6, 4)
        for a, za in enumerate(amap):
            np.testing.assert_allclose(c[..., a, 1], zc[..., za, 1], atol=5e-3)  # person = COCO 1
            np.testing.assert_allclose(c[..., a, 2], zc[..., za, 3], atol=5e-3)  # car = COCO 3
            np.testing.assert_allclose(b[..., a, :], zb[..., za, :], atol=5e-3)
        assert np.abs(zc[..., 1]).max() > 1.0  # not a trivially zero comparison


def test_convert_checkpoint_command_on_the_real_resnet152_layout(tmp_path: Path) -> None:
    """The production model: 310 backbone layers, 256-channel FPN, 4-layer towers, 6 x 91 class outputs."""
    from tasks.cli import main

    values = zoo_variables(depth=152, width=1.0, fpn=256, tower_convs=4, slots=91)
    assert sum(v.size for k, v in values.items() if k != "save_counter") == pytest.approx(67.65e6, rel=0.01)
    prefix = write_zoo_checkpoint(str(tmp_path / "ckpt-0"), values)
    del values
    assert main(["convert-checkpoint", "--src", prefix, "--out", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "conversion.json").read_text())
    assert report["model"] == "ssd_resnet152_v1_fpn_640x640" and report["modules"] == ["backbone", "decoder", "head"]
    assert report["zoo_variables_used"] == 973 and report["variables"] == 981  # + 8 zero tower biases
    assert (tmp_path / "out" / "ckpt-1.index").is_file()
    # the converted checkpoint is a Model Garden one now, and the wrong depth is refused by name
    with pytest.raises(PersoncarError, match="another ResNet depth"):
        from tasks.checkpoints import initialize

        model, exp = tiny_model("ssd_resnet50_v1_fpn_640x640")
        initialize(model, exp.task.model, prefix, "backbone")


def test_own_checkpoint_restores_every_module(own_run: dict) -> None:
    from tasks.checkpoints import initialize

    model, exp = tiny_model()
    info = initialize(model, exp.task.model, own_run["prefix"], None)
    assert info["format"] == "model_garden" and info["modules"] == ["backbone", "decoder", "head"]
    trained, _ = tiny_model()
    import tensorflow as tf

    tf.train.Checkpoint(backbone=trained.backbone, decoder=trained.decoder, head=trained.head).read(
        own_run["prefix"]).expect_partial()
    for module in ("backbone", "decoder", "head"):
        for a, b in zip(module_values(model, module), module_values(trained, module), strict=True):
            np.testing.assert_array_equal(a, b)


def test_classification_style_backbone_checkpoint(tmp_path: Path) -> None:
    """Model Garden's ImageNet checkpoints hold a ``backbone`` alone."""
    import tensorflow as tf

    from tasks.checkpoints import initialize

    source, _ = tiny_model()
    for v in source.backbone.trainable_variables:
        v.assign(tf.random.normal(v.shape, stddev=0.05))
    prefix = tf.train.Checkpoint(backbone=source.backbone).write(str(tmp_path / "imagenet" / "ckpt-1"))
    model, exp = tiny_model()
    before = module_values(model, "decoder")
    info = initialize(model, exp.task.model, str(tmp_path / "imagenet"), "backbone")
    assert info["modules"] == ["backbone"] and info["variables"] == len(model.backbone.variables)
    np.testing.assert_array_equal(module_values(model, "backbone")[0], source.backbone.variables[0].numpy())
    assert all(np.array_equal(a, b) for a, b in zip(before, module_values(model, "decoder"), strict=True))
    with pytest.raises(PersoncarError, match=r"has no decoder, head \(it holds backbone\); set init_checkpoint_modules"):
        initialize(model, exp.task.model, prefix, "all")


def test_retinanet_checkpoint_from_s3_and_from_https(own_run: dict, s3_bucket: tuple[str, str], tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import boto3

    from tasks.checkpoints import initialize

    monkeypatch.setenv("PERSONCAR_CACHE_DIR", str(tmp_path / "cache"))
    endpoint, bucket = s3_bucket
    s3 = boto3.client("s3", endpoint_url=endpoint)
    for f in own_run["dir"].glob(f"ckpt-{OWN_STEPS}.*"):
        s3.upload_file(str(f), bucket, f"runs/r1/train/{f.name}")
    model, exp = tiny_model()
    info = initialize(model, exp.task.model, f"s3://{bucket}/runs/r1/train/ckpt-{OWN_STEPS}", "all",
                      where={"endpoint_url": endpoint})
    assert info["variables"] == sum(len(getattr(model, m).variables) for m in ("backbone", "decoder", "head"))

    archive = tmp_path / "site" / "retinanet.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        for f in own_run["dir"].glob(f"ckpt-{OWN_STEPS}.*"):
            tar.add(f, arcname=f"retinanet/{f.name}")
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(archive.parent), **k)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/retinanet.tar.gz"
        model2, exp2 = tiny_model()
        info2 = initialize(model2, exp2.task.model, url, "backbone,decoder")
        assert info2["modules"] == ["backbone", "decoder"] and info2["prefix"].endswith(f"retinanet/ckpt-{OWN_STEPS}")
        again = initialize(model2, exp2.task.model, url, "backbone")  # the cache serves the second run
        assert again["prefix"] == info2["prefix"]
    finally:
        server.shutdown()
    for a, b in zip(module_values(model, "head"), module_values(model2, "head"), strict=True):
        if a.size > 1 and a.std() > 0:
            assert not np.array_equal(a, b)  # backbone,decoder only: the head stayed as built


def test_mismatched_checkpoint_fails_before_training_with_the_mismatch_named(own_run: dict, tfr: Path,
                                                                             tmp_path: Path) -> None:
    from tasks.train import resolve_start, train

    other_head = RunConfig(model=TINY, image_size=SIZE, batch_size=2, steps=5, init_checkpoint=own_run["prefix"],
                           backbone="resnet50")
    with pytest.raises(PersoncarError) as exc:
        train(tfr, tmp_path / "m", other_head, start=resolve_start(other_head), export=False)
    text = str(exc.value)
    assert "does not fit the model" in text and "\n" not in text
    assert "in the checkpoint but" in text or "have no value in it" in text
    assert not list((tmp_path / "m").glob("ckpt-*"))  # nothing trained
    # From the CLI, the one line is the last word: the half-restored model is collected at exit without
    # TensorFlow listing every value it did not restore (186 lines for this model).
    cmd = [sys.executable, "-m", "tasks.cli", "train", "--data", str(tfr), "--model-dir", str(tmp_path / "cli"),
           "--model", TINY, "--backbone", "resnet50", "--image-size", str(SIZE), "--batch-size", "2", "--steps", "5",
           "--init-checkpoint", own_run["prefix"], "--no-export"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1].startswith("personcar train: error: init checkpoint "), done.stderr[-2000:]
    assert "unrestored values" not in done.stderr + done.stdout
    with pytest.raises(PersoncarError, match="no such file or folder"):
        cfg = RunConfig(model=TINY, image_size=SIZE, init_checkpoint=str(tmp_path / "nope"))
        train(tfr, tmp_path / "m2", cfg, start=resolve_start(cfg), export=False)


def test_warm_start_from_the_promoted_run_starts_near_its_last_loss(own_run: dict, tfr: Path, tmp_path: Path) -> None:
    from tasks.train import resolve_start, train

    promoted = {"run_id": "week-1", "model": {"name": TINY, "backbone": None, "checkpoint": own_run["prefix"]}}
    common = dict(model=TINY, image_size=SIZE, batch_size=2, steps=3, learning_rate=1e-6, augment=False)
    warm_cfg = RunConfig(**common, warm_start="promoted", init_checkpoint="scratch")
    start = resolve_start(warm_cfg, promoted=promoted)
    assert start["kind"] == "promoted" and start["run_id"] == "week-1"
    warm = train(tfr, tmp_path / "warm", warm_cfg, start=start, export=False, log_every=3)  # mean of 3 steps
    fresh = train(tfr, tmp_path / "fresh", RunConfig(**common, warm_start="none", init_checkpoint="scratch"),
                  start=resolve_start(RunConfig(**common, init_checkpoint="scratch")), export=False, log_every=3)
    last = own_run["summary"]["final_losses"]
    first_warm, first_fresh = warm["final_losses"], fresh["final_losses"]
    print(f"promoted run's last loss {last}, warm start's first {first_warm}, fresh start's first {first_fresh}")
    assert warm["started_from"]["kind"] == "promoted" and warm["started_from"]["variables"] > 0
    for k in ("Loss/classification_loss", "Loss/localization_loss"):
        assert first_warm[k] < 0.5 * first_fresh[k], k
    assert abs(first_warm["Loss/total_loss"] - last["Loss/total_loss"]) < 0.25 * last["Loss/total_loss"]
    other = resolve_start(RunConfig(model="ssd_resnet50_v1_fpn_640x640", init_checkpoint="scratch"), promoted=promoted)
    assert other["kind"] == "scratch" and "is ssd_resnet26" in other["reason"]  # another model: no warm start
