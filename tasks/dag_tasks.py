"""The Airflow side of each stage: run config from params, locations in and out, connections, Assets.

Each DAG task calls one of these with its context and the locations its upstream tasks returned;
each runs the same stage function as the CLI and returns the location it wrote, which the next
task takes as its argument. A stage's location is ``<artifact root>/<run key>/<stage>`` (a path,
or ``s3://...`` in production, staged through :class:`tasks.staging.Staging` with the deployment's
AWS connection); the run key is the DAG run id, or ``tasks_test__<logical date>`` for the
temporary runs of ``airflow tasks test``, where no upstream task returned anything: a task tested
alone reads the conventional location of its inputs, so testing tasks one by one on a date finds
the outputs of the tasks tested before it.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from tasks.artifacts import safe_run_id
from tasks.config import RunConfig, Settings
from tasks.errors import PersoncarError, TemporaryError
from tasks.logs import log

TEMPORARY_RUN_PREFIX = "__airflow_temporary_run_"
T = TypeVar("T")


def settings() -> Settings:
    """Deployment settings: the environment, then Airflow Variables ``personcar_<field>``."""
    return Settings.load()


def run_key(run_id: str, logical_date: Any = None) -> str:
    if run_id.startswith(TEMPORARY_RUN_PREFIX) and logical_date is not None:
        return safe_run_id(f"tasks_test__{logical_date.isoformat()}")
    return safe_run_id(run_id)


def run_location(context: dict[str, Any], stage: str = "") -> str:
    """``<artifact root>/<run key>[/<stage>]`` of this task's DAG run."""
    from tasks import storage

    dag_run = context["dag_run"]
    root = settings().artifact_root
    root = root if storage.is_remote(root) else str(Path(root).absolute())
    return storage.join_uri(root, run_key(dag_run.run_id, getattr(dag_run, "logical_date", None)), stage)


def stage_task(fn: Callable[..., T]) -> Callable[..., T]:
    """A task's stage function whose :class:`~tasks.errors.PersoncarError` fails the task without
    retries (bad input or configuration, out of memory: the same try fails the same way), unless it
    is a :class:`~tasks.errors.TemporaryError` (storage, network), which Airflow retries like a crash."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> T:
        try:
            return fn(*args, **kwargs)
        except TemporaryError:
            raise
        except PersoncarError as exc:
            from airflow.sdk.exceptions import AirflowFailException

            raise AirflowFailException(str(exc)) from exc

    return run


def run_config(context: dict[str, Any]) -> RunConfig:
    """The run's config from the DAG params."""
    return RunConfig.from_params(run_params(context))


def run_params(context: dict[str, Any]) -> dict[str, Any]:
    """The DAG params that are run parameters (a DAG may have others, e.g. a sweep's candidates)."""
    return {k: v for k, v in dict(context["params"]).items() if k in RunConfig.model_fields}


def where() -> dict[str, Any]:
    """How :mod:`tasks.storage` reaches S3 from a task: the AWS connection, else the endpoint setting."""
    st = settings()
    return {"conn_id": st.aws_conn_id, "endpoint_url": st.s3_endpoint_url}


def staging() -> Any:
    from tasks.staging import staging as stage_folders

    return stage_folders(**where())


def _input(location: str | None, context: dict[str, Any], stage: str, task: str) -> str:
    """The upstream task's location, or (``airflow tasks test``) where that task writes."""
    from tasks import storage

    location = location or run_location(context, stage)
    if storage.is_remote(location) or Path(location).exists():
        return location
    raise PersoncarError(f"{location} is missing: run task {task!r} for this run first")


