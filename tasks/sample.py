"""An offline sample dataset in exactly the production layout and JSON format.

Drawn scenes: person-like figures (head, torso, legs; tall) and car-like shapes (body, cabin,
wheels; wide) on a textured outdoor background, so a detector can really learn them. The JSON
mirrors the published file, defects included: ``area`` is a fraction of the image and the
annotations are not sorted by image, so the sample exercises the same normalisation as production.
Deterministic for a seed (same bytes, archive included).
"""

from __future__ import annotations

import gzip
import io
import json
import os
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from tasks.artifacts import StageOutputs, atomic_dir, check_output_dir
from tasks.logs import log

CATEGORIES = [
    {"id": 1, "name": "person", "supercategory": "none"},
    {"id": 2, "name": "car", "supercategory": "none"},
]
LICENSES = [
    {"url": "https://creativecommons.org/licenses/by/2.0/", "id": 1, "name": "Attribution License"},
    {"url": "https://creativecommons.org/licenses/by/4.0/", "id": 2, "name": "Attribution License"},
]
# (width, height) in the proportions of the real images (1024x768, 1024x683, portrait), scaled down
SIZES = [(512, 384), (512, 342), (384, 512), (480, 360)]
ANNOTATIONS_REL = Path("trainval/annotations/bbox-annotations.json")
IMAGES_REL = Path("trainval/images")


def _colour(rng: np.random.Generator, lo: int = 0, hi: int = 256) -> tuple[int, int, int]:
    return tuple(int(c) for c in rng.integers(lo, hi, size=3))  # type: ignore[return-value]


def _background(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    sky, ground = np.array(_colour(rng, 120, 230)), np.array(_colour(rng, 40, 140))
    horizon = int(h * rng.uniform(0.3, 0.6))
    t = np.clip((np.arange(h) - horizon) / 8.0, 0, 1)[:, None, None]
    img = (1 - t) * sky + t * ground
    img = np.broadcast_to(img, (h, w, 3)) + rng.normal(0, 12, size=(h, w, 3))
    canvas = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(2, 6))):  # clutter: trees/bushes (round, green-brown), not boxes
        cx, cy = int(rng.integers(0, w)), int(rng.integers(horizon - 20, h))
        r = int(rng.integers(10, 40))
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(int(rng.integers(20, 90)), int(rng.integers(80, 160)), 30))
    return canvas.filter(ImageFilter.GaussianBlur(0.6))


