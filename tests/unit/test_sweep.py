"""The backbone sweep's code: candidates, the recommendation rule, compare on hand-built run folders,
the ``personcar compare`` command and publishing a sweep (no TensorFlow: the timing is stood in for)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from tasks.compare import compare_runs
from tasks.errors import PersoncarError
from tasks.sweep import DEFAULT_CANDIDATES, candidate_config, parse_candidates, ranked, recommend

MAP, MAP50, MAP75 = (f"DetectionBoxes_Precision/{k}" for k in ("mAP", "mAP@.50IOU", "mAP@.75IOU"))
BY_CLASS = "DetectionBoxes_PerformanceByCategory/"


def cand(name: str, map50: float | None, latency: float | None = None, params: float | None = None,
         status: str = "finished") -> dict:
    return {"name": name, "status": status, "metrics": {"mAP@.50IOU": map50},
            "latency": None if latency is None else {"median_ms": latency}, "parameters": params}


# --------------------------------------------------------------------------- the rule


@pytest.mark.parametrize(("cands", "margin", "expected"), [
    # the best wins when nothing cheaper is close
    ([cand("r50", 0.50, 10), cand("r101", 0.60, 20), cand("r152", 0.58, 30)], 0.01, "r101"),
    # a cheaper candidate within the margin wins
    ([cand("r50", 0.595, 10), cand("r101", 0.60, 20), cand("r152", 0.61, 30)], 0.012, "r101"),
    ([cand("r50", 0.595, 10), cand("r101", 0.60, 20), cand("r152", 0.61, 30)], 0.02, "r50"),
    # just outside the margin: the best
    ([cand("r50", 0.589, 10), cand("r152", 0.60, 30)], 0.01, "r152"),
    # exactly at the margin counts as within
    ([cand("r50", 0.59, 10), cand("r152", 0.60, 30)], 0.01, "r50"),
    # a slower candidate within the margin does not win over the best
    ([cand("slow", 0.599, 50), cand("best", 0.60, 30)], 0.01, "best"),
    # failed candidates and COCO's -1 are not ranked
    ([cand("broken", None, 1, status="failed"), cand("nogt", -1.0, 2), cand("ok", 0.2, 30)], 0.01, "ok"),
    # no latency measured: parameters decide what is cheaper
    ([cand("r50", 0.60, None, 25e6), cand("r152", 0.605, None, 60e6)], 0.01, "r50"),
    # a candidate without any cost number is never the cheaper one
    ([cand("unknown", 0.60), cand("r152", 0.605, 30)], 0.01, "r152"),
    # margin 0: only the best (ties go to the cheaper)
    ([cand("a", 0.6, 20), cand("b", 0.6, 10)], 0.0, "b"),
])
def test_the_recommendation_rule(cands: list, margin: float, expected: str) -> None:
    assert recommend(cands, margin)["name"] == expected


def test_the_recommendation_says_why_in_one_sentence() -> None:
    cheaper = recommend([cand("r50", 0.595, 10.04), cand("r152", 0.60, 30)], 0.01)
    assert cheaper["reason"] == ("r50 (mAP@.50IOU 0.595, 10.0 ms an image) is within 0.010 of the best, r152 "
                                 "(mAP@.50IOU 0.600, 30.0 ms an image), and cheaper.")
    assert cheaper["leader"] == "r152" and cheaper["within"] == ["r152", "r50"]
    best = recommend([cand("r50", 0.50, 10), cand("r152", 0.60, 30)], 0.01)
    assert best["reason"] == ("r152 has the best mAP@.50IOU 0.600 (30.0 ms an image); no other candidate is within "
                              "0.010 of it.")
    assert "within 0.010 of it: then the cheapest of those" in best["rule"]
    none = recommend([cand("x", None, status="failed")], 0.01)
    assert none["name"] is None and "No candidate finished" in none["reason"]
    with pytest.raises(PersoncarError, match="margin must be a number >= 0"):
        recommend([], -0.1)


def test_ranking_is_by_map50_then_cost_then_name() -> None:
    order = ranked([cand("c", 0.5, 30), cand("a", 0.5, 10), cand("b", 0.7, 50), cand("d", 0.5, 10)])
    assert [c["name"] for c in order] == ["b", "a", "d", "c"]


# --------------------------------------------------------------------------- candidates


def test_default_candidates_are_the_three_depths_at_640_from_their_checkpoints() -> None:
    found = parse_candidates(DEFAULT_CANDIDATES, {})
    configs = [candidate_config({"warm_start": "none"}, c) for c in found]
    assert [c.model for c in configs] == ["ssd_resnet50_v1_fpn_640x640", "ssd_resnet101_v1_fpn_640x640",
                                          "ssd_resnet152_v1_fpn_640x640"]
    assert {c.image_size for c in configs} == {640} and {c.init_checkpoint for c in configs} == {"pretrained"}
    from tasks.train import resolve_start

    starts = [resolve_start(c) for c in configs]
    assert [s["kind"] for s in starts] == ["pretrained"] * 3
    assert [s["uri"].rsplit("/", 1)[-1] for s in starts] == [
        f"ssd_resnet{d}_v1_fpn_640x640_coco17_tpu-8.tar.gz" for d in (50, 101, 152)]


@pytest.mark.parametrize(("raw", "message"), [
    ([], "non-empty list"),
    ("resnet50", "non-empty list"),
    (["resnet50"], r"candidates\[0\]: expected an object"),
    ([{"model": "ssd_resnet50_v1_fpn_640x640"}], r"candidates\[0\]: 'name' must be"),
    ([{"name": "../up"}], "'name' must be"),
    ([{"name": "a"}, {"name": "a"}], "two candidates are named 'a'"),
    ([{"name": "a", "colour": "red"}], "candidate 'a': unknown parameter 'colour'"),
    ([{"name": "a", "val_fraction": 0.5}], "candidate 'a': val_fraction is one value for the whole sweep"),
    ([{"name": "a", "image_size": 100}], "candidate 'a': invalid run configuration: image_size"),
    ([{"name": "a", "model": "nope"}], "candidate 'a': invalid run configuration: model"),
    ([{"name": "a"}, {"name": "b", "backbone": "resnet18"}],  # found before the data pass, not by its training
     "candidate 'b': invalid run configuration: backbone: ssd_resnet152_v1_fpn_640x640's resnet_v1 backbone comes in"),
])
def test_bad_candidates_fail_with_one_line(raw: object, message: str) -> None:
    with pytest.raises(PersoncarError, match=message) as exc:
        parse_candidates(raw, {})
    assert "\n" not in str(exc.value)


def test_a_candidate_overrides_the_sweep_parameters() -> None:
    base = {"steps": 100, "batch_size": 4, "candidates": [], "recommendation_margin": 0.01}
    cfg = candidate_config(base, {"name": "small", "model": "ssd_resnet26_v1_fpn_256x256_tiny", "steps": 3})
    assert (cfg.model, cfg.steps, cfg.batch_size) == ("ssd_resnet26_v1_fpn_256x256_tiny", 3, 4)


# --------------------------------------------------------------------------- compare on hand-built runs


def _jpeg(seed: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (seed * 40 % 255, 90, 160)).save(buf, format="JPEG")
    return buf.getvalue()


def make_data(folder: Path, images: int = 3) -> Path:
    """A TFRecord folder with a val shard of ``images`` records (only what the timing reads)."""
    from tasks.proto import tf_example_pb2 as pb
    from tasks.tfrecords import frame_record

    folder.mkdir(parents=True)
    with open(folder / "val-00000-of-00001.tfrecord", "wb") as f:
        for i in range(images):
            ex = pb.Example()
            feat = ex.features.feature
            feat["image/source_id"].bytes_list.value.append(str(i).encode())
            feat["image/filename"].bytes_list.value.append(f"image_{i:09d}.jpg".encode())
            feat["image/encoded"].bytes_list.value.append(_jpeg(i))
            f.write(frame_record(ex.SerializeToString()))
    return folder


def _curve(ap: float) -> dict:
    recall = [i / 100 for i in range(101)]
    return {"has_ground_truth": True, "ap": ap, "iou": 0.5, "max_recall": 0.8, "recall": recall,
            "precision": [max(0.0, 1 - r * (1.2 - ap)) for r in recall]}


def make_run(root: Path, name: str, map50: float, *, person: float = 0.3, car: float = 0.2,
             exported: bool = True, depth: int = 50) -> Path:
    run = root / name
    (run / "train").mkdir(parents=True)
    (run / "train" / "train_summary.json").write_text(json.dumps({
        "model": f"ssd_resnet{depth}_v1_fpn_640x640", "backbone_depth": depth, "image_size": 640, "steps": 100,
        "trained_steps": 100, "seconds": 3725.0, "images_per_second": 5.5, "global_batch_size": 8,
        "started_from": {"kind": "pretrained", "description": "COCO 2017 train"}}))
    if exported:
        (run / "train" / "exported").mkdir()
        (run / "train" / "exported" / "saved_model.pb").write_bytes(b"stand-in")
    (run / "evaluate").mkdir()
    metrics = {MAP: map50 / 2, MAP50: map50, MAP75: map50 / 3}
    for cls, ap in (("person", person), ("car", car)):
        metrics |= {f"{BY_CLASS}mAP/{cls}": ap, f"{BY_CLASS}mAP@.50IOU/{cls}": 2 * ap,
                    f"{BY_CLASS}mAP@.75IOU/{cls}": ap / 2}
    (run / "evaluate" / "metrics.json").write_text(json.dumps(metrics))
    (run / "evaluate" / "pr_curves.json").write_text(json.dumps({"classes": {
        "person": {"iou_0.50": _curve(2 * person)}, "car": {"iou_0.50": _curve(2 * car)}}}))
    return run


def make_failed(root: Path, name: str, error: str | None = "init checkpoint /nowhere/ckpt-1 does not exist") -> Path:
    run = root / name
    (run / "train").mkdir(parents=True)
    if error:
        (run / "failure.json").write_text(json.dumps({"stage": "train", "error": error}))
    return run


class FakeTimer:
    """Stands in for measure_models: fixed parameters and latencies per model name."""

    def __init__(self, latency: dict[str, float], params: dict[str, int]) -> None:
        self.latency, self.params, self.calls = latency, params, []

    def __call__(self, models: dict[str, Path], images: list[bytes]) -> dict:
        self.calls.append((sorted(models), len(images)))
        return {n: {"parameters": self.params[n], "saved_model_bytes": 123_456_789,
                    "latency": {"median_ms": self.latency[n], "p90_ms": self.latency[n] * 1.2, "images": len(images)}}
                for n in models}


@pytest.fixture()
def sweep_folder(tmp_path: Path) -> Path:
    make_data(tmp_path / "tfrecords")
    make_run(tmp_path, "resnet50", 0.595, depth=50)
    make_run(tmp_path, "resnet152", 0.600, person=0.35, depth=152)
    make_failed(tmp_path, "resnet101")
    return tmp_path


def test_compare_ranks_the_finished_names_the_failed_and_recommends(sweep_folder: Path) -> None:
    timer = FakeTimer({"resnet50": 40.0, "resnet152": 95.0}, {"resnet50": 25_600_000, "resnet152": 58_900_000})
    runs = [(n, str(sweep_folder / n)) for n in ("resnet50", "resnet101", "resnet152")]
    doc = compare_runs(runs, sweep_folder / "compare", data=str(sweep_folder / "tfrecords"), margin=0.01,
                       measure=timer)
    assert timer.calls == [(["resnet152", "resnet50"], 3)]  # one pass, both models, the same images
    assert doc["ranking"] == ["resnet152", "resnet50"] and doc["failed"] == ["resnet101"]
    rec = doc["recommendation"]
    assert rec["name"] == "resnet50" and rec["leader"] == "resnet152"
    saved = json.loads((sweep_folder / "compare" / "sweep.json").read_text())
    assert saved["recommendation"] == rec and saved["ranking"] == doc["ranking"]
    by_name = {c["name"]: c for c in saved["candidates"]}
    assert by_name["resnet101"]["status"] == "failed"
    assert by_name["resnet101"]["failure"] == {"stage": "train", "error": "init checkpoint /nowhere/ckpt-1 does not exist"}
    assert by_name["resnet50"]["rank"] == 2 and by_name["resnet152"]["rank"] == 1
    assert by_name["resnet152"]["per_class"]["person"] == {"AP": 0.35, "AP@.50": 0.7, "AP@.75": 0.175}
    assert by_name["resnet50"]["training"]["seconds"] == 3725.0 and by_name["resnet50"]["parameters"] == 25_600_000

    html = (sweep_folder / "compare" / "report.html").read_text()
    md = (sweep_folder / "compare" / "report.md").read_text()
    for text in (html, md):
        assert "Recommended: resnet50." in text.replace("<strong>", "").replace("</strong>", "").replace(
            '<span id="recommended">', "").replace("</span>", "").replace("**", "")
        assert "resnet101</strong> failed in train: init checkpoint /nowhere/ckpt-1 does not exist" in text or \
            "**resnet101** failed in train: init checkpoint /nowhere/ckpt-1 does not exist" in text
        assert "1 h 02 min" in text and "25.60M" in text and "123.5 MB" in text and "40.0" in text
    assert html.index('data-candidate="resnet152"') < html.index('data-candidate="resnet50"') < html.index(
        'data-candidate="resnet101" class="failed"')
    assert '<tr data-candidate="resnet50" class="recommended">' in html
    assert (sweep_folder / "compare" / "pr_curves.png").stat().st_size > 10_000
    assert "<script" not in html and 'http-equiv="Content-Security-Policy"' in html


def test_compare_without_exported_models_ranks_by_the_metrics_alone(tmp_path: Path) -> None:
    make_run(tmp_path, "a", 0.40, exported=False)
    make_run(tmp_path, "b", 0.45, exported=False)
    failed = make_failed(tmp_path, "c", error=None)
    (failed / "train" / "train_summary.json").write_text(json.dumps({"steps": 3}))
    timer = FakeTimer({}, {})
    doc = compare_runs([(n, str(tmp_path / n)) for n in "abc"], tmp_path / "out", measure=timer)
    assert timer.calls == [] and doc["recommendation"]["name"] == "b"
    assert doc["candidates"][2]["failure"] == {"stage": "evaluate",
                                               "error": "evaluation did not finish (no evaluate/metrics.json)"}
    assert any("no exported SavedModel" in n for n in doc["notes"])
    assert "No latency measured" in (tmp_path / "out" / "report.html").read_text()


def test_compare_warns_when_the_runs_were_evaluated_on_different_val_splits(tmp_path: Path) -> None:
    for name, ids in (("a", [1, 2]), ("b", [1, 3])):
        run = make_run(tmp_path, name, 0.5, exported=False)
        (run / "tfrecords").mkdir()
        (run / "tfrecords" / "manifest.json").write_text(json.dumps({"splits": {"val": {"image_ids": ids}}}))
    doc = compare_runs([(n, str(tmp_path / n)) for n in "ab"], tmp_path / "out")
    assert any("different val splits" in n for n in doc["notes"])


def test_compare_refuses_duplicate_names_and_a_foreign_output_folder(sweep_folder: Path) -> None:
    with pytest.raises(PersoncarError, match="two run folders are named 'x'"):
        compare_runs([("x", "/a"), ("x", "/b")], sweep_folder / "out")
    (sweep_folder / "mine").mkdir()
    (sweep_folder / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(PersoncarError, match="did not write"):
        compare_runs([("resnet50", str(sweep_folder / "resnet50"))], sweep_folder / "mine")


def test_compare_writes_its_report_atomically_and_rewrites_it_in_place(sweep_folder: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import tasks.sweep_report

    timer = FakeTimer({"resnet50": 40.0, "resnet152": 95.0}, {"resnet50": 1, "resnet152": 2})
    runs = [(n, str(sweep_folder / n)) for n in ("resnet50", "resnet101", "resnet152")]
    out = sweep_folder / "compare"
    compare_runs(runs, out, data=str(sweep_folder / "tfrecords"), measure=timer)
    names = sorted(p.name for p in out.iterdir())
    assert names == ["pr_curves.png", "report.html", "report.md", "sweep.json"]
    before = {n: (out / n).read_bytes() for n in names}

    def half_written(doc: dict, tmp: Path) -> None:  # the HTML is written, then the Markdown fails
        (tmp / "report.html").write_text("<html>partial</html>")
        raise OSError("disk full")

    monkeypatch.setattr(tasks.sweep_report, "write_report", half_written)
    with pytest.raises(OSError, match="disk full"):
        compare_runs(runs[:1], out, data=str(sweep_folder / "tfrecords"), measure=timer)
    assert {n: (out / n).read_bytes() for n in sorted(p.name for p in out.iterdir())} == before  # untouched
    assert [p.name for p in sweep_folder.iterdir() if p.name.startswith(".")] == []  # no temp folder left
    monkeypatch.undo()

    doc = compare_runs(runs[:1], out, data=str(sweep_folder / "tfrecords"), measure=timer)  # a re-run replaces
    assert sorted(p.name for p in out.iterdir()) == names and doc["ranking"] == ["resnet50"]
    assert json.loads((out / "sweep.json").read_text())["ranking"] == ["resnet50"]
    assert "resnet152" not in (out / "report.md").read_text()


# --------------------------------------------------------------------------- personcar compare


def test_cli_compare_on_run_folders(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from tasks.cli import main

    make_run(tmp_path, "resnet50", 0.595, exported=False)  # no SavedModel: ranked on the metrics, no TensorFlow
    make_run(tmp_path, "resnet152", 0.600, exported=False)
    make_failed(tmp_path, "resnet101")
    code = main(["compare", str(tmp_path / "resnet50"), str(tmp_path / "resnet101"), str(tmp_path / "resnet152"),
                 "--out", str(tmp_path / "cmp"), "--margin", "0.001"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["recommended"] == "resnet152" and printed["failed"] == ["resnet101"]
    assert printed["ranking"] == ["resnet152", "resnet50"] and (tmp_path / "cmp" / "report.html").is_file()
    assert main(["compare", str(tmp_path / "resnet50"), "--out", str(tmp_path / "c2"), "--margin", "2"]) == 2
    assert "--margin: must be a number between 0 and 1" in capsys.readouterr().err


def test_cli_compare_of_a_sweep_folder_and_when_nothing_finished(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    from tasks.cli import main

    sweep = tmp_path / "sweep"
    make_failed(sweep / "candidates", "a")
    make_failed(sweep / "candidates", "b", error="backbone resnet18: the model's resnet_v1 backbone comes in depths 26")
    (sweep / "candidates.json").write_text(json.dumps({"candidates": [{"name": "a"}, {"name": "b"}]}))
    code = main(["compare", "--sweep", str(sweep), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("personcar compare: error: none of the 2 candidates finished (a, b)")
    assert len(err.splitlines()) == 1
    assert "depths 26" in (tmp_path / "out" / "report.md").read_text()
    assert main(["compare", "--sweep", str(tmp_path), "--out", str(tmp_path / "o2")]) == 2
    assert "not the run folder of a backbone sweep" in capsys.readouterr().err
    assert main(["compare", "--out", str(tmp_path / "o3")]) == 2


# --------------------------------------------------------------------------- publishing a sweep


def test_publish_sweep_beside_the_runs_and_republish(sweep_folder: Path) -> None:
    from tasks.publish import load_index
    from tasks.sweep_publish import load_sweeps, publish_sweep

    timer = FakeTimer({"resnet50": 40.0, "resnet152": 95.0}, {"resnet50": 1, "resnet152": 2})
    compare_runs([(n, str(sweep_folder / n)) for n in ("resnet50", "resnet101", "resnet152")],
                 sweep_folder / "compare", data=str(sweep_folder / "tfrecords"), measure=timer)
    dest = sweep_folder / "published"
    first = publish_sweep(sweep_folder / "compare", str(dest), sweep_id="manual__2026-01-05T00:00:00+00:00")
    key = first["sweep_id"]
    assert (dest / "sweeps" / key / "report.html").is_file() and first["report_url"].endswith("/report.html")
    again = publish_sweep(sweep_folder / "compare", str(dest), sweep_id="manual__2026-01-05T00:00:00+00:00",
                          winner={"run_id": f"{key}__resnet50", "promoted": False})
    entries = load_sweeps(str(dest))
    assert len(entries) == 1 and entries[0]["recommended"] == "resnet50" and entries[0]["failed"] == ["resnet101"]
    assert entries[0]["winner_run"] == f"{key}__resnet50" and again["entry"]["report"] == f"sweeps/{key}/report.html"
    assert load_index(str(dest)) == []  # sweeps are not runs: the quality gate's index is untouched
    (dest / "sweeps" / "other").mkdir()
    (dest / "sweeps" / "other" / "x.txt").write_text("not ours")
    with pytest.raises(PersoncarError, match="did not write"):
        publish_sweep(sweep_folder / "compare", str(dest), sweep_id="other")


def test_a_run_cannot_take_the_sweeps_names(tmp_path: Path) -> None:
    from tasks.publish import publish

    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "report.html").write_text("<html></html>")
    for name in ("sweeps", "sweeps.json"):
        with pytest.raises(PersoncarError, match="reserved"):
            publish(tmp_path / "report", str(tmp_path / "dest"), run_id=name)


# --------------------------------------------------------------------------- the candidate tasks' callbacks


def test_a_failed_candidate_task_leaves_failure_json_and_a_new_try_removes_it(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from tasks import sweep_tasks
    from tasks.compare import read_run

    monkeypatch.setenv("PERSONCAR_ARTIFACT_ROOT", str(tmp_path / "runs"))
    params = {"candidates": [{"name": "a", "steps": 2}, {"name": "b", "steps": 3}]}
    ti = SimpleNamespace(map_index=1, task_id="candidate.train", try_number=1)
    context = {"params": params, "ti": ti, "dag_run": SimpleNamespace(run_id="manual__1", logical_date=None),
               "exception": RuntimeError("backbone resnet18: the model's resnet_v1 backbone comes in\ndepths 26")}
    sweep_tasks.record_failure(context)
    folder = tmp_path / "runs" / "manual__1" / "candidates" / "b"
    assert json.loads((folder / "failure.json").read_text()) == {
        "stage": "train", "error": "backbone resnet18: the model's resnet_v1 backbone comes in depths 26",
        "try_number": 1}
    assert read_run("b", str(folder), {})["failure"] == {
        "stage": "train", "error": "backbone resnet18: the model's resnet_v1 backbone comes in depths 26"}
    assert not (tmp_path / "runs" / "manual__1" / "candidates" / "a").exists()  # the map index picks the candidate
    sweep_tasks.clear_failure(context)
    assert not (folder / "failure.json").exists()
    sweep_tasks.clear_failure(context)  # nothing to clear: no error
