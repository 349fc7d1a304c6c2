# syntax=docker/dockerfile:1.7
# The Airflow image (API server, scheduler, DAG processor, triggerer, workers): the official
# Apache Airflow image with the project's `airflow` extra and the DAGs and plugins baked in.
# No TensorFlow: the TensorFlow stages run in the trainer image (docker/trainer.Dockerfile) as
# KubernetesPodOperator pods when the execution backend is `kubernetes`.
#
#   docker build -f docker/airflow.Dockerfile -t ghcr.io/personcar/airflow:0.1.0 .
FROM apache/airflow:3.3.2-python3.11

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The official image installs packages as the `airflow` user (uid 50000, group 0).
USER airflow
WORKDIR /opt/personcar
COPY --chown=airflow:0 requirements/lock.txt requirements/lock.txt
COPY --chown=airflow:0 pyproject.toml pyproject.toml
COPY --chown=airflow:0 tasks/ tasks/
COPY --chown=airflow:0 data_checks/ data_checks/

# Same versions as the development environment: everything is constrained by the lock, and
# Airflow itself is named so that pip can never move it. (No `pip check`: the image carries more
# providers than the lock resolves; the import below checks what the DAG needs.)
RUN pip install -c requirements/lock.txt "apache-airflow==3.3.2" ".[airflow]" \
    && python -c "import tasks.k8s, tasks.config, airflow.providers.cncf.kubernetes.operators.pod, airflow.providers.amazon"

COPY --chown=airflow:0 dags/ /opt/airflow/dags/
COPY --chown=airflow:0 plugins/ /opt/airflow/plugins/
# The trainer pods' shape (PERSONCAR_K8S_POD_TEMPLATES); operators may mount their own instead.
COPY --chown=airflow:0 deploy/k8s/pod-templates/ /opt/airflow/pod-templates/

WORKDIR /opt/airflow
