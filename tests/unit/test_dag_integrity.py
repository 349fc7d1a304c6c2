"""DAG integrity: every DAG loads cleanly and fast; the main DAG's six tasks in order, params, retries;
the backbone sweep's mapped candidates and trigger rule; no heavy imports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DAG_IDS = ["personcar_backbone_sweep", "personcar_detection"]
TASK_ORDER = ["download_dataset", "validate_annotations", "build_tfrecords", "train", "evaluate", "publish_report"]

PROBE = r"""
import json, sys, time
t0 = time.perf_counter()
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(dag_folder=sys.argv[1])
t1 = time.perf_counter()
dag = bag.dags.get("personcar_detection")
order, left = [], {t.task_id: set(t.upstream_task_ids) for t in dag.tasks} if dag else {}
while left:  # topological order (unique: every task depends on the one before it)
    ready = sorted(t for t, up in left.items() if not up - set(order))
    order.append(ready[0])
    del left[ready[0]]
print(json.dumps({
    "errors": {k: str(v) for k, v in bag.import_errors.items()},
    "dags": sorted(bag.dag_ids),
    "order": order,
    "tags": sorted(dag.tags),
    "schedule": getattr(getattr(dag.timetable, "timetable", dag.timetable), "_expression", None),
    "timetable": type(dag.timetable).__name__,
    "inner_timetable": type(getattr(dag.timetable, "timetable", dag.timetable)).__name__,
    "assets": sorted(a.name for a in dag.timetable.asset_condition.objects)
              if hasattr(dag.timetable, "asset_condition") else [],
    "upstream": {t.task_id: sorted(t.upstream_task_ids) for t in dag.tasks},
    "outlets": {t.task_id: sorted(a.name for a in t.outlets) for t in dag.tasks},
    "catchup": dag.catchup,
    "max_active_runs": dag.max_active_runs,
    "retries": {t.task_id: t.retries for t in dag.tasks},
    "params": {k: dag.params.get_param(k).schema for k in dag.params},
    "defaults": {k: dag.params.get_param(k).value for k in dag.params},
    "classes": {t.task_id: type(t).__name__ for t in dag.tasks},
    "heavy": sorted(m for m in ("tensorflow", "great_expectations", "official", "keras", "tf_keras") if m in sys.modules),
    "seconds": t1 - t0,
}))
"""


def load(backend: str = "local", probe: str = PROBE) -> dict:
    env = {**os.environ, "PERSONCAR_EXECUTION_BACKEND": backend, "AIRFLOW__CORE__LOAD_EXAMPLES": "False"}
    out = subprocess.run([sys.executable, "-c", probe, str(REPO / "dags")], capture_output=True, text=True,
                         env=env, check=True, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def dag_info() -> dict:
    return load()


def test_dag_folder_loads_without_errors(dag_info: dict) -> None:
    assert dag_info["errors"] == {}
    assert dag_info["dags"] == DAG_IDS


def test_six_tasks_in_order(dag_info: dict) -> None:
    assert dag_info["order"] == TASK_ORDER


def test_schedule_tags_and_concurrency(dag_info: dict) -> None:
    assert dag_info["tags"] and "personcar" in dag_info["tags"]
    assert dag_info["schedule"] == "0 3 * * 1" and "Cron" in dag_info["inner_timetable"]
    # data-aware retraining: the weekly cron, or an update of the source archive
    assert dag_info["timetable"] == "AssetOrTimeSchedule" and dag_info["assets"] == ["openimages_personcar_archive"]


def test_locations_flow_from_task_to_task_and_assets_show_lineage(dag_info: dict) -> None:
    up = dag_info["upstream"]
    assert up["build_tfrecords"] == ["download_dataset", "validate_annotations"]  # both of its inputs
    assert up["evaluate"] == ["build_tfrecords", "train"]
    assert set(up["publish_report"]) == {"download_dataset", "validate_annotations", "build_tfrecords", "train",
                                         "evaluate"}
    assert dag_info["outlets"]["download_dataset"] == ["personcar_dataset"]
    assert dag_info["outlets"]["publish_report"] == ["personcar_model"]
    assert dag_info["catchup"] is False and dag_info["max_active_runs"] == 1


def test_network_tasks_retry(dag_info: dict) -> None:
    assert dag_info["retries"]["download_dataset"] >= 2 and dag_info["retries"]["publish_report"] >= 2
    assert dag_info["retries"]["validate_annotations"] == 0  # a bad dataset does not heal on retry
    assert all(r >= 0 for r in dag_info["retries"].values())


def test_params_form_covers_the_run_config(dag_info: dict) -> None:
    from tasks.config import RunConfig, available_models

    params = dag_info["params"]
    assert set(params) == set(RunConfig.model_fields)
    assert params["steps"]["minimum"] == 1 and params["image_size"]["multipleOf"] == 128
    assert set(params["model"]["enum"]) == set(available_models())
    assert [b for b in params["backbone"]["enum"] if b] == ["resnet18", "resnet26", "resnet34", "resnet50", "resnet101", "resnet152"]
    defaults = dag_info["defaults"]
    assert defaults["init_checkpoint"] == "pretrained" and defaults["warm_start"] == "promoted"
    from tasks.config import RunConfig as Cfg

    assert Cfg.from_params(defaults) == Cfg()  # the form's defaults are the run config's
    assert all(p.get("title") for p in params.values())


def test_parsing_imports_no_tensorflow_or_great_expectations(dag_info: dict) -> None:
    assert dag_info["heavy"] == []
    print(f"DAG folder parse: {dag_info['seconds']:.3f} s")


def test_kubernetes_backend_runs_tensorflow_stages_as_pods() -> None:
    info = load("kubernetes")
    assert info["errors"] == {} and info["order"] == TASK_ORDER
    pods = {t for t, cls in info["classes"].items() if "Pod" in cls}
    assert pods == {"build_tfrecords", "train", "evaluate"}
    assert info["heavy"] == []


SWEEP_PROBE = r"""
import json, sys
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(dag_folder=sys.argv[1])
dag = bag.dags.get("personcar_backbone_sweep")
print(json.dumps({
    "errors": {k: str(v) for k, v in bag.import_errors.items()},
    "dags": sorted(bag.dag_ids),
    "tags": sorted(dag.tags),
    "timetable": type(dag.timetable).__name__,
    "max_active_runs": dag.max_active_runs,
    "upstream": {t.task_id: sorted(t.upstream_task_ids) for t in dag.tasks},
    "mapped": sorted(t.task_id for t in dag.tasks if t.get_closest_mapped_task_group() is not None
                     or type(t).__name__ == "MappedOperator"),
    "trigger_rules": {t.task_id: getattr(t.trigger_rule, "value", t.trigger_rule) for t in dag.tasks},
    "retries": {t.task_id: t.retries for t in dag.tasks},
    "classes": {t.task_id: type(t).__name__ for t in dag.tasks},
    "params": sorted(dag.params),
    "candidates": dag.params.get_param("candidates").value,
    "heavy": sorted(m for m in ("tensorflow", "great_expectations", "official", "keras", "tf_keras") if m in sys.modules),
}))
"""
SWEEP_TASKS = ["list_candidates", "download_dataset", "validate_annotations", "build_tfrecords", "candidate.train",
               "candidate.evaluate", "compare", "publish_sweep"]


@pytest.mark.parametrize("backend", ["local", "kubernetes"])
def test_sweep_maps_train_and_evaluate_over_the_candidates_then_compares(backend: str) -> None:
    from tasks.config import RunConfig
    from tasks.sweep import DEFAULT_CANDIDATES

    info = load(backend, SWEEP_PROBE)
    assert info["errors"] == {} and info["dags"] == DAG_IDS and info["heavy"] == []
    assert "personcar" in info["tags"] and info["timetable"] == "NullTimetable" and info["max_active_runs"] == 1
    up = info["upstream"]
    assert sorted(up) == sorted(SWEEP_TASKS)
    assert info["mapped"] == ["candidate.evaluate", "candidate.train"]
    assert {"build_tfrecords", "list_candidates"} <= set(up["candidate.train"])
    assert "candidate.train" in up["candidate.evaluate"] and "candidate.evaluate" in up["compare"]
    assert up["publish_sweep"] == ["compare"] and up["download_dataset"] == ["list_candidates"]
    # one failed candidate does not sink the others: compare runs once every candidate is done
    assert info["trigger_rules"] == {t: "all_done" if t == "compare" else "all_success" for t in SWEEP_TASKS}
    assert info["retries"]["download_dataset"] >= 2 and info["retries"]["publish_sweep"] >= 2
    assert info["retries"]["validate_annotations"] == 0 and info["retries"]["list_candidates"] == 0
    assert set(info["params"]) == set(RunConfig.model_fields) | {"candidates", "recommendation_margin",
                                                                 "promote_winner"}
    assert info["candidates"] == DEFAULT_CANDIDATES
    pods = {t for t, cls in info["classes"].items() if "Pod" in cls}
    assert pods == ({"build_tfrecords", "candidate.train", "candidate.evaluate", "compare"}
                    if backend == "kubernetes" else set())
