"""The ``personcar`` command: every pipeline stage outside Airflow, and the trainer image's entrypoint.

Exit 0 on success; on a user error, exit non-zero with one line on stderr (no traceback).
Paths may be ``s3://`` URIs for the trainer pod: inputs are synced down to a local work folder
before the stage runs and outputs synced up after it (the model dir after every checkpoint).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tasks.errors import PersoncarError
from tasks.params import add_run_flags, flag_type


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("absl", "tensorflow", "great_expectations", "botocore", "urllib3", "h5py", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def staging(endpoint_url: str | None) -> Any:
    """Local stand-ins for ``s3://`` arguments (tasks.staging.Staging): inputs down, outputs up."""
    from tasks.staging import staging as storage_staging

    return storage_staging(endpoint_url=endpoint_url)


# -- commands ----------------------------------------------------------------------------------
def cmd_sample(a: argparse.Namespace) -> Any:
    from tasks.sample import make_sample

    return make_sample(a.out, images=a.images, seed=a.seed, archive=a.archive)


def cmd_download(a: argparse.Namespace) -> Any:
    from tasks.download import download_dataset

    return download_dataset(a.source, a.dest, sha256=a.sha256, endpoint_url=a.endpoint_url)


def cmd_validate(a: argparse.Namespace) -> Any:
    from tasks.validate import validate_annotations

    with staging(a.endpoint_url) as st:
        ann = st.input(a.annotations, file=True)
        images = st.input(a.images)
        out = st.output(a.out)
        cfg = run_config_from_args(a)
        result = validate_annotations(ann, out, images=images, max_quarantine_fraction=cfg.max_quarantine_fraction)
        from tasks.anchors import write_coverage

        cov = write_coverage(out / "annotations.clean.json", out, cfg.model, cfg.image_size)
        return {**result, "anchor_coverage": cov["coverage"]}


def cmd_tfrecords(a: argparse.Namespace) -> Any:
    from tasks.tfrecords import build_tfrecords

    cfg = run_config_from_args(a)
    with staging(a.endpoint_url) as st:
        ann = st.input(a.annotations, file=True)
        images = st.input(a.images)
        out = st.output(a.out)
        return build_tfrecords(ann, images, out, num_shards=cfg.num_shards, val_fraction=cfg.val_fraction, seed=cfg.seed)


def run_config_from_args(a: argparse.Namespace) -> Any:
    """RunConfig from ``--run-config JSON`` (what the DAG passes to pods), then explicit flags."""
    from tasks.config import RunConfig

    params: dict[str, Any] = {}
    if getattr(a, "run_config", None):
        try:
            params = json.loads(a.run_config)
        except json.JSONDecodeError as exc:
            raise PersoncarError(f"--run-config is not valid JSON: {exc}") from None
        if not isinstance(params, dict):
            raise PersoncarError("--run-config must be a JSON object of run parameters")
    for key in RunConfig.model_fields:
        value = getattr(a, key, None)
        if value is not None:
            params[key] = value
    return RunConfig.from_params(params)


def cmd_train(a: argparse.Namespace) -> Any:
    run = run_config_from_args(a)
    from tasks import storage
    from tasks.train import resolve_start, train

    promoted = None
    if run.warm_start == "promoted" and run.publish_dest:
        from tasks.publish import previous_run

        promoted = previous_run(run.publish_dest, endpoint_url=a.endpoint_url)
    with staging(a.endpoint_url) as st:
        data = st.input(a.data)
        model_dir = st.output(a.model_dir, keep=True)  # a resumed run continues from what is there
        on_ckpt = (lambda _: st.sync(a.model_dir)) if storage.is_remote(a.model_dir) else None
        return train(data, model_dir, run, log_every=a.log_every, checkpoint_every=a.checkpoint_every,
                     export=not a.no_export, gpus=a.gpus, cpu_replicas=a.cpu_replicas, on_checkpoint=on_ckpt,
                     start=resolve_start(run, promoted=promoted), where={"endpoint_url": a.endpoint_url})


def cmd_convert_checkpoint(a: argparse.Namespace) -> Any:
    run = run_config_from_args(a)
    from tasks.convert_checkpoint import convert_to_dir

    return convert_to_dir(a.src, a.out, run)


def cmd_predict(a: argparse.Namespace) -> Any:
    from tasks.predict import predict

    with staging(a.endpoint_url) as st:
        model_dir = _exported_model(st, a.model_dir)
        data, images = st.input(a.data), st.input(a.images)
        out = st.output(a.out, file=True)
        dets = predict(model_dir, out, data=data, images=images, score_threshold=a.score_threshold)
        return {"detections": len(dets), "out": a.out}


def _exported_model(st: Any, model_dir: str) -> Path:
    """The model folder; from S3 only its exported SavedModel (not every checkpoint)."""
    from tasks import storage
    from tasks.train import EXPORT_SUBDIR

    return st.input(storage.join_uri(model_dir, EXPORT_SUBDIR)) if storage.is_remote(model_dir) else Path(model_dir)


