"""From expectation results to decisions: failures, quarantine, repairs, warnings, clean JSON.

The suites say which rows break which check; this module applies the policy of
:mod:`data_checks.rules` to them (which boxes are clipped, which duplicate is kept, whether the
quarantine stays under its threshold) and writes the normalised COCO document.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from typing import Any

import pandas as pd

from data_checks.labels import mismatch as label_map_mismatch
from data_checks.rules import CHECKS, Thresholds
from data_checks.suites import Outcome
from data_checks.tables import Tables

ID_KEYS = {"images": "image_ids", "annotations": "annotation_ids", "categories": "category_ids"}
MAX_WARNING_IDS = 50  # warnings list a sample of ids; failures list them all
MAX_MESSAGE_IDS = 5
FILE_CHECKS = ("image_file_missing", "image_too_large", "image_undecodable", "image_exif_rotated")


def _json_value(v: Any) -> Any:
    """Plain JSON types for values read back from frames (numpy scalars, NaN)."""
    if v is None:
        return None
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and v != v:
        return None
    return v


def _ids(frame: pd.DataFrame, rows: list[int]) -> list[Any]:
    refs = frame["ref"].to_numpy()[sorted(set(rows))].tolist()
    ints = sorted(r for r in refs if isinstance(r, int))
    return ints + [r for r in refs if not isinstance(r, int)]


def _found(frame: pd.DataFrame, column: str, rows: list[int]) -> list[str]:
    """Distinct offending values of a column (for messages), most common first."""
    values = [frame[column].iat[i] for i in rows]
    counts: dict[str, int] = defaultdict(int)
    for v in values:
        counts[str(_json_value(v))] += 1
    return [v for v, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]


def _observed(v: Any) -> str:
    v = _json_value(v)
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict) and "quantiles" in v:
        return ", ".join(f"q{q:g}={_observed(x)}" for q, x in zip(v["quantiles"], v["values"], strict=False))
    return str(v)


def _message(outcomes: list[Outcome], frames: dict[str, pd.DataFrame]) -> str:
    """What failed, in words: the rule of each failed expectation and how often it failed."""
    parts = []
    for o in outcomes:
        rule = (o.description or o.check).split(": ", 1)[-1].rstrip(".")
        if o.error:
            parts.append(f"{rule}: the expectation could not be evaluated ({o.error})")
        elif o.rows and o.column and o.column.endswith("_kind"):
            found = ", ".join(_found(frames[o.table], o.column, o.rows)[:4])
            parts.append(f"{rule}: violated by {len(set(o.rows))} of {o.element_count} {o.table} (found {found})")
        elif o.unexpected_count is not None:
            parts.append(f"{rule}: violated by {o.unexpected_count} of {o.element_count} {o.table}")
        elif o.observed is None or (isinstance(o.observed, dict) and not any(
                v is not None for v in o.observed.get("values", []))):
            parts.append(f"{rule}: not measurable (column '{o.column}' has no values)")
        else:
            parts.append(f"expected {rule[:1].lower()}{rule[1:]}, but observed {_observed(o.observed)}")
    return "; ".join(parts)


def _file_detail(images: pd.DataFrame, check: str, rows: list[int]) -> str:
    """How many files and a few of them with what was found: '1 file(s) undecodable, e.g. x.jpg (...)'."""
    verb = {"image_file_missing": "missing", "image_too_large": "too large", "image_undecodable": "undecodable",
            "image_exif_rotated": "turned by their EXIF Orientation"}[check]
    shown = []
    for r in sorted(set(rows))[:3]:
        name, what = images["file_name"].iat[r], None
        if check == "image_exif_rotated":
            what = f"Orientation {images['file_orientation'].iat[r]}"
        elif check != "image_file_missing" and "file_error" in images:
            what = images["file_error"].iat[r]
        shown.append(f"{name} ({what})" if what else str(name))
    return f"{len(set(rows))} file(s) {verb}, e.g. " + ", ".join(shown)


def _duplicate_groups(ann: Any, dup_rows: list[int]) -> tuple[list[int], list[int]]:
    """Rows of exact duplicate boxes: the one kept of each group (the lowest id) and the others."""
    kept: list[int] = []
    removed: list[int] = []
    if dup_rows:
        sub = ann.loc[dup_rows, ["image_id", "category_id", "x", "y", "w", "h", "id"]]
        ids = ann["id"]  # None where the id itself is invalid (a fatal failure of its own)
        for _, group in sub.groupby(["image_id", "category_id", "x", "y", "w", "h"], sort=False):
            order = sorted(group.index, key=lambda r: (ids.iat[r] is None, ids.iat[r] or 0, r))
            kept.append(order[0])
            removed.extend(order[1:])
    return kept, removed


def _multi_class_rows(ann: Any, same_rows: list[int]) -> list[int]:
    """Rows of boxes at one position that carry different categories (exact duplicates are not)."""
    rows: list[int] = []
    if same_rows:
        sub = ann.loc[same_rows, ["image_id", "x", "y", "w", "h", "category_id"]]
        for _, group in sub.groupby(["image_id", "x", "y", "w", "h"], sort=False):
            if group["category_id"].nunique() > 1:
                rows.extend(group.index)
    return rows


def _quarantine_threshold(ann: Any, quarantined_rows: list[int], thresholds: Thresholds) -> dict[str, Any] | None:
    """The fatal failure when more boxes are quarantined than ``max_quarantine_fraction`` allows."""
    n_boxes = len(ann)
    if not quarantined_rows or len(quarantined_rows) <= thresholds.max_quarantine_fraction * n_boxes:
        return None
    return {
        "check": "quarantine_threshold", "policy": "fatal",
        "annotation_ids": _ids(ann, quarantined_rows), "count": len(quarantined_rows),
        "message": (f"{len(quarantined_rows)} of {n_boxes} boxes quarantined "
                    f"({len(quarantined_rows) / max(n_boxes, 1):.2%}), more than max_quarantine_fraction "
                    f"{thresholds.max_quarantine_fraction:.2%}"),
    }


def _check_entry(table: str, check: str, group: list[Outcome], frames: dict[str, Any], rows: list[int],
                 duplicates: tuple[list[int], list[int]], multi_class_rows: list[int],
                 label_map: Mapping[int, str] | None) -> tuple[dict[str, Any] | None, list[int]]:
    """The report entry of a check that failed, with its policy, and the table rows it applies to
    (no entry: nothing to report)."""
    policy = CHECKS[check].policy if check in CHECKS else "fatal"
    if any(o.error for o in group) and policy in ("quarantine", "repair"):
        policy = "fatal"  # a repair rule that could not run cannot be trusted
    frame, ann = frames[table], frames["annotations"]
    entry: dict[str, Any] = {"check": check, "policy": policy}
    if check == "duplicate_box" and policy != "fatal":
        rows = sorted(duplicates[1])
        entry["kept_annotation_ids"] = _ids(ann, duplicates[0])
    if check == "same_box_different_categories":
        rows = sorted(multi_class_rows)
        if not rows:
            return None, rows
    if rows:
        entry[ID_KEYS[table]] = _ids(frame, rows)
        entry["count"] = len(rows)
    entry["message"] = _message(group, frames)
    if check in FILE_CHECKS and rows:
        entry["detail"] = _file_detail(frame, check, rows)
        entry["message"] += f" ({entry['detail']})"
    if check == "label_map_mismatch" and label_map is not None:
        entry["detail"] = label_map_mismatch(list(frame["entry"]), label_map) or entry["message"]
    return entry, rows


def apply_policy(doc: dict[str, Any], tables: Tables, outcomes: list[Outcome], thresholds: Thresholds,
                 *, unreferenced_files: list[str] | None = None,
                 label_map: Mapping[int, str] | None = None) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The report (``validation.json`` minus run metadata) and the clean document (None on failure).

    A quarantine check of the image table (``image_exif_rotated``) quarantines the image and
    every box on it; the clean document leaves both out.
    """
    frames = {"images": tables.images, "annotations": tables.annotations, "categories": tables.categories}
    ann = tables.annotations
    by_check: dict[tuple[str, str], list[Outcome]] = defaultdict(list)
    for o in outcomes:
        if not o.success or o.error:
            by_check[(o.table, o.check)].append(o)

    failures: list[dict[str, Any]] = []
    warnings: list[dict[str, Any]] = []
    quarantine: dict[int, str] = {}  # row -> first check that quarantined it
    quarantined_images: dict[Any, str] = {}  # image id -> check
    past_edge_rows: set[int] = set()

    def rows_of(key: tuple[str, str]) -> list[int]:
        return sorted({r for o in by_check.get(key, []) for r in o.rows})

    dup_kept, dup_removed = _duplicate_groups(ann, rows_of(("annotations", "duplicate_box")))
    multi_class_rows = _multi_class_rows(ann, rows_of(("annotations", "same_box_different_categories")))

    for (table, check), group in sorted(by_check.items(), key=lambda kv: _order(kv[0][1])):
        frame = frames[table]
        entry, rows = _check_entry(table, check, group, frames, rows_of((table, check)), (dup_kept, dup_removed),
                                   multi_class_rows, label_map)
        if entry is None:
            continue
        policy = entry["policy"]
        if check == "box_past_image_edge" and policy == "repair":
            past_edge_rows.update(rows)
            continue  # reported under repairs (or quarantined by box_mostly_outside_image)
        if policy in ("fatal", "quarantine"):
            if policy == "quarantine" and table == "images":
                for r in rows:
                    quarantined_images.setdefault(frame["id"].iat[r], check)
                hit = ann["image_id"].isin([i for i in quarantined_images if i is not None]).to_numpy()
                for r in [int(i) for i in hit.nonzero()[0]]:
                    quarantine.setdefault(r, check)
            elif policy == "quarantine":
                for r in rows:
                    quarantine.setdefault(r, check)
            failures.append(entry)
        else:
            if rows and len(entry[ID_KEYS[table]]) > MAX_WARNING_IDS:
                entry[ID_KEYS[table]] = entry[ID_KEYS[table]][:MAX_WARNING_IDS]
                entry["ids_truncated"] = True
            warnings.append(entry)

    if unreferenced_files:
        n = len(unreferenced_files)
        warnings.append({"check": "image_file_unreferenced", "policy": "warn",
                         "file_names": unreferenced_files[:MAX_WARNING_IDS], "count": n,
                         "message": f"{n} image file(s) in the folder are not listed in the JSON"})

    return _outcome(doc, tables, thresholds, failures, warnings, quarantine, quarantined_images, past_edge_rows)


