"""The deployment in ``deploy/``: Kubernetes manifests validated strictly, RBAC checked against the
calls KubernetesPodOperator really makes, Helm values checked against the images and settings.

- Every YAML document under ``deploy/`` except the Helm values is a Kubernetes object, validated
  with ``kubernetes-validate`` in strict mode (unknown fields rejected) for Kubernetes 1.33 and 1.30.
- The Roles the Airflow workers and the triggerer get in the trainer namespace grant exactly the
  (resource, verb) pairs that each of them uses for a trainer task, recorded from the operator's
  and its trigger's requests to an in-memory Kubernetes API served over HTTP (kmock), for a pod
  that succeeds and one that fails, deferrable or not.
- The Helm values (not a manifest) name the images of ``docker/``, set the settings that
  ``tasks/config.py`` and ``tasks/k8s.py`` read, take the AWS connection from a secret, and make
  the DAG parse with the Kubernetes backend into trainer pods that fit the namespace's Pod
  Security Standard and validate strictly.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import yaml

from tasks.config import Settings
from tasks.k8s import DEFAULT_TEMPLATES, TrainerPodSettings

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
VALUES = DEPLOY / "helm" / "values.yaml"
K8S_VERSIONS = ["1.33", "1.30"]
AIRFLOW_NAMESPACE = "airflow"  # the Helm release's namespace (docs/production.md)


def _documents() -> list[tuple[str, int, dict[str, Any]]]:
    out = []
    for path in sorted(DEPLOY.rglob("*.y*ml")):
        if path == VALUES:
            continue
        for i, doc in enumerate(yaml.safe_load_all(path.read_text(encoding="utf-8"))):
            if doc is not None:
                out.append((path.relative_to(DEPLOY).as_posix(), i, doc))
    return out


DOCUMENTS = _documents()


def _objects(kind: str) -> list[dict[str, Any]]:
    return [doc for _, _, doc in DOCUMENTS if doc.get("kind") == kind]


def _one(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in _objects(kind) if name is None or d["metadata"]["name"] == name]
    assert len(found) == 1, (kind, name, [d["metadata"]["name"] for d in _objects(kind)])
    return found[0]


@pytest.fixture(scope="module")
def values() -> dict[str, Any]:
    return yaml.safe_load(VALUES.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def values_env(values: dict[str, Any]) -> dict[str, str]:
    env = {}
    for item in values["env"]:
        assert set(item) == {"name", "value"}, item
        assert isinstance(item["value"], str), item  # Kubernetes env values are strings
        env[item["name"]] = item["value"]
    return env


# --------------------------------------------------------------------------------------------------
# Manifests
# --------------------------------------------------------------------------------------------------


def _template(name: str = "trainer-gpu.yaml") -> dict[str, Any]:
    return yaml.safe_load((DEFAULT_TEMPLATES / name).read_text(encoding="utf-8"))


TEMPLATE = _template()
TRAINER_SECRET = TEMPLATE["spec"]["containers"][0]["envFrom"][0]["secretRef"]["name"]


def test_deploy_has_the_objects_the_trainer_needs() -> None:
    kinds = sorted((doc["kind"], doc["metadata"]["name"]) for _, _, doc in DOCUMENTS)
    assert kinds == sorted([
        ("Namespace", TEMPLATE["metadata"]["namespace"]),
        ("ServiceAccount", TEMPLATE["spec"]["serviceAccountName"]),
        ("Role", "personcar-pod-launcher"),
        ("RoleBinding", "personcar-pod-launcher"),
        ("Role", "personcar-pod-watcher"),
        ("RoleBinding", "personcar-pod-watcher"),
        ("PersistentVolumeClaim", "personcar-data"),
        ("Secret", TRAINER_SECRET),
        ("Secret", "personcar-airflow-connections"),
        ("Pod", "personcar-trainer"),  # the pod templates
        ("Pod", "personcar-worker"),
    ])
    for name in ("trainer-gpu.yaml", "trainer-cpu.yaml"):  # both templates: the same identity and secret
        t = _template(name)
        assert t["metadata"]["namespace"] == TEMPLATE["metadata"]["namespace"]
        assert t["spec"]["serviceAccountName"] == TEMPLATE["spec"]["serviceAccountName"]
        assert t["spec"]["containers"][0]["envFrom"] == TEMPLATE["spec"]["containers"][0]["envFrom"]


@pytest.mark.parametrize(("where", "index", "doc"), DOCUMENTS,
                         ids=[f"{where}#{i}" for where, i, _ in DOCUMENTS])
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_manifest_is_valid_kubernetes(where: str, index: int, doc: dict[str, Any], version: str) -> None:
    import kubernetes_validate

    kubernetes_validate.validate(doc, version, strict=True)


def test_strict_validation_rejects_a_misspelt_field() -> None:
    import kubernetes_validate

    role = json.loads(json.dumps(_one("Role", "personcar-pod-launcher")))
    role["rules"][0]["verb"] = role["rules"][0].pop("verbs")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(role, K8S_VERSIONS[0], strict=True)


def test_namespaced_objects_live_where_the_pods_and_the_release_are() -> None:
    trainer_ns = _one("Namespace")["metadata"]["name"]
    for _, _, doc in DOCUMENTS:
        if doc["kind"] == "Namespace":
            continue
        expected = AIRFLOW_NAMESPACE if doc["metadata"]["name"] == "personcar-airflow-connections" else trainer_ns
        assert doc["metadata"]["namespace"] == expected, doc["metadata"]


def test_trainer_service_account_mounts_no_api_token() -> None:
    sa = _one("ServiceAccount")
    assert sa["automountServiceAccountToken"] is False
    # No Role is bound to it: the trainer pods never call the Kubernetes API.
    assert all(s["name"] != sa["metadata"]["name"] for rb in _objects("RoleBinding") for s in rb["subjects"])


def test_secret_templates_carry_no_values() -> None:
    aws = _one("Secret", TRAINER_SECRET)
    assert set(aws["stringData"]) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"}
    for secret in _objects("Secret"):
        assert "data" not in secret
        assert all(v == "" for v in secret["stringData"].values()), secret["metadata"]["name"]


def test_namespace_enforces_the_restricted_pod_security_standard() -> None:
    labels = _one("Namespace")["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"


# --------------------------------------------------------------------------------------------------
# RBAC: exactly what KubernetesPodOperator uses
# --------------------------------------------------------------------------------------------------


def _verb(method: str, name: str | None, params: dict[str, str]) -> str:
    if method == "GET":
        if str(params.get("watch", "")).lower() in ("1", "true"):
            return "watch"
        return "get" if name else "list"
    return {"POST": "create", "PUT": "update", "PATCH": "patch",
            "DELETE": "delete" if name else "deletecollection"}[method]


def _permission(request: Any) -> tuple[str, str, str]:
    resource = request.resource.plural + (f"/{request.subresource}" if request.subresource else "")
    return request.resource.group, resource, _verb(request.method.value, request.name, dict(request.params or {}))


def _run_by_component(op: Any, context: dict[str, Any], kube: Any, out: dict[str, list[Any]]) -> None:
    """Run the task as the worker does and, once it defers, its trigger as the triggerer does; ``out``
    gets the API requests each of them made (the emulated node's own are not theirs), also when the
    task fails."""
    from tests.integration.test_k8s_kmock import _run_task
    from tests.kubelet import AGENT

    marks = [0]  # request counts where the turn passes between the worker and the triggerer
    try:
        _run_task(op, context, around_trigger=lambda: marks.append(len(list(kube.api))))
    finally:
        requests = list(kube.api)
        for i, (lo, hi) in enumerate(itertools.pairwise([*marks, len(requests)])):  # worker, triggerer, ...
            out["worker" if i % 2 == 0 else "triggerer"] += [r for r in requests[lo:hi]
                                                            if r.headers.get("User-Agent") != AGENT]


@pytest.fixture(scope="module")
def used_permissions(tmp_path_factory: pytest.TempPathFactory) -> dict[str, set[tuple[str, str, str]]]:
    """(API group, resource[/subresource], verb) of every request a trainer task makes, for a pod
    that succeeds and one that fails, waited for by the worker (``PERSONCAR_K8S_DEFERRABLE=false``)
    or by the triggerer (deferrable, the default): per component, ``worker`` and ``triggerer``."""
    from airflow.exceptions import AirflowException

    from tests.integration.test_k8s_kmock import NAMESPACE, build_task
    from tests.kubelet import Cluster

    used: dict[str, set[tuple[str, str, str]]] = {"worker": set(), "triggerer": set()}
    pods = [(["--version"], False),  # the CLI, exit 0
            (["train", "--data", "s3://personcar/x", "--model-dir", "s3://personcar/y", "--steps", "0"], True)]
    for (arguments, fails), deferrable in itertools.product(pods, (False, True)):
        with Cluster(tmp_path_factory.mktemp("node"), namespace=NAMESPACE) as kube:
            kube.create_secret("personcar-aws", {})  # the pod templates' envFrom
            kubeconfig = kube.kubeconfig(tmp_path_factory.mktemp("kube") / "config", context="kmock")
            op, context = build_task(kubeconfig, "train", arguments, deferrable=deferrable)
            by_component: dict[str, list[Any]] = {"worker": [], "triggerer": []}
            # in a thread of its own, as a worker runs it (no event loop running there)
            with ThreadPoolExecutor(1) as pool:
                outcome = pool.submit(_run_by_component, op, context, kube, by_component)
                if fails:
                    with pytest.raises(AirflowException):
                        outcome.result()
                else:
                    outcome.result()
            kube.check()
        for component, requests in by_component.items():
            assert all(r.namespace == NAMESPACE for r in requests), requests
            used[component] |= {_permission(r) for r in requests}
    return used


def _assert_role_grants_exactly(name: str, used: set[tuple[str, str, str]]) -> None:
    """The Role ``name`` lives in the trainer namespace and grants ``used``, no more, no wildcards."""
    role = _one("Role", name)
    assert role["metadata"]["namespace"] == TEMPLATE["metadata"]["namespace"]
    assert all(set(rule) == {"apiGroups", "resources", "verbs"} for rule in role["rules"])  # no wildcards by name
    granted = {(group, resource, verb) for rule in role["rules"] for group in rule["apiGroups"]
               for resource in rule["resources"] for verb in rule["verbs"]}
    assert "*" not in {x for g in granted for x in g}
    assert granted == used, {"unused grants": granted - used, "missing grants": used - granted}


def test_worker_role_grants_exactly_what_the_pod_operator_uses(used_permissions: dict) -> None:
    used = used_permissions["worker"]
    # The recorded calls: a pod that fails is labelled as checked (patch) before it is deleted.
    assert ("", "pods", "patch") in used and ("", "pods/log", "get") in used
    _assert_role_grants_exactly("personcar-pod-launcher", used)


def test_triggerer_role_grants_exactly_what_the_pod_trigger_uses(used_permissions: dict) -> None:
    used = used_permissions["triggerer"]
    assert ("", "pods", "get") in used and ("", "pods", "create") not in used  # it only follows the pod
    _assert_role_grants_exactly("personcar-pod-watcher", used)


def _assert_bound_to_the_release(name: str, component: str, values: dict[str, Any]) -> None:
    """The RoleBinding ``name`` binds the Role ``name`` to the service account that the Helm values
    create for ``component`` in the release's namespace."""
    binding = _one("RoleBinding", name)
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name}
    account = values[component]["serviceAccount"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account["name"],
                                    "namespace": AIRFLOW_NAMESPACE}]
    assert account["create"] is True


