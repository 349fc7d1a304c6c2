"""Trainer tasks run end to end on an emulated one-node cluster whose kubelet really runs the pods.

``tests/kubelet.py``: kmock's Kubernetes API over real HTTP, and a kubelet that runs each pod's
``personcar`` command and arguments, with the environment it reads back from the API (the S3
credentials and endpoint from the ``personcar-aws`` Secret the pod templates name), in the
project's environment; it streams the real log and reports the real exit code and termination
message. The artifacts are on moto's S3 server. The ``KubernetesPodOperator`` built by
``tasks.k8s.make_trainer_task`` talks to the emulator through a kubeconfig file, exactly as it
talks to a cluster; a test plays the task instance (its identity, try number and XComs) and, for
deferrable tasks, the triggerer.

Faults: a worker killed while its train pod runs (the retry reattaches, no second pod), a pod
that fails on a bad argument (the task fails with the pod's own message and without retries, also
when deferred; one that fails on storage stays retryable), a node that disappears
under a training pod (the retry resumes from the last checkpoint in S3).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
from concurrent.futures import Future, wait
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest

from tasks.k8s import TrainerPodSettings, make_trainer_task
from tests.conftest import pixel_area_copy, wait_until
from tests.kubelet import PODS, Cluster

REPO = Path(__file__).resolve().parents[2]
NAMESPACE = "personcar"
BUCKET = "personcar-kubelet"
DATA = f"s3://{BUCKET}/data"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
DAG_ID = "personcar_detection_k8s_test"
RUN_ID = "manual__2025-01-01T00:00:00+00:00"
TINY = ["--model", "ssd_resnet26_v1_fpn_256x256_tiny", "--image-size", "128", "--batch-size", "2",
        "--validate-every", "0", "--warm-start", "none", "--log-every", "1"]


def train_args(model_dir: str, steps: int, *extra: str) -> list[str]:
    return ["train", "--data", f"{DATA}/tfrecords", "--model-dir", model_dir, *TINY, "--steps", str(steps), *extra]


# -- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def s3(s3_server: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A bucket with a validated sample (images, clean annotations) and its TFRecords under ``data/``."""
    from tasks import storage
    from tasks.sample import make_sample
    from tasks.tfrecords import build_tfrecords

    root = tmp_path_factory.mktemp("kubelet-data")
    make_sample(root / "sample", images=10, seed=4)
    images = root / "sample" / "trainval" / "images"
    clean = pixel_area_copy(root / "sample" / "trainval" / "annotations" / "bbox-annotations.json",
                            root / "annotations.clean.json")
    build_tfrecords(clean, images, root / "tfrecords", val_fraction=0.3, seed=42)
    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1", **{
        "aws_access_key_id": CREDENTIALS["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": CREDENTIALS["AWS_SECRET_ACCESS_KEY"]})
    client.create_bucket(Bucket=BUCKET)
    where = {"endpoint_url": s3_server, "options": {"key": "testing", "secret": "testing"}}
    storage.upload_dir(images, f"{DATA}/download/trainval/images", **where)
    storage.upload_files([("annotations.clean.json", clean)], f"{DATA}/validate", **where)
    storage.upload_dir(root / "tfrecords", f"{DATA}/tfrecords", **where)
    return {"endpoint": s3_server, "client": client}


def keys(s3: dict[str, Any], prefix: str) -> list[str]:
    pages = s3["client"].get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return sorted(o["Key"][len(prefix):] for page in pages for o in page.get("Contents", []))


def read_json(s3: dict[str, Any], key: str) -> Any:
    return json.loads(s3["client"].get_object(Bucket=BUCKET, Key=key)["Body"].read())


@pytest.fixture()
def kube(s3: dict[str, Any], tmp_path: Path) -> Iterator[Cluster]:
    """The emulated cluster, with the S3 credentials Secret the pod templates reference."""
    with Cluster(tmp_path / "node", namespace=NAMESPACE, gpus=1, grace_seconds=5) as cluster:
        cluster.create_secret("personcar-aws", {**CREDENTIALS, "AWS_ENDPOINT_URL_S3": s3["endpoint"]})
        yield cluster
        cluster.check()


