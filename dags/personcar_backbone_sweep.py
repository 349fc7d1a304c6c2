"""personcar_backbone_sweep: which backbone? Train and evaluate several candidates on one data pass
and recommend one, with numbers.

list_candidates, download_dataset -> validate_annotations -> build_tfrecords
    -> candidate[i]: train -> evaluate      (dynamic task mapping: one per candidate)
    -> compare -> publish_sweep

The data pass and each candidate's train and evaluate are the main DAG's stage functions
(``tasks.dag_tasks``), locally or as trainer pods with the same ``PERSONCAR_EXECUTION_BACKEND``;
a candidate is a name and the run parameters it changes (param ``candidates``; by default
ResNet-50, -101 and -152 at 640, each from its published COCO checkpoint). ``compare`` runs when
every candidate is done, failed or not: it ranks the finished ones, names the failed ones and
recommends one by a stated rule (the best mAP@.50IOU, unless a cheaper candidate is within
``recommendation_margin``), timing every model on the same machine. ``publish_sweep`` publishes the
sweep report beside the runs (the runs view lists it) and, with ``promote_winner``, the recommended
candidate as a run through the quality gate. Clearing a sweep's run (or its failed tasks) retrains
only the candidates that did not finish: a finished training is kept (``tasks.train`` returns early).
"""

from __future__ import annotations

import os
from datetime import timedelta

from airflow.sdk import Param, dag, task, task_group

from tasks.config import PRODUCTION_SOURCE
from tasks.dag_common import (BACKEND, DAG_ARGS, MODEL, NETWORK_RETRIES, build_tfrecords, download_dataset,
                              validate_annotations)
from tasks.params import dag_params
from tasks.sweep import DEFAULT_CANDIDATES, DEFAULT_MARGIN
from tasks.sweep_tasks import MACROS, clear_failure, record_failure

CANDIDATE_CALLBACKS = {"on_execute_callback": clear_failure, "on_failure_callback": record_failure}

# The main DAG's run parameters (the candidates start from their own checkpoints, not the promoted
# model, so that they compare as themselves), then the sweep's own.
PARAMS = {
    **dag_params({"dataset_source": os.environ.get("PERSONCAR_DATASET_SOURCE", PRODUCTION_SOURCE),
                  "warm_start": "none"}),
    "candidates": Param(
        DEFAULT_CANDIDATES, type="array", minItems=1, title="Candidates", section="Sweep",
        items={"type": "object", "required": ["name"], "properties": {"name": {"type": "string", "minLength": 1}}},
        description="One object per candidate: a name (its folder) and the run parameters it changes (model, "
                    "backbone, image_size, init_checkpoint, batch_size, ...); the rest come from this form."),
    "recommendation_margin": Param(
        DEFAULT_MARGIN, type="number", minimum=0, maximum=1, title="Recommendation margin", section="Sweep",
        description="A candidate cheaper than the best (lower inference latency) is recommended when its "
                    "mAP@.50IOU is within this of the best."),
    "promote_winner": Param(
        False, type="boolean", title="Publish the recommended candidate as a run", section="Sweep",
        description="Publish it like a run of personcar_detection: its report, and the quality gate decides "
                    "whether it is promoted."),
}


@dag(
    dag_id="personcar_backbone_sweep",
    description="Train and evaluate several backbones on one data pass; compare them and recommend one.",
    schedule=None,
    **DAG_ARGS,
    params=PARAMS,
    tags=["personcar", "object-detection", "tensorflow", "sweep"],
    doc_md=__doc__,
    user_defined_macros=MACROS,
)
def personcar_backbone_sweep() -> None:
    @task(retries=0)  # a bad candidate list fails at once, before the download
    def list_candidates(**context):
        from tasks import sweep_tasks

        return sweep_tasks.list_candidates(context)

    @task(outlets=[MODEL], **NETWORK_RETRIES)
    def publish_sweep(compared, **context):
        from tasks import sweep_tasks

        return sweep_tasks.publish_sweep(context, compared, MODEL)

    found = list_candidates()
    downloaded = download_dataset()
    found >> downloaded
    validated = validate_annotations(downloaded)
    if BACKEND == "kubernetes":  # pods write <run>/tfrecords and <run>/candidates/<name>/...
        from tasks.dag_tasks import kubernetes_stage
        from tasks.sweep_tasks import kubernetes_stage as sweep_stage

        tfrecords = kubernetes_stage("build_tfrecords")
        validated >> tfrecords

        @task_group(group_id="candidate")
        def candidate_pods(candidate):
            sweep_stage("train") >> sweep_stage("evaluate")

        candidates = candidate_pods.expand(candidate=found)
        tfrecords >> candidates
        compared = sweep_stage("compare", trigger_rule="all_done", retries=1)
        candidates >> compared
        compared >> publish_sweep(None)
    else:
        # one CPU training at a time (its images/s are then comparable); a failed candidate is not
        # retried in place: compare reports it and a re-run of the sweep retrains it
        @task(retries=0, execution_timeout=timedelta(hours=12), max_active_tis_per_dagrun=1,
              map_index_template="{{ candidate_name }}", **CANDIDATE_CALLBACKS)
        def train(candidate, tfrecords, **context):
            from airflow.sdk import get_current_context

            from tasks import sweep_tasks

            get_current_context()["candidate_name"] = candidate["name"]  # the map index's label
            return sweep_tasks.train_candidate(context, candidate, tfrecords)

        @task(map_index_template="{{ candidate_name }}", **CANDIDATE_CALLBACKS)
        def evaluate(candidate, model, tfrecords, **context):
            from airflow.sdk import get_current_context

            from tasks import sweep_tasks

            get_current_context()["candidate_name"] = candidate["name"]
            return sweep_tasks.evaluate_candidate(context, candidate, model, tfrecords)

        @task(trigger_rule="all_done", retries=0)  # runs when every candidate is done, failed or not
        def compare(tfrecords, **context):
            from tasks import sweep_tasks

            return sweep_tasks.compare(context, tfrecords)

        @task_group(group_id="candidate")
        def candidate_stages(candidate, tfrecords):
            evaluate(candidate, train(candidate, tfrecords), tfrecords)

        tfrecords = build_tfrecords(validated, downloaded)
        candidates = candidate_stages.partial(tfrecords=tfrecords).expand(candidate=found)
        compared = compare(tfrecords)
        candidates >> compared
        publish_sweep(compared)


personcar_backbone_sweep()
