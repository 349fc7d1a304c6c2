"""End to end: the backbone sweep DAG run by Airflow (``airflow dags test``) on a generated sample.

The same set-up as the main DAG's end-to-end test (tests/e2e/test_dag_run.py: SQLite metadata DB in
a temp AIRFLOW_HOME, the local backend, the sample archive through the production download path).
Three candidates: two tiny models that train a few steps at 128 px, and one made to fail in its
training (its start checkpoint does not exist). The compare report must rank the two, name the
failure, be published beside the runs, be listed by the runs view and render in headless Chromium.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.test_dag_run import DATE, airflow, airflow_env, json_out

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
DAG_ID = "personcar_backbone_sweep"
TINY = {"model": "ssd_resnet26_v1_fpn_256x256_tiny", "image_size": 128}
CANDIDATES = [
    {"name": "tiny_a", **TINY, "steps": 3},
    {"name": "tiny_b", **TINY, "steps": 5, "seed": 7},
    # a start checkpoint that is not there: only its training finds out (the path could exist in a pod only)
    {"name": "broken", **TINY, "steps": 4, "init_checkpoint": "/nonexistent/personcar/ckpt-1"},
]

STATES = r"""
import json, sys
from airflow.models import TaskInstance
from airflow.utils.session import create_session
with create_session() as s:
    rows = s.query(TaskInstance).filter(TaskInstance.dag_id == sys.argv[1]).all()
    print(json.dumps({f"{t.task_id}[{t.map_index}]" if t.map_index >= 0 else t.task_id: str(t.state) for t in rows}))
