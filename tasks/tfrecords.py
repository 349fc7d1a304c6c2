"""Sharded TFRecords in the TF Object Detection API's ``tf.train.Example`` format.

The writer needs no TensorFlow: records are ``tf.train.Example`` protos (a wire-compatible copy in
``tasks/proto``) framed as TFRecord (length, masked CRC32C, data, masked CRC32C), so the stage runs
in the Airflow worker as well as in the trainer image. Model Garden's TFRecord decoder and
``tf.io.parse_single_example`` read the output (tests check both).

Split: an image goes to val when a stable hash of its file name falls under ``val_fraction``, so
adding images never moves an old one between splits. Shards are written in parallel, one process
per shard, and are byte-identical across re-runs.

Inputs are checked by the validation rules themselves (:mod:`data_checks.dataset`: the same
suites, image checks and label map, without Data Docs): a file that breaks any fatal or quarantine
rule is refused with one line naming the file, the rule and the records, so a file that validation
would reject (NaN or negative boxes, a file name outside ``--images``, a truncated or oversized
image, a category list that is not the model's label map, an EXIF-rotated photo) never becomes
training data, whatever file is passed.
"""

from __future__ import annotations

import hashlib
import os
import struct
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.artifacts import StageOutputs, atomic_dir, check_output_dir, sha256_file, write_json_atomic
from tasks.config import CLASSES
from tasks.errors import PersoncarError
from tasks.logs import Progress, log

TARGET_SHARD_BYTES = 150 * 2**20  # ~100-200 MB a shard
FORMATS = {"JPEG": "jpeg", "PNG": "png"}
OUTPUTS = StageOutputs("tfrecords", "manifest.json", keys=("splits", "shards", "label_map"),
                       names=("train-*-of-*.tfrecord", "val-*-of-*.tfrecord", "label_map.pbtxt", "val.coco.json",
                              "manifest.json"))


# -- TFRecord framing ------------------------------------------------------------------------
def _masked_crc(data: bytes) -> int:
    import google_crc32c

    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def frame_record(data: bytes) -> bytes:
    """One TFRecord: uint64 length, masked crc of the length, data, masked crc of the data."""
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", _masked_crc(length)) + data + struct.pack("<I", _masked_crc(data))


def read_records(path: str | Path) -> list[bytes]:
    """Read every record of a TFRecord file, checking both CRCs (used for the read-back check)."""
    out = []
    with open(path, "rb") as f:
        while header := f.read(12):
            if len(header) < 12:
                raise PersoncarError(f"{path}: truncated record header at byte {f.tell()}")
            (length,), (length_crc,) = struct.unpack("<Q", header[:8]), struct.unpack("<I", header[8:])
            if _masked_crc(header[:8]) != length_crc:
                raise PersoncarError(f"{path}: corrupt record length at byte {f.tell() - 12}")
            data, (data_crc,) = f.read(length), struct.unpack("<I", f.read(4))
            if _masked_crc(data) != data_crc:
                raise PersoncarError(f"{path}: corrupt record data at byte {f.tell() - length - 4}")
            out.append(data)
    return out


# -- tf.train.Example ------------------------------------------------------------------------
@dataclass(frozen=True)
class ImageRecord:
    image: dict[str, Any]          # the COCO image entry
    annotations: list[dict[str, Any]]


