"""A stage replaces only an output folder of its own (or an absent or empty one).

Each stage is pointed at a folder holding a user's file: it must refuse in one line naming the
folder, before doing any work, and leave the whole tree as it was. Re-running a stage into the
folder it wrote must still replace it (the DAG re-runs tasks into the same run folder).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tasks.artifacts import StageOutputs, atomic_dir, check_output_dir
from tasks.errors import PersoncarError
from tests.conftest import cli, snapshot








def refusal(cmd: str, flag: str, folder: Path, example: str = "notes.txt", stage: str | None = None) -> str:
    return (f"personcar {cmd}: error: {flag} {folder} holds files that personcar {stage or cmd} did not write "
            f"(e.g. {example!r}); it replaces its output folder as a whole: give a new or empty folder, or one it "
            "wrote before")


@pytest.fixture()
def mywork(tmp_path: Path) -> Path:
    folder = tmp_path / "mywork"
    folder.mkdir()
    (folder / "notes.txt").write_text("my notes")
    return folder


def test_validate_refuses_a_users_folder_and_replaces_its_own(sample_dataset: dict[str, Path], tmp_path: Path,
                                                              mywork: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = snapshot(tmp_path)
    rc, line = cli(capsys, "validate", "--annotations", sample_dataset["annotations"], "--out", mywork)
    assert (rc, line) == (2, refusal("validate", "--out", mywork))
    assert snapshot(tmp_path) == before

    out = tmp_path / "v"
    assert cli(capsys, "validate", "--annotations", sample_dataset["annotations"], "--out", out)[0] == 0
    (out / "stray.txt").write_text("left by someone")  # its marker is there: the folder is still its own
    assert cli(capsys, "validate", "--annotations", sample_dataset["annotations"], "--out", out)[0] == 0
    assert not (out / "stray.txt").exists() and (out / "validation.json").is_file()


def test_tfrecords_refuses_the_current_folder_and_other_stages_outputs(
        sample_dataset: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    common = ["tfrecords", "--annotations", sample_dataset["clean"], "--images", sample_dataset["images"]]
    before = snapshot(tmp_path)
    rc, line = cli(capsys, *common, "--out", work)  # what `--out "$PWD"` gives
    assert (rc, line) == (2, f"personcar tfrecords: error: --out {work} is (or contains) the current folder, which "
                             "personcar tfrecords would replace as a whole: give a folder of its own, e.g. a new "
                             "subfolder")
    (tmp_path / "validate").mkdir()
    (tmp_path / "validate" / "validation.json").write_text(json.dumps({"success": True, "failures": []}))
    before = snapshot(tmp_path)
    rc, line = cli(capsys, *common, "--out", tmp_path / "validate")  # another stage's output
    assert (rc, line) == (2, refusal("tfrecords", "--out", tmp_path / "validate", "validation.json"))
    assert snapshot(tmp_path) == before

    out = tmp_path / "tfr"
    assert cli(capsys, *common, "--out", out, "--num-shards", "1")[0] == 0
    first = snapshot(out)
    assert cli(capsys, *common, "--out", out, "--num-shards", "1")[0] == 0  # re-run: replaced, same bytes
    assert snapshot(out) == first


def test_download_refuses_a_dest_with_foreign_files(sample_dataset: dict[str, Path], tmp_path: Path, mywork: Path,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("PERSONCAR_CACHE_DIR", str(tmp_path.parent / f"{tmp_path.name}-cache"))
    before = snapshot(tmp_path)
    rc, line = cli(capsys, "download", "--source", sample_dataset["archive"], "--dest", mywork)
    assert (rc, line) == (2, refusal("download", "--dest", mywork))
    assert snapshot(tmp_path) == before

    dest = tmp_path / "dest"
    for _ in range(2):  # into a new folder, then over its own output
        assert cli(capsys, "download", "--source", sample_dataset["archive"], "--dest", dest)[0] == 0
    assert sorted(p.name for p in dest.iterdir()) == ["download_manifest.json", "trainval"]


def test_evaluate_report_sample_refuse_a_users_folder(tmp_path: Path, mywork: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    gt = tmp_path / "gt.json"
    gt.write_text(json.dumps({"images": [{"id": 1, "width": 10, "height": 10, "file_name": "a.jpg"}],
                              "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5],
                                               "area": 25, "iscrowd": 0}],
                              "categories": [{"id": 1, "name": "person"}, {"id": 2, "name": "car"}]}))
    det = tmp_path / "det.json"
    det.write_text("[]")
    run = tmp_path / "run"
    (run / "evaluate").mkdir(parents=True)
    before = snapshot(tmp_path)
    for args, cmd in ((["evaluate", "--annotations", gt, "--detections", det, "--out", mywork], "evaluate"),
                      (["report", "--run-dir", run, "--out", mywork], "report"),
                      (["sample", "--out", mywork, "--images", "1"], "sample")):
        assert cli(capsys, *args) == (2, refusal(cmd, "--out", mywork))
    assert snapshot(tmp_path) == before

    # their own folders are replaced on a re-run; one stage's folder is not another's
    assert cli(capsys, "evaluate", "--annotations", gt, "--detections", det, "--out", run / "evaluate")[0] == 0
    assert cli(capsys, "evaluate", "--annotations", gt, "--detections", det, "--out", run / "evaluate")[0] == 0
    assert cli(capsys, "report", "--run-dir", run, "--out", run / "report")[0] == 0
    assert cli(capsys, "report", "--run-dir", run, "--out", run / "report")[0] == 0
    before = snapshot(tmp_path)
    assert cli(capsys, "report", "--run-dir", run, "--out", run / "evaluate") == (
        2, refusal("report", "--out", run / "evaluate", "detections.json"))
    assert cli(capsys, "evaluate", "--annotations", gt, "--detections", det, "--out", run / "report") == (
        2, refusal("evaluate", "--out", run / "report", "pr_curves.png"))
    assert snapshot(tmp_path) == before
    for _ in range(2):
        assert cli(capsys, "sample", "--out", tmp_path / "s", "--images", "1")[0] == 0


def test_publish_refuses_foreign_run_and_latest_folders(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "report"
    src.mkdir()
    (src / "metrics.json").write_text(json.dumps({"DetectionBoxes_Precision/mAP@.50IOU": 0.5}))
    (src / "report.md").write_text("# r\n")
    dest = tmp_path / "pub"
    (dest / "docs").mkdir(parents=True)
    (dest / "docs" / "notes.txt").write_text("mine")
    before = snapshot(tmp_path)
    rc, line = cli(capsys, "publish", "--src", src, "--dest", dest, "--run-id", "docs")
    assert (rc, line) == (2, refusal("publish", "--dest", dest / "docs"))
    assert snapshot(tmp_path) == before

    (dest / "latest").mkdir()
    (dest / "latest" / "mine.txt").write_text("mine")
    before = snapshot(tmp_path)
    rc, line = cli(capsys, "publish", "--src", src, "--dest", dest, "--run-id", "r1")
    assert (rc, line) == (2, refusal("publish", "--dest", dest / "latest", "mine.txt"))
    assert snapshot(tmp_path) == before

    (dest / "latest" / "mine.txt").unlink()
    for _ in range(2):  # published, then re-published over its own run folder
        assert cli(capsys, "publish", "--src", src, "--dest", dest, "--run-id", "r1")[0] == 0
    assert sorted(p.name for p in (dest / "r1").iterdir()) == ["metrics.json", "report.md"]
    assert (dest / "latest" / "pointer.json").is_file() and (dest / "docs" / "notes.txt").read_text() == "mine"


def test_the_guard_refuses_files_links_and_look_alike_markers(tmp_path: Path) -> None:
    outputs = StageOutputs("tfrecords", "manifest.json", keys=("splits", "shards"), names=("*.tfrecord", "manifest.json"))
    (tmp_path / "file").write_text("x")
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    web = tmp_path / "webapp"
    web.mkdir()
    (web / "manifest.json").write_text(json.dumps({"name": "my app"}))  # same name, not the stage's manifest
    (web / "index.html").write_text("<html>")
    cases = {
        tmp_path / "file": f"--out {tmp_path / 'file'} exists and is not a folder: give a new or empty folder",
        tmp_path / "link": f"--out {tmp_path / 'link'} is a symbolic link: give the folder itself (personcar "
                           "tfrecords replaces its output folder as a whole)",
        web: refusal("x", "--out", web, "index.html", stage="tfrecords").split("error: ", 1)[1],
        Path("/"): "--out /: the filesystem root cannot be an output folder",
    }
    before = snapshot(tmp_path)
    for folder, message in cases.items():
        with pytest.raises(PersoncarError) as info, atomic_dir(folder, outputs):
            pytest.fail("the temp folder must not be made")
        assert str(info.value) == message
    assert snapshot(tmp_path) == before
    # what the stage recognises as its own
    (web / "manifest.json").write_text(json.dumps({"splits": {}, "shards": {}}))
    assert check_output_dir(web, outputs) == web  # its manifest, whatever else is beside it
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "train-00000-of-00001.tfrecord").write_bytes(b"")
    assert check_output_dir(tmp_path / "partial", outputs) == tmp_path / "partial"  # only its own names
    (tmp_path / "empty").mkdir()
    assert check_output_dir(tmp_path / "empty", None) == tmp_path / "empty"
