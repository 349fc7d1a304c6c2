"""The metrics report: built from a realistic run folder, self-contained, escaped, robust to gaps."""

from __future__ import annotations

import base64
import io
import json
import re
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tasks.errors import PersoncarError
from tasks.evaluate import evaluate
from tasks.report import BASELINE, MAP50, MAP75, build_report, read_scalars

EVIL_CLASS = "<script>alert(1)</script>"
EVIL_FILE = 'a"<>&.jpg'
REPO = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------- fake run folder


def _record(data: bytes) -> bytes:
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

    header = struct.pack("<Q", len(data))
    return (header + struct.pack("<I", masked_crc32c(header)) + data
            + struct.pack("<I", masked_crc32c(data)))


def write_events(path: Path, steps: range) -> None:
    """An event file as TF writes it: TF1 ``simple_value`` losses and TF2 tensor summaries
    (``learning_rate``, with the scalars plugin metadata on its first value only), plus a text
    summary that is not a scalar."""
    from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, tensor_shape_pb2, types_pb2

    path.parent.mkdir(parents=True, exist_ok=True)
    out = [event_pb2.Event(wall_time=1.0, file_version="brain.Event:2").SerializeToString()]
    for i, step in enumerate(steps):
        values = [summary_pb2.Summary.Value(tag=tag, simple_value=fn(step)) for tag, fn in (
            ("Loss/classification_loss", lambda s: 1.2 / (1 + s / 10)),
            ("Loss/localization_loss", lambda s: 0.8 / (1 + s / 20)),
            ("Loss/regularization_loss", lambda s: 0.3),
            ("Loss/total_loss", lambda s: 1.2 / (1 + s / 10) + 0.8 / (1 + s / 20) + 0.3))]
        meta = summary_pb2.SummaryMetadata(
            plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars")) if i == 0 else None
        lr = tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, float_val=[0.01 * (1 + step)],
                                    tensor_shape=tensor_shape_pb2.TensorShapeProto())
        values.append(summary_pb2.Summary.Value(tag="learning_rate", tensor=lr, metadata=meta))
        text = tensor_pb2.TensorProto(dtype=types_pb2.DT_STRING, string_val=[b"note"],
                                      tensor_shape=tensor_shape_pb2.TensorShapeProto())
        values.append(summary_pb2.Summary.Value(
            tag="notes", tensor=text,
            metadata=summary_pb2.SummaryMetadata(
                plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="text"))))
        out.append(event_pb2.Event(wall_time=1.0 + step, step=step,
                                   summary=summary_pb2.Summary(value=values)).SerializeToString())
    path.write_bytes(b"".join(_record(d) for d in out))


