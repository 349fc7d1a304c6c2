"""The personcar runs view: a small FastAPI app mounted in the Airflow API server at ``/personcar``.

Routes (all behind Airflow's authentication: the UI's session cookie or a bearer token, and read
access to the ``personcar_detection`` DAG's runs):

* ``/personcar/``: the runs page (metrics over time as an inline SVG chart, the promoted flag and
  a link to each report); no JavaScript, no external assets, so it also renders inside the
  Airflow UI's iframe;
* ``/personcar/api/runs``: the runs index and ``latest/`` pointer as JSON;
* ``/personcar/reports/<path>``: a published file: served from disk for ``file://``
  destinations, a redirect to a short-lived presigned URL for ``s3://`` destinations.

Where runs are published: ``PERSONCAR_PUBLISH_DEST``, else the Airflow Variable
``personcar_publish_dest``, else ``<PERSONCAR_ARTIFACT_ROOT or ~/personcar-artifacts>/published``.
S3 is read with the Airflow AWS connection the tasks use (``PERSONCAR_AWS_CONN_ID``, the Variable
``personcar_aws_conn_id``, else ``aws_default``): its credentials and endpoint, else boto3's default
chain. An S3-compatible endpoint may also come from ``PERSONCAR_S3_ENDPOINT_URL``, the Variable
``personcar_s3_endpoint_url`` or boto3's own ``AWS_ENDPOINT_URL_S3``.

This module is imported only when the first request reaches the app: the Airflow processes that
merely load plugins (scheduler, DAG processor, workers) never import FastAPI or boto3 through it.
"""

import html
import math
import os
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

DAG_ID = "personcar_detection"
SERIES = (  # index metric key, label, colour
    ("mAP", "mAP", "#4e79a7"),
    ("mAP@.50IOU", "mAP@.50IOU", "#e15759"),
    ("mAP@.75IOU", "mAP@.75IOU", "#59a14f"),
)


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------


def _variable(key: str) -> str | None:
    """An Airflow Variable, or None when unset or when no metadata database is reachable."""
    try:
        from airflow.models import Variable

        value = Variable.get(key, default_var=None)
    except Exception:  # noqa: BLE001 - a view must not fail because the Variable store is down
        return None
    return str(value).strip() or None if value is not None else None


def publish_dest() -> str:
    """Where runs are published, as ``s3://...`` or an absolute ``file://`` URI."""
    from tasks.publish import normalize_dest

    dest = os.environ.get("PERSONCAR_PUBLISH_DEST") or _variable("personcar_publish_dest")
    if not dest:
        root = os.environ.get("PERSONCAR_ARTIFACT_ROOT") or str(Path("~/personcar-artifacts").expanduser())
        dest = f"{root.rstrip('/')}/published"
    return normalize_dest(dest)


def s3_endpoint_url() -> str | None:
    return os.environ.get("PERSONCAR_S3_ENDPOINT_URL") or _variable("personcar_s3_endpoint_url")


def s3_client() -> Any:
    """boto3 S3 client for the publish destination, with the tasks' AWS connection."""
    from tasks.dag_tasks import connection_s3_client

    conn_id = os.environ.get("PERSONCAR_AWS_CONN_ID") or _variable("personcar_aws_conn_id") or "aws_default"
    return connection_s3_client(conn_id, s3_endpoint_url())


def load_runs() -> tuple[str, list[dict], dict | None, str | None]:
    """(destination, runs index, ``latest/`` pointer, error line or None) for the runs page."""
    from tasks import storage
    from tasks.errors import PersoncarError
    from tasks.publish import load_index, load_pointer

    dest = os.environ.get("PERSONCAR_PUBLISH_DEST") or "?"
    try:
        dest = publish_dest()
        client = s3_client() if storage.is_remote(dest) else None
        return dest, load_index(dest, client=client), load_pointer(dest, client=client), None
    except PersoncarError as exc:
        return dest, [], None, str(exc)


def relative_to_dest(uri: str, dest: str) -> str | None:
    """The part of ``uri`` below the publish destination ``dest``, or None when it is elsewhere."""
    from tasks import storage
    from tasks.publish import normalize_dest

    uri = uri.strip()
    if storage.is_remote(uri) != storage.is_remote(dest):
        return None
    if storage.is_remote(uri):
        base, target = dest.rstrip("/") + "/", uri
    else:
        try:
            target = normalize_dest(uri)
        except Exception:  # noqa: BLE001 - not a location this view can serve
            return None
        base = dest.rstrip("/") + "/"
    if not target.startswith(base):
        return None
    rel = unquote(target[len(base):])
    return rel if _safe(rel) else None


def _safe(rel: str) -> bool:
    parts = rel.split("/")
    return bool(rel) and not rel.startswith("/") and "\\" not in rel and all(p not in ("", ".", "..") for p in parts)


# --------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _fmt(value: Any) -> str:
    v = _num(value)
    return "–" if v is None else f"{v:.4f}"


