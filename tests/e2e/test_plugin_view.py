"""The personcar Airflow plugin in a real ``airflow api-server``: the runs view, the Report links.

One API server (SQLite, SimpleAuthManager with every user an admin, plugins from ``plugins/``) is
started for the module on a free loopback port. Before it starts, runs are published to a file://
destination with ``tasks.publish`` and a stand-in ``personcar_detection`` DAG is run with
``airflow dags test``; its ``publish_report`` task publishes a report and pushes the ``report_url``
XCom the Report link reads. The view is then loaded over HTTP and in headless Chromium.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import chromium_path

from tasks import publish as pub

REPO = Path(__file__).resolve().parents[2]
AIRFLOW = Path(sys.executable).with_name("airflow")
DAG_ID = "personcar_detection"

STAND_IN_DAG = textwrap.dedent(
    '''
    """Stand-in for personcar_detection: the task ids the Report link is registered for."""
    import os

    from airflow.sdk import dag, task


    @dag(dag_id="personcar_detection", schedule=None, catchup=False, tags=["personcar"])
    def personcar_detection():
        @task
        def train():
            return None

        @task
        def evaluate():
            return None

        @task
        def publish_report(**context):
            from tasks.publish import publish

            result = publish(os.environ["PERSONCAR_E2E_REPORT"], os.environ["PERSONCAR_PUBLISH_DEST"],
                             run_id=context["run_id"])
            context["ti"].xcom_push(key="report_url", value=result["report_url"])
            return result["report_url"]

        train() >> evaluate() >> publish_report()


    personcar_detection()
    '''
)

NASTY_RUN_ID = '<img src=x onerror="alert(1)">'


@dataclass
class Server:
    base: str
    dest: Path
    home: Path
    env: dict[str, str]
    dag_run_id: str
    seeded: list[str]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _report(root: Path, name: str, map50: float | None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    metrics = {}
    if map50 is not None:
        metrics = {"DetectionBoxes_Precision/mAP": round(map50 * 0.55, 4),
                   "DetectionBoxes_Precision/mAP@.50IOU": map50,
                   "DetectionBoxes_Precision/mAP@.75IOU": round(map50 * 0.35, 4)}
    (root / "metrics.json").write_text(json.dumps(metrics), encoding="utf-8")
    (root / "report.html").write_text(f"<!doctype html><title>{name}</title><h1>report {name}</h1>",
                                      encoding="utf-8")
    (root / "report.md").write_text(f"# report {name}\n", encoding="utf-8")
    return root


def _run(cmd: list[str], env: dict[str, str], timeout: int, cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd[1:3])} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def _get(url: str, *, token: str | None = None, timeout: float = 30) -> tuple[int, dict, bytes]:
    req = urllib.request.Request(url)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def _token(base: str) -> str:
    status, _, body = _get(f"{base}/auth/token")
    assert status in (200, 201), body
    return json.loads(body)["access_token"]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("airflow")
    home, dags, dest = tmp / "home", tmp / "dags", tmp / "published"
    home.mkdir()
    dags.mkdir()
    (dags / "personcar_detection.py").write_text(STAND_IN_DAG, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    env.update({
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "WARNING",
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p),
        "PERSONCAR_PUBLISH_DEST": dest.as_uri(),
        "PERSONCAR_E2E_REPORT": str(_report(tmp / "dag-report", "from the DAG", 0.41)),
        "NO_PROXY": "127.0.0.1,localhost",
    })

    # Runs published before: metrics over time, one without metrics, one with a hostile id.
    seeded = []
    for i, value in enumerate([0.12, 0.18, 0.15, None, 0.27, 0.22, 0.33]):
        run_id = f"scheduled__2026-11-{10 + i:02d}T00:00:00+00:00"
        seeded.append(pub.publish(_report(tmp / f"r{i}", run_id, value), dest.as_uri(), run_id=run_id)["run_id"])
    pub.update_index(str(dest), lambda entries: [*entries, {
        "run_id": NASTY_RUN_ID, "published_at": "2026-11-20T00:00:00+00:00",
        "metrics": {"mAP": 0.01, "mAP@.50IOU": 0.02, "mAP@.75IOU": 0.005}, "promoted": False,
        "report": "../../etc/passwd"}])

    _run([str(AIRFLOW), "db", "migrate"], env, 300, tmp)
    _run([str(AIRFLOW), "dags", "test", DAG_ID], env, 300, tmp)

    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    log = open(tmp / "api-server.log", "w")  # noqa: SIM115 - closed in teardown
    proc = subprocess.Popen([str(AIRFLOW), "api-server", "--host", "127.0.0.1", "--port", str(port)],
                            env=env, cwd=tmp, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                status, _, body = _get(f"{base}/api/v2/monitor/health", timeout=2)
                if status == 200 and json.loads(body)["metadatabase"]["status"] == "healthy":
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"api-server did not come up:\n{(tmp / 'api-server.log').read_text()[-4000:]}")
            time.sleep(0.5)
        token = _token(base)
        _, _, body = _get(f"{base}/api/v2/dags/{DAG_ID}/dagRuns", token=token)
        runs = json.loads(body)["dag_runs"]
        assert len(runs) == 1 and runs[0]["state"] == "success", runs
        yield Server(base, dest, home, env, runs[0]["dag_run_id"], seeded)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


# --------------------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------------------


def test_plugin_is_registered_with_its_app_view_and_link(server):
    token = _token(server.base)
    status, _, body = _get(f"{server.base}/api/v2/plugins", token=token)
    assert status == 200
    plugins = {p["name"]: p for p in json.loads(body)["plugins"]}
    plugin = plugins["personcar"]
    assert plugin["source"] == "$PLUGINS_FOLDER/personcar_plugin.py"
    assert [(a["url_prefix"], a["name"]) for a in plugin["fastapi_apps"]] == [("/personcar", "personcar runs")]
    (view,) = plugin["external_views"]
    assert view["href"] == "personcar/" and view["destination"] == "nav" and view["category"] == "browse"
    assert plugin["global_operator_extra_links"] == ["<personcar_plugin.ReportLink object>"]
    status, _, body = _get(f"{server.base}/api/v2/plugins/importErrors", token=token)
    assert status == 200 and json.loads(body)["total_entries"] == 0, body


# --------------------------------------------------------------------------------------------------
# The runs view over HTTP
# --------------------------------------------------------------------------------------------------


def test_runs_view_lists_every_published_run(server):
    status, headers, body = _get(f"{server.base}/personcar/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    page = body.decode("utf-8")
    index = pub.load_index(str(server.dest))
    assert len(index) == len(server.seeded) + 2  # the seeded runs, the hostile entry, the DAG's run
    rows = re.findall(r'<tr class="run" data-run-id="([^"]*)">(.*?)</tr>', page, flags=re.S)
    assert len(rows) == len(index)
    by_id = dict(rows)
    for entry in index:
        if entry["run_id"] == NASTY_RUN_ID:
            continue
        row = by_id[entry["run_id"]]
        for key in ("mAP", "mAP@.50IOU", "mAP@.75IOU"):
            value = entry["metrics"].get(key)
            assert (f"{value:.4f}" if value is not None else "–") in row, (entry["run_id"], key)
        assert ("promoted" in row) is entry["promoted"], entry["run_id"]
        assert f'href="reports/{entry["report"]}"' in row
    # Newest first.
    assert [rid for rid, _ in rows][0] == pub.load_pointer(str(server.dest))["run_id"]
    # Hostile values are escaped and an unsafe report path gets no link.
    assert NASTY_RUN_ID not in page and "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;" in page
    assert "etc/passwd" not in page
    # The chart: three series, one point per run that has the metric.
    svg = re.search(r"<svg.*?</svg>", page, flags=re.S).group(0)
    lines = re.findall(r'data-metric="([^"]+)"', svg)
    # The run without metrics breaks each series' line in two.
    assert sorted(lines) == sorted(["mAP", "mAP@.50IOU", "mAP@.75IOU"] * 2)
    with_metrics = sum(1 for e in index for k in ("mAP", "mAP@.50IOU", "mAP@.75IOU")
                       if e["metrics"].get(k) is not None)
    assert svg.count("<circle") == with_metrics
    assert svg.count('class="promoted-mark"') == sum(e["promoted"] for e in index)


def test_runs_json_and_report_files(server):
    status, _, body = _get(f"{server.base}/personcar/api/runs")
    assert status == 200
    data = json.loads(body)
    assert data["dest"] == server.dest.as_uri()
    assert data["runs"] == pub.load_index(str(server.dest))
    assert data["latest"] == pub.load_pointer(str(server.dest))

    run = server.seeded[0]
    status, headers, body = _get(f"{server.base}/personcar/reports/{run}/report.html")
    assert status == 200 and headers["content-type"] == "text/html; charset=utf-8"
    assert body == (server.dest / run / "report.html").read_bytes()
    status, headers, body = _get(f"{server.base}/personcar/reports/latest/pointer.json")
    assert status == 200 and json.loads(body)["run_id"] == data["latest"]["run_id"]
    for bad in ("..%2F..%2Fhome", "%2Fetc%2Fpasswd", ".runs.json.lock", f"{run}/missing.html"):
        assert _get(f"{server.base}/personcar/reports/{bad}")[0] == 404, bad


def test_view_refuses_a_forged_token(server):
    # With every user an admin, Airflow adds a valid token to each request after any the client
    # sent; the view checks the client's own token first, so a forged one is refused.
    for path in ("api/runs", "reports/latest/report.html"):
        status, _, body = _get(f"{server.base}/personcar/{path}", token="forged.token.value")
        assert status == 403, (path, status, body)


# --------------------------------------------------------------------------------------------------
# The Report extra link
# --------------------------------------------------------------------------------------------------


def test_report_links_open_the_published_report(server):
    token = _token(server.base)
    run_folder = pub.load_index(str(server.dest))[-1]["run_id"]
    expected = f"/personcar/reports/{run_folder}/report.html"
    links = {}
    for task_id in ("publish_report", "evaluate", "train"):
        url = f"{server.base}/api/v2/dags/{DAG_ID}/dagRuns/{server.dag_run_id}/taskInstances/{task_id}/links"
        status, _, body = _get(url, token=token)
        assert status == 200, body
        links[task_id] = json.loads(body)["extra_links"]
    assert links["publish_report"] == {"Report": expected}
    assert links["evaluate"] == {"Report": expected}  # follows publish_report's XCom
    assert links["train"] == {"Report": None}  # not a report task: no button
    status, _, body = _get(server.base + expected)
    assert status == 200 and b"report from the DAG" in body


# --------------------------------------------------------------------------------------------------
# Headless Chromium
# --------------------------------------------------------------------------------------------------


def _chromium_run(url: str, profile: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [chromium_path(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", *extra, url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def _console_messages(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if ":CONSOLE(" in line or "Uncaught" in line]


def test_runs_view_in_headless_chromium(server, tmp_path):
    from PIL import Image

    shot = tmp_path / "personcar-runs.png"
    run = _chromium_run(f"{server.base}/personcar/", tmp_path / "profile", "--window-size=1200,1000",
                        f"--screenshot={shot}", "--hide-scrollbars")
    assert shot.is_file(), run.stderr[-2000:]
    assert not _console_messages(run.stderr), _console_messages(run.stderr)
    dom = _chromium_run(f"{server.base}/personcar/", tmp_path / "profile", "--dump-dom").stdout
    assert dom.count('<tr class="run"') == len(pub.load_index(str(server.dest)))
    assert "<svg" in dom and "personcar detection runs" in dom

    image = Image.open(shot).convert("RGB")
    assert image.size == (1200, 1000)
    colours = image.getcolors(maxcolors=1 << 20)
    # Each series' colour is drawn (lines and points), so the chart rendered.
    for rgb in ((0x4E, 0x79, 0xA7), (0xE1, 0x57, 0x59), (0x59, 0xA1, 0x4F)):
        near = sum(n for n, c in colours if all(abs(a - b) <= 12 for a, b in zip(c, rgb, strict=True)))
        assert near > 150, (rgb, near)
    print(f"screenshot: {shot}")


def test_runs_view_is_embedded_in_the_airflow_ui(server, tmp_path):
    shot = tmp_path / "airflow-ui-personcar.png"
    args = ("--window-size=1400,900", "--virtual-time-budget=20000")
    run = _chromium_run(f"{server.base}/plugin/personcar", tmp_path / "profile", *args, f"--screenshot={shot}")
    assert shot.is_file(), run.stderr[-2000:]
    dom = _chromium_run(f"{server.base}/plugin/personcar", tmp_path / "profile", *args, "--dump-dom").stdout
    frame = re.search(r"<iframe[^>]*>", dom)
    assert frame and 'src="personcar/"' in frame.group(0), dom[-2000:]
    print(f"screenshot: {shot}")


# --------------------------------------------------------------------------------------------------
# Import cost: every Airflow process loads plugins
# --------------------------------------------------------------------------------------------------


def test_plugin_imports_without_heavy_libraries():
    code = textwrap.dedent(
        """
        import json, sys, time
        import airflow.plugins_manager, airflow.sdk
        t = time.perf_counter()
        import personcar_plugin, personcar_views
        took = time.perf_counter() - t
        heavy = sorted(m for m in ("tensorflow", "great_expectations", "matplotlib", "fastapi", "boto3",
                                   "botocore", "pandas", "tasks.publish") if m in sys.modules)
        print(json.dumps({"seconds": took, "heavy": heavy}))
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "plugins"), str(REPO)])
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["heavy"] == [], f"plugin import pulled in {result['heavy']}"
    print(f"plugin import: {result['seconds'] * 1000:.1f} ms after airflow")


