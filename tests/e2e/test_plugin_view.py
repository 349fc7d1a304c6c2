"""The personcar Airflow plugin in a real ``airflow api-server``: the runs view, the Report links.

One API server (SQLite, SimpleAuthManager with every user an admin, plugins from ``plugins/``) is
started for the module on a free loopback port. Before it starts, runs are published to the
configured file:// destination with ``tasks.publish``, and a stand-in ``personcar_detection`` DAG is
run with ``airflow dags test``; its ``publish_report`` task publishes to another destination (as
``make demo`` does with ``.demo/published``) and pushes the ``report_url`` XCom the Report link
and the view read. The view is then loaded over HTTP and in headless Chromium (Playwright).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tasks import publish as pub
from tests.conftest import free_port, wait_until

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

            result = publish(os.environ["PERSONCAR_E2E_REPORT"], os.environ["PERSONCAR_E2E_DEST"],
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
    dest: Path  # the configured destination: the seeded runs
    other: Path  # where the DAG's run published
    home: Path
    env: dict[str, str]
    dag_run_id: str
    seeded: list[str]


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
    home, dags, dest, other = tmp / "home", tmp / "dags", tmp / "published", tmp / "demo" / "published"
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
        "PERSONCAR_E2E_DEST": other.as_uri(),
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

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = open(tmp / "api-server.log", "w")  # noqa: SIM115 - closed in teardown
    proc = subprocess.Popen([str(AIRFLOW), "api-server", "--host", "127.0.0.1", "--port", str(port)],
                            env=env, cwd=tmp, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def healthy() -> bool:
        if proc.poll() is not None:
            pytest.fail(f"api-server exited:\n{(tmp / 'api-server.log').read_text()[-4000:]}")
        status, _, body = _get(f"{base}/api/v2/monitor/health", timeout=2)
        return status == 200 and json.loads(body)["metadatabase"]["status"] == "healthy"

    try:
        wait_until(healthy, timeout=180, what="api-server health", interval=0.5)
        token = _token(base)
        _, _, body = _get(f"{base}/api/v2/dags/{DAG_ID}/dagRuns", token=token)
        runs = json.loads(body)["dag_runs"]
        assert len(runs) == 1 and runs[0]["state"] == "success", runs
        yield Server(base, dest, other, home, env, runs[0]["dag_run_id"], seeded)
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


def _dest_id(dest: str) -> str:
    sys.path.insert(0, str(REPO / "plugins"))
    try:
        from personcar_views import dest_id
    finally:
        sys.path.remove(str(REPO / "plugins"))
    return dest_id(dest)


def _entries(server: Server) -> dict[str, tuple[dict, str]]:
    """Every published run of both destinations: run id -> (index entry, its report link prefix)."""
    out = {e["run_id"]: (e, "reports/") for e in pub.load_index(str(server.dest))}
    out.update({e["run_id"]: (e, f"dest/{_dest_id(server.other.as_uri())}/") for e in pub.load_index(str(server.other))})
    return out


def test_runs_view_lists_every_run_wherever_it_was_published(server):
    status, headers, body = _get(f"{server.base}/personcar/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    page = body.decode("utf-8")
    entries = _entries(server)
    assert len(entries) == len(server.seeded) + 2  # the seeded runs, the hostile entry, the DAG's run elsewhere
    sections = re.findall(r'<section class="dest" data-dest="([^"]*)">(.*?)</section>', page, flags=re.S)
    assert [d for d, _ in sections] == [server.dest.as_uri(), server.other.as_uri()]
    rows = re.findall(r'<tr class="run" data-run-id="([^"]*)">(.*?)</tr>', page, flags=re.S)
    assert len(rows) == len(entries)
    for run_id, row in rows:
        if run_id == NASTY_RUN_ID.replace('"', "&#34;").replace("<", "&lt;").replace(">", "&gt;"):
            continue
        entry, prefix = entries[run_id]
        for key in ("mAP", "mAP@.50IOU", "mAP@.75IOU"):
            value = entry["metrics"].get(key)
            assert (f"{value:.4f}" if value is not None else "–") in row, (run_id, key)
        assert ("promoted" in row) is entry["promoted"], run_id
        assert f'href="{prefix}{entry["report"]}"' in row
    # Newest first in each destination.
    first = re.findall(r'data-run-id="([^"]*)"', sections[0][1])[0]
    assert first == pub.load_pointer(str(server.dest))["run_id"]
    # Hostile values are escaped and an unsafe report path gets no link.
    assert NASTY_RUN_ID not in page and "&lt;img src=x onerror=&#34;alert(1)&#34;&gt;" in page
    assert "etc/passwd" not in page
    # The chart: three series, one point per run that has the metric; the run without metrics breaks
    # each series' line in two.
    svg = re.search(r"<svg.*?</svg>", sections[0][1], flags=re.S).group(0)
    assert sorted(re.findall(r'data-metric="([^"]+)"', svg)) == sorted(["mAP", "mAP@.50IOU", "mAP@.75IOU"] * 2)
    seeded = pub.load_index(str(server.dest))
    assert svg.count("<circle") == sum(1 for e in seeded for k in ("mAP", "mAP@.50IOU", "mAP@.75IOU")
                                       if e["metrics"].get(k) is not None)
    assert svg.count('class="promoted-mark"') == sum(e["promoted"] for e in seeded)


def test_runs_json_and_report_files(server):
    status, _, body = _get(f"{server.base}/personcar/api/runs")
    assert status == 200
    data = json.loads(body)
    assert data["dest"] == server.dest.as_uri()
    assert data["runs"] == pub.load_index(str(server.dest))
    assert data["latest"] == pub.load_pointer(str(server.dest))
    assert [(d["dest"], d["runs"]) for d in data["destinations"]] == [
        (server.dest.as_uri(), data["runs"]), (server.other.as_uri(), pub.load_index(str(server.other)))]

    run = server.seeded[0]
    status, headers, body = _get(f"{server.base}/personcar/reports/{run}/report.html")
    assert status == 200 and headers["content-type"] == "text/html; charset=utf-8"
    assert body == (server.dest / run / "report.html").read_bytes()
    status, headers, body = _get(f"{server.base}/personcar/reports/latest/pointer.json")
    assert status == 200 and json.loads(body)["run_id"] == data["latest"]["run_id"]
    (dag_run,) = pub.load_index(str(server.other))
    other = f"{server.base}/personcar/dest/{_dest_id(server.other.as_uri())}"
    status, _, body = _get(f"{other}/{dag_run['report']}")
    assert status == 200 and body == (server.other / dag_run["report"]).read_bytes()
    # Only files of indexed run folders and latest/, of known destinations.
    (server.dest / "notes").mkdir(exist_ok=True)
    (server.dest / "notes" / "secret.txt").write_text("not a run")
    for bad in ("..%2F..%2Fhome", "%2Fetc%2Fpasswd", ".runs.json.lock", "runs.json", "notes/secret.txt",
                f"{run}/missing.html"):
        assert _get(f"{server.base}/personcar/reports/{bad}")[0] == 404, bad
    assert _get(f"{server.base}/personcar/dest/{_dest_id('file:///etc')}/{dag_run['report']}")[0] == 404
    assert _get(f"{other}/{run}/report.html")[0] == 404  # a run of the other destination


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
    (dag_run,) = pub.load_index(str(server.other))
    expected = f"/personcar/dest/{_dest_id(server.other.as_uri())}/{dag_run['report']}"
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
# Headless Chromium (Playwright)
# --------------------------------------------------------------------------------------------------


@pytest.fixture()
def shots(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("PERSONCAR_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def test_runs_view_in_headless_chromium(server, page, shots):
    import io

    from PIL import Image

    console: list[str] = []
    page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
    page.on("pageerror", lambda e: console.append(str(e)))
    page.set_viewport_size({"width": 1200, "height": 1000})
    page.goto(f"{server.base}/personcar/")
    assert page.locator("h1").inner_text() == "personcar detection runs"
    assert page.locator("tr.run").count() == len(_entries(server))
    assert page.locator("svg#metrics-chart").count() == 2 and console == []
    png = page.screenshot(full_page=True)
    (shots / "runs-page.png").write_bytes(png)
    colours = Image.open(io.BytesIO(png)).convert("RGB").getcolors(maxcolors=1 << 20)
    # Each series' colour is drawn (lines and points), so the chart rendered.
    for rgb in ((0x4E, 0x79, 0xA7), (0xE1, 0x57, 0x59), (0x59, 0xA1, 0x4F)):
        near = sum(n for n, c in colours if all(abs(a - b) <= 12 for a, b in zip(c, rgb, strict=True)))
        assert near > 150, (rgb, near)
    # The report link of the run published elsewhere opens its report.
    page.locator(f'tr.run[data-run-id="{pub.load_index(str(server.other))[0]["run_id"]}"] a.report').click()
    assert page.locator("h1").inner_text() == "report from the DAG"


def test_runs_view_is_embedded_in_the_airflow_ui(server, page, shots):
    page.set_viewport_size({"width": 1400, "height": 900})
    page.goto(f"{server.base}/plugin/personcar")
    frame = page.wait_for_selector('iframe[src="personcar/"]', timeout=60_000)
    rows = page.frame_locator('iframe[src="personcar/"]').locator("tr.run")
    rows.first.wait_for(timeout=60_000)
    assert rows.count() == len(_entries(server)) and frame.is_visible()
    (shots / "airflow-ui-personcar.png").write_bytes(page.screenshot())


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

    monkeypatch.setattr(personcar_views, "published_dests", lambda: [])  # no metadata DB in these tests
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
    elsewhere = (tmp_path / "elsewhere" / "run_3" / "report.html").as_uri()
    assert plugin.report_href(elsewhere) == ""
    assert plugin.report_href(f"{dest.as_uri()}/../secret.html") == ""
    # A destination the DAG published to (from the XComs) opens through the view too.
    monkeypatch.setattr(views, "published_dests", lambda: [(tmp_path / "elsewhere").as_uri(), dest.as_uri()])
    assert views.known_dests() == [dest.as_uri(), (tmp_path / "elsewhere").as_uri()]
    ident = views.dest_id((tmp_path / "elsewhere").as_uri())
    assert plugin.report_href(elsewhere) == f"/personcar/dest/{ident}/run_3/report.html"
    assert plugin.report_href(run_report) == "/personcar/reports/run_1/report.html"

    monkeypatch.setattr(views, "published_dests", lambda: [])
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
    group = {"dest": "s3://b/p", "id": "x", "href": "reports/", "runs": [], "latest": None,
             "error": "read s3://b/p/runs.json failed: bucket 'b' <gone>"}
    page = views.render_page([group])
    assert 'id="error"' in page and "bucket &#39;b&#39; &lt;gone&gt;" in page and "<svg" not in page
    page = views.render_page([{**group, "dest": "file:///x", "error": None}])
    assert 'id="empty"' in page and "No runs published yet." in page and "file:///x" in page
    page = views.render_page([{**group, "error": None, "runs": [{"run_id": "a", "metrics": {}}]}])
    assert "no metrics published yet" in page and "<circle" not in page
    # An empty configured destination is left out when the DAG published elsewhere.
    other = {**group, "dest": "file:///demo/published", "error": None, "runs": [{"run_id": "b", "metrics": {}}]}
    page = views.render_page([{**group, "error": None}, other])
    assert re.findall(r'data-dest="([^"]*)"', page) == ["file:///demo/published"] and "No runs" not in page


def test_view_reads_s3_with_the_tasks_aws_connection(plugin_modules, s3_bucket, monkeypatch, tmp_path):
    """Credentials and endpoint only in the Airflow connection: the view lists the runs and signs links."""
    from tasks import storage

    _, views = plugin_modules
    endpoint, bucket = s3_bucket
    dest = f"s3://{bucket}/personcar/published"
    run_id = "scheduled__2026-11-23T03:00:00+00:00"
    published = pub.publish(_report(tmp_path / "r", run_id, 0.41), dest, run_id=run_id, endpoint_url=endpoint)

    key, secret = os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"]
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL",
                 "AWS_ENDPOINT_URL_S3", "PERSONCAR_S3_ENDPOINT_URL", "PERSONCAR_AWS_CONN_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("PERSONCAR_PUBLISH_DEST", dest)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()  # a process keeps its credentials; this test takes them away

    # Playwright's sync API keeps an event loop running in this thread; the API server calls the view
    # from its worker threads, where the connection's filesystem can start its own.
    from concurrent.futures import ThreadPoolExecutor

    def load_runs() -> list:
        with ThreadPoolExecutor(1) as pool:
            return pool.submit(views.load_runs).result()

    (group,) = load_runs()  # no connection and no credentials: an error naming it, never anonymous
    assert group["runs"] == [] and "AWS connection 'aws_default' is not defined" in group["error"]
    assert "never read anonymously" in group["error"]

    monkeypatch.setenv("PERSONCAR_AWS_CONN_ID", "personcar_s3")
    monkeypatch.setenv("AIRFLOW_CONN_PERSONCAR_S3", json.dumps({
        "conn_type": "aws", "login": key, "password": secret,
        "extra": {"endpoint_url": endpoint, "region_name": "us-east-1"}}))
    (group,) = load_runs()
    assert group["error"] is None and group["dest"] == dest
    entries = group["runs"]
    assert [e["run_id"] for e in entries] == [published["run_id"]] and entries[0]["metrics"]["mAP@.50IOU"] == 0.41
    assert group["latest"]["run_id"] == published["run_id"]
    with ThreadPoolExecutor(1) as pool:
        signed = pool.submit(lambda: storage.presigned_url(f"{dest}/{entries[0]['report']}",
                                                           **views.storage_where())).result()
    assert signed.startswith(f"{endpoint}/{bucket}/") and "Signature" in signed
    with urllib.request.urlopen(signed, timeout=10) as resp:
        assert b"report scheduled__2026-11-23" in resp.read()