@pytest.fixture()
def kubeconfig(kube: Cluster, tmp_path: Path) -> Path:
    return kube.kubeconfig(tmp_path / "kubeconfig", context="kmock")


# -- playing the task instance (and the triggerer) -------------------------------------------------
class _TaskInstance:
    """The part of a running task instance the operator reads (its identity) and writes (XComs)."""

    def __init__(self, dag_id: str, task_id: str, run_id: str, try_number: int = 1):
        import pendulum

        self.dag_id, self.task_id, self.run_id = dag_id, task_id, run_id
        self.try_number, self.map_index = try_number, -1
        self.start_date = pendulum.now("UTC")
        self.xcoms: dict[str, Any] = {}

    def xcom_push(self, key: str, value: Any, **_: Any) -> None:
        self.xcoms[key] = value


def _task_log(capfd: pytest.CaptureFixture[str]) -> str:
    """What the task wrote to its log (Airflow 3 logs through structlog to the process streams)."""
    captured = capfd.readouterr()
    return captured.out + captured.err


def build_task(kubeconfig: str | Path, task_id: str, arguments: list[str], *, gpus: int = 1,
               deferrable: bool = False, try_number: int = 1, **settings: Any) -> tuple[Any, dict[str, Any]]:
    """The trainer task as the DAG builds it, and the context of one try of it."""
    import pendulum
    from airflow.sdk import DAG

    pod_settings = TrainerPodSettings.load(in_cluster=False, config_file=str(kubeconfig), context="kmock",
                                           conn_id=None, gpus=gpus, deferrable=deferrable, **settings)
    with DAG(DAG_ID, schedule=None, start_date=pendulum.datetime(2025, 1, 1)) as dag:
        op = make_trainer_task(
            task_id, arguments, pod_settings, gpus=gpus,
            # Poll the emulator quickly; a cluster keeps the operator's defaults.
            startup_check_interval_seconds=0.2, base_container_status_polling_interval=0.2, poll_interval=0.5,
        )
    ti = _TaskInstance(dag.dag_id, task_id, RUN_ID, try_number)
    return op, {"ti": ti, "task_instance": ti, "run_id": ti.run_id, "dag": dag, "task": op}


def run_task(op: Any, context: dict[str, Any]) -> Any:
    """Run the task as a worker does; a deferred task's trigger runs to its event, then the task resumes.

    It runs in a thread of its own, as a worker's task runner has no event loop running: the pod
    operator calls ``asyncio.run``, which fails in a thread where one runs (pytest-playwright's sync
    API leaves its loop set as the main thread's running loop for the rest of the session).
    """
    return start_task(op, context).result()


def start_task(op: Any, context: dict[str, Any]) -> Future:
    """:func:`run_task` in the background (a daemon thread): the task's return value or error, when done."""
    outcome: Future = Future()

    def runner() -> None:
        try:
            outcome.set_result(_run_task(op, context))
        except BaseException as exc:  # the test looks at it
            outcome.set_exception(exc)

    threading.Thread(target=runner, daemon=True, name="task-runner").start()
    return outcome


def _run_task(op: Any, context: dict[str, Any], around_trigger: Callable[[], None] | None = None) -> Any:
    """``around_trigger`` is called when the task defers and again when its trigger has fired
    (the triggerer's turn in between)."""
    from airflow.sdk.exceptions import TaskDeferred

    call = lambda: op.execute(context)
    while True:
        try:
            return call()
        except TaskDeferred as deferred:
            if around_trigger:
                around_trigger()
            event = asyncio.run(_first_event(deferred.trigger))
            if around_trigger:
                around_trigger()
            call = lambda d=deferred, e=event: getattr(op, d.method_name)(context, e.payload)