def write_image(path: Path, size: tuple[int, int], seed: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = size
    grad = np.linspace(0, 255, w, dtype=np.float32)[None, :, None] * np.ones((h, 1, 3), np.float32)
    arr = (0.6 * grad + 0.4 * rng.uniform(0, 255, (h, w, 3))).astype(np.uint8)
    Image.fromarray(arr).save(path, quality=85)


def make_fake_run(root: Path) -> Path:
    """A run folder with every part a real run has, small enough for a unit test."""
    run = root / "run"
    (run / "download" / "trainval" / "images").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({
        "run_id": "manual__2026-11-25T10:00:00", "model": "retinanet", "backbone": "resnet152",
        "steps": 30, "batch_size": 2, "image_size": 256,
        "source": "https://evp-ml-data.s3.us-east-2.amazonaws.com/ml-interview/openimages-personcar/trainval.tar.gz",
        "gate": {"margin": 0.01}}))
    (run / "download" / "download_manifest.json").write_text(json.dumps({
        "source": "s3://bucket/trainval.tar.gz", "sha256": "ab" * 32, "size_bytes": 123456, "images": 5}))
    (run / "validate" / "data_docs").mkdir(parents=True)
    (run / "validate" / "data_docs" / "index.html").write_text("<html><body>docs</body></html>")
    (run / "validate" / "validation.json").write_text(json.dumps({
        "success": True, "quarantined_annotation_ids": [6035],
        "failures": [{"check": "bbox_positive_size", "message": "zero-width box <b>x</b>",
                      "annotation_ids": [6035]}],
        "warnings": ["area is a fraction of the image; recomputed in pixels"],
        "counts": {"images": 5, "annotations": 14}}))

    categories = [{"id": 1, "name": "person"}, {"id": 2, "name": EVIL_CLASS}]
    names = ["image_000000001.jpg", EVIL_FILE, "image_000000003.jpg", "image_000000004.jpg"]
    images, anns = [], []
    rng = np.random.default_rng(1)
    for i, name in enumerate(names):
        w, h = (320, 240) if i % 2 == 0 else (240, 320)
        write_image(run / "download" / "trainval" / "images" / name, (w, h), i)
        images.append({"id": i, "file_name": name, "width": w, "height": h})
        for k in range(3 + i % 2):
            bw, bh = rng.uniform(20, 120, 2)
            x, y = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": 1 + (k % 2),
                         "bbox": [round(x, 1), round(y, 1), round(bw, 1), round(bh, 1)],
                         "area": round(bw, 1) * round(bh, 1), "iscrowd": 0})
    (run / "tfrecords").mkdir()
    gt = {"images": images, "annotations": anns, "categories": categories}
    (run / "tfrecords" / "val.coco.json").write_text(json.dumps(gt))
    (run / "tfrecords" / "manifest.json").write_text(json.dumps({
        "splits": {"train": {"images": 10, "boxes": 40, "per_class": {"person": 25, EVIL_CLASS: 15}},
                   "val": {"images": 4, "boxes": len(anns), "per_class": {"person": 8, EVIL_CLASS: 6}}},
        "shards": ["train-00000-of-00001.tfrecord", "val-00000-of-00001.tfrecord"]}))

    write_events(run / "train" / "train" / "events.out.tfevents.1000.host.1.v2", range(0, 30, 2))
    (run / "train" / "train_summary.json").write_text(json.dumps({
        "steps": 30, "seconds": 42.5, "images_per_second": 1.41,
        "final_losses": {"Loss/total_loss": 0.71}}))

    dets = []
    for a in anns:
        x, y, w, h = a["bbox"]
        dets.append({"image_id": a["image_id"], "category_id": a["category_id"],
                     "bbox": [x + rng.normal(0, 4), y + rng.normal(0, 4), w, h],
                     "score": float(rng.uniform(0.35, 0.99))})
    dets.append({"image_id": 1, "category_id": 2, "bbox": [5, 5, 40, 40], "score": 0.9})
    (run / "det.json").write_text(json.dumps(dets))
    evaluate(run / "tfrecords" / "val.coco.json", run / "det.json", run / "evaluate")
    return run


@pytest.fixture()
def run(tmp_path: Path) -> Path:
    return make_fake_run(tmp_path)


def data_uri_pngs(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


# --------------------------------------------------------------------------- tests


def test_report_from_a_full_run(run: Path) -> None:
    from PIL import Image

    out = run / "report"
    previous = {"run_id": "scheduled__2026-11-18", "metrics": {MAP50: 0.5, MAP75: 0.25}}
    gate = {"promoted": True, "reason": "mAP@.50IOU beats the last promoted run by 0.01", "margin": 0.01}
    res = build_report(run, out, previous=previous, gate=gate)

    assert sorted(res["files"]) == [
        "data_docs/index.html", "loss_curves.png", "metrics.json", "pr_curves.png", "report.html", "report.md",
        "sample_detections.png"]
    assert (out / "data_docs" / "index.html").is_file() and 'href="data_docs/index.html"' in (out / "report.html").read_text()
    assert res["not_available"] == [] and res["promoted"] is True
    assert res["html"] == str(out / "report.html") and res["markdown"] == str(out / "report.md")
    metrics = json.loads((run / "evaluate" / "metrics.json").read_text())
    assert (out / "metrics.json").read_bytes() == (run / "evaluate" / "metrics.json").read_bytes()
    assert res["metrics"]["mAP@.50IOU"] == metrics[MAP50]

    page = (out / "report.html").read_text()
    # Metric values, the seed's baseline, the previous run and the verdict.
    for key in (MAP50, MAP75, "DetectionBoxes_Recall/AR@100"):
        assert f"{metrics[key]:.4f}" in page
    assert f"{metrics[MAP50] - 0.5:+.4f}" in page and f"{metrics[MAP50] - BASELINE[MAP50]:+.4f}" in page
    assert "0.0380" in page and "0.0042" in page and "scheduled__2026-11-18" in page
    assert "PROMOTED" in page and "beats the last promoted run" in page
    assert "resnet152" in page and "zero-width box" in page and "bbox_positive_size" in page

    # Self-contained: no script, no stylesheet link, no external src/href; plots inline as PNGs.
    assert not re.search(r"<\s*script", page, re.I)
    assert not re.search(r"<\s*link", page, re.I) and "@import" not in page and "url(" not in page
    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:[a-z][a-z0-9+.-]*:)?//""", page, re.I)
    assert all(s.startswith("data:") for s in re.findall(r'src="([^"]*)"', page))
    pngs = data_uri_pngs(page)
    assert len(pngs) == 3
    for png in pngs:
        with Image.open(io.BytesIO(png)) as im:
            assert im.format == "PNG" and im.size[0] >= 300
            assert len(set(im.convert("RGB").getdata())) > 50  # not a blank picture
    # The download source URL stays plain text.
    assert "https://evp-ml-data" in page and 'href="https://' not in page

    # The Data Docs link is relative and points at the file.
    hrefs = re.findall(r'href="([^"]*)"', page)
    assert hrefs == ["data_docs/index.html"]  # a copy inside the report folder: works once published
    assert (out / hrefs[0]).read_bytes() == (run / "validate" / "data_docs" / "index.html").read_bytes()

    # Labels and file names from the data are escaped, in HTML and in Markdown.
    assert EVIL_CLASS not in page and "alert(1)</" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert EVIL_FILE not in page and "a&quot;&lt;&gt;&amp;.jpg" in page
    assert "<b>x</b>" not in page and "&lt;b&gt;x&lt;/b&gt;" in page
    md = (out / "report.md").read_text()
    assert EVIL_CLASS not in md and "&lt;script&gt;" in md and "![Training loss curves](loss_curves.png)" in md
    assert f"{metrics[MAP50]:.4f}" in md


