"""The Great Expectations suites over the three tables, and how they are run.

Each expectation carries ``meta = {"check": <name>, "policy": <policy>}`` (see
:mod:`data_checks.rules`); several expectations may share a check name (e.g. the four sides of
``box_past_image_edge``) and their offending rows are merged. The suites run in an ephemeral
context, one whole-dataframe batch per table, through one Checkpoint per table whose
``UpdateDataDocsAction`` renders the results into a filesystem Data Docs site of our own.

Great Expectations is imported inside the functions (it takes seconds to import).
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_checks.images import TURNED
from data_checks.labels import entries as label_entries
from data_checks.rules import CHECKS, Thresholds
from data_checks.tables import BBOX_OK, Tables

SITE_NAME = "personcar_validation"
# a plain file name: no separators, not "." or ".."
SAFE_FILE_NAME = r"^(?!\.\.?$)[^/\\\x00]+$"
SUPPORTED_FORMATS = ["JPEG", "PNG"]


@dataclass
class Outcome:
    """One expectation's result, reduced to what the policy needs."""

    table: str
    check: str
    policy: str
    expectation: str
    column: str | None
    success: bool
    rows: list[int] = field(default_factory=list)  # offending row positions in the table
    observed: Any = None
    unexpected_count: int | None = None
    element_count: int | None = None
    error: str | None = None
    description: str | None = None


@functools.cache
def _quantile_expectation() -> type:
    """The core quantile expectation, returning plain Python booleans.

    With numpy 2 the core class reports ``numpy.bool`` values, which the validation results store
    cannot serialise; the check and its Data Docs rendering are otherwise unchanged.
    """
    from great_expectations.expectations.core.expect_column_quantile_values_to_be_between import (
        ExpectColumnQuantileValuesToBeBetween,
    )

    class ExpectColumnQuantileValuesToBeInRanges(ExpectColumnQuantileValuesToBeBetween):
        """Each listed quantile of the column lies in its value range."""

        def _validate(self, metrics, runtime_configuration=None, execution_engine=None):  # type: ignore[no-untyped-def]
            out = super()._validate(metrics, runtime_configuration, execution_engine)
            out["success"] = bool(out["success"])
            result = out["result"]
            result["details"]["success_details"] = [bool(v) for v in result["details"]["success_details"]]
            values = result["observed_value"]["values"]
            result["observed_value"]["values"] = [None if v is None or v != v else float(v) for v in values]
            return out

    return ExpectColumnQuantileValuesToBeInRanges


class _Expectations:
    """Makes the GX expectation of a check, with its policy as meta and severity and its description."""

    SEVERITY = {"fatal": "CRITICAL", "quarantine": "WARNING", "repair": "WARNING", "warn": "WARNING", "info": "INFO"}

    def __init__(self) -> None:
        import great_expectations as gx
        from great_expectations.expectations.metadata_types import FailureSeverity

        self.E, self._severity = gx.expectations, {k: FailureSeverity[v] for k, v in self.SEVERITY.items()}

    def __call__(self, cls: Any, check: str, description: str | None = None, **kwargs: Any) -> Any:
        c = CHECKS[check]
        return cls(meta={"check": check, "policy": c.policy}, severity=self._severity[c.policy],
                   description=description or f"{check}: {c.description}", **kwargs)

    def kinds(self, column: str, allowed: list[str], check: str, what: str) -> Any:
        return self(self.E.ExpectColumnValuesToBeInSet, check, f"{check}: {what}", column=column, value_set=allowed)


def _quantile_ranges(spec: dict[float, tuple[float, float]]) -> dict[str, Any]:
    qs = sorted(spec)
    return {"quantiles": qs, "value_ranges": [list(spec[q]) for q in qs]}


def build_suites(thresholds: Thresholds, *, image_ids: list[int], category_ids: list[int],
                 with_files: bool, label_map: Mapping[int, str]) -> dict[str, list[Any]]:
    """The expectations of each table, with the thresholds and value sets of this dataset."""
    x = _Expectations()
    return {"images": _image_suite(x, thresholds, with_files),
            "annotations": _annotation_suite(x, thresholds, image_ids, category_ids),
            "categories": _category_suite(x, thresholds, label_map)}