async def _first_event(trigger: Any) -> Any:
    async for event in trigger.run():
        return event
    raise AssertionError("the trigger ended without an event")


def run_train_task(kubeconfig: Path, arguments: list[str], **kw: Any) -> tuple[Any, _TaskInstance]:
    op, context = build_task(kubeconfig, "train", arguments, **kw)
    run_task(op, context)
    return op, context["ti"]


def _pod_name(kube: Cluster, post_index: int = 0) -> str:
    return kube.requests("POST")[post_index].data["metadata"]["name"]


def _phases(kube: Cluster, name: str) -> list[str]:
    """The pod's phases as the API stored them, in order, without repeats."""
    out: list[str] = []
    for version in kube.api.objects[PODS, NAMESPACE, name].history:
        phase = ((version or {}).get("status") or {}).get("phase")
        if phase and (not out or out[-1] != phase):
            out.append(phase)
    return out


# -- a stage pod, end to end -----------------------------------------------------------------------
@pytest.mark.parametrize("deferrable", [False, True], ids=["sync", "deferrable"])
def test_tfrecords_pod_runs_the_cli_with_the_pods_environment_and_writes_s3(
        kube: Cluster, kubeconfig: Path, s3: dict[str, Any], deferrable: bool,
        capfd: pytest.CaptureFixture[str]) -> None:
    out = f"s3://{BUCKET}/tfrecords-{'deferrable' if deferrable else 'sync'}/tfrecords"
    arguments = ["tfrecords", "--annotations", f"{DATA}/validate/annotations.clean.json",
                 "--images", f"{DATA}/download/trainval/images", "--out", out, "--val-fraction", "0.3"]
    op, context = build_task(kubeconfig, "build_tfrecords", arguments, gpus=0, deferrable=deferrable)
    run_task(op, context)

    # One CPU pod, created with the CLI and its arguments from the CPU template.
    posts = kube.requests("POST")
    assert len(posts) == 1 and posts[0].namespace == NAMESPACE
    name = posts[0].data["metadata"]["name"]
    container = posts[0].data["spec"]["containers"][0]
    assert (container["command"], container["args"]) == (["personcar"], arguments)
    assert "nvidia.com/gpu" not in (container["resources"].get("limits") or {})

    # The kubelet ran what the API holds, with the pod's environment and nothing of this process's.
    run = kube.runs[NAMESPACE, name]
    assert run.argv == ["personcar", *arguments]
    assert run.env["AWS_ACCESS_KEY_ID"] == "testing" and run.env["AWS_ENDPOINT_URL_S3"] == s3["endpoint"]
    assert run.env["AWS_DEFAULT_REGION"] == "us-east-1" and run.env["TF_USE_LEGACY_KERAS"] == "1"
    assert not {k for k in run.env if k.startswith(("PERSONCAR_", "AIRFLOW", "PYTEST"))}
    assert run.exit_code == 0 and _phases(kube, name) == ["Pending", "Running", "Succeeded"]

    # The real output is the task's log, and the outputs are in S3.
    logs = kube.requests("GET", subresource="log")
    assert [r.name for r in logs] == [name]
    assert logs[0].params["container"] == "base" and logs[0].params["follow"].lower() == "true"
    summary = json.loads(run.text().strip().splitlines()[-1])  # the CLI's last line: its JSON summary
    logged = _task_log(capfd)
    assert f"[base] {json.dumps(summary)}" in logged or f"[base] logs: {json.dumps(summary)}" in logged
    prefix = out.removeprefix(f"s3://{BUCKET}/") + "/"
    assert {"manifest.json", "label_map.pbtxt", "val.coco.json"} <= set(keys(s3, prefix))
    assert read_json(s3, prefix + "manifest.json")["splits"]["train"]["images"] == summary["splits"]["train"]["images"]

    # Succeeded: deleted (its process long gone), and its identity recorded for the task.
    assert [d.name for d in kube.requests("DELETE")] == [name] and kube.pod(name) is None
    assert context["ti"].xcoms == {"pod_name": name, "pod_namespace": NAMESPACE}


