"""The Airflow side of the backbone sweep (``dags/personcar_backbone_sweep.py``).

The data pass and each candidate's train and evaluate are the main DAG's stage functions
(:mod:`tasks.dag_tasks`) with the candidate's run config and folder (``<run>/candidates/<name>/``,
:mod:`tasks.sweep`); ``compare`` is ``personcar compare``'s function; ``publish_sweep`` publishes
the sweep report beside the runs and, when asked, the recommended candidate as a run through the
quality gate (:func:`tasks.dag_tasks.publish_run`). A mapped task instance finds its candidate by
its map index in the ``candidates`` param (the order ``list_candidates`` keeps), which is how the
pods' templated arguments find it too. A candidate task that fails leaves ``failure.json`` in the
candidate's folder (its ``on_failure_callback``), which ``compare`` reports; a new try removes it.
"""

from __future__ import annotations

import json
from typing import Any

from tasks import dag_tasks
from tasks.dag_tasks import run_location, run_params, stage_task, where
from tasks.logs import log
from tasks.sweep import COMPARE_DIR, FAILURE, MANIFEST, candidate_config, candidate_stage, manifest, parse_candidates


def candidates(params: Any) -> list[dict[str, Any]]:
    return parse_candidates(dict(params).get("candidates"), dict(params))


def _candidate(context: dict[str, Any]) -> dict[str, Any]:
    return candidates(context["params"])[int(context["ti"].map_index)]


def _location(context: dict[str, Any], name: str, stage: str = "") -> str:
    return run_location(context, candidate_stage(name, stage))


# -- tasks -------------------------------------------------------------------------------------
@stage_task
def list_candidates(context: dict[str, Any]) -> list[dict[str, Any]]:
    """Check the candidates (one line names a bad one) and write ``<run>/candidates.json``."""
    from tasks import storage

    found = candidates(context["params"])
    doc = manifest(found, run_params(context))
    storage.write_bytes(run_location(context, MANIFEST), json.dumps(doc, indent=2).encode(),
                        content_type="application/json", **where())
    log.info("sweep: %d candidates: %s", len(found), ", ".join(c["name"] for c in found))
    return found


@stage_task
def train_candidate(context: dict[str, Any], candidate: dict[str, Any], tfrecords: str | None = None) -> str:
    cfg = candidate_config(run_params(context), candidate)
    return dag_tasks.train(context, tfrecords, cfg=cfg, out=_location(context, candidate["name"], "train"))


@stage_task
def evaluate_candidate(context: dict[str, Any], candidate: dict[str, Any], model: str | None = None,
                       tfrecords: str | None = None) -> str:
    return dag_tasks.evaluate(context, model or _location(context, candidate["name"], "train"), tfrecords,
                              out=_location(context, candidate["name"], "evaluate"))


@stage_task
def compare(context: dict[str, Any], tfrecords: str | None = None) -> str:
    """The sweep report of every candidate into ``<run>/compare`` (failed ones named, not ranked)."""
    from tasks import storage
    from tasks.compare import check_recommendation, compare_runs

    out = run_location(context, COMPARE_DIR)
    runs = [(c["name"], _location(context, c["name"])) for c in candidates(context["params"])]
    data = dag_tasks._input(tfrecords, context, "tfrecords", "build_tfrecords")
    with dag_tasks.staging() as st:
        doc = compare_runs(runs, st.output(out), data=data, margin=float(context["params"]["recommendation_margin"]),
                           title=f"personcar backbone sweep {context['dag_run'].run_id}", where=where())
    report = storage.join_uri(out, "report.html")
    log.info("sweep report: %s", report)
    check_recommendation(doc, report)
    return out


@stage_task
def publish_sweep(context: dict[str, Any], compared: str | None = None, model: Any = None) -> dict[str, Any]:
    """Publish the sweep report; with ``promote_winner``, first the recommended candidate as a run."""
    from tasks.sweep_publish import publish_sweep as publish

    compared = dag_tasks._input(compared, context, COMPARE_DIR, "compare")
    key = run_location(context).rstrip("/").rsplit("/", 1)[-1]
    cfg = dag_tasks.run_config(context)
    dest = cfg.publish_dest or dag_tasks.settings().default_publish_dest()
    with dag_tasks.staging() as st:
        doc = json.loads((st.input(compared) / "sweep.json").read_text())
        name = doc["recommendation"].get("name")
        winner = _publish_winner(context, key, name) if name and context["params"].get("promote_winner") else None
        published = publish(st.input(compared), dest, sweep_id=key, winner=winner, **where())
    context["ti"].xcom_push(key="report_url", value=published["report_url"])
    if model is not None and winner is not None:
        context["outlet_events"][model].extra = {"run_id": winner["run_id"], "promoted": winner["promoted"],
                                                 "report_url": winner["report_url"], "sweep": key}
    return {"report_url": published["report_url"], "recommended": name, "winner": winner}