def _image_suite(x: _Expectations, t: Thresholds, with_files: bool) -> list[Any]:
    E, kinds = x.E, x.kinds
    images = [
        x(E.ExpectTableRowCountToBeBetween, "table_empty", "table_empty: the file lists at least one image",
          min_value=1),
        kinds("id_kind", ["integer"], "image_field_type", "image 'id' is an integer"),
        kinds("file_name_kind", ["string"], "image_field_type", "image 'file_name' is a non-empty string"),
        kinds("width_kind", ["integer"], "image_field_type", "image 'width' is an integer"),
        kinds("height_kind", ["integer"], "image_field_type", "image 'height' is an integer"),
        x(E.ExpectColumnValuesToBeUnique, "duplicate_image_id", column="id"),
        x(E.ExpectColumnValuesToBeUnique, "duplicate_file_name", column="file_name"),
        x(E.ExpectColumnValuesToMatchRegex, "unsafe_file_name", column="file_name", regex=SAFE_FILE_NAME),
        x(E.ExpectColumnValuesToBeBetween, "image_size_invalid", column="width", min_value=1,
          max_value=t.max_image_side),
        x(E.ExpectColumnValuesToBeBetween, "image_size_invalid", column="height", min_value=1,
          max_value=t.max_image_side),
        x(E.ExpectColumnValuesToBeBetween, "boxes_per_image", column="num_boxes", min_value=1,
          max_value=t.max_boxes_per_image),
        x(E.ExpectColumnMedianToBeBetween, "boxes_per_image_median", column="num_boxes",
          min_value=t.median_boxes_per_image[0], max_value=t.median_boxes_per_image[1]),
    ]
    if with_files:
        images += [
            x(E.ExpectColumnValuesToBeInSet, "image_file_missing", column="file_found", value_set=[True]),
            x(E.ExpectColumnValuesToBeInSet, "image_too_large", column="file_pixels_ok", value_set=[True]),
            x(E.ExpectColumnValuesToBeInSet, "image_undecodable", column="file_decoded", value_set=[True]),
            x(E.ExpectColumnPairValuesToBeEqual, "image_size_mismatch", column_A="width",
              column_B="file_width", ignore_row_if="either_value_is_missing"),
            x(E.ExpectColumnPairValuesToBeEqual, "image_size_mismatch", column_A="height",
              column_B="file_height", ignore_row_if="either_value_is_missing"),
            x(E.ExpectColumnValuesToNotBeInSet, "image_exif_rotated", column="file_orientation",
              value_set=sorted(TURNED)),
            x(E.ExpectColumnValuesToBeInSet, "image_format", column="file_format", value_set=SUPPORTED_FORMATS),
        ]
    return images