def cmd_evaluate(a: argparse.Namespace) -> Any:
    from tasks.evaluate import evaluate
    from tasks.predict import evaluate_model

    with staging(a.endpoint_url) as st:
        out = st.output(a.out)
        if a.model_dir:
            if not a.data or a.annotations or a.detections:
                raise PersoncarError("evaluate takes either --annotations and --detections, or --model-dir and --data")
            return evaluate_model(_exported_model(st, a.model_dir), st.input(a.data), out)
        if not (a.annotations and a.detections):
            raise PersoncarError("evaluate needs --annotations and --detections (or --model-dir and --data)")
        return evaluate(st.input(a.annotations, file=True), st.input(a.detections, file=True), out)


def cmd_report(a: argparse.Namespace) -> Any:
    from tasks.report import build_report

    return build_report(a.run_dir, a.out)


def cmd_compare(a: argparse.Namespace) -> Any:
    from tasks import storage
    from tasks.compare import check_recommendation, compare_runs, sweep_runs

    where = {"endpoint_url": a.endpoint_url}
    runs = [(r.rstrip("/").rsplit("/", 1)[-1], r) for r in a.run_dirs]
    data = a.data
    if a.sweep:
        found, tfrecords = sweep_runs(a.sweep, where)
        runs, data = found + runs, data or tfrecords
    if not runs:
        raise PersoncarError("compare needs run folders (RUN_DIR...) or --sweep DIR")
    with staging(a.endpoint_url) as st:
        doc = compare_runs(runs, st.output(a.out), data=data, margin=a.margin, latency_images=a.latency_images,
                           where=where)
    check_recommendation(doc, storage.join_uri(a.out, "report.html"))
    return {"out": a.out, "recommended": doc["recommendation"]["name"], "reason": doc["recommendation"]["reason"],
            "ranking": doc["ranking"], "failed": doc["failed"]}


def cmd_publish(a: argparse.Namespace) -> Any:
    from tasks.publish import publish

    run_id = a.run_id or Path(a.src).resolve().parent.name
    return publish(a.src, a.dest, run_id=run_id, endpoint_url=a.endpoint_url)


class _Parser(argparse.ArgumentParser):
    """argparse with the CLI's error contract: one line on stderr (``personcar CMD: error: ...``), exit 2."""

    def error(self, message: str) -> Any:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


positive, non_negative = flag_type(int, {"ge": 1}), flag_type(int, {"ge": 0})
_fraction = flag_type(float, {"ge": 0.0, "le": 1.0})


TRAIN_FLAGS = ("model", "backbone", "epochs", "steps", "batch_size", "image_size", "learning_rate", "init_checkpoint",
               "init_checkpoint_modules", "warm_start", "publish_dest", "validate_every", "augment", "seed")


def _sample_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("--out", required=True, help="output folder (gets trainval/...)")
    s.add_argument("--images", type=int, default=24, help="number of images (default 24)")
    s.add_argument("--seed", type=non_negative, default=0)
    s.add_argument("--archive", help="also pack it as this trainval.tar.gz")


def _download_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("--source", required=True, help="s3://bucket/key, https://..., file://... or a path")
    s.add_argument("--dest", required=True, help="folder that receives trainval/...")
    s.add_argument("--sha256", help="expected sha256 of the archive")
    s.add_argument("--endpoint-url", help="S3-compatible endpoint")


def _validate_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("--annotations", required=True)
    s.add_argument("--images", help="image folder: also run the image checks")
    s.add_argument("--out", required=True)
    add_run_flags(s, ("model", "image_size", "max_quarantine_fraction"))
    s.add_argument("--endpoint-url", help="S3-compatible endpoint for s3:// paths")


def _tfrecords_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("--annotations", required=True, help="the cleaned COCO JSON (annotations.clean.json)")
    s.add_argument("--images", required=True)
    s.add_argument("--out", required=True)
    add_run_flags(s, ("num_shards", "val_fraction", "seed"))
    s.add_argument("--run-config", help="run parameters as JSON (flags override them)")
    s.add_argument("--endpoint-url", help="S3-compatible endpoint for s3:// paths")


def _train_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("--data", required=True, help="TFRecord folder")
    s.add_argument("--model-dir", required=True)
    add_run_flags(s, TRAIN_FLAGS)
    s.add_argument("--run-config", help="run parameters as JSON, as the DAG passes them (flags override them)")
    s.add_argument("--gpus", type=non_negative, help="GPUs to use (default: all visible; >1 uses MirroredStrategy)")
    s.add_argument("--cpu-replicas", type=positive, help="debugging: run the GPU code paths (MirroredStrategy, mixed "
                   "float16 with loss scaling, XLA) on this many CPU devices (default: $PERSONCAR_CPU_REPLICAS)")
    s.add_argument("--log-every", type=positive, default=10, help="steps between log lines and summaries")
    s.add_argument("--checkpoint-every", type=positive, help="steps between checkpoints")
    s.add_argument("--no-export", action="store_true", help="skip the SavedModel export")
    s.add_argument("--endpoint-url", help="S3-compatible endpoint for s3:// paths")


