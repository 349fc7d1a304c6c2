"""The Airflow side of each stage: run config from params, the run folder, connections.

The DAG's tasks call these functions with the task context; each calls the same stage function as
the CLI. Run folders are ``<artifact root>/<run key>/<stage>/``: the run key is the DAG run id, or
``tasks_test__<logical date>`` for the temporary runs of ``airflow tasks test``, so that testing
tasks one by one on a date finds the outputs of the tasks tested before it.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tasks.artifacts import safe_run_id
from tasks.config import RunConfig, Settings
from tasks.logs import log

TEMPORARY_RUN_PREFIX = "__airflow_temporary_run_"


def settings() -> Settings:
    """Deployment settings: the environment, then Airflow Variables ``personcar_<field>``."""
    return Settings.load()


def run_key(run_id: str, logical_date: Any = None) -> str:
    if run_id.startswith(TEMPORARY_RUN_PREFIX) and logical_date is not None:
        return safe_run_id(f"tasks_test__{logical_date.isoformat()}")
    return safe_run_id(run_id)


@contextlib.contextmanager
def local_run(context: dict[str, Any], *, inputs: tuple[str, ...] = (), outputs: tuple[str, ...] = ()) -> Iterator[Path]:
    """The run folder as a local path, whatever the artifact root.

    For a local root this is the run folder itself. For an ``s3://`` root (production) the stage
    works in a temp folder: ``inputs`` (stage folders, or single files when they have a suffix)
    are synced down first, ``outputs`` (stage folders) are mirrored up when the stage succeeded,
    so a failed stage leaves the store as it was.
    """
    from tasks import storage

    st = settings()
    key = run_key(context["dag_run"].run_id, getattr(context["dag_run"], "logical_date", None))
    if not storage.is_remote(st.artifact_root):
        yield Path(st.artifact_root) / key
        return
    remote = storage.join_uri(st.artifact_root, key)
    client = connection_s3_client(st.aws_conn_id, st.s3_endpoint_url)
    with tempfile.TemporaryDirectory(prefix="personcar-run-") as tmp:
        local = Path(tmp) / key
        for rel in inputs:
            if Path(rel).suffix:
                data = storage.read_bytes(storage.join_uri(remote, rel), client=client)
                if data is not None:
                    (local / rel).parent.mkdir(parents=True, exist_ok=True)
                    (local / rel).write_bytes(data)
            else:
                storage.download_dir(storage.join_uri(remote, rel), local / rel, client=client)
        log.info("run folder: %s (staged in %s)", remote, local)
        yield local
        for rel in outputs:
            if Path(rel).suffix:
                storage.upload_files([(rel, local / rel)], remote, client=client)
            else:
                storage.upload_dir(local / rel, storage.join_uri(remote, rel), client=client, delete=True)


def run_config(context: dict[str, Any]) -> RunConfig:
    params = {k: v for k, v in dict(context["params"]).items() if k in RunConfig.model_fields}
    return RunConfig.from_params(params)


def _require(path: Path, what: str, task: str) -> Path:
    if not path.exists():
        from tasks.errors import PersoncarError

        raise PersoncarError(f"{path} is missing: run task {task!r} for this run first ({what})")
    return path


def _aws_credentials(conn_id: str) -> dict[str, Any]:
    """Credentials and endpoint from the Airflow AWS connection, or {} to use the default chain."""
    try:
        from airflow.providers.amazon.aws.hooks.base_aws import AwsBaseHook

        hook = AwsBaseHook(aws_conn_id=conn_id, client_type="s3")
        creds = hook.get_credentials()
        endpoint = hook.conn_config.endpoint_url
    except Exception as exc:  # connection not defined: boto3's default chain / anonymous access
        why = "no credentials in it or in the environment" if isinstance(exc, AttributeError) else type(exc).__name__
        log.info("AWS connection %r not usable (%s); using boto3's default chain or anonymous access", conn_id, why)
        return {}
    out: dict[str, Any] = {}
    if creds and creds.access_key:
        out.update(aws_access_key_id=creds.access_key, aws_secret_access_key=creds.secret_key,
                   aws_session_token=creds.token)
    if endpoint:
        out["endpoint_url"] = endpoint
    return out


def connection_s3_client(conn_id: str, endpoint_url: str | None = None) -> Any:
    """A boto3 S3 client with the Airflow AWS connection's credentials and endpoint.

    Without a usable connection: boto3's default chain, and ``endpoint_url`` (the deployment's
    S3-compatible endpoint) when the connection names none.
    """
    from tasks.storage import s3_client

    creds = _aws_credentials(conn_id)
    return s3_client(creds.pop("endpoint_url", None) or endpoint_url, **creds)


# -- stages ------------------------------------------------------------------------------------
def download_dataset(context: dict[str, Any]) -> dict[str, Any]:
    from tasks.download import download_dataset as download

    cfg, st = run_config(context), settings()
    kwargs = _aws_credentials(st.aws_conn_id) if cfg.dataset_source.startswith("s3://") else {}
    if st.s3_endpoint_url:
        kwargs.setdefault("endpoint_url", st.s3_endpoint_url)
    with local_run(context, outputs=("download",)) as run:
        log.info("run folder: %s", run)
        return download(cfg.dataset_source, run / "download", sha256=cfg.dataset_sha256, **kwargs)


def validate_annotations(context: dict[str, Any]) -> dict[str, Any]:
    from tasks.validate import validate_annotations as validate

    cfg = run_config(context)
    with local_run(context, inputs=("download",), outputs=("validate",)) as run:
        data = _require(run / "download" / "trainval", "the extracted dataset", "download_dataset")
        out = run / "validate"
        result = validate(data / "annotations" / "bbox-annotations.json", out, images=data / "images",
                          max_quarantine_fraction=cfg.max_quarantine_fraction)
        log.info("Great Expectations Data Docs: %s", out / "data_docs" / "index.html")
        from tasks.anchors import write_coverage

        coverage = write_coverage(out / "annotations.clean.json", out, cfg.model, cfg.image_size)
    return {k: result[k] for k in ("success", "counts") if k in result} | {
        "quarantined": len(result.get("quarantined_annotation_ids", [])), "anchor_coverage": coverage["coverage"]}


def build_tfrecords(context: dict[str, Any]) -> dict[str, Any]:
    from tasks.tfrecords import build_tfrecords as build

    cfg = run_config(context)
    with local_run(context, inputs=("download", "validate/annotations.clean.json"), outputs=("tfrecords",)) as run:
        clean = _require(run / "validate" / "annotations.clean.json", "the cleaned annotations",
                         "validate_annotations")
        manifest = build(clean, run / "download" / "trainval" / "images", run / "tfrecords",
                         num_shards=cfg.num_shards, val_fraction=cfg.val_fraction, seed=cfg.seed)
    return {split: {k: v for k, v in s.items() if k != "image_ids"} for split, s in manifest["splits"].items()}


def train(context: dict[str, Any]) -> dict[str, Any]:
    from tasks.publish import previous_run
    from tasks.train import OutOfMemoryError, resolve_start
    from tasks.train import train as run_training

    cfg, st = run_config(context), settings()
    dest = cfg.publish_dest or st.default_publish_dest()
    uses_s3 = any(u.startswith("s3://") for u in (dest, st.artifact_root, cfg.init_checkpoint))
    client = connection_s3_client(st.aws_conn_id, st.s3_endpoint_url) if uses_s3 else None
    promoted = previous_run(dest, client=client) if cfg.warm_start == "promoted" else None
    start = resolve_start(cfg, promoted=promoted)
    with local_run(context, inputs=("tfrecords", "train"), outputs=("train",)) as run:
        data = _require(run / "tfrecords" / "manifest.json", "the TFRecords", "build_tfrecords").parent
        try:
            summary = run_training(data, run / "train", cfg, start=start, s3_client=client)
        except OutOfMemoryError as exc:  # the same batch runs out of memory again: do not retry
            from airflow.sdk.exceptions import AirflowFailException

            raise AirflowFailException(str(exc)) from exc
    return {k: summary.get(k) for k in ("steps", "epochs", "seconds", "seconds_per_step", "final_losses",
                                        "exported_step", "best_validation")} | {
        "started_from": summary["started_from"].get("description")}


def evaluate(context: dict[str, Any]) -> dict[str, Any]:
    from tasks.predict import evaluate_model

    with local_run(context, inputs=("tfrecords", "train/exported", "train/train_summary.json"),
                   outputs=("evaluate",)) as run:
        data = _require(run / "tfrecords" / "val.coco.json", "the val ground truth", "build_tfrecords").parent
        _require(run / "train" / "train_summary.json", "a trained model", "train")
        metrics = evaluate_model(run / "train", data, run / "evaluate")["metrics"]
    keys = ("DetectionBoxes_Precision/mAP", "DetectionBoxes_Precision/mAP@.50IOU", "DetectionBoxes_Precision/mAP@.75IOU")
    return {k: metrics[k] for k in keys if k in metrics}


# what the report reads; images of the val split are fetched one by one in remote runs
REPORT_INPUTS = ("download/download_manifest.json", "validate", "tfrecords/manifest.json", "tfrecords/val.coco.json",
                 "train/train", "train/train_summary.json", "train/validation.json", "evaluate")


def publish_report(context: dict[str, Any]) -> dict[str, Any]:
    import json

    from tasks.artifacts import write_json_atomic
    from tasks.publish import gate_verdict, previous_run, publish
    from tasks.report import build_report

    cfg, st = run_config(context), settings()
    dest = cfg.publish_dest or st.default_publish_dest()
    client = connection_s3_client(st.aws_conn_id, st.s3_endpoint_url) if dest.startswith("s3://") else None
    with local_run(context, inputs=REPORT_INPUTS, outputs=("report", "config.json")) as run:
        metrics_path = _require(run / "evaluate" / "metrics.json", "the metrics", "evaluate")
        _fetch_val_images(context, run)
        gate = {"metric": "DetectionBoxes_Precision/mAP@.50IOU", "margin": cfg.promotion_margin}
        prev = previous_run(dest, client=client, exclude=run.name)
        verdict = gate_verdict(json.loads(metrics_path.read_text()), prev, gate)
        write_json_atomic(run / "config.json", {
            "run_id": context["dag_run"].run_id, **cfg.model_dump(), "resolved": cfg.resolved(),
            "backend": st.backend, "publish_dest": dest})
        report = build_report(run, run / "report", previous=prev, gate=verdict)
        published = publish(run / "report", dest, run_id=run.name, client=client, gate=gate,
                            model=_model_entry(cfg, run, st))
    report_url = published.get("report_url")
    context["ti"].xcom_push(key="report_url", value=report_url)
    log.info("report: %s (%s)", report_url, verdict["reason"])
    if published.get("promoted") != verdict["promoted"]:
        log.warning("promotion changed while publishing (a concurrent run was promoted): promoted=%s",
                    published.get("promoted"))
    return {"report_url": report_url, "promoted": published.get("promoted"), "report": report.get("html"),
            "gate": verdict["reason"]}


def _model_entry(cfg: RunConfig, run: Path, st: Settings) -> dict[str, Any] | None:
    """What a later run warm-starts from: the model config and the exported checkpoint's URI."""
    import json

    from tasks import storage

    summary_path = run / "train" / "train_summary.json"
    if not summary_path.is_file():
        return None
    rel = json.loads(summary_path.read_text()).get("exported_checkpoint")
    if not rel:
        return None
    root = st.artifact_root if storage.is_remote(st.artifact_root) else str(Path(st.artifact_root).absolute())
    return {"name": cfg.model, "backbone": cfg.backbone, "checkpoint": storage.join_uri(root, run.name, "train", rel)}