"""


@pytest.fixture(scope="module")
def sweep_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from tasks.sample import make_sample

    root = tmp_path_factory.mktemp("sweep")
    make_sample(root / "sample", images=12, seed=3, archive=root / "trainval.tar.gz")
    env = airflow_env(root)
    conf = {"dataset_source": (root / "trainval.tar.gz").as_uri(), "batch_size": 2, "val_fraction": 0.25,
            "publish_dest": (root / "published").as_uri(), "candidates": CANDIDATES}
    migrate = airflow(env, "db", "migrate")
    assert migrate.returncode == 0, migrate.stderr[-2000:]
    run = airflow(env, "dags", "test", DAG_ID, DATE, "--conf", json.dumps(conf))
    (root / "dags-test.log").write_text(run.stdout + run.stderr)
    runs = json_out(airflow(env, "dags", "list-runs", DAG_ID, "--output", "json"))
    assert len(runs) == 1, runs
    states = subprocess.run([sys.executable, "-c", STATES, DAG_ID], env=env, capture_output=True, text=True,
                            timeout=120)
    from tasks.dag_tasks import run_key

    return {"root": root, "env": env, "conf": conf, "run": run, "run_id": runs[0]["run_id"], "states": json_out(states),
            "run_dir": root / "runs" / run_key(runs[0]["run_id"])}


def test_one_failed_candidate_does_not_sink_the_others(sweep_run: dict) -> None:
    log = (sweep_run["run"].stdout + sweep_run["run"].stderr)[-4000:]
    assert sweep_run["states"] == {
        "list_candidates": "success", "download_dataset": "success", "validate_annotations": "success",
        "build_tfrecords": "success",
        "candidate.train[0]": "success", "candidate.train[1]": "success", "candidate.train[2]": "failed",
        "candidate.evaluate[0]": "success", "candidate.evaluate[1]": "success",
        "candidate.evaluate[2]": "upstream_failed",
        "compare": "success", "publish_sweep": "success",
    }, log
    run = sweep_run["run_dir"]
    assert sorted(p.name for p in (run / "candidates").iterdir()) == ["broken", "tiny_a", "tiny_b"]
    for name, steps in (("tiny_a", 3), ("tiny_b", 5)):
        assert json.loads((run / "candidates" / name / "train" / "train_summary.json").read_text())["steps"] == steps
        assert (run / "candidates" / name / "evaluate" / "metrics.json").is_file()
    failure = json.loads((run / "candidates" / "broken" / "failure.json").read_text())
    assert failure["stage"] == "train" and "init checkpoint /nonexistent/personcar/ckpt-1: no such" in failure["error"]
    assert not (run / "train").exists() and not (run / "evaluate").exists()  # the data pass only, once


def test_compare_ranks_the_two_and_names_the_failure(sweep_run: dict) -> None:
    out = sweep_run["run_dir"] / "compare"
    doc = json.loads((out / "sweep.json").read_text())
    assert sorted(doc["ranking"]) == ["tiny_a", "tiny_b"] and doc["failed"] == ["broken"]
    assert doc["recommendation"]["name"] in ("tiny_a", "tiny_b") and doc["recommendation"]["reason"]
    by_name = {c["name"]: c for c in doc["candidates"]}
    for name in ("tiny_a", "tiny_b"):
        c = by_name[name]
        assert c["status"] == "finished" and c["rank"] in (1, 2)
        assert set(c["metrics"]) == {"mAP", "mAP@.50IOU", "mAP@.75IOU"} and set(c["per_class"]) == {"person", "car"}
        assert c["parameters"] > 1_000_000 and c["saved_model_bytes"] > 1_000_000
        assert c["latency"]["median_ms"] > 0 and c["training"]["images_per_second"] > 0
    assert by_name["broken"]["failure"] == {
        "stage": "train", "error": "init checkpoint /nonexistent/personcar/ckpt-1: no such file or folder"}
    assert doc["machine"]["images_from"].endswith("/tfrecords")
    md = (out / "report.md").read_text()
    assert "**broken** failed in train: init checkpoint /nonexistent/personcar/ckpt-1" in md and (out / "pr_curves.png").stat().st_size > 5_000
    assert not [p for p in out.parent.rglob(".*") if ".tmp" in p.name]  # no temp leftovers


def test_the_sweep_is_published_and_listed_by_the_runs_view(sweep_run: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    published = sweep_run["root"] / "published"
    entries = json.loads((published / "sweeps.json").read_text())
    assert len(entries) == 1 and entries[0]["failed"] == ["broken"]
    key = entries[0]["sweep_id"]
    assert (published / "sweeps" / key / "report.html").is_file()
    assert not (published / "runs.json").exists()  # promote_winner is off: no run published

    monkeypatch.syspath_prepend(str(REPO / "plugins"))
    import personcar_views as views

    monkeypatch.setattr(views, "published_dests", lambda: [])
    monkeypatch.setenv("PERSONCAR_PUBLISH_DEST", published.as_uri())
    page = views.render_page(views.load_runs())
    assert f'data-sweep-id="{key}"' in page and f"<strong>{entries[0]['recommended']}</strong>" in page
    assert "broken (failed)" in page and f'href="reports/sweeps/{key}/report.html"' in page
    served = views.serve(published.as_uri(), f"sweeps/{key}/report.html")
    assert Path(served.path) == published / "sweeps" / key / "report.html"


def test_the_sweep_report_in_headless_chromium(sweep_run: dict, page) -> None:
    report = sweep_run["run_dir"] / "compare" / "report.html"
    requests, problems = [], []
    page.on("request", lambda r: requests.append(r.url))
    page.on("console", lambda m: problems.append(f"{m.type}: {m.text}"))
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.route("**/*", lambda route: route.continue_() if route.request.url.startswith("file:") else route.abort())
    page.goto(report.as_uri())
    assert requests == [report.as_uri()] and problems == []
    doc = json.loads((report.parent / "sweep.json").read_text())
    assert page.locator("#recommended").inner_text() == doc["recommendation"]["name"]
    rows = page.locator("#candidates tbody tr")
    assert [rows.nth(i).get_attribute("data-candidate") for i in range(rows.count())] == [*doc["ranking"], "broken"]
    assert page.locator("tr.recommended").get_attribute("data-candidate") == doc["recommendation"]["name"]
    assert page.locator("tr.failed").get_attribute("data-candidate") == "broken"
    assert "broken failed in train: init checkpoint /nonexistent/personcar/ckpt-1" in page.locator("#failures").inner_text()
    plot = page.locator("img.plot")
    assert plot.count() == 1 and plot.evaluate("img => img.complete && img.naturalWidth >= 300")



def test_promote_winner_publishes_the_recommended_candidate_as_a_run(sweep_run: dict) -> None:
    """``publish_sweep`` again, with ``promote_winner``: ``airflow tasks test`` on the sweep's run (its
    folder and XComs; the run's conf keeps its ``publish_dest``). The recommended candidate goes
    through the quality gate as run ``<sweep>__<name>``, with a run report of its own train and
    evaluate and the shared data pass. Runs after the tests above, which check that it was off."""
    published = sweep_run["root"] / "published"
    params = {**sweep_run["conf"], "promote_winner": True}
    again = airflow(sweep_run["env"], "tasks", "test", DAG_ID, "publish_sweep", DATE, "-t", json.dumps(params))
    assert again.returncode == 0, (again.stdout + again.stderr)[-4000:]
    run = sweep_run["run_dir"]
    name = json.loads((run / "compare" / "sweep.json").read_text())["recommendation"]["name"]
    run_id = f"{run.name}__{name}"
    index = json.loads((published / "runs.json").read_text())
    assert [(e["run_id"], e["promoted"]) for e in index] == [(run_id, True)]  # the first run at the destination
    assert index[0]["model"]["checkpoint"].startswith(str(run / "candidates" / name / "train" / "ckpt-"))
    assert json.loads((published / "latest" / "pointer.json").read_text())["run_id"] == run_id
    candidate = run / "candidates" / name
    metrics = json.loads((candidate / "evaluate" / "metrics.json").read_text())
    assert json.loads((published / run_id / "metrics.json").read_text()) == metrics
    config = json.loads((candidate / "config.json").read_text())
    assert config["sweep"] == {"run": run.name, "candidate": name} and config["run_id"] == run_id
    chosen = next(c for c in CANDIDATES if c["name"] == name)
    assert (config["model"], config["image_size"], config["steps"]) == (TINY["model"], TINY["image_size"], chosen["steps"])
    md = (published / run_id / "report.md").read_text()
    assert f"| mAP@.50IOU | {metrics['DetectionBoxes_Precision/mAP@.50IOU']:.3f} |" in md
    assert "**Promoted:** the first run" in md
    assert f"recommended candidate **{name}** of the backbone sweep {run.name} ([sweep report](../sweeps/{run.name}/report.html))" in md
    assert (published / run_id / f"../sweeps/{run.name}/report.html").resolve().is_file()  # the link resolves
    # the report drew the shared data pass's val images, fetched from the run's download folder
    assert (published / run_id / "sample_detections.png").stat().st_size > 5_000
    sweeps = json.loads((published / "sweeps.json").read_text())
    assert [(e["sweep_id"], e.get("winner_run")) for e in sweeps] == [(run.name, run_id)]
    assert not [p for p in run.rglob(".*") if ".tmp" in p.name]  # no temp leftovers
