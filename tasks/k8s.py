"""Trainer pods for the ``kubernetes`` execution backend.

The TensorFlow stages (``build_tfrecords``, ``train``, ``evaluate``) run as ``KubernetesPodOperator``
tasks of the trainer image, whose entrypoint is the ``personcar`` CLI. The pod's shape - namespace,
service account, node pool, resources, security context, credentials by secret reference, shared
memory - is a pod template owned by the cluster's operators (``deploy/k8s/pod-templates/``:
``trainer-gpu.yaml`` for GPU stages, ``trainer-cpu.yaml`` for the CPU one); the DAG sets only the
image, the command and its arguments, and the GPU count (added to the template's limits).

Deployment settings (``PERSONCAR_K8S_*``, pydantic-settings):

=========================================  ========================================================
``PERSONCAR_K8S_IMAGE``                    trainer image, pinned by tag or digest
``PERSONCAR_K8S_GPUS``                     GPUs of a training pod (``1``; more: MirroredStrategy)
``PERSONCAR_K8S_POD_TEMPLATES``            folder of the two pod templates (``deploy/k8s/pod-templates``)
``PERSONCAR_K8S_GPU_RESOURCE``             extended resource of a GPU (``nvidia.com/gpu``)
``PERSONCAR_K8S_STARTUP_TIMEOUT_SECONDS``  how long a pod may stay pending, e.g. while a GPU node is
                                           added (``900``)
``PERSONCAR_K8S_DEFERRABLE``               wait for pods in the triggerer (``true``)
``PERSONCAR_K8S_IN_CLUSTER``, ``_CONFIG_FILE``, ``_CONTEXT``, ``_CONN_ID``
                                           how to reach the cluster (Airflow connection
                                           ``kubernetes_default`` unless empty)
=========================================  ========================================================
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from tasks.errors import NO_RETRY_EXIT_CODES, DataValidationError, PersoncarError

DEFAULT_IMAGE = "ghcr.io/personcar/trainer:0.1.0"
DEFAULT_TEMPLATES = Path(__file__).resolve().parents[1] / "deploy" / "k8s" / "pod-templates"
CLI = "personcar"
#: What ``personcar train`` prints when the accelerator runs out of memory (tasks.train.OutOfMemoryError).
OOM_MARKER = "out of accelerator memory"


class KubernetesSettingsError(PersoncarError):
    """A ``PERSONCAR_K8S_*`` setting is invalid; the message names the variable and the rule."""


class TrainerPodSettings(BaseSettings):
    """The deployment's side of a trainer pod; the pod's shape is in the pod templates."""

    model_config = SettingsConfigDict(env_prefix="PERSONCAR_K8S_", env_ignore_empty=False, extra="ignore",
                                      frozen=True)

    image: str = DEFAULT_IMAGE
    gpus: int = Field(default=1, ge=0)
    pod_templates: Path = DEFAULT_TEMPLATES
    gpu_resource: str = Field(default="nvidia.com/gpu", pattern=r"^[a-z0-9.-]+/[A-Za-z0-9._-]+$")
    startup_timeout_seconds: int = Field(default=900, ge=1)
    deferrable: bool = True
    in_cluster: bool | None = None
    config_file: str | None = None
    context: str | None = None
    conn_id: str | None = "kubernetes_default"

    @field_validator("image")
    @classmethod
    def _pinned(cls, image: str) -> str:
        last = image.rsplit("/", 1)[-1]
        if not image or re.search(r"\s", image) or ("@" not in last and ":" not in last):
            raise ValueError("must be an image reference pinned by tag or digest (repository:tag)")
        if last.endswith(":latest"):
            raise ValueError("':latest' is not a pin; use a version tag or a digest")
        return image

    @field_validator("config_file", "context", "conn_id", "in_cluster", mode="before")
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        return None if value == "" else value

    @classmethod
    def load(cls, **overrides: Any) -> TrainerPodSettings:
        """The settings from the environment (and ``overrides``), or one line naming the bad variable."""
        try:
            return cls(**overrides)
        except ValidationError as exc:
            err = exc.errors()[0]
            var = f"PERSONCAR_K8S_{str(err['loc'][0]).upper()}"
            raise KubernetesSettingsError(f"{var}={err.get('input')!r}: {err['msg'].removeprefix('Value error, ')}") \
                from exc

    def template(self, gpus: int) -> Path:
        path = self.pod_templates / ("trainer-gpu.yaml" if gpus > 0 else "trainer-cpu.yaml")
        if not path.is_file():
            raise KubernetesSettingsError(f"PERSONCAR_K8S_POD_TEMPLATES={str(self.pod_templates)!r}: no {path.name} "
                                          "in it (deploy/k8s/pod-templates has both templates)")
        return path


@cache
def _template_resources(path: Path) -> dict[str, dict[str, str]]:
    import yaml

    doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    container = next(c for c in doc["spec"]["containers"] if c["name"] == "base")
    return {k: dict(v) for k, v in (container.get("resources") or {}).items()}


def trainer_pod_kwargs(settings: TrainerPodSettings, *, task_id: str, arguments: Sequence[str],
                       gpus: int | None = None) -> dict[str, Any]:
    """``KubernetesPodOperator`` arguments that run ``personcar <arguments>`` with ``gpus`` GPUs
    (default: the settings') in the pod template of its kind; everything but ``task_id``."""
    from kubernetes.client import models as k8s

    n_gpus = settings.gpus if gpus is None else gpus
    if isinstance(arguments, (str, bytes)):
        raise KubernetesSettingsError(f"trainer pod {task_id}: arguments must be a list of strings")
    args = [str(a) for a in arguments]
    if "--gpus" in args and args[args.index("--gpus") + 1] != str(n_gpus):
        raise KubernetesSettingsError(f"trainer pod {task_id}: arguments ask for --gpus "
                                      f"{args[args.index('--gpus') + 1]} but the pod gets {n_gpus} GPU(s)")
    template = settings.template(n_gpus)
    resources = _template_resources(template)
    if n_gpus > 0:  # extended resources are limits only; Kubernetes copies them to the requests
        resources["limits"] = {**resources.get("limits", {}), settings.gpu_resource: str(n_gpus)}
    return {
        "pod_template_file": str(template),
        "name": task_id.replace("_", "-"),
        "random_name_suffix": True,
        "image": settings.image,
        "cmds": [CLI],
        "arguments": args,
        "container_resources": k8s.V1ResourceRequirements(**resources),
        "labels": {"personcar/stage": task_id.replace("_", "-")},
        "termination_message_policy": "FallbackToLogsOnError",  # KubernetesPodOperator would set "File"
        "get_logs": True,
        "log_events_on_failure": True,
        "on_finish_action": "delete_pod",
        "durable": True,  # a retried task reattaches to the pod of the earlier try
        "do_xcom_push": False,
        "deferrable": settings.deferrable,
        "startup_timeout_seconds": settings.startup_timeout_seconds,
        "in_cluster": settings.in_cluster,
        "config_file": settings.config_file,
        "cluster_context": settings.context,
        "kubernetes_conn_id": settings.conn_id,
    }


def make_trainer_task(task_id: str, arguments: Sequence[str], settings: TrainerPodSettings | None = None, *,
                      gpus: int | None = None, **operator_kwargs: Any) -> Any:
    """A ``KubernetesPodOperator`` running ``personcar <arguments>`` in the trainer image;
    ``operator_kwargs`` (``retries``, ``pool``, ...) override the built ones."""
    settings = TrainerPodSettings.load() if settings is None else settings
    kwargs = trainer_pod_kwargs(settings, task_id=task_id, arguments=arguments, gpus=gpus) | operator_kwargs
    return trainer_operator_class()(task_id=task_id, **kwargs)


def trainer_operator_class() -> type:
    """``KubernetesPodOperator`` that fails without retrying when a retry of the pod cannot mend it.

    That is when the pod's ``personcar`` command failed for a reason a retry does not change
    (:func:`retry_may_pass`). A storage or network failure (exit 75), a crash, a lost node or an
    eviction is retried.
    The task's error is the command's one line, from the pod's termination message
    (``FallbackToLogsOnError``: the end of its log), which the operator puts in its exception.
    """
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
    from airflow.sdk.exceptions import AirflowException, AirflowFailException

    class TrainerPodOperator(KubernetesPodOperator):
        def cleanup(self, pod: Any, remote_pod: Any, *args: Any, **kwargs: Any) -> None:
            try:
                super().cleanup(pod, remote_pod, *args, **kwargs)
            except AirflowException as exc:
                code = base_exit_code(remote_pod, self.base_container_name)
                if not retry_may_pass(code, str(exc)):
                    raise AirflowFailException(error_line(str(exc), code)) from exc
                raise

    return TrainerPodOperator


def retry_may_pass(code: int | None, text: str) -> bool:
    """Whether a new pod may pass where this one failed with exit code ``code`` and failure ``text``.

    Not when ``personcar`` exited with one of :data:`tasks.errors.NO_RETRY_EXIT_CODES` (bad input,
    configuration or arguments; out of accelerator memory), nor when it exited 1 with its one error
    line (the dataset failed validation: a traceback is a crash, which is retried).
    """
    if code in NO_RETRY_EXIT_CODES or OOM_MARKER in text:
        return False
    return not (code == DataValidationError.exit_code and _cli_error(text) is not None)


def _cli_error(text: str) -> str | None:
    lines = [ln.strip().strip("'\"") for ln in text.splitlines() if ln.strip()]
    return next((ln for ln in reversed(lines) if (f"{CLI} " in ln and ": error: " in ln) or OOM_MARKER in ln), None)


def base_exit_code(pod: Any, container: str) -> int | None:
    """The exit code of the pod's container ``container``, when it has terminated."""
    statuses = (getattr(getattr(pod, "status", None), "container_statuses", None) or [])
    status = next((c for c in statuses if c.name == container), None)
    terminated = status.state.terminated if status is not None and status.state is not None else None
    return terminated.exit_code if terminated is not None else None


def error_line(text: str, code: int | None) -> str:
    """The ``personcar`` command's one error line in the operator's failure text, else its first line."""
    first = next((ln.strip().strip("'\"") for ln in text.splitlines() if ln.strip()), "the trainer pod failed")
    return _cli_error(text) or f"{first} (exit {code})"