@pytest.mark.slow
def test_train_pod_created_once_with_the_gpu_logged_succeeded_and_deleted(
        kube: Cluster, kubeconfig: Path, s3: dict[str, Any], capfd: pytest.CaptureFixture[str]) -> None:
    arguments = train_args(f"s3://{BUCKET}/train-ok/train", 2, "--no-export")
    op, ti = run_train_task(kubeconfig, arguments)

    # Created once, with the GPU limit, the CLI and its arguments, in the configured namespace.
    posts = kube.requests("POST")
    assert len(posts) == 1
    pod = posts[0].data
    assert posts[0].namespace == NAMESPACE
    container = pod["spec"]["containers"][0]
    assert container["command"] == ["personcar"]
    assert container["args"] == arguments
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert pod["spec"]["serviceAccountName"] == "personcar-trainer"
    assert pod["spec"]["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["metadata"]["labels"]["dag_id"] == DAG_ID
    assert pod["metadata"]["labels"]["task_id"] == "train"
    name = pod["metadata"]["name"]

    # It waited through Pending (read the pod more than once), then followed the log of the base container.
    assert len(kube.requests("GET", subresource=None)) >= 2
    assert _phases(kube, name) == ["Pending", "Running", "Succeeded"]
    log_requests = kube.requests("GET", subresource="log")
    assert len(log_requests) == 1
    assert log_requests[0].params["container"] == "base"
    assert log_requests[0].params["follow"].lower() == "true"
    logged = _task_log(capfd)
    run = kube.runs[NAMESPACE, name]
    steps = [ln for ln in run.text().splitlines() if "train: step " in ln]
    assert len(steps) == 2 and "train: step 2/2 loss" in steps[-1]
    for line in steps:
        assert f"[base] {line}" in logged

    # Trained in the pod, into S3.
    summary = read_json(s3, "train-ok/train/train_summary.json")
    assert (summary["steps"], summary["start_step"]) == (2, 0)

    # Succeeded: the pod was deleted, and its identity was recorded for the task.
    deletes = kube.requests("DELETE")
    assert [d.name for d in deletes] == [name]
    assert kube.api.objects[PODS, NAMESPACE, name].deleted
    assert ti.xcoms == {"pod_name": name, "pod_namespace": NAMESPACE}


def test_two_gpu_pod_gets_shared_memory_and_the_flag_and_waits_for_a_node_with_two_gpus(
        kube: Cluster, kubeconfig: Path) -> None:
    from airflow.exceptions import AirflowException

    from airflow.providers.cncf.kubernetes.utils.pod_manager import PodLaunchTimeoutException

    arguments = [*train_args(f"s3://{BUCKET}/two-gpus/train", 2), "--gpus", "2"]
    with pytest.raises(AirflowException, match="returned a failure") as raised:
        run_train_task(kubeconfig, arguments, gpus=2, startup_timeout_seconds=2)
    # The operator's clean-up reports the failed pod; what happened is the exception it replaced.
    assert isinstance(raised.value.__context__, PodLaunchTimeoutException)
    assert "too long to be scheduled" in str(raised.value.__context__)

    pod = kube.requests("POST")[0].data
    container = pod["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert container["args"][-2:] == ["--gpus", "2"]
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
    # The emulated node has one GPU: the pod was never scheduled, nothing ran, and it was cleaned up.
    name = pod["metadata"]["name"]
    scheduled = next(c for c in kube.api.objects[PODS, NAMESPACE, name].last["status"]["conditions"]
                     if c["type"] == "PodScheduled")
    assert (scheduled["status"], scheduled["reason"]) == ("False", "Unschedulable")
    assert kube.runs[NAMESPACE, name].pid is None
    assert [d.name for d in kube.requests("DELETE")] == [name]


def test_failed_pod_fails_the_task_with_its_message_and_is_deleted(
        kube: Cluster, kubeconfig: Path, capfd: pytest.CaptureFixture[str]) -> None:
    from airflow.exceptions import AirflowException
    from airflow.sdk.exceptions import AirflowFailException

    arguments = train_args(f"s3://{BUCKET}/bad/train", 2) + ["--batch-size", "0"]  # a bad argument
    error = ("personcar train: error: argument --batch-size: must be an integer between 1 and 1024, got '0' "
             "(see personcar train --help)")
    with pytest.raises(AirflowException) as raised:
        run_train_task(kubeconfig, arguments)

    name = _pod_name(kube)
    run = kube.runs[NAMESPACE, name]
    assert run.exit_code == 2 and run.text() == error + "\n"  # the CLI's one line, no traceback
    # exit 2, a user error: the same pod would fail the same way, so the task fails without its retries,
    # with the command's line; the operator's own failure text is its cause
    assert isinstance(raised.value, AirflowFailException) and str(raised.value) == error
    text = str(raised.value.__cause__)
    assert "returned a failure" in text
    assert error in text  # the container's termination message: the end of its log (FallbackToLogsOnError)
    assert f"[base] {error}" in _task_log(capfd)
    assert _phases(kube, name) == ["Pending", "Running", "Failed"]

    # Marked as checked (so a retry does not reattach to it), then deleted.
    patches = kube.requests("PATCH")
    assert any(p.data == {"metadata": {"labels": {"already_checked": "True"}}} for p in patches)
    assert [d.name for d in kube.requests("DELETE")] == [name]
    assert kube.api.objects[PODS, NAMESPACE, name].deleted


def test_a_deferred_pod_that_failed_on_a_user_error_is_not_retried(kube: Cluster, kubeconfig: Path) -> None:
    """The same decision when the triggerer watched the pod (the operator resumes, then cleans up)."""
    from airflow.sdk.exceptions import AirflowFailException

    op, context = build_task(kubeconfig, "train", train_args(f"s3://{BUCKET}/bad-deferred/train", 2) +
                             ["--log-every", "0"], deferrable=True)
    with pytest.raises(AirflowFailException) as raised:
        run_task(op, context)
    assert str(raised.value) == ("personcar train: error: argument --log-every: must be an integer >= 1, got '0' "
                                 "(see personcar train --help)")
    assert kube.runs[NAMESPACE, _pod_name(kube)].exit_code == 2
    assert [d.name for d in kube.requests("DELETE")] == [_pod_name(kube)]


def test_a_pod_that_failed_on_storage_is_retried(kube: Cluster, kubeconfig: Path) -> None:
    """Exit 75 (a storage or network failure: a retry may pass) fails the try the retryable way."""
    from airflow.exceptions import AirflowException
    from airflow.sdk.exceptions import AirflowFailException

    arguments = ["train", "--data", "s3://personcar-no-such-bucket/tfrecords", "--model-dir", f"s3://{BUCKET}/nb/train",
                 *TINY, "--steps", "1"]
    with pytest.raises(AirflowException) as raised:
        run_train_task(kubeconfig, arguments)
    run = kube.runs[NAMESPACE, _pod_name(kube)]
    assert run.exit_code == 75, run.text()
    assert run.text().strip().splitlines()[-1] == ("personcar train: error: download s3://personcar-no-such-bucket/"
                                                   "tfrecords/ failed: bucket 'personcar-no-such-bucket' does not exist")
    assert not isinstance(raised.value, AirflowFailException) and "returned a failure" in str(raised.value)


def test_exit_codes_and_oom_lines_decide_the_retry() -> None:
    from types import SimpleNamespace as NS

    from tasks.errors import NO_RETRY_EXIT_CODES, DataValidationError, PersoncarError, TemporaryError
    from tasks.k8s import base_exit_code, error_line, retry_may_pass
    from tasks.storage import StorageError
    from tasks.train import OutOfMemoryError

    assert [e.exit_code for e in (PersoncarError, OutOfMemoryError, DataValidationError, TemporaryError,
                                  StorageError)] == [2, 3, 1, 75, 75]
    assert NO_RETRY_EXIT_CODES == (2, 3)
    pod = NS(status=NS(container_statuses=[NS(name="side", state=NS(terminated=NS(exit_code=0))),
                                           NS(name="base", state=NS(terminated=NS(exit_code=3)))]))
    assert base_exit_code(pod, "base") == 3 and base_exit_code(NS(status=None), "base") is None
    running = NS(status=NS(container_statuses=[NS(name="base", state=NS(terminated=None))]))
    assert base_exit_code(running, "base") is None
    text = ("Pod train-abc returned a failure.\n2026 INFO personcar: train: step 3\n'personcar train: error: out of "
            "accelerator memory at batch_size 8 per GPU x 1 replica(s), 640x640 inputs: lower batch_size'")
    assert error_line(text, 3) == ("personcar train: error: out of accelerator memory at batch_size 8 per GPU x 1 "
                                   "replica(s), 640x640 inputs: lower batch_size")
    assert error_line("Pod train-abc returned a failure.", 2) == "Pod train-abc returned a failure. (exit 2)"
    refused = "Pod tfrecords-abc returned a failure.\n'personcar tfrecords: error: a.json: refused by the validation rules'"
    crash = "Pod tfrecords-abc returned a failure.\nTraceback (most recent call last):\nKeyError: 'images'"
    assert [retry_may_pass(code, text) for code, text in (
        (2, crash), (3, crash), (1, refused), (1, crash), (75, refused), (None, crash), (137, crash))] == [
        False, False, False, True, True, True, True]


def test_a_killed_task_deletes_its_pod_and_the_kubelet_stops_the_container(kube: Cluster, kubeconfig: Path) -> None:
    op, context = build_task(kubeconfig, "train", train_args(f"s3://{BUCKET}/killed/train", 1000))
    task = start_task(op, context)
    run = wait_until(lambda: next(iter(kube.runs.values()), None), timeout=60, what="the pod is created")
    assert run.started.wait(60), "the container did not start"
    op.on_kill()  # what Airflow calls when the task is marked failed or times out
    assert run.finished.wait(30), "the container was not stopped"
    wait([task], timeout=60)
    assert run.exit_code == 128 + signal.SIGTERM  # stopped by the deletion's SIGTERM, within its grace period
    assert [d.name for d in kube.requests("DELETE")] == [run.name] and kube.pod(run.name) is None


# -- faults while training -------------------------------------------------------------------------
def _worker_main() -> None:
    """A worker process running one try of a train task (killed by the test)."""
    spec = json.loads(sys.argv[1])
    op, context = build_task(spec["kubeconfig"], "train", spec["arguments"], try_number=spec["try_number"])
    run_task(op, context)


@pytest.mark.slow
def test_worker_killed_while_training_the_retry_reattaches_to_the_running_pod(
        kube: Cluster, kubeconfig: Path, s3: dict[str, Any], tmp_path: Path,
        capfd: pytest.CaptureFixture[str]) -> None:
    arguments = train_args(f"s3://{BUCKET}/reattach/train", 10, "--no-export")
    spec = {"kubeconfig": str(kubeconfig), "arguments": arguments, "try_number": 1}
    with open(tmp_path / "worker.log", "wb") as worker_log:
        worker = subprocess.Popen(
            [sys.executable, "-c", "from tests.integration.test_k8s_kmock import _worker_main; _worker_main()",
             json.dumps(spec)], cwd=REPO, stdout=worker_log, stderr=subprocess.STDOUT, env=os.environ.copy())
    try:
        # The worker created the pod and follows its log; the container has trained a step.
        run = wait_until(lambda: next(iter(kube.runs.values()), None), timeout=120, what="the pod is created")
        wait_until(lambda: kube.requests("GET", subresource="log"), timeout=120, what="the worker follows the log")
        wait_until(lambda: "train: step 1/10" in run.text(), timeout=300, what="the first training step")
        os.killpg(run.pid, signal.SIGSTOP)  # the container holds still while the worker dies: no race with its end
    finally:
        worker.kill()  # the worker dies; its pod does not
        worker.wait(30)
    assert not run.finished.is_set() and kube.pod(run.name)["status"]["phase"] == "Running"
    capfd.readouterr()
    os.killpg(run.pid, signal.SIGCONT)

    op, ti = run_train_task(kubeconfig, arguments, try_number=2)  # the retry

    assert len(kube.requests("POST")) == 1  # no second pod
    assert len(kube.runs) == 1 and run.exit_code == 0  # the one container trained to the end
    assert [r.name for r in kube.requests("GET", subresource="log")] == [run.name, run.name]
    logged = _task_log(capfd)
    assert f"Reusing existing pod '{run.name}'" in logged
    assert "[base] " in logged and "train: step 10/10 loss" in logged
    summary = read_json(s3, "reattach/train/train_summary.json")
    assert (summary["start_step"], summary["steps"]) == (0, 10)  # one training from step 0, not restarted
    assert [d.name for d in kube.requests("DELETE")] == [run.name]
    assert ti.xcoms == {"pod_name": run.name, "pod_namespace": NAMESPACE}


def _last_complete_checkpoint(s3: dict[str, Any], prefix: str) -> int | None:
    """The step of the model folder's latest checkpoint in S3 when all its files are there."""
    import re

    names = set(keys(s3, prefix))
    if "checkpoint" not in names:
        return None
    state = s3["client"].get_object(Bucket=BUCKET, Key=prefix + "checkpoint")["Body"].read().decode()
    match = re.search(r'^model_checkpoint_path: "(ckpt-(\d+))"', state, re.M)
    if not match or not {f"{match[1]}.index", f"{match[1]}.data-00000-of-00001"} <= names:
        return None
    return int(match[2])


@pytest.mark.slow
def test_node_lost_while_training_the_retry_resumes_from_the_last_checkpoint_in_s3(
        kube: Cluster, kubeconfig: Path, s3: dict[str, Any], capfd: pytest.CaptureFixture[str]) -> None:
    from airflow.exceptions import AirflowException

    arguments = train_args(f"s3://{BUCKET}/node-lost/train", 10, "--checkpoint-every", "2", "--no-export")
    op, context = build_task(kubeconfig, "train", arguments, deferrable=True)
    first_try = start_task(op, context)
    step = wait_until(lambda: _last_complete_checkpoint(s3, "node-lost/train/"), timeout=600,
                      what="a checkpoint in S3", interval=0.05)
    first = next(iter(kube.runs.values()))
    kube.lose_node(first.name)
    wait([first_try], timeout=120)
    assert first_try.done() and isinstance(first_try.exception(), AirflowException), first_try
    assert first.exit_code == 128 + signal.SIGKILL and "train: done" not in first.text()
    assert f"{first.name}" in str(first_try.exception())
    resumable = _last_complete_checkpoint(s3, "node-lost/train/")
    assert resumable is not None and step <= resumable < 10

    op, context = build_task(kubeconfig, "train", arguments, deferrable=True, try_number=2)  # the retry
    run_task(op, context)

    posts = kube.requests("POST")
    assert len(posts) == 2 and posts[1].data["metadata"]["labels"]["try_number"] == "2"
    second = kube.runs[NAMESPACE, posts[1].data["metadata"]["name"]]
    assert second.exit_code == 0
    assert "train: resuming from" in second.text() and f"(step {resumable} of 10)" in second.text()
    summary = read_json(s3, "node-lost/train/train_summary.json")
    assert summary["start_step"] == resumable > 0 and summary["steps"] == 10
    assert summary["trained_steps"] == 10 - resumable