def test_triggerer_role_is_bound_to_the_triggerer_service_account_of_the_release(values: dict[str, Any]) -> None:
    _assert_bound_to_the_release("personcar-pod-watcher", "triggerer", values)
    assert values["triggerer"]["serviceAccount"]["name"] != values["workers"]["serviceAccount"]["name"]


def test_role_is_bound_to_the_worker_service_account_of_the_release(values: dict[str, Any]) -> None:
    _assert_bound_to_the_release("personcar-pod-launcher", "workers", values)
    assert f"--namespace {AIRFLOW_NAMESPACE}" in VALUES.read_text(encoding="utf-8")
    assert f"--namespace {AIRFLOW_NAMESPACE}" in (REPO / "docs" / "production.md").read_text(encoding="utf-8")


# --------------------------------------------------------------------------------------------------
# Helm values
# --------------------------------------------------------------------------------------------------


def _built_tag(dockerfile: str) -> str:
    """The image tag a Dockerfile's header says it is built as (``docker build ... -t TAG .``)."""
    text = (REPO / "docker" / dockerfile).read_text(encoding="utf-8")
    match = re.search(rf"docker build -f docker/{re.escape(dockerfile)} -t (\S+) \.", text)
    assert match, dockerfile
    return match.group(1)


def test_values_use_the_images_built_from_docker(values: dict[str, Any], values_env: dict[str, str]) -> None:
    from importlib.metadata import version

    image = values["images"]["airflow"]
    assert f"{image['repository']}:{image['tag']}" == _built_tag("airflow.Dockerfile")
    assert (values["defaultAirflowRepository"], values["defaultAirflowTag"]) == (image["repository"], image["tag"])
    base = re.search(r"^FROM apache/airflow:(\S+)-python3\.11$",
                     (REPO / "docker" / "airflow.Dockerfile").read_text(encoding="utf-8"), flags=re.M)
    assert base and values["airflowVersion"] == base.group(1) == version("apache-airflow")
    assert values["images"]["useDefaultImageForMigration"] is False
    assert values_env["PERSONCAR_K8S_IMAGE"] == _built_tag("trainer.Dockerfile")