# --------------------------------------------------------------------------------------------------
# Where a report location opens (no server needed)
# --------------------------------------------------------------------------------------------------


@pytest.fixture()
def plugin_modules(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "plugins"))
    import personcar_plugin
    import personcar_views

    return personcar_plugin, personcar_views


def test_report_href_for_each_kind_of_location(plugin_modules, monkeypatch, tmp_path):
    plugin, views = plugin_modules
    dest = tmp_path / "published"
    monkeypatch.setenv("PERSONCAR_PUBLISH_DEST", str(dest))
    assert views.publish_dest() == dest.as_uri()
    run_report = f"{dest.as_uri()}/run_1/report.html"
    assert plugin.report_href(run_report) == "/personcar/reports/run_1/report.html"
    assert plugin.report_href(str(dest / "run 2" / "report.html")) == "/personcar/reports/run%202/report.html"
    assert plugin.report_href("https://reports.example.com/r/1.html") == "https://reports.example.com/r/1.html"
    assert plugin.report_href((tmp_path / "elsewhere" / "report.html").as_uri()) == ""
    assert plugin.report_href(f"{dest.as_uri()}/../secret.html") == ""

    monkeypatch.setenv("PERSONCAR_PUBLISH_DEST", "s3://team-bucket/personcar/published/")
    assert plugin.report_href("s3://team-bucket/personcar/published/run_1/report.html") == \
        "/personcar/reports/run_1/report.html"
    assert plugin.report_href("s3://other-bucket/x/report.html") == \
        "https://s3.console.aws.amazon.com/s3/object/other-bucket?prefix=x/report.html"

    monkeypatch.delenv("PERSONCAR_PUBLISH_DEST")
    monkeypatch.setenv("PERSONCAR_ARTIFACT_ROOT", str(tmp_path / "artifacts"))
    monkeypatch.setattr(views, "_variable", lambda key: None)
    assert views.publish_dest() == (tmp_path / "artifacts" / "published").as_uri()