# -- stages ------------------------------------------------------------------------------------
@stage_task
def download_dataset(context: dict[str, Any], dataset: Any = None) -> str:
    """Fetch the archive; its sha256 and counts become the dataset Asset's event metadata."""
    from tasks import storage
    from tasks.download import download_dataset as download

    cfg, out = run_config(context), run_location(context, "download")
    hook = storage.aws_hook(settings().aws_conn_id) if cfg.dataset_source.startswith("s3://") else None
    kwargs = {"endpoint_url": settings().s3_endpoint_url}
    if hook is not None:  # the connection's session and endpoint, the hook's way
        kwargs = {"session": hook.get_session(),
                  "endpoint_url": hook.conn_config.get_service_endpoint_url(service_name="s3") or kwargs["endpoint_url"]}
    with staging() as st:
        manifest = download(cfg.dataset_source, st.output(out), sha256=cfg.dataset_sha256, **kwargs)
    if dataset is not None:
        context["outlet_events"][dataset].extra = {
            k: manifest.get(k) for k in ("source", "sha256", "size_bytes", "images", "members")}
    return out


@stage_task
def validate_annotations(context: dict[str, Any], download: str | None = None) -> str:
    from tasks.anchors import write_coverage
    from tasks.validate import validate_annotations as validate

    cfg, out = run_config(context), run_location(context, "validate")
    download = _input(download, context, "download", "download_dataset")
    with staging() as st:
        data = st.input(download) / "trainval"
        local = st.output(out)
        result = validate(data / "annotations" / "bbox-annotations.json", local, images=data / "images",
                          max_quarantine_fraction=cfg.max_quarantine_fraction)
        coverage = write_coverage(local / "annotations.clean.json", local, cfg.model, cfg.image_size)
    log.info("validation: %d annotations quarantined; anchor coverage %.1f%%; Great Expectations Data Docs: %s",
             len(result.get("quarantined_annotation_ids", [])), 100 * (coverage["coverage"] or 0),
             f"{out}/data_docs/index.html")
    return out


@stage_task
def build_tfrecords(context: dict[str, Any], validated: str | None = None, download: str | None = None) -> str:
    from tasks import storage
    from tasks.tfrecords import build_tfrecords as build

    cfg, out = run_config(context), run_location(context, "tfrecords")
    validated = _input(validated, context, "validate", "validate_annotations")
    download = _input(download, context, "download", "download_dataset")
    with staging() as st:
        clean = st.input(storage.join_uri(validated, "annotations.clean.json"), file=True)
        images = st.input(storage.join_uri(download, "trainval", "images"))
        build(clean, images, st.output(out), num_shards=cfg.num_shards, val_fraction=cfg.val_fraction, seed=cfg.seed)
    return out


@stage_task
def train(context: dict[str, Any], tfrecords: str | None = None, *, cfg: RunConfig | None = None,
          out: str | None = None) -> str:
    """Train into ``<run>/train`` (or ``out``) with the run's config (or ``cfg``: a sweep's candidate)."""
    from tasks.publish import previous_run
    from tasks.train import resolve_start
    from tasks.train import train as run_training

    cfg, out = cfg or run_config(context), out or run_location(context, "train")
    tfrecords = _input(tfrecords, context, "tfrecords", "build_tfrecords")
    dest = cfg.publish_dest or settings().default_publish_dest()
    promoted = previous_run(dest, **where()) if cfg.warm_start == "promoted" else None
    from tasks import storage

    with staging() as st:
        model_dir = st.output(out, keep=True)  # a retried task resumes from its last checkpoint
        summary = run_training(st.input(tfrecords), model_dir, cfg, start=resolve_start(cfg, promoted=promoted),
                               where=where(), on_checkpoint=(lambda _: st.sync(out)) if storage.is_remote(out)
                               else None)
    log.info("trained %s steps from %s; exported step %s", summary["steps"],
             summary["started_from"].get("description"), summary["exported_step"])
    return out


@stage_task
def evaluate(context: dict[str, Any], model: str | None = None, tfrecords: str | None = None, *,
             out: str | None = None) -> str:
    from tasks import storage
    from tasks.predict import evaluate_model
    from tasks.train import EXPORT_SUBDIR

    out = out or run_location(context, "evaluate")
    model = _input(model, context, "train", "train")
    tfrecords = _input(tfrecords, context, "tfrecords", "build_tfrecords")
    with staging() as st:
        exported = st.input(storage.join_uri(model, EXPORT_SUBDIR))
        metrics = evaluate_model(exported, st.input(tfrecords), st.output(out))["metrics"]
    log.info("evaluation: mAP@.50IOU %.4f -> %s", metrics["DetectionBoxes_Precision/mAP@.50IOU"], out)
    return out


