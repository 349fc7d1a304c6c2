"""The production path: the whole DAG with its artifact root and publish destination on S3, on both
execution backends.

A real S3 endpoint (moto's server over HTTP on loopback). With the ``local`` backend every stage
runs in the worker and stages its run folder through the bucket. With the ``kubernetes`` backend
download, validation and publishing run in the worker and TFRecords, training and evaluation run as
pods of the trainer's command on an emulated one-node cluster (``tests/kubelet.py``: kmock's API
over HTTP and a kubelet that runs each pod's command, arguments and environment as the API holds
them, in the project's environment); the pods share the run with the worker only through S3,
with the credentials of the ``personcar-aws`` Secret the pod templates name. With
``PERSONCAR_KUBELET_IMAGE`` set (``make image-check`` does it with the image it built) the pods run
in that image instead, under buildah. Both runs train the
same sample with the same seed (without augmentation), so their run folders must hold the same files,
the same weights and the same metrics.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest

from tests.e2e.test_dag_run import DATE, TASKS, airflow, airflow_env, json_out

pytestmark = pytest.mark.slow

BUCKET = "personcar-artifacts"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
CONF = {"dataset_source": f"s3://{BUCKET}/datasets/trainval.tar.gz", "model": "ssd_resnet26_v1_fpn_256x256_tiny",
        # no augmentation: its random flips and scales are drawn in tf.data's parallel map, in scheduling
        # order, so only without it do two runs of one seed train bit-identical weights
        "steps": 2, "batch_size": 2, "val_fraction": 0.3, "augment": False}
POD_STAGES = ["build_tfrecords", "train", "evaluate"]


def sample_bucket(root: Path, endpoint: str) -> dict[str, Any]:
    """The bucket on moto's server, with the generated sample's archive where ``CONF``'s
    ``dataset_source`` points; what :func:`run_dag` takes."""
    from tasks.sample import make_sample

    make_sample(root / "sample", images=10, seed=4, archive=root / "trainval.tar.gz")
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                      aws_access_key_id="testing", aws_secret_access_key="testing")
    s3.create_bucket(Bucket=BUCKET)
    s3.upload_file(str(root / "trainval.tar.gz"), BUCKET, "datasets/trainval.tar.gz")
    return {"s3": s3, "endpoint": endpoint, "root": root}


@contextlib.contextmanager
def emulated_cluster(root: Path, endpoint: str, **cluster: Any) -> Iterator[tuple[Any, dict[str, str]]]:
    """The one-node cluster (``tests/kubelet.py``) with the ``personcar-aws`` Secret the pod templates
    name; yields it and the worker's environment for the ``kubernetes`` backend. Checked at the end."""
    from tests.kubelet import Cluster

    root.mkdir(parents=True, exist_ok=True)
    with Cluster(root / "node", namespace="personcar", gpus=1, grace_seconds=5, **cluster) as kube:
        kube.create_secret("personcar-aws", {
            "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_ENDPOINT_URL_S3": endpoint})
        config = kube.kubeconfig(root / "kubeconfig", context="kmock")
        yield kube, {"PERSONCAR_EXECUTION_BACKEND": "kubernetes", "PERSONCAR_K8S_CONFIG_FILE": str(config),
                     "PERSONCAR_K8S_CONTEXT": "kmock", "PERSONCAR_K8S_IN_CLUSTER": "false", "PERSONCAR_K8S_CONN_ID": ""}
        kube.check()


@pytest.fixture(scope="module")
def bucket(tmp_path_factory: pytest.TempPathFactory, s3_server: str) -> dict[str, Any]:
    return sample_bucket(tmp_path_factory.mktemp("e2e-s3"), s3_server)


def objects(s3: Any, prefix: str) -> dict[str, str]:
    """Key (below ``prefix``) -> ETag of every object under ``prefix``."""
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return {o["Key"][len(prefix):]: o["ETag"] for page in pages for o in page.get("Contents", [])}


def read_json(s3: Any, key: str) -> Any:
    return json.loads(s3.get_object(Bucket=BUCKET, Key=key)["Body"].read())


def run_dag(bucket: dict[str, Any], name: str, *, dag_id: str = "personcar_detection", conf: dict[str, Any] = CONF,
            **env: str) -> dict[str, Any]:
    """``airflow dags test`` of ``dag_id`` with ``conf``, its run folders under ``s3://<bucket>/<name>/runs``
    and its reports published to ``.../<name>/published``; ``env`` adds to the worker's environment."""
    root = bucket["root"] / name
    env = {**airflow_env(root), **CREDENTIALS, "PERSONCAR_ARTIFACT_ROOT": f"s3://{BUCKET}/{name}/runs",
           "PERSONCAR_S3_ENDPOINT_URL": bucket["endpoint"], **env}
    conf = {**conf, "publish_dest": f"s3://{BUCKET}/{name}/published"}
    assert airflow(env, "db", "migrate").returncode == 0
    run = airflow(env, "dags", "test", dag_id, DATE, "--conf", json.dumps(conf))
    (root / "dags-test.log").write_text(run.stdout + run.stderr)
    run_id = json_out(airflow(env, "dags", "list-runs", dag_id, "--output", "json"))[0]["run_id"]
    states = json_out(airflow(env, "tasks", "states-for-dag-run", dag_id, run_id, "--output", "json"))
    from tasks.dag_tasks import run_key

    key = run_key(run_id)
    return {"run": run, "states": states, "key": key, "name": name, "root": root,
            "files": sorted(objects(bucket["s3"], f"{name}/runs/{key}/"))}


@pytest.fixture(scope="module")
def local_run(bucket: dict[str, Any]) -> dict[str, Any]:
    return run_dag(bucket, "local", PERSONCAR_EXECUTION_BACKEND="local")


