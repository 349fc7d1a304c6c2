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


def test_defaults_are_the_zoo_ssd_resnet152_at_640() -> None:
    r = RunConfig().resolved()
    assert RunConfig().model == DEFAULT_MODEL == "ssd_resnet152_v1_fpn_640x640"
    assert (r["steps"], r["batch_size"], r["image_size"], r["learning_rate"]) == (25000, 64, 640, 0.04)
    assert r["warmup_steps"] == 2000 and r["warmup_learning_rate"] == pytest.approx(0.013333)
    override = load_model_config(DEFAULT_MODEL)["override"]["task"]
    assert override["model"]["backbone"]["resnet"]["model_id"] == 152
    assert override["model"]["anchor"] == {"anchor_size": 4.0, "aspect_ratios": [1.0, 2.0, 0.5], "num_scales": 2}
    assert override["losses"]["focal_loss_gamma"] == 2.0 and override["losses"]["focal_loss_alpha"] == 0.25


def test_variants_inherit_from_the_152_config() -> None:
    assert {"ssd_resnet50_v1_fpn_640x640", "ssd_resnet101_v1_fpn_640x640", DEFAULT_MODEL} <= set(available_models())
    r50 = load_model_config("ssd_resnet50_v1_fpn_640x640")
    assert r50["override"]["task"]["model"]["backbone"]["resnet"]["model_id"] == 50
    assert r50["override"]["task"]["losses"]["l2_weight_decay"] == 0.0004  # inherited
    assert r50["defaults"]["steps"] == 25000


def test_learning_rate_scales_with_batch_size_unless_given() -> None:
    assert RunConfig(batch_size=8).resolved()["learning_rate"] == pytest.approx(0.04 * 8 / 64)
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
])
def test_bad_params_give_one_clear_line(params: dict, message: str) -> None:
    with pytest.raises(PersoncarError) as exc:
        RunConfig.from_params(params)
    text = str(exc.value)
    assert message in text and "\n" not in text and text.startswith("invalid run configuration: ")


def test_settings_from_environment_and_overrides() -> None:
    st = Settings.from_env({"PERSONCAR_ARTIFACT_ROOT": "s3://b/p", "PERSONCAR_EXECUTION_BACKEND": "kubernetes"})
    assert st.artifact_root == "s3://b/p" and st.backend == "kubernetes"
    assert st.default_publish_dest() == "s3://b/p/published"
    assert Settings.from_env({}, artifact_root="/x").artifact_root == "/x"
    with pytest.raises(PersoncarError, match="backend"):
        Settings.from_env({"PERSONCAR_EXECUTION_BACKEND": "slurm"})


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
