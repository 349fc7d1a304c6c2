"""End to end: the backbone sweep on the ``kubernetes`` backend, its run folder on S3.

The set-up of tests/e2e/test_dag_run_s3.py: moto's S3 server over HTTP, an emulated one-node cluster
(``tests/kubelet.py``) whose kubelet runs each pod's command in the project's environment, with the
credentials of the ``personcar-aws`` Secret the pod templates name. ``airflow dags test`` runs
``personcar_backbone_sweep`` with two tiny candidates and one that fails: TFRecords, each candidate's train and
evaluate (mapped pods, which find their candidate by the map index in their templated arguments)
and the compare run as pods, and share the run with the worker only through the bucket. Every pod
the operator submitted must be valid Kubernetes (strict schema).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from tests.e2e.test_dag_run_s3 import BUCKET, CONF, emulated_cluster, objects, read_json, run_dag, sample_bucket
from tests.e2e.test_sweep_run import TINY

pytestmark = pytest.mark.slow
DAG_ID = "personcar_backbone_sweep"
CANDIDATES = [{"name": "tiny_a", **TINY, "steps": 2}, {"name": "tiny_b", **TINY, "steps": 3, "seed": 7},
              # fails in its train pod (exit 2, a start checkpoint that is not there): no retry, reported
              {"name": "broken", **TINY, "steps": 2, "init_checkpoint": "/nonexistent/personcar/ckpt-1"}]
GOOD = CANDIDATES[:2]
K8S_VERSIONS = ["1.33", "1.30"]  # as tests/unit/test_k8s_pod.py


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory, s3_server: str) -> Iterator[dict[str, Any]]:
    bucket = sample_bucket(tmp_path_factory.mktemp("sweep-k8s"), s3_server)
    conf = {"dataset_source": CONF["dataset_source"], "batch_size": 2, "val_fraction": 0.3, "candidates": CANDIDATES}
    with emulated_cluster(bucket["root"] / "sweep-k8s", s3_server) as (cluster, k8s_env):
        result = run_dag(bucket, "sweep-k8s", dag_id=DAG_ID, conf=conf, **k8s_env)
        yield {**result, "s3": bucket["s3"], "cluster": cluster, "endpoint": s3_server,
               "prefix": f"s3://{BUCKET}/sweep-k8s/runs/{result['key']}"}


def _log(sweep: dict[str, Any]) -> str:
    return (sweep["run"].stdout + sweep["run"].stderr)[-4000:]


def test_the_tasks_ran_with_the_tensorflow_stages_as_pods_and_the_failed_candidate_once(sweep: dict) -> None:
    assert sweep["run"].returncode == 0, _log(sweep)
    states = sorted((r["task_id"], r["state"]) for r in sweep["states"])  # one row per mapped instance
    assert sorted({task for task, _ in states}) == [
        "build_tfrecords", "candidate.evaluate", "candidate.train", "compare", "download_dataset",
        "list_candidates", "publish_sweep", "validate_annotations"]
    assert [(t, st) for t, st in states if t.startswith("candidate.")] == [
        ("candidate.evaluate", "success"), ("candidate.evaluate", "success"), ("candidate.evaluate", "upstream_failed"),
        ("candidate.train", "failed"), ("candidate.train", "success"), ("candidate.train", "success")], states
    assert {st for t, st in states if not t.startswith("candidate.")} == {"success"}, states
    runs = sorted(sweep["cluster"].runs.values(), key=lambda r: r.argv[1:])
    assert sorted((r.argv[1], r.exit_code) for r in runs) == [
        ("compare", 0), ("evaluate", 0), ("evaluate", 0), ("tfrecords", 0), ("train", 0), ("train", 0), ("train", 2)]
    assert len(sweep["cluster"].requests("POST")) == 7  # one pod each: the failed training was not retried
    broken = next(r for r in runs if r.exit_code == 2)
    assert broken.text().strip().splitlines()[-1] == (
        "personcar train: error: init checkpoint /nonexistent/personcar/ckpt-1: no such file or folder")
    failure = read_json(sweep["s3"], f"sweep-k8s/runs/{sweep['key']}/candidates/broken/failure.json")
    assert failure["stage"] == "train" and failure["try_number"] == 1  # the candidate's on_failure_callback
    assert failure["error"] == "personcar train: error: init checkpoint /nonexistent/personcar/ckpt-1: no such file or folder"


def test_each_mapped_pod_got_its_own_candidate(sweep: dict) -> None:
    prefix = sweep["prefix"]
    by_dir = {}
    for r in sweep["cluster"].runs.values():
        if r.argv[1] in ("train", "evaluate"):
            by_dir[(r.argv[1], r.argv[r.argv.index("--model-dir") + 1])] = r
    assert sorted(by_dir) == sorted([("train", f"{prefix}/candidates/broken/train")] + [
        (stage, f"{prefix}/candidates/{c['name']}/train") for stage in ("train", "evaluate") for c in GOOD])
    for c in GOOD:
        train = by_dir[("train", f"{prefix}/candidates/{c['name']}/train")]
        config = json.loads(train.argv[train.argv.index("--run-config") + 1])
        assert (config["model"], config["image_size"], config["steps"]) == (TINY["model"], TINY["image_size"], c["steps"])
        assert config.get("seed", 42) == c.get("seed", 42) and config["warm_start"] == "none"
        assert train.argv[train.argv.index("--data") + 1] == f"{prefix}/tfrecords"
        assert f"INFO personcar: train: step {c['steps']}/{c['steps']}" in train.text()
        summary = read_json(sweep["s3"], f"sweep-k8s/runs/{sweep['key']}/candidates/{c['name']}/train/train_summary.json")
        assert summary["steps"] == c["steps"]
        evaluate = by_dir[("evaluate", f"{prefix}/candidates/{c['name']}/train")]
        assert evaluate.argv[-2:] == ["--out", f"{prefix}/candidates/{c['name']}/evaluate"]
    # credentials from the Secret, not the worker's environment
    assert {r.env["AWS_ENDPOINT_URL_S3"] for r in sweep["cluster"].runs.values()} == {sweep["endpoint"]}


def test_every_submitted_pod_is_valid_kubernetes(sweep: dict) -> None:
    import kubernetes_validate

    posts = sweep["cluster"].requests("POST")
    assert posts
    for post in posts:
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(post.data, version, strict=True)
    gpus = {p.data["spec"]["containers"][0]["args"][0]:
            p.data["spec"]["containers"][0].get("resources", {}).get("limits", {}).get("nvidia.com/gpu")
            for p in posts}
    assert gpus["tfrecords"] is None and {gpus[s] for s in ("train", "evaluate", "compare")} == {"1"}


def test_the_compare_pod_ranks_both_and_the_sweep_is_published(sweep: dict) -> None:
    key, s3 = sweep["key"], sweep["s3"]
    doc = read_json(s3, f"sweep-k8s/runs/{key}/compare/sweep.json")
    assert sorted(doc["ranking"]) == ["tiny_a", "tiny_b"] and doc["failed"] == ["broken"]
    assert doc["recommendation"]["name"] in ("tiny_a", "tiny_b") and doc["recommendation"]["reason"]
    assert all(c["latency"]["median_ms"] > 0 for c in doc["candidates"] if c["name"] != "broken")
    assert doc["machine"]["images_from"] == f"{sweep['prefix']}/tfrecords"
    entries = read_json(s3, "sweep-k8s/published/sweeps.json")
    assert [e["sweep_id"] for e in entries] == [key] and entries[0]["recommended"] == doc["recommendation"]["name"]
    assert entries[0]["failed"] == ["broken"]
    published = objects(s3, f"sweep-k8s/published/sweeps/{key}/")
    assert {"report.html", "report.md", "sweep.json"} <= set(published)
    assert not [f for f in sweep["files"] if f.startswith(("train/", "evaluate/"))]  # only the candidates trained