def _convert_checkpoint_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("--src", required=True, help="the zoo's .tar.gz (path or https://) or its checkpoint prefix/folder")
    s.add_argument("--out", required=True, help="folder for the converted checkpoint (ckpt-1) and conversion.json")
    add_run_flags(s, ("model", "backbone"))


def _predict_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("--model-dir", required=True)
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--data", help="TFRecord folder: predict its val split")
    g.add_argument("--images", help="a folder of images")
    s.add_argument("--out", required=True, help="detections JSON")
    s.add_argument("--score-threshold", type=_fraction, default=0.0)
    s.add_argument("--endpoint-url", help="S3-compatible endpoint for s3:// paths")


def _evaluate_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("--annotations", help="ground truth COCO JSON (val.coco.json)")
    s.add_argument("--detections", help="COCO results JSON")
    s.add_argument("--model-dir", help="instead of --detections: predict with this model ...")
    s.add_argument("--data", help="... on the val split of this TFRecord folder")
    s.add_argument("--out", required=True)
    s.add_argument("--endpoint-url", help="S3-compatible endpoint for s3:// paths")


def _report_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("--run-dir", required=True)
    s.add_argument("--out", required=True)


def _compare_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("run_dirs", nargs="*", metavar="RUN_DIR",
                   help="run folders with train/ and evaluate/ (a run of the DAG, a sweep's candidates/NAME)")
    s.add_argument("--out", required=True, help="folder for sweep.json, report.html, report.md, pr_curves.png")
    s.add_argument("--sweep", help="a backbone sweep's run folder: compare its candidates (candidates.json)")
    s.add_argument("--data", help="TFRecord folder whose val images time the models (default: the sweep's, or "
                                  "the first run folder's tfrecords/)")
    s.add_argument("--margin", type=_fraction, default=0.01,
                   help="a cheaper candidate within this mAP@.50IOU of the best is recommended (default 0.01)")
    s.add_argument("--latency-images", type=positive, default=20, help="val images to time each model on (20)")
    s.add_argument("--endpoint-url", help="S3-compatible endpoint for s3:// paths")


def _publish_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("--src", required=True)
    s.add_argument("--dest", required=True)
    s.add_argument("--run-id", help="default: the name of SRC's parent folder")
    s.add_argument("--endpoint-url")


#: the commands: name, handler, help, and what adds the command's arguments
COMMANDS: list[tuple[str, Any, str, Any]] = [
    ("sample", cmd_sample, "write an offline sample dataset in the production layout", _sample_args),
    ("download", cmd_download, "fetch, verify and safely extract the dataset archive", _download_args),
    ("validate", cmd_validate, "validate annotations (and images) with Great Expectations", _validate_args),
    ("tfrecords", cmd_tfrecords, "build sharded train/val TFRecords (OD API format)", _tfrecords_args),
    ("train", cmd_train, "train (or resume) the detector and export a SavedModel", _train_args),
    ("convert-checkpoint", cmd_convert_checkpoint,
     "convert a TF2 detection zoo SSD ResNet V1 FPN checkpoint onto this project's model", _convert_checkpoint_args),
    ("predict", cmd_predict, "run the exported model into a COCO results JSON", _predict_args),
    ("evaluate", cmd_evaluate, "COCO metrics (pycocotools) of detections against ground truth", _evaluate_args),
    ("report", cmd_report, "build report.html / report.md from a run folder", _report_args),
    ("compare", cmd_compare, "compare trained run folders: ranking, recommendation, sweep report", _compare_args),
    ("publish", cmd_publish, "upload a report folder to s3://bucket/prefix or file://", _publish_args),
]


def build_parser() -> argparse.ArgumentParser:
    from tasks import __version__

    p = _Parser(prog="personcar", description="Person/car detector pipeline stages.")
    p.add_argument("--version", action="version", version=f"personcar {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, fn, help_, add_args in COMMANDS:
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.set_defaults(fn=fn)
        add_args(sp)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a bad value (one line already on stderr)
        return exc.code if isinstance(exc.code, int) else 2
    _setup_logging(args.verbose)
    try:
        result = args.fn(args)
    except PersoncarError as exc:
        print(f"personcar {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"personcar {args.command}: interrupted", file=sys.stderr)
        return 130
    if isinstance(result, dict):
        summary = {k: v for k, v in result.items() if not isinstance(v, (list, dict)) or len(json.dumps(v)) < 400}
        print(json.dumps(summary, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
