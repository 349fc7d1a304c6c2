"""personcar_detection: retrain and evaluate the person/car detector weekly, when the dataset is
updated, or on demand.

download_dataset -> validate_annotations -> build_tfrecords -> train -> evaluate -> publish_report

Stage logic lives in ``tasks`` (the same code as the ``personcar`` CLI); this file only wires it.
Each task returns the location it wrote and the next takes it as an argument. Assets show the
lineage: the source archive (``openimages_personcar_archive``: an update from its producer, or
``POST /api/v2/assets/events``, starts a retrain besides the Monday cron), the downloaded dataset
(its sha256 and counts) and the model (its metrics and promotion).
Deployment settings come from the environment or Airflow Variables:

- ``PERSONCAR_EXECUTION_BACKEND`` (env, read when the DAG is parsed): ``local`` (default) runs every
  stage in the worker; ``kubernetes`` runs the TensorFlow stages (build_tfrecords, train, evaluate)
  as pods of the trainer image on GPU nodes.
- ``personcar_artifact_root`` (Variable) or ``PERSONCAR_ARTIFACT_ROOT``: where run folders go.
- ``personcar_aws_conn_id`` (Variable) or ``PERSONCAR_AWS_CONN_ID``: AWS connection (``aws_default``).
"""

from __future__ import annotations

import os
from datetime import timedelta

from airflow.sdk import Asset, AssetOrTimeSchedule, dag, task
from airflow.timetables.trigger import CronTriggerTimetable

from tasks.config import PRODUCTION_SOURCE
from tasks.dag_common import (BACKEND, DAG_ARGS, MODEL, NETWORK_RETRIES, build_tfrecords, download_dataset,
                              validate_annotations)
from tasks.dag_tasks import MACROS
from tasks.params import dag_params

DEFAULT_SOURCE = os.environ.get("PERSONCAR_DATASET_SOURCE", PRODUCTION_SOURCE)

# The trigger form: one Param per RunConfig field (title, description, bounds, enum, section).
PARAMS = dag_params({"dataset_source": DEFAULT_SOURCE})


ARCHIVE = Asset(name="openimages_personcar_archive", uri=DEFAULT_SOURCE)


@dag(
    dag_id="personcar_detection",
    description="Validate the openimages-personcar data, train SSD ResNet152 V1 FPN, evaluate and publish.",
    # weekly retrain, Mondays 03:00 UTC, and whenever the source archive is updated
    schedule=AssetOrTimeSchedule(timetable=CronTriggerTimetable("0 3 * * 1", timezone="UTC"), assets=[ARCHIVE]),
    **DAG_ARGS,
    params=PARAMS,
    tags=["personcar", "object-detection", "tensorflow", "training"],
    doc_md=__doc__,
    user_defined_macros=MACROS,
)
def personcar_detection() -> None:
    @task(outlets=[MODEL], **NETWORK_RETRIES)
    def publish_report(parts, **context):
        from tasks import dag_tasks

        return dag_tasks.publish_report(context, parts, MODEL)

    downloaded = download_dataset()
    validated = validate_annotations(downloaded)
    if BACKEND == "kubernetes":  # the pods write <run>/<stage>; the report finds them there
        from tasks.dag_tasks import kubernetes_stage

        tfrecords, model, evaluation = (kubernetes_stage(t) for t in ("build_tfrecords", "train", "evaluate"))
        validated >> tfrecords >> model >> evaluation
        parts = {"download": downloaded, "validate": validated}
    else:
        @task(execution_timeout=timedelta(hours=12))
        def train(tfrecords, **context):
            from tasks import dag_tasks

            return dag_tasks.train(context, tfrecords)

        @task
        def evaluate(model, tfrecords, **context):
            from tasks import dag_tasks

            return dag_tasks.evaluate(context, model, tfrecords)

        tfrecords = build_tfrecords(validated, downloaded)
        model = train(tfrecords)
        evaluation = evaluate(model, tfrecords)
        parts = {"download": downloaded, "validate": validated, "tfrecords": tfrecords, "train": model,
                 "evaluate": evaluation}
    evaluation >> publish_report(parts)


personcar_detection()