def _fetch_val_images(context: dict[str, Any], run: Path) -> None:
    """In a staged (remote) run, bring the val images the report draws detections on."""
    import json

    from tasks import storage

    st = settings()
    images = run / "download" / "trainval" / "images"
    gt = run / "tfrecords" / "val.coco.json"
    if not storage.is_remote(st.artifact_root) or images.is_dir() or not gt.is_file():
        return
    client = connection_s3_client(st.aws_conn_id, st.s3_endpoint_url)
    remote = storage.join_uri(st.artifact_root, run.name, "download", "trainval", "images")
    pairs = [im["file_name"] for im in json.loads(gt.read_text())["images"]]
    images.mkdir(parents=True)
    for name in pairs:
        data = storage.read_bytes(storage.join_uri(remote, name), client=client)
        if data is not None:
            (images / name).write_bytes(data)


# -- kubernetes backend ------------------------------------------------------------------------
def run_dir_macro(dag_run: Any) -> str:
    """``{{ personcar_run_dir(dag_run) }}`` in templated pod arguments."""
    root = settings().artifact_root.rstrip("/")
    return f"{root}/{run_key(dag_run.run_id, getattr(dag_run, 'logical_date', None))}"


def run_config_macro(params: Any) -> str:
    """``{{ personcar_run_config(params) }}``: the validated run config as JSON for ``--run-config``."""
    cfg = RunConfig.from_params({k: v for k, v in dict(params).items() if k in RunConfig.model_fields})
    return cfg.model_dump_json(exclude_none=True)


