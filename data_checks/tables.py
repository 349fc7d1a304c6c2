"""From a COCO annotation file to the tables the suites check.

Three steps, each tolerant of anything the previous one lets through:

1. :func:`load_document` parses the file (``json_syntax``).
2. :func:`check_structure` is the light structural check that must pass before tables can be
   built at all: the top level is an object and ``images``/``annotations``/``categories`` are lists
   of objects (``structure``). Nothing about field values is checked here.
3. :func:`build_tables` turns the records into one row per image, per box and per category. Every
   field gets a ``<field>_kind`` column naming its JSON type exactly (``integer`` is never a
   boolean, ``number`` is always finite), so the suites can check types with value-set
   expectations, and a coerced value column that is null wherever the kind is wrong. Derived
   columns (the box/image join, clipped sizes, relative size, aspect ratio) are computed here in
   pandas so that Great Expectations checks them as plain columns.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from data_checks.labels import entry as label_entry
from tasks.errors import DataValidationError, PersoncarError

MISSING = object()
MAX_EXACT_INT = 2**53  # larger integers lose precision as floats: rejected as ids and sizes
MAX_COORD = 1e7  # a box coordinate beyond ten million pixels is not a coordinate
BBOX_OK = "[x, y, w, h] numbers"


class StructureError(DataValidationError):
    """The file cannot be read as COCO tables at all (not JSON, or the wrong top-level shape)."""

    def __init__(self, path: str | os.PathLike[str], check: str, detail: str, where: str):
        super().__init__(f"{path}: {check}: {detail}")
        self.check, self.detail, self.where = check, detail, where


def load_document(path: str | os.PathLike[str]) -> Any:
    """Parse the annotation file. An unreadable path is a user error; bad JSON fails the dataset."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError as exc:
        raise PersoncarError(f"{path}: annotation file not found") from exc
    except IsADirectoryError as exc:
        raise PersoncarError(f"{path}: is a folder, expected an annotation JSON file") from exc
    except OSError as exc:
        raise PersoncarError(f"{path}: cannot read annotation file: {exc.strerror or exc}") from exc
    try:
        return json.loads(raw)
    except UnicodeDecodeError as exc:
        raise StructureError(path, "json_syntax", f"not UTF-8 text (byte {exc.start})",
                             f"byte {exc.start}") from exc
    except json.JSONDecodeError as exc:
        raise StructureError(path, "json_syntax", f"{exc.msg} at line {exc.lineno} column {exc.colno}",
                             f"line {exc.lineno} column {exc.colno}") from exc
    except RecursionError as exc:
        raise StructureError(path, "json_syntax", "nesting too deep", "document") from exc


def json_kind(v: Any) -> str:
    """The JSON type of a parsed value, strict: booleans are not integers, numbers are finite."""
    if v is MISSING:
        return "missing"
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int):
        return "integer" if -MAX_EXACT_INT <= v <= MAX_EXACT_INT else "integer out of range"
    if isinstance(v, float):
        return "number" if math.isfinite(v) else "non-finite number"
    if isinstance(v, str):
        if not v:
            return "empty string"
        try:
            v.encode("utf-8")  # JSON escapes can spell lone surrogates: not text
        except UnicodeEncodeError:
            return "string with invalid unicode"
        return "string"
    if isinstance(v, list):
        return "array"
    if isinstance(v, dict):
        return "object"
    return type(v).__name__


def bbox_kind(v: Any) -> str:
    k = json_kind(v)
    if k != "array":
        return k
    if len(v) != 4:
        return f"array of {len(v)}"
    kinds = [json_kind(e) for e in v]
    bad = [e for e in kinds if e not in ("integer", "number")]
    if bad:
        return f"array with {bad[0]}"
    if any(abs(e) > MAX_COORD for e in v):
        return "array with out-of-range number"
    return BBOX_OK


def _type_name(v: Any) -> str:
    k = json_kind(v)
    return {"object": "an object", "array": "a list", "integer": "a number", "number": "a number",
            "string": "a string", "empty string": "a string", "null": "null",
            "boolean": "a boolean"}.get(k, k)