def _outcome(doc: dict[str, Any], tables: Tables, thresholds: Thresholds, failures: list[dict[str, Any]],
             warnings: list[dict[str, Any]], quarantine: dict[int, str], quarantined_images: dict[Any, str],
             past_edge_rows: set[int]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The report and the clean document, from what the checks decided."""
    ann = tables.annotations
    quarantined_rows = sorted(quarantine)
    too_many = _quarantine_threshold(ann, quarantined_rows, thresholds)
    if too_many:
        failures.append(too_many)

    success = not any(f["policy"] == "fatal" for f in failures)
    clipped_rows = sorted(past_edge_rows - set(quarantine))
    report: dict[str, Any] = {
        "success": success,
        "quarantined_annotation_ids": _ids(ann, quarantined_rows),
        "quarantined_image_ids": sorted(i for i in quarantined_images if i is not None),
        "failures": failures,
        "warnings": warnings,
    }
    clean = None
    repairs: dict[str, Any] = {"clipped_annotation_ids": _ids(ann, clipped_rows), "clipped": []}
    if success:
        clean, clean_stats = _clean_document(doc, tables, set(quarantined_rows), clipped_rows, repairs,
                                             dropped_images=set(report["quarantined_image_ids"]))
        repairs.update(clean_stats)
    report["repairs"] = repairs
    report["counts"] = _counts(tables, quarantined_rows, clipped_rows)
    return report, clean


def failure_summary(failures: list[dict[str, Any]], *, policies: tuple[str, ...] = ("fatal",),
                    details: bool = False) -> str:
    """The failed checks of the given policies in one line, each with a few ids (or its detail).

    ``details`` adds the detail of file checks (which files, and why) after the ids. When the
    quarantine threshold failed, the quarantine checks behind it follow, with their details.
    """
    def part(f: dict[str, Any], with_detail: bool) -> str:
        key = next((k for k in ("annotation_ids", "image_ids", "category_ids") if k in f), None)
        if f["check"] == "label_map_mismatch" and f.get("detail"):
            return f"{f['check']} ({f['detail']})"
        if key:
            ids = f[key]
            shown = ", ".join(str(i) for i in ids[:MAX_MESSAGE_IDS])
            shown += f", ... ({len(ids)} in all)" if len(ids) > MAX_MESSAGE_IDS else ""
            extra = f": {f['detail']}" if with_detail and f.get("detail") else ""
            return f"{f['check']} ({key.replace('_', ' ')[:-1]}s {shown}{extra})"
        return f"{f['check']} ({f['message'][:120]})"

    parts = [part(f, details) for f in failures if f["policy"] in policies]
    if "quarantine" not in policies and any(f["check"] == "quarantine_threshold" for f in failures):
        behind = [part(f, True) for f in failures if f["policy"] == "quarantine"]
        if behind:
            parts.append("quarantined by " + ", ".join(behind))
    return " ".join("; ".join(parts).split())  # one line whatever the messages hold


def _order(check: str) -> int:
    names = list(CHECKS)
    return names.index(check) if check in names else len(names)


def _clean_document(doc: dict[str, Any], tables: Tables, quarantined: set[int], clipped_rows: list[int],
                    repairs: dict[str, Any], *, dropped_images: set[Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    images_by_id = {}
    for rec in doc["images"]:
        images_by_id.setdefault(rec["id"], rec)
    clipped = set(clipped_rows)
    kept: list[dict[str, Any]] = []
    n_crowd = n_seg = n_area = 0
    for row, rec in enumerate(doc["annotations"]):
        if row in quarantined:
            continue
        new = dict(rec)
        x, y, w, h = rec["bbox"]
        if row in clipped:
            img = images_by_id[rec["image_id"]]
            x1, y1 = max(x, 0), max(y, 0)
            x2, y2 = min(x + w, img["width"]), min(y + h, img["height"])
            new["bbox"] = [x1, y1, x2 - x1, y2 - y1]
            repairs["clipped"].append({"annotation_id": rec["id"], "bbox_before": list(rec["bbox"]),
                                       "bbox_after": new["bbox"]})
        else:
            new["bbox"] = list(rec["bbox"])
        area = new["bbox"][2] * new["bbox"][3]
        if rec.get("area") != area:
            n_area += 1
        new["area"] = area
        if "iscrowd" not in rec:
            new["iscrowd"] = 0
            n_crowd += 1
        if "segmentation" not in rec:
            new["segmentation"] = []
            n_seg += 1
        kept.append(new)
    before = [(a["image_id"], a["id"]) for a in kept]
    kept.sort(key=lambda a: (a["image_id"], a["id"]))
    reordered = before != [(a["image_id"], a["id"]) for a in kept]
    repairs["clipped"].sort(key=lambda c: c["annotation_id"])
    clean: dict[str, Any] = {}
    for key, value in doc.items():
        if key == "images" and dropped_images:
            value = [im for im in value if im.get("id") not in dropped_images]
        clean[key] = kept if key == "annotations" else value
    stats = {"area_recomputed": n_area, "iscrowd_defaulted": n_crowd, "segmentation_defaulted": n_seg,
             "annotations_reordered": reordered}
    return clean, stats


def _counts(tables: Tables, quarantined_rows: list[int], clipped_rows: list[int]) -> dict[str, Any]:
    ann, cats = tables.annotations, tables.categories
    per_cat = {}
    for cid, name, n in zip(cats["id"], cats["name"], cats["num_boxes"], strict=True):
        if cid is not None:
            per_cat[str(name if name is not None else cid)] = int(n)  # valid id: a count, never NaN
    return {
        "images": len(tables.images),
        "annotations": len(ann),
        "categories": len(cats),
        "boxes_per_category": per_cat,
        "quarantined": len(quarantined_rows),
        "clipped": len(clipped_rows),
        "kept": len(ann) - len(quarantined_rows),
    }
