"""The personcar runs view: a FastAPI app mounted in the Airflow API server at ``/personcar``.

Routes, behind Airflow's authentication (the UI's cookie or a bearer token, read access to the
``personcar_detection`` DAG's runs): ``/`` the runs page (``templates/runs.html.j2``: an inline SVG
chart of the metrics over time, the promoted flag, a link to each report; no JavaScript, no external
asset, so it renders inside the UI's iframe); ``/api/runs`` the same as JSON; ``/reports/<path>``
(the configured destination) and ``/dest/<id>/<path>`` (another one): a file of an indexed run
folder or of ``latest/``, from disk, or as a redirect to a presigned URL on S3.

Runs are read from the configured destination (``PERSONCAR_PUBLISH_DEST``, the Variable
``personcar_publish_dest``, else ``<artifact root>/published``) and from every destination the DAG's
``publish_report`` task published to: its ``report_url`` XComs in the metadata database the UI shows
the runs from, so a run whose ``publish_dest`` pointed elsewhere (``make demo``'s ``.demo/published``)
is listed with no setting to keep in step. S3 is read with the tasks' Airflow AWS connection
(``PERSONCAR_AWS_CONN_ID``, the Variable ``personcar_aws_conn_id``, else ``aws_default``).

Its top level imports only the standard library, so the plugin shares its names and helpers at no
cost: FastAPI, boto3 and ``tasks`` are imported when the first request builds the app, and the
processes that merely load plugins (scheduler, DAG processor, workers) never import them.
"""

import contextlib
import hashlib
import json
import math
import os
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

DAG_ID = "personcar_detection"
PUBLISH_TASK = "publish_report"
SWEEP_DAG_ID, SWEEP_PUBLISH_TASK = "personcar_backbone_sweep", "publish_sweep"
XCOM_KEY = "report_url"
SERIES = (("mAP", "#4e79a7"), ("mAP@.50IOU", "#e15759"), ("mAP@.75IOU", "#59a14f"))  # index key, colour


# --------------------------------------------------------------------------------------------------
# Where runs are published
# --------------------------------------------------------------------------------------------------


def _variable(key: str) -> str | None:
    """An Airflow Variable, or None when unset or when no metadata database is reachable."""
    try:
        from airflow.models import Variable

        # the view runs in the API server, beside the metadata DB (airflow.sdk's Variable is for tasks)
        value = Variable.get(key, default_var=None)  # noqa: AIR311
    except Exception:  # a view must not fail because the Variable store is down
        return None
    return str(value).strip() or None if value is not None else None


def publish_dest() -> str:
    """The configured destination, as ``s3://...`` or an absolute ``file://`` URI."""
    from tasks.publish import normalize_dest

    dest = os.environ.get("PERSONCAR_PUBLISH_DEST") or _variable("personcar_publish_dest")
    if not dest:
        root = os.environ.get("PERSONCAR_ARTIFACT_ROOT") or str(Path("~/personcar-artifacts").expanduser())
        dest = f"{root.rstrip('/')}/published"
    return normalize_dest(dest)


def storage_where() -> dict[str, Any]:
    """How the view reaches S3 (tasks.storage): the tasks' AWS connection, else the endpoint setting."""
    conn_id = os.environ.get("PERSONCAR_AWS_CONN_ID") or _variable("personcar_aws_conn_id") or "aws_default"
    endpoint = os.environ.get("PERSONCAR_S3_ENDPOINT_URL") or _variable("personcar_s3_endpoint_url")
    return {"conn_id": conn_id, "endpoint_url": endpoint}


def decode_xcom(value: Any) -> Any:
    """An XCom value as the task pushed it (the metadata DB may hold it JSON-encoded)."""
    if isinstance(value, str | bytes):
        with contextlib.suppress(ValueError):
            return json.loads(value)
    return value


def published_dests(limit: int = 500) -> list[str]:
    """Destinations of the DAG's recent ``report_url`` XComs, newest first; [] without a metadata DB."""
    from tasks.publish import normalize_dest

    try:
        from airflow.models.xcom import XComModel
        from airflow.utils.session import create_session
        from sqlalchemy import select

        with create_session() as session:
            values = session.scalars(select(XComModel.value).where(
                XComModel.dag_id.in_([DAG_ID, SWEEP_DAG_ID]), XComModel.task_id.in_([PUBLISH_TASK, SWEEP_PUBLISH_TASK]),
                XComModel.key == XCOM_KEY,
            ).order_by(XComModel.timestamp.desc()).limit(limit)).all()
    except Exception:  # no metadata database here (a CLI, a unit test): only the configured destination
        return []
    out: list[str] = []
    for url in map(decode_xcom, values):
        with contextlib.suppress(Exception):  # not a location this view can read
            base = url.strip().rsplit("/", 2)[0]  # <dest>/<run id>/report.html or <dest>/sweeps/<id>/report.html
            dest = normalize_dest(base[: -len("/sweeps")] if base.endswith("/sweeps") else base)
            out += [dest] if url.count("/") >= 4 and dest not in out else []
    return out


