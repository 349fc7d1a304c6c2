"""personcar_detection: retrain and evaluate the person/car detector, weekly or on demand.

download_dataset -> validate_annotations -> build_tfrecords -> train -> evaluate -> publish_report

Stage logic lives in ``tasks`` (the same code as the ``personcar`` CLI); this file only wires it.
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

import pendulum
from airflow.sdk import dag, task

from tasks.config import PRODUCTION_SOURCE, dag_params
from tasks.dag_tasks import MACROS

BACKEND = os.environ.get("PERSONCAR_EXECUTION_BACKEND", "local")
NETWORK_RETRIES = {"retries": 3, "retry_delay": timedelta(minutes=1), "retry_exponential_backoff": True,
                   "max_retry_delay": timedelta(minutes=15)}
DEFAULT_SOURCE = os.environ.get("PERSONCAR_DATASET_SOURCE", PRODUCTION_SOURCE)

# The trigger form: one Param per RunConfig field (title, description, bounds, enum, section).
PARAMS = dag_params({"dataset_source": DEFAULT_SOURCE})


@dag(
    dag_id="personcar_detection",
    description="Validate the openimages-personcar data, train SSD ResNet152 V1 FPN, evaluate and publish.",
    schedule="0 3 * * 1",  # weekly retrain, Mondays 03:00 UTC
    start_date=pendulum.datetime(2026, 1, 5, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    params=PARAMS,
    tags=["personcar", "object-detection", "tensorflow", "training"],
    default_args={"owner": "personcar", "retries": 1, "retry_delay": timedelta(minutes=2)},
    doc_md=__doc__,
    user_defined_macros=MACROS,
)
def personcar_detection() -> None:
    @task(**NETWORK_RETRIES)
    def download_dataset(**context):  # noqa: ANN202, ANN003
        from tasks import dag_tasks

        return dag_tasks.download_dataset(context)

    @task(retries=0)  # a bad dataset does not get better on retry
    def validate_annotations(**context):  # noqa: ANN202, ANN003
        from tasks import dag_tasks

        return dag_tasks.validate_annotations(context)

    @task(**NETWORK_RETRIES)
    def publish_report(**context):  # noqa: ANN202, ANN003
        from tasks import dag_tasks

        return dag_tasks.publish_report(context)

    if BACKEND == "kubernetes":
        from tasks.dag_tasks import kubernetes_stage

        tfrecords = kubernetes_stage("build_tfrecords")
        training = kubernetes_stage("train")
        evaluation = kubernetes_stage("evaluate")
    else:
        @task
        def build_tfrecords(**context):  # noqa: ANN202, ANN003
            from tasks import dag_tasks

            return dag_tasks.build_tfrecords(context)

        @task(execution_timeout=timedelta(hours=12))
        def train(**context):  # noqa: ANN202, ANN003
            from tasks import dag_tasks

            return dag_tasks.train(context)

        @task
        def evaluate(**context):  # noqa: ANN202, ANN003
            from tasks import dag_tasks

            return dag_tasks.evaluate(context)

        tfrecords, training, evaluation = build_tfrecords(), train(), evaluate()

    download_dataset() >> validate_annotations() >> tfrecords >> training >> evaluation >> publish_report()


personcar_detection()
