"""The sweep report: ``OUT/report.html`` (self-contained, as the run report), ``OUT/report.md`` and
``OUT/pr_curves.png`` from the comparison document :func:`tasks.compare.compare_runs` builds.

This module turns the document into plain rows and strings; ``tasks/templates/sweep.{html,md}.j2``
lay them out with the run report's renderer (autoescaped HTML, escaped Markdown).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tasks.report import CSP, render
from tasks.report_plots import is_num, plot_sweep_pr
from tasks.report_sections import image

GENERATOR = '<meta name="generator" content="personcar compare">'
HEADLINE = ("mAP", "mAP@.50IOU", "mAP@.75IOU")


def _f(v: Any, digits: int = 3) -> str:
    return f"{v:.{digits}f}" if is_num(v) and v != -1 else "n/a"


def duration(seconds: Any) -> str:
    if not is_num(seconds):
        return "n/a"
    if seconds < 120:
        return f"{seconds:.1f} s"
    minutes, s = divmod(round(seconds), 60)
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{minutes} min {s:02d} s"


def megabytes(n: Any) -> str:
    return f"{n / 1e6:.1f} MB" if is_num(n) else "n/a"


def millions(n: Any) -> str:
    return f"{n / 1e6:.2f}M" if is_num(n) else "n/a"


def _classes(records: list[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(c for r in records for c in (r.get("per_class") or {})))


def _row(r: dict[str, Any], classes: list[str], recommended: str | None) -> dict[str, Any]:
    m, t, lat = r.get("metrics") or {}, r.get("training") or {}, r.get("latency") or {}
    finished = r["status"] == "finished"
    cells = [str(r.get("rank", "–")), r["name"],
             "finished" if finished else f"failed ({(r.get('failure') or {}).get('stage', '?')})",
             *(_f(m.get(k)) for k in HEADLINE),
             *(_f((r.get("per_class") or {}).get(c, {}).get("AP")) for c in classes),
             duration(t.get("seconds")), _f(t.get("images_per_second"), 2), millions(r.get("parameters")),
             megabytes(r.get("saved_model_bytes")), _f(lat.get("median_ms"), 1), _f(lat.get("p90_ms"), 1)]
    return {"name": r["name"], "cells": cells, "recommended": r["name"] == recommended, "failed": not finished}


def context(doc: dict[str, Any], out: Path) -> dict[str, Any]:
    records, rec = doc["candidates"], doc["recommendation"]
    classes = _classes(records)
    by_rank = sorted(records, key=lambda r: (r.get("rank") is None, r.get("rank") or 0, r["name"]))
    headers = ["rank", "candidate", "status", "mAP", "mAP@.50IOU", "mAP@.75IOU", *(f"{c} AP" for c in classes),
               "training time", "train images/s", "parameters", "SavedModel", "latency / image (ms)", "p90 (ms)"]
    numeric = [h not in ("candidate", "status") for h in headers]
    per_class = [[r["name"], c, *(_f((r.get("per_class") or {}).get(c, {}).get(k)) for k in ("AP", "AP@.50", "AP@.75"))]
                 for r in by_rank if r["status"] == "finished" for c in classes]
    setup = [[r["name"], r.get("model") or "n/a", str(r.get("backbone_depth") or "n/a"),
              f"{r['image_size']} px" if r.get("image_size") else "n/a", r.get("started_from") or "n/a",
              f"{(r.get('training') or {}).get('steps') or 'n/a'}", r["run_dir"]] for r in records]
    curves = {r["name"]: r["pr_curves"] for r in by_rank if isinstance(r.get("pr_curves"), dict)}
    pr = image(out / "pr_curves.png", "Precision/recall at IoU .50 of every candidate, per class") \
        if curves and plot_sweep_pr(curves, out / "pr_curves.png") else None
    mach = doc.get("machine") or {}
    measured = (f"Latency: batch 1, {_latency_images(records)} val images, after a warm-up, all models timed in turns "
                f"in one pass on {mach.get('device', 'CPU')} ({mach.get('cpu') or 'unknown CPU'}, {mach.get('cpus')} "
                f"cores; TensorFlow {mach.get('tensorflow', '?')})." if mach else
                "No latency measured (no exported SavedModel).")
    failed = [{"name": r["name"], "stage": (r.get("failure") or {}).get("stage", "?"),
               "error": (r.get("failure") or {}).get("error", "unknown")} for r in records if r["status"] == "failed"]
    return {"title": doc["title"], "csp": CSP, "recommendation": rec, "headers": headers, "numeric": numeric,
            "rows": [_row(r, classes, rec.get("name")) for r in by_rank], "failed": failed,
            "per_class": per_class, "setup": setup, "pr": pr, "measured": measured, "notes": doc.get("notes") or [],
            "finished": len(records) - len(failed), "total": len(records)}


def _latency_images(records: list[dict[str, Any]]) -> Any:
    return next((r["latency"]["images"] for r in records if isinstance(r.get("latency"), dict)), "n/a")


def write_report(doc: dict[str, Any], out: Path) -> None:
    ctx = context(doc, out)
    (out / "report.html").write_text(render(ctx, "sweep.html.j2"), encoding="utf-8")
    (out / "report.md").write_text(render(ctx, "sweep.md.j2"), encoding="utf-8")