def check_structure(doc: Any) -> tuple[str, str] | None:
    """The first structural problem as ``(where, message)``, or None when tables can be built."""
    if not isinstance(doc, dict):
        return "document", f"top level is {_type_name(doc)}, expected an object"
    for key in ("images", "annotations", "categories"):
        if key not in doc:
            return key, f"missing top-level key '{key}'"
        value = doc[key]
        if not isinstance(value, list):
            return key, f"'{key}' is {_type_name(value)}, expected a list"
        for i, rec in enumerate(value):
            if not isinstance(rec, dict):
                return f"{key}[{i}]", f"{key}[{i}] is {_type_name(rec)}, expected an object"
    if "licenses" in doc and not isinstance(doc["licenses"], list):
        return "licenses", f"'licenses' is {_type_name(doc['licenses'])}, expected a list"
    return None


@dataclass
class Tables:
    images: pd.DataFrame
    annotations: pd.DataFrame
    categories: pd.DataFrame


def _ints(values: list[Any], kinds: list[str]) -> pd.Series:
    """Python ints where the kind is integer, else None (object dtype keeps ints exact)."""
    return pd.Series([v if k == "integer" else None for v, k in zip(values, kinds, strict=True)],
                     dtype=object)


def _floats(values: list[Any], kinds: list[str], ok: tuple[str, ...] = ("integer",)) -> np.ndarray:
    return np.array([float(v) if k in ok else np.nan for v, k in zip(values, kinds, strict=True)],
                    dtype=np.float64)


def _ref(prefix: str, ids: list[Any], kinds: list[str]) -> list[Any]:
    """How a row is named in reports: its id when that is an integer, else its position."""
    return [v if k == "integer" else f"{prefix}[{i}]" for i, (v, k) in enumerate(zip(ids, kinds, strict=True))]


def build_tables(doc: dict[str, Any]) -> Tables:
    """One row per image, per box and per category, with kind, value and derived columns."""
    images = _image_table(doc["images"])
    annotations = _annotation_table(doc["annotations"], _image_sizes(images))
    categories = _category_table(doc["categories"], annotations)
    per_image = annotations["image_id"].dropna().value_counts()
    images["num_boxes"] = np.array([float(per_image.get(v, 0)) if v is not None else np.nan
                                    for v in images["id"]], dtype=np.float64)
    return Tables(images=images, annotations=annotations, categories=categories)


def _fields(rows: list[dict[str, Any]], *keys: str) -> tuple[dict[str, list[Any]], dict[str, list[str]]]:
    """Each key's values (``MISSING`` where a record lacks it) and their kinds (``bbox``: :func:`bbox_kind`)."""
    values = {key: [r.get(key, MISSING) for r in rows] for key in keys}
    kinds = {key: [(bbox_kind if key == "bbox" else json_kind)(v) for v in vals] for key, vals in values.items()}
    return values, kinds


def _strings(values: list[Any], kinds: list[str]) -> pd.Series:
    return pd.Series([v if k == "string" else None for v, k in zip(values, kinds, strict=True)], dtype=object)


def _image_table(imgs: list[dict[str, Any]]) -> pd.DataFrame:
    v, k = _fields(imgs, "id", "file_name", "width", "height")
    return pd.DataFrame({
        "ref": pd.Series(_ref("images", v["id"], k["id"]), dtype=object),
        **{f"{key}_kind": k[key] for key in v},
        "id": _ints(v["id"], k["id"]), "file_name": _strings(v["file_name"], k["file_name"]),
        "width": _floats(v["width"], k["width"]), "height": _floats(v["height"], k["height"]),
    })


def _image_sizes(images: pd.DataFrame) -> dict[int, tuple[float, float]]:
    """Image id -> (W, H) from the first image row carrying that id with integer sizes."""
    sizes: dict[int, tuple[float, float]] = {}
    for iid, w, h in zip(images["id"], images["width"], images["height"], strict=True):
        if iid is not None and iid not in sizes and not (math.isnan(w) or math.isnan(h)):
            sizes[iid] = (w, h)
    return sizes


