"""A trainer task run end to end against an in-memory Kubernetes API served over real HTTP.

kmock's ``KubernetesEmulator`` stores the objects the operator creates, patches and deletes, and
serves them back over HTTP on 127.0.0.1. The kubelet's part is played by a small script: the pod
is ``Pending`` (scheduled) when created, ``Running`` from the second time the operator reads it,
and ``Succeeded`` or ``Failed`` once its log has been streamed. The ``KubernetesPodOperator``
built by ``tasks.k8s.make_trainer_task`` talks to it through a kubeconfig file, exactly as it
talks to a cluster.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kmock
import pytest

from tasks.k8s import TrainerPodSettings, make_trainer_task

NAMESPACE = "personcar"
PODS = "v1/pods"
TRAIN_ARGS = ["train", "--data", "s3://bucket/run-1/tfrecords", "--model-dir", "s3://bucket/run-1/model",
              "--steps", "20"]
LOG_LINES = [
    "train: RetinaNet-152 at 640x640, batch 64, 1 GPU(s)",
    "step 10/20 loss 1.8342 lr 0.0133 images/s 41.2",
    "step 20/20 loss 1.2210 lr 0.0140 images/s 43.0",
]


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class PodScript:
    """How the emulated kubelet runs the pod: its log lines, exit code and termination message."""

    log_lines: list[str]
    exit_code: int = 0
    message: str = ""
    fetches: int = 0
    log_requests: int = 0
    finished: threading.Event = field(default_factory=threading.Event)


class KubeApi:
    """kmock's Kubernetes emulator on its own event loop thread, serving http://127.0.0.1:PORT."""

    def __init__(self, script: PodScript):
        self.script = script
        self.url = ""
        self.api: Any = None
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="kmock", daemon=True)

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> KubeApi:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("kmock did not start")
        if self._error:
            raise self._error
        return self

    def stop(self) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._serve())
        except BaseException as exc:  # surfaced by start()
            self._error = exc
            self._ready.set()
        finally:
            self._loop.close()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        async with kmock.KubernetesEmulator() as api, kmock.Server(api) as server:
            self.api = api
            self.url = str(server.url).rstrip("/")
            self._configure(api)
            self._ready.set()
            await self._stop.wait()

    # -- the emulated kubelet ------------------------------------------------------------------
    def _configure(self, api: Any) -> None:
        api.resources[PODS] = kmock.ResourceInfo(namespaced=True, kind="Pod", subresources={"log"})
        api.resources["v1/events"] = kmock.ResourceInfo(namespaced=True, kind="Event")
        pods = kmock.resource(PODS)
        # Reactions are tried in order: the log subresource before the plain read of the pod.
        api[kmock.action.FETCH, pods, kmock.subresource("log")] << self._serve_log
        api[kmock.action.FETCH, pods, kmock.subresource(None)] << self._serve_pod
        api[kmock.action.CREATE, pods] << self._on_create

    def _pod(self, namespace: str, name: str) -> Any:
        obj = self.api.objects[PODS, namespace, name]
        if obj.deleted:
            raise kmock.KubernetesObjectNotFoundError()
        return obj

    def _on_create(self, request: Any) -> dict[str, Any]:
        meta = request.data["metadata"]
        obj = self._pod(request.namespace or meta["namespace"], meta["name"])
        obj.patch({
            "metadata": {"uid": "0f1e2d3c", "creationTimestamp": _now(), "resourceVersion": "1"},
            "status": {
                "phase": "Pending",
                "conditions": [{"type": "PodScheduled", "status": "True"}],
                "containerStatuses": [{
                    "name": "base", "image": request.data["spec"]["containers"][0]["image"],
                    "imageID": "", "ready": False, "restartCount": 0,
                    "state": {"waiting": {"reason": "ContainerCreating"}},
                }],
            },
        })
        return obj.raw

    def _serve_pod(self, request: Any) -> dict[str, Any]:
        obj = self._pod(request.namespace, request.name)
        self.script.fetches += 1
        if obj["status"]["phase"] == "Pending" and self.script.fetches >= 2:
            obj.patch({"status": {
                "phase": "Running",
                "containerStatuses": [{
                    "name": "base", "image": obj["spec"]["containers"][0]["image"], "imageID": "",
                    "ready": True, "restartCount": 0, "started": True,
                    "state": {"running": {"startedAt": _now()}},
                }],
            }})
        return obj.raw

    def _serve_log(self, request: Any) -> tuple[Any, ...]:
        obj = self._pod(request.namespace, request.name)
        self.script.log_requests += 1
        stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f000Z")
        lines = tuple(f"{stamp} {line}\n".encode() for line in self.script.log_lines)

        def terminate() -> None:
            script = self.script
            obj.patch({"status": {
                "phase": "Succeeded" if script.exit_code == 0 else "Failed",
                "containerStatuses": [{
                    "name": "base", "image": obj["spec"]["containers"][0]["image"], "imageID": "",
                    "ready": False, "restartCount": 0, "started": False,
                    "state": {"terminated": {
                        "exitCode": script.exit_code,
                        "reason": "Completed" if script.exit_code == 0 else "Error",
                        "message": script.message, "startedAt": _now(), "finishedAt": _now(),
                    }},
                }],
            }})
            script.finished.set()

        return (*lines, terminate)

    # -- what the test sets up and inspects ------------------------------------------------------
    def add_object(self, resource: str, namespace: str, name: str, body: dict[str, Any]) -> None:
        """Store an object as if it had been created earlier (on the server's loop, synchronously)."""
        async def put() -> None:
            self.api.objects[resource, namespace, name] = body

        asyncio.run_coroutine_threadsafe(put(), self._loop).result(5)

    def requests(self, method: str, *, subresource: str | None = "any") -> list[Any]:
        out = []
        for request in list(self.api):
            if request.method.value != method or request.resource != kmock.resource(PODS):
                continue
            if subresource != "any" and request.subresource != subresource:
                continue
            out.append(request)
        return out


