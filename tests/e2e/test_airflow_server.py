"""``personcar_detection`` on a running Airflow 3: API server, scheduler and DAG processor.

One Airflow is started for the module: ``airflow api-server``, ``airflow dag-processor`` and
``airflow scheduler`` as separate processes, LocalExecutor on SQLite in a temp ``AIRFLOW_HOME``
(Airflow 3 runs the LocalExecutor on SQLite: task processes talk to the API server's Execution API,
not to the database), SimpleAuthManager with every user an admin, the repository's ``dags/`` and
``plugins/``, ports from a free-port probe on 127.0.0.1. Runs are triggered through the REST API
(``/api/v2``) with a ``conf`` that overrides the params: a generated sample, the tiny CPU model,
six steps.

- Run A (file:// source and publish destination) has its scheduler killed with SIGKILL while
  ``train`` runs; a new scheduler is started and the run must finish with every task run once.
- Run B (s3:// source and destination on a real moto S3 server, credentials from the Airflow
  connection ``aws_default``) is paused after ``train``, its model is moved away so that
  ``evaluate`` fails, then the model is put back and ``evaluate`` is cleared through the API: it
  must pick up the trained model without re-training, and the published runs index must hold one
  entry for the run, also after ``publish_report`` is cleared and published again.
- The AWS secret key of ``aws_default`` is a sentinel that must not appear in task logs, XComs,
  rendered templates, the metadata database, the run folders or the published files.
- The trigger form and the grid are opened in headless Chromium (Playwright); screenshots are
  saved in the test's temp folder.

The scheduler does not create scheduled runs here (``[scheduler] use_job_schedule = False``): with
``catchup=False`` an unpaused DAG would immediately get a run for its last cron tick with the
production defaults (ResNet-152, 25,000 steps). Scheduled run ids are checked with Airflow's own
timetable and run-id generator instead.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port, wait_until

REPO = Path(__file__).resolve().parents[2]
AIRFLOW = Path(sys.executable).with_name("airflow")
DAG_ID = "personcar_detection"
TASKS = ["download_dataset", "validate_annotations", "build_tfrecords", "train", "evaluate", "publish_report"]
STAGE_DIRS = ["download", "validate", "tfrecords", "train", "evaluate", "report"]
TINY = {"model": "ssd_resnet26_v1_fpn_256x256_tiny", "steps": 6, "batch_size": 2, "val_fraction": 0.25}
RUN_TIMEOUT = 600  # seconds a DAG run may take here (about 100 s on 2 cores)
TERMINAL = {"success", "failed"}

pytestmark = pytest.mark.slow


# --------------------------------------------------------------------------------------------------
# The Airflow processes and the REST API
# --------------------------------------------------------------------------------------------------


def _closed_port() -> int:
    """A loopback port nothing listens on: a safety net for any S3 call without an endpoint."""
    return free_port()


class ApiError(AssertionError):
    pass


@dataclass
class Airflow:
    root: Path
    env: dict[str, str]
    base: str
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    groups: list[int] = field(default_factory=list)  # every process group started, dead or alive
    figures: dict[str, Any] = field(default_factory=dict)
    _token: str | None = None

    @property
    def home(self) -> Path:
        return Path(self.env["AIRFLOW_HOME"])

    # -- processes ---------------------------------------------------------------------------
    def start(self, name: str, *args: str) -> subprocess.Popen:
        log = open(self.root / f"{name}.log", "a")  # noqa: SIM115 - the process owns it
        proc = subprocess.Popen([str(AIRFLOW), *args], env=self.env, cwd=self.root, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self.procs[name] = proc
        self.groups.append(proc.pid)
        return proc

    def log_tail(self, name: str, chars: int = 3000) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def stop(self) -> None:
        for pgid in reversed(self.groups):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        # LocalExecutor workers orphaned by a killed scheduler ignore SIGTERM while they wait for work.
        for pgid in self.groups:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        # Task processes run in process groups of their own: end any that still runs for this home.
        marker = f"AIRFLOW_HOME={self.home}".encode() + b"\0"
        for proc_dir in Path("/proc").iterdir():
            if proc_dir.name.isdigit() and int(proc_dir.name) != os.getpid():
                with contextlib.suppress(OSError):
                    if marker in (proc_dir / "environ").read_bytes():
                        os.kill(int(proc_dir.name), signal.SIGKILL)

    # -- REST API ------------------------------------------------------------------------------
    def token(self) -> str:
        if self._token is None:
            status, body = self.request("GET", "/auth/token", auth=False)
            assert status in (200, 201), body
            self._token = body["access_token"]
        return self._token

    def request(self, method: str, path: str, body: Any = None, *, auth: bool = True,
                timeout: float = 30) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        if auth:
            req.add_header("Authorization", f"Bearer {self.token()}")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                raw, status = resp.read(), resp.status
        except urllib.error.HTTPError as err:
            raw, status = err.read(), err.code
        try:
            return status, json.loads(raw) if raw else None
        except ValueError:
            return status, raw.decode("utf-8", "replace")

    def api(self, method: str, path: str, body: Any = None, *, ok: tuple[int, ...] = (200, 201)) -> Any:
        status, data = self.request(method, "/api/v2" + path, body)
        if status not in ok:
            raise ApiError(f"{method} {path} -> {status}: {data}")
        return data

    def trigger(self, conf: dict[str, Any], logical_date: str) -> dict[str, Any]:
        return self.api("POST", f"/dags/{DAG_ID}/dagRuns", {"logical_date": logical_date, "conf": conf})

    def dag_run(self, run_id: str) -> dict[str, Any]:
        return self.api("GET", f"/dags/{DAG_ID}/dagRuns/{_q(run_id)}")

    def task_instances(self, run_id: str) -> dict[str, dict[str, Any]]:
        data = self.api("GET", f"/dags/{DAG_ID}/dagRuns/{_q(run_id)}/taskInstances?limit=100")
        return {ti["task_id"]: ti for ti in data["task_instances"]}

    def tries(self, run_id: str, task_id: str) -> list[dict[str, Any]]:
        data = self.api("GET", f"/dags/{DAG_ID}/dagRuns/{_q(run_id)}/taskInstances/{task_id}/tries")
        return sorted(data["task_instances"], key=lambda t: t["try_number"])

    def set_paused(self, paused: bool) -> None:
        assert self.api("PATCH", f"/dags/{DAG_ID}", {"is_paused": paused})["is_paused"] is paused

    def wait_task(self, run_id: str, task_id: str, states: set[str], timeout: float = RUN_TIMEOUT) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            ti = self.task_instances(run_id).get(task_id, {})
            if ti.get("state") in states:
                return ti
            run = self.dag_run(run_id)
            if run["state"] in TERMINAL:
                raise AssertionError(f"run {run_id} ended {run['state']} while waiting for {task_id} in {states}: "
                                     f"{_states(self.task_instances(run_id))}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{task_id} not in {states} after {timeout} s: {_states(self.task_instances(run_id))}"
                                     f"\nscheduler log:\n{self.log_tail('scheduler')}")
            time.sleep(0.5)

    def wait_run(self, run_id: str, timeout: float = RUN_TIMEOUT) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            run = self.dag_run(run_id)
            if run["state"] in TERMINAL:
                return run
            if time.monotonic() > deadline:
                raise AssertionError(f"run {run_id} still {run['state']} after {timeout} s: "
                                     f"{_states(self.task_instances(run_id))}\nscheduler log:\n"
                                     f"{self.log_tail('scheduler')}")
            time.sleep(1)

    def wait_healthy(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                status, body = self.request("GET", "/api/v2/monitor/health", auth=False, timeout=3)
                if status == 200 and all(body[k]["status"] == "healthy"
                                         for k in ("metadatabase", "scheduler", "dag_processor")):
                    return
            except OSError:
                pass
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                raise AssertionError(f"Airflow not healthy (exited: {dead}):\n" + "\n".join(
                    f"--- {n}\n{self.log_tail(n)}" for n in self.procs))
            time.sleep(0.5)

    def task_logs(self, run_id: str, task_id: str) -> dict[int, str]:
        """The task's log files, by attempt, read from the log folder."""
        folder = self.home / "logs" / f"dag_id={DAG_ID}" / f"run_id={run_id}" / f"task_id={task_id}"
        return {int(p.stem.split("=")[1]): p.read_text(errors="replace") for p in sorted(folder.glob("attempt=*.log"))}


