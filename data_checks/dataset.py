"""Every rule over one annotation file and its images, in one pass: what the stages share.

``validate`` runs it and writes the report, the cleaned file and the Data Docs. ``tfrecords``
runs the very same checks (without Data Docs) on the file it is given and refuses it when any
fatal or quarantine rule fires, so that nothing validation would reject or leave out becomes
training data, whichever file a user passes.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_checks.rules import Thresholds
from data_checks.suites import Outcome
from data_checks.tables import StructureError, Tables, build_tables, check_structure, load_document
from tasks.errors import DataValidationError, PersoncarError


@dataclass
class DatasetCheck:
    doc: dict[str, Any]
    tables: Tables
    report: dict[str, Any]          # success, quarantined ids, failures, warnings, repairs, counts
    clean: dict[str, Any] | None    # the normalised document, None when the dataset failed
    outcomes: list[Outcome]
    statistics: dict[str, Any]      # GX statistics, with "seconds"
    image_stats: dict[str, Any] | None


def require_label_map(label_map: Mapping[int, str]) -> None:
    """The model's label map must itself be ids 1..N with names (a PersoncarError otherwise)."""
    from data_checks.labels import check_label_map

    try:
        check_label_map(label_map)
    except ValueError as exc:
        raise PersoncarError(str(exc)) from exc


def read_dataset(path: str | os.PathLike[str]) -> tuple[dict[str, Any], Tables]:
    """The parsed document and its tables; StructureError when tables cannot be built."""
    doc = load_document(path)
    problem = check_structure(doc)
    if problem is not None:
        where, message = problem
        raise StructureError(path, "structure", message, where)
    return doc, build_tables(doc)


def check_dataset(doc: dict[str, Any], tables: Tables, thresholds: Thresholds, *, label_map: Mapping[int, str],
                  images_dir: Path | None = None, decode: bool = True,
                  docs_dir: Path | None = None) -> DatasetCheck:
    """Image file checks (with ``images_dir``), the GX suites (Data Docs into ``docs_dir``), the policy."""
    from data_checks.images import check_image_files, unreferenced_files
    from data_checks.policy import apply_policy
    from data_checks.suites import run_suites

    require_label_map(label_map)
    image_stats: dict[str, Any] | None = None
    unreferenced: list[str] = []
    if images_dir is not None:
        tables.images, image_stats = check_image_files(tables.images, images_dir, decode=decode,
                                                       max_pixels=thresholds.max_image_pixels)
        unreferenced = unreferenced_files(images_dir, list(tables.images["file_name"]))
    run = run_suites(tables, thresholds, docs_dir, with_files=images_dir is not None, label_map=label_map)
    report, clean = apply_policy(doc, tables, run.outcomes, thresholds, unreferenced_files=unreferenced,
                                 label_map=label_map)
    return DatasetCheck(doc, tables, report, clean, run.outcomes, run.statistics, image_stats)


def require_valid(path: str | os.PathLike[str], images_dir: Path, *, label_map: Mapping[int, str],
                  thresholds: Thresholds | None = None, hint: str = "") -> dict[str, Any]:
    """The document when no fatal or quarantine rule fires on it (images decoded); else one line.

    Raises DataValidationError naming the file, the rules and the offending records (a structural
    error as ``<file>: structure: ...``); ``hint`` is appended to the line.
    """
    from data_checks.policy import failure_summary

    require_label_map(label_map)
    doc, tables = read_dataset(path)
    result = check_dataset(doc, tables, thresholds or Thresholds(), label_map=label_map, images_dir=images_dir)
    failures = result.report["failures"]
    if failures:
        rules = failure_summary(failures, policies=("fatal", "quarantine"), details=True)
        raise DataValidationError(f"{path}: refused by the validation rules: {rules}{hint}")
    return doc
