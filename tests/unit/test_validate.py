"""Annotation validation: one planted fault per rule, thresholds, normalisation, malformed input.

Every test writes a small COCO file (and, for the image rules, tiny JPEGs made with PIL) into
tmp_path, runs the real stage (Great Expectations included) and reads back what it wrote.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tasks.errors import DataValidationError, PersoncarError
from tasks.validate import validate_annotations

W, H = 64, 48  # every test image
N_IMAGES, BOXES_PER_IMAGE = 10, 10  # 100 boxes: one quarantined box is exactly 1%


def base_doc() -> dict[str, Any]:
    """A valid dataset: 10 images, 100 boxes (60 person, 40 car), areas stored as fractions."""
    images = [{"file_name": f"image_{i + 1:09d}.jpg", "width": W, "height": H, "id": i, "license": 1}
              for i in range(N_IMAGES)]
    anns = []
    for i in range(N_IMAGES):
        for j in range(BOXES_PER_IMAGE):
            aid = i * BOXES_PER_IMAGE + j
            bbox = [j * 3, j * 2, 10 + j, 12 + (j % 4)]
            anns.append({"category_id": 1 if j < 6 else 2, "image_id": i, "segmentation": [], "iscrowd": 0,
                         "bbox": bbox, "area": bbox[2] * bbox[3] / (W * H), "id": aid, "license": 2})
    anns.reverse()  # like the real file: not sorted by image_id
    return {
        "images": images,
        "annotations": anns,
        "categories": [{"id": 1, "name": "person", "supercategory": "none"},
                       {"id": 2, "name": "car", "supercategory": "none"}],
        "licenses": [{"url": "https://creativecommons.org/licenses/by/2.0/", "id": 1, "name": "Attribution License"},
                     {"url": "https://creativecommons.org/licenses/by/4.0/", "id": 2, "name": "Attribution License"}],
    }


def ann(doc: dict[str, Any], aid: int) -> dict[str, Any]:
    return next(a for a in doc["annotations"] if a["id"] == aid)


def write(tmp_path: Path, doc: Any, name: str = "ann.json") -> Path:
    p = tmp_path / name
    p.write_text(json.dumps(doc))
    return p


def run_ok(tmp_path: Path, doc: Any, **kw: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    out = tmp_path / "out"
    result = validate_annotations(write(tmp_path, doc), out, **kw)
    report = json.loads((out / "validation.json").read_text())
    assert report == result
    assert report["success"] is True
    assert (out / "data_docs" / "index.html").is_file()
    return report, json.loads((out / "annotations.clean.json").read_text())


def run_fail(tmp_path: Path, doc: Any, **kw: Any) -> tuple[dict[str, Any], DataValidationError]:
    out = tmp_path / "out"
    with pytest.raises(DataValidationError) as info:
        validate_annotations(write(tmp_path, doc), out, **kw)
    msg = str(info.value)
    assert info.value.exit_code == 1
    assert "\n" not in msg and str(tmp_path / "ann.json") in msg
    report = json.loads((out / "validation.json").read_text())
    assert report["success"] is False
    assert not (out / "annotations.clean.json").exists()
    return report, info.value


def failure(report: dict[str, Any], check: str) -> dict[str, Any]:
    found = [f for f in report["failures"] if f["check"] == check]
    assert found, f"no failure {check!r} in {[f['check'] for f in report['failures']]}"
    assert len(found) == 1
    return found[0]


def warning(report: dict[str, Any], check: str) -> dict[str, Any]:
    found = [w for w in report["warnings"] if w["check"] == check]
    assert found, f"no warning {check!r} in {[w['check'] for w in report['warnings']]}"
    return found[0]


def make_images(folder: Path, doc: dict[str, Any]) -> Path:
    """Noise JPEGs (so that most of each file is entropy-coded scan data) of the recorded sizes."""
    import random

    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for img in doc["images"]:
        w, h = img["width"], img["height"]
        pixels = random.Random(img["id"]).randbytes(w * h * 3)
        Image.frombytes("RGB", (w, h), pixels).save(folder / img["file_name"], "JPEG", quality=90)
    return folder


# -- the valid dataset and normalisation ------------------------------------------------------------


def test_valid_dataset_passes_and_is_normalised(tmp_path: Path) -> None:
    doc = base_doc()
    del ann(doc, 5)["iscrowd"]
    del ann(doc, 6)["segmentation"]
    doc["info"] = {"description": "kept as is"}
    report, clean = run_ok(tmp_path, doc)

    assert report["failures"] == [] and report["quarantined_annotation_ids"] == []
    assert report["counts"]["annotations"] == 100 and report["counts"]["kept"] == 100
    assert report["counts"]["boxes_per_category"] == {"person": 60, "car": 40}
    # area is recomputed in pixels, annotations sorted by (image_id, id), defaults filled in
    assert [a["id"] for a in clean["annotations"]] == list(range(100))
    for a in clean["annotations"]:
        assert a["area"] == a["bbox"][2] * a["bbox"][3]
        assert a["bbox"] == ann(doc, a["id"])["bbox"]
    assert ann(clean, 5)["iscrowd"] == 0 and ann(clean, 6)["segmentation"] == []
    assert report["repairs"]["area_recomputed"] == 100
    assert report["repairs"]["iscrowd_defaulted"] == 1 and report["repairs"]["segmentation_defaulted"] == 1
    assert report["repairs"]["annotations_reordered"] is True
    for key in ("images", "categories", "licenses", "info"):
        assert clean[key] == doc[key]
    # the stored fraction is named as a known, handled defect
    assert warning(report, "area_not_pixels")["policy"] == "info"
    assert report["gx"]["version"].startswith("1.")
    assert report["gx"]["statistics"]["annotations"]["evaluated_expectations"] > 10


def test_data_docs_render_every_suite(tmp_path: Path) -> None:
    run_ok(tmp_path, base_doc())
    docs = tmp_path / "out" / "data_docs"
    index = (docs / "index.html").read_text()
    for suite in ("personcar_images", "personcar_annotations", "personcar_categories"):
        assert (docs / "expectations" / f"{suite}.html").is_file()
        assert suite in index
        pages = list((docs / "validations" / suite).rglob("*.html"))
        assert len(pages) == 1
    page = next((docs / "validations" / "personcar_annotations").rglob("*.html")).read_text()
    assert "box_non_positive_size" in page and "duplicate_annotation_id" in page


def test_rerun_gives_same_outputs_and_replaces_the_folder(tmp_path: Path) -> None:
    doc = base_doc()
    run_ok(tmp_path, doc)
    out = tmp_path / "out"
    first = {n: (out / n).read_bytes() for n in ("validation.json", "annotations.clean.json")}
    (out / "stale.txt").write_text("left over")
    run_ok(tmp_path, doc)
    assert {n: (out / n).read_bytes() for n in first} == first
    assert not (out / "stale.txt").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temp folders left


def test_failed_rerun_removes_the_old_clean_file(tmp_path: Path) -> None:
    run_ok(tmp_path, base_doc())
    doc = base_doc()
    ann(doc, 3)["category_id"] = 7
    run_fail(tmp_path, doc)  # asserts annotations.clean.json is gone: no stale clean data downstream
    assert (tmp_path / "out" / "data_docs" / "index.html").is_file()


# -- fatal: structure and types ---------------------------------------------------------------------


@pytest.mark.parametrize(("mutate", "where"), [
    (lambda d: [d], "document"),
    (lambda d: {k: v for k, v in d.items() if k != "categories"}, "categories"),
    (lambda d: {**d, "images": {"0": d["images"][0]}}, "images"),
    (lambda d: {**d, "annotations": d["annotations"][:3] + [[1, 2]] + d["annotations"][3:]}, "annotations[3]"),
    (lambda d: {**d, "licenses": "CC"}, "licenses"),
])
def test_wrong_top_level_shape_is_a_one_line_structure_failure(tmp_path: Path, mutate: Any, where: str) -> None:
    report, err = run_fail(tmp_path, mutate(base_doc()))
    f = failure(report, "structure")
    assert f["where"] == where and f["message"] in str(err)
    assert not (tmp_path / "out" / "data_docs").exists()  # no suite can run on such a file


def test_not_json_is_a_syntax_failure(tmp_path: Path) -> None:
    p = tmp_path / "ann.json"
    p.write_text('{"images": [1, 2,}')
    with pytest.raises(DataValidationError, match=r"json_syntax: .* line 1 column"):
        validate_annotations(p, tmp_path / "out")
    assert failure(json.loads((tmp_path / "out" / "validation.json").read_text()), "json_syntax")
    p.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(DataValidationError, match="json_syntax"):
        validate_annotations(p, tmp_path / "out")


def test_field_types_are_checked_strictly(tmp_path: Path) -> None:
    doc = base_doc()
    ann(doc, 4)["bbox"] = "10,10,5,5"
    ann(doc, 7)["id"] = True  # a boolean is not an integer id
    ann(doc, 9)["bbox"] = [1, 2, 3]
    ann(doc, 11)["bbox"] = [1, 2, float("nan"), 4]
    ann(doc, 12)["iscrowd"] = 2
    doc["images"][2]["width"] = 64.0
    doc["categories"][1]["name"] = ""
    report, err = run_fail(tmp_path, doc)
    f = failure(report, "annotation_field_type")
    pos7 = next(i for i, a in enumerate(doc["annotations"]) if a["id"] is True)
    assert f["annotation_ids"] == [4, 9, 11, 12, f"annotations[{pos7}]"]
    assert "boolean" in f["message"] and "array of 3" in f["message"] and "non-finite number" in f["message"]
    assert failure(report, "image_field_type")["image_ids"] == [2]
    assert failure(report, "category_field_type")["category_ids"] == [2]
    assert "annotation_field_type" in str(err)


# -- fatal: referential integrity -------------------------------------------------------------------


def test_duplicate_image_id(tmp_path: Path) -> None:
    doc = base_doc()
    doc["images"][5]["id"] = 4
    report, err = run_fail(tmp_path, doc)
    assert failure(report, "duplicate_image_id")["image_ids"] == [4, 4]
    assert "duplicate_image_id (image ids 4, 4)" in str(err)


def test_duplicate_annotation_id(tmp_path: Path) -> None:
    doc = base_doc()
    ann(doc, 30)["id"] = 31
    report, err = run_fail(tmp_path, doc)
    assert failure(report, "duplicate_annotation_id")["annotation_ids"] == [31, 31]
    assert "duplicate_annotation_id" in str(err)


def test_duplicate_file_name(tmp_path: Path) -> None:
    doc = base_doc()
    doc["images"][3]["file_name"] = doc["images"][2]["file_name"]
    report, _ = run_fail(tmp_path, doc)
    assert failure(report, "duplicate_file_name")["image_ids"] == [2, 3]


def test_annotation_pointing_at_missing_image(tmp_path: Path) -> None:
    doc = base_doc()
    ann(doc, 42)["image_id"] = 999
    report, err = run_fail(tmp_path, doc)
    assert failure(report, "annotation_image_missing")["annotation_ids"] == [42]
    assert "annotation_image_missing (annotation ids 42)" in str(err)


def test_category_outside_the_category_list(tmp_path: Path) -> None:
    doc = base_doc()
    ann(doc, 17)["category_id"] = 3
    report, _ = run_fail(tmp_path, doc)
    assert failure(report, "annotation_category_unknown")["annotation_ids"] == [17]


def test_category_absent_from_the_dataset(tmp_path: Path) -> None:
    doc = base_doc()
    doc["categories"].append({"id": 3, "name": "bicycle", "supercategory": "none"})
    report, err = run_fail(tmp_path, doc)
    assert failure(report, "category_absent")["category_ids"] == [3]
    assert "category_absent (category ids 3)" in str(err)


def test_empty_tables_fail(tmp_path: Path) -> None:
    doc = base_doc()
    doc["annotations"] = []
    report, _ = run_fail(tmp_path, doc)
    assert "at least one box" in failure(report, "table_empty")["message"]


# -- fatal: image files -----------------------------------------------------------------------------


def test_images_pass_when_files_match(tmp_path: Path) -> None:
    doc = base_doc()
    images = make_images(tmp_path / "images", doc)
    (images / "extra.jpg").write_bytes((images / doc["images"][0]["file_name"]).read_bytes())
    report, _ = run_ok(tmp_path, doc, images=images)
    assert report["image_checks"] == {"images_checked": N_IMAGES, "decode": True}
    assert warning(report, "image_file_unreferenced")["file_names"] == ["extra.jpg"]


def test_image_missing_on_disk(tmp_path: Path) -> None:
    doc = base_doc()
    images = make_images(tmp_path / "images", doc)
    (images / doc["images"][6]["file_name"]).unlink()
    report, err = run_fail(tmp_path, doc, images=images)
    assert failure(report, "image_file_missing")["image_ids"] == [6]
    assert "image_file_missing (image ids 6)" in str(err)


def test_image_not_decodable(tmp_path: Path) -> None:
    doc = base_doc()
    images = make_images(tmp_path / "images", doc)
    truncated = images / doc["images"][1]["file_name"]
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])  # header intact, scan data cut
    (images / doc["images"][8]["file_name"]).write_bytes(b"not an image at all")
    report, _ = run_fail(tmp_path, doc, images=images)
    assert failure(report, "image_undecodable")["image_ids"] == [1, 8]
    # the header of the truncated file still gives its size: no size failure for it
    assert all(f["check"] != "image_size_mismatch" for f in report["failures"])


def test_truncated_image_passes_header_only_mode(tmp_path: Path) -> None:
    doc = base_doc()
    images = make_images(tmp_path / "images", doc)
    f = images / doc["images"][1]["file_name"]
    f.write_bytes(f.read_bytes()[:-200])
    report, _ = run_ok(tmp_path, doc, images=images, decode_images=False)
    assert report["image_checks"]["decode"] is False


def test_recorded_size_differs_from_file(tmp_path: Path) -> None:
    doc = base_doc()
    images = make_images(tmp_path / "images", doc)
    doc["images"][3]["width"] = W + 1
    doc["images"][7]["height"] = H - 8
    report, _ = run_fail(tmp_path, doc, images=images)
    assert failure(report, "image_size_mismatch")["image_ids"] == [3, 7]


def test_unsafe_file_name_is_fatal_and_never_opened(tmp_path: Path) -> None:
    doc = base_doc()
    images = make_images(tmp_path / "images", doc)
    secret = tmp_path / "outside.jpg"
    secret.write_bytes((images / doc["images"][0]["file_name"]).read_bytes())
    doc["images"][0]["file_name"] = "../outside.jpg"
    report, _ = run_fail(tmp_path, doc, images=images)
    assert failure(report, "unsafe_file_name")["image_ids"] == [0]


# -- repairable: quarantine and clipping -----------------------------------------------------------


def test_zero_and_negative_sizes_are_quarantined(tmp_path: Path) -> None:
    doc = base_doc()
    ann(doc, 10)["bbox"][2] = 0
    ann(doc, 20)["bbox"][3] = -4
    report, clean = run_ok(tmp_path, doc, max_quarantine_fraction=0.02)
    f = failure(report, "box_non_positive_size")
    assert f["annotation_ids"] == [10, 20] and f["policy"] == "quarantine"
    assert report["quarantined_annotation_ids"] == [10, 20]
    assert {a["id"] for a in clean["annotations"]} == set(range(100)) - {10, 20}


def test_box_past_the_edge_is_clipped_when_mostly_inside(tmp_path: Path) -> None:
    doc = base_doc()
    ann(doc, 55)["bbox"] = [W - 10, H - 12, 14, 15]  # 10x12 of 14x15 inside: 57%
    ann(doc, 56)["bbox"] = [-3, -2, 20, 20]  # 17x18 of 20x20 inside
    report, clean = run_ok(tmp_path, doc)
    assert report["quarantined_annotation_ids"] == []
    assert report["repairs"]["clipped_annotation_ids"] == [55, 56]
    assert ann(clean, 55)["bbox"] == [W - 10, H - 12, 10, 12] and ann(clean, 55)["area"] == 120
    assert ann(clean, 56)["bbox"] == [0, 0, 17, 18] and ann(clean, 56)["area"] == 306
    assert report["repairs"]["clipped"][0] == {"annotation_id": 55, "bbox_before": [W - 10, H - 12, 14, 15],
                                               "bbox_after": [W - 10, H - 12, 10, 12]}
    assert all(f["check"] != "box_past_image_edge" for f in report["failures"])


def test_box_mostly_outside_is_quarantined(tmp_path: Path) -> None:
    doc = base_doc()
    ann(doc, 57)["bbox"] = [W - 4, 5, 10, 10]  # 40% inside
    ann(doc, 58)["bbox"] = [W + 5, 5, 10, 10]  # entirely outside
    report, clean = run_ok(tmp_path, doc, max_quarantine_fraction=0.02)
    assert failure(report, "box_mostly_outside_image")["annotation_ids"] == [57, 58]
    assert report["quarantined_annotation_ids"] == [57, 58]
    assert report["repairs"]["clipped_annotation_ids"] == []
    assert not {57, 58} & {a["id"] for a in clean["annotations"]}


def test_clip_keep_fraction_is_a_threshold(tmp_path: Path) -> None:
    doc = base_doc()
    ann(doc, 57)["bbox"] = [W - 4, 5, 10, 10]  # 40% inside
    report, clean = run_ok(tmp_path, doc, min_clip_keep_fraction=0.4)
    assert report["repairs"]["clipped_annotation_ids"] == [57]
    assert ann(clean, 57)["bbox"] == [W - 4, 5, 4, 10]


def test_degenerate_tiny_box_is_quarantined(tmp_path: Path) -> None:
    doc = base_doc()
    ann(doc, 61)["bbox"] = [5, 5, 0.5, 20]
    ann(doc, 62)["bbox"] = [5, 5, 1, 20]  # exactly the minimum side: kept
    report, clean = run_ok(tmp_path, doc)
    assert failure(report, "box_too_small")["annotation_ids"] == [61]
    assert report["quarantined_annotation_ids"] == [61]
    assert ann(clean, 62)["bbox"] == [5, 5, 1, 20]


def test_box_tiny_after_clipping_is_quarantined(tmp_path: Path) -> None:
    doc = base_doc()
    ann(doc, 63)["bbox"] = [W - 0.5, 10, 0.6, 20]  # 83% inside, but 0.5 px wide once clipped
    report, _ = run_ok(tmp_path, doc)
    assert failure(report, "box_too_small")["annotation_ids"] == [63]


def test_exact_duplicate_boxes_keep_the_first(tmp_path: Path) -> None:
    doc = base_doc()
    for aid in (71, 72):
        a = ann(doc, aid)
        a["bbox"], a["category_id"] = list(ann(doc, 70)["bbox"]), ann(doc, 70)["category_id"]
    report, clean = run_ok(tmp_path, doc, max_quarantine_fraction=0.02)
    f = failure(report, "duplicate_box")
    assert f["annotation_ids"] == [71, 72] and f["kept_annotation_ids"] == [70]
    assert report["quarantined_annotation_ids"] == [71, 72]
    assert 70 in {a["id"] for a in clean["annotations"]}


def test_same_position_different_classes_is_a_warning(tmp_path: Path) -> None:
    doc = base_doc()
    a, b = ann(doc, 80), ann(doc, 89)  # person and car of image 8
    b["bbox"] = list(a["bbox"])
    report, clean = run_ok(tmp_path, doc)
    assert warning(report, "same_box_different_categories")["annotation_ids"] == [80, 89]
    assert report["quarantined_annotation_ids"] == []
    assert {80, 89} <= {x["id"] for x in clean["annotations"]}


# -- the quarantine threshold ----------------------------------------------------------------------


def test_quarantine_at_the_threshold_passes(tmp_path: Path) -> None:
    doc = base_doc()
    ann(doc, 10)["bbox"][2] = 0  # 1 of 100 boxes = exactly the default 1%
    report, _ = run_ok(tmp_path, doc)
    assert report["quarantined_annotation_ids"] == [10]
    assert report["thresholds"]["max_quarantine_fraction"] == 0.01


def test_quarantine_just_above_the_threshold_fails(tmp_path: Path) -> None:
    doc = base_doc()
    ann(doc, 10)["bbox"][2] = 0
    report, err = run_fail(tmp_path, doc, max_quarantine_fraction=0.0099)
    f = failure(report, "quarantine_threshold")
    assert f["annotation_ids"] == [10] and "1 of 100" in f["message"]
    assert "quarantine_threshold" in str(err)


def test_two_quarantined_boxes_exceed_the_default(tmp_path: Path) -> None:
    doc = base_doc()
    ann(doc, 10)["bbox"][2] = 0
    ann(doc, 11)["bbox"][3] = 0
    report, _ = run_fail(tmp_path, doc)
    assert failure(report, "quarantine_threshold")["count"] == 2
    assert failure(report, "box_non_positive_size")["policy"] == "quarantine"


# -- distribution warnings -------------------------------------------------------------------------


def test_distribution_checks_warn_but_pass(tmp_path: Path) -> None:
    doc = base_doc()
    for a in doc["annotations"]:
        a["category_id"] = 1
    ann(doc, 0)["category_id"] = 2  # 1% cars
    for a in doc["annotations"]:
        if a["image_id"] == 0:
            a["bbox"] = [0, a["id"] * 4, 60, 2]  # aspect 30
    report, _ = run_ok(tmp_path, doc, min_class_fraction=0.05)
    assert warning(report, "class_balance")["category_ids"] == [2]
    assert warning(report, "aspect_ratio")["count"] == 10
    assert report["failures"] == []


def test_boxes_per_image_warning(tmp_path: Path) -> None:
    doc = base_doc()
    doc["images"].append({"file_name": "image_000000011.jpg", "width": W, "height": H, "id": 10, "license": 1})
    report, _ = run_ok(tmp_path, doc, max_boxes_per_image=9)
    assert warning(report, "boxes_per_image")["image_ids"] == list(range(11))


# -- argument errors (exit 2, nothing written) -----------------------------------------------------


def test_missing_inputs_are_user_errors(tmp_path: Path) -> None:
    with pytest.raises(PersoncarError, match="annotation file not found") as info:
        validate_annotations(tmp_path / "nope.json", tmp_path / "out")
    assert not isinstance(info.value, DataValidationError) and info.value.exit_code == 2
    assert isinstance(info.value.__cause__, FileNotFoundError)  # the cause stays for the task log
    p = write(tmp_path, base_doc())
    with pytest.raises(PersoncarError, match="images folder not found"):
        validate_annotations(p, tmp_path / "out", images=tmp_path / "no-images")
    with pytest.raises(PersoncarError, match="would replace the input"):
        validate_annotations(p, tmp_path)
    with pytest.raises(PersoncarError, match="max_quarantine_fraction"):
        validate_annotations(p, tmp_path / "out", max_quarantine_fraction=1.5)
    assert not (tmp_path / "out").exists()


# -- malformed input never escapes as anything but PersoncarError ---------------------------------

json_scalars = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
                | st.floats(allow_nan=True, allow_infinity=True)
                | st.text(st.characters(exclude_categories=()), max_size=8))  # lone surrogates too
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.sampled_from(["id", "bbox", "image_id", "width", "x", "images"])
                                             | st.text(max_size=5), inner, max_size=4), max_leaves=12)


def _small_doc() -> dict[str, Any]:
    doc = base_doc()
    doc["images"] = doc["images"][:2]
    doc["annotations"] = [a for a in doc["annotations"] if a["image_id"] < 2 and a["id"] % 10 in (0, 9)]
    return doc


def _paths(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, prefix + (i,))
    return out


SMALL_PATHS = _paths(_small_doc())
# half the edits hit the document, a top-level list or a record (mostly stopped by the structural
# check, no GX run), half hit fields and bbox elements (the full GX path)
SHALLOW = [p for p in SMALL_PATHS if len(p) <= 2]
DEEP = [p for p in SMALL_PATHS if len(p) > 2]


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(st.tuples(st.sampled_from(SHALLOW) | st.sampled_from(DEEP), st.booleans(), json_values),
                      min_size=1, max_size=3))
def test_malformed_shapes_only_raise_personcar_errors(tmp_path: Path, edits: list[tuple[Any, bool, Any]]) -> None:
    doc: Any = _small_doc()
    for path, delete, value in edits:
        if not path:
            doc = value
            continue
        parent = doc
        try:
            for key in path[:-1]:
                parent = parent[key]
            if delete and isinstance(parent, dict):
                parent.pop(path[-1], None)
            else:
                parent[path[-1]] = value
        except (KeyError, IndexError, TypeError):
            continue  # an earlier edit changed the shape under this path
    p = tmp_path / "fuzz.json"
    p.write_text(json.dumps(doc, allow_nan=True))
    out = tmp_path / "fuzz-out"
    try:
        report = validate_annotations(p, out)
        assert report["success"] is True
    except PersoncarError as exc:
        assert "\n" not in str(exc)
        assert isinstance(exc, DataValidationError)  # the input was readable: it is the data that failed
        report = json.loads((out / "validation.json").read_text())
        assert report["success"] is False and report["failures"]


@settings(max_examples=150, deadline=None)
@given(records=st.lists(st.dictionaries(
    st.sampled_from(["id", "image_id", "category_id", "bbox", "iscrowd", "segmentation", "area",
                     "file_name", "width", "height", "name"]),
    json_values | st.lists(json_scalars, min_size=4, max_size=4), max_size=8), max_size=6))
def test_tables_build_from_any_record_values(records: list[dict[str, Any]]) -> None:
    """The table builder (no GX) copes with any values inside well-shaped records."""
    from data_checks.tables import build_tables, check_structure

    doc = {"images": copy.deepcopy(records), "annotations": copy.deepcopy(records), "categories": records}
    assert check_structure(doc) is None
    tables = build_tables(doc)
    assert len(tables.annotations) == len(records)
    for col in ("x", "y", "w", "h", "x2", "y2", "in_image_fraction", "relative_size", "aspect_ratio"):
        assert all(math.isnan(v) or math.isfinite(v) for v in tables.annotations[col])


def test_strings_that_are_not_unicode_are_type_failures(tmp_path: Path) -> None:
    doc = base_doc()
    doc["categories"][0]["name"] = "per\ud800son"  # a JSON escape can spell a lone surrogate
    doc["images"][4]["file_name"] = "\udcff.jpg"
    report, _ = run_fail(tmp_path, doc)
    assert "string with invalid unicode" in failure(report, "category_field_type")["message"]
    assert failure(report, "image_field_type")["image_ids"] == [4]


def test_duplicate_boxes_with_an_invalid_id_do_not_crash(tmp_path: Path) -> None:
    doc = base_doc()
    a, b = ann(doc, 70), ann(doc, 71)
    b["bbox"], b["category_id"] = list(a["bbox"]), a["category_id"]
    b["id"] = "71"  # a string id: a fatal type failure, reported by position
    report, _ = run_fail(tmp_path, doc)
    pos = next(i for i, x in enumerate(doc["annotations"]) if x["id"] == "71")
    assert failure(report, "annotation_field_type")["annotation_ids"] == [f"annotations[{pos}]"]
    assert failure(report, "duplicate_box")["kept_annotation_ids"] == [70]
