"""Airflow UI integration for the ``personcar_detection`` DAG.

* A "Report" extra link on the ``publish_report`` and ``evaluate`` task instances that opens the
  run's published report. The ``publish_report`` task pushes the XCom ``report_url`` (what
  ``tasks.publish.publish`` returns as ``report_url``: an ``s3://``, ``file://`` or ``https://``
  location); ``evaluate`` may push its own, otherwise its link follows ``publish_report``'s for the
  same DAG run. Locations under a publish destination the runs view knows (the configured one, or
  any the DAG published to) open through it (``/personcar/reports/...``, ``/personcar/dest/...``),
  which serves local files and presigns S3 objects; other ``s3://`` locations open in the S3 console.
* The runs view (``/personcar/``, see ``personcar_views``): every published run with mAP,
  mAP@.50IOU and mAP@.75IOU over time, the promoted flag and a link to each report, listed under
  Browse in the Airflow navigation.

Importing this file is cheap (no FastAPI, boto3, TensorFlow or Great Expectations; ``personcar_views``
imports only the standard library until its app is built): every Airflow process loads plugins, and
the view's app is only built when its first request arrives.
"""

from __future__ import annotations

import sys
import threading
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlparse

from airflow.plugins_manager import AirflowPlugin
from airflow.sdk import BaseOperatorLink
from personcar_views import DAG_ID, PUBLISH_TASK, XCOM_KEY, decode_xcom, report_path

if TYPE_CHECKING:
    from airflow.sdk import BaseOperator
    from airflow.sdk.types import TaskInstanceKey

REPORT_TASKS = (PUBLISH_TASK, "evaluate")
URL_PREFIX = "/personcar"


def _in_task_runtime() -> bool:
    """True inside a running task (Task SDK), where XComs go through the supervisor, not the DB."""
    return hasattr(sys.modules.get("airflow.sdk.execution_time.task_runner"), "SUPERVISOR_COMMS")


def _xcom(dag_id: str, run_id: str, task_id: str, map_index: int, key: str) -> Any:
    if _in_task_runtime():
        from airflow.sdk.execution_time.xcom import XCom

        return XCom.get_one(key=key, dag_id=dag_id, task_id=task_id, run_id=run_id, map_index=map_index)
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        row = session.execute(
            XComModel.get_many(key=key, run_id=run_id, dag_ids=dag_id, task_ids=task_id,
                               map_indexes=map_index).with_only_columns(XComModel.value)
        ).first()
    return None if row is None else decode_xcom(row[0])


def _report_location(value: Any) -> str | None:
    """A report URL from an XCom value: a string, or a dict holding ``report_url``."""
    if isinstance(value, dict):
        value = value.get(XCOM_KEY)
    return value.strip() if isinstance(value, str) and value.strip() else None


def _base_path() -> str:
    from airflow.configuration import conf

    return urlparse(conf.get("api", "base_url", fallback="") or "").path.rstrip("/")


def report_href(location: str) -> str:
    """The browser URL for a published report location (``""`` when none can be given)."""
    if location.startswith(("http://", "https://")):
        return location
    try:
        path = report_path(location)
    except Exception:  # an unresolvable location only means no link
        path = None
    if path:
        return f"{_base_path()}{URL_PREFIX}/{path}"
    if location.lower().startswith("s3://"):
        bucket, _, key = location[5:].partition("/")
        return f"https://s3.console.aws.amazon.com/s3/object/{quote(bucket)}?prefix={quote(key)}"
    return ""


class ReportLink(BaseOperatorLink):
    """"Report" on ``personcar_detection``'s ``publish_report`` and ``evaluate`` tasks."""

    name = "Report"

    def get_link(self, operator: BaseOperator, *, ti_key: TaskInstanceKey) -> str:
        if ti_key.dag_id != DAG_ID or ti_key.task_id not in REPORT_TASKS:
            return ""
        candidates = [(ti_key.task_id, ti_key.map_index, XCOM_KEY)]
        if ti_key.task_id == PUBLISH_TASK:
            candidates.append((PUBLISH_TASK, ti_key.map_index, "return_value"))
        else:
            candidates += [(PUBLISH_TASK, -1, XCOM_KEY), (PUBLISH_TASK, -1, "return_value")]
        for task_id, map_index, key in candidates:
            location = _report_location(_xcom(ti_key.dag_id, ti_key.run_id, task_id, map_index, key))
            href = report_href(location) if location else ""
            if href:
                return href
        return ""


class _LazyApp:
    """An ASGI app that builds the runs view's FastAPI app on its first request."""

    def __init__(self) -> None:
        self._app: Any = None
        self._lock = threading.Lock()

    def _get(self) -> Any:
        if self._app is None:
            with self._lock:
                if self._app is None:
                    from personcar_views import build_app

                    self._app = build_app()
        return self._app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        await self._get()(scope, receive, send)


class PersoncarPlugin(AirflowPlugin):
    """Registers the Report link and the runs view."""

    name = "personcar"
    global_operator_extra_links = [ReportLink()]
    fastapi_apps = [{"app": _LazyApp(), "url_prefix": URL_PREFIX, "name": "personcar runs"}]
    external_views = [
        {
            "name": "personcar runs",
            "href": "personcar/",
            "url_route": "personcar",
            "destination": "nav",
            "category": "browse",
        }
    ]