def _q(value: str) -> str:
    return urllib.request.quote(value, safe="")


def _states(tis: dict[str, dict[str, Any]]) -> dict[str, str]:
    return {t: f"{ti['state']}/try {ti['try_number']}" for t, ti in tis.items()}


def _log_events(text: str) -> list[tuple[str, str]]:
    """(timestamp, message) of each line of a task log (JSON lines)."""
    out = []
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        out.append((str(rec.get("timestamp", "")), str(rec.get("event", ""))))
    return out


def _tree(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``folder``."""
    out = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            h = hashlib.sha256()
            with path.open("rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
            out[path.relative_to(folder).as_posix()] = h.hexdigest()
    return out


def _hidden_leftovers(folder: Path) -> list[str]:
    """Temp folders and files a stage leaves behind when it is interrupted (``.tmp-*``, ``.exported-*``...)."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob(".*"))


# --------------------------------------------------------------------------------------------------
# Fixtures: the server and the two runs
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sentinel() -> str:
    """The AWS secret access key of the ``aws_default`` connection: must never be written anywhere."""
    return "pcSENTINEL" + secrets.token_hex(16)


@pytest.fixture(scope="module")
def airflow(tmp_path_factory: pytest.TempPathFactory, s3_server: str, sentinel: str) -> Iterator[Airflow]:
    import boto3

    from tasks.sample import make_sample

    started = time.monotonic()
    root = tmp_path_factory.mktemp("airflow-server")
    home = root / "home"
    home.mkdir()
    make_sample(root / "sample", images=16, seed=3, archive=root / "trainval.tar.gz")

    bucket = f"personcar-e2e-{secrets.token_hex(6)}"
    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1",
                      aws_access_key_id="testing", aws_secret_access_key="testing")
    s3.create_bucket(Bucket=bucket)
    s3.upload_file(str(root / "trainval.tar.gz"), bucket, "datasets/trainval.tar.gz")

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AIRFLOW", "AWS_", "PERSONCAR_")) and k.lower() not in ("http_proxy", "https_proxy")}
    env.update({
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__CORE__PARALLELISM": "2",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{base}/execution/",
        "AIRFLOW__API__BASE_URL": base,
        "AIRFLOW__API__SECRET_KEY": secrets.token_hex(32),
        "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_hex(64),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
        "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",
        # The Airflow AWS connection: the only place the S3 endpoint and the credentials are set.
        "AIRFLOW_CONN_AWS_DEFAULT": json.dumps({
            "conn_type": "aws", "login": "AKIAPERSONCARE2ETEST", "password": sentinel,
            "extra": {"endpoint_url": s3_server, "region_name": "us-east-1"}}),
        # Anything that reaches S3 without the connection hits a closed loopback port instead of AWS.
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{_closed_port()}",
        "AWS_EC2_METADATA_DISABLED": "true",
        "PERSONCAR_ARTIFACT_ROOT": str(root / "runs"),
        "PERSONCAR_EXECUTION_BACKEND": "local",
        "PERSONCAR_CACHE_DIR": str(root / "cache"),
        # The form's default source: the local sample, so that no default run can reach outside.
        "PERSONCAR_DATASET_SOURCE": (root / "trainval.tar.gz").as_uri(),
        "PERSONCAR_PUBLISH_DEST": (root / "published").as_uri(),  # what the /personcar view lists
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p),
        "NO_PROXY": "127.0.0.1,localhost",
    })
    af = Airflow(root=root, env=env, base=base)
    af.figures["bucket"] = bucket
    af.figures["s3_endpoint"] = s3_server
    migrate = subprocess.run([str(AIRFLOW), "db", "migrate"], env=env, cwd=root, capture_output=True, text=True,
                             timeout=300)
    assert migrate.returncode == 0, migrate.stdout[-2000:] + migrate.stderr[-2000:]
    try:
        af.start("api-server", "api-server", "--host", "127.0.0.1", "--port", str(port))
        af.start("dag-processor", "dag-processor")
        af.start("scheduler", "scheduler", "--skip-serve-logs")
        af.wait_healthy()
        deadline = time.monotonic() + 120
        while af.request("GET", f"/api/v2/dags/{DAG_ID}")[0] != 200:
            assert time.monotonic() < deadline, af.log_tail("dag-processor")
            time.sleep(0.5)
        errors = af.api("GET", "/importErrors")
        assert errors["total_entries"] == 0, errors
        af.figures["startup_s"] = round(time.monotonic() - started, 1)
        yield af
    finally:
        af.stop()
        (root / "figures.json").write_text(json.dumps(af.figures, indent=2, default=str))
        print(f"\nAirflow server figures ({root / 'figures.json'}):\n{json.dumps(af.figures, indent=2, default=str)}")