def test_values_run_the_kubernetes_backend_on_an_s3_artifact_root(values: dict[str, Any],
                                                                  values_env: dict[str, str]) -> None:
    assert values["executor"] in ("KubernetesExecutor", "CeleryExecutor")
    known = set(Settings.env_names().values()) | {f"PERSONCAR_K8S_{f.upper()}" for f in TrainerPodSettings.model_fields}
    assert {k for k in values_env if k.startswith("PERSONCAR_")} <= known
    settings = Settings.from_environ(values_env)
    assert settings.backend == "kubernetes"
    assert settings.artifact_root.startswith("s3://") and settings.aws_conn_id == "aws_default"


def test_values_trainer_pods_match_the_manifests(values_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in values_env.items():
        monkeypatch.setenv(k, v)
    pod = TrainerPodSettings.load()
    assert pod.in_cluster is True and pod.conn_id is None and pod.deferrable is True
    assert pod.gpus >= 1 and pod.startup_timeout_seconds >= 900
    assert str(pod.pod_templates) == "/opt/airflow/pod-templates"  # where the Airflow image puts them
    dockerfile = (REPO / "docker" / "airflow.Dockerfile").read_text(encoding="utf-8")
    assert "COPY --chown=airflow:0 deploy/k8s/pod-templates/ /opt/airflow/pod-templates/" in dockerfile
    assert TEMPLATE["spec"]["nodeSelector"] and TEMPLATE["spec"]["tolerations"]  # the GPU node pool
    assert _one("PersistentVolumeClaim")["metadata"]["namespace"] == TEMPLATE["metadata"]["namespace"]


def test_values_take_the_aws_connection_from_a_secret_and_hold_no_credentials(values: dict[str, Any]) -> None:
    connection = _one("Secret", "personcar-airflow-connections")
    assert values["secret"] == [{"envName": "AIRFLOW_CONN_AWS_DEFAULT", "secretName": connection["metadata"]["name"],
                                 "secretKey": "AIRFLOW_CONN_AWS_DEFAULT"}]
    assert set(connection["stringData"]) == {"AIRFLOW_CONN_AWS_DEFAULT"}
    text = VALUES.read_text(encoding="utf-8")
    assert not re.search(r"AKIA[0-9A-Z]{16}", text)
    for item in values["env"]:
        assert not re.search(r"SECRET_ACCESS|PASSWORD|TOKEN|AIRFLOW_CONN_", item["name"]), item["name"]
    for key in ("metadataSecretName",):
        assert values["data"][key]
    assert values["postgresql"]["enabled"] is False  # an external database, not the chart's demo one
    for key in ("fernetKeySecretName", "apiSecretKeySecretName", "jwtSecretName"):
        assert values[key], key


def test_values_bake_the_dags_into_the_image(values: dict[str, Any]) -> None:
    assert values["dags"]["gitSync"]["enabled"] is False and values["dags"]["persistence"]["enabled"] is False
    dockerfile = (REPO / "docker" / "airflow.Dockerfile").read_text(encoding="utf-8")
    assert "COPY --chown=airflow:0 dags/ /opt/airflow/dags/" in dockerfile
    assert "COPY --chown=airflow:0 plugins/ /opt/airflow/plugins/" in dockerfile


def test_values_set_resources_and_remote_logs(values: dict[str, Any]) -> None:
    for component in ("workers", "scheduler", "dagProcessor", "apiServer", "triggerer"):
        resources = values[component]["resources"]
        assert resources["requests"]["cpu"] and resources["requests"]["memory"], component
        assert resources["limits"]["memory"], component
    logging = values["config"]["logging"]
    assert logging["remote_logging"] == "True" and logging["remote_base_log_folder"].startswith("s3://")
    assert logging["remote_log_conn_id"] == Settings.from_environ(
        {i["name"]: i["value"] for i in values["env"]}).aws_conn_id


PROBE = textwrap.dedent(
    """
    import json, sys
    from airflow.dag_processing.dagbag import DagBag
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
    from kubernetes.client import ApiClient

    bag = DagBag(dag_folder=sys.argv[1])
    dag = bag.dags["personcar_detection"]
    pods = {}
    for task in dag.tasks:
        if isinstance(task, KubernetesPodOperator):
            pod = task.build_pod_request_obj(dry_run=True)
            pods[task.task_id] = {"pod": ApiClient().sanitize_for_serialization(pod),
                                  "in_cluster": task.in_cluster, "conn_id": task.kubernetes_conn_id}
    print(json.dumps({"errors": {k: str(v) for k, v in bag.import_errors.items()},
                      "classes": {t.task_id: "KubernetesPodOperator" if isinstance(t, KubernetesPodOperator)
                                  else type(t).__name__ for t in dag.tasks}, "pods": pods}))
    """
)


@pytest.fixture(scope="module")
def dag_with_values(values_env: dict[str, str]) -> dict[str, Any]:
    """The DAG parsed with the environment the Helm values give the Airflow containers."""
    with tempfile.TemporaryDirectory() as home:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "PERSONCAR_"))}
        env.update(values_env)
        env["PERSONCAR_K8S_POD_TEMPLATES"] = str(DEFAULT_TEMPLATES)  # baked at /opt/airflow/pod-templates in the image
        env.update({"AIRFLOW_HOME": home, "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
                    "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)})
        out = subprocess.run([sys.executable, "-c", PROBE, str(REPO / "dags")], env=env, capture_output=True,
                             text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_dag_parsed_with_the_values_runs_tensorflow_stages_as_trainer_pods(dag_with_values: dict[str, Any],
                                                                          values_env: dict[str, str]) -> None:
    import kubernetes_validate

    assert dag_with_values["errors"] == {}
    classes = dag_with_values["classes"]
    assert {t for t, c in classes.items() if c == "KubernetesPodOperator"} == {"build_tfrecords", "train", "evaluate"}
    gpus = {"build_tfrecords": 0, "train": int(values_env["PERSONCAR_K8S_GPUS"]), "evaluate": 1}
    for task_id, rendered in dag_with_values["pods"].items():
        pod = rendered["pod"]
        assert rendered["in_cluster"] is True and rendered["conn_id"] is None
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(pod, version, strict=True)
        spec = pod["spec"]
        container = spec["containers"][0]
        assert pod["metadata"]["namespace"] == _one("Namespace")["metadata"]["name"]
        assert spec["serviceAccountName"] == _one("ServiceAccount")["metadata"]["name"]
        assert container["image"] == values_env["PERSONCAR_K8S_IMAGE"]
        assert container["envFrom"] == [{"secretRef": {"name": TRAINER_SECRET}}]
        assert container["resources"].get("limits", {}).get("nvidia.com/gpu", "0") == str(gpus[task_id]), task_id
        if gpus[task_id]:
            assert spec["nodeSelector"] == TEMPLATE["spec"]["nodeSelector"]
            assert spec["tolerations"] == TEMPLATE["spec"]["tolerations"]
        else:
            assert not spec.get("nodeSelector") and not spec.get("tolerations")
        # What the namespace's "restricted" Pod Security Standard requires of every pod.
        assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] != 0
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        for c in spec["containers"] + spec.get("initContainers", []):
            assert c["securityContext"]["allowPrivilegeEscalation"] is False, (task_id, c["name"])
            assert c["securityContext"]["capabilities"]["drop"] == ["ALL"], (task_id, c["name"])
            assert not c["securityContext"].get("privileged"), (task_id, c["name"])
        allowed = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                   "projected", "secret", "name"}
        for volume in spec.get("volumes", []):
            assert set(volume) <= allowed, (task_id, volume)
        assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC")


SWEEP_PROBE = textwrap.dedent(
    """
    import json, sys
    from airflow.dag_processing.dagbag import DagBag

    from tasks.sweep_tasks import candidate_config_macro

    bag = DagBag(dag_folder=sys.argv[1])
    dag = bag.dags.get("personcar_backbone_sweep")
    tasks = {}
    for task in (dag.tasks if dag else []):
        tasks[task.task_id] = {"class": type(task).__name__,
                               "mapped": task.get_closest_mapped_task_group() is not None,
                               "arguments": getattr(task, "arguments", None),
                               "pod_template_file": getattr(task, "pod_template_file", None),
                               "image": getattr(task, "image", None),
                               "downstream": sorted(task.downstream_task_ids)}
    params = {k: dag.params[k] for k in dag.params} if dag else {}
    configs = [json.loads(candidate_config_macro(params, i)) for i in range(len(params.get("candidates", [])))]
    print(json.dumps({"errors": {k: str(v) for k, v in bag.import_errors.items()}, "tasks": tasks,
                      "configs": configs}))
    """
)


def test_backbone_sweep_parses_into_mapped_trainer_pods(values_env: dict[str, str], tmp_path: Path) -> None:
    """dags/personcar_backbone_sweep.py with the deployment's settings: each candidate's train and
    evaluate are trainer pods mapped over the candidates (ResNet-50, -101, -152 by default)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "PERSONCAR_"))}
    env.update(values_env)
    env["PERSONCAR_K8S_POD_TEMPLATES"] = str(DEFAULT_TEMPLATES)
    env.update({"AIRFLOW_HOME": str(tmp_path / "home"), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
                "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)})
    out = subprocess.run([sys.executable, "-c", SWEEP_PROBE, str(REPO / "dags")], env=env, capture_output=True,
                         text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    probe = json.loads(out.stdout.strip().splitlines()[-1])
    assert probe["errors"] == {}
    tasks = probe["tasks"]
    pods = {t: v for t, v in tasks.items() if v["class"] == "TrainerPodOperator"}
    assert sorted(pods) == ["build_tfrecords", "candidate.evaluate", "candidate.train", "compare"]
    assert tasks["candidate.train"]["downstream"] == ["candidate.evaluate"]
    assert tasks["candidate.evaluate"]["downstream"] == ["compare"]
    assert [t for t, v in tasks.items() if v["mapped"]] == ["candidate.train", "candidate.evaluate"]
    for task in pods.values():
        assert task["pod_template_file"].endswith(("trainer-gpu.yaml", "trainer-cpu.yaml"))
        assert task["image"] == values_env["PERSONCAR_K8S_IMAGE"]
    train, evaluate = tasks["candidate.train"]["arguments"], tasks["candidate.evaluate"]["arguments"]
    assert train[0] == "train" and "personcar_candidate_config(params, ti.map_index)" in " ".join(train)
    assert evaluate[0] == "evaluate" and "personcar_candidate_dir(dag_run, params, ti.map_index)" in " ".join(evaluate)
    assert tasks["compare"]["arguments"][:2] == ["compare", "--sweep"]
    models = [c["model"] for c in probe["configs"]]
    assert models == [f"ssd_resnet{d}_v1_fpn_640x640" for d in (50, 101, 152)]
