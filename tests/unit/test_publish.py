"""tasks.publish to local (file://) destinations, and the pieces it is built from."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
from pathlib import Path

import pytest

from tasks import publish as pub
from tasks.artifacts import safe_run_id
from tasks import storage
from tasks.errors import PersoncarError

MAP50 = "DetectionBoxes_Precision/mAP@.50IOU"


def make_report(root: Path, map50: float | None, *, extra: dict[str, str] | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    metrics = {"DetectionBoxes_Precision/mAP": 0.0, "DetectionBoxes_Precision/mAP@.75IOU": 0.0}
    if map50 is not None:
        metrics.update({"DetectionBoxes_Precision/mAP": map50 / 2, MAP50: map50,
                        "DetectionBoxes_Precision/mAP@.75IOU": map50 / 4})
    (root / "metrics.json").write_text(json.dumps(metrics), encoding="utf-8")
    (root / "report.html").write_text(f"<html><body>{root.name} {map50}</body></html>", encoding="utf-8")
    (root / "report.md").write_text(f"# {root.name}\n", encoding="utf-8")
    (root / "loss.png").write_bytes(b"\x89PNG\r\n\x1a\n" + root.name.encode())
    for name, text in (extra or {}).items():
        (root / name).write_text(text, encoding="utf-8")
    return root


def files_under(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


# --------------------------------------------------------------------------------------------------
# Publishing to a file:// destination
# --------------------------------------------------------------------------------------------------


def test_publish_to_file_uri_writes_run_folder_and_index(tmp_path):
    dest = tmp_path / "published"
    src = make_report(tmp_path / "run" / "report", 0.4)
    result = pub.publish(src, dest.as_uri(), run_id="scheduled__2026-11-23T00:00:00+00:00")

    run = safe_run_id("scheduled__2026-11-23T00:00:00+00:00")
    assert run.startswith("scheduled__2026-11-23T00_00_00_00_00-")  # folder-safe, with a hash of the original id
    assert result["uri"] == f"{dest.as_uri()}/{run}/"
    assert result["report_url"] == f"{dest.as_uri()}/{run}/report.html"
    assert files_under(dest / run) == ["loss.png", "metrics.json", "report.html", "report.md"]
    for name in result["files"]:
        assert (dest / run / name).read_bytes() == (src / name).read_bytes()
    index = json.loads((dest / "runs.json").read_text(encoding="utf-8"))
    assert [e["run_id"] for e in index] == [run]
    assert index[0]["metrics"] == {"mAP": 0.2, "mAP@.50IOU": 0.4, "mAP@.75IOU": 0.1}
    assert index[0]["report"] == f"{run}/report.html"
    assert not [p for p in dest.rglob("*") if ".tmp-" in p.name or ".old-" in p.name]


def test_plain_path_and_file_uri_name_the_same_destination(tmp_path):
    dest = tmp_path / "pub"
    pub.publish(make_report(tmp_path / "a", 0.1), str(dest), run_id="a")
    pub.publish(make_report(tmp_path / "b", 0.2), dest.as_uri(), run_id="b")
    assert [e["run_id"] for e in pub.load_index(str(dest))] == ["a", "b"]
    assert pub.load_index(dest.as_uri()) == pub.load_index(str(dest))


def test_republishing_replaces_the_run_and_its_entry(tmp_path):
    dest = tmp_path / "pub"
    pub.publish(make_report(tmp_path / "first", 0.1), dest, run_id="first")
    src = make_report(tmp_path / "r", 0.3, extra={"stale.txt": "old"})
    pub.publish(src, dest, run_id="r")
    (src / "stale.txt").unlink()
    (src / "report.md").write_text("# new\n", encoding="utf-8")
    again = pub.publish(src, dest, run_id="r")

    assert files_under(dest / "r") == ["loss.png", "metrics.json", "report.html", "report.md"]
    assert (dest / "r" / "report.md").read_text(encoding="utf-8") == "# new\n"
    assert [e["run_id"] for e in pub.load_index(dest)] == ["first", "r"]
    assert again["promoted"] is True and again["previous_promoted_run"] == "first"


def _publish_in_process(args: tuple[str, str, str, float]) -> dict:
    src, dest, run_id, value = args
    make_report(Path(src), value)
    return pub.publish(src, dest, run_id=run_id)


def test_concurrent_processes_keep_every_index_entry(tmp_path):
    dest = (tmp_path / "pub").as_uri()
    values = [0.2, 0.1, 0.5, 0.3, 0.6, 0.55, 0.05, 0.7]
    jobs = [(str(tmp_path / f"src{i}"), dest, f"run{i}", v) for i, v in enumerate(values)]
    with multiprocessing.get_context("fork").Pool(len(jobs)) as pool:
        results = pool.map(_publish_in_process, jobs)

    index = pub.load_index(dest)
    assert sorted(e["run_id"] for e in index) == sorted(f"run{i}" for i in range(len(values)))
    by_run = {r["run_id"]: r for r in results}
    best = None
    for entry in index:  # the gate saw the index as it stood when each entry was written
        value = entry["metrics"]["mAP@.50IOU"]
        expect = value > 0 if best is None else value > best
        assert entry["promoted"] is expect and by_run[entry["run_id"]]["promoted"] is expect
        best = value if expect else best
    pointer = pub.load_pointer(dest)
    assert pointer["run_id"] == pub.last_promoted(index)["run_id"]
    latest = tmp_path / "pub" / "latest"
    for rel, digest in pointer["files"].items():
        assert hashlib.sha256((latest / rel).read_bytes()).hexdigest() == digest


def test_a_publish_racing_another_into_latest_is_not_refused(tmp_path, monkeypatch):
    """Another run is promoted, and fills latest/, between this publish's index read and its
    folder check: those files are publish's own, not a foreign folder."""
    dest = tmp_path / "pub"
    real_load_index = pub.load_index

    def index_then_a_concurrent_promotion(*args, **kwargs):
        entries = real_load_index(*args, **kwargs)
        if not (dest / "latest").exists():
            (dest / "latest").mkdir(parents=True)
            (dest / "latest" / "loss.png").write_bytes(b"\x89PNG\r\n\x1a\nother")
        return entries

    monkeypatch.setattr(pub, "load_index", index_then_a_concurrent_promotion)
    result = pub.publish(make_report(tmp_path / "r", 0.4), dest, run_id="r")
    assert result["promoted"] is True
    assert pub.load_pointer(dest)["run_id"] == "r"
    assert (dest / "latest" / "loss.png").read_bytes() == (tmp_path / "r" / "loss.png").read_bytes()


