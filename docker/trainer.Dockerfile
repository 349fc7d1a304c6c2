# syntax=docker/dockerfile:1.7
# The trainer image: the `personcar` CLI with TensorFlow 2.20 for NVIDIA GPUs. The `kubernetes`
# backend runs build_tfrecords, train and evaluate in it (tasks/k8s.py).
#
#   docker build -f docker/trainer.Dockerfile -t ghcr.io/personcar/trainer:0.1.0 .
#
# Base image: python:3.11 rather than tensorflow/tensorflow:2.20.0-gpu. The project requires
# Python 3.11 exactly (pyproject: >=3.11,<3.12), while the TensorFlow GPU image ships the system
# Python of its Ubuntu base (3.10 on Ubuntu 22.04) with TensorFlow and its own dependency versions
# already pip-installed into it: the locked environment cannot be installed there. TensorFlow's
# own supported route for GPUs on Linux is `tensorflow[and-cuda]`: CUDA, cuDNN and NCCL come as
# pip wheels, so no CUDA base image is needed either; the NVIDIA driver is mounted into the
# container by the node's NVIDIA container toolkit when the pod requests `nvidia.com/gpu`.
#
# Build arguments (both optional; production builds pass neither):
#   BASE_IMAGE  the Python 3.11 Debian bookworm image both stages start from. The default is the
#               official one; `make image-check` passes a stand-in built from Debian's packages
#               where no registry can be reached (docker/image_check.sh).
#   PIP_CERT    a CA bundle for pip in the install step, for networks that intercept TLS. Pass it
#               with the file mounted from the build host, e.g. with buildah:
#                 --volume /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro
#                 --build-arg PIP_CERT=/etc/ssl/certs/ca-certificates.crt
#               It is read by that RUN step only: neither the file nor the variable is in the image.
ARG BASE_IMAGE=python:3.11.13-slim-bookworm

# ---- build: a virtual environment with the project and its locked training dependencies -------
FROM ${BASE_IMAGE} AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# A compiler for the few dependencies published only as source distributions.
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY requirements/lock.txt requirements/lock.txt
COPY docker/trainer-cuda.txt docker/trainer-cuda.txt
COPY pyproject.toml pyproject.toml
COPY tasks/ tasks/
COPY data_checks/ data_checks/

# Every version comes from requirements/lock.txt (the CUDA wheels from docker/trainer-cuda.txt).
# PIP_CERT (an ARG, so an environment variable of this step only; empty means pip's own CA
# bundle) is declared here so that no other step sees it.
# --ignore-requires-python: the lock (resolved by uv, which reads only lower bounds of
# Requires-Python) pins backports-strenum 1.3.1, a dependency of tf-models-official's
# ai-edge-litert that declares Python <3.11 because 3.11 has enum.StrEnum itself; pip refuses it
# without this flag. Every version is pinned, so the flag changes nothing else, and the
# development environment (uv) installs the same set. tests/unit/test_dockerfiles.py fails if
# another locked package of the image excludes the image's Python.
# --use-pep517: the two locked source-only packages (seqeval, promise) are built as wheels in an
# isolated build environment, as uv builds them for the development environment, whatever pip
# version the base image's venv brings (pip 23.0's legacy `setup.py install` fails on seqeval).
ARG PIP_CERT=""
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --ignore-requires-python --use-pep517 \
        -c requirements/lock.txt -c docker/trainer-cuda.txt \
        ".[train]" "tensorflow[and-cuda]==2.20.0" \
    && /opt/venv/bin/pip check \
    && /opt/venv/bin/personcar --help > /dev/null

# ---- runtime --------------------------------------------------------------------------------------
FROM ${BASE_IMAGE}

LABEL org.opencontainers.image.title="personcar-trainer" \
      org.opencontainers.image.description="personcar CLI with TensorFlow 2.20 (GPU)"

# A numeric non-root user, so that Kubernetes can enforce runAsNonRoot (tasks/k8s.py asks for 1000).
RUN groupadd --gid 1000 personcar \
    && useradd --uid 1000 --gid 1000 --create-home --home-dir /home/personcar --shell /usr/sbin/nologin personcar

COPY --from=build /opt/venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    TF_USE_LEGACY_KERAS=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    HOME=/home/personcar

USER 1000:1000
WORKDIR /home/personcar

ENTRYPOINT ["personcar"]
CMD ["--help"]