@pytest.fixture(scope="module")
def k8s_run(bucket: dict[str, Any]) -> Iterator[dict[str, Any]]:
    image = os.environ.get("PERSONCAR_KUBELET_IMAGE")  # run the pods in this local image (make image-check)
    in_image = {"PERSONCAR_K8S_IMAGE": image} if image else {}
    with emulated_cluster(bucket["root"] / "kubernetes", bucket["endpoint"],
                          runtime="buildah" if image else "venv") as (cluster, k8s_env):
        result = run_dag(bucket, "kubernetes", **k8s_env, **in_image)
        yield {**result, "cluster": cluster, "endpoint": bucket["endpoint"]}


def untimed(files: list[str]) -> list[str]:
    """The file list with the time stamps in the names of Great Expectations' validation pages and
    TensorBoard's event files (time, host, process) made equal."""
    return sorted(re.sub(r"events\.out\.tfevents\..+$", "events.out.tfevents.<time>",
                         re.sub(r"/\d{8}T\d{6}\.\d+Z/", "/<time>/", f)) for f in files)


def failure(run: dict[str, Any]) -> str:
    return (run["run"].stdout + run["run"].stderr)[-4000:]


# -- local backend -------------------------------------------------------------------------------
def test_every_task_succeeds_with_s3_storage(local_run: dict) -> None:
    assert local_run["run"].returncode == 0, failure(local_run)
    assert {r["task_id"]: r["state"] for r in local_run["states"]} == dict.fromkeys(TASKS, "success")


def test_every_stage_lands_in_the_bucket(local_run: dict) -> None:
    stages = {f.split("/")[0] for f in local_run["files"]}
    assert stages == {"download", "validate", "tfrecords", "train", "evaluate", "report", "config.json"}
    for key in ("validate/annotations.clean.json", "tfrecords/val.coco.json", "train/exported/saved_model.pb",
                "evaluate/metrics.json", "report/report.html"):
        assert key in local_run["files"]
    assert not (local_run["root"] / "runs").exists()  # nothing written to a local artifact root


def test_report_is_published_to_s3_with_content_types(bucket: dict, local_run: dict) -> None:
    s3, key = bucket["s3"], local_run["key"]
    head = s3.head_object(Bucket=BUCKET, Key=f"local/published/{key}/report.html")
    assert head["ContentType"].startswith("text/html")
    assert [e["run_id"] for e in read_json(s3, "local/published/runs.json")] == [key]
    # the val images were staged for the report: its detection grid was drawn
    assert "report/sample_detections.png" in local_run["files"]


# -- kubernetes backend --------------------------------------------------------------------------
def test_kubernetes_backend_runs_every_task_once(k8s_run: dict) -> None:
    assert k8s_run["run"].returncode == 0, failure(k8s_run)
    assert {r["task_id"]: r["state"] for r in k8s_run["states"]} == dict.fromkeys(TASKS, "success")
    # once each: first tries, and no earlier try in the metadata DB's history
    with contextlib.closing(sqlite3.connect(k8s_run["root"] / "airflow" / "airflow.db")) as db:
        assert dict(db.execute("select task_id, try_number from task_instance")) == dict.fromkeys(TASKS, 1)
        assert db.execute("select count(*) from task_instance_history").fetchone() == (0,)
    assert len(k8s_run["cluster"].requests("POST")) == len(POD_STAGES)  # one pod per pod stage


def test_the_tensorflow_stages_ran_as_pods_of_the_trainer_command(k8s_run: dict) -> None:
    runs = sorted(k8s_run["cluster"].runs.values(), key=lambda r: r.name)
    assert [(r.name.rsplit("-", 1)[0], r.exit_code) for r in runs] == [
        ("build-tfrecords", 0), ("evaluate", 0), ("train", 0)]
    by_stage = {r.name.rsplit("-", 1)[0]: r for r in runs}
    prefix = f"s3://{BUCKET}/kubernetes/runs/{k8s_run['key']}"
    assert by_stage["train"].argv[:6] == ["personcar", "train", "--data", f"{prefix}/tfrecords",
                                         "--model-dir", f"{prefix}/train"]
    assert by_stage["evaluate"].argv[-2:] == ["--out", f"{prefix}/evaluate"]
    # the pods' S3 credentials came from the Secret, not from the worker's environment
    assert {r.env["AWS_ENDPOINT_URL_S3"] for r in runs} == {k8s_run["endpoint"]}
    assert not {"PERSONCAR_ARTIFACT_ROOT", "PERSONCAR_S3_ENDPOINT_URL"} & set(by_stage["train"].env)
    # each pod's real log reached the task log
    log = k8s_run["run"].stdout + k8s_run["run"].stderr
    assert "INFO personcar: train: step 2/2" in by_stage["train"].text()
    assert "mAP@.50IOU" in by_stage["evaluate"].text()
    assert by_stage["evaluate"].text().strip().splitlines()[-1].strip() in log


def test_kubernetes_run_folder_matches_the_local_run(bucket: dict, local_run: dict, k8s_run: dict) -> None:
    assert local_run["run"].returncode == 0 and k8s_run["run"].returncode == 0
    assert untimed(k8s_run["files"]) == untimed(local_run["files"])
    weights = [objects(bucket["s3"], f"{r['name']}/runs/{r['key']}/train/exported/variables/")
               for r in (local_run, k8s_run)]
    assert weights[0] and weights[0] == weights[1]  # the same trained weights (ETags)
    local, k8s = (read_json(bucket["s3"], f"{r['name']}/runs/{r['key']}/evaluate/metrics.json")
                  for r in (local_run, k8s_run))
    assert k8s == local
    assert [e["run_id"] for e in read_json(bucket["s3"], "kubernetes/published/runs.json")] == [k8s_run["key"]]