@pytest.fixture()
def kube(request: pytest.FixtureRequest) -> Iterator[KubeApi]:
    script = getattr(request, "param", None) or PodScript(log_lines=LOG_LINES)
    api = KubeApi(script).start()
    try:
        yield api
    finally:
        api.stop()


@pytest.fixture()
def kubeconfig(kube: KubeApi, tmp_path: Path) -> Path:
    path = tmp_path / "kubeconfig"
    path.write_text(
        "apiVersion: v1\nkind: Config\n"
        f"clusters:\n- name: kmock\n  cluster:\n    server: {kube.url}\n    insecure-skip-tls-verify: true\n"
        "users:\n- name: kmock\n  user:\n    token: not-a-secret\n"
        f"contexts:\n- name: kmock\n  context:\n    cluster: kmock\n    user: kmock\n    namespace: {NAMESPACE}\n"
        "current-context: kmock\n"
    )
    return path


class _TaskInstance:
    """The part of a running task instance the operator reads (its identity) and writes (XComs)."""

    def __init__(self, dag_id: str, task_id: str, run_id: str):
        self.dag_id, self.task_id, self.run_id = dag_id, task_id, run_id
        self.try_number, self.map_index = 1, -1
        self.xcoms: dict[str, Any] = {}

    def xcom_push(self, key: str, value: Any, **_: Any) -> None:
        self.xcoms[key] = value


def _task_log(capfd: pytest.CaptureFixture[str]) -> str:
    """What the task wrote to its log (Airflow 3 logs through structlog to the process streams)."""
    captured = capfd.readouterr()
    return captured.out + captured.err


def _run_train_task(kubeconfig: Path, *, gpus: int = 1, arguments: list[str] = TRAIN_ARGS) -> tuple[Any, _TaskInstance]:
    import pendulum
    from airflow.sdk import DAG

    settings = TrainerPodSettings.load(in_cluster=False, config_file=str(kubeconfig), context="kmock",
                                       conn_id=None, gpus=gpus, deferrable=False)
    with DAG("personcar_detection_k8s_test", schedule=None, start_date=pendulum.datetime(2025, 1, 1)) as dag:
        op = make_trainer_task(
            "train", arguments, settings,
            # Poll the emulator quickly; a cluster keeps the operator's defaults.
            startup_check_interval_seconds=0.05, base_container_status_polling_interval=0.05,
        )
    ti = _TaskInstance(dag.dag_id, "train", "manual__2025-01-01T00:00:00+00:00")
    context = {"ti": ti, "task_instance": ti, "run_id": ti.run_id, "dag": dag, "task": op}
    op.execute(context)
    return op, ti