def _wait_new_scheduler(af: Airflow, since: float, timeout: float = 120) -> float:
    """When a scheduler heartbeat newer than ``since`` shows in the health endpoint."""
    from datetime import datetime

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, body = af.request("GET", "/api/v2/monitor/health", auth=False)
        beat = (body or {}).get("scheduler", {}).get("latest_scheduler_heartbeat") if status == 200 else None
        if beat and datetime.fromisoformat(beat.replace("Z", "+00:00")).timestamp() > since:
            return time.time()
        time.sleep(0.5)
    raise AssertionError(f"the restarted scheduler did not heartbeat:\n{af.log_tail('scheduler')}")


def _conf_a(af: Airflow) -> dict[str, Any]:
    return {**TINY, "dataset_source": (af.root / "trainval.tar.gz").as_uri(),
            "publish_dest": (af.root / "published").as_uri()}


def _conf_b(af: Airflow) -> dict[str, Any]:
    bucket = af.figures["bucket"]
    return {**TINY, "dataset_source": f"s3://{bucket}/datasets/trainval.tar.gz",
            "publish_dest": f"s3://{bucket}/published"}


def _run_dir(af: Airflow, run_id: str) -> Path:
    from tasks.dag_tasks import run_key

    return af.root / "runs" / run_key(run_id)