def _person(draw: ImageDraw.ImageDraw, rng: np.random.Generator, x: int, y: int, w: int, h: int) -> None:
    skin = (int(rng.integers(150, 240)), int(rng.integers(110, 190)), int(rng.integers(80, 160)))
    shirt, trousers = _colour(rng), _colour(rng, 0, 120)
    head = h * 0.16
    cx = x + w / 2
    draw.ellipse([cx - head / 2, y, cx + head / 2, y + head], fill=skin)
    torso_top, torso_bot = y + head, y + h * 0.58
    draw.rounded_rectangle([x, torso_top, x + w - 1, torso_bot], radius=max(1, w // 5), fill=shirt)
    leg_w = w * 0.38
    draw.rectangle([cx - leg_w - 1, torso_bot, cx - 1, y + h - 1], fill=trousers)
    draw.rectangle([cx + 1, torso_bot, cx + leg_w + 1, y + h - 1], fill=trousers)


def _car(draw: ImageDraw.ImageDraw, rng: np.random.Generator, x: int, y: int, w: int, h: int) -> None:
    body = _colour(rng)
    wheel = h * 0.36
    body_top, body_bot = y + h * 0.38, y + h - wheel / 2
    draw.polygon([(x + w * 0.22, body_top), (x + w * 0.35, y), (x + w * 0.72, y), (x + w * 0.85, body_top)], fill=body)
    draw.rectangle([x + w * 0.36, y + h * 0.06, x + w * 0.70, body_top - 2], fill=(170, 200, 220))  # windows
    draw.rounded_rectangle([x, body_top, x + w - 1, body_bot], radius=max(1, int(h * 0.12)), fill=body)
    for wx in (x + w * 0.22, x + w * 0.78):
        draw.ellipse([wx - wheel / 2, y + h - wheel, wx + wheel / 2, y + h - 1], fill=(25, 25, 25))


def _place(rng: np.random.Generator, W: int, H: int, aspect: float, placed: list[list[int]]) -> list[int] | None:
    """A box of width/height ratio ``aspect`` covering at most 25% of any earlier box (and vice versa)."""
    for _ in range(30):
        h = int(rng.uniform(0.18, 0.55) * H) if aspect < 1 else int(rng.uniform(0.12, 0.35) * H)
        w = max(8, int(h * aspect))
        if w >= W - 2 or h >= H - 2:
            continue
        x, y = int(rng.integers(0, W - w)), int(rng.integers(0, H - h))
        box = [x, y, w, h]
        if all(_overlap(box, b) < 0.25 for b in placed):
            return box
    return None


def _overlap(a: list[int], b: list[int]) -> float:
    """Intersection over the smaller box's area: how much of the smaller one is hidden."""
    ix = max(0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    return ix * iy / float(min(a[2] * a[3], b[2] * b[3]))


def render_image(rng: np.random.Generator) -> tuple[Image.Image, list[tuple[int, list[int]]]]:
    """One scene and its boxes ``[(category_id, [x, y, w, h]), ...]``; at least one of each class."""
    W, H = SIZES[int(rng.integers(len(SIZES)))]
    img = _background(rng, W, H)
    draw = ImageDraw.Draw(img)
    kinds = [1] * int(rng.integers(1, 4)) + [2] * int(rng.integers(1, 3))
    objects: list[tuple[int, list[int]]] = []
    for cat in kinds:
        box = _place(rng, W, H, rng.uniform(0.32, 0.5) if cat == 1 else rng.uniform(1.8, 2.6), [b for _, b in objects])
        if box is not None:
            objects.append((cat, box))
    for cat in (1, 2):  # guarantee each class appears, as in the real data
        if not any(c == cat for c, _ in objects):
            aspect = 0.4 if cat == 1 else 2.2
            h = int(0.3 * H) if cat == 1 else int(0.2 * H)
            objects.append((cat, [int(0.05 * W) if cat == 1 else int(0.5 * W), int(0.6 * H), int(h * aspect), h]))
    objects.sort(key=lambda o: o[1][1] + o[1][3])  # paint far (top) to near (bottom)
    for cat, (x, y, w, h) in objects:
        (_person if cat == 1 else _car)(draw, rng, x, y, w, h)
    return img, objects


def make_sample(out: str | Path, *, images: int = 24, seed: int = 0, archive: str | Path | None = None) -> dict[str, Any]:
    """Write ``OUT/trainval/images/image_%09d.jpg`` and the annotations JSON; optionally a tar.gz."""
    if images < 1:
        from tasks.errors import PersoncarError

        raise PersoncarError(f"--images must be at least 1, got {images}")
    out = Path(out)
    # a sample folder holds trainval/ (and the archive, when it is packed inside the folder)
    inside = archive is not None and Path(os.path.abspath(archive)).parent == Path(os.path.abspath(out))
    outputs = StageOutputs("sample", names=("trainval",) + ((Path(archive).name,) if inside else ()))
    check_output_dir(out, outputs)
    rng = np.random.default_rng(seed)
    coco: dict[str, Any] = {"images": [], "annotations": [], "categories": CATEGORIES, "licenses": LICENSES}
    with atomic_dir(out, outputs) as tmp:
        (tmp / IMAGES_REL).mkdir(parents=True)
        (tmp / ANNOTATIONS_REL).parent.mkdir(parents=True)
        for image_id in range(images):
            img, objects = render_image(rng)
            name = f"image_{image_id + 1:09d}.jpg"
            img.save(tmp / IMAGES_REL / name, format="JPEG", quality=90)
            W, H = img.size
            coco["images"].append({"file_name": name, "width": W, "height": H, "id": image_id, "license": 1})
            for cat, (x, y, w, h) in objects:
                coco["annotations"].append({
                    "category_id": cat, "image_id": image_id, "segmentation": [], "iscrowd": 0,
                    "bbox": [x, y, w, h], "area": w * h / float(W * H),  # a fraction, as published
                    "id": 0, "license": 2,
                })
        order = rng.permutation(len(coco["annotations"]))  # published file is not sorted by image
        coco["annotations"] = [coco["annotations"][i] for i in order]
        for ann_id, ann in enumerate(coco["annotations"]):
            ann["id"] = ann_id
        (tmp / ANNOTATIONS_REL).write_text(json.dumps(coco))
    summary = {
        "out": str(out),
        "images": images,
        "boxes": len(coco["annotations"]),
        "per_class": {c["name"]: sum(a["category_id"] == c["id"] for a in coco["annotations"]) for c in CATEGORIES},
        "seed": seed,
    }
    if archive is not None:
        summary["archive"] = str(pack_archive(out, archive))
    log.info("sample: %d images, %d boxes (%s) in %s", images, summary["boxes"], summary["per_class"], out)
    return summary


def pack_archive(root: str | Path, archive: str | Path) -> Path:
    """Pack ``ROOT/trainval`` as a reproducible ``trainval.tar.gz`` (sorted, zero mtimes and owners)."""
    root, archive = Path(root), Path(archive)
    archive.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        paths = [root / "trainval", *sorted((root / "trainval").rglob("*"))]
        for p in paths:
            info = tar.gettarinfo(str(p), arcname=str(p.relative_to(root)))
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
            info.mode = 0o755 if p.is_dir() else 0o644
            if p.is_file():
                with open(p, "rb") as f:
                    tar.addfile(info, f)
            else:
                tar.addfile(info)
    tmp = archive.with_name(f".{archive.name}.tmp")
    with open(tmp, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
        gz.write(buf.getvalue())
    tmp.replace(archive)
    return archive
