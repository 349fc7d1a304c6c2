# personcar: `make demo` runs the whole DAG on the offline sample; `make test` runs the tests.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
DEMO := $(CURDIR)/.demo

# Everything local lives in the repository: no global Airflow home, no global artifacts.
export AIRFLOW_HOME ?= $(CURDIR)/.airflow
export AIRFLOW__CORE__DAGS_FOLDER := $(CURDIR)/dags
export AIRFLOW__CORE__PLUGINS_FOLDER := $(CURDIR)/plugins
export AIRFLOW__CORE__LOAD_EXAMPLES := False
export AIRFLOW__CORE__UNIT_TEST_MODE := False
export TF_USE_LEGACY_KERAS := 1
export TF_CPP_MIN_LOG_LEVEL := 2

DEMO_CONF := {"dataset_source": "file://$(DEMO)/trainval.tar.gz", "model": "ssd_resnet26_v1_fpn_256x256_tiny", "steps": 200, "val_fraction": 0.25, "publish_dest": "file://$(DEMO)/published"}

.PHONY: install demo ui test lock system-deps image-check clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements/lock.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -m pip --version >/dev/null 2>&1 || $(BIN)/python -m ensurepip --upgrade >/dev/null
	$(BIN)/python -m pip install --quiet --disable-pip-version-check "uv==0.13.9"
	$(BIN)/uv pip install --quiet --python $(BIN)/python -r requirements/lock.txt
	$(BIN)/uv pip install --quiet --python $(BIN)/python --no-deps -e .
	@touch $@

lock:  ## re-resolve the pinned environment after changing pyproject.toml
	$(BIN)/uv pip compile pyproject.toml --extra airflow --extra train --extra test \
		--python-version 3.11 --quiet -o requirements/lock.txt

demo: install
	rm -rf $(DEMO) && mkdir -p $(DEMO)
	$(BIN)/personcar sample --out $(DEMO)/sample --images 32 --seed 0 --archive $(DEMO)/trainval.tar.gz
	$(BIN)/airflow db migrate > $(DEMO)/db-migrate.log
	PERSONCAR_ARTIFACT_ROOT=$(DEMO)/runs $(BIN)/airflow dags test personcar_detection \
		--conf '$(DEMO_CONF)' 2>&1 | tee $(DEMO)/dag-test.log \
		| grep -E "\[personcar\]|Marking run|ERROR" | sed -E 's/ +\[personcar\].*//' || true
	@$(BIN)/python -m tasks.demo_summary $(DEMO)

# The Airflow UI over the demo's metadata DB (.airflow/): the demo's DAG run, its task logs and
# Report links, Browse > personcar runs. Every visitor is an admin: for a local look only.
UI_PORT ?= 8080
ui: install
	@echo "Airflow UI: http://localhost:$(UI_PORT) (Ctrl-C stops it)"
	AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS=True $(BIN)/airflow api-server --host 127.0.0.1 --port $(UI_PORT)

system-deps:  ## headless Chromium for the browser tests (Debian)
	@command -v chromium >/dev/null || { \
		if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq chromium >/dev/null; \
		else echo "install Debian's chromium (sudo apt-get install chromium) for the browser tests"; fi; }

test: install system-deps
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

# Opt-in, not part of `make test`: builds docker/trainer.Dockerfile for real with buildah (root;
# downloads TensorFlow and the CUDA wheels, several GB) and runs the CLI and a tiny training run in it.
image-check: install  ## build the trainer image and run it (docker/image_check.sh)
	bash docker/image_check.sh

clean:
	rm -rf $(DEMO) .airflow .pytest_cache