def _when(entry: dict) -> str:
    text = str(entry.get("published_at") or "")
    try:
        return datetime.fromisoformat(text).strftime("%Y-%m-%d %H:%M")
    except ValueError:
        return text


def _nice_top(vmax: float) -> tuple[float, float]:
    """A round upper bound for the y axis and its tick step."""
    vmax = max(vmax, 0.01) * 1.1
    for step in (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.25):
        if vmax / step <= 6:
            return math.ceil(vmax / step) * step, step
    return math.ceil(vmax / 0.25) * 0.25, 0.25


def render_chart(entries: list[dict], *, width: int = 820, height: int = 280) -> str:
    """An inline SVG line chart of mAP, mAP@.50IOU and mAP@.75IOU per run, oldest to newest."""
    e = html.escape
    left, right, top, bottom = 56, 16, 16, 58
    plot_w, plot_h = width - left - right, height - top - bottom
    values = [_num((r.get("metrics") or {}).get(k)) for r in entries for k, _, _ in SERIES]
    known = [v for v in values if v is not None]
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" id="metrics-chart" role="img" '
           f'viewBox="0 0 {width} {height}" width="100%" style="max-width:{width * 1.4:.0f}px;height:auto" '
           f'aria-label="mAP, mAP@.50IOU and mAP@.75IOU per published run">']
    if not known:
        out.append(f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle" fill="#666">'
                   "no metrics published yet</text></svg>")
        return "".join(out)
    ymax, step = _nice_top(max(known))
    n = len(entries)

    def x(i: int) -> float:
        return left + (plot_w / 2 if n == 1 else plot_w * i / (n - 1))

    def y(v: float) -> float:
        return top + plot_h * (1 - v / ymax)

    ticks = int(round(ymax / step))
    for t in range(ticks + 1):
        v = t * step
        out.append(f'<line x1="{left}" x2="{width - right}" y1="{y(v):.1f}" y2="{y(v):.1f}" '
                   f'stroke="#e3e3e3"/>')
        out.append(f'<text x="{left - 6}" y="{y(v) + 4:.1f}" text-anchor="end" font-size="11" '
                   f'fill="#555">{v:.3g}</text>')
    out.append(f'<line x1="{left}" x2="{left}" y1="{top}" y2="{top + plot_h}" stroke="#999"/>')
    out.append(f'<line x1="{left}" x2="{width - right}" y1="{top + plot_h}" y2="{top + plot_h}" stroke="#999"/>')
    every = max(1, math.ceil(n / 8))
    for i, run in enumerate(entries):
        if i == n - 1 or (i % every == 0 and n - 1 - i >= every):
            anchor = "middle" if n == 1 or 0 < i < n - 1 else ("start" if i == 0 else "end")
            out.append(f'<text x="{x(i):.1f}" y="{top + plot_h + 16}" text-anchor="{anchor}" '
                       f'font-size="10" fill="#555">{e(_when(run)[5:])}</text>')
        if run.get("promoted"):
            out.append(f'<line class="promoted-mark" x1="{x(i):.1f}" x2="{x(i):.1f}" y1="{top}" '
                       f'y2="{top + plot_h}" stroke="#f2b701" stroke-width="6" stroke-opacity="0.25">'
                       f'<title>{e(str(run.get("run_id")))} promoted</title></line>')
    for key, label, colour in SERIES:
        segment: list[str] = []
        segments: list[list[str]] = [segment]
        for i, run in enumerate(entries):
            v = _num((run.get("metrics") or {}).get(key))
            if v is None:
                segment = []
                segments.append(segment)
                continue
            segment.append(f"{x(i):.1f},{y(v):.1f}")
        for seg in segments:
            if len(seg) > 1:
                out.append(f'<polyline class="series" data-metric="{e(key)}" fill="none" '
                           f'stroke="{colour}" stroke-width="2" points="{" ".join(seg)}"/>')
        for i, run in enumerate(entries):
            v = _num((run.get("metrics") or {}).get(key))
            if v is not None:
                out.append(f'<circle cx="{x(i):.1f}" cy="{y(v):.1f}" r="3.5" fill="{colour}">'
                           f'<title>{e(str(run.get("run_id")))}: {e(label)} {v:.4f}</title></circle>')
    lx = left
    for _, label, colour in SERIES:
        out.append(f'<rect x="{lx}" y="{height - 18}" width="14" height="4" fill="{colour}"/>'
                   f'<text x="{lx + 18}" y="{height - 13}" font-size="12" fill="#333">{e(label)}</text>')
        lx += 130
    out.append(f'<rect x="{lx}" y="{height - 22}" width="8" height="12" fill="#f2b701" fill-opacity="0.35"/>'
               f'<text x="{lx + 14}" y="{height - 13}" font-size="12" fill="#333">promoted</text>')
    out.append("</svg>")
    return "".join(out)