def make_example(rec: ImageRecord, image_path: Path, names: dict[int, str],
                 max_pixels: int | None = None) -> bytes:
    """Serialise one image and its boxes with the OD API keys (normalised, clipped boxes)."""
    import warnings

    from PIL import Image

    from data_checks.images import ImageTooLarge, open_image
    from data_checks.rules import Thresholds
    from tasks.proto import tf_example_pb2 as pb

    encoded = image_path.read_bytes()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # open_image enforces the limit
            im = open_image(image_path, max_pixels or Thresholds().max_image_pixels)
    except ImageTooLarge as exc:
        raise PersoncarError(f"{image_path}: image too large: {exc} (rule: image_too_large)") from exc
    with im:  # header only: format and size, no decode
        fmt, (w, h) = FORMATS.get(im.format or "", ""), im.size
    if not fmt:
        raise PersoncarError(f"{image_path}: unsupported image format {im.format!r} (rule: jpeg or png)")
    W, H = rec.image["width"], rec.image["height"]
    if (w, h) != (W, H):
        raise PersoncarError(f"{image_path}: size {w}x{h} differs from the annotations' {W}x{H} (image id {rec.image['id']})")
    xmin, xmax, ymin, ymax, text, label, crowd, area = [], [], [], [], [], [], [], []
    for a in rec.annotations:
        x, y, bw, bh = a["bbox"]
        xmin.append(max(0.0, x / W))
        xmax.append(min(1.0, (x + bw) / W))
        ymin.append(max(0.0, y / H))
        ymax.append(min(1.0, (y + bh) / H))
        text.append(names[a["category_id"]].encode())
        label.append(int(a["category_id"]))
        crowd.append(int(a.get("iscrowd", 0)))
        area.append(float(a.get("area", bw * bh)))

    def b(*v: bytes) -> pb.Feature:
        return pb.Feature(bytes_list=pb.BytesList(value=list(v)))

    def f(v: list[float]) -> pb.Feature:
        return pb.Feature(float_list=pb.FloatList(value=v))

    def i(v: list[int]) -> pb.Feature:
        return pb.Feature(int64_list=pb.Int64List(value=v))

    feature = {
        "image/height": i([H]),
        "image/width": i([W]),
        "image/filename": b(rec.image["file_name"].encode()),
        "image/source_id": b(str(rec.image["id"]).encode()),
        "image/key/sha256": b(hashlib.sha256(encoded).hexdigest().encode()),
        "image/encoded": b(encoded),
        "image/format": b(fmt.encode()),
        "image/object/bbox/xmin": f(xmin),
        "image/object/bbox/xmax": f(xmax),
        "image/object/bbox/ymin": f(ymin),
        "image/object/bbox/ymax": f(ymax),
        "image/object/class/text": b(*text),
        "image/object/class/label": i(label),
        "image/object/is_crowd": i(crowd),
        "image/object/area": f(area),
    }
    ex = pb.Example(features=pb.Features(feature=feature))
    return ex.SerializeToString(deterministic=True)