def test_page_for_an_unreadable_index_and_for_no_runs(plugin_modules):
    _, views = plugin_modules
    page = views.render_page([], dest="s3://b/p", error="read s3://b/p/runs.json failed: bucket 'b' <gone>")
    assert 'id="error"' in page and "bucket &#x27;b&#x27; &lt;gone&gt;" in page and "<svg" not in page
    page = views.render_page([], dest="file:///x")
    assert 'id="empty"' in page and "No runs published yet." in page
    chart = views.render_chart([{"run_id": "a", "metrics": {}}])
    assert "no metrics published yet" in chart and "<circle" not in chart


def test_view_reads_s3_with_the_tasks_aws_connection(plugin_modules, s3_bucket, monkeypatch, tmp_path):
    """Credentials and endpoint only in the Airflow connection: the view lists the runs and signs links."""
    from tasks import storage

    _, views = plugin_modules
    endpoint, bucket = s3_bucket
    dest = f"s3://{bucket}/personcar/published"
    client = storage.s3_client(endpoint)
    run_id = "scheduled__2026-11-23T03:00:00+00:00"
    published = pub.publish(_report(tmp_path / "r", run_id, 0.41), dest, run_id=run_id, client=client)

    key, secret = os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"]
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL",
                 "AWS_ENDPOINT_URL_S3", "PERSONCAR_S3_ENDPOINT_URL", "PERSONCAR_AWS_CONN_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("PERSONCAR_PUBLISH_DEST", dest)

    dest_seen, entries, pointer, error = views.load_runs()  # no connection: boto3's chain finds nothing
    assert entries == [] and error and bucket in error

    monkeypatch.setenv("PERSONCAR_AWS_CONN_ID", "personcar_s3")
    monkeypatch.setenv("AIRFLOW_CONN_PERSONCAR_S3", json.dumps({
        "conn_type": "aws", "login": key, "password": secret,
        "extra": {"endpoint_url": endpoint, "region_name": "us-east-1"}}))
    dest_seen, entries, pointer, error = views.load_runs()
    assert error is None and dest_seen == dest
    assert [e["run_id"] for e in entries] == [published["run_id"]] and entries[0]["metrics"]["mAP@.50IOU"] == 0.41
    assert pointer["run_id"] == published["run_id"]
    signed = storage.presigned_url(f"{dest}/{entries[0]['report']}", client=views.s3_client())
    assert signed.startswith(f"{endpoint}/{bucket}/") and "Signature" in signed
    with urllib.request.urlopen(signed, timeout=10) as resp:
        assert b"report scheduled__2026-11-23" in resp.read()