def _annotation_table(anns: list[dict[str, Any]], sizes: dict[int, tuple[float, float]]) -> pd.DataFrame:
    v, k = _fields(anns, "id", "image_id", "category_id", "bbox", "iscrowd", "segmentation", "area")
    n = len(anns)
    box = np.full((n, 4), np.nan)
    for i, (b, kind) in enumerate(zip(v["bbox"], k["bbox"], strict=True)):
        if kind == BBOX_OK:
            box[i] = [float(e) for e in b]
    x, y, w, h = box.T
    image_id = _ints(v["image_id"], k["image_id"])
    wh = np.array([sizes.get(v, (np.nan, np.nan)) if v is not None else (np.nan, np.nan) for v in image_id],
                  dtype=np.float64).reshape(n, 2)
    img_w, img_h = wh.T

    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        x2, y2 = x + w, y + h
        positive = (w > 0) & (h > 0)
        # the part of the box inside its image
        cx1, cy1 = np.clip(x, 0, img_w), np.clip(y, 0, img_h)
        cx2, cy2 = np.clip(x2, 0, img_w), np.clip(y2, 0, img_h)
        cw, ch = np.maximum(cx2 - cx1, 0), np.maximum(cy2 - cy1, 0)
        in_fraction = np.where(positive, (cw * ch) / (w * h), np.nan)
        pixel_area = w * h
        # the shorter side after clipping, for boxes with a part inside their image
        clip_min_side = np.where(positive & (in_fraction > 0), np.minimum(cw, ch), np.nan)
        rel_size = np.where(positive, np.sqrt(pixel_area / (img_w * img_h)), np.nan)
        aspect = np.where(positive, w / h, np.nan)
        area = _floats(v["area"], k["area"], ("integer", "number"))
        area_ratio = np.where(positive, area / pixel_area, np.nan)
    for arr in (x2, y2, in_fraction, clip_min_side, rel_size, aspect, area_ratio):
        arr[~np.isfinite(arr)] = np.nan

    return pd.DataFrame({
        "ref": pd.Series(_ref("annotations", v["id"], k["id"]), dtype=object),
        **{f"{key}_kind": k[key] for key in ("id", "image_id", "category_id", "bbox", "iscrowd", "segmentation")},
        "id": _ints(v["id"], k["id"]), "image_id": image_id, "category_id": _ints(v["category_id"], k["category_id"]),
        "iscrowd": _ints(v["iscrowd"], k["iscrowd"]),
        "x": x, "y": y, "w": w, "h": h, "x2": x2, "y2": y2,
        "image_width": img_w, "image_height": img_h,
        "in_image_fraction": in_fraction, "clipped_min_side": clip_min_side,
        "relative_size": rel_size, "aspect_ratio": aspect, "area_ratio": area_ratio,
    })


def _category_table(cats: list[dict[str, Any]], annotations: pd.DataFrame) -> pd.DataFrame:
    v, k = _fields(cats, "id", "name")
    per_cat = annotations["category_id"].dropna().value_counts()
    cat_ids = _ints(v["id"], k["id"])
    num_boxes = np.array([float(per_cat.get(c, 0)) if c is not None else np.nan for c in cat_ids],
                         dtype=np.float64)
    total = max(len(annotations), 1)
    return pd.DataFrame({
        "ref": pd.Series(_ref("categories", v["id"], k["id"]), dtype=object),
        "id_kind": k["id"], "name_kind": k["name"], "id": cat_ids, "name": _strings(v["name"], k["name"]),
        "num_boxes": num_boxes,
        "box_fraction": np.where(cat_ids.notna().to_numpy(), num_boxes / total, np.nan),
        # "<id> '<name>'" (None when either has the wrong type), compared with the model's label map
        "entry": pd.Series([label_entry(i, nm) if ik == "integer" and nk == "string" else None
                            for i, nm, ik, nk in zip(v["id"], v["name"], k["id"], k["name"], strict=True)],
                           dtype=object),
    })