@dataclass
class RunA:
    run_id: str
    run: dict[str, Any]
    killed_at: float
    restarted_at: float
    kill_task: dict[str, Any]
    tree: dict[str, str]


@pytest.fixture(scope="module")
def run_a(airflow: Airflow) -> RunA:
    """Triggered through the REST API; the scheduler is SIGKILLed while ``train`` runs, then restarted."""
    af = airflow
    af.set_paused(False)
    t0 = time.monotonic()
    created = af.trigger(_conf_a(af), "2026-11-09T03:00:00Z")
    run_id = created["dag_run_id"]
    assert created["conf"]["steps"] == TINY["steps"] and created["run_type"] == "manual"

    running = af.wait_task(run_id, "train", {"running"})
    # into training: TensorFlow has started and the model is built
    wait_until(lambda: "train: " in af.task_logs(run_id, "train").get(1, ""), timeout=120,
               what="train's first log line", interval=0.2)
    scheduler = af.procs["scheduler"]
    os.kill(scheduler.pid, signal.SIGKILL)
    assert scheduler.wait(timeout=30) == -signal.SIGKILL
    killed_at = time.time()
    kill_state = af.task_instances(run_id)["train"]
    af.start("scheduler", "scheduler", "--skip-serve-logs")
    restarted_at = time.time()
    af.figures["run_a_new_scheduler_up_s"] = round(_wait_new_scheduler(af, restarted_at) - killed_at, 1)
    run = af.wait_run(run_id)
    af.figures["run_a_s"] = round(time.monotonic() - t0, 1)
    af.figures["run_a_train_state_at_kill"] = kill_state["state"]
    run_dir = _run_dir(af, run_id)
    return RunA(run_id, run, killed_at, restarted_at, {"at_start": running, "at_kill": kill_state},
                _tree(run_dir) if run_dir.is_dir() else {})


@dataclass
class RunB:
    run_id: str
    run: dict[str, Any]
    failed_try_log: str
    train_before: dict[str, str]
    s3_after_first_publish: dict[str, str]
    s3_after_republish: dict[str, str]
    index_after_first_publish: list[dict]
    index_after_republish: list[dict]


def _s3(af: Airflow):
    import boto3

    return boto3.client("s3", endpoint_url=af.figures["s3_endpoint"], region_name="us-east-1",
                        aws_access_key_id="testing", aws_secret_access_key="testing")


def _s3_objects(af: Airflow, prefix: str) -> dict[str, str]:
    """Key -> ETag of every object under ``prefix`` in the test bucket."""
    pages = _s3(af).get_paginator("list_objects_v2").paginate(Bucket=af.figures["bucket"], Prefix=prefix)
    return {o["Key"]: o["ETag"] for page in pages for o in page.get("Contents", [])}


def _s3_json(af: Airflow, key: str) -> Any:
    return json.loads(_s3(af).get_object(Bucket=af.figures["bucket"], Key=key)["Body"].read())


def _clear(af: Airflow, run_id: str, task_ids: list[str], *, downstream: bool) -> list[str]:
    body = {"dry_run": False, "dag_run_id": run_id, "task_ids": task_ids, "only_failed": False,
            "include_downstream": downstream, "reset_dag_runs": True}
    cleared = af.api("POST", f"/dags/{DAG_ID}/clearTaskInstances", body)
    assert af.dag_run(run_id)["state"] in ("queued", "running")  # the run is live again
    return sorted(ti["task_id"] for ti in cleared["task_instances"])


@pytest.fixture(scope="module")
def run_b(airflow: Airflow, run_a: RunA) -> RunB:
    """s3:// in and out; ``evaluate`` fails on a missing model, is fixed and cleared; then a re-publish."""
    af = airflow
    t0 = time.monotonic()
    run_id = af.trigger(_conf_b(af), "2026-11-16T03:00:00Z")["dag_run_id"]
    run_dir = _run_dir(af, run_id)

    # Hold the run after train: a paused DAG's running runs get no new task instances scheduled.
    af.wait_task(run_id, "train", {"running"})
    af.set_paused(True)
    af.wait_task(run_id, "train", {"success"})
    time.sleep(3)  # a scheduler loop that started before the pause has had its turn
    assert af.task_instances(run_id)["evaluate"]["state"] is None
    train_before = _tree(run_dir / "train")
    stash = af.root / "stash-train"
    (run_dir / "train").rename(stash)  # the trained model disappears before evaluate runs

    af.set_paused(False)
    af.wait_task(run_id, "evaluate", {"up_for_retry", "failed"})
    failed_log = af.task_logs(run_id, "evaluate").get(1, "")
    stash.rename(run_dir / "train")  # fixed: the model is back
    cleared = _clear(af, run_id, ["evaluate"], downstream=True)
    assert cleared == ["evaluate", "publish_report"], cleared
    run = af.wait_run(run_id)
    af.figures["run_b_s"] = round(time.monotonic() - t0, 1)
    s3_first = _s3_objects(af, "published/")
    index_first = _s3_json(af, "published/runs.json") if "published/runs.json" in s3_first else []

    # Publishing the same run again (a clear of publish_report alone) must not duplicate anything.
    t1 = time.monotonic()
    assert _clear(af, run_id, ["publish_report"], downstream=False) == ["publish_report"]
    run = af.wait_run(run_id)
    af.figures["run_b_republish_s"] = round(time.monotonic() - t1, 1)
    s3_again = _s3_objects(af, "published/")
    index_again = _s3_json(af, "published/runs.json") if "published/runs.json" in s3_again else []
    return RunB(run_id, run, failed_log, train_before, s3_first, s3_again, index_first, index_again)


