"""The metrics report: built from a realistic run folder, self-contained, escaped, robust to gaps."""

from __future__ import annotations

import base64
import io
import json
import re
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tasks.config import RunConfig
from tasks.errors import PersoncarError
from tasks.evaluate import evaluate
from tasks.publish import gate_verdict, previous_run, publish
from tasks.report import BASELINE, MAP, MAP50, MAP75, build_report, decision, read_scalars

EVIL_CLASS = "<script>alert(1)</script>"
EVIL_FILE = 'a"<>&.jpg'
REPO = Path(__file__).resolve().parents[2]
SOURCE = "https://evp-ml-data.s3.us-east-2.amazonaws.com/ml-interview/openimages-personcar/trainval.tar.gz"
GATE = {"metric": MAP50, "margin": 0.01}


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
    cfg = RunConfig(dataset_source=SOURCE, backbone="resnet152", steps=30, batch_size=2, image_size=256,
                    promotion_margin=0.01)
    (run / "config.json").write_text(json.dumps({  # as the publish_report task writes it
        "run_id": "manual__2026-11-25T10:00:00", **cfg.model_dump(), "resolved": cfg.resolved(),
        "backend": "local", "publish_dest": "file:///srv/personcar/published"}))
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


def published_before(run: Path, dest: Path, map50: float) -> dict:
    """A promoted run published to ``dest`` (its metrics.json scaled from this run's); its index entry."""
    metrics = json.loads((run / "evaluate" / "metrics.json").read_text())
    earlier = {k: (v * map50 / metrics[MAP50] if v != -1 else v) for k, v in metrics.items()}
    src = run.parent / "earlier"
    src.mkdir()
    (src / "metrics.json").write_text(json.dumps(earlier))
    (src / "report.html").write_text("<p>earlier</p>")
    publish(src, str(dest), run_id="scheduled__2026-11-18", gate=GATE)
    return previous_run(str(dest))


def test_report_from_a_full_run(run: Path) -> None:
    from PIL import Image

    out = run / "report"
    previous = published_before(run, run.parent / "published", map50=0.5)
    metrics = json.loads((run / "evaluate" / "metrics.json").read_text())
    res = build_report(run, out, previous=previous, gate=gate_verdict(metrics, previous, GATE))

    assert sorted(res["files"]) == [
        "data_docs/index.html", "loss_curves.png", "metrics.json", "pr_curves.png", "report.html", "report.md",
        "sample_detections.png"]
    assert res["not_available"] == [] and res["promoted"] is True
    assert res["html"] == str(out / "report.html") and res["markdown"] == str(out / "report.md")
    assert (out / "metrics.json").read_bytes() == (run / "evaluate" / "metrics.json").read_bytes()
    assert res["metrics"] == {"mAP": metrics[MAP], "mAP@.50IOU": metrics[MAP50], "mAP@.75IOU": metrics[MAP75]}

    page = (out / "report.html").read_text()
    # The full COCO table: 4 decimals, against the seed's baseline and the promoted run.
    for key in (MAP50, MAP75, "DetectionBoxes_Recall/AR@100"):
        assert f"{metrics[key]:.4f}" in page
    assert f"{metrics[MAP50] - 0.5:+.4f}" in page and f"{metrics[MAP50] - BASELINE[MAP50]:+.4f}" in page
    assert "0.0380" in page and "0.0042" in page and "zero-width box" in page and "bbox_positive_size" in page

    # Self-contained: no script, no stylesheet link, no external src/href; plots inline as PNGs.
    assert not re.search(r"<\s*script", page, re.I)
    assert not re.search(r"<\s*link", page, re.I) and "@import" not in page and "url(" not in page
    assert 'http-equiv="Content-Security-Policy" content="default-src &#39;none&#39;; img-src data:;' in page
    assert all(s.startswith("data:image/png;base64,") for s in re.findall(r'src="([^"]*)"', page))
    pngs = data_uri_pngs(page)
    assert len(pngs) == 3
    for png in pngs:
        with Image.open(io.BytesIO(png)) as im:
            assert im.format == "PNG" and im.size[0] >= 300
            assert len(set(im.convert("RGB").getdata())) > 50  # not a blank picture
    # The only link is the Data Docs copy inside the report folder (works once published); URLs stay text.
    hrefs = re.findall(r'href="([^"]*)"', page)
    assert hrefs == ["data_docs/index.html"] and SOURCE in page
    assert (out / hrefs[0]).read_bytes() == (run / "validate" / "data_docs" / "index.html").read_bytes()

    # Labels and file names from the data are escaped, in HTML and in Markdown.
    assert EVIL_CLASS not in page and "alert(1)</" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert EVIL_FILE not in page and "a&#34;&lt;&gt;&amp;.jpg" in page
    assert "<b>x</b>" not in page and "&lt;b&gt;x&lt;/b&gt;" in page
    md = (out / "report.md").read_text()
    assert EVIL_CLASS not in md and "&lt;script&gt;" in md and "![Training loss curves](loss_curves.png)" in md
    assert f"{metrics[MAP50]:.4f}" in md and "<b>" not in md


