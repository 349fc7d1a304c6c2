"""What both DAGs share: deployment choice, retry policy, Assets, and the first three stages' tasks.

Light to import (Airflow's decorators only): the stage code is imported when a task runs. A task
defined here is added to whichever DAG calls it, under the same task id in each.
"""

from __future__ import annotations

import os
from datetime import timedelta

import pendulum
from airflow.sdk import Asset, task

#: read when a DAG is parsed: ``local`` runs every stage in the worker, ``kubernetes`` the
#: TensorFlow stages as trainer pods
BACKEND = os.environ.get("PERSONCAR_EXECUTION_BACKEND", "local")
NETWORK_RETRIES = {"retries": 3, "retry_delay": timedelta(minutes=1), "retry_exponential_backoff": True,
                   "max_retry_delay": timedelta(minutes=15)}
DEFAULT_ARGS = {"owner": "personcar", "retries": 1, "retry_delay": timedelta(minutes=2)}
#: what both DAGs' ``@dag`` takes alike: the first date, no catch-up, one run at a time, the retry policy
DAG_ARGS = {"start_date": pendulum.datetime(2026, 1, 5, tz="UTC"), "catchup": False, "max_active_runs": 1,
            "default_args": DEFAULT_ARGS}
DATASET = Asset(name="personcar_dataset")
MODEL = Asset(name="personcar_model")


@task(outlets=[DATASET], **NETWORK_RETRIES)
def download_dataset(**context):
    from tasks import dag_tasks

    return dag_tasks.download_dataset(context, DATASET)


@task(retries=0)  # a bad dataset does not get better on retry
def validate_annotations(download, **context):
    from tasks import dag_tasks

    return dag_tasks.validate_annotations(context, download)


@task
def build_tfrecords(validated, download, **context):
    from tasks import dag_tasks

    return dag_tasks.build_tfrecords(context, validated, download)
