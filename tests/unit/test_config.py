"""The run configuration: defaults, overrides and one-line errors for bad params."""

from __future__ import annotations

import pytest

from tasks.config import (
    DEFAULT_MODEL,
    RunConfig,
    Settings,
    available_models,
    load_model_config,
)
from tasks.errors import PersoncarError


def test_defaults_fine_tune_the_zoo_ssd_resnet152_at_640() -> None:
    cfg = RunConfig()
    assert cfg.model == DEFAULT_MODEL == "ssd_resnet152_v1_fpn_640x640"
    assert (cfg.init_checkpoint, cfg.warm_start) == ("pretrained", "promoted")
    r = cfg.resolved(train_images=2015, gpus=1)  # the real data set's train split, one GPU
    assert (r["batch_size"], r["global_batch_size"], r["image_size"]) == (8, 8, 640)
    assert r["steps"] == 24 * 252 and r["epochs"] == 24 and r["steps_per_epoch"] == 252  # ceil(2015 / 8)
    assert r["learning_rate"] == pytest.approx(0.04 * 8 / 64)  # the zoo's LR for batch 64, scaled
    assert r["warmup_steps"] == 252 and r["warmup_learning_rate"] == pytest.approx(0.013333 * 8 / 64)
    assert r["validate_every"] == 504  # every 2 epochs
    spec = load_model_config(DEFAULT_MODEL)
    assert spec["pretrained"]["url"].endswith("/ssd_resnet152_v1_fpn_640x640_coco17_tpu-8.tar.gz")
    assert spec["pretrained"]["modules"] == "all" and "COCO" in spec["pretrained"]["trained_on"]
    override = spec["override"]["task"]
    assert override["model"]["backbone"] == {"type": "resnet_v1", "resnet_v1": {"model_id": 152}}
    assert override["model"]["decoder"]["type"] == "ssd_fpn"
    assert override["model"]["anchor"] == {"anchor_size": 3.0, "aspect_ratios": [1.0, 2.0, 0.5, 0.3333],
                                           "num_scales": 2}
    assert override["model"]["detection_generator"]["box_coder_weights"] == [10.0, 10.0, 5.0, 5.0]
    assert override["model"]["norm_activation"]["activation"] == "relu6"
    assert (override["losses"]["huber_loss_delta"], override["losses"]["box_loss_weight"]) == (1.0, 1)
    assert override["losses"]["focal_loss_gamma"] == 2.0 and override["losses"]["focal_loss_alpha"] == 0.25


def test_global_batch_is_per_gpu_batch_times_gpus_and_the_lr_follows() -> None:
    one, four = (RunConfig(batch_size=8).resolved(train_images=2015, gpus=g) for g in (1, 4))
    assert (one["global_batch_size"], four["global_batch_size"]) == (8, 32)
    assert four["learning_rate"] == pytest.approx(4 * one["learning_rate"])
    assert four["steps"] == 24 * 63  # the same 24 epochs in a quarter of the steps
    cpu = RunConfig(batch_size=2).resolved(train_images=10, gpus=0)
    assert (cpu["replicas"], cpu["global_batch_size"]) == (1, 2)


def test_steps_win_over_epochs_and_the_zoo_length_applies_without_a_data_size() -> None:
    assert RunConfig(steps=100, epochs=3).resolved(train_images=2015, gpus=1)["steps"] == 100
    assert RunConfig(epochs=3).resolved(train_images=2015, gpus=1)["steps"] == 3 * 252
    assert RunConfig().resolved()["steps"] == 25000 and RunConfig().resolved()["warmup_steps"] == 2000


def test_start_values_are_normalised() -> None:
    assert RunConfig(init_checkpoint="").init_checkpoint == "pretrained"
    assert RunConfig(init_checkpoint="None").init_checkpoint == "scratch"
    assert RunConfig(init_checkpoint=" s3://b/ckpt ").init_checkpoint == "s3://b/ckpt"


def test_variants_inherit_from_the_152_config() -> None:
    assert {"ssd_resnet50_v1_fpn_640x640", "ssd_resnet101_v1_fpn_640x640", DEFAULT_MODEL} <= set(available_models())
    r50 = load_model_config("ssd_resnet50_v1_fpn_640x640")
    assert r50["override"]["task"]["model"]["backbone"]["resnet_v1"]["model_id"] == 50
    assert r50["override"]["task"]["losses"]["l2_weight_decay"] == 0.0004  # inherited
    assert r50["defaults"]["epochs"] == 24
    assert r50["pretrained"]["url"].endswith("/ssd_resnet50_v1_fpn_640x640_coco17_tpu-8.tar.gz")
    assert r50["pretrained"]["format"] == "od_api"  # inherited


def test_learning_rate_scales_with_batch_size_unless_given() -> None:
    assert RunConfig(batch_size=16).resolved(gpus=1)["learning_rate"] == pytest.approx(0.04 * 16 / 64)
    assert RunConfig(batch_size=8, learning_rate=0.1).resolved()["learning_rate"] == 0.1
    assert RunConfig(steps=100).resolved()["warmup_steps"] == 10


def test_from_params_ignores_none_and_accepts_form_values() -> None:
    cfg = RunConfig.from_params({"steps": 5, "backbone": None, "image_size": 256, "dataset_sha256": "A" * 64})
    assert cfg.steps == 5 and cfg.backbone is None and cfg.dataset_sha256 == "a" * 64


