"""Run the exported SavedModel on the val split (or a folder of images) into COCO results JSON."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tasks.artifacts import write_json_atomic
from tasks.errors import PersoncarError
from tasks.logs import Progress, log
from tasks.train import EXPORT_SUBDIR, _setup_tf

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}
PRODUCTION_NAME = re.compile(r"image_(\d{9})\.jpe?g$")


def find_saved_model(model_dir: str | Path) -> Path:
    model_dir = Path(model_dir)
    for candidate in (model_dir / EXPORT_SUBDIR, model_dir):
        if (candidate / "saved_model.pb").is_file():
            return candidate
    raise PersoncarError(f"{model_dir}: no exported SavedModel (expected {model_dir / EXPORT_SUBDIR}/saved_model.pb; run `personcar train` first)")


def _val_records(data: Path) -> Iterator[tuple[int, str, bytes]]:
    """(COCO image id, file name, encoded image) for every record of the val shards."""
    from tasks.proto import tf_example_pb2 as pb
    from tasks.tfrecords import read_records

    shards = sorted(data.glob("val-*.tfrecord"))
    if not shards:
        raise PersoncarError(f"{data}: no val-*.tfrecord shards (was it built with --val-fraction 0?)")
    for shard in shards:
        for raw in read_records(shard):
            feat = pb.Example.FromString(raw).features.feature
            yield (int(feat["image/source_id"].bytes_list.value[0]),
                   feat["image/filename"].bytes_list.value[0].decode(),
                   feat["image/encoded"].bytes_list.value[0])


def _folder_images(images: Path) -> Iterator[tuple[int, str, bytes]]:
    """Images of a folder; ids follow the production naming (image_000000001.jpg is id 0)."""
    files = sorted(p for p in images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise PersoncarError(f"{images}: no .jpg/.jpeg/.png images")
    for index, path in enumerate(files):
        m = PRODUCTION_NAME.search(path.name)
        yield (int(m.group(1)) - 1 if m else index), path.name, path.read_bytes()


def predict(model_dir: str | Path, out: str | Path, *, data: str | Path | None = None,
            images: str | Path | None = None, score_threshold: float = 0.0) -> list[dict[str, Any]]:
    """Write COCO results ``[{image_id, category_id, bbox: [x, y, w, h] px, score, file_name}]``."""
    if (data is None) == (images is None):
        raise PersoncarError("predict needs exactly one of --data (a TFRecord folder) or --images (a folder)")
    saved = find_saved_model(model_dir)
    tf = _setup_tf()
    model = tf.saved_model.load(str(saved))
    serve = model.signatures["serving_default"]
    source = _val_records(Path(data)) if data is not None else _folder_images(Path(images))  # type: ignore[arg-type]
    results: list[dict[str, Any]] = []
    progress = Progress("predict", unit="images")
    for image_id, name, encoded in source:
        image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
        h, w = int(image.shape[0]), int(image.shape[1])
        out_t = serve(tf.expand_dims(image, 0))
        n = int(out_t["num_detections"][0])
        boxes = out_t["detection_boxes"][0][:n].numpy()  # normalised [ymin, xmin, ymax, xmax]
        classes = out_t["detection_classes"][0][:n].numpy()
        scores = out_t["detection_scores"][0][:n].numpy()
        for (y0, x0, y1, x1), c, s in zip(boxes, classes, scores, strict=True):
            if s < score_threshold:
                continue
            bw, bh = (x1 - x0) * w, (y1 - y0) * h
            if bw <= 0 or bh <= 0:
                continue
            results.append({"image_id": image_id, "category_id": int(c),
                            "bbox": [round(float(x0 * w), 2), round(float(y0 * h), 2), round(float(bw), 2), round(float(bh), 2)],
                            "score": round(float(s), 5), "file_name": name})
        progress.update()
    progress.finish()
    write_json_atomic(out, results, indent=None)
    log.info("predict: %d detections on %d images -> %s", len(results), progress.done, out)
    return results


def evaluate_model(model_dir: str | Path, data: str | Path, out: str | Path) -> dict[str, Any]:
    """Predict the val split of a TFRecord folder and evaluate it against ``val.coco.json``.

    ``OUT`` gets ``metrics.json`` and the rest of ``personcar evaluate``'s outputs, with the
    detections as ``OUT/detections.json``.
    """
    import tempfile

    from tasks.evaluate import evaluate

    gt = Path(data) / "val.coco.json"
    if not gt.is_file():
        raise PersoncarError(f"{gt} is missing: build the TFRecords first (`personcar tfrecords`)")
    with tempfile.TemporaryDirectory(prefix="personcar-predict-") as tmp:
        detections = Path(tmp) / "detections.json"
        predict(model_dir, detections, data=data)
        return evaluate(gt, detections, out)
