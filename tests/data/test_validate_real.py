"""Validation on the real openimages-personcar annotations (and the 112 real images).

The full file has known defects (see ../shared/data/personcar/README.md): areas stored as image
fractions, three zero-width boxes, annotations not sorted by image, three box positions labelled
both person and car. Validation must pass, quarantine exactly the zero-width boxes and normalise
the rest.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tasks.validate import validate_annotations

pytestmark = pytest.mark.realdata

ZERO_WIDTH_IDS = [6035, 10497, 10502]


Run = tuple[dict[str, Any], dict[str, Any], dict[str, Any]]  # raw file, report, clean file


@pytest.fixture(scope="module")
def full_run(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Run:
    src = shared_data / "bbox-annotations.full.json"
    out = tmp_path_factory.mktemp("validate-full") / "validate"
    report = validate_annotations(src, out)
    clean = json.loads((out / "annotations.clean.json").read_text())
    return json.loads(src.read_text()), report, clean


def test_full_file_passes_and_quarantines_exactly_the_zero_width_boxes(full_run: Run) -> None:
    raw, report, _ = full_run
    assert report["success"] is True
    assert report["quarantined_annotation_ids"] == ZERO_WIDTH_IDS
    for aid in ZERO_WIDTH_IDS:  # they really are the zero-width boxes of the file
        assert next(a for a in raw["annotations"] if a["id"] == aid)["bbox"][2] == 0
    assert [(f["check"], f["annotation_ids"]) for f in report["failures"]] == [
        ("box_non_positive_size", ZERO_WIDTH_IDS)]
    assert report["repairs"]["clipped_annotation_ids"] == []  # no box runs past an edge
    assert report["counts"] == {
        "images": 2239, "annotations": 16772, "categories": 2,
        "boxes_per_category": {"person": 10800, "car": 5972},
        "quarantined": 3, "clipped": 0, "kept": 16769,
    }


def test_full_file_known_defects_are_reported(full_run: Run) -> None:
    raw, report, _ = full_run
    same = next(w for w in report["warnings"] if w["check"] == "same_box_different_categories")
    assert same["count"] == 6  # three positions, each a person and a car box
    by_id = {a["id"]: a for a in raw["annotations"]}
    pairs = {(by_id[i]["image_id"], tuple(by_id[i]["bbox"])) for i in same["annotation_ids"]}
    assert len(pairs) == 3
    for image_id, bbox in pairs:
        cats = {a["category_id"] for a in raw["annotations"] if a["image_id"] == image_id and tuple(a["bbox"]) == bbox}
        assert cats == {1, 2}
    area = next(w for w in report["warnings"] if w["check"] == "area_not_pixels")
    assert "observed 1.4" in area["message"]  # median stored/pixel area ratio: a fraction of the image


def test_full_file_clean_json_is_normalised(full_run: Run) -> None:
    raw, report, clean = full_run
    anns = clean["annotations"]
    assert len(anns) == 16769
    assert {a["id"] for a in anns} == {a["id"] for a in raw["annotations"]} - set(ZERO_WIDTH_IDS)
    keys = [(a["image_id"], a["id"]) for a in anns]
    assert keys == sorted(keys)
    raw_by_id = {a["id"]: a for a in raw["annotations"]}
    for a in anns:
        assert a["bbox"] == raw_by_id[a["id"]]["bbox"]
        assert a["area"] == a["bbox"][2] * a["bbox"][3]  # pixels, not the stored fraction
        assert a["area"] >= 1
        assert a["iscrowd"] == 0
    assert report["repairs"]["area_recomputed"] == 16769
    for key in ("images", "categories", "licenses"):
        assert clean[key] == raw[key]


def test_sample_with_real_images_passes_the_image_checks(shared_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "validate"
    report = validate_annotations(shared_data / "bbox-annotations.sample112.json", out,
                                  images=shared_data / "images")
    assert report["success"] is True and report["failures"] == []
    assert report["image_checks"] == {"images_checked": 112, "decode": True}
    image_rules = [c for c in report["checks_run"]
                   if c["check"] in ("image_file_missing", "image_undecodable", "image_size_mismatch")]
    assert len(image_rules) == 4 and all(c["success"] and c["unexpected_count"] == 0 for c in image_rules)
    assert report["counts"]["boxes_per_category"] == {"person": 587, "car": 347}
    assert not any(w["check"] == "image_file_unreferenced" for w in report["warnings"])
    assert (out / "data_docs" / "index.html").is_file()
