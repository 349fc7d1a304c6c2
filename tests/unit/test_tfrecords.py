"""TFRecords: OD API keys read back by TensorFlow, split rules, shards, determinism."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tasks.errors import PersoncarError
from tasks.tfrecords import build_tfrecords, frame_record, read_records, split_images, split_key, ImageRecord

OD_KEYS = {
    "image/height": ("fixed", "int64"), "image/width": ("fixed", "int64"),
    "image/filename": ("fixed", "string"), "image/source_id": ("fixed", "string"),
    "image/key/sha256": ("fixed", "string"), "image/encoded": ("fixed", "string"),
    "image/format": ("fixed", "string"),
    "image/object/bbox/xmin": ("var", "float32"), "image/object/bbox/xmax": ("var", "float32"),
    "image/object/bbox/ymin": ("var", "float32"), "image/object/bbox/ymax": ("var", "float32"),
    "image/object/class/text": ("var", "string"), "image/object/class/label": ("var", "int64"),
    "image/object/is_crowd": ("var", "int64"), "image/object/area": ("var", "float32"),
}


def parse_all(folder: Path, split: str) -> list[dict]:
    """Every record of a split, parsed by plain tf.io.parse_single_example with the OD API keys."""
    from tasks.train import _setup_tf

    tf = _setup_tf()
    spec = {k: (tf.io.FixedLenFeature([], getattr(tf, t)) if kind == "fixed" else tf.io.VarLenFeature(getattr(tf, t)))
            for k, (kind, t) in OD_KEYS.items()}
    out = []
    for raw in tf.data.TFRecordDataset(sorted(str(p) for p in folder.glob(f"{split}-*.tfrecord"))):
        ex = tf.io.parse_single_example(raw, spec)
        out.append({k: (tf.sparse.to_dense(v).numpy().tolist() if isinstance(v, tf.SparseTensor) else v.numpy())
                    for k, v in ex.items()})
    return out


@pytest.fixture(scope="module")
def built(sample_dataset: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("tfr") / "tfrecords"
    manifest = build_tfrecords(sample_dataset["clean"], sample_dataset["images"], out, num_shards=2, val_fraction=0.3)
    return out, manifest


def test_round_trip_with_tf_parse_single_example(built: tuple[Path, dict], sample_dataset: dict[str, Path]) -> None:
    out, manifest = built
    coco = json.loads(sample_dataset["clean"].read_text())
    images = {im["id"]: im for im in coco["images"]}
    records = parse_all(out, "train") + parse_all(out, "val")
    assert len(records) == len(images)
    assert len({r["image/source_id"] for r in records}) == len(records)  # unique per image
    for r in records:
        im = images[int(r["image/source_id"])]
        anns = sorted((a for a in coco["annotations"] if a["image_id"] == im["id"]), key=lambda a: a["id"])
        W, H = im["width"], im["height"]
        assert (r["image/width"], r["image/height"], r["image/filename"].decode()) == (W, H, im["file_name"])
        assert r["image/format"] == b"jpeg"
        assert r["image/encoded"] == (sample_dataset["images"] / im["file_name"]).read_bytes()
        assert r["image/object/class/label"] == [a["category_id"] for a in anns]
        assert [t.decode() for t in r["image/object/class/text"]] == [("person", "car")[a["category_id"] - 1] for a in anns]
        for k, a in enumerate(anns):
            x, y, w, h = a["bbox"]
            assert r["image/object/bbox/xmin"][k] == pytest.approx(x / W, abs=1e-6)
            assert r["image/object/bbox/xmax"][k] == pytest.approx((x + w) / W, abs=1e-6)
            assert r["image/object/bbox/ymin"][k] == pytest.approx(y / H, abs=1e-6)
            assert r["image/object/bbox/ymax"][k] == pytest.approx((y + h) / H, abs=1e-6)
            assert r["image/object/area"][k] == pytest.approx(w * h)


def test_model_garden_decoder_reads_the_records(built: tuple[Path, dict]) -> None:
    from official.vision.dataloaders import tf_example_decoder

    from tasks.train import _setup_tf

    tf = _setup_tf()
    out, _ = built
    raw = next(iter(tf.data.TFRecordDataset(str(next(out.glob("train-*.tfrecord"))))))
    d = tf_example_decoder.TfExampleDecoder().decode(raw)
    assert d["image"].shape[-1] == 3
    boxes = d["groundtruth_boxes"].numpy()
    assert boxes.shape[1] == 4 and ((boxes >= 0) & (boxes <= 1)).all()
    assert set(d["groundtruth_classes"].numpy().tolist()) <= {1, 2}


def test_splits_are_disjoint_complete_and_stratified(built: tuple[Path, dict], sample_dataset: dict[str, Path]) -> None:
    out, m = built
    train, val = set(m["splits"]["train"]["image_ids"]), set(m["splits"]["val"]["image_ids"])
    assert not train & val and len(train | val) == 12
    assert m["splits"]["val"]["per_class"]["person"] > 0 and m["splits"]["val"]["per_class"]["car"] > 0
    val_coco = json.loads((out / "val.coco.json").read_text())
    assert {im["id"] for im in val_coco["images"]} == val
    assert all(a["image_id"] in val and a["area"] == a["bbox"][2] * a["bbox"][3] for a in val_coco["annotations"])
    assert (out / "label_map.pbtxt").read_text() == "item {\n  id: 1\n  name: 'person'\n}\nitem {\n  id: 2\n  name: 'car'\n}\n"


def test_manifest_counts_and_shard_hashes(built: tuple[Path, dict]) -> None:
    from tasks.artifacts import sha256_file

    out, m = built
    assert [s["file"] for s in m["shards"]["train"]] == ["train-00000-of-00002.tfrecord", "train-00001-of-00002.tfrecord"]
    for split in ("train", "val"):
        assert sum(s["images"] for s in m["shards"][split]) == m["splits"][split]["images"]
        for s in m["shards"][split]:
            assert sha256_file(out / s["file"]) == s["sha256"]
            assert len(read_records(out / s["file"])) == s["images"]
    assert json.loads((out / "manifest.json").read_text()) == m


def test_byte_identical_on_rerun_and_in_parallel(built: tuple[Path, dict], sample_dataset: dict[str, Path], tmp_path: Path) -> None:
    out, m = built
    again = build_tfrecords(sample_dataset["clean"], sample_dataset["images"], out, num_shards=2, val_fraction=0.3, workers=1)
    assert again["shards"] == m["shards"]  # re-run in place: same bytes, nothing duplicated
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [s["file"] for s in m["shards"]["train"] + m["shards"]["val"]] + ["label_map.pbtxt", "manifest.json", "val.coco.json"])
    serial = build_tfrecords(sample_dataset["clean"], sample_dataset["images"], tmp_path / "s", num_shards=2, val_fraction=0.3, workers=1)
    assert serial["shards"] == m["shards"]


@pytest.mark.parametrize("fraction", [0.0, 1.0])
def test_val_fraction_zero_and_one(fraction: float, sample_dataset: dict[str, Path], tmp_path: Path) -> None:
    m = build_tfrecords(sample_dataset["clean"], sample_dataset["images"], tmp_path / "o", val_fraction=fraction)
    full, empty = ("val", "train") if fraction == 1.0 else ("train", "val")
    assert m["splits"][full]["images"] == 12 and m["splits"][empty]["images"] == 0
    assert not list((tmp_path / "o").glob(f"{empty}-*.tfrecord"))


def test_split_is_stable_when_images_are_added() -> None:
    def rec(i: int) -> ImageRecord:
        return ImageRecord({"id": i, "file_name": f"image_{i + 1:09d}.jpg"}, [{"category_id": 1 + i % 2}])

    small = split_images([rec(i) for i in range(200)], 0.2)
    big = split_images([rec(i) for i in range(400)], 0.2)
    assert {r.image["id"] for r in small[1]} == {r.image["id"] for r in big[1] if r.image["id"] < 200}
    assert 0 <= split_key("x.jpg") < 1 and split_key("x.jpg") == split_key("x.jpg")


def test_tfrecord_framing_detects_corruption(tmp_path: Path) -> None:
    p = tmp_path / "x.tfrecord"
    p.write_bytes(frame_record(b"hello") + frame_record(b"world"))
    assert read_records(p) == [b"hello", b"world"]
    data = bytearray(p.read_bytes())
    data[14] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(PersoncarError, match="corrupt record data"):
        read_records(p)


def test_fractional_areas_and_missing_images_are_refused(sample_dataset: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(PersoncarError, match="areas look like image fractions"):
        build_tfrecords(sample_dataset["annotations"], sample_dataset["images"], tmp_path / "o")
    coco = json.loads(sample_dataset["clean"].read_text())
    coco["images"][0]["file_name"] = "image_missing.jpg"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(coco))
    with pytest.raises(PersoncarError, match="missing, e.g. image_missing.jpg"):
        build_tfrecords(bad, sample_dataset["images"], tmp_path / "o")
    assert not (tmp_path / "o").exists()
