"""The production storage path: the whole DAG with its artifact root and publish destination on S3.

A real S3 endpoint (moto's server over HTTP on loopback); the worker tasks stage their run folder
through it, as they do in production where the trainer pods share the run only through S3.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import boto3
import pytest

from tests.e2e.test_dag_run import DATE, REPO, TASKS, airflow, json_out

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def s3_run(tmp_path_factory: pytest.TempPathFactory, s3_server: str) -> dict:
    from tasks.sample import make_sample

    root = tmp_path_factory.mktemp("e2e-s3")
    make_sample(root / "sample", images=10, seed=4, archive=root / "trainval.tar.gz")
    creds = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1", aws_access_key_id="testing",
                      aws_secret_access_key="testing")
    s3.create_bucket(Bucket="personcar-artifacts")
    s3.upload_file(str(root / "trainval.tar.gz"), "personcar-artifacts", "datasets/trainval.tar.gz")
    env = {
        **os.environ, **creds,
        "AIRFLOW_HOME": str(root / "airflow"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "PERSONCAR_ARTIFACT_ROOT": "s3://personcar-artifacts/runs",
        "PERSONCAR_S3_ENDPOINT_URL": s3_server,
        "PERSONCAR_CACHE_DIR": str(root / "cache"),
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }
    conf = {"dataset_source": "s3://personcar-artifacts/datasets/trainval.tar.gz",
            "model": "ssd_resnet26_v1_fpn_256x256_tiny", "steps": 2, "batch_size": 2, "val_fraction": 0.3,
            "publish_dest": "s3://personcar-artifacts/published"}
    assert airflow(env, "db", "migrate").returncode == 0
    run = airflow(env, "dags", "test", "personcar_detection", DATE, "--conf", json.dumps(conf))
    (root / "dags-test.log").write_text(run.stdout + run.stderr)
    run_id = json_out(airflow(env, "dags", "list-runs", "personcar_detection", "--output", "json"))[0]["run_id"]
    states = json_out(airflow(env, "tasks", "states-for-dag-run", "personcar_detection", run_id, "--output", "json"))
    keys = sorted(o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket="personcar-artifacts")
                  for o in page.get("Contents", []))
    from tasks.dag_tasks import run_key

    return {"run": run, "states": states, "keys": keys, "key": run_key(run_id), "s3": s3, "root": root}


def test_every_task_succeeds_with_s3_storage(s3_run: dict) -> None:
    assert s3_run["run"].returncode == 0, (s3_run["run"].stdout + s3_run["run"].stderr)[-4000:]
    assert {r["task_id"]: r["state"] for r in s3_run["states"]} == dict.fromkeys(TASKS, "success")


def test_every_stage_lands_in_the_bucket(s3_run: dict) -> None:
    prefix = f"runs/{s3_run['key']}/"
    stages = {k[len(prefix):].split("/")[0] for k in s3_run["keys"] if k.startswith(prefix)}
    assert stages == {"download", "validate", "tfrecords", "train", "evaluate", "report", "config.json"}
    for key in ("validate/annotations.clean.json", "tfrecords/val.coco.json", "train/exported/saved_model.pb",
                "evaluate/metrics.json", "report/report.html"):
        assert prefix + key in s3_run["keys"]
    assert not (Path(s3_run["root"]) / "runs").exists()  # nothing written to a local artifact root


def test_report_is_published_to_s3_with_content_types(s3_run: dict) -> None:
    s3, key = s3_run["s3"], s3_run["key"]
    head = s3.head_object(Bucket="personcar-artifacts", Key=f"published/{key}/report.html")
    assert head["ContentType"].startswith("text/html")
    index = json.loads(s3.get_object(Bucket="personcar-artifacts", Key="published/runs.json")["Body"].read())
    assert [e["run_id"] for e in index] == [key]
    # the val images were staged for the report: its detection grid was drawn
    assert f"runs/{key}/report/sample_detections.png" in s3_run["keys"]