# --------------------------------------------------------------------------------------------------
# The DAG as the server sees it; params refused by the API
# --------------------------------------------------------------------------------------------------


def test_dag_is_served_with_six_tasks_in_order_and_a_weekly_cron_schedule(airflow: Airflow) -> None:
    details = airflow.api("GET", f"/dags/{DAG_ID}/details")
    # the weekly cron, or an update of the source archive (data-aware retraining)
    assert details["timetable_summary"] == "Asset or 0 3 * * 1" and details["timetable_periodic"] is True
    assert details["catchup"] is False and details["max_active_runs"] == 1
    next_run = details["next_dagrun_run_after"]
    from datetime import datetime

    when = datetime.fromisoformat(next_run.replace("Z", "+00:00"))
    assert (when.weekday(), when.hour, when.minute) == (0, 3, 0), next_run  # Mondays 03:00 UTC
    tasks = {t["task_id"]: t for t in airflow.api("GET", f"/dags/{DAG_ID}/tasks")["tasks"]}
    assert sorted(tasks) == sorted(TASKS)
    for upstream, downstream in zip(TASKS, TASKS[1:], strict=False):  # each stage feeds the next (and later ones)
        assert downstream in tasks[upstream]["downstream_task_ids"], upstream


PROBE = textwrap.dedent(
    """
    import json, sys
    from airflow.models.dagrun import DagRun
    from airflow.models.serialized_dag import SerializedDagModel
    from airflow.timetables.base import TimeRestriction
    from airflow.utils.types import DagRunType
    from tasks.dag_tasks import run_key

    dag = SerializedDagModel.get_dag(sys.argv[1])
    timetable = dag.timetable
    restriction = TimeRestriction(earliest=dag.start_date, latest=None, catchup=True)
    runs, last = [], None
    for _ in range(3):
        info = timetable.next_dagrun_info(last_automated_data_interval=last, restriction=restriction)
        run_id = DagRun.generate_run_id(run_type=DagRunType.SCHEDULED, logical_date=info.logical_date,
                                        run_after=info.run_after)
        runs.append({"run_id": run_id, "run_after": info.run_after.isoformat(), "key": run_key(run_id)})
        last = info.data_interval
    print(json.dumps({"timetable": type(timetable).__module__ + "." + type(timetable).__name__,
                      "summary": timetable.summary, "runs": runs}))
    """
)


def test_scheduled_runs_come_from_a_cron_timetable_and_get_their_own_run_folders(airflow: Airflow) -> None:
    # The DAG as serialized by the running DAG processor into the server's database.
    out = subprocess.run([sys.executable, "-c", PROBE, DAG_ID], env=airflow.env, capture_output=True, text=True,
                         timeout=120, cwd=airflow.root)
    assert out.returncode == 0, out.stderr[-3000:]
    probe = json.loads(out.stdout.strip().splitlines()[-1])
    # the weekly cron inside the data-aware schedule (or an update of the source archive)
    assert probe["timetable"] == "airflow.timetables.assets.AssetOrTimeSchedule", probe
    assert probe["summary"] == "Asset or 0 3 * * 1"
    runs = probe["runs"]
    assert [r["run_after"][:19] for r in runs] == [
        "2026-01-05T03:00:00", "2026-01-12T03:00:00", "2026-01-19T03:00:00"]
    assert len({r["run_id"] for r in runs}) == len({r["key"] for r in runs}) == 3, runs
    assert all(r["key"].startswith("scheduled__2026-01-") for r in runs), runs


@pytest.mark.parametrize(("conf", "param", "rule"), [
    ({"steps": -1}, "steps", "less than the minimum of 1"),
    ({"backbone": "resnet9"}, "backbone", "'resnet9' is not one of"),
    ({"image_size": 300}, "image_size", "not a multiple of 128"),
    ({"dataset_sha256": "abc"}, "dataset_sha256", "does not match"),
])
def test_invalid_params_are_refused_by_the_api_naming_the_param(airflow: Airflow, conf: dict, param: str,
                                                               rule: str) -> None:
    before = airflow.api("GET", f"/dags/{DAG_ID}/dagRuns?limit=100")["total_entries"]
    status, body = airflow.request("POST", f"/api/v2/dags/{DAG_ID}/dagRuns",
                                   {"logical_date": None, "conf": {**TINY, **conf}})
    assert status == 400, (status, body)
    detail = body["detail"]
    assert detail.startswith(f"Invalid input for param {param}:"), detail
    assert rule in detail, detail
    assert airflow.api("GET", f"/dags/{DAG_ID}/dagRuns?limit=100")["total_entries"] == before


