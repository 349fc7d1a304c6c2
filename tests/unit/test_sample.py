"""The offline sample: production layout and JSON format, learnable scenes, determinism."""

from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from tasks.cli import main
from tasks.sample import make_sample


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode() + p.read_bytes())
    return h.hexdigest()


def test_layout_and_json_format_match_production(sample_dataset: dict[str, Path], shared_data: Path) -> None:
    coco = json.loads(sample_dataset["annotations"].read_text())
    real = json.loads((shared_data / "bbox-annotations.sample112.json").read_text())
    assert set(coco) == set(real) == {"images", "annotations", "categories", "licenses"}
    assert coco["categories"] == real["categories"]
    assert coco["licenses"] == real["licenses"]
    assert [set(x) for x in coco["images"][:1]] == [set(real["images"][0])]
    assert set(coco["annotations"][0]) == set(real["annotations"][0])
    ids = [im["id"] for im in coco["images"]]
    assert ids == list(range(12))
    for im in coco["images"]:
        assert im["file_name"] == f"image_{im['id'] + 1:09d}.jpg"
        with Image.open(sample_dataset["images"] / im["file_name"]) as f:
            assert f.format == "JPEG" and f.size == (im["width"], im["height"])
    anns = coco["annotations"]
    assert [a["id"] for a in anns] == list(range(len(anns)))
    assert any(a["image_id"] > b["image_id"] for a, b in zip(anns, anns[1:], strict=False)), "not sorted, as published"
    for a in anns:
        x, y, w, h = a["bbox"]
        im = coco["images"][a["image_id"]]
        assert all(isinstance(v, int) for v in a["bbox"]) and w > 0 and h > 0
        assert x >= 0 and y >= 0 and x + w <= im["width"] and y + h <= im["height"]
        assert a["area"] == pytest.approx(w * h / (im["width"] * im["height"]))  # a fraction, as published
    for image_id in ids:  # every image has both classes, as in the real data
        assert {a["category_id"] for a in anns if a["image_id"] == image_id} == {1, 2}


def test_shapes_are_learnable_people_are_tall_cars_are_wide(sample_dataset: dict[str, Path]) -> None:
    anns = json.loads(sample_dataset["annotations"].read_text())["annotations"]
    assert all(a["bbox"][2] < a["bbox"][3] for a in anns if a["category_id"] == 1)
    assert all(a["bbox"][2] > a["bbox"][3] for a in anns if a["category_id"] == 2)


def test_deterministic_for_a_seed_and_different_across_seeds(tmp_path: Path) -> None:
    make_sample(tmp_path / "a", images=3, seed=5, archive=tmp_path / "a.tar.gz")
    make_sample(tmp_path / "b", images=3, seed=5, archive=tmp_path / "b.tar.gz")
    make_sample(tmp_path / "c", images=3, seed=6)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b") != _digest(tmp_path / "c")
    assert (tmp_path / "a.tar.gz").read_bytes() == (tmp_path / "b.tar.gz").read_bytes()


def test_archive_has_the_production_member_layout(sample_dataset: dict[str, Path]) -> None:
    with tarfile.open(sample_dataset["archive"]) as tar:
        names = tar.getnames()
        assert all(m.isfile() or m.isdir() for m in tar.getmembers())
    assert "trainval/annotations/bbox-annotations.json" in names
    assert sum(n.startswith("trainval/images/image_") for n in names) == 12
    assert all(n == "trainval" or n.startswith("trainval/") for n in names)


def test_cli_sample_and_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sample", "--out", str(tmp_path / "s"), "--images", "2", "--archive", str(tmp_path / "t.tar.gz")]) == 0
    assert (tmp_path / "t.tar.gz").is_file()
    assert main(["sample", "--out", str(tmp_path / "z"), "--images", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["personcar sample: error: --images must be at least 1, got 0"]
    assert not (tmp_path / "z").exists()
