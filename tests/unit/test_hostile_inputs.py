"""Hostile inputs at the CLI: each is refused (or handled by its stated policy) in one line.

Every test builds its hostile input in tmp_path from the generated sample, runs the real command
in-process (``tasks.cli.main``), and asserts the exit code, the one ``personcar CMD: error:``
line on stderr (no traceback) and that nothing outside the stage's own output folder changed.
"""

from __future__ import annotations

import copy
import gzip
import io
import json
import shutil
import struct
import subprocess
import sys
import tarfile
import warnings
import zlib
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tests.conftest import cli, snapshot

HINT = "; run `personcar validate` and build from its annotations.clean.json"








@pytest.fixture()
def data(sample_dataset: dict[str, Path], tmp_path: Path) -> dict[str, Any]:
    """A private copy of the 12-image sample: its images folder and its cleaned COCO document."""
    images = tmp_path / "images"
    shutil.copytree(sample_dataset["images"], images)
    return {"images": images, "doc": json.loads(sample_dataset["clean"].read_text())}


def write(tmp_path: Path, doc: Any, name: str = "ann.json") -> Path:
    p = tmp_path / name
    p.write_text(json.dumps(doc))
    return p


# -- 1. category ids meet the model's label map ------------------------------------------------------

LABEL_MAP = "categories must be the model's label map 1 'person', 2 'car'; "


def zero_based(doc: dict[str, Any]) -> None:
    for c in doc["categories"]:
        c["id"] -= 1
    for a in doc["annotations"]:
        a["category_id"] -= 1


def extra_class(doc: dict[str, Any]) -> None:
    doc["categories"].append({"id": 3, "name": "truck", "supercategory": "none"})
    doc["annotations"][0]["category_id"] = 3


def swapped(doc: dict[str, Any]) -> None:
    doc["categories"][0]["name"], doc["categories"][1]["name"] = "car", "person"


LABEL_CASES = {
    "0-based export": (zero_based, "not in the label map: 0 'person', 1 'car' (a 0-based export? id 0 is the "
                                   "model's background); missing from the file: 1 'person', 2 'car'"),
    "extra class 3": (extra_class, "not in the label map: 3 'truck'"),
    "swapped names": (swapped, "not in the label map: 1 'car', 2 'person'; missing from the file: 1 'person', 2 'car'"),
}


