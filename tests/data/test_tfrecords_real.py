"""The TFRecord stage on the real data: 112 Open Images photos with their subset annotations."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tasks.tfrecords import build_tfrecords, read_records

pytestmark = pytest.mark.realdata


@pytest.fixture(scope="module")
def real_clean(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The validation stage's cleaned JSON for the 112 real images (pixel areas, sorted)."""
    from tasks.validate import validate_annotations

    out = tmp_path_factory.mktemp("real") / "validate"
    result = validate_annotations(shared_data / "bbox-annotations.sample112.json", out, images=shared_data / "images")
    assert result["success"] is True
    return out / "annotations.clean.json"


def test_real_images_convert_with_pixel_boxes_and_both_classes_in_val(real_clean: Path, shared_data: Path,
                                                                       tmp_path: Path) -> None:
    from tasks.proto import tf_example_pb2 as pb

    clean = json.loads(real_clean.read_text())
    m = build_tfrecords(real_clean, shared_data / "images", tmp_path / "tfr", val_fraction=0.2)
    assert m["splits"]["train"]["images"] + m["splits"]["val"]["images"] == 112
    assert m["splits"]["train"]["boxes"] + m["splits"]["val"]["boxes"] == len(clean["annotations"])
    assert all(m["splits"]["val"]["per_class"][c] > 0 for c in ("person", "car"))
    sizes = {im["id"]: (im["width"], im["height"]) for im in clean["images"]}
    boxes = {}
    for shard in sorted((tmp_path / "tfr").glob("*.tfrecord")):
        for raw in read_records(shard):
            f = pb.Example.FromString(raw).features.feature
            image_id = int(f["image/source_id"].bytes_list.value[0])
            W, H = sizes[image_id]
            assert (f["image/width"].int64_list.value[0], f["image/height"].int64_list.value[0]) == (W, H)
            xs = zip(f["image/object/bbox/xmin"].float_list.value, f["image/object/bbox/ymin"].float_list.value,
                     f["image/object/bbox/xmax"].float_list.value, f["image/object/bbox/ymax"].float_list.value,
                     strict=True)
            boxes[image_id] = [(round(x0 * W), round(y0 * H), round((x1 - x0) * W), round((y1 - y0) * H))
                               for x0, y0, x1, y1 in xs]
    expected: dict[int, list] = {}
    for a in clean["annotations"]:
        expected.setdefault(a["image_id"], []).append(tuple(round(v) for v in a["bbox"]))
    assert boxes == expected
    val = json.loads((tmp_path / "tfr" / "val.coco.json").read_text())
    assert all(a["area"] == a["bbox"][2] * a["bbox"][3] and a["area"] > 1 for a in val["annotations"])