_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px;color:#1d1d1f;background:#fff}
h1{font-size:20px;margin:0 0 4px}
.sub{color:#555;margin:0 0 16px}
.card{border:1px solid #ddd;border-radius:8px;padding:12px 16px;margin:0 0 16px;overflow-x:auto}
table{border-collapse:collapse;width:100%}
th,td{text-align:left;padding:6px 10px;border-bottom:1px solid #eee;white-space:nowrap}
th{background:#f6f6f6;font-weight:600}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.badge{display:inline-block;padding:1px 8px;border-radius:10px;font-size:12px}
.yes{background:#e5f5e0;color:#1b5e20}
.no{background:#f1f1f1;color:#666}
.error{border-color:#e57373;background:#fdecea;color:#8a1c1c}
code{font-size:13px}
"""


def render_page(entries: list[dict], *, dest: str, pointer: dict | None = None,
                error: str | None = None) -> str:
    """The runs page. Every value from the index is escaped."""
    e = html.escape
    ordered = sorted(entries, key=lambda r: str(r.get("published_at") or ""))
    rows = []
    for run in reversed(ordered):
        metrics = run.get("metrics") or {}
        report = run.get("report")
        link = (f'<a class="report" href="reports/{e(quote(str(report)))}">report</a>'
                if isinstance(report, str) and _safe(report) else "–")
        promoted = run.get("promoted") is True
        badge = ('<span class="badge yes">promoted</span>' if promoted
                 else '<span class="badge no">no</span>')
        rows.append(
            f'<tr class="run" data-run-id="{e(str(run.get("run_id")))}">'
            f'<td><code>{e(str(run.get("run_id")))}</code></td><td>{e(_when(run))}</td>'
            f'<td class="num">{_fmt(metrics.get("mAP"))}</td>'
            f'<td class="num">{_fmt(metrics.get("mAP@.50IOU"))}</td>'
            f'<td class="num">{_fmt(metrics.get("mAP@.75IOU"))}</td>'
            f"<td>{badge}</td><td>{link}</td></tr>")
    latest = ""
    if pointer and pointer.get("run_id"):
        latest = (f'<p id="latest">Latest promoted run: <code>{e(str(pointer["run_id"]))}</code> '
                  f'(mAP@.50IOU {_fmt((pointer.get("metrics") or {}).get("mAP@.50IOU"))}, '
                  f'promoted {e(str(pointer.get("promoted_at") or ""))})'
                  + (f' &middot; <a href="reports/{e(quote(pointer["report"]))}">latest report</a>'
                     if isinstance(pointer.get("report"), str) and _safe(pointer["report"]) else "")
                  + "</p>")
    body = (f'<div class="card error" id="error">{e(error)}</div>' if error else "")
    if ordered:
        body += (f'<div class="card">{render_chart(ordered)}</div>'
                 '<div class="card"><table id="runs"><thead><tr><th>Run</th><th>Published (UTC)</th>'
                 '<th>mAP</th><th>mAP@.50IOU</th><th>mAP@.75IOU</th><th>Promoted</th><th>Report</th>'
                 f'</tr></thead><tbody>{"".join(rows)}</tbody></table></div>')
    elif not error:
        body += '<div class="card" id="empty">No runs published yet.</div>'
    return (
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"<title>personcar runs</title><style>{_CSS}</style></head><body>"
        "<h1>personcar detection runs</h1>"
        f'<p class="sub">{len(ordered)} published run(s) from <code>{e(dest)}</code></p>'
        f"{latest}{body}</body></html>"
    )


# --------------------------------------------------------------------------------------------------
# The app
# --------------------------------------------------------------------------------------------------


def build_app() -> Any:
    """The FastAPI app mounted at ``/personcar``.

    (This module does not use postponed annotations: FastAPI reads the route functions'
    annotations, such as ``Request``, which are imported here rather than at module level.)
    """
    from fastapi import Depends, FastAPI, HTTPException, Request
    from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse

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
        from starlette.concurrency import run_in_threadpool

        dest, entries, pointer, error = await run_in_threadpool(load_runs)
        return HTMLResponse(render_page(entries, dest=dest, pointer=pointer, error=error),
                            status_code=502 if error else 200,
                            headers={"Cache-Control": "no-store"})

    @app.get("/api/runs", dependencies=[Depends(require_access)])
    def runs_json() -> Any:
        dest, entries, pointer, error = load_runs()
        if error:
            return JSONResponse({"dest": dest, "error": error}, status_code=502)
        return {"dest": dest, "runs": entries, "latest": pointer}

    @app.get("/reports/{path:path}", dependencies=[Depends(require_access)])
    def report_file(path: str) -> Any:
        from tasks import storage

        if not _safe(path):
            raise HTTPException(status_code=404, detail="not found")
        dest = publish_dest()
        if storage.is_remote(dest):
            url = storage.presigned_url(storage.join_uri(dest, path), client=s3_client(), expires_in=900)
            return RedirectResponse(url, status_code=307)
        root = storage.local_path(dest).resolve()
        target = (root / path).resolve()
        if not target.is_relative_to(root) or not target.is_file() or target.name.startswith("."):
            raise HTTPException(status_code=404, detail="not found")
        return FileResponse(target, media_type=storage.content_type(target))

    return app
