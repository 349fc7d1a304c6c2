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
from airflow.sdk import Param, dag, task

from tasks.dag_tasks import MACROS

BACKEND = os.environ.get("PERSONCAR_EXECUTION_BACKEND", "local")
NETWORK_RETRIES = {"retries": 3, "retry_delay": timedelta(minutes=1), "retry_exponential_backoff": True,
                   "max_retry_delay": timedelta(minutes=15)}
DEFAULT_SOURCE = os.environ.get(
    "PERSONCAR_DATASET_SOURCE", "s3://evp-ml-data/ml-interview/openimages-personcar/trainval.tar.gz")

PARAMS = {
    "dataset_source": Param(DEFAULT_SOURCE, type="string", minLength=1, title="Dataset archive",
                            description="trainval.tar.gz to download: s3://bucket/key, https://..., file://... or a path.",
                            section="Data"),
    "dataset_sha256": Param(None, type=["null", "string"], pattern="^[0-9a-fA-F]{64}$", title="Archive sha256",
                            description="Expected sha256 of the archive; the run fails when it differs.",
                            section="Data"),
    "max_quarantine_fraction": Param(0.01, type="number", minimum=0, maximum=1, title="Max quarantined boxes",
                                     description="Fail validation when more than this fraction of boxes is "
                                                 "quarantined (zero-size, out of image, duplicates).",
                                     section="Data"),
    "val_fraction": Param(0.1, type="number", minimum=0, maximum=1, title="Validation fraction",
                          description="Share of images held out for evaluation (stable hash of the file name).",
                          section="Data"),
    "num_shards": Param(None, type=["null", "integer"], minimum=1, maximum=1024, title="Shards per split",
                        description="TFRecord shards per split; empty: ~150 MB a shard.", section="Data"),
    "model": Param("ssd_resnet152_v1_fpn_640x640", type="string",
                   enum=["ssd_resnet152_v1_fpn_640x640", "ssd_resnet101_v1_fpn_640x640", "ssd_resnet50_v1_fpn_640x640",
                         "retinanet_resnet50_fpn_640x640", "ssd_resnet26_v1_fpn_256x256_tiny"],
                   title="Model", description="Detector config: the TF2 zoo's SSD ResNet V1 FPN (built from TF Model "
                                              "Garden components), Model Garden's own RetinaNet-50, or the tiny "
                                              "ResNet-26 variant for CPU smoke runs.",
                   section="Training"),
    "backbone": Param(None, type=["null", "string"],
                      enum=[None, "resnet18", "resnet26", "resnet34", "resnet50", "resnet101", "resnet152"],
                      values_display={None: "the model's own", "resnet18": "ResNet-18 (Model Garden ResNet only)",
                                      "resnet26": "ResNet-26 (ResNet V1 only; CPU smoke runs)",
                                      "resnet34": "ResNet-34 (Model Garden ResNet only)",
                                      "resnet50": "ResNet-50", "resnet101": "ResNet-101", "resnet152": "ResNet-152"},
                      title="Backbone override", description="ResNet depth; empty: the model's own.",
                      section="Training"),
    "init_checkpoint": Param("pretrained", type="string", minLength=1, title="Start from",
                             description="pretrained: the model's published COCO checkpoint (the TF2 zoo's, converted); "
                                         "scratch; or a checkpoint path, s3://, gs:// or https:// (.tar.gz unpacked).",
                             section="Training"),
    "init_checkpoint_modules": Param(None, type=["null", "string"], enum=[None, "backbone", "backbone,decoder", "all"],
                                     values_display={None: "all it holds", "backbone": "backbone",
                                                     "backbone,decoder": "backbone and FPN", "all": "the whole detector"},
                                     title="Load from it", description="Which parts of the start checkpoint to load.",
                                     section="Training"),
    "warm_start": Param("promoted", type="string", enum=["promoted", "none"],
                        values_display={"promoted": "the last promoted model", "none": "no (use Start from)"},
                        title="Continue from", description="promoted: fine-tune the model the quality gate last "
                                                           "promoted (same model config); a new week of data costs a "
                                                           "fine-tune, not a full training.",
                        section="Training"),
    "epochs": Param(None, type=["null", "number"], exclusiveMinimum=0, maximum=10000, title="Epochs",
                    description="Passes over the training images; empty: the model's (24 for fine-tuning).",
                    section="Training"),
    "steps": Param(None, type=["null", "integer"], minimum=1, maximum=1000000, title="Training steps",
                   description="Overrides epochs; empty: epochs x training images / global batch.", section="Training"),
    "batch_size": Param(None, type=["null", "integer"], minimum=1, maximum=1024, title="Batch size per GPU",
                        description="Images per GPU (8 fits 24 GB at 640 px); the global batch is this x GPUs and "
                                    "the learning rate scales with it.",
                        section="Training"),
    "image_size": Param(None, type=["null", "integer"], minimum=128, maximum=1536, multipleOf=128,
                        title="Image size", description="Square input side in pixels; empty: 640.",
                        section="Training"),
    "learning_rate": Param(None, type=["null", "number"], exclusiveMinimum=0, maximum=10, title="Learning rate",
                           description="Peak (base) learning rate; empty: 0.04 x global batch / 64.",
                           section="Training"),
    "validate_every": Param(None, type=["null", "integer"], minimum=0, maximum=1000000, title="Validate every",
                            description="Steps between COCO evaluations of the val split (the best checkpoint is "
                                        "exported); 0: never; empty: every 2 epochs.",
                            section="Training"),
    "augment": Param(True, type="boolean", title="Augmentation",
                     description="Random horizontal flip and 0.8-1.2x scale jitter of training images; "
                                 "off to check that the model can memorise its training set.",
                     section="Training"),
    "seed": Param(42, type="integer", minimum=0, title="Seed", section="Training"),
    "publish_dest": Param(None, type=["null", "string"], title="Publish to",
                          description="s3://bucket/prefix or file://...; empty: <artifact root>/published.",
                          section="Report"),
    "promotion_margin": Param(0.0, type="number", minimum=0, maximum=1, title="Promotion margin",
                              description="Promote only when mAP@.50IOU beats the last promoted run by more than this.",
                              section="Report"),
}


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
