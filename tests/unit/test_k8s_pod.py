"""The trainer pod of the ``kubernetes`` backend, rendered by the real operator and validated
strictly against the Kubernetes schema; and the settings that shape it."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from tasks.errors import PersoncarError
from tasks.k8s import (
    KubernetesSettingsError,
    TrainerPodSettings,
    make_trainer_task,
    parse_quantity,
    trainer_pod_kwargs,
)

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
    return _render(TrainerPodSettings())


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
    assert container["resources"] == {
        "limits": {"nvidia.com/gpu": "1", "memory": "32Gi"},
        "requests": {"cpu": "4", "memory": "16Gi"},
    }
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    assert spec["serviceAccountName"] == "personcar-trainer"
    assert obj["metadata"]["namespace"] == "personcar"
    assert spec["restartPolicy"] == "Never"
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
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
    assert op.termination_message_policy == "FallbackToLogsOnError"


def test_no_deprecated_operator_arguments() -> None:
    import warnings

    from airflow.exceptions import AirflowProviderDeprecationWarning

    with warnings.catch_warnings():
        warnings.simplefilter("error", AirflowProviderDeprecationWarning)
        _render(TrainerPodSettings())


def test_credentials_come_from_a_secret_reference_only(monkeypatch: pytest.MonkeyPatch) -> None:
    # The worker's own credentials must not travel into the pod spec.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIA" + SENTINEL)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SENTINEL)
    settings = TrainerPodSettings(env={"AWS_DEFAULT_REGION": "eu-west-1",
                                       "AWS_ENDPOINT_URL_S3": "https://s3.eu-west-1.amazonaws.com"})
    _, obj = _render(settings)
    assert SENTINEL not in json.dumps(obj)
    (container,) = obj["spec"]["containers"]
    assert container["envFrom"] == [{"secretRef": {"name": "personcar-aws"}}]
    for var in container["env"]:
        assert set(var) == {"name", "value"}  # values only, no valueFrom of anything else
        assert not any(word in var["name"] for word in ("SECRET", "TOKEN", "PASSWORD", "ACCESS_KEY"))
    _validate(obj)

    # A secret put into the extra environment by mistake is refused, and never rendered.
    with pytest.raises(KubernetesSettingsError, match="Kubernetes secret"):
        TrainerPodSettings(env={"AWS_SECRET_ACCESS_KEY": SENTINEL})
    with pytest.raises(KubernetesSettingsError, match="PERSONCAR_K8S_ENV"):
        TrainerPodSettings.from_env({"PERSONCAR_K8S_ENV": json.dumps({"AWS_SESSION_TOKEN": SENTINEL})})

    # Without a secret (e.g. IAM roles for service accounts), nothing is injected.
    _, obj = _render(TrainerPodSettings(aws_secret=None))
    assert "envFrom" not in obj["spec"]["containers"][0] or not obj["spec"]["containers"][0]["envFrom"]


def test_cpu_stage_gets_no_gpu_and_no_gpu_placement() -> None:
    args = ["tfrecords", "--annotations", "s3://b/r/validate/annotations.clean.json",
            "--images", "s3://b/r/download/trainval/images", "--out", "s3://b/r/tfrecords"]
    _, obj = _render(TrainerPodSettings(), task_id="build_tfrecords", arguments=args, gpus=0)
    _validate(obj)
    spec = obj["spec"]
    assert "nvidia.com/gpu" not in spec["containers"][0]["resources"]["limits"]
    assert not spec.get("nodeSelector")
    assert not spec.get("tolerations")
    assert obj["metadata"]["name"].startswith("build-tfrecords-")


def test_multi_gpu_pod_and_pvc() -> None:
    settings = TrainerPodSettings(gpus=4, pvc_name="personcar-data", cpu_limit="16",
                                  priority_class="training", active_deadline_seconds=86400,
                                  image_pull_secrets=("ghcr-pull",))
    _, obj = _render(settings, arguments=[*TRAIN_ARGS, "--gpus", "4"])
    _validate(obj)
    spec = obj["spec"]
    (container,) = spec["containers"]
    assert container["resources"]["limits"] == {"nvidia.com/gpu": "4", "memory": "32Gi", "cpu": "16"}
    assert container["args"][-2:] == ["--gpus", "4"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts == {"data": "/data", "dshm": "/dev/shm"}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["data"]["persistentVolumeClaim"] == {"claimName": "personcar-data"}
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
    assert spec["priorityClassName"] == "training"
    assert spec["activeDeadlineSeconds"] == 86400
    assert spec["imagePullSecrets"] == [{"name": "ghcr-pull"}]


def test_gpu_flag_must_match_the_pod() -> None:
    with pytest.raises(KubernetesSettingsError, match="--gpus 2 but the pod gets 1"):
        trainer_pod_kwargs(TrainerPodSettings(), task_id="train", arguments=[*TRAIN_ARGS, "--gpus", "2"])
    # Templated values are left to Airflow to render.
    kwargs = trainer_pod_kwargs(TrainerPodSettings(), task_id="train",
                                arguments=[*TRAIN_ARGS, "--gpus", "{{ params.gpus }}"])
    assert kwargs["arguments"][-1] == "{{ params.gpus }}"
    assert "task_id" not in kwargs


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"gpus": -1}, r"gpus \(PERSONCAR_K8S_GPUS\) = -1: must be an integer >= 0"),
    ({"gpus": 1.5}, r"gpus .* must be an integer"),
    ({"memory_request": "lots"}, r"memory_request \(PERSONCAR_K8S_MEMORY_REQUEST\) = 'lots': must be a Kubernetes quantity"),
    ({"memory_limit": "16m"}, r"thousandths of a byte"),
    ({"memory_request": "64Gi"}, r"memory_limit .* must not be below memory_request '64Gi'"),
    ({"cpu_request": "four"}, r"cpu_request .* Kubernetes quantity"),
    ({"cpu_limit": "2"}, r"cpu_limit .* must not be below cpu_request"),
    ({"image": "ghcr.io/personcar/trainer"}, r"pinned by tag or digest"),
    ({"image": "ghcr.io/personcar/trainer:latest"}, r"latest"),
    ({"namespace": "Personcar_Prod"}, r"namespace .* DNS label"),
    ({"image_pull_policy": "sometimes"}, r"Always, IfNotPresent, Never"),
    ({"node_selector": {"gpu type": "a100"}}, r"node_selector .* key"),
    ({"tolerations": ({"key": "nvidia.com/gpu", "operator": "Exists", "value": "x"},)}, r"Exists toleration takes no value"),
    ({"tolerations": ({"key": "k", "effect": "Sometimes"},)}, r"effect must be one of"),
    ({"startup_timeout_seconds": 0}, r"startup_timeout_seconds .* >= 1"),
    ({"pvc_mount_path": "data"}, r"absolute path"),
    ({"in_cluster": True, "config_file": "/etc/kube/config"}, r"exclude each other"),
])
def test_bad_settings_raise_clear_errors(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(KubernetesSettingsError, match=message) as raised:
        TrainerPodSettings(**kwargs)
    assert isinstance(raised.value, PersoncarError)  # the CLI prints it as one line, exit code 2
    assert "\n" not in str(raised.value)


def test_from_env_reads_every_variable() -> None:
    environ = {
        "PERSONCAR_K8S_IMAGE": "registry.example.com:5000/personcar/trainer@sha256:" + "a" * 64,
        "PERSONCAR_K8S_NAMESPACE": "ml-prod",
        "PERSONCAR_K8S_SERVICE_ACCOUNT": "trainer",
        "PERSONCAR_K8S_IMAGE_PULL_POLICY": "Always",
        "PERSONCAR_K8S_IMAGE_PULL_SECRETS": "ghcr-pull, backup-pull",
        "PERSONCAR_K8S_GPUS": "2",
        "PERSONCAR_K8S_GPU_RESOURCE": "amd.com/gpu",
        "PERSONCAR_K8S_CPU_REQUEST": "7500m",
        "PERSONCAR_K8S_CPU_LIMIT": "8",
        "PERSONCAR_K8S_MEMORY_REQUEST": "48Gi",
        "PERSONCAR_K8S_MEMORY_LIMIT": "60Gi",
        "PERSONCAR_K8S_SHM_SIZE": "4Gi",
        "PERSONCAR_K8S_NODE_SELECTOR": "cloud.google.com/gke-accelerator=nvidia-l4,pool=train",
        "PERSONCAR_K8S_TOLERATIONS": '[{"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}]',
        "PERSONCAR_K8S_STARTUP_TIMEOUT_SECONDS": "1800",
        "PERSONCAR_K8S_ACTIVE_DEADLINE_SECONDS": "172800",
        "PERSONCAR_K8S_AWS_SECRET": "",
        "PERSONCAR_K8S_ENV": '{"AWS_DEFAULT_REGION": "us-east-1"}',
        "PERSONCAR_K8S_LABELS": "team=vision",
        "PERSONCAR_K8S_PVC": "personcar-data",
        "PERSONCAR_K8S_PVC_MOUNT_PATH": "/mnt/data",
        "PERSONCAR_K8S_PRIORITY_CLASS": "batch-high",
        "PERSONCAR_K8S_IN_CLUSTER": "true",
        "PERSONCAR_K8S_CONTEXT": "",
        "PERSONCAR_K8S_CONN_ID": "",
        "PERSONCAR_K8S_DEFERRABLE": "yes",
        "UNRELATED": "ignored",
    }
    s = TrainerPodSettings.from_env(environ)
    assert s.image == environ["PERSONCAR_K8S_IMAGE"]
    assert (s.namespace, s.service_account, s.image_pull_policy) == ("ml-prod", "trainer", "Always")
    assert s.image_pull_secrets == ("ghcr-pull", "backup-pull")
    assert (s.gpus, s.gpu_resource) == (2, "amd.com/gpu")
    assert (s.cpu_request, s.cpu_limit, s.memory_request, s.memory_limit, s.shm_size) == (
        "7500m", "8", "48Gi", "60Gi", "4Gi")
    assert s.node_selector == {"cloud.google.com/gke-accelerator": "nvidia-l4", "pool": "train"}
    assert s.tolerations == ({"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"},)
    assert (s.startup_timeout_seconds, s.active_deadline_seconds) == (1800, 172800)
    assert s.aws_secret is None
    assert s.env == {"AWS_DEFAULT_REGION": "us-east-1"}
    assert s.labels == {"team": "vision"}
    assert (s.pvc_name, s.pvc_mount_path, s.priority_class) == ("personcar-data", "/mnt/data", "batch-high")
    assert (s.in_cluster, s.cluster_context, s.kubernetes_conn_id, s.deferrable) == (True, None, None, True)

    # ... and the pod made from them is still valid Kubernetes.
    _, obj = _render(s, arguments=[*TRAIN_ARGS, "--gpus", "2"])
    _validate(obj)
    (container,) = obj["spec"]["containers"]
    assert container["resources"]["limits"]["amd.com/gpu"] == "2"
    assert obj["spec"]["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-l4", "pool": "train"}
    assert obj["metadata"]["labels"]["team"] == "vision"


def test_from_env_defaults_and_errors() -> None:
    assert TrainerPodSettings.from_env({}) == TrainerPodSettings()
    for environ, message in [
        ({"PERSONCAR_K8S_GPUS": "two"}, r"PERSONCAR_K8S_GPUS='two': expected an integer"),
        ({"PERSONCAR_K8S_GPUS": "-1"}, r"PERSONCAR_K8S_GPUS\) = -1"),
        ({"PERSONCAR_K8S_MEMORY_LIMIT": "lots"}, r"PERSONCAR_K8S_MEMORY_LIMIT\) = 'lots'"),
        ({"PERSONCAR_K8S_DEFERRABLE": "maybe"}, r"PERSONCAR_K8S_DEFERRABLE='maybe': expected true or false"),
        ({"PERSONCAR_K8S_NODE_SELECTOR": "gpu"}, r"expected key=value pairs"),
        ({"PERSONCAR_K8S_TOLERATIONS": "[{"}, r"invalid JSON list of tolerations"),
        ({"PERSONCAR_K8S_ENV": '["A=1"]'}, r"invalid JSON object|expected a JSON object"),
    ]:
        with pytest.raises(KubernetesSettingsError, match=message):
            TrainerPodSettings.from_env(environ)


def test_from_env_defaults_to_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PERSONCAR_K8S_NAMESPACE", "from-process")
    assert TrainerPodSettings.from_env().namespace == "from-process"


@pytest.mark.parametrize(("quantity", "value"), [
    ("4", 4), ("500m", 0.5), ("16Gi", 16 * 2**30), ("1.5G", 1.5e9), ("2e3", 2000), ("128Mi", 128 * 2**20),
])
def test_parse_quantity(quantity: str, value: float) -> None:
    assert float(parse_quantity(quantity)) == pytest.approx(value)