def known_dests() -> list[str]:
    """The configured destination first, then every other one the DAG published to."""
    main = publish_dest()
    return [main, *(d for d in published_dests() if d != main)]


def dest_id(dest: str) -> str:
    return hashlib.sha256(dest.encode()).hexdigest()[:12]


def relative_to_dest(uri: str, dest: str) -> str | None:
    """The part of ``uri`` below the publish destination ``dest``, or None when it is elsewhere."""
    from tasks import storage
    from tasks.publish import normalize_dest

    uri = uri.strip()
    if storage.is_remote(uri) != storage.is_remote(dest):
        return None
    try:
        target = uri if storage.is_remote(uri) else normalize_dest(uri)
    except Exception:  # not a location this view can serve
        return None
    base = dest.rstrip("/") + "/"
    rel = unquote(target[len(base):]) if target.startswith(base) else ""
    return rel if safe_path(rel) else None


def report_path(location: str) -> str | None:
    """The view's path (below ``/personcar/``) for a published file, or None when no destination holds it."""
    for i, dest in enumerate(known_dests()):
        rel = relative_to_dest(location, dest)
        if rel:
            return f"reports/{quote(rel)}" if i == 0 else f"dest/{dest_id(dest)}/{quote(rel)}"
    return None


def safe_path(rel: str) -> bool:
    parts = rel.split("/")
    return bool(rel) and not rel.startswith("/") and "\\" not in rel and all(p not in ("", ".", "..") for p in parts)


def load_runs() -> list[dict[str, Any]]:
    """Per destination (the configured one always, others while they hold runs or sweeps):
    ``{"dest", "id", "href", "runs", "latest", "sweeps", "error"}``."""
    from tasks import storage
    from tasks.errors import PersoncarError
    from tasks.publish import load_index, load_pointer
    from tasks.sweep_publish import load_sweeps

    try:
        dests = known_dests()
    except PersoncarError as exc:
        return [{"dest": os.environ.get("PERSONCAR_PUBLISH_DEST") or "?", "id": "", "href": "reports/",
                 "runs": [], "latest": None, "sweeps": [], "error": str(exc)}]
    out = []
    for i, dest in enumerate(dests):
        group = {"dest": dest, "id": dest_id(dest), "href": "reports/" if i == 0 else f"dest/{dest_id(dest)}/",
                 "runs": [], "latest": None, "sweeps": [], "error": None}
        try:
            where = storage_where() if storage.is_remote(dest) else {}
            group["runs"] = load_index(dest, **where)
            group["latest"] = load_pointer(dest, **where)
            group["sweeps"] = load_sweeps(dest, **where)
        except PersoncarError as exc:
            group["error"] = str(exc)
        if i == 0 or group["runs"] or group["sweeps"]:
            out.append(group)
    return out


# --------------------------------------------------------------------------------------------------
# The page
# --------------------------------------------------------------------------------------------------


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _when(entry: dict) -> str:
    text = str(entry.get("published_at") or "")
    try:
        return datetime.fromisoformat(text).strftime("%Y-%m-%d %H:%M")
    except ValueError:
        return text


def _nice_top(vmax: float) -> tuple[float, float]:
    """A round upper bound for the y axis and its tick step."""
    vmax = max(vmax, 0.01) * 1.1
    step = next((s for s in (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2) if vmax / s <= 6), 0.25)
    return math.ceil(vmax / step) * step, step