def _annotation_suite(x: _Expectations, t: Thresholds, image_ids: list[int], category_ids: list[int]) -> list[Any]:
    E, kinds, Quantiles = x.E, x.kinds, _quantile_expectation()
    return [
        x(E.ExpectTableRowCountToBeBetween, "table_empty", "table_empty: the file lists at least one box",
          min_value=1),
        kinds("id_kind", ["integer"], "annotation_field_type", "annotation 'id' is an integer"),
        kinds("image_id_kind", ["integer"], "annotation_field_type", "annotation 'image_id' is an integer"),
        kinds("category_id_kind", ["integer"], "annotation_field_type",
              "annotation 'category_id' is an integer"),
        kinds("bbox_kind", [BBOX_OK], "annotation_field_type",
              "annotation 'bbox' is a list of 4 finite numbers [x, y, w, h]"),
        kinds("iscrowd_kind", ["missing", "integer"], "annotation_field_type",
              "annotation 'iscrowd' is absent or an integer"),
        x(E.ExpectColumnValuesToBeInSet, "annotation_field_type",
          "annotation_field_type: annotation 'iscrowd' is 0 or 1", column="iscrowd", value_set=[0, 1]),
        kinds("segmentation_kind", ["missing", "array", "object"], "annotation_field_type",
              "annotation 'segmentation' is absent, a list or an object"),
        x(E.ExpectColumnValuesToBeUnique, "duplicate_annotation_id", column="id"),
        x(E.ExpectColumnValuesToBeInSet, "annotation_image_missing", column="image_id", value_set=image_ids),
        x(E.ExpectColumnValuesToBeInSet, "annotation_category_unknown", column="category_id",
          value_set=category_ids),
        x(E.ExpectColumnValuesToBeBetween, "box_non_positive_size", column="w", min_value=0, strict_min=True),
        x(E.ExpectColumnValuesToBeBetween, "box_non_positive_size", column="h", min_value=0, strict_min=True),
        x(E.ExpectColumnValuesToBeBetween, "box_past_image_edge", column="x", min_value=0),
        x(E.ExpectColumnValuesToBeBetween, "box_past_image_edge", column="y", min_value=0),
        x(E.ExpectColumnPairValuesAToBeGreaterThanB, "box_past_image_edge", column_A="image_width",
          column_B="x2", or_equal=True, ignore_row_if="either_value_is_missing"),
        x(E.ExpectColumnPairValuesAToBeGreaterThanB, "box_past_image_edge", column_A="image_height",
          column_B="y2", or_equal=True, ignore_row_if="either_value_is_missing"),
        x(E.ExpectColumnValuesToBeBetween, "box_mostly_outside_image", column="in_image_fraction",
          min_value=t.min_clip_keep_fraction),
        x(E.ExpectColumnValuesToBeBetween, "box_too_small", column="clipped_min_side", min_value=t.min_box_side),
        x(E.ExpectCompoundColumnsToBeUnique, "duplicate_box",
          column_list=["image_id", "category_id", "x", "y", "w", "h"], ignore_row_if="any_value_is_missing"),
        x(E.ExpectCompoundColumnsToBeUnique, "same_box_different_categories",
          column_list=["image_id", "x", "y", "w", "h"], ignore_row_if="any_value_is_missing"),
        x(Quantiles, "box_size_quantiles", column="relative_size",
          quantile_ranges=_quantile_ranges(t.box_size_quantiles)),
        x(E.ExpectColumnValuesToBeBetween, "aspect_ratio", column="aspect_ratio",
          min_value=t.aspect_ratio_range[0], max_value=t.aspect_ratio_range[1], mostly=t.aspect_ratio_mostly),
        x(Quantiles, "aspect_ratio_quantiles", column="aspect_ratio",
          quantile_ranges=_quantile_ranges(t.aspect_ratio_quantiles)),
        x(E.ExpectColumnMedianToBeBetween, "area_not_pixels",
          "area_not_pixels: the stored 'area' of a typical box equals w*h in pixels (median of "
          "area / (w*h) near 1); 'area' is recomputed either way", column="area_ratio",
          min_value=1 - t.area_tolerance, max_value=1 + t.area_tolerance),
    ]


def _category_suite(x: _Expectations, t: Thresholds, label_map: Mapping[int, str]) -> list[Any]:
    E, kinds, model_entries = x.E, x.kinds, label_entries(label_map)
    return [
        x(E.ExpectTableRowCountToBeBetween, "table_empty",
          "table_empty: the file lists at least one category", min_value=1),
        kinds("id_kind", ["integer"], "category_field_type", "category 'id' is an integer"),
        kinds("name_kind", ["string"], "category_field_type", "category 'name' is a non-empty string"),
        x(E.ExpectColumnValuesToBeUnique, "duplicate_category_id", column="id"),
        x(E.ExpectColumnValuesToBeUnique, "duplicate_category_name", column="name"),
        x(E.ExpectColumnValuesToBeBetween, "category_absent", column="num_boxes", min_value=1),
        x(E.ExpectColumnValuesToBeInSet, "label_map_mismatch",
          f"label_map_mismatch: every category (id and name) is an entry of the model's label map "
          f"{', '.join(model_entries)}", column="entry", value_set=model_entries),
        x(E.ExpectColumnDistinctValuesToContainSet, "label_map_mismatch",
          "label_map_mismatch: every entry of the model's label map is a category of the file",
          column="entry", value_set=model_entries),
        x(E.ExpectColumnValuesToBeBetween, "class_balance", column="box_fraction",
          min_value=t.min_class_fraction),
    ]


@dataclass
class SuiteRun:
    outcomes: list[Outcome]
    statistics: dict[str, Any]
    docs_index: Path | None