# -- split, shards ---------------------------------------------------------------------------
def split_key(file_name: str) -> float:
    """A stable number in [0, 1) per file name: the split never depends on the other images."""
    digest = hashlib.sha256(file_name.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_images(records: list[ImageRecord], val_fraction: float) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """Hash split, then stratify: if a class is missing from val, move its lowest-hash train image."""
    train = [r for r in records if split_key(r.image["file_name"]) >= val_fraction]
    val = [r for r in records if split_key(r.image["file_name"]) < val_fraction]
    if 0 < val_fraction < 1 and train and val:
        classes = {a["category_id"] for r in records for a in r.annotations}
        for cat in sorted(classes - {a["category_id"] for r in val for a in r.annotations}):
            candidates = [r for r in train if any(a["category_id"] == cat for a in r.annotations)]
            if len(candidates) > 0 and len(train) > 1:
                move = min(candidates, key=lambda r: split_key(r.image["file_name"]))
                train.remove(move)
                val.append(move)
                log.info("split: moved %s to val so that class %d is evaluated", move.image["file_name"], cat)
    key = lambda r: r.image["id"]
    return sorted(train, key=key), sorted(val, key=key)


def shard_count(records: list[ImageRecord], images_dir: Path, requested: int | None) -> int:
    if requested:
        return max(1, min(requested, len(records))) if records else 1
    total = sum((images_dir / r.image["file_name"]).stat().st_size for r in records)
    return max(1, round(total / TARGET_SHARD_BYTES))


def _write_shard(args: tuple[Path, list[ImageRecord], Path, dict[int, str]]) -> tuple[str, int, str]:
    path, recs, images_dir, names = args
    with open(path, "wb") as out:
        for rec in recs:
            out.write(frame_record(make_example(rec, images_dir / rec.image["file_name"], names)))
    return path.name, len(recs), sha256_file(path)


def write_split(name: str, recs: list[ImageRecord], out: Path, images_dir: Path, names: dict[int, str],
                num_shards: int, workers: int) -> list[dict[str, Any]]:
    if not recs:
        return []
    # round-robin by position keeps shards balanced; order inside a shard follows image ids
    jobs = [(out / f"{name}-{k:05d}-of-{num_shards:05d}.tfrecord", recs[k::num_shards], images_dir, names)
            for k in range(num_shards)]
    progress = Progress(f"tfrecords {name}", total=len(recs), unit="images")
    results = []
    if workers > 1 and num_shards > 1:
        with ProcessPoolExecutor(max_workers=min(workers, num_shards)) as pool:
            for res in pool.map(_write_shard, jobs):
                results.append(res)
                progress.update(res[1])
    else:
        for job in jobs:
            results.append(_write_shard(job))
            progress.update(results[-1][1])
    progress.finish()
    return [{"file": f, "images": n, "sha256": h} for f, n, h in results]


def label_map_pbtxt(categories: list[dict[str, Any]]) -> str:
    return "".join(f"item {{\n  id: {c['id']}\n  name: '{c['name']}'\n}}\n" for c in sorted(categories, key=lambda c: c["id"]))


def _summary(recs: list[ImageRecord], names: dict[int, str]) -> dict[str, Any]:
    per_class = {n: 0 for n in names.values()}
    for r in recs:
        for a in r.annotations:
            per_class[names[a["category_id"]]] += 1
    return {"images": len(recs), "boxes": sum(per_class.values()), "per_class": per_class,
            "image_ids": [r.image["id"] for r in recs]}


def build_tfrecords(annotations: str | Path, images: str | Path, out: str | Path, *,
                    num_shards: int | None = None, val_fraction: float = 0.1, seed: int = 42,
                    workers: int | None = None) -> dict[str, Any]:
    """Convert the cleaned COCO JSON and its images into sharded train/val TFRecords.

    Writes ``OUT/train-*.tfrecord``, ``OUT/val-*.tfrecord``, ``label_map.pbtxt``, ``val.coco.json``
    (val ground truth, pixel areas) and ``manifest.json``, all or nothing. ``seed`` is recorded in
    the manifest; the split itself depends only on file names so that it stays stable.
    """
    from data_checks.dataset import require_valid

    annotations, images_dir, out = Path(annotations), Path(images), Path(out)
    if not 0.0 <= val_fraction <= 1.0:
        raise PersoncarError(f"--val-fraction must be within [0, 1], got {val_fraction}")
    if not images_dir.is_dir():
        raise PersoncarError(f"{images_dir}: images folder not found")
    check_output_dir(out, OUTPUTS, inputs=(annotations, images_dir))
    # the validation rules themselves, on this very file and these images
    coco = require_valid(annotations, images_dir, label_map=CLASSES,
                         hint="; run `personcar validate` and build from its annotations.clean.json")
    names = {int(c["id"]): str(c["name"]) for c in coco["categories"]}
    by_image: dict[int, list[dict[str, Any]]] = {int(im["id"]): [] for im in coco["images"]}
    for a in coco["annotations"]:
        if a["image_id"] not in by_image:
            raise PersoncarError(f"{annotations}: annotation {a['id']} points at missing image {a['image_id']}")
        if a["category_id"] not in names:
            raise PersoncarError(f"{annotations}: annotation {a['id']} has unknown category {a['category_id']}")
        if max(a.get("area", 0.0), 0.0) <= 1.0 and a["bbox"][2] * a["bbox"][3] > 1.0:
            raise PersoncarError(
                f"{annotations}: annotation {a['id']} has area {a.get('area')} for a {a['bbox'][2]}x{a['bbox'][3]} box: "
                "areas look like image fractions; run `personcar validate` first and use annotations.clean.json")
        by_image[a["image_id"]].append(a)
    records = [ImageRecord(im, sorted(by_image[int(im["id"])], key=lambda a: a["id"]))
               for im in sorted(coco["images"], key=lambda im: im["id"])]
    missing = [r.image["file_name"] for r in records if not (images_dir / r.image["file_name"]).is_file()]
    if missing:
        raise PersoncarError(f"{images_dir}: {len(missing)} image(s) listed in {annotations.name} are missing, e.g. {missing[0]}")

    train, val = split_images(records, val_fraction)
    workers = workers or os.cpu_count() or 1
    with atomic_dir(out, OUTPUTS) as tmp:
        shards = {
            "train": write_split("train", train, tmp, images_dir, names, shard_count(train, images_dir, num_shards), workers),
            "val": write_split("val", val, tmp, images_dir, names, shard_count(val, images_dir, num_shards), workers),
        }
        (tmp / "label_map.pbtxt").write_text(label_map_pbtxt(coco["categories"]))
        val_ids = {r.image["id"] for r in val}
        val_coco = {
            "images": [r.image for r in val],
            "annotations": [a for r in val for a in r.annotations],
            "categories": coco["categories"],
        }
        for a in val_coco["annotations"]:
            a["area"] = float(a["bbox"][2] * a["bbox"][3])  # pixel areas for COCOeval's size buckets
        write_json_atomic(tmp / "val.coco.json", val_coco, indent=None)
        # read-back check: every record of every shard parses and the counts add up
        for split, entries in shards.items():
            n = sum(len(read_records(tmp / e["file"])) for e in entries)
            expected = len(train) if split == "train" else len(val_ids)
            if n != expected:
                raise PersoncarError(f"read-back check failed: {n} {split} records on disk, expected {expected}")
        manifest = {
            "annotations": str(annotations),
            "annotations_sha256": sha256_file(annotations),
            "val_fraction": val_fraction,
            "seed": seed,
            "splits": {"train": _summary(train, names), "val": _summary(val, names)},
            "shards": shards,
            "label_map": {str(k): v for k, v in sorted(names.items())},
        }
        write_json_atomic(tmp / "manifest.json", manifest)
    log.info("tfrecords: %d train / %d val images in %d + %d shards at %s", len(train), len(val),
             len(shards["train"]), len(shards["val"]), out)
    return manifest
