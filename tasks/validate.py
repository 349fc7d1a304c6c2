"""Stage ``validate``: check a COCO annotation file (and optionally its images) before training.

``personcar validate --annotations FILE [--images DIR] --out DIR`` and the Airflow task
``validate_annotations`` call :func:`validate_annotations`. It writes, atomically, into OUT:

``validation.json``         success, quarantined annotation ids, failures (check, ids, message),
                            warnings, repairs, counts, thresholds, GX statistics
``annotations.clean.json``  the normalised COCO file later stages read (only when successful)
``data_docs/index.html``    Great Expectations Data Docs of the three suites

A dataset that fails still gets ``validation.json`` and the Data Docs, then
:class:`~tasks.errors.DataValidationError` is raised with a one-line reason. The rules, thresholds
and suites live in :mod:`data_checks` (one pass: :mod:`data_checks.dataset`, which ``tfrecords``
runs too); the categories are checked against the model's label map (``tasks.config.CLASSES``).
OUT must be absent, empty or an earlier validation's folder (see :mod:`tasks.artifacts`).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tasks.artifacts import StageOutputs, atomic_dir, check_output_dir, write_json_atomic
from tasks.config import CLASSES
from tasks.errors import DataValidationError, PersoncarError
from tasks.logs import log

REPORT_NAME = "validation.json"
CLEAN_NAME = "annotations.clean.json"
DOCS_DIR = "data_docs"
OUTPUTS = StageOutputs("validate", REPORT_NAME, keys=("success", "failures"),
                       names=(REPORT_NAME, CLEAN_NAME, DOCS_DIR, "anchor_coverage.json"))


def validate_annotations(
    annotations: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    images: str | os.PathLike[str] | None = None,
    max_quarantine_fraction: float = 0.01,
    min_clip_keep_fraction: float = 0.5,
    min_box_side: float = 1.0,
    max_boxes_per_image: int = 100,
    min_class_fraction: float = 0.05,
    decode_images: bool = True,
    label_map: Mapping[int, str] = CLASSES,
) -> dict[str, Any]:
    """Validate ``annotations`` (and the files in ``images``); write the report into ``out``.

    Returns the report written to ``validation.json``. Raises DataValidationError (exit 1) when
    the dataset fails (after writing the report and the Data Docs), PersoncarError (exit 2) for
    unusable arguments (missing file or folder, a threshold out of range, OUT containing an input,
    OUT a folder that validation did not write). ``decode_images=False`` limits the image checks
    to header reads (existence, size, format, EXIF orientation, pixel count). ``label_map`` is the
    model's (ids 1..N with names): the categories must be exactly these.
    """
    from data_checks.dataset import check_dataset, read_dataset, require_label_map
    from data_checks.rules import Thresholds
    from data_checks.tables import StructureError

    start = time.perf_counter()
    ann_path, out_dir = Path(annotations), Path(out)
    images_dir = Path(images) if images is not None else None
    thresholds = Thresholds(max_quarantine_fraction=max_quarantine_fraction,
                            min_clip_keep_fraction=min_clip_keep_fraction, min_box_side=min_box_side,
                            max_boxes_per_image=max_boxes_per_image, min_class_fraction=min_class_fraction)
    require_label_map(label_map)
    if images_dir is not None and not images_dir.is_dir():
        raise PersoncarError(f"{images_dir}: images folder not found")
    check_output_dir(out_dir, OUTPUTS, inputs=tuple(p for p in (ann_path, images_dir) if p is not None))

    base: dict[str, Any] = {"annotations_file": str(ann_path),
                            "images_dir": str(images_dir) if images_dir is not None else None}
    try:
        doc, tables = read_dataset(ann_path)
    except StructureError as exc:
        with atomic_dir(out_dir, OUTPUTS) as tmp:
            write_json_atomic(tmp / REPORT_NAME, _unreadable_report(exc, base, thresholds))
        log.error("validation failed: %s", exc)
        raise

    log.info("validating %s: %d images, %d boxes, %d categories", ann_path, len(tables.images),
             len(tables.annotations), len(tables.categories))
    with atomic_dir(out_dir, OUTPUTS) as tmp:
        result = check_dataset(doc, tables, thresholds, label_map=label_map, images_dir=images_dir,
                               decode=decode_images, docs_dir=tmp / DOCS_DIR)
        timings = result.statistics.pop("seconds", {})
        report = _full_report(result, base, thresholds, label_map)
        write_json_atomic(tmp / REPORT_NAME, report)
        if result.clean is not None:  # json.dumps uses the C encoder (json.dump does not)
            (tmp / CLEAN_NAME).write_text(json.dumps(result.clean) + "\n", encoding="utf-8")
    _log_outcome(report, time.perf_counter() - start, timings, out_dir)
    if not report["success"]:
        raise DataValidationError(failure_line(ann_path, out_dir, report["failures"]))
    return report


def _unreadable_report(exc: Any, base: dict[str, Any], thresholds: Any) -> dict[str, Any]:
    """The report of a file that could not be read as COCO tables: one fatal failure, no suite run."""
    return {"success": False, **base, "quarantined_annotation_ids": [], "quarantined_image_ids": [],
            "failures": [{"check": exc.check, "policy": "fatal", "where": exc.where, "message": exc.detail}],
            "warnings": [], "repairs": {}, "counts": {}, "thresholds": thresholds.as_dict(),
            "checks_run": [], "gx": None,
            "note": "the file could not be read as COCO tables; no expectation suite ran"}


def _full_report(result: Any, base: dict[str, Any], thresholds: Any, label_map: Mapping[int, str]) -> dict[str, Any]:
    """``validation.json`` of a file whose suites ran: outcome, checks, thresholds, GX statistics."""
    import great_expectations as gx
    from data_checks.rules import CHECKS

    image_stats = result.image_stats
    return {
        "success": result.report["success"], **base, **result.report,
        "thresholds": thresholds.as_dict(),
        "label_map": {str(k): v for k, v in sorted(label_map.items())},
        "image_checks": ({k: v for k, v in image_stats.items() if k not in ("seconds", "images_per_second")}
                         if image_stats else None),
        "checks_run": [
            {"table": o.table, "check": o.check, "policy": o.policy, "expectation": o.expectation,
             "column": o.column, "success": o.success, "unexpected_count": o.unexpected_count,
             **({"observed_value": o.observed} if o.unexpected_count is None else {})}
            for o in result.outcomes
        ],
        "gx": {"version": gx.__version__, "statistics": result.statistics,
               "data_docs": f"{DOCS_DIR}/index.html",
               "suites": [f"personcar_{t}" for t in ("images", "annotations", "categories")]},
        "check_descriptions": {c.name: {"policy": c.policy, "description": c.description}
                               for c in CHECKS.values()},
    }


def _log_outcome(report: dict[str, Any], elapsed: float, timings: dict[str, float], out_dir: Path) -> None:
    """The summary line, then one line per warning and per quarantine."""
    log.info("validation %s in %.1f s (GX import %.1f s, suites %.1f s): %d failure(s), %d warning(s), "
             "%d quarantined, %d clipped; report %s, data docs %s",
             "passed" if report["success"] else "FAILED", elapsed, timings.get("import", 0.0),
             timings.get("run", 0.0), len(report["failures"]), len(report["warnings"]),
             len(report["quarantined_annotation_ids"]), len(report["repairs"]["clipped_annotation_ids"]),
             out_dir / REPORT_NAME, out_dir / DOCS_DIR / "index.html")
    for w in report["warnings"]:
        log.log(logging.INFO if w["policy"] == "info" else logging.WARNING,
                "validation %s %s: %s", "note" if w["policy"] == "info" else "warning", w["check"], w["message"])
    for f in report["failures"]:
        if f["policy"] == "quarantine":
            log.warning("validation quarantined %s: %s", f["check"], f["message"])


def failure_line(ann_path: Path, out_dir: Path, failures: list[dict[str, Any]]) -> str:
    """One line: the file, each fatal check with a few offending ids, and where the report is."""
    from data_checks.policy import failure_summary

    text = f"{ann_path}: dataset failed validation: {failure_summary(failures)}; see {out_dir / REPORT_NAME}"
    return " ".join(text.split())  # one line whatever the messages hold