def test_report_of_a_run_with_only_metrics(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "evaluate").mkdir(parents=True)
    (run / "evaluate" / "metrics.json").write_text(json.dumps({MAP50: 0.123456, MAP75: -1.0}))
    res = build_report(run, tmp_path / "out")
    assert set(res["not_available"]) == {
        "config", "download", "tfrecords", "validation", "train_summary", "loss_curves", "pr_curves",
        "samples", "error_analysis"}
    assert res["promoted"] is None
    page = (tmp_path / "out" / "report.html").read_text()
    assert "0.1235" in page and page.count("not available") >= 9
    assert "n/a" in page  # -1 shown as "no ground truth in the bucket", not as a number
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["metrics.json", "report.html", "report.md"]


def test_damaged_optional_parts_do_not_crash(run: Path, tmp_path: Path) -> None:
    (run / "validate" / "validation.json").write_text("{not json")
    (run / "evaluate" / "detections.json").write_text(json.dumps({"unexpected": "shape"}))
    with open(next((run / "train" / "train").iterdir()), "ab") as f:
        f.write(b"\x10\x00\x00")  # a half-written record at the end, as during training
    res = build_report(run, tmp_path / "out", gate={"promoted": False, "reason": "below margin"})
    assert "validation" in res["not_available"] and "samples" in res["not_available"]
    assert "loss_curves" not in res["not_available"]
    page = (tmp_path / "out" / "report.html").read_text()
    assert "validation.json: unreadable" in page and "NOT PROMOTED" in page