def test_train_pod_created_logged_succeeded_and_deleted(kube: KubeApi, kubeconfig: Path,
                                                        capfd: pytest.CaptureFixture[str]) -> None:

    op, ti = _run_train_task(kubeconfig)

    # Created once, with the GPU limit, the CLI and its arguments, in the configured namespace.
    posts = kube.requests("POST")
    assert len(posts) == 1
    pod = posts[0].data
    assert posts[0].namespace == NAMESPACE
    container = pod["spec"]["containers"][0]
    assert container["command"] == ["personcar"]
    assert container["args"] == TRAIN_ARGS
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert pod["spec"]["serviceAccountName"] == "personcar-trainer"
    assert pod["spec"]["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["metadata"]["labels"]["dag_id"] == "personcar_detection_k8s_test"
    assert pod["metadata"]["labels"]["task_id"] == "train"

    # It waited through Pending, then followed the log of the base container.
    assert kube.script.fetches >= 2
    log_requests = kube.requests("GET", subresource="log")
    assert len(log_requests) == 1
    assert log_requests[0].params["container"] == "base"
    assert log_requests[0].params["follow"].lower() == "true"
    logged = _task_log(capfd)
    for line in LOG_LINES:
        assert f"[base] {line}" in logged

    # Succeeded: the pod was deleted, and its identity was recorded for the task.
    deletes = kube.requests("DELETE")
    assert [d.name for d in deletes] == [pod["metadata"]["name"]]
    assert kube.api.objects[PODS, NAMESPACE, pod["metadata"]["name"]].deleted
    assert ti.xcoms == {"pod_name": pod["metadata"]["name"], "pod_namespace": NAMESPACE}


def test_two_gpu_pod_gets_shared_memory_and_the_flag(kube: KubeApi, kubeconfig: Path) -> None:
    _run_train_task(kubeconfig, gpus=2, arguments=[*TRAIN_ARGS, "--gpus", "2"])

    pod = kube.requests("POST")[0].data
    container = pod["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert container["args"][-2:] == ["--gpus", "2"]
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]


@pytest.mark.parametrize("kube", [PodScript(
    log_lines=["train: loading s3://bucket/run-1/tfrecords",
               "personcar: error: s3://bucket/run-1/tfrecords/manifest.json: not found"],
    exit_code=1,
    message="personcar: error: s3://bucket/run-1/tfrecords/manifest.json: not found",
)], indirect=True)
def test_failed_pod_fails_the_task_with_its_message_and_is_deleted(
        kube: KubeApi, kubeconfig: Path, capfd: pytest.CaptureFixture[str]) -> None:
    from airflow.exceptions import AirflowException

    with pytest.raises(AirflowException) as raised:
        _run_train_task(kubeconfig)

    text = str(raised.value)
    assert "returned a failure" in text
    assert "manifest.json: not found" in text  # the container's termination message
    assert "[base] personcar: error: s3://bucket/run-1/tfrecords/manifest.json: not found" in _task_log(capfd)

    name = kube.requests("POST")[0].data["metadata"]["name"]
    # Marked as checked (so a retry does not reattach to it), then deleted.
    patches = kube.requests("PATCH")
    assert any(p.data == {"metadata": {"labels": {"already_checked": "True"}}} for p in patches)
    assert [d.name for d in kube.requests("DELETE")] == [name]
    assert kube.api.objects[PODS, NAMESPACE, name].deleted


def test_retry_reattaches_to_the_running_pod_instead_of_starting_another(
        kube: KubeApi, kubeconfig: Path, capfd: pytest.CaptureFixture[str]) -> None:
    # A worker died while its pod was training: the pod of that try is still running.
    name = "train-survivor"
    labels = {"dag_id": "personcar_detection_k8s_test", "task_id": "train",
              "run_id": "manual__2025-01-01T000000.0000000000-1b0d2c5a5", "kubernetes_pod_operator": "True",
              "try_number": "1", "airflow_version": "3.3.2"}
    running = {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": NAMESPACE, "labels": labels,
                     "creationTimestamp": _now()},
        "spec": {"containers": [{"name": "base", "image": "ghcr.io/personcar/trainer:0.1.0"}]},
        "status": {"phase": "Running", "containerStatuses": [{
            "name": "base", "image": "ghcr.io/personcar/trainer:0.1.0", "imageID": "", "ready": True,
            "restartCount": 0, "state": {"running": {"startedAt": _now()}}}]},
    }
    kube.add_object(PODS, NAMESPACE, name, running)

    _run_train_task(kubeconfig)

    assert kube.requests("POST") == []  # no second pod
    assert [r.name for r in kube.requests("GET", subresource="log")] == [name]
    assert f"[base] {LOG_LINES[-1]}" in _task_log(capfd)
    assert [d.name for d in kube.requests("DELETE")] == [name]