# --------------------------------------------------------------------------------------------------
# Run A: triggered through the API, scheduler killed mid-run
# --------------------------------------------------------------------------------------------------


def test_run_triggered_through_the_api_succeeds_and_publishes_its_report(airflow: Airflow, run_a: RunA) -> None:
    assert run_a.run["state"] == "success", _states(airflow.task_instances(run_a.run_id))
    tis = airflow.task_instances(run_a.run_id)
    assert {t: ti["state"] for t, ti in tis.items()} == dict.fromkeys(TASKS, "success")
    run_dir = _run_dir(airflow, run_a.run_id)
    assert sorted(p.name for p in run_dir.iterdir() if p.is_dir()) == sorted(STAGE_DIRS)
    report = run_dir / "report" / "report.html"
    assert report.is_file() and "mAP@.50IOU" in report.read_text(encoding="utf-8")
    assert json.loads((run_dir / "train" / "train_summary.json").read_text())["steps"] == TINY["steps"]

    published = airflow.root / "published"
    index = json.loads((published / "runs.json").read_text())
    assert [e["run_id"] for e in index] == [run_dir.name]
    assert (published / run_dir.name / "report.html").read_bytes() == report.read_bytes()
    xcom = airflow.api("GET", f"/dags/{DAG_ID}/dagRuns/{_q(run_a.run_id)}/taskInstances/publish_report/"
                              "xcomEntries/report_url")
    assert xcom["value"] == (published / run_dir.name / "report.html").as_uri()
    # The runs view of the plugin, served by the same API server, lists the run.
    status, body = airflow.request("GET", "/personcar/api/runs")
    assert status == 200 and [r["run_id"] for r in body["runs"]] == [run_dir.name], body


def test_scheduler_killed_mid_task_the_run_finishes_and_no_task_runs_twice(airflow: Airflow, run_a: RunA) -> None:
    assert run_a.kill_task["at_kill"]["state"] == "running"
    assert run_a.run["state"] == "success"
    for task_id in TASKS:
        tries = airflow.tries(run_a.run_id, task_id)
        assert [(t["try_number"], t["state"]) for t in tries] == [(1, "success")], (task_id, tries)
        assert sorted(airflow.task_logs(run_a.run_id, task_id)) == [1], task_id  # one attempt log each
    # The tasks after train were scheduled by the new scheduler.
    tis = airflow.task_instances(run_a.run_id)
    from datetime import datetime

    for task_id in ("evaluate", "publish_report"):
        queued = datetime.fromisoformat(tis[task_id]["queued_when"].replace("Z", "+00:00")).timestamp()
        assert queued > run_a.restarted_at, task_id
    jobs = airflow.api("GET", "/jobs?job_type=SchedulerJob&limit=100")["jobs"]
    assert len(jobs) >= 2, jobs
    # Training ran once, to the end: one "done" line, every step trained in that one attempt.
    events = [e for _, e in _log_events(airflow.task_logs(run_a.run_id, "train")[1])]
    assert sum(e.startswith("train: done") for e in events) == 1, events[-20:]
    summary = json.loads((_run_dir(airflow, run_a.run_id) / "train" / "train_summary.json").read_text())
    assert summary["trained_steps"] == summary["steps"] == TINY["steps"], summary
    run_dir = _run_dir(airflow, run_a.run_id)
    assert _hidden_leftovers(run_dir) == []
    assert [p.name for p in (run_dir / "train").iterdir() if p.name.startswith("exported")] == ["exported"]


# --------------------------------------------------------------------------------------------------
# Run B: a failure mid-pipeline, fixed, cleared and re-run; S3 in and out
# --------------------------------------------------------------------------------------------------