def run_suites(tables: Tables, thresholds: Thresholds, docs_dir: Path | None, *, with_files: bool,
               label_map: Mapping[int, str]) -> SuiteRun:
    """Validate the three tables with GX and render the Data Docs into ``docs_dir`` (None: no docs)."""
    t0 = time.perf_counter()
    gx_log = logging.getLogger("great_expectations")
    if gx_log.level == logging.NOTSET:  # GX logs every registration at INFO: keep task logs readable
        gx_log.setLevel(logging.WARNING)
    import great_expectations as gx
    from great_expectations.core.run_identifier import RunIdentifier
    from great_expectations.data_context.types.base import ProgressBarsConfig

    t_import = time.perf_counter() - t0
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    views = "data_checks.gx_views"
    actions = []
    if docs_dir is not None:
        actions.append(gx.checkpoint.UpdateDataDocsAction(name="data_docs", site_names=[SITE_NAME]))
        context.add_data_docs_site(site_name=SITE_NAME, site_config={
            "class_name": "SiteBuilder",
            "show_how_to_buttons": False,
            # GX requires an absolute folder; --out may be relative
            "store_backend": {"class_name": "TupleFilesystemStoreBackend",
                              "base_directory": os.path.abspath(docs_dir)},
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder",
                                   "view": {"module_name": views, "class_name": "IndexPageView"}},
            "site_section_builders": {
                "expectations": {"view": {"module_name": views, "class_name": "PageView"}},
                "validations": {"view": {"module_name": views, "class_name": "PageView"}},
                "profiling": "None",  # no profiling results are produced
            },
        })

    image_ids = sorted({v for v in tables.images["id"] if v is not None})
    category_ids = sorted({v for v in tables.categories["id"] if v is not None})
    suites = build_suites(thresholds, image_ids=image_ids, category_ids=category_ids, with_files=with_files,
                          label_map=label_map)
    frames = {"images": tables.images, "annotations": tables.annotations, "categories": tables.categories}

    source = context.data_sources.add_pandas("personcar")
    run_id = RunIdentifier(run_name="personcar-validate", run_time=dt.datetime.now(dt.UTC))
    outcomes: list[Outcome] = []
    statistics: dict[str, Any] = {}
    t_run = time.perf_counter()
    for table, expectations in suites.items():
        batch_def = source.add_dataframe_asset(table).add_batch_definition_whole_dataframe("whole table")
        suite = context.suites.add(gx.ExpectationSuite(name=f"personcar_{table}", expectations=expectations))
        definition = context.validation_definitions.add(
            gx.ValidationDefinition(name=f"personcar_{table}", data=batch_def, suite=suite))
        checkpoint = context.checkpoints.add(gx.Checkpoint(
            name=f"personcar_{table}", validation_definitions=[definition],
            actions=actions,
            result_format={"result_format": "COMPLETE", "return_unexpected_index_query": False}))
        result = checkpoint.run(batch_parameters={"dataframe": frames[table]}, run_id=run_id)
        for suite_result in result.run_results.values():
            statistics[table] = {k: (float(v) if isinstance(v, float) else v)
                                 for k, v in dict(suite_result.statistics).items()}
            for r in suite_result.results:
                outcomes.append(_outcome(table, r))
    statistics["seconds"] = {"import": round(t_import, 3), "run": round(time.perf_counter() - t_run, 3)}
    return SuiteRun(outcomes=outcomes, statistics=statistics,
                    docs_index=docs_dir / "index.html" if docs_dir is not None else None)


def _plain(v: Any) -> Any:
    """JSON-safe copy of an observed value: numpy scalars to Python, NaN/inf to None."""
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_plain(x) for x in v]
    if hasattr(v, "item") and not isinstance(v, str | bytes):
        try:
            v = v.item()
        except (TypeError, ValueError):
            return str(v)
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if v is None or isinstance(v, bool | int | float | str):
        return v
    return str(v)


def _outcome(table: str, r: Any) -> Outcome:
    cfg = r.expectation_config
    meta = cfg.meta or {}
    kwargs = cfg.kwargs
    column = kwargs.get("column")
    if column is None and "column_A" in kwargs:
        column = f"{kwargs['column_A']},{kwargs['column_B']}"
    elif column is None and "column_list" in kwargs:
        column = ",".join(kwargs["column_list"])
    result = r.result or {}
    info = r.exception_info or {}
    error = info.get("exception_message") if info.get("raised_exception") else None
    rows = [int(i) for i in (result.get("unexpected_index_list") or []) if not isinstance(i, dict)]
    return Outcome(
        table=table, check=meta.get("check", cfg.type), policy=meta.get("policy", "fatal"),
        expectation=cfg.type, column=column, success=bool(r.success), rows=rows,
        observed=_plain(result.get("observed_value")), unexpected_count=result.get("unexpected_count"),
        element_count=result.get("element_count"), error=error, description=cfg.description,
    )
