"""TFRecord conversion speed: ours vs Model Garden's reference converter on the same input.

Input: the 112 real images of ../shared/data/personcar replicated (hard links) to the full
dataset's 2,239 entries, with the annotations replicated and areas in pixels. Prints both wall
times and the output sizes.

    .venv/bin/python benchmarks/bench_tfrecords.py [--shards 4]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("PERSONCAR_SHARED_DATA", REPO.parent / "shared" / "data" / "personcar"))
FULL = 2239


def replicate(work: Path) -> tuple[Path, Path]:
    src = json.loads((SHARED / "bbox-annotations.sample112.json").read_text())
    images = work / "images"
    images.mkdir()
    by_image: dict[int, list[dict]] = {}
    for a in src["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    coco = {"images": [], "annotations": [], "categories": src["categories"], "licenses": src["licenses"]}
    for new_id in range(FULL):
        im = src["images"][new_id % len(src["images"])]
        name = f"image_{new_id + 1:09d}.jpg"
        try:
            os.link(SHARED / "images" / im["file_name"], images / name)
        except OSError:
            shutil.copyfile(SHARED / "images" / im["file_name"], images / name)
        coco["images"].append({**im, "id": new_id, "file_name": name})
        for a in by_image.get(im["id"], []):
            x, y, w, h = a["bbox"]
            if w <= 0 or h <= 0:
                continue
            coco["annotations"].append({**a, "id": len(coco["annotations"]), "image_id": new_id, "area": float(w * h)})
    ann = work / "annotations.json"
    ann.write_text(json.dumps(coco))
    return ann, images


def size(paths: list[Path]) -> int:
    return sum(p.stat().st_size for p in paths)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", type=int, default=4)
    args = ap.parse_args()
    from tasks.tfrecords import build_tfrecords

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ann, images = replicate(work)
        print(f"input: {FULL} images ({size(list(images.iterdir())) / 2**20:.0f} MB), "
              f"{len(json.loads(ann.read_text())['annotations'])} boxes, {os.cpu_count()} cores")

        t = time.perf_counter()
        build_tfrecords(ann, images, work / "ours", num_shards=args.shards, val_fraction=0.1)
        ours = time.perf_counter() - t
        ours_size = size(list((work / "ours").glob("*.tfrecord")))

        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "official.vision.data.create_coco_tf_record",
                        f"--image_dir={images}", f"--object_annotations_file={ann}",
                        f"--output_file_prefix={work / 'ref' / 'train'}", f"--num_shards={args.shards}",
                        f"--num_processes={os.cpu_count()}"],
                       check=True, capture_output=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
        ref = time.perf_counter() - t
        ref_size = size(list((work / "ref").glob("train*")))
        print(f"personcar tfrecords                      : {ours:6.2f} s wall, {ours_size / 2**20:.0f} MB, "
              f"{FULL / ours:.0f} images/s (train + val, hashes, read-back check)")
        print(f"official.vision.data.create_coco_tf_record: {ref:6.2f} s wall, {ref_size / 2**20:.0f} MB, "
              f"{FULL / ref:.0f} images/s (includes its TensorFlow import)")


if __name__ == "__main__":
    main()