def test_failed_evaluate_cleared_reruns_from_the_trained_model(airflow: Airflow, run_a: RunA, run_b: RunB) -> None:
    af = airflow
    assert run_b.run["state"] == "success", _states(af.task_instances(run_b.run_id))
    assert {t: ti["state"] for t, ti in af.task_instances(run_b.run_id).items()} == dict.fromkeys(TASKS, "success")
    # The first evaluate failed on the missing model with the stage's one-line reason.
    evaluate = af.tries(run_b.run_id, "evaluate")
    assert [t["state"] for t in evaluate][-1] == "success" and len(evaluate) == 2, evaluate
    assert evaluate[0]["state"] in ("failed", "up_for_retry"), evaluate
    assert "is missing: run task 'train' for this run first" in run_b.failed_try_log
    # Nothing before it ran again; train's outputs are the ones it wrote.
    for task_id in ("download_dataset", "validate_annotations", "build_tfrecords", "train"):
        assert [t["try_number"] for t in af.tries(run_b.run_id, task_id)] == [1], task_id
    run_dir = _run_dir(af, run_b.run_id)
    assert _tree(run_dir / "train") == run_b.train_before
    # Downstream results are those of this model and this data.
    metrics = json.loads((run_dir / "evaluate" / "metrics.json").read_text())
    detections = json.loads((run_dir / "evaluate" / "detections.json").read_text())
    gt = json.loads((run_dir / "tfrecords" / "val.coco.json").read_text())
    assert {d["image_id"] for d in detections} <= {im["id"] for im in gt["images"]}
    assert 0.0 <= metrics["DetectionBoxes_Precision/mAP@.50IOU"] <= 1.0
    assert _hidden_leftovers(run_dir) == []
    assert sorted(p.name for p in run_dir.iterdir() if p.is_dir()) == sorted(STAGE_DIRS)
    # Same stage outputs as a run that never failed (run A): nothing extra, nothing missing.
    a_dir = _run_dir(af, run_a.run_id)
    assert sorted(p.name for p in (run_dir / "evaluate").iterdir()) == sorted(
        p.name for p in (a_dir / "evaluate").iterdir())


def test_s3_publish_has_one_entry_per_run_also_after_a_second_publish(airflow: Airflow, run_b: RunB) -> None:
    af = airflow
    key = _run_dir(af, run_b.run_id).name
    metrics = json.loads((_run_dir(af, run_b.run_id) / "evaluate" / "metrics.json").read_text())
    for index in (run_b.index_after_first_publish, run_b.index_after_republish):
        assert [e["run_id"] for e in index] == [key], index
        assert index[0]["metrics"]["mAP@.50IOU"] == pytest.approx(metrics["DetectionBoxes_Precision/mAP@.50IOU"])
    report_files = sorted(p.relative_to(_run_dir(af, run_b.run_id) / "report").as_posix()
                          for p in (_run_dir(af, run_b.run_id) / "report").rglob("*") if p.is_file())
    run_keys = sorted(k.removeprefix(f"published/{key}/") for k in run_b.s3_after_republish
                      if k.startswith(f"published/{key}/"))
    assert run_keys == report_files
    # The second publish wrote the same set of objects with the same contents (S3 ETags).
    assert sorted(run_b.s3_after_republish) == sorted(run_b.s3_after_first_publish)
    assert {k: v for k, v in run_b.s3_after_republish.items() if k.startswith(f"published/{key}/")} == {
        k: v for k, v in run_b.s3_after_first_publish.items() if k.startswith(f"published/{key}/")}
    # Two publishes ran. (Clearing evaluate with its downstream also archived publish_report's
    # never-started try 0: Airflow records it in the history without a start date.)
    tries = af.tries(run_b.run_id, "publish_report")
    assert [(t["try_number"], t["state"]) for t in tries if t["start_date"]] == [(1, "success"), (2, "success")]
    assert all(t["try_number"] in (1, 2) for t in tries if t["start_date"]), tries
    xcom = af.api("GET", f"/dags/{DAG_ID}/dagRuns/{_q(run_b.run_id)}/taskInstances/publish_report/"
                         "xcomEntries/report_url")
    assert xcom["value"] == f"s3://{af.figures['bucket']}/published/{key}/report.html"


def test_two_runs_write_to_separate_run_folders_and_leave_each_other_alone(airflow: Airflow, run_a: RunA,
                                                                           run_b: RunB) -> None:
    a, b = _run_dir(airflow, run_a.run_id), _run_dir(airflow, run_b.run_id)
    assert run_a.run_id != run_b.run_id and a != b and a.parent == b.parent
    assert sorted(p.name for p in a.parent.iterdir()) == sorted([a.name, b.name])
    assert run_a.tree and _tree(a) == run_a.tree  # run B changed nothing of run A's
    # Each published to its own destination: the file index still holds only run A.
    index = json.loads((airflow.root / "published" / "runs.json").read_text())
    assert [e["run_id"] for e in index] == [a.name]


# --------------------------------------------------------------------------------------------------
# Secrets
# --------------------------------------------------------------------------------------------------


def _files_containing(folder: Path, needle: bytes) -> list[str]:
    hits = []
    for path in folder.rglob("*"):
        if path.is_file():
            with path.open("rb") as fh:
                tail = b""
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    if needle in tail + chunk:
                        hits.append(str(path))
                        break
                    tail = chunk[-len(needle):]
    return hits