@stage_task
def publish_report(context: dict[str, Any], parts: dict[str, str | None] | None = None, model: Any = None) -> dict:
    """Build the report from the run's stage locations, publish it, and record the model Asset's event."""
    cfg = run_config(context)
    stages = {"download": "download_dataset", "validate": "validate_annotations", "tfrecords": "build_tfrecords",
              "train": "train", "evaluate": "evaluate"}
    parts = {s: _input((parts or {}).get(s), context, s, t) for s, t in stages.items()}
    key = run_location(context).rstrip("/").rsplit("/", 1)[-1]
    published, verdict = publish_run(context, cfg, parts, key=key, folder=run_location(context))
    report_url = published.get("report_url")
    context["ti"].xcom_push(key="report_url", value=report_url)
    log.info("report: %s (%s)", report_url, verdict["reason"])
    if model is not None:
        context["outlet_events"][model].extra = {"run_id": key, "promoted": published.get("promoted"),
                                                 "report_url": report_url, **published["entry"]["metrics"]}
    return {"report_url": report_url, "promoted": published.get("promoted"), "gate": verdict["reason"]}


def publish_run(context: dict[str, Any], cfg: RunConfig, parts: dict[str, str], *, key: str, folder: str,
                extra: dict[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Build the report of the run made of the stage locations ``parts`` and publish it as run ``key``
    through the quality gate; ``config.json`` and ``report/`` go to the location ``folder``, ``extra``
    into config.json. Returns what :func:`tasks.publish.publish` returned and the gate's verdict."""
    from tasks import storage
    from tasks.publish import gate_verdict, previous_run, publish
    from tasks.report import build_report

    st = settings()
    dest = cfg.publish_dest or st.default_publish_dest()
    with staging() as staged:
        run = _report_inputs(staged, parts, Path(staged.root) / key)
        metrics = json.loads((run / "evaluate" / "metrics.json").read_text())
        gate = {"metric": "DetectionBoxes_Precision/mAP@.50IOU", "margin": cfg.promotion_margin}
        prev = previous_run(dest, exclude=key, **where())
        verdict = gate_verdict(metrics, prev, gate)
        config = {"run_id": context["dag_run"].run_id, **cfg.model_dump(), "resolved": cfg.resolved(),
                  "backend": st.backend, "publish_dest": dest, **(extra or {})}
        (run / "config.json").write_text(json.dumps(config, indent=2))
        staged_config = staged.output(storage.join_uri(folder, "config.json"), file=True)
        if staged_config != run / "config.json":
            staged_config.write_text(json.dumps(config, indent=2))
        report = build_report(run, staged.output(storage.join_uri(folder, "report")), previous=prev, gate=verdict)
        published = publish(Path(report["out"]), dest, run_id=key, gate=gate, model=_model_entry(cfg, run, parts),
                            **where())
    return published, verdict


def _report_inputs(st: Any, parts: dict[str, str], run: Path) -> Path:
    """A local run folder of what the report reads: local stages of one run folder as they are; remote
    ones, or stages of different folders (a sweep's candidate and its shared data), fetched."""
    from tasks import storage

    local = not any(storage.is_remote(u) for u in parts.values())
    if local and len({Path(u).parent for u in parts.values()}) == 1:
        return Path(parts["evaluate"]).parent
    files = {"download": ["download_manifest.json"], "tfrecords": ["manifest.json", "val.coco.json"],
             "train": ["train_summary.json", "validation.json"]}
    for stage, uri in parts.items():
        if stage in ("validate", "evaluate"):
            storage.download_dir(uri, run / stage, **st.where)
        for name in files.get(stage, []):
            data = storage.read_bytes(storage.join_uri(uri, name), **st.where)
            if data is not None:
                (run / stage).mkdir(parents=True, exist_ok=True)
                (run / stage / name).write_bytes(data)
    storage.download_dir(storage.join_uri(parts["train"], "train"), run / "train" / "train", **st.where)
    gt = run / "tfrecords" / "val.coco.json"
    images = run / "download" / "trainval" / "images"
    if gt.is_file():  # the val images the report draws detections on
        images.mkdir(parents=True, exist_ok=True)
        for im in json.loads(gt.read_text())["images"]:
            data = storage.read_bytes(storage.join_uri(parts["download"], "trainval", "images", im["file_name"]),
                                      **st.where)
            if data is not None:
                (images / im["file_name"]).write_bytes(data)
    return run


def _model_entry(cfg: RunConfig, run: Path, parts: dict[str, str]) -> dict[str, Any] | None:
    """What a later run warm-starts from: the model config and the exported checkpoint's location."""
    from tasks import storage

    summary = run / "train" / "train_summary.json"
    rel = json.loads(summary.read_text()).get("exported_checkpoint") if summary.is_file() else None
    if not rel:
        return None
    return {"name": cfg.model, "backbone": cfg.backbone, "checkpoint": storage.join_uri(parts["train"], rel)}


# -- kubernetes backend ------------------------------------------------------------------------
def run_dir_macro(dag_run: Any) -> str:
    """``{{ personcar_run_dir(dag_run) }}`` in templated pod arguments."""
    return run_location({"dag_run": dag_run})


def run_config_macro(params: Any) -> str:
    """``{{ personcar_run_config(params) }}``: the validated run config as JSON for ``--run-config``."""
    return run_config({"params": params}).model_dump_json(exclude_none=True)


def publish_dest_macro(params: Any) -> str:
    """``{{ personcar_publish_dest(params) }}``: where reports are published (the promoted model for warm starts)."""
    return dict(params).get("publish_dest") or settings().default_publish_dest()


MACROS = {"personcar_run_dir": run_dir_macro, "personcar_run_config": run_config_macro,
          "personcar_publish_dest": publish_dest_macro}
_RUN = "{{ personcar_run_dir(dag_run) }}"
_CFG = "{{ personcar_run_config(params) }}"
_FROM = "{{{{ ti.xcom_pull(task_ids='{}') }}}}"  # an upstream task's location
POD_ARGUMENTS = {
    "build_tfrecords": ["tfrecords", "--annotations", f"{_FROM.format('validate_annotations')}/annotations.clean.json",
                        "--images", f"{_FROM.format('download_dataset')}/trainval/images", "--out", f"{_RUN}/tfrecords",
                        "--run-config", _CFG],
    "train": ["train", "--data", f"{_RUN}/tfrecords", "--model-dir", f"{_RUN}/train", "--run-config", _CFG,
              "--publish-dest", "{{ personcar_publish_dest(params) }}"],
    "evaluate": ["evaluate", "--model-dir", f"{_RUN}/train", "--data", f"{_RUN}/tfrecords", "--out", f"{_RUN}/evaluate"],
}


def kubernetes_stage(task_id: str, arguments: list[str] | None = None, **operator_kwargs: Any) -> Any:
    """The stage as a KubernetesPodOperator running ``personcar ARGUMENTS`` (default: this DAG's) in
    the trainer image; it writes ``<run>/<stage>``, where the tasks after it look (pods return no
    location). Training gets every GPU of the pod settings, TFRecords none, any other stage one."""
    from datetime import timedelta

    from tasks.k8s import TrainerPodSettings, make_trainer_task

    pod = TrainerPodSettings.load()
    gpus = 0 if task_id == "build_tfrecords" else pod.gpus if task_id == "train" else min(pod.gpus, 1)
    extra: dict[str, Any] = {"retries": 2, "retry_delay": timedelta(minutes=5)}
    if task_id == "train":
        extra["execution_timeout"] = timedelta(hours=24)
    return make_trainer_task(task_id, arguments or POD_ARGUMENTS[task_id], pod, gpus=gpus,
                             **(extra | operator_kwargs))