def test_foreign_files_already_in_latest_are_refused(tmp_path):
    dest = tmp_path / "pub"
    (dest / "latest").mkdir(parents=True)
    (dest / "latest" / "notes.txt").write_text("mine", encoding="utf-8")
    with pytest.raises(PersoncarError, match=r"latest holds files that personcar publish did not write \(e.g. 'notes.txt'\)"):
        pub.publish(make_report(tmp_path / "r", 0.4), dest, run_id="r")
    assert (dest / "latest" / "notes.txt").read_text(encoding="utf-8") == "mine"
    assert not (dest / "r").exists() and not (dest / "runs.json").exists()


def test_gate_promotion_and_latest_on_disk(tmp_path):
    dest = tmp_path / "pub"
    gate = {"metric": MAP50, "margin": 0.05}
    r1 = pub.publish(make_report(tmp_path / "r1", 0.30, extra={"r1-only.txt": "x"}), dest, run_id="r1", gate=gate)
    assert r1["promoted"] is True
    assert json.loads((dest / "latest" / "pointer.json").read_text())["run_id"] == "r1"
    assert (dest / "latest" / "r1-only.txt").exists()

    r2 = pub.publish(make_report(tmp_path / "r2", 0.34), dest, run_id="r2", gate=gate)
    assert r2["promoted"] is False and r2["gate"]["baseline_run_id"] == "r1"
    assert json.loads((dest / "latest" / "pointer.json").read_text())["run_id"] == "r1"

    r3 = pub.publish(make_report(tmp_path / "r3", 0.36), dest, run_id="r3", gate=gate)
    assert r3["promoted"] is True and r3["previous_promoted_run"] == "r1"
    pointer = json.loads((dest / "latest" / "pointer.json").read_text())
    assert pointer["run_id"] == "r3" and pointer["run_uri"] == f"{dest.as_uri()}/r3/"
    assert files_under(dest / "latest") == ["loss.png", "metrics.json", "pointer.json", "report.html",
                                            "report.md"]
    assert (dest / "latest" / "report.html").read_bytes() == (tmp_path / "r3" / "report.html").read_bytes()
    assert pub.previous_run(str(dest))["run_id"] == "r3"
    assert pub.previous_run(str(dest), exclude="r3")["run_id"] == "r1"


def test_gate_on_another_metric_is_kept_in_the_index(tmp_path):
    dest = tmp_path / "pub"
    gate = {"metric": "DetectionBoxes_Recall/AR@100", "margin": 0.0}
    for name, ar in (("a", 0.4), ("b", 0.3), ("c", 0.5)):
        src = make_report(tmp_path / name, 0.1)
        metrics = json.loads((src / "metrics.json").read_text())
        metrics["DetectionBoxes_Recall/AR@100"] = ar
        (src / "metrics.json").write_text(json.dumps(metrics))
        pub.publish(src, dest, run_id=name, gate=gate)
    index = pub.load_index(dest)
    assert [e["promoted"] for e in index] == [True, False, True]
    assert [e["metrics"]["AR@100"] for e in index] == [0.4, 0.3, 0.5]


def test_run_without_the_gate_metric_is_not_promoted(tmp_path):
    result = pub.publish(make_report(tmp_path / "r", None), tmp_path / "pub", run_id="r")
    assert result["promoted"] is False and result["gate"]["value"] is None
    assert pub.load_pointer(str(tmp_path / "pub")) is None


