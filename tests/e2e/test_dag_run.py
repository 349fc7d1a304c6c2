"""End to end: the whole DAG run locally by Airflow (`airflow dags test`) on a generated sample.

Real Airflow metadata DB (SQLite in a temp AIRFLOW_HOME), real task runs in the local backend,
the sample archive fed through the production download path (a file:// source).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
TASKS = ["download_dataset", "validate_annotations", "build_tfrecords", "train", "evaluate", "publish_report"]
DATE = "2026-01-05"

pytestmark = pytest.mark.slow


def airflow(env: dict[str, str], *args: str, timeout: int = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "airflow"), *args], env=env, capture_output=True, text=True, timeout=timeout)


def json_out(proc: subprocess.CompletedProcess[str]) -> list | dict:
    """The JSON document of an ``airflow ... --output json`` command (warnings may precede it)."""
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith(("[", "{")))
    return json.loads(line)


def airflow_env(root: Path) -> dict[str, str]:
    """Airflow with its SQLite metadata DB under ``root/airflow``, this checkout's DAGs and plugins,
    run folders under ``root/runs``, the local backend."""
    return {
        **os.environ,
        "AIRFLOW_HOME": str(root / "airflow"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "PERSONCAR_ARTIFACT_ROOT": str(root / "runs"),
        "PERSONCAR_EXECUTION_BACKEND": "local",
        "PERSONCAR_CACHE_DIR": str(root / "cache"),
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }


@pytest.fixture(scope="module")
def dag_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from tasks.sample import make_sample

    root = tmp_path_factory.mktemp("e2e")
    make_sample(root / "sample", images=16, seed=3, archive=root / "trainval.tar.gz")
    env = airflow_env(root)
    conf = {
        "dataset_source": (root / "trainval.tar.gz").as_uri(),
        "model": "ssd_resnet26_v1_fpn_256x256_tiny",
        "steps": 6,
        "batch_size": 2,
        "val_fraction": 0.25,
        "publish_dest": (root / "published").as_uri(),
    }
    migrate = airflow(env, "db", "migrate")
    assert migrate.returncode == 0, migrate.stderr[-2000:]
    run = airflow(env, "dags", "test", "personcar_detection", DATE, "--conf", json.dumps(conf))
    (root / "dags-test.log").write_text(run.stdout + run.stderr)
    runs = json_out(airflow(env, "dags", "list-runs", "personcar_detection", "--output", "json"))
    assert len(runs) == 1, runs
    run_id = runs[0]["run_id"]
    states = airflow(env, "tasks", "states-for-dag-run", "personcar_detection", run_id, "--output", "json")
    from tasks.dag_tasks import run_key

    return {"root": root, "env": env, "run": run, "states": states, "run_id": run_id,
            "run_dir": root / "runs" / run_key(run_id)}


def test_every_task_succeeds(dag_run: dict) -> None:
    assert dag_run["run"].returncode == 0, (dag_run["run"].stdout + dag_run["run"].stderr)[-4000:]
    states = {row["task_id"]: row["state"] for row in json_out(dag_run["states"])}
    assert states == dict.fromkeys(TASKS, "success"), states


def test_run_folder_has_every_stage_output(dag_run: dict) -> None:
    run = dag_run["run_dir"]
    assert sorted(p.name for p in run.iterdir() if p.is_dir()) == sorted(
        ["download", "validate", "tfrecords", "train", "evaluate", "report"])
    assert (run / "download" / "trainval" / "annotations" / "bbox-annotations.json").is_file()
    assert json.loads((run / "validate" / "validation.json").read_text())["success"] is True
    assert (run / "validate" / "data_docs" / "index.html").is_file()
    assert list((run / "tfrecords").glob("train-*.tfrecord")) and (run / "tfrecords" / "val.coco.json").is_file()
    assert (run / "train" / "exported" / "saved_model.pb").is_file()
    assert json.loads((run / "train" / "train_summary.json").read_text())["steps"] == 6
    assert not [p for p in run.rglob(".*") if ".tmp" in p.name]  # no temp leftovers


def test_metrics_use_the_od_api_names(dag_run: dict) -> None:
    metrics = json.loads((dag_run["run_dir"] / "evaluate" / "metrics.json").read_text())
    for name in ("DetectionBoxes_Precision/mAP", "DetectionBoxes_Precision/mAP@.50IOU",
                 "DetectionBoxes_Precision/mAP@.75IOU", "DetectionBoxes_Precision/mAP (large)",
                 "DetectionBoxes_Recall/AR@100", "DetectionBoxes_PerformanceByCategory/mAP/person",
                 "DetectionBoxes_PerformanceByCategory/mAP/car"):
        assert name in metrics and -1.0 <= metrics[name] <= 1.0


def test_report_is_built_and_published(dag_run: dict) -> None:
    report = dag_run["run_dir"] / "report" / "report.html"
    assert report.is_file() and "mAP@.50IOU" in report.read_text()
    index = json.loads((dag_run["root"] / "published" / "runs.json").read_text())
    assert [e["run_id"] for e in index] == [dag_run["run_dir"].name]
    assert (dag_run["root"] / "published" / dag_run["run_dir"].name / "report.html").is_file()


def test_a_single_task_reruns_with_airflow_tasks_test_and_replaces_its_outputs(dag_run: dict) -> None:
    run = dag_run["run_dir"]
    before = sorted(p.relative_to(run).as_posix() for p in (run / "evaluate").rglob("*"))
    metrics_before = json.loads((run / "evaluate" / "metrics.json").read_text())
    again = airflow(dag_run["env"], "tasks", "test", "personcar_detection", "evaluate", DATE)
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    assert sorted(p.relative_to(run).as_posix() for p in (run / "evaluate").rglob("*")) == before
    assert json.loads((run / "evaluate" / "metrics.json").read_text()) == metrics_before


def test_a_user_error_fails_its_task_at_once_without_the_retries(dag_run: dict) -> None:
    """download_dataset retries network failures 3 times (1, 2, 4 minutes apart); an archive that
    can never pass (a member escaping the folder) fails the task on its first try, and the run with it."""
    import tarfile

    root, date = dag_run["root"], "2026-01-12"
    hostile = root / "hostile.tar.gz"
    with tarfile.open(hostile, "w:gz") as tar:
        data = root / "payload.txt"
        data.write_text("x")
        tar.add(data, arcname="trainval/../../escape.txt")
    conf = {"dataset_source": hostile.as_uri(), "publish_dest": (root / "published").as_uri()}
    run = airflow(dag_run["env"], "dags", "test", "personcar_detection", date, "--conf", json.dumps(conf), timeout=600)
    out = run.stdout + run.stderr
    assert run.returncode != 0, out[-3000:]
    error = "unsafe archive member 'trainval/../../escape.txt' in hostile.tar.gz: "
    assert error in out, out[-3000:]
    assert "up_for_retry" not in out.lower() and "AirflowFailException" in out, out[-3000:]
    runs = json_out(airflow(dag_run["env"], "dags", "list-runs", "personcar_detection", "--output", "json"))
    failed = next(r for r in runs if r["logical_date"].startswith(date))
    assert failed["state"] == "failed"
    rows = json_out(airflow(dag_run["env"], "tasks", "states-for-dag-run", "personcar_detection", failed["run_id"],
                            "--output", "json"))
    states = {row["task_id"]: row["state"] for row in rows}
    assert states == {"download_dataset": "failed", **dict.fromkeys(TASKS[1:], "upstream_failed")}, states
    assert not (root / "escape.txt").exists() and not (root / "runs" / "escape.txt").exists()
