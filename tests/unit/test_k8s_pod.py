"""The trainer pod of the ``kubernetes`` backend: the operators' pod templates plus what the DAG
sets (image, command, arguments, GPUs), rendered by the real operator and validated strictly
against the Kubernetes schema; and the deployment settings."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from tasks.errors import PersoncarError
from tasks.k8s import DEFAULT_TEMPLATES, KubernetesSettingsError, TrainerPodSettings, make_trainer_task, trainer_pod_kwargs

# Versions whose schemas kubernetes-validate ships: a current one and the oldest still supported
# by the major managed services.
K8S_VERSIONS = ["1.33", "1.30"]
TRAIN_ARGS = ["train", "--data", "s3://personcar-artifacts/runs/r1/tfrecords",
              "--model-dir", "s3://personcar-artifacts/runs/r1/model", "--steps", "25000"]
SENTINEL = "wJalrXUtnFEMI-K7MDENG-SENTINEL"  # what a leaked secret would look like


def _render(settings: TrainerPodSettings, *, task_id: str = "train", arguments: list[str] = TRAIN_ARGS,
            gpus: int | None = None) -> tuple[Any, dict[str, Any]]:
    """Build the operator inside a DAG and render its pod the way it would be submitted."""
    import pendulum
    from airflow.sdk import DAG
    from kubernetes.client import ApiClient

    with DAG("personcar_detection_pod_test", schedule=None, start_date=pendulum.datetime(2025, 1, 1)):
        op = make_trainer_task(task_id, arguments, settings, gpus=gpus)
    pod = op.build_pod_request_obj(dry_run=True)
    return op, ApiClient().sanitize_for_serialization(pod)


def _validate(obj: dict[str, Any]) -> None:
    import kubernetes_validate

    for version in K8S_VERSIONS:
        kubernetes_validate.validate(obj, version, strict=True)


@pytest.fixture(scope="module")
def train_pod() -> tuple[Any, dict[str, Any]]:
    return _render(TrainerPodSettings.load())


def test_train_pod_is_valid_kubernetes(train_pod: tuple[Any, dict[str, Any]]) -> None:
    _, obj = train_pod
    assert obj["apiVersion"] == "v1" and obj["kind"] == "Pod"
    _validate(obj)


def test_validator_rejects_what_kubernetes_rejects(train_pod: tuple[Any, dict[str, Any]]) -> None:
    # The schema check is live: a misspelt field and a wrong type are both refused.
    import kubernetes_validate

    _, obj = train_pod
    misspelt = copy.deepcopy(obj)
    misspelt["spec"]["containers"][0]["resource"] = misspelt["spec"]["containers"][0].pop("resources")
    wrong_type = copy.deepcopy(obj)
    wrong_type["spec"]["tolerations"] = {"key": "nvidia.com/gpu"}
    for bad in (misspelt, wrong_type):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(bad, K8S_VERSIONS[0], strict=True)


def test_train_pod_runs_the_cli_on_a_gpu_node(train_pod: tuple[Any, dict[str, Any]]) -> None:
    _, obj = train_pod
    spec = obj["spec"]
    (container,) = spec["containers"]
    assert container["image"] == "ghcr.io/personcar/trainer:0.1.0"
    assert container["command"] == ["personcar"]
    assert container["args"] == TRAIN_ARGS
    assert container["imagePullPolicy"] == "IfNotPresent"
    assert container["resources"] == {  # the template's, plus the GPU
        "limits": {"nvidia.com/gpu": "1", "memory": "60Gi"},
        "requests": {"cpu": "8", "memory": "48Gi"},
    }
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    assert spec["serviceAccountName"] == "personcar-trainer"
    assert obj["metadata"]["namespace"] == "personcar"
    assert spec["restartPolicy"] == "Never"
    assert spec["securityContext"] == {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000,
                                       "seccompProfile": {"type": "RuntimeDefault"}}
    assert container["securityContext"] == {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
    assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert obj["metadata"]["annotations"]["cluster-autoscaler.kubernetes.io/safe-to-evict"] == "false"
    assert obj["metadata"]["labels"]["personcar/stage"] == "train"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["TF_USE_LEGACY_KERAS"] == "1"


def test_operator_lifecycle_options(train_pod: tuple[Any, dict[str, Any]]) -> None:
    op, _ = train_pod
    assert op.startup_timeout_seconds >= 600  # a GPU node may have to be added by the autoscaler
    assert op.get_logs is True
    assert op.log_events_on_failure is True
    assert op.on_finish_action.value == "delete_pod"
    assert op.reattach_on_restart is True
    assert op.do_xcom_push is False
    assert op.deferrable is True  # waits in the triggerer, not in a worker slot
    assert op.termination_message_policy == "FallbackToLogsOnError"
    assert op.pod_template_file == str(DEFAULT_TEMPLATES / "trainer-gpu.yaml")


def test_no_deprecated_operator_arguments() -> None:
    import warnings

    from airflow.exceptions import AirflowProviderDeprecationWarning

    with warnings.catch_warnings():
        warnings.simplefilter("error", AirflowProviderDeprecationWarning)
        _render(TrainerPodSettings.load())


@pytest.mark.parametrize("name", ["trainer-gpu.yaml", "trainer-cpu.yaml"])
def test_pod_templates_are_valid_kubernetes_and_take_credentials_by_reference(name: str) -> None:
    import yaml

    doc = yaml.safe_load((DEFAULT_TEMPLATES / name).read_text(encoding="utf-8"))
    _validate(doc)
    (container,) = doc["spec"]["containers"]
    assert container["name"] == "base"  # the container the operator follows
    assert container["envFrom"] == [{"secretRef": {"name": "personcar-aws"}}]
    for var in container["env"]:
        assert set(var) == {"name", "value"}
        assert not any(word in var["name"] for word in ("SECRET", "TOKEN", "PASSWORD", "ACCESS_KEY"))


def test_credentials_come_from_a_secret_reference_only(monkeypatch: pytest.MonkeyPatch) -> None:
    # The worker's own credentials must not travel into the pod spec.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIA" + SENTINEL)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SENTINEL)
    _, obj = _render(TrainerPodSettings.load())
    assert SENTINEL not in json.dumps(obj)
    (container,) = obj["spec"]["containers"]
    assert container["envFrom"] == [{"secretRef": {"name": "personcar-aws"}}]
    _validate(obj)


def test_cpu_stage_gets_no_gpu_and_no_gpu_placement() -> None:
    args = ["tfrecords", "--annotations", "s3://b/r/validate/annotations.clean.json",
            "--images", "s3://b/r/download/trainval/images", "--out", "s3://b/r/tfrecords"]
    op, obj = _render(TrainerPodSettings.load(), task_id="build_tfrecords", arguments=args, gpus=0)
    _validate(obj)
    spec = obj["spec"]
    assert "nvidia.com/gpu" not in spec["containers"][0]["resources"]["limits"]
    assert not spec.get("nodeSelector")
    assert not spec.get("tolerations")
    assert obj["metadata"]["name"].startswith("build-tfrecords-")
    assert op.pod_template_file.endswith("trainer-cpu.yaml")


def test_multi_gpu_pod_gets_its_gpus_and_shared_memory() -> None:
    _, obj = _render(TrainerPodSettings.load(gpus=4), arguments=[*TRAIN_ARGS, "--gpus", "4"])
    _validate(obj)
    spec = obj["spec"]
    (container,) = spec["containers"]
    assert container["resources"]["limits"] == {"nvidia.com/gpu": "4", "memory": "60Gi"}
    assert container["args"][-2:] == ["--gpus", "4"]
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
    assert {v["name"]: v for v in spec["volumes"]}["dshm"]["emptyDir"]["medium"] == "Memory"


def test_an_operators_template_is_used_as_it_is(tmp_path: Any) -> None:
    import yaml

    for name in ("trainer-gpu.yaml", "trainer-cpu.yaml"):
        doc = yaml.safe_load((DEFAULT_TEMPLATES / name).read_text(encoding="utf-8"))
        doc["metadata"]["namespace"] = "ml-prod"
        doc["spec"]["nodeSelector"] = {"cloud.google.com/gke-accelerator": "nvidia-l4"}
        doc["spec"]["priorityClassName"] = "training"
        (tmp_path / name).write_text(yaml.safe_dump(doc))
    _, obj = _render(TrainerPodSettings.load(pod_templates=tmp_path))
    _validate(obj)
    assert obj["metadata"]["namespace"] == "ml-prod" and obj["spec"]["priorityClassName"] == "training"
    assert obj["spec"]["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-l4"}
    with pytest.raises(KubernetesSettingsError, match=r"PERSONCAR_K8S_POD_TEMPLATES=.*: no trainer-gpu.yaml in it"):
        TrainerPodSettings.load(pod_templates=tmp_path / "missing").template(1)


def test_gpu_flag_must_match_the_pod() -> None:
    with pytest.raises(KubernetesSettingsError, match="--gpus 2 but the pod gets 1"):
        trainer_pod_kwargs(TrainerPodSettings.load(), task_id="train", arguments=[*TRAIN_ARGS, "--gpus", "2"])
    kwargs = trainer_pod_kwargs(TrainerPodSettings.load(), task_id="train", arguments=TRAIN_ARGS)
    assert "task_id" not in kwargs


@pytest.mark.parametrize(("env", "message"), [
    ({"PERSONCAR_K8S_GPUS": "-1"}, r"PERSONCAR_K8S_GPUS='-1': Input should be greater than or equal to 0"),
    ({"PERSONCAR_K8S_GPUS": "1.5"}, r"PERSONCAR_K8S_GPUS='1.5': Input should be a valid integer"),
    ({"PERSONCAR_K8S_IMAGE": "ghcr.io/personcar/trainer"}, r"pinned by tag or digest"),
    ({"PERSONCAR_K8S_IMAGE": "ghcr.io/personcar/trainer:latest"}, r"latest"),
    ({"PERSONCAR_K8S_STARTUP_TIMEOUT_SECONDS": "0"}, r"PERSONCAR_K8S_STARTUP_TIMEOUT_SECONDS='0'"),
    ({"PERSONCAR_K8S_GPU_RESOURCE": "gpu"}, r"PERSONCAR_K8S_GPU_RESOURCE='gpu': String should match pattern"),
])
def test_bad_settings_raise_clear_errors(env: dict[str, str], message: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(KubernetesSettingsError, match=message) as raised:
        TrainerPodSettings.load()
    assert isinstance(raised.value, PersoncarError)  # the CLI prints it as one line, exit code 2
    assert "\n" not in str(raised.value)


def test_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    for k, v in {"PERSONCAR_K8S_IMAGE": "registry.example/trainer@sha256:" + "a" * 64, "PERSONCAR_K8S_GPUS": "2",
                 "PERSONCAR_K8S_POD_TEMPLATES": str(tmp_path), "PERSONCAR_K8S_DEFERRABLE": "false",
                 "PERSONCAR_K8S_IN_CLUSTER": "true", "PERSONCAR_K8S_CONN_ID": ""}.items():
        monkeypatch.setenv(k, v)
    st = TrainerPodSettings.load()
    assert (st.gpus, st.deferrable, st.in_cluster, st.conn_id) == (2, False, True, None)
    assert st.image.endswith("a" * 64) and st.pod_templates == tmp_path