def test_extra_files_and_folders_are_published(tmp_path):
    model = tmp_path / "export"
    (model / "variables").mkdir(parents=True)
    (model / "saved_model.pb").write_bytes(b"pb")
    (model / "variables" / "variables.index").write_bytes(b"idx")
    summary = tmp_path / "validation.json"
    summary.write_text('{"success": true}')
    result = pub.publish(make_report(tmp_path / "r", 0.2), tmp_path / "pub", run_id="r",
                         extra_files={"validation.json": summary, "model": model})
    assert "model/variables/variables.index" in result["files"]
    assert (tmp_path / "pub" / "r" / "model" / "saved_model.pb").read_bytes() == b"pb"
    assert (tmp_path / "pub" / "r" / "validation.json").read_text() == '{"success": true}'


# --------------------------------------------------------------------------------------------------
# User errors: one line, naming what is wrong
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("missing_src", "report folder to publish does not exist"),
        ("empty_src", "report folder is empty"),
        ("bad_margin", "'margin' must be a finite number >= 0"),
        ("bad_metric", "'metric' must be a metric name"),
        ("clash", "clashes with a file"),
        ("missing_extra", "extra file 'validation.json' to publish does not exist"),
        ("corrupt_index", "runs.json: not valid JSON"),
        ("unsafe_extra", "unsafe relative path"),
        ("reserved_run", "reserved"),
    ],
)
def test_user_errors(tmp_path, case, match):
    src = make_report(tmp_path / "r", 0.2)
    dest = tmp_path / "pub"
    kwargs: dict = {"run_id": "r"}
    if case == "missing_src":
        src = tmp_path / "nope"
    elif case == "empty_src":
        src = tmp_path / "empty"
        src.mkdir()
    elif case == "bad_margin":
        kwargs["gate"] = {"metric": MAP50, "margin": -1}
    elif case == "bad_metric":
        kwargs["gate"] = {"metric": 3}
    elif case == "clash":
        kwargs["extra_files"] = {"report.md": src / "report.md"}
    elif case == "missing_extra":
        kwargs["extra_files"] = {"validation.json": tmp_path / "missing.json"}
    elif case == "corrupt_index":
        dest.mkdir()
        (dest / "runs.json").write_text("{not json")
    elif case == "unsafe_extra":
        kwargs["extra_files"] = {"../escape.json": src / "metrics.json"}
    elif case == "reserved_run":
        kwargs["run_id"] = "latest"
    with pytest.raises(PersoncarError, match=match) as err:
        pub.publish(src, dest, **kwargs)
    assert "\n" not in str(err.value)


def test_load_index_and_previous_run_of_an_empty_destination(tmp_path):
    assert pub.load_index(tmp_path / "nothing") == []
    assert pub.previous_run(str(tmp_path / "nothing")) is None
    assert pub.load_pointer(str(tmp_path / "nothing")) is None


# --------------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("report.html", "text/html; charset=utf-8"),
        ("REPORT.HTML", "text/html; charset=utf-8"),
        ("report.md", "text/markdown; charset=utf-8"),
        ("metrics.json", "application/json"),
        ("pr/person.png", "image/png"),
        ("sample.jpg", "image/jpeg"),
        ("label_map.pbtxt", "text/plain; charset=utf-8"),
        ("train-00000-of-00004.tfrecord", "application/octet-stream"),
        ("ckpt-3.index", "application/octet-stream"),
    ],
)
def test_content_types(name, expected):
    assert storage.content_type(name) == expected


def test_locations():
    assert storage.is_remote("s3://b/p") and storage.is_remote("S3://b/p")
    assert not storage.is_remote("file:///tmp/x") and not storage.is_remote("/tmp/x")
    assert storage.split_s3("s3://bucket/a/b/") == ("bucket", "a/b")
    assert storage.split_s3("s3://bucket") == ("bucket", "")
    assert storage.local_path("file:///tmp/a%20b") == Path("/tmp/a b")
    assert storage.join_uri("s3://b/p/", "run", "report.html") == "s3://b/p/run/report.html"
    with pytest.raises(PersoncarError, match="unsupported location"):
        storage.local_path("https://example.invalid/x")
    with pytest.raises(PersoncarError, match="not an s3://bucket/prefix"):
        storage.split_s3("s3:///nobucket")
    assert pub.normalize_dest("s3://b/p/") == "s3://b/p"
    assert pub.short_name(MAP50) == "mAP@.50IOU"


def test_s3_etag_of_small_and_multipart_files(tmp_path):
    small = tmp_path / "s"
    small.write_bytes(b"abc")
    assert storage.s3_etag(small) == hashlib.md5(b"abc").hexdigest()
    big = tmp_path / "b"
    data = bytes(range(256)) * 40  # 10,240 bytes in parts of 4,096: 3 parts
    big.write_bytes(data)
    parts = [hashlib.md5(data[i:i + 4096]).digest() for i in range(0, len(data), 4096)]
    assert storage.s3_etag(big, chunk=4096) == f"{hashlib.md5(b''.join(parts)).hexdigest()}-3"