@pytest.mark.parametrize(("params", "message"), [
    ({"steps": -1}, "steps: Input should be greater than or equal to 1"),
    ({"backbone": "resnet9"}, "backbone: Input should be"),
    ({"image_size": 300}, "image_size: must be a multiple of 128"),
    ({"model": "yolo"}, "model: unknown model 'yolo'"),
    ({"dataset_sha256": "xyz"}, "dataset_sha256: must be 64 hexadecimal characters"),
    ({"stepz": 3}, "stepz: unknown parameter"),
    ({"val_fraction": 1.5}, "val_fraction: Input should be less than or equal to 1"),
    ({"backbone": "resnet18"},
     "backbone: ssd_resnet152_v1_fpn_640x640's resnet_v1 backbone comes in depths 26, 50, 101, 152, not resnet18"),
    ({"model": "retinanet_resnet50_fpn_640x640", "backbone": "resnet26"},
     "backbone: retinanet_resnet50_fpn_640x640's resnet backbone comes in depths 18, 34, 50, 101, 152, 200, "
     "not resnet26"),
    ({"dataset_source": " "}, "dataset_source: must not be empty"),
])
def test_bad_params_give_one_clear_line(params: dict, message: str) -> None:
    with pytest.raises(PersoncarError) as exc:
        RunConfig.from_params(params)
    text = str(exc.value)
    assert message in text and "\n" not in text and text.startswith("invalid run configuration: ")


def test_a_backbone_override_is_a_depth_of_the_models_backbone_type() -> None:
    assert [RunConfig(model=m).backbone_type() for m in ("ssd_resnet152_v1_fpn_640x640", "ssd_resnet26_v1_fpn_256x256_tiny",
                                                         "retinanet_resnet50_fpn_640x640")] == ["resnet_v1"] * 2 + ["resnet"]
    assert RunConfig(backbone="resnet26").backbone == "resnet26"
    assert RunConfig(model="retinanet_resnet50_fpn_640x640", backbone="resnet18").backbone == "resnet18"
    with pytest.raises(PersoncarError) as exc:  # a rule across fields does not print the whole config
        RunConfig.from_params({"backbone": "resnet34", "steps": 3})
    assert str(exc.value) == ("invalid run configuration: backbone: ssd_resnet152_v1_fpn_640x640's resnet_v1 backbone "
                              "comes in depths 26, 50, 101, 152, not resnet34")


def test_a_bad_run_config_fails_the_airflow_task_without_retries() -> None:
    from types import SimpleNamespace

    from airflow.sdk.exceptions import AirflowFailException

    from tasks.dag_tasks import download_dataset, run_config, stage_task
    from tasks.storage import StorageError

    context = {"params": {"backbone": "resnet18", "candidates": []}, "dag_run": SimpleNamespace(run_id="manual__1")}
    with pytest.raises(AirflowFailException, match="invalid run configuration: backbone: ") as exc:
        download_dataset(context)
    assert isinstance(exc.value.__cause__, PersoncarError)
    assert run_config({"params": {"steps": 3, "candidates": []}}).steps == 3

    @stage_task
    def failing(error: Exception) -> None:
        raise error

    with pytest.raises(StorageError):  # storage and network failures, and crashes, stay retryable
        failing(StorageError("s3://b/k: endpoint unreachable"))
    with pytest.raises(ZeroDivisionError):
        failing(ZeroDivisionError("crash"))


def test_settings_from_environment_and_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PERSONCAR_ARTIFACT_ROOT", "s3://b/p")
    monkeypatch.setenv("PERSONCAR_EXECUTION_BACKEND", "kubernetes")
    monkeypatch.setenv("PERSONCAR_S3_ENDPOINT_URL", "")  # empty: unset
    st = Settings.load()
    assert st.artifact_root == "s3://b/p" and st.backend == "kubernetes" and st.s3_endpoint_url is None
    assert st.default_publish_dest() == "s3://b/p/published"
    assert Settings.load(artifact_root="/x").artifact_root == "/x"
    assert Settings.from_environ({"PERSONCAR_AWS_CONN_ID": "aws_prod"}).aws_conn_id == "aws_prod"
    monkeypatch.setenv("PERSONCAR_EXECUTION_BACKEND", "slurm")
    with pytest.raises(PersoncarError, match="backend"):
        Settings.load()


def test_airflow_variables_override_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from airflow.sdk import Variable

    monkeypatch.setenv("PERSONCAR_ARTIFACT_ROOT", "/from/env")
    monkeypatch.setattr(Variable, "get", staticmethod(
        lambda key, default=None: {"personcar_artifact_root": "s3://from/variable"}.get(key, default)))
    st = Settings.load()
    assert st.artifact_root == "s3://from/variable" and st.aws_conn_id == "aws_default"


def test_run_folders_are_unique_per_run_id() -> None:
    from tasks.artifacts import safe_run_id
    from tasks.dag_tasks import run_key

    ids = ["a:b", "a_b", "a+b", "manual__2026-01-05T00:00:00+00:00", "scheduled__2026-01-05T00:00:00+00:00"]
    folders = [safe_run_id(i) for i in ids]
    assert len(set(folders)) == len(ids)
    assert all(set(f) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-") for f in folders)
    assert safe_run_id("a_b") == "a_b" and safe_run_id(safe_run_id("a:b")) == safe_run_id("a:b")
    import datetime as dt

    when = dt.datetime(2026, 1, 5, tzinfo=dt.UTC)
    assert run_key("__airflow_temporary_run_2026-11-25T10:00:00__", when) == run_key(
        "__airflow_temporary_run_2026-11-25T11:00:00__", when)  # tasks tested one by one share a folder