def chart(entries: list[dict], *, width: int = 820, height: int = 280) -> dict[str, Any]:
    """The geometry of the metrics-over-time chart (oldest to newest) for the template."""
    left, right, top, bottom = 56, 16, 16, 58
    plot_w, plot_h = width - left - right, height - top - bottom
    known = [v for r in entries for k, _ in SERIES if (v := _num((r.get("metrics") or {}).get(k))) is not None]
    out: dict[str, Any] = {"width": width, "height": height, "left": left, "right": width - right, "top": top,
                           "bottom": top + plot_h, "empty": not known}
    if not known:
        return out
    ymax, step = _nice_top(max(known))
    n = len(entries)

    def x(i: int) -> float:
        return round(left + (plot_w / 2 if n == 1 else plot_w * i / (n - 1)), 1)

    def y(v: float) -> float:
        return round(top + plot_h * (1 - v / ymax), 1)

    every = max(1, math.ceil(n / 8))
    out["ticks"] = [(y(t * step), f"{t * step:.3g}") for t in range(int(round(ymax / step)) + 1)]
    out["dates"] = [(x(i), "middle" if n == 1 or 0 < i < n - 1 else "start" if i == 0 else "end", _when(r)[5:])
                    for i, r in enumerate(entries) if i == n - 1 or (i % every == 0 and n - 1 - i >= every)]
    out["promoted"] = [(x(i), str(r.get("run_id"))) for i, r in enumerate(entries) if r.get("promoted") is True]
    out["series"] = []
    for key, colour in SERIES:
        values = [_num((r.get("metrics") or {}).get(key)) for r in entries]
        segments, current = [], []
        for i, v in enumerate(values):
            if v is None:
                segments, current = segments + [current], []
            else:
                current.append(f"{x(i)},{y(v)}")
        lines = [" ".join(s) for s in [*segments, current] if len(s) > 1]
        points = [(x(i), y(v), f"{entries[i].get('run_id')}: {key} {v:.4f}") for i, v in enumerate(values)
                  if v is not None]
        out["series"].append({"key": key, "colour": colour, "lines": lines, "points": points})
    return out


