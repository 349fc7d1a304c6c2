"""Trainer pods for the ``kubernetes`` execution backend.

In the ``kubernetes`` backend the TensorFlow stages (``build_tfrecords``, ``train``, ``evaluate``)
run as ``KubernetesPodOperator`` tasks in the trainer image, whose entrypoint is the ``personcar``
CLI. Data and model folders live under the artifact root on S3 (``s3://bucket/prefix``); the CLI in
the pod downloads its inputs and uploads its outputs itself, so this module only builds the pod:
image, arguments, GPU and memory resources, GPU node placement, service account, credentials (by
reference to a Kubernetes secret, never by value) and the operator's lifecycle options.

One frozen :class:`TrainerPodSettings` describes the cluster side. A deployment sets it through
environment variables of the Airflow workers (``TrainerPodSettings.from_env``):

==========================================  =====================================================
variable                                    meaning (default)
==========================================  =====================================================
``PERSONCAR_K8S_IMAGE``                     trainer image, pinned by tag or digest
                                            (``ghcr.io/personcar/trainer:0.1.0``)
``PERSONCAR_K8S_NAMESPACE``                 namespace of the trainer pods (``personcar``)
``PERSONCAR_K8S_SERVICE_ACCOUNT``           service account of the pods (``personcar-trainer``)
``PERSONCAR_K8S_IMAGE_PULL_POLICY``         ``Always``, ``IfNotPresent`` or ``Never``
                                            (``IfNotPresent``)
``PERSONCAR_K8S_IMAGE_PULL_SECRETS``        comma-separated secret names for a private registry
``PERSONCAR_K8S_GPUS``                      GPUs per training pod, an integer >= 0 (``1``);
                                            more than one trains with MirroredStrategy
``PERSONCAR_K8S_GPU_RESOURCE``              extended resource name of a GPU (``nvidia.com/gpu``)
``PERSONCAR_K8S_CPU_REQUEST``               CPU request, a Kubernetes quantity (``4``)
``PERSONCAR_K8S_CPU_LIMIT``                 CPU limit (none: no CPU throttling)
``PERSONCAR_K8S_MEMORY_REQUEST``            memory request (``16Gi``)
``PERSONCAR_K8S_MEMORY_LIMIT``              memory limit, >= the request (``32Gi``)
``PERSONCAR_K8S_SHM_SIZE``                  size of the in-memory ``/dev/shm`` mounted when a pod
                                            has more than one GPU (NCCL needs it) (``2Gi``)
``PERSONCAR_K8S_NODE_SELECTOR``             node selector of GPU pods, JSON object or
                                            ``k=v,k=v`` (``nvidia.com/gpu.present=true``, the
                                            label of NVIDIA's GPU feature discovery; on GKE use
                                            ``cloud.google.com/gke-accelerator=<type>``)
``PERSONCAR_K8S_TOLERATIONS``               JSON list of tolerations of GPU pods (the
                                            ``nvidia.com/gpu`` ``NoSchedule`` taint)
``PERSONCAR_K8S_STARTUP_TIMEOUT_SECONDS``   how long a pod may stay pending, e.g. while the
                                            autoscaler adds a GPU node (``900``)
``PERSONCAR_K8S_ACTIVE_DEADLINE_SECONDS``   hard limit on a pod's running time (none)
``PERSONCAR_K8S_AWS_SECRET``                Kubernetes secret whose keys become the pod's
                                            environment (``AWS_ACCESS_KEY_ID``, ...);
                                            empty for none, e.g. with IRSA (``personcar-aws``)
``PERSONCAR_K8S_ENV``                       extra non-secret environment, JSON object or
                                            ``K=V,K=V`` (e.g. ``AWS_DEFAULT_REGION``,
                                            ``AWS_ENDPOINT_URL_S3``)
``PERSONCAR_K8S_LABELS``                    extra pod labels, JSON object or ``k=v,k=v``
``PERSONCAR_K8S_PVC``                       a PersistentVolumeClaim to mount instead of using S3
``PERSONCAR_K8S_PVC_MOUNT_PATH``            where the claim is mounted (``/data``)
``PERSONCAR_K8S_PRIORITY_CLASS``            priority class of the pods (none)
``PERSONCAR_K8S_IN_CLUSTER``                ``true`` when Airflow runs in the same cluster
``PERSONCAR_K8S_CONFIG_FILE``               kubeconfig file when it does not
``PERSONCAR_K8S_CONTEXT``                   kubeconfig context (its current context)
``PERSONCAR_K8S_CONN_ID``                   Airflow Kubernetes connection (``kubernetes_default``);
                                            empty to use only the settings above
``PERSONCAR_K8S_DEFERRABLE``                ``true`` to wait for pods in the triggerer instead of
                                            holding a worker slot (``false``)
==========================================  =====================================================

Every value is checked when the settings are built; a bad one raises
:class:`KubernetesSettingsError` naming the variable, the value and the rule.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

from tasks.errors import PersoncarError
from tasks.logs import log

DEFAULT_IMAGE = "ghcr.io/personcar/trainer:0.1.0"
GPU_NODE_LABEL = {"nvidia.com/gpu.present": "true"}
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
# The trainer image runs as this numeric user (docker/trainer.Dockerfile); the pod asks for it so
# that Kubernetes can enforce runAsNonRoot.
TRAINER_UID = 1000
CLI = "personcar"
ENV_PREFIX = "PERSONCAR_K8S_"

# Environment variable names that must never be given by value in a pod spec.
_SECRET_NAME = re.compile(r"(SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|PRIVATE_KEY)|^AWS_ACCESS_KEY_ID$", re.I)
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
_QUANTITY = re.compile(r"^(?P<num>\d+(\.\d*)?|\.\d+)(?P<suffix>Ki|Mi|Gi|Ti|Pi|Ei|m|k|M|G|T|P|E|[eE][+-]?\d+)?$")
_SUFFIX = {
    "": Decimal(1), "m": Decimal("0.001"), "k": Decimal(10) ** 3, "M": Decimal(10) ** 6,
    "G": Decimal(10) ** 9, "T": Decimal(10) ** 12, "P": Decimal(10) ** 15, "E": Decimal(10) ** 18,
    "Ki": Decimal(2) ** 10, "Mi": Decimal(2) ** 20, "Gi": Decimal(2) ** 30, "Ti": Decimal(2) ** 40,
    "Pi": Decimal(2) ** 50, "Ei": Decimal(2) ** 60,
}
_PULL_POLICIES = ("Always", "IfNotPresent", "Never")
_TOLERATION_KEYS = {"key", "operator", "value", "effect", "tolerationSeconds"}
_TAINT_EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")


class KubernetesSettingsError(PersoncarError):
    """A trainer pod setting is invalid (the message names the variable, the value and the rule)."""


def _env_name(field_name: str) -> str:
    return _ENV_VARS.get(field_name, ENV_PREFIX + field_name.upper())


def _bad(field_name: str, value: Any, rule: str) -> KubernetesSettingsError:
    return KubernetesSettingsError(
        f"trainer pod setting {field_name} ({_env_name(field_name)}) = {value!r}: {rule}"
    )


def parse_quantity(value: str) -> Decimal:
    """The number a Kubernetes quantity stands for (``"500m"`` -> 0.5, ``"16Gi"`` -> 17179869184).

    Raises ValueError for anything that is not a non-negative Kubernetes quantity.
    """
    match = _QUANTITY.match(str(value).strip())
    if not match:
        raise ValueError(f"not a Kubernetes quantity: {value!r}")
    suffix = match["suffix"] or ""
    try:
        number = Decimal(match["num"])
        if suffix[:1] in ("e", "E"):
            return number * (Decimal(10) ** int(suffix[1:]))
        return number * _SUFFIX[suffix]
    except (InvalidOperation, KeyError, ValueError) as exc:  # pragma: no cover - the regex guards it
        raise ValueError(f"not a Kubernetes quantity: {value!r}") from exc


def _check_quantity(field_name: str, value: Any, *, memory: bool) -> Decimal:
    if not isinstance(value, str) or not _QUANTITY.match(value.strip()):
        example = "16Gi, 512Mi" if memory else "4, 500m"
        raise _bad(field_name, value, f"must be a Kubernetes quantity such as {example}")
    if memory and value.strip().endswith("m"):
        raise _bad(field_name, value, "'m' means thousandths of a byte; write Mi (mebibytes) or M")
    amount = parse_quantity(value)
    if amount <= 0:
        raise _bad(field_name, value, "must be greater than zero")
    return amount


def _check_int(field_name: str, value: Any, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _bad(field_name, value, f"must be an integer >= {minimum}")


def _check_labels(field_name: str, labels: Any, *, what: str = "label") -> None:
    if not isinstance(labels, Mapping):
        raise _bad(field_name, labels, f"must be a mapping of {what} keys to values")
    for key, value in labels.items():
        prefix, _, name = str(key).rpartition("/")
        if (
            not isinstance(key, str)
            or not _LABEL_NAME.match(name) or len(name) > 63
            or (prefix and (not _DNS_SUBDOMAIN.match(prefix) or len(prefix) > 253))
        ):
            raise _bad(field_name, key, f"{what} key must be [prefix/]name with name "
                                        "[A-Za-z0-9-_.], at most 63 characters")
        if not isinstance(value, str) or not _LABEL_VALUE.match(value) or len(value) > 63:
            raise _bad(field_name, {key: value}, f"{what} value must be at most 63 characters of "
                                                  "[A-Za-z0-9-_.], starting and ending alphanumeric")


def _check_toleration(field_name: str, toleration: Any) -> None:
    if not isinstance(toleration, Mapping) or not set(toleration) <= _TOLERATION_KEYS:
        raise _bad(field_name, toleration, f"each toleration must be an object with keys among "
                                           f"{sorted(_TOLERATION_KEYS)}")
    operator = toleration.get("operator", "Equal")
    if operator not in ("Exists", "Equal"):
        raise _bad(field_name, toleration, "operator must be Exists or Equal")
    if operator == "Exists" and toleration.get("value"):
        raise _bad(field_name, toleration, "an Exists toleration takes no value")
    if toleration.get("effect") not in (None, "", *_TAINT_EFFECTS):
        raise _bad(field_name, toleration, f"effect must be one of {', '.join(_TAINT_EFFECTS)}")
    seconds = toleration.get("tolerationSeconds")
    if seconds is not None and (isinstance(seconds, bool) or not isinstance(seconds, int)):
        raise _bad(field_name, toleration, "tolerationSeconds must be an integer")


def _check_env(field_name: str, env: Any) -> None:
    if not isinstance(env, Mapping):
        raise _bad(field_name, env, "must be a mapping of variable names to values")
    for name, value in env.items():
        if not isinstance(name, str) or not _ENV_NAME.match(name):
            raise _bad(field_name, name, "environment variable names are letters, digits, '_', '-' "
                                         "and '.', not starting with a digit")
        if not isinstance(value, str):
            raise _bad(field_name, {name: value}, "environment values must be strings")
        if _SECRET_NAME.search(name):
            raise _bad(field_name, name, "credentials never go into the pod spec by value: put them "
                                         f"in the Kubernetes secret named by {_env_name('aws_secret')}")


def _check_name(field_name: str, value: Any, pattern: re.Pattern[str], max_len: int, what: str) -> None:
    if not isinstance(value, str) or not pattern.match(value) or len(value) > max_len:
        raise _bad(field_name, value, f"must be a {what}: lower-case letters, digits and '-', "
                                      f"at most {max_len} characters")


@dataclass(frozen=True)
class TrainerPodSettings:
    """The cluster side of a trainer pod; see the module documentation for each variable."""

    image: str = DEFAULT_IMAGE
    namespace: str = "personcar"
    service_account: str = "personcar-trainer"
    image_pull_policy: str = "IfNotPresent"
    image_pull_secrets: tuple[str, ...] = ()
    gpus: int = 1
    gpu_resource: str = "nvidia.com/gpu"
    cpu_request: str = "4"
    cpu_limit: str | None = None
    memory_request: str = "16Gi"
    memory_limit: str = "32Gi"
    shm_size: str = "2Gi"
    node_selector: Mapping[str, str] = field(default_factory=lambda: dict(GPU_NODE_LABEL))
    tolerations: tuple[Mapping[str, Any], ...] = (GPU_TOLERATION,)
    startup_timeout_seconds: int = 900
    active_deadline_seconds: int | None = None
    aws_secret: str | None = "personcar-aws"
    env: Mapping[str, str] = field(default_factory=dict)
    labels: Mapping[str, str] = field(default_factory=dict)
    pvc_name: str | None = None
    pvc_mount_path: str = "/data"
    priority_class: str | None = None
    in_cluster: bool | None = None
    config_file: str | None = None
    cluster_context: str | None = None
    kubernetes_conn_id: str | None = "kubernetes_default"
    deferrable: bool = False

    def __post_init__(self) -> None:
        # Normalise sequences to tuples so a frozen settings object stays effectively immutable.
        object.__setattr__(self, "image_pull_secrets", tuple(self.image_pull_secrets))
        object.__setattr__(self, "tolerations", tuple(dict(t) if isinstance(t, Mapping) else t
                                                      for t in self.tolerations))
        object.__setattr__(self, "node_selector", dict(self.node_selector))
        object.__setattr__(self, "env", dict(self.env))
        object.__setattr__(self, "labels", dict(self.labels))
        self._validate()

    def _validate(self) -> None:
        image = self.image
        if not isinstance(image, str) or not image or re.search(r"\s", image):
            raise _bad("image", image, "must be an image reference without spaces")
        last = image.rsplit("/", 1)[-1]
        if "@" not in last and ":" not in last:
            raise _bad("image", image, "must be pinned by tag or digest (repository:tag)")
        if last.endswith(":latest"):
            raise _bad("image", image, "':latest' is not a pin; use a version tag or a digest")
        _check_name("namespace", self.namespace, _DNS_LABEL, 63, "DNS label")
        _check_name("service_account", self.service_account, _DNS_SUBDOMAIN, 253, "DNS subdomain")
        if self.image_pull_policy not in _PULL_POLICIES:
            raise _bad("image_pull_policy", self.image_pull_policy, f"must be one of {', '.join(_PULL_POLICIES)}")
        for secret in self.image_pull_secrets:
            _check_name("image_pull_secrets", secret, _DNS_SUBDOMAIN, 253, "secret name")
        _check_int("gpus", self.gpus, minimum=0)
        _check_labels("gpu_resource", {self.gpu_resource: "1"}, what="extended resource")
        if "/" not in self.gpu_resource:
            raise _bad("gpu_resource", self.gpu_resource, "an extended resource has a domain, e.g. nvidia.com/gpu")
        cpu = _check_quantity("cpu_request", self.cpu_request, memory=False)
        if self.cpu_limit is not None:
            if _check_quantity("cpu_limit", self.cpu_limit, memory=False) < cpu:
                raise _bad("cpu_limit", self.cpu_limit, f"must not be below cpu_request {self.cpu_request!r}")
        memory = _check_quantity("memory_request", self.memory_request, memory=True)
        if _check_quantity("memory_limit", self.memory_limit, memory=True) < memory:
            raise _bad("memory_limit", self.memory_limit,
                       f"must not be below memory_request {self.memory_request!r}")
        _check_quantity("shm_size", self.shm_size, memory=True)
        _check_labels("node_selector", self.node_selector)
        for toleration in self.tolerations:
            _check_toleration("tolerations", toleration)
        _check_int("startup_timeout_seconds", self.startup_timeout_seconds, minimum=1)
        if self.active_deadline_seconds is not None:
            _check_int("active_deadline_seconds", self.active_deadline_seconds, minimum=1)
        if self.aws_secret is not None:
            _check_name("aws_secret", self.aws_secret, _DNS_SUBDOMAIN, 253, "secret name")
        _check_env("env", self.env)
        _check_labels("labels", self.labels)
        if self.pvc_name is not None:
            _check_name("pvc_name", self.pvc_name, _DNS_SUBDOMAIN, 253, "claim name")
        if not isinstance(self.pvc_mount_path, str) or not self.pvc_mount_path.startswith("/"):
            raise _bad("pvc_mount_path", self.pvc_mount_path, "must be an absolute path")
        if self.priority_class is not None:
            _check_name("priority_class", self.priority_class, _DNS_SUBDOMAIN, 253, "priority class name")
        if self.in_cluster and self.config_file:
            raise _bad("config_file", self.config_file, "in_cluster and a kubeconfig file exclude each other")
        if not isinstance(self.deferrable, bool):
            raise _bad("deferrable", self.deferrable, "must be true or false")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> TrainerPodSettings:
        """Settings from ``PERSONCAR_K8S_*`` variables (``os.environ`` by default); unset ones keep
        their defaults, an empty value clears an optional setting."""
        env = os.environ if environ is None else environ
        kwargs: dict[str, Any] = {}
        for name, (var, parse) in _FROM_ENV.items():
            if var not in env:
                continue
            raw = env[var]
            try:
                kwargs[name] = parse(raw.strip())
            except (ValueError, TypeError) as exc:
                # The environment may hold values that must not be echoed: show only its size.
                shown = f"<{len(raw)} characters>" if name == "env" else repr(raw)
                raise KubernetesSettingsError(f"{var}={shown}: {exc}") from None
        return cls(**kwargs)


# --- parsing of PERSONCAR_K8S_* values ------------------------------------------------------------

def _parse_int(raw: str) -> int:
    try:
        return int(raw)
    except ValueError:
        raise ValueError("expected an integer") from None


def _parse_optional_int(raw: str) -> int | None:
    return _parse_int(raw) if raw else None


def _parse_bool(raw: str) -> bool:
    lowered = raw.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


def _parse_optional_bool(raw: str) -> bool | None:
    return _parse_bool(raw) if raw else None


def _parse_optional_str(raw: str) -> str | None:
    return raw or None


def _parse_list(raw: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in raw.split(",") if part.strip())


def _parse_mapping(raw: str) -> dict[str, str]:
    """A JSON object, or ``k=v,k=v``; empty for none."""
    if not raw:
        return {}
    if raw.startswith(("{", "[")):
        try:
            value = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ValueError(f"invalid JSON object ({exc.msg} at column {exc.colno})") from None
        if not isinstance(value, dict):
            raise ValueError("expected a JSON object")
        return {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in value.items()}
    result: dict[str, str] = {}
    for item in raw.split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"expected key=value pairs separated by commas, got {item.strip()!r}")
        result[key.strip()] = value.strip()
    return result


def _parse_tolerations(raw: str) -> tuple[dict[str, Any], ...]:
    if not raw:
        return ()
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"invalid JSON list of tolerations ({exc.msg} at column {exc.colno})") from None
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise ValueError("expected a JSON list of toleration objects")
    return tuple(value)


_FROM_ENV: dict[str, tuple[str, Any]] = {
    "image": ("PERSONCAR_K8S_IMAGE", str),
    "namespace": ("PERSONCAR_K8S_NAMESPACE", str),
    "service_account": ("PERSONCAR_K8S_SERVICE_ACCOUNT", str),
    "image_pull_policy": ("PERSONCAR_K8S_IMAGE_PULL_POLICY", str),
    "image_pull_secrets": ("PERSONCAR_K8S_IMAGE_PULL_SECRETS", _parse_list),
    "gpus": ("PERSONCAR_K8S_GPUS", _parse_int),
    "gpu_resource": ("PERSONCAR_K8S_GPU_RESOURCE", str),
    "cpu_request": ("PERSONCAR_K8S_CPU_REQUEST", str),
    "cpu_limit": ("PERSONCAR_K8S_CPU_LIMIT", _parse_optional_str),
    "memory_request": ("PERSONCAR_K8S_MEMORY_REQUEST", str),
    "memory_limit": ("PERSONCAR_K8S_MEMORY_LIMIT", str),
    "shm_size": ("PERSONCAR_K8S_SHM_SIZE", str),
    "node_selector": ("PERSONCAR_K8S_NODE_SELECTOR", _parse_mapping),
    "tolerations": ("PERSONCAR_K8S_TOLERATIONS", _parse_tolerations),
    "startup_timeout_seconds": ("PERSONCAR_K8S_STARTUP_TIMEOUT_SECONDS", _parse_int),
    "active_deadline_seconds": ("PERSONCAR_K8S_ACTIVE_DEADLINE_SECONDS", _parse_optional_int),
    "aws_secret": ("PERSONCAR_K8S_AWS_SECRET", _parse_optional_str),
    "env": ("PERSONCAR_K8S_ENV", _parse_mapping),
    "labels": ("PERSONCAR_K8S_LABELS", _parse_mapping),
    "pvc_name": ("PERSONCAR_K8S_PVC", _parse_optional_str),
    "pvc_mount_path": ("PERSONCAR_K8S_PVC_MOUNT_PATH", str),
    "priority_class": ("PERSONCAR_K8S_PRIORITY_CLASS", _parse_optional_str),
    "in_cluster": ("PERSONCAR_K8S_IN_CLUSTER", _parse_optional_bool),
    "config_file": ("PERSONCAR_K8S_CONFIG_FILE", _parse_optional_str),
    "cluster_context": ("PERSONCAR_K8S_CONTEXT", _parse_optional_str),
    "kubernetes_conn_id": ("PERSONCAR_K8S_CONN_ID", _parse_optional_str),
    "deferrable": ("PERSONCAR_K8S_DEFERRABLE", _parse_bool),
}
_ENV_VARS = {name: var for name, (var, _) in _FROM_ENV.items()}


# --- the pod ---------------------------------------------------------------------------------------

def _requested_gpus_in(arguments: Sequence[str]) -> int | None:
    """The literal value of a ``--gpus N`` / ``--gpus=N`` argument, if any (templates are skipped)."""
    for i, arg in enumerate(arguments):
        value: str | None = None
        if arg == "--gpus" and i + 1 < len(arguments):
            value = arguments[i + 1]
        elif arg.startswith("--gpus="):
            value = arg.split("=", 1)[1]
        if value is not None and value.strip().isdigit():
            return int(value)
    return None


def _pod_name(task_id: str) -> str:
    name = re.sub(r"[^a-z0-9-]+", "-", task_id.lower()).strip("-")
    return name[:50] or "trainer"


def trainer_pod_kwargs(
    settings: TrainerPodSettings,
    *,
    task_id: str,
    arguments: Sequence[str],
    gpus: int | None = None,
) -> dict[str, Any]:
    """Keyword arguments for ``KubernetesPodOperator`` that run ``personcar <arguments>`` in the
    trainer image (everything but ``task_id``).

    ``gpus`` overrides ``settings.gpus`` for this task (0 for a CPU-only stage such as
    ``build_tfrecords``: no GPU limit, and no GPU node selector or toleration). ``arguments`` are
    passed through unchanged (they may hold Airflow templates); a literal ``--gpus N`` in them must
    match the pod's GPU count.
    """
    from kubernetes.client import models as k8s

    n_gpus = settings.gpus if gpus is None else gpus
    _check_int("gpus", n_gpus, minimum=0)
    if not isinstance(task_id, str) or not task_id:
        raise KubernetesSettingsError(f"trainer pod: task_id must be a non-empty string, got {task_id!r}")
    if isinstance(arguments, (str, bytes)):
        raise KubernetesSettingsError(
            f"trainer pod {task_id}: arguments must be a list of strings, got the string {arguments!r}"
        )
    args = [str(a) for a in arguments]
    requested = _requested_gpus_in(args)
    if requested is not None and requested != n_gpus:
        raise KubernetesSettingsError(
            f"trainer pod {task_id}: arguments ask for --gpus {requested} but the pod gets {n_gpus} "
            f"GPU(s) ({_env_name('gpus')} or the gpus argument)"
        )

    requests = {"cpu": settings.cpu_request, "memory": settings.memory_request}
    limits = {"memory": settings.memory_limit}
    if settings.cpu_limit is not None:
        limits["cpu"] = settings.cpu_limit
    if n_gpus > 0:
        # Extended resources are set as limits only; Kubernetes copies them to the requests.
        limits[settings.gpu_resource] = str(n_gpus)
    resources = k8s.V1ResourceRequirements(requests=requests, limits=limits)

    # Non-secret settings by value; credentials only by reference to a secret (envFrom).
    env = {"TF_USE_LEGACY_KERAS": "1", "PYTHONUNBUFFERED": "1", **settings.env}
    env_vars = [k8s.V1EnvVar(name=name, value=value) for name, value in env.items()]
    env_from = []
    if settings.aws_secret:
        env_from.append(k8s.V1EnvFromSource(secret_ref=k8s.V1SecretEnvSource(name=settings.aws_secret)))

    volumes: list[Any] = []
    volume_mounts: list[Any] = []
    if settings.pvc_name:
        volumes.append(k8s.V1Volume(
            name="data",
            persistent_volume_claim=k8s.V1PersistentVolumeClaimVolumeSource(claim_name=settings.pvc_name),
        ))
        volume_mounts.append(k8s.V1VolumeMount(name="data", mount_path=settings.pvc_mount_path))
    if n_gpus > 1:
        # NCCL (MirroredStrategy's all-reduce) uses shared memory; a container's default is 64 MiB.
        volumes.append(k8s.V1Volume(
            name="dshm", empty_dir=k8s.V1EmptyDirVolumeSource(medium="Memory", size_limit=settings.shm_size),
        ))
        volume_mounts.append(k8s.V1VolumeMount(name="dshm", mount_path="/dev/shm"))

    tolerations = [
        k8s.V1Toleration(
            key=t.get("key"), operator=t.get("operator"), value=t.get("value"),
            effect=t.get("effect"), toleration_seconds=t.get("tolerationSeconds"),
        )
        for t in settings.tolerations
    ] if n_gpus > 0 else []
    node_selector = dict(settings.node_selector) if n_gpus > 0 else {}

    labels = {
        "app.kubernetes.io/name": "personcar",
        "app.kubernetes.io/component": "trainer" if n_gpus > 0 else "worker",
        "personcar/stage": _pod_name(task_id),
        **settings.labels,
    }
    annotations = {
        # A training pod holds hours of progress since the last checkpoint: do not let the cluster
        # autoscaler evict it to consolidate nodes.
        "cluster-autoscaler.kubernetes.io/safe-to-evict": "false",
    }

    kwargs: dict[str, Any] = {
        "name": _pod_name(task_id),
        "random_name_suffix": True,
        "namespace": settings.namespace,
        "image": settings.image,
        "image_pull_policy": settings.image_pull_policy,
        "image_pull_secrets": [k8s.V1LocalObjectReference(name=s) for s in settings.image_pull_secrets],
        "cmds": [CLI],
        "arguments": args,
        "service_account_name": settings.service_account,
        "container_resources": resources,
        "node_selector": node_selector,
        "tolerations": tolerations,
        "env_vars": env_vars,
        "env_from": env_from,
        "volumes": volumes,
        "volume_mounts": volume_mounts,
        "labels": labels,
        "annotations": annotations,
        "security_context": k8s.V1PodSecurityContext(
            run_as_non_root=True, run_as_user=TRAINER_UID, run_as_group=TRAINER_UID,
            fs_group=TRAINER_UID, seccomp_profile=k8s.V1SeccompProfile(type="RuntimeDefault"),
        ),
        "container_security_context": k8s.V1SecurityContext(
            allow_privilege_escalation=False, capabilities=k8s.V1Capabilities(drop=["ALL"]),
        ),
        "priority_class_name": settings.priority_class,
        "active_deadline_seconds": settings.active_deadline_seconds,
        "startup_timeout_seconds": settings.startup_timeout_seconds,
        # The CLI prints its one-line error on stderr; with this policy Kubernetes keeps the end of
        # the log as the termination message, which the operator puts in the task's exception.
        "termination_message_policy": "FallbackToLogsOnError",
        "get_logs": True,
        "log_events_on_failure": True,
        "on_finish_action": "delete_pod",
        # Reattach to the pod of an earlier try instead of starting a duplicate (on Airflow 3.3
        # `durable` supersedes the deprecated `reattach_on_restart`, with the same meaning).
        "durable": True,
        "do_xcom_push": False,
        "deferrable": settings.deferrable,
        "in_cluster": settings.in_cluster,
        "config_file": settings.config_file,
        "cluster_context": settings.cluster_context,
        "kubernetes_conn_id": settings.kubernetes_conn_id,
    }
    log.debug("trainer pod for %s: image %s, %d GPU(s), namespace %s, args %s",
              task_id, settings.image, n_gpus, settings.namespace, args)
    return kwargs


def make_trainer_task(
    task_id: str,
    arguments: Sequence[str],
    settings: TrainerPodSettings | None = None,
    *,
    gpus: int | None = None,
    **operator_kwargs: Any,
):
    """A ``KubernetesPodOperator`` running ``personcar <arguments>`` in the trainer image.

    ``settings`` defaults to :meth:`TrainerPodSettings.from_env`; ``operator_kwargs`` (``retries``,
    ``pool``, ``doc_md``, ...) are passed to the operator and override the built ones.
    """
    settings = TrainerPodSettings.from_env() if settings is None else settings
    kwargs = trainer_pod_kwargs(settings, task_id=task_id, arguments=arguments, gpus=gpus)
    kwargs.update(operator_kwargs)
    return trainer_operator_class()(task_id=task_id, **kwargs)


#: What ``personcar train`` prints when the accelerator runs out of memory (tasks.train.OutOfMemoryError).
OOM_MARKER = "out of accelerator memory"


def trainer_operator_class() -> type:
    """``KubernetesPodOperator`` that fails without retrying when the pod ran out of accelerator memory.

    The pod's one-line error is its termination message (``FallbackToLogsOnError``), which the
    operator puts in its exception: the same batch would run out of memory again on every retry.
    """
    from airflow.sdk.exceptions import AirflowException, AirflowFailException
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator

    def no_retry_on_oom(exc: AirflowException) -> None:
        if OOM_MARKER in str(exc):
            line = next((ln for ln in str(exc).splitlines() if OOM_MARKER in ln), OOM_MARKER)
            raise AirflowFailException(line.strip().strip("'\"")) from exc

    class TrainerPodOperator(KubernetesPodOperator):
        def execute(self, context: Any) -> Any:
            try:
                return super().execute(context)
            except AirflowException as exc:
                no_retry_on_oom(exc)
                raise

        def trigger_reentry(self, context: Any, event: dict[str, Any]) -> Any:
            try:
                return super().trigger_reentry(context, event)
            except AirflowException as exc:
                no_retry_on_oom(exc)
                raise

    return TrainerPodOperator