def test_the_top_says_whether_to_ship_it(run: Path) -> None:
    """Decision in words, headline rounded with the change against the promoted run, per class side by
    side, parameters with readable names and values, warnings as sentences."""
    previous = published_before(run, run.parent / "published", map50=0.5)
    metrics = json.loads((run / "evaluate" / "metrics.json").read_text())
    build_report(run, run / "report", previous=previous, gate=gate_verdict(metrics, previous, GATE))
    page = (run / "report" / "report.html").read_text()
    top = page[page.index("<main>"):page.index('id="parameters"')]
    text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", top.replace("</strong>", "")))

    m50, person = metrics[MAP50], "DetectionBoxes_PerformanceByCategory/mAP@.50IOU/person"
    assert (f"Promoted: mAP@.50IOU {m50:.3f} beats the promoted run scheduled__2026-11-18 "
            f"(0.500) by {m50 - 0.5:.3f}, more than the margin 0.010.") in text
    assert f"mAP@.50IOU {m50:.3f} 0.500 {m50 - 0.5:+.3f} 0.038" in text
    assert f"{metrics[MAP50]:.4f}" not in text  # the headline is rounded
    earlier = metrics[person] * 0.5 / m50
    assert f"person AP {metrics['DetectionBoxes_PerformanceByCategory/mAP/person']:.3f}" in text
    assert f"AP@.50 {metrics[person]:.3f} {earlier:.3f} {metrics[person] - earlier:+.3f}" in text
    assert 'class="num better"' in top
    assert "1 annotation was quarantined by validation and left out of training." in text
    assert "Validation noted 1 warning about the data (see Validation)." in text
    md = (run / "report" / "report.md").read_text()
    assert f"**Promoted:** mAP@.50IOU {m50:.3f} beats the promoted run scheduled__2026-11-18 (0.500)" in md
    assert f"| mAP@.50IOU | {m50:.3f} | 0.500 | {m50 - 0.5:+.3f} | 0.038 |" in md and "| person | AP |" in md

    params = page[page.index('id="parameters"'):page.index('id="dataset"')]
    rows = dict(re.findall(r'<div class="k">([^<]*)</div><div class="v">([^<]*)</div>', params))
    assert rows["Model"] == "ssd_resnet152_v1_fpn_640x640" and rows["Backbone"] == "resnet152"
    assert rows["Batch per GPU"] == "2" and rows["Steps"] == "30" and rows["Expected SHA-256"] == "not checked"
    assert rows["Global batch"] == "2 (derived)" and rows["Peak learning rate"].endswith("(model default)")
    assert rows["Promotion margin"] == "0.01" and rows["Augmentation"] == "yes"
    assert not [k for k in rows if "." in k or "_" in k] and "None" not in params and "resolved" not in params


@pytest.mark.parametrize(("metrics", "previous", "expected"), [
    ({MAP50: 0.712}, {"run_id": "r1", "metrics": {"mAP@.50IOU": 0.69}},
     "Promoted: mAP@.50IOU 0.712 beats the promoted run r1 (0.690) by 0.022, more than the margin 0.010."),
    ({MAP50: 0.695}, {"run_id": "r1", "metrics": {"mAP@.50IOU": 0.69}},
     "Not promoted: mAP@.50IOU 0.695 beats the promoted run r1 (0.690) by only 0.005, not more than the margin "
     "0.010."),
    ({MAP50: 0.65}, {"run_id": "r1", "metrics": {"mAP@.50IOU": 0.69}},
     "Not promoted: mAP@.50IOU 0.650 is below the promoted run r1 (0.690) by 0.040."),
    ({MAP50: 0.3}, None, "Promoted: the first run to pass the gate: mAP@.50IOU 0.300 is above 0."),
    ({MAP50: 0.0}, None, "Not promoted: mAP@.50IOU 0.000 is not above 0, which a first promoted run must be."),
])
def test_the_gate_decision_in_words(metrics: dict, previous: dict | None, expected: str) -> None:
    d = decision(gate_verdict(metrics, previous, GATE))
    assert f"{d['word']}: {d['text']}" == expected


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
    assert "0.1235" in page and "0.123" in page and page.count("not available") >= 9
    assert "n/a" in page  # -1 shown as "no ground truth in the bucket", not as a number
    assert "No quality gate decision" in page and "No promoted run to compare with." in page
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
    assert "validation.json is unreadable (JSONDecodeError)" in page and "Not promoted:</strong> below margin" in page


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
        v1.close()  # flushes: the files are complete here

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
    assert len(data_uri_pngs(page)) == 4
    assert f"{cov['coverage']:.1%} of {cov['boxes']:,} validated boxes have an anchor" in page
    assert f"<li>Anchor coverage: Only {cov['coverage']:.1%} of" in page  # among the warnings at the top
    assert "a larger image size or smaller anchors fit this data better" in page
    md_text = (run / "report" / "report.md").read_text()
    assert "Exported: step 20" in md_text and "**Warning:**" in md_text and "![Validation mAP" in md_text


@pytest.mark.parametrize(("started", "warm", "init"), [
    ({"kind": "scratch", "description": "scratch (tiny has no published checkpoint)"},
     "promoted; not used: no promoted run to start from",
     "pretrained; not used: training started from scratch (tiny has no published checkpoint)"),
    ({"kind": "promoted", "description": "the promoted run r1 (s3://b/r1/ckpt-9)"},
     "promoted", "pretrained; not used: warm-started from the promoted run"),
    ({"kind": "pretrained", "description": "COCO 2017 train", "reason": "the promoted run r1 recorded no checkpoint"},
     "promoted; not used: the promoted run r1 recorded no checkpoint", "pretrained"),
])
def test_parameters_say_when_the_start_asked_for_was_not_used(run: Path, started: dict, warm: str, init: str) -> None:
    summary = json.loads((run / "train" / "train_summary.json").read_text())
    (run / "train" / "train_summary.json").write_text(json.dumps({**summary, "started_from": started}))
    build_report(run, run / "report")
    md_text = (run / "report" / "report.md").read_text()
    assert f"| Warm start | {warm} |" in md_text
    assert f"| Initial checkpoint | {init} |" in md_text
    modules = "all it holds" if started["kind"] == "pretrained" else "all it holds; not used"
    assert f"| Modules loaded | {modules} |" in md_text