def publish_dest_macro(params: Any) -> str:
    """``{{ personcar_publish_dest(params) }}``: where reports are published (the promoted model for warm starts)."""
    return dict(params).get("publish_dest") or settings().default_publish_dest()


MACROS = {"personcar_run_dir": run_dir_macro, "personcar_run_config": run_config_macro,
          "personcar_publish_dest": publish_dest_macro}
_RUN = "{{ personcar_run_dir(dag_run) }}"
_CFG = "{{ personcar_run_config(params) }}"
POD_ARGUMENTS = {
    "build_tfrecords": ["tfrecords", "--annotations", f"{_RUN}/validate/annotations.clean.json",
                        "--images", f"{_RUN}/download/trainval/images", "--out", f"{_RUN}/tfrecords", "--run-config", _CFG],
    "train": ["train", "--data", f"{_RUN}/tfrecords", "--model-dir", f"{_RUN}/train", "--run-config", _CFG,
              "--publish-dest", "{{ personcar_publish_dest(params) }}"],
    "evaluate": ["evaluate", "--model-dir", f"{_RUN}/train", "--data", f"{_RUN}/tfrecords", "--out", f"{_RUN}/evaluate"],
}


def kubernetes_stage(task_id: str) -> Any:
    """The stage as a KubernetesPodOperator running ``personcar ...`` in the trainer image."""
    from datetime import timedelta

    from tasks.k8s import TrainerPodSettings, make_trainer_task

    pod = TrainerPodSettings.load()
    gpus = {"build_tfrecords": 0, "train": pod.gpus, "evaluate": min(pod.gpus, 1)}[task_id]
    extra: dict[str, Any] = {"retries": 2, "retry_delay": timedelta(minutes=5)}
    if task_id == "train":
        extra["execution_timeout"] = timedelta(hours=24)
    return make_trainer_task(task_id, POD_ARGUMENTS[task_id], pod, gpus=gpus, **extra)