@pytest.mark.parametrize("case", list(LABEL_CASES))
def test_categories_that_are_not_the_label_map_fail_validation_and_tfrecords(
        case: str, data: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mutate, what = LABEL_CASES[case]
    doc = copy.deepcopy(data["doc"])
    mutate(doc)
    ann = write(tmp_path, doc)
    before = snapshot(tmp_path)

    rc, line = cli(capsys, "validate", "--annotations", ann, "--out", tmp_path / "v")
    assert rc == 1
    assert line == (f"personcar validate: error: {ann}: dataset failed validation: label_map_mismatch "
                    f"({LABEL_MAP}{what}); see {tmp_path / 'v' / 'validation.json'}")
    report = json.loads((tmp_path / "v" / "validation.json").read_text())
    assert not (tmp_path / "v" / "annotations.clean.json").exists()
    assert [f for f in report["failures"] if f["check"] == "label_map_mismatch"][0]["policy"] == "fatal"
    assert report["label_map"] == {"1": "person", "2": "car"}

    rc, line = cli(capsys, "tfrecords", "--annotations", ann, "--images", data["images"], "--out", tmp_path / "t")
    assert rc == 1
    assert line == (f"personcar tfrecords: error: {ann}: refused by the validation rules: label_map_mismatch "
                    f"({LABEL_MAP}{what}){HINT}")
    assert snapshot(tmp_path, skip=("v",)) == before  # no TFRecords, nothing else touched


def test_the_label_map_itself_must_be_ids_1_to_n(tmp_path: Path) -> None:
    from tasks.errors import PersoncarError
    from tasks.validate import validate_annotations

    ann = tmp_path / "ann.json"
    ann.write_text("{}")
    for bad in ({0: "person", 1: "car"}, {1: "person", 3: "car"}, {1: ""}):
        with pytest.raises(PersoncarError, match=r"^label map must name ids 1\.\.N, got "):
            validate_annotations(ann, tmp_path / "v", label_map=bad)


# -- 2. EXIF orientation: quarantined with its boxes --------------------------------------------------

def rotate_tag(path: Path, orientation: int) -> None:
    """Re-save a real JPEG with an EXIF Orientation tag (what a phone writes for a turned photo)."""
    with Image.open(path) as im:
        im.load()
        exif = Image.Exif()
        exif[0x0112] = orientation
        im.save(path, "JPEG", quality=90, exif=exif.tobytes())
    with Image.open(path) as im:
        assert im.getexif()[0x0112] == orientation


def test_exif_rotated_photo_is_quarantined_with_its_boxes(data: dict[str, Any], tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    doc = data["doc"]
    first = doc["images"][0]
    rotate_tag(data["images"] / first["file_name"], 6)
    rotate_tag(data["images"] / doc["images"][1]["file_name"], 1)  # upright: not flagged
    ann = write(tmp_path, doc)
    boxes = sorted(a["id"] for a in doc["annotations"] if a["image_id"] == first["id"])
    before = snapshot(tmp_path)
    detail = f"1 file(s) turned by their EXIF Orientation, e.g. {first['file_name']} (Orientation 6)"

    # by default its boxes exceed the 1% quarantine threshold: the run fails, naming the cause
    rc, line = cli(capsys, "validate", "--annotations", ann, "--images", data["images"], "--out", tmp_path / "v")
    assert rc == 1
    shown = ", ".join(str(i) for i in boxes[:5]) + (f", ... ({len(boxes)} in all)" if len(boxes) > 5 else "")
    assert line == (f"personcar validate: error: {ann}: dataset failed validation: quarantine_threshold "
                    f"(annotation ids {shown}); quarantined by image_exif_rotated (image ids {first['id']}: "
                    f"{detail}); see {tmp_path / 'v' / 'validation.json'}")

    # with room in the threshold the image and every box on it are left out of the clean file
    rc, _ = cli(capsys, "validate", "--annotations", ann, "--images", data["images"], "--out", tmp_path / "v",
                "--max-quarantine-fraction", "0.5")
    assert rc == 0
    report = json.loads((tmp_path / "v" / "validation.json").read_text())
    clean = json.loads((tmp_path / "v" / "annotations.clean.json").read_text())
    assert report["quarantined_image_ids"] == [first["id"]]
    assert report["quarantined_annotation_ids"] == boxes
    entry = next(f for f in report["failures"] if f["check"] == "image_exif_rotated")
    assert entry["policy"] == "quarantine" and entry["image_ids"] == [first["id"]] and entry["detail"] == detail
    assert first["id"] not in {im["id"] for im in clean["images"]} and len(clean["images"]) == len(doc["images"]) - 1
    assert not {a["id"] for a in clean["annotations"]} & set(boxes)

    # tfrecords refuses the file that still lists it
    rc, line = cli(capsys, "tfrecords", "--annotations", ann, "--images", data["images"], "--out", tmp_path / "t")
    assert rc == 1
    assert line.startswith(f"personcar tfrecords: error: {ann}: refused by the validation rules: image_exif_rotated "
                           f"(image ids {first['id']}: {detail}); quarantine_threshold (annotation ids ")
    assert snapshot(tmp_path, skip=("v",)) == before


# -- 3. tfrecords refuses what validation rejects --------------------------------------------------------

def _nan_box(doc: dict[str, Any], tmp_path: Path) -> None:
    doc["annotations"][0]["bbox"] = [float("nan")] * 4


def _negative_width(doc: dict[str, Any], tmp_path: Path) -> None:
    doc["annotations"][0]["bbox"][2] = -20


def _absolute_name(doc: dict[str, Any], tmp_path: Path) -> None:
    outside = tmp_path / "outside.jpg"
    shutil.copy(tmp_path / "images" / doc["images"][0]["file_name"], outside)
    doc["images"][0]["file_name"] = str(outside)


def _dotdot_name(doc: dict[str, Any], tmp_path: Path) -> None:
    shutil.copy(tmp_path / "images" / doc["images"][0]["file_name"], tmp_path / "up.jpg")
    doc["images"][0]["file_name"] = "../up.jpg"


def _truncated(doc: dict[str, Any], tmp_path: Path) -> None:
    f = tmp_path / "images" / doc["images"][0]["file_name"]
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _bbox_string(doc: dict[str, Any], tmp_path: Path) -> None:
    doc["annotations"][0]["bbox"] = "1,2,3,4"


TFRECORD_CASES = {
    "NaN box": (_nan_box, "annotation_field_type (annotation ids {a0})"),
    "negative width": (_negative_width, "box_non_positive_size (annotation ids {a0})"),
    "absolute file_name": (_absolute_name, "unsafe_file_name (image ids {i0})"),
    "'..' file_name": (_dotdot_name, "unsafe_file_name (image ids {i0})"),
    "truncated JPEG": (_truncated, "image_undecodable (image ids {i0}: 1 file(s) undecodable, e.g. {f0} (decode failed: "),
    "bbox a string": (_bbox_string, "annotation_field_type (annotation ids {a0})"),
}


@pytest.mark.parametrize("case", list(TFRECORD_CASES))
def test_tfrecords_refuses_what_validation_rejects(case: str, data: dict[str, Any], tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    mutate, expected = TFRECORD_CASES[case]
    doc = data["doc"]
    keys = {"a0": doc["annotations"][0]["id"], "i0": doc["images"][0]["id"], "f0": doc["images"][0]["file_name"]}
    mutate(doc, tmp_path)
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(doc, allow_nan=True))
    before = snapshot(tmp_path)
    rc, line = cli(capsys, "tfrecords", "--annotations", ann, "--images", data["images"], "--out", tmp_path / "t")
    assert rc == 1
    assert line.startswith(f"personcar tfrecords: error: {ann}: refused by the validation rules: "
                           + expected.format(**keys)), line
    assert line.endswith(HINT)
    assert snapshot(tmp_path) == before  # no output folder, no partial shard, nothing read outside --images


def test_tfrecords_structural_error_is_one_line(data: dict[str, Any], tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    doc = data["doc"]
    del doc["categories"]
    ann = write(tmp_path, doc)
    before = snapshot(tmp_path)
    rc, line = cli(capsys, "tfrecords", "--annotations", ann, "--images", data["images"], "--out", tmp_path / "t")
    assert (rc, line) == (1, f"personcar tfrecords: error: {ann}: structure: missing top-level key 'categories'")
    assert snapshot(tmp_path) == before


# -- 5. decompression bombs, relative --out, run ids, argument values, gzip bombs ------------------------

def jpeg_header(path: Path, width: int, height: int) -> None:
    """A small real JPEG whose frame header claims width x height."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (90, 120, 200)).save(buf, "JPEG")
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    path.write_bytes(bytes(data))


def png_header(path: Path, width: int, height: int) -> None:
    """A PNG of width x height grey pixels: a valid header and a few rows of compressed zeros."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * (width + 1) * 4))
                     + chunk(b"IEND", b""))


BOMBS = {  # file, builder, size, what the refusal says about the pixels
    "30000x30000 JPEG": ("bomb.jpg", jpeg_header, 30000, "900000000 pixels"),
    "20000x20000 PNG": ("bomb.png", png_header, 20000, "400000000 pixels"),
    "10000x10000 PNG": ("big.png", png_header, 10000, "10000x10000 = 100000000 pixels"),  # under Pillow's own error
}


@pytest.mark.parametrize("case", list(BOMBS))
def test_decompression_bombs_are_refused_from_the_header(case: str, data: dict[str, Any], tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    from data_checks.images import check_image_file

    name, build, side, pixels = BOMBS[case]
    doc = data["doc"]
    (data["images"] / doc["images"][0]["file_name"]).unlink()
    build(data["images"] / name, side, side)
    doc["images"][0].update(file_name=name, width=side, height=side)
    ann = write(tmp_path, doc)
    before = snapshot(tmp_path)
    why = f"{pixels}, more than max_image_pixels=89478485"

    with warnings.catch_warnings():  # Pillow warns below twice its limit; the refusal is ours
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        found = check_image_file(data["images"] / name)
    assert (found.pixels_ok, found.decoded, found.error) == (False, None, f"image too large: {why}")  # never decoded

    rc, line = cli(capsys, "validate", "--annotations", ann, "--images", data["images"], "--out", tmp_path / "v")
    assert (rc, line) == (1, f"personcar validate: error: {ann}: dataset failed validation: image_too_large "
                             f"(image ids {doc['images'][0]['id']}); see {tmp_path / 'v' / 'validation.json'}")
    rc, line = cli(capsys, "tfrecords", "--annotations", ann, "--images", data["images"], "--out", tmp_path / "t")
    assert (rc, line) == (1, f"personcar tfrecords: error: {ann}: refused by the validation rules: image_too_large "
                             f"(image ids {doc['images'][0]['id']}: 1 file(s) too large, e.g. {name} (image too "
                             f"large: {why})){HINT}")
    assert snapshot(tmp_path, skip=("v",)) == before


def test_tfrecords_writer_refuses_an_oversized_image_itself(tmp_path: Path) -> None:
    from tasks.errors import PersoncarError
    from tasks.tfrecords import ImageRecord, make_example

    jpeg_header(tmp_path / "bomb.jpg", 30000, 30000)
    rec = ImageRecord({"id": 0, "file_name": "bomb.jpg", "width": 30000, "height": 30000}, [])
    with pytest.raises(PersoncarError, match=r"bomb\.jpg: image too large: 900000000 pixels, more than "
                                             r"max_image_pixels=89478485 \(rule: image_too_large\)$"):
        make_example(rec, tmp_path / "bomb.jpg", {1: "person", 2: "car"})


def test_relative_out_works_and_the_current_folder_is_refused(sample_dataset: dict[str, Path], tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    ann = sample_dataset["annotations"]
    assert cli(capsys, "validate", "--annotations", ann, "--out", "vout") == (0, "")
    assert json.loads((work / "vout" / "validation.json").read_text())["success"] is True
    assert (work / "vout" / "data_docs" / "index.html").is_file()
    assert cli(capsys, "validate", "--annotations", ann, "--out", "vout") == (0, "")  # its own folder: replaced
    before = snapshot(tmp_path)
    for out in (".", ".."):
        rc, line = cli(capsys, "validate", "--annotations", ann, "--out", out)
        assert (rc, line) == (2, f"personcar validate: error: --out {out} is (or contains) the current folder, which "
                                 "personcar validate would replace as a whole: give a folder of its own, e.g. a new "
                                 "subfolder")
    assert snapshot(tmp_path) == before


def test_publish_run_id_that_cannot_name_a_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "run" / "report"
    src.mkdir(parents=True)
    (src / "report.md").write_text("# r\n")
    before = snapshot(tmp_path)
    for run_id in ("..", "."):
        rc, line = cli(capsys, "publish", "--src", src, "--dest", tmp_path / "pub", "--run-id", run_id)
        assert (rc, line) == (2, f"personcar publish: error: run id {run_id!r} cannot name a folder")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(("option", "value", "rule"), [
    ("--log-every", "0", "must be an integer >= 1"),
    ("--checkpoint-every", "-5", "must be an integer >= 1"),
    ("--gpus", "-1", "must be an integer >= 0"),
    ("--steps", "ten", "must be an integer between 1 and 1000000"),
    ("--learning-rate", "0", "must be a number > 0 and <= 10"),
])
def test_train_values_fail_at_argument_parsing_before_tensorflow(option: str, value: str, rule: str,
                                                                 tmp_path: Path) -> None:
    code = ("import sys; from tasks.cli import main; rc = main(sys.argv[1:]); "
            "assert 'tensorflow' not in sys.modules; sys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", code, "train", "--data", str(tmp_path), "--model-dir",
                        str(tmp_path / "m"), option, value], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.splitlines() == [f"personcar train: error: argument {option}: {rule}, got {value!r} "
                                     "(see personcar train --help)"]
    assert list(tmp_path.iterdir()) == []


def test_other_option_values_are_checked_too(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for args, message in (
        (["tfrecords", "--annotations", "a", "--images", "i", "--out", "o", "--val-fraction", "nan"],
         "argument --val-fraction: must be a number between 0 and 1, got 'nan'"),
        (["tfrecords", "--annotations", "a", "--images", "i", "--out", "o", "--num-shards", "0"],
         "argument --num-shards: must be an integer between 1 and 1024, got '0'"),
        (["validate", "--annotations", "a", "--out", "o", "--max-quarantine-fraction", "2"],
         "argument --max-quarantine-fraction: must be a number between 0 and 1, got '2'"),
    ):
        assert cli(capsys, *args) == (2, f"personcar {args[0]}: error: {message} (see personcar {args[0]} --help)")


def _bomb_archive(path: Path, zeros: int) -> Path:
    """The production layout (one tiny image) plus a member of ``zeros`` zero bytes, gzipped."""
    buf = io.BytesIO()
    img = io.BytesIO()
    Image.new("RGB", (32, 24)).save(img, "JPEG")
    doc = {"images": [{"id": 0, "file_name": "image_000000001.jpg", "width": 32, "height": 24}],
           "annotations": [], "categories": [{"id": 1, "name": "person"}, {"id": 2, "name": "car"}]}
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, body in (("trainval/images/image_000000001.jpg", img.getvalue()),
                           ("trainval/annotations/bbox-annotations.json", json.dumps(doc).encode()),
                           ("trainval/images/zeros.bin", b"\0" * zeros)):
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tf.addfile(info, io.BytesIO(body))
    path.write_bytes(gzip.compress(buf.getvalue(), 9))
    return path


def test_gzip_bomb_is_capped_by_the_ratio_to_the_archive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("PERSONCAR_CACHE_DIR", str(tmp_path / "cache"))
    work = tmp_path / "work"
    work.mkdir()
    archive = _bomb_archive(work / "trainval.tar.gz", 32 << 20)
    size = archive.stat().st_size
    assert size < 64 * 1024  # 32 MiB of zeros in a few KiB: far more than 100 times the archive
    before = snapshot(work)
    rc, line = cli(capsys, "download", "--source", archive, "--dest", work / "dest")
    assert (rc, line) == (2, "personcar download: error: unsafe archive member 'trainval/images/zeros.bin' in "
                             f"trainval.tar.gz: extracted size would exceed max_ratio=100 times the archive's {size} "
                             "bytes (decompression bomb cap)")
    assert snapshot(work) == before  # no dest, no temp folder beside it


def test_extraction_never_fills_the_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tasks import download as dl
    from tasks.errors import PersoncarError

    real = shutil.disk_usage

    def nearly_full(path: Any) -> Any:
        return real(path)._replace(free=300 * 2**20)  # 300 MiB free; 256 MiB must stay free

    monkeypatch.setattr(dl.shutil, "disk_usage", nearly_full)
    work = tmp_path / "work"
    work.mkdir()
    archive = _bomb_archive(work / "trainval.tar.gz", 64 << 20)
    before = snapshot(work)
    with pytest.raises(PersoncarError) as info:
        dl.download_dataset(str(archive), work / "dest", cache_dir=tmp_path / "cache", max_ratio=1e6)
    msg = str(info.value)
    assert msg.startswith("unsafe archive member 'trainval/images/zeros.bin' in trainval.tar.gz: extracted size "
                          f"would exceed the free disk space ({300 * 2**20} bytes free at "), msg
    assert msg.endswith(f"min_free_bytes={256 * 2**20} kept)") and "\n" not in msg
    assert snapshot(work) == before