def render_page(groups: list[dict[str, Any]]) -> str:
    """The runs page; every value from an index is escaped by the template."""
    from jinja2 import Environment, FileSystemLoader, StrictUndefined

    env = Environment(loader=FileSystemLoader(Path(__file__).with_name("templates")), autoescape=True,
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    shown = []
    for g in [g for g in groups if g["runs"] or g.get("sweeps") or g["error"]] or groups[:1]:  # empty only alone
        runs = sorted(g["runs"], key=lambda r: str(r.get("published_at") or ""))
        rows = [{"id": str(r.get("run_id")), "when": _when(r), "promoted": r.get("promoted") is True,
                 "metrics": [_num((r.get("metrics") or {}).get(k)) for k, _ in SERIES],
                 "report": quote(r["report"]) if isinstance(r.get("report"), str) and safe_path(r["report"]) else None}
                for r in reversed(runs)]
        latest = g["latest"] if isinstance(g["latest"], dict) and g["latest"].get("run_id") else None
        shown.append({**g, "rows": rows, "chart": chart(runs) if runs else None, "latest": latest and {
            "run_id": str(latest["run_id"]), "promoted_at": str(latest.get("promoted_at") or ""),
            "map50": _num((latest.get("metrics") or {}).get("mAP@.50IOU")),
            "report": quote(latest["report"]) if isinstance(latest.get("report"), str)
            and safe_path(latest["report"]) else None}, "sweep_rows": sweep_rows(g.get("sweeps") or [])})
    return env.get_template("runs.html.j2").render(groups=shown, series=SERIES,
                                                   total=sum(len(g["rows"]) for g in shown))


# --------------------------------------------------------------------------------------------------
# The app
# --------------------------------------------------------------------------------------------------


def sweep_rows(entries: list[dict]) -> list[dict[str, Any]]:
    """The sweeps of a destination, newest first, for the page."""
    rows = []
    for e in sorted(entries, key=lambda e: str(e.get("published_at") or ""), reverse=True):
        cands = [c for c in e.get("candidates") or [] if isinstance(c, dict)]
        best = next((c for c in cands if c.get("name") == e.get("recommended")), {})
        rows.append({"id": str(e.get("sweep_id")), "when": _when(e), "recommended": e.get("recommended"),
                     "reason": str(e.get("reason") or ""), "map50": _num(best.get("mAP@.50IOU")),
                     "candidates": ", ".join(f"{c.get('name')}" + ("" if c.get("status") == "finished" else " (failed)")
                                             for c in cands),
                     "failed": len([c for c in cands if c.get("status") != "finished"]),
                     "winner_run": e.get("winner_run"), "winner_promoted": e.get("winner_promoted") is True,
                     "report": quote(e["report"]) if isinstance(e.get("report"), str) and safe_path(e["report"])
                     else None})
    return rows


def serve(dest: str, path: str, where_factory: Any = storage_where) -> Any:
    """A file of an indexed run folder, sweep folder or of ``latest/`` under ``dest``: a file or a
    presigned redirect."""
    from fastapi import HTTPException
    from fastapi.responses import FileResponse, RedirectResponse

    from tasks import storage
    from tasks.errors import PersoncarError
    from tasks.publish import LATEST_DIR, SWEEPS_DIR, load_index
    from tasks.sweep_publish import load_sweeps

    remote = storage.is_remote(dest)
    try:
        where = where_factory() if remote else {}
        runs = {str(e.get("run_id")) for e in load_index(dest, **where)}
        if path.startswith(f"{SWEEPS_DIR}/"):  # sweeps/<sweep id>/<file> of a sweep the index lists
            parts, listed = path.split("/"), {str(e.get("sweep_id")) for e in load_sweeps(dest, **where)}
            runs = {SWEEPS_DIR} if len(parts) >= 3 and parts[1] in listed else set()
    except PersoncarError as exc:
        raise HTTPException(status_code=502, detail=str(exc)) from exc
    if not safe_path(path) or path.split("/", 1)[0] not in runs | {LATEST_DIR} or "/" not in path:
        raise HTTPException(status_code=404, detail="not found")
    if remote:
        url = storage.presigned_url(storage.join_uri(dest, path), expires_in=900, **where)
        return RedirectResponse(url, status_code=307)
    root = storage.local_path(dest).resolve()
    target = (root / path).resolve()
    if not target.is_relative_to(root) or not target.is_file() or target.name.startswith("."):
        raise HTTPException(status_code=404, detail="not found")
    return FileResponse(target, media_type=storage.content_type(target))


def build_app() -> Any:
    """The FastAPI app mounted at ``/personcar``.

    (This module does not use postponed annotations: FastAPI reads the route functions'
    annotations, such as ``Request``, which are imported here rather than at module level.)
    """
    from fastapi import Depends, FastAPI, HTTPException, Request
    from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
    from starlette.concurrency import run_in_threadpool

    async def require_access(request: Request) -> None:
        """Airflow's identity (bearer token or the UI's cookie) with read access to the DAG's runs."""
        from airflow.api_fastapi.app import get_auth_manager
        from airflow.api_fastapi.auth.managers.base_auth_manager import COOKIE_NAME_JWT_TOKEN
        from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity, DagDetails
        from airflow.api_fastapi.core_api.security import resolve_user_from_token

        header = request.headers.get("authorization", "")
        token = header[7:].strip() if header.lower().startswith("bearer ") else None
        user = await resolve_user_from_token(token or request.cookies.get(COOKIE_NAME_JWT_TOKEN))
        allowed = get_auth_manager().is_authorized_dag(
            method="GET", access_entity=DagAccessEntity.RUN, details=DagDetails(id=DAG_ID), user=user)
        if not allowed:
            raise HTTPException(status_code=403, detail=f"no read access to the runs of {DAG_ID}")

    app = FastAPI(title="personcar runs", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/", response_class=HTMLResponse)
    async def runs_page(request: Request) -> Any:
        try:
            await require_access(request)
        except HTTPException as exc:
            if exc.status_code != 401:
                raise
            from airflow.api_fastapi.app import get_auth_manager

            return RedirectResponse(get_auth_manager().get_url_login(next_url=str(request.url)), 307)
        groups = await run_in_threadpool(load_runs)
        return HTMLResponse(render_page(groups), status_code=502 if groups[0]["error"] else 200,
                            headers={"Cache-Control": "no-store"})

    @app.get("/api/runs", dependencies=[Depends(require_access)])
    def runs_json() -> Any:
        groups = load_runs()
        main = groups[0]
        body = {"dest": main["dest"], "runs": main["runs"], "latest": main["latest"], "sweeps": main["sweeps"],
                "destinations": [{k: g[k] for k in ("dest", "id", "runs", "latest", "sweeps", "error")}
                                 for g in groups]}
        if main["error"]:
            return JSONResponse({**body, "error": main["error"]}, status_code=502)
        return body

    @app.get("/reports/{path:path}", dependencies=[Depends(require_access)])
    def report_file(path: str) -> Any:
        return serve(publish_dest(), path)

    @app.get("/dest/{ident}/{path:path}", dependencies=[Depends(require_access)])
    def dest_file(ident: str, path: str) -> Any:
        dest = next((d for d in known_dests() if dest_id(d) == ident), None)
        if dest is None:
            raise HTTPException(status_code=404, detail="not found")
        return serve(dest, path)

    return app