def test_the_aws_secret_of_the_connection_is_never_written(airflow: Airflow, run_a: RunA, run_b: RunB,
                                                           sentinel: str) -> None:
    af = airflow
    needle = sentinel.encode()
    # The connection was used: run B's dataset came from the S3 endpoint that only the connection
    # names, and its report went back there.
    manifest = json.loads((_run_dir(af, run_b.run_id) / "download" / "download_manifest.json").read_text())
    assert manifest["source"] == _conf_b(af)["dataset_source"] and manifest["images"] == 16
    assert run_b.run["state"] == "success" and run_b.index_after_republish
    # Task logs (every attempt), DAG processor logs, the processes' own output, the metadata DB
    # (rendered fields, XComs, serialized DAGs, task instance history), run folders, published files.
    for folder in (af.home, af.root / "runs", af.root / "published"):
        assert _files_containing(folder, needle) == [], folder
    for name in af.procs:
        assert sentinel not in (af.root / f"{name}.log").read_text(errors="replace"), name
    for obj in _s3_objects(af, ""):
        body = _s3(af).get_object(Bucket=af.figures["bucket"], Key=obj)["Body"].read()
        assert needle not in body, obj
    # The same through the REST API: XComs and rendered templates of every task instance.
    for run_id in (run_a.run_id, run_b.run_id):
        for task_id, ti in af.task_instances(run_id).items():
            assert sentinel not in json.dumps(ti["rendered_fields"]), (run_id, task_id)
            path = f"/dags/{DAG_ID}/dagRuns/{_q(run_id)}/taskInstances/{task_id}/xcomEntries"
            for entry in af.api("GET", path)["xcom_entries"]:
                value = af.api("GET", f"{path}/{_q(entry['key'])}")
                assert sentinel not in json.dumps(value), (run_id, task_id, entry["key"])
            status, body = af.request("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{_q(run_id)}/taskInstances/"
                                             f"{task_id}/logs/1?full_content=true")
            assert status == 200 and sentinel not in json.dumps(body), (run_id, task_id)


# --------------------------------------------------------------------------------------------------
# The Airflow UI in headless Chromium
# --------------------------------------------------------------------------------------------------


ACCORDION = "button[data-scope=accordion][data-part=item-trigger]"
DIALOG = "[data-scope=dialog][data-part=content]"
VIEWPORT = {"width": 1400, "height": 1500}


def _screenshot(page: Any, path: Path) -> Path:
    page.screenshot(path=path, animations="disabled")  # an accordion caught mid-animation is finished
    return path


def _image_is_drawn(path: Path) -> None:
    from PIL import Image

    image = Image.open(path).convert("L")
    assert image.size == (VIEWPORT["width"], VIEWPORT["height"])
    lo, hi = image.getextrema()
    assert hi - lo > 100, (path, lo, hi)  # text on a background, not a blank page


def test_grid_and_trigger_form_render_in_headless_chromium(airflow: Airflow, run_a: RunA, page: Any,
                                                           tmp_path: Path) -> None:
    from playwright.sync_api import expect

    runs_before = airflow.api("GET", f"/dags/{DAG_ID}/dagRuns?limit=100")["total_entries"]
    page.set_viewport_size(VIEWPORT)
    page.goto(f"{airflow.base}/dags/{DAG_ID}")
    page.wait_for_function("document.body && document.body.innerText.includes('publish_report')", timeout=60_000)
    text = page.inner_text("body")
    positions = [text.find(t) for t in TASKS]
    assert -1 not in positions and positions == sorted(positions), positions  # the grid's six rows, in order
    _image_is_drawn(_screenshot(page, tmp_path / "grid.png"))

    # The trigger form: one section per param section, each param with its title and description.
    params = airflow.api("GET", f"/dags/{DAG_ID}/details")["params"]
    page.click('button[aria-label="Trigger Dag"]')
    page.wait_for_function(f"document.querySelectorAll('{ACCORDION}').length >= 3")
    sections: dict[str, list[dict]] = {}
    for name, param in params.items():
        sections.setdefault(param["schema"]["section"], []).append({"name": name, **param})
    assert sorted(sections) == ["Data", "Report", "Training"]
    dialog = page.locator(DIALOG)
    shots = {}
    for section in ("Data", "Training", "Report"):  # one open at a time
        page.locator(ACCORDION, has_text=re.compile(rf"^\s*{section}\s*$")).click()
        expect(dialog).to_contain_text(sections[section][0]["schema"]["title"], timeout=30_000)
        form = dialog.inner_text()
        for param in sections[section]:
            assert param["schema"]["title"] in form, (section, param["name"])
            if param.get("description"):
                assert param["description"] in form, (section, param["name"])
        shots[section] = _screenshot(page, tmp_path / f"trigger-form-{section.lower()}.png")
    assert "Training steps" not in dialog.inner_text()  # the Training section closed when Report opened
    for shot in shots.values():
        _image_is_drawn(shot)
    assert airflow.api("GET", f"/dags/{DAG_ID}/dagRuns?limit=100")["total_entries"] == runs_before
    print(f"screenshots: {tmp_path}")