def _publish_winner(context: dict[str, Any], key: str, name: str) -> dict[str, Any]:
    """The recommended candidate published as run ``<sweep>__<name>``: the run report, the gate, the index."""
    cand = next(c for c in candidates(context["params"]) if c["name"] == name)
    parts = {s: dag_tasks._input(None, context, s, t) for s, t in (
        ("download", "download_dataset"), ("validate", "validate_annotations"), ("tfrecords", "build_tfrecords"))}
    parts |= {s: _location(context, name, s) for s in ("train", "evaluate")}
    run_id = f"{key}__{name}"
    published, verdict = dag_tasks.publish_run(context, candidate_config(run_params(context), cand), parts,
                                               key=run_id, folder=_location(context, name),
                                               extra={"run_id": run_id, "sweep": {"run": key, "candidate": name}})
    log.info("recommended candidate %s published as run %s: %s", name, run_id, verdict["reason"])
    return {"run_id": published["run_id"], "promoted": published["promoted"], "report_url": published["report_url"],
            "gate": verdict["reason"]}


# -- callbacks ---------------------------------------------------------------------------------
def clear_failure(context: dict[str, Any]) -> None:
    """``on_execute_callback`` of a candidate task: a new try starts without the last one's failure."""
    from tasks import storage

    uri = _location(context, _candidate(context)["name"], FAILURE)
    if storage.read_bytes(uri, **where()) is not None:
        storage.remove(uri.rsplit("/", 1)[0], [FAILURE], **where())


def record_failure(context: dict[str, Any]) -> None:
    """``on_failure_callback`` of a candidate task: ``failure.json`` says which stage failed and why."""
    from tasks import storage

    exc = context.get("exception")
    text = " ".join(str(exc or "failed (no message)").split())
    record = {"stage": context["ti"].task_id.rsplit(".", 1)[-1], "error": text[:500],
              "try_number": getattr(context["ti"], "try_number", None)}
    name = _candidate(context)["name"]
    storage.write_bytes(_location(context, name, FAILURE), json.dumps(record, indent=2).encode(),
                        content_type="application/json", **where())
    log.info("candidate %s: %s failed: %s", name, record["stage"], record["error"])


# -- kubernetes backend ------------------------------------------------------------------------
def candidate_dir_macro(dag_run: Any, params: Any, map_index: int) -> str:
    """``{{ personcar_candidate_dir(dag_run, params, ti.map_index) }}``: the candidate's folder."""
    name = candidates(params)[int(map_index)]["name"]
    return run_location({"dag_run": dag_run}, candidate_stage(name))


def candidate_config_macro(params: Any, map_index: int) -> str:
    """``{{ personcar_candidate_config(params, ti.map_index) }}``: the candidate's run config as JSON."""
    cand = candidates(params)[int(map_index)]
    return candidate_config(dict(params), cand).model_dump_json(exclude_none=True)


MACROS = {**dag_tasks.MACROS, "personcar_candidate_dir": candidate_dir_macro,
          "personcar_candidate_config": candidate_config_macro}
_RUN = "{{ personcar_run_dir(dag_run) }}"
_DIR = "{{ personcar_candidate_dir(dag_run, params, ti.map_index) }}"
POD_ARGUMENTS = {
    "train": ["train", "--data", f"{_RUN}/tfrecords", "--model-dir", f"{_DIR}/train", "--run-config",
              "{{ personcar_candidate_config(params, ti.map_index) }}", "--publish-dest",
              "{{ personcar_publish_dest(params) }}"],
    "evaluate": ["evaluate", "--model-dir", f"{_DIR}/train", "--data", f"{_RUN}/tfrecords", "--out", f"{_DIR}/evaluate"],
    "compare": ["compare", "--sweep", _RUN, "--out", f"{_RUN}/{COMPARE_DIR}", "--margin",
                "{{ params.recommendation_margin }}"],
}


def kubernetes_stage(task_id: str, **operator_kwargs: Any) -> Any:
    """A candidate's train or evaluate, or the compare, as a trainer pod (``personcar ...``); the
    candidate stages carry the failure callbacks. Compare times the models on one GPU."""
    callbacks = {} if task_id == "compare" else {"on_execute_callback": clear_failure,
                                                  "on_failure_callback": record_failure}
    return dag_tasks.kubernetes_stage(task_id, POD_ARGUMENTS[task_id], **(callbacks | operator_kwargs))