def test_missing_metrics_is_a_user_error(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    with pytest.raises(PersoncarError, match=r"evaluate/metrics\.json: not found"):
        build_report(tmp_path / "run", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_rebuild_gives_identical_files(run: Path) -> None:
    build_report(run, run / "report")
    first = {p.relative_to(run): p.read_bytes() for p in (run / "report").rglob("*") if p.is_file()}
    build_report(run, run / "report")
    assert {p.relative_to(run): p.read_bytes() for p in (run / "report").rglob("*") if p.is_file()} == first
    assert not [p for p in run.iterdir() if p.name.startswith(".")]


def test_read_scalars_handles_simple_and_tensor_summaries(run: Path) -> None:
    scalars = read_scalars(run / "train")
    assert list(scalars) == ["train"]
    tags = scalars["train"]
    assert set(tags) == {"Loss/classification_loss", "Loss/localization_loss", "Loss/regularization_loss",
                         "Loss/total_loss", "learning_rate"}
    assert [s for s, _ in tags["Loss/total_loss"]] == list(range(0, 30, 2))
    assert tags["Loss/classification_loss"][1] == (2, pytest.approx(1.2 / 1.2))
    assert tags["learning_rate"][-1] == (28, pytest.approx(0.29))
    # A resumed run logs some steps again: the newest file's value wins.
    write_events(run / "train" / "train" / "events.out.tfevents.2000.host.2.v2", range(20, 40, 2))
    again = read_scalars(run / "train")["train"]["Loss/total_loss"]
    assert [s for s, _ in again] == list(range(0, 40, 2))


def test_read_scalars_does_not_import_tensorflow(run: Path) -> None:
    code = ("import sys; from tasks.report import read_scalars; "
            f"r = read_scalars({str(run / 'train')!r}); "
            "assert len(r['train']['Loss/total_loss']) == 15; "
            "print('tensorflow' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_read_scalars_matches_eventaccumulator_on_tensorflow_files(tmp_path: Path) -> None:
    """Files written by TF2's tf.summary.scalar and TF1's Summary protos read the same as with
    TensorBoard's EventAccumulator."""
    tf = pytest.importorskip("tensorflow")
    from tensorboard.backend.event_processing import event_accumulator as ea

    writer = tf.summary.create_file_writer(str(tmp_path / "train" / "train"))
    with writer.as_default():
        for step in range(0, 50, 5):
            tf.summary.scalar("Loss/total_loss", 2.0 / (step + 1), step=step)
            tf.summary.scalar("learning_rate", 0.04 * step / 50, step=step)
            tf.summary.text("note", "hello", step=step)
    writer.close()
    with tf.Graph().as_default():
        v1 = tf.compat.v1.summary.FileWriter(str(tmp_path / "train" / "eval"))
        for step in (10, 20):
            v1.add_summary(tf.compat.v1.Summary(value=[tf.compat.v1.Summary.Value(
                tag="Loss/total_loss", simple_value=1.0 / step)]), step)
        v1.close()
    time.sleep(0.1)

    ours = read_scalars(tmp_path / "train")
    acc = ea.EventAccumulator(str(tmp_path / "train" / "train"), size_guidance={ea.TENSORS: 0})
    acc.Reload()
    for tag in ("Loss/total_loss", "learning_rate"):
        ref = [(t.step, float(tf.make_ndarray(t.tensor_proto))) for t in acc.Tensors(tag)]
        assert ours["train"][tag] == [(s, pytest.approx(v)) for s, v in ref]
    assert "note" not in ours["train"]
    acc1 = ea.EventAccumulator(str(tmp_path / "train" / "eval"))
    acc1.Reload()
    assert ours["eval"]["Loss/total_loss"] == [(e.step, pytest.approx(e.value)) for e in acc1.Scalars("Loss/total_loss")]


def test_report_says_where_training_started_which_step_was_exported_and_the_anchor_coverage(run: Path) -> None:
    summary = json.loads((run / "train" / "train_summary.json").read_text())
    summary.update(exported_step=20, exported_checkpoint="best/ckpt-20", started_from={
        "kind": "pretrained", "description": "COCO 2017 train (118k images), COCO17 val mAP 35.4 (https://x/zoo.tar.gz)",
        "modules": ["backbone", "decoder", "head"], "variables": 981})
    (run / "train" / "train_summary.json").write_text(json.dumps(summary))
    history = [{"step": s, "DetectionBoxes_Precision/mAP": m / 2, "DetectionBoxes_Precision/mAP@.50IOU": m,
                "DetectionBoxes_Precision/mAP@.75IOU": m / 3, "DetectionBoxes_Recall/AR@100": m}
               for s, m in ((10, 0.4), (20, 0.61), (30, 0.58))]
    (run / "train" / "validation.json").write_text(json.dumps({
        "metric": "DetectionBoxes_Precision/mAP@.50IOU", "every": 10, "history": history,
        "best": {"step": 20, "metric": "DetectionBoxes_Precision/mAP@.50IOU", "value": 0.61, "checkpoint": "ckpt-20"}}))
    from tasks.anchors import AnchorSpec, anchor_coverage, coverage_warning

    gt = json.loads((run / "tfrecords" / "val.coco.json").read_text())
    cov = anchor_coverage(gt, AnchorSpec(image_size=128, anchor_size=8.0))
    cov["warning"] = coverage_warning(cov)
    assert cov["warning"] and cov["coverage"] < 0.85
    (run / "validate" / "anchor_coverage.json").write_text(json.dumps(cov))

    out = build_report(run, run / "report")
    page = (run / "report" / "report.html").read_text()
    assert "Started from: COCO 2017 train (118k images), COCO17 val mAP 35.4" in page
    assert "981 variables of the backbone+decoder+head loaded" in page
    assert "Exported: step 20, the best mAP@.50IOU on the val split during training (0.6100) of 3 validations" in page
    assert "validation_curve.png" in out["files"] and "validation" not in out["not_available"]
    assert f"{cov['coverage']:.1%} of {cov['boxes']:,} validated boxes have an anchor" in page
    assert "a larger image size or smaller anchors fit this data better" in page
    md_text = (run / "report" / "report.md").read_text()
    assert "Exported: step 20" in md_text and "Warning:" in md_text
