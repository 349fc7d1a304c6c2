"""The metrics report of a run: ``personcar report --run-dir DIR --out DIR``.

Reads a run folder (every part optional except ``evaluate/metrics.json``)::

    RUN/config.json                       run parameters
    RUN/download/download_manifest.json   source, sha256, size, image count
    RUN/validate/validation.json          validation outcome (+ RUN/validate/data_docs/index.html)
    RUN/validate/anchor_coverage.json     share of boxes the anchors can match
    RUN/tfrecords/manifest.json           split counts
    RUN/tfrecords/val.coco.json           val ground truth (for the sample detections)
    RUN/download/trainval/images/         the images (for the sample detections)
    RUN/train/**/events.out.tfevents.*    TensorBoard scalars (loss curves)
    RUN/train/train_summary.json          steps, seconds, images/s, final losses, start, exported step
    RUN/train/validation.json             validation during training (the curve, the best step)
    RUN/evaluate/metrics.json, pr_curves.json, error_analysis.json, detections.json

and writes ``OUT/report.html`` (self-contained: inline CSS, plots as PNG data URIs, a
Content-Security-Policy, no script, no external request), ``OUT/report.md`` (plots beside it),
``OUT/metrics.json`` (a copy), the PNG plots and a copy of the Data Docs. This module gathers the
facts into a plain context (strings, numbers, lists); ``tasks/templates/report.{html,md}.j2`` lay
it out, the HTML autoescaped and the Markdown through an escaping ``finalize``, so every string
from the data is escaped in both. A missing part is shown as "not available"; a rebuild from the
same run folder gives byte-identical files.
"""

from __future__ import annotations

import html
import json
import shutil
from pathlib import Path
from typing import Any

from tasks.artifacts import StageOutputs, atomic_dir, check_output_dir
from tasks.evaluate import CLASS_METRICS, PER_CLASS_PREFIX, SHORT_METRICS, load_metrics, split_per_class_key
from tasks.logs import log
from tasks.report_plots import MAP, MAP50, MAP75, is_num, plot_pr_curves, read_scalars
from tasks.report_sections import (coverage, dataset, delta, errors, fmt, image, parameters, samples, table,
                                   training, validation)

__all__ = ["BASELINE", "MAP", "MAP50", "MAP75", "build_report", "read_scalars"]

GENERATOR = '<meta name="generator" content="personcar report">'
OUTPUTS = StageOutputs("report", "report.html", text=GENERATOR,
                       names=("report.html", "report.md", "metrics.json", "loss_curves.png", "pr_curves.png",
                              "sample_detections.png", "validation_curve.png", "data_docs"))
#: The seed's published result (SSD ResNet152 V1, TF OD API, 10k steps).
BASELINE: dict[str, float] = {MAP50: 0.038, MAP75: 0.0042}
BASELINE_ABOUT = "SSD ResNet152 V1 FPN, TF OD API, 10k steps"
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"
HEADLINE = (("mAP@.50IOU", MAP50), ("mAP@.75IOU", MAP75), ("mAP@[.50:.95]", MAP),
            ("AR@100", "DetectionBoxes_Recall/AR@100"))


def _read_json(path: Path, notes: list[str]) -> Any | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        notes.append(f"{path.name} is unreadable ({e.__class__.__name__}); its section is shown as not available.")
        log.warning("%s: unreadable, shown as not available: %s", path, e)
        return None


def _md_escape(value: Any) -> Any:
    """Every value printed in the Markdown template: no raw HTML, no table-cell breaks, one line."""
    from markupsafe import Markup

    if hasattr(value, "__html__"):
        return value
    s = html.escape("" if value is None else str(value), quote=False).replace("|", "\\|").replace("`", "\\`")
    return Markup(" ".join(s.split()))


def render(ctx: dict[str, Any], name: str) -> str:
    from jinja2 import Environment, FileSystemLoader, StrictUndefined

    env = Environment(loader=FileSystemLoader(Path(__file__).with_name("templates")), autoescape=True,
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
                      finalize=_md_escape if name.endswith(".md.j2") else None)
    return env.get_template(name).render(**ctx)


# --------------------------------------------------------------------------- the top: should we ship it?


def _previous_metrics(previous: dict[str, Any] | None) -> dict[str, Any] | None:
    """The compared run's metrics under the OD API names, from an index entry or a flat metrics dict."""
    if not previous:
        return None
    raw = previous.get("metrics") if isinstance(previous.get("metrics"), dict) else previous
    out = {SHORT_METRICS.get(k, k): v for k, v in raw.items() if is_num(v)}
    for name, values in (previous.get("per_class") or {}).items():
        out.update({f"{PER_CLASS_PREFIX}{k}/{name}": v for k, v in (values or {}).items() if is_num(v)})
    return out


def _num3(v: Any) -> str:
    return f"{v:.3f}" if is_num(v) else "n/a"


def decision(gate: dict[str, Any] | None) -> dict[str, str]:
    """The quality gate's verdict in words."""
    if not isinstance(gate, dict) or "promoted" not in gate:
        return {"state": "none", "word": "No quality gate decision", "text": "the report was built outside a publish."}
    promoted, value, base = bool(gate["promoted"]), gate.get("value"), gate.get("baseline_value")
    name = str(gate.get("metric") or MAP50).split("/")[-1]
    run, margin = gate.get("baseline_run_id"), gate.get("margin")
    word = "Promoted" if promoted else "Not promoted"
    if not is_num(value):
        text = str(gate.get("reason") or "") or f"the run has no {name}"
    elif run and is_num(base):
        diff, m = value - base, margin if is_num(margin) else 0.0
        digits = 3 if round(abs(diff), 3) != round(m, 3) else 4
        vs = f"{name} {_num3(value)} {{}} the promoted run {run} ({_num3(base)})"
        if promoted:
            text = vs.format("beats") + f" by {abs(diff):.{digits}f}, more than the margin {m:.3f}"
        elif diff > 0:
            text = vs.format("beats") + f" by only {diff:.{digits}f}, not more than the margin {m:.3f}"
        else:
            text = vs.format("is below" if diff < 0 else "equals") + (f" by {-diff:.3f}" if diff < 0 else "")
    else:
        text = (f"the first run to pass the gate: {name} {_num3(value)} is above 0" if promoted
                else f"{name} {_num3(value)} is not above 0, which a first promoted run must be")
    return {"state": "promoted" if promoted else "held", "word": word, "text": f"{text}."}


def _headline(metrics: dict, prev: dict | None, prev_label: str, baseline: dict) -> tuple[dict, dict | None]:
    compare = prev is not None
    heads = ["metric", "this run"] + ([prev_label, "change"] if compare else []) + ["seed baseline"]
    rows = [[name, metrics.get(key)] + ([prev.get(key), delta(metrics.get(key), prev.get(key), 3)] if compare else [])
            + [baseline.get(key)] for name, key in HEADLINE if key in metrics]
    classes = list(dict.fromkeys(parts[1] for parts in map(split_per_class_key, metrics) if parts))  # label map order
    class_rows = []
    for name in classes:
        for i, (short, key) in enumerate(CLASS_METRICS.items()):
            full = f"{PER_CLASS_PREFIX}{key}/{name}"
            v = metrics.get(full)
            class_rows.append([name if i == 0 else "", short, v] + ([prev.get(full), delta(v, prev.get(full), 3)]
                                                                     if compare else []))
    numeric = set(range(1, len(heads)))
    per_class = table(["class", "metric", "this run"] + ([prev_label, "change"] if compare else []), class_rows,
                      set(range(2, 5)), 3) if class_rows else None
    return table(heads, rows, numeric, 3), per_class


def _warnings(validation: Any, coverage: Any, missing: list[str]) -> list[str]:
    out = []
    if isinstance(validation, dict):
        if not validation.get("success"):
            out.append("Validation failed: this dataset did not pass its checks (see Validation).")
        w = len(validation.get("warnings") or [])
        if w:
            out.append(f"Validation noted {w} warning{'s' if w > 1 else ''} about the data (see Validation).")
        n = len(validation.get("quarantined_annotation_ids") or [])
        if n:
            out.append(f"{n:,} annotation{'s were' if n > 1 else ' was'} quarantined by validation and left out of "
                       "training.")
    if isinstance(coverage, dict) and coverage.get("warning"):
        w = str(coverage["warning"])
        out.append(f"Anchor coverage: {w[:1].upper() + w[1:]}.")
    if missing:
        out.append(f"Not available in this run folder: {', '.join(m.replace('_', ' ') for m in missing)}.")
    return out




# --------------------------------------------------------------------------- the report


def _sweep_origin(config: dict[str, Any]) -> dict[str, str] | None:
    """For a backbone sweep's recommended candidate published as a run: the sweep, its candidate and
    the sweep report beside it in the publish destination (``<dest>/sweeps/<sweep>/report.html``)."""
    sweep = config.get("sweep")
    if not (isinstance(sweep, dict) and sweep.get("run") and sweep.get("candidate")):
        return None
    return {"run": str(sweep["run"]), "candidate": str(sweep["candidate"]),
            "report": f"../sweeps/{sweep['run']}/report.html"}


def build_report(run_dir: str | Path, out: str | Path, *, previous: dict | None = None,
                 baseline: dict | None = None, title: str | None = None,
                 gate: dict | None = None) -> dict[str, Any]:
    """Write OUT/report.html, OUT/report.md, OUT/metrics.json and the PNG plots for a run folder.

    ``previous``: the run to compare with, the last promoted one (its index entry ``{"run_id",
    "metrics", "per_class"}`` with the index's short names, or flat metrics under the OD API names);
    ``baseline``: reference metrics (default :data:`BASELINE`, the seed's result);
    ``gate``: the quality gate's verdict (:func:`tasks.publish.gate_verdict`, at least ``promoted``).
    Returns ``{"out", "html", "markdown", "files", "metrics", "promoted", "not_available"}``
    (``metrics``: mAP, mAP@.50IOU, mAP@.75IOU; ``not_available``: the parts the run folder lacked).
    """
    run_dir, out = Path(run_dir), Path(out)
    check_output_dir(out, OUTPUTS)
    metrics_path = run_dir / "evaluate" / "metrics.json"
    metrics = load_metrics(metrics_path)
    notes: list[str] = []
    missing: list[str] = []
    read = {name: _read_json(run_dir / name, notes) for name in (
        "config.json", "download/download_manifest.json", "validate/validation.json", "validate/anchor_coverage.json",
        "tfrecords/manifest.json", "tfrecords/val.coco.json", "train/train_summary.json", "train/validation.json",
        "evaluate/pr_curves.json", "evaluate/error_analysis.json", "evaluate/detections.json")}
    config = read["config.json"] if isinstance(read["config.json"], dict) else {}
    if gate is None and isinstance(config.get("gate"), dict) and "promoted" in config["gate"]:
        gate = config["gate"]
    prev = _previous_metrics(previous)
    prev_run = previous.get("run_id") if prev else None
    prev_label = "promoted run" if prev_run else "previous run"
    title = title or f"personcar run {config.get('run_id') or run_dir.resolve().name}"
    data_docs = run_dir / "validate" / "data_docs" / "index.html"
    log.info("building the report of %s into %s", run_dir, out)

    with atomic_dir(out, OUTPUTS) as tmp:
        shutil.copyfile(metrics_path, tmp / "metrics.json")
        if data_docs.is_file():  # the Data Docs travel with the report: the link works on S3 and from disk
            shutil.copytree(data_docs.parent, tmp / "data_docs")
        if not config:
            missing.append("config")
        ctx: dict[str, Any] = {
            "title": title, "run_folder": run_dir.resolve().name, "csp": CSP, "decision": decision(gate),
            "sweep": _sweep_origin(config),
            "parameters": parameters(config, read["train/train_summary.json"]) if config else None,
            **dataset(read["download/download_manifest.json"], read["tfrecords/manifest.json"], missing),
            "validation": validation(read["validate/validation.json"], missing),
            "data_docs": "data_docs/index.html" if data_docs.is_file() else None,
            "coverage": coverage(read["validate/anchor_coverage.json"]),
            "training": training(run_dir, tmp, read["train/train_summary.json"], read["train/validation.json"],
                                 notes, missing),
            "metrics": _metrics_table(metrics, dict(BASELINE if baseline is None else baseline), prev, prev_label),
            "pr": _pr_plot(read["evaluate/pr_curves.json"], tmp, missing),
            "samples": samples(read["tfrecords/val.coco.json"], read["evaluate/detections.json"],
                               run_dir / "download" / "trainval" / "images", tmp, missing),
            "errors": errors(read["evaluate/error_analysis.json"], missing),
            "notes": notes, "compared": prev is not None, "compared_run": prev_run, "baseline_about": BASELINE_ABOUT,
        }
        ctx["headline"], ctx["per_class"] = _headline(metrics, prev, prev_label,
                                                      dict(BASELINE if baseline is None else baseline))
        ctx["warnings"] = _warnings(read["validate/validation.json"], read["validate/anchor_coverage.json"], missing)
        (tmp / "report.html").write_text(render(ctx, "report.html.j2"), encoding="utf-8")
        (tmp / "report.md").write_text(render(ctx, "report.md.j2"), encoding="utf-8")
        written = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())

    promoted = bool(gate["promoted"]) if isinstance(gate, dict) and "promoted" in gate else None
    log.info("report written: %s (mAP@.50IOU %s; %s)", out / "report.html", fmt(metrics.get(MAP50)),
             f"sections not available: {', '.join(missing)}" if missing else "all sections present")
    return {"out": str(out), "html": str(out / "report.html"), "markdown": str(out / "report.md"),
            "files": {name: str(out / name) for name in written},
            "metrics": {"mAP": metrics.get(MAP), "mAP@.50IOU": metrics.get(MAP50), "mAP@.75IOU": metrics.get(MAP75)},
            "promoted": promoted, "not_available": missing}


def _metrics_table(metrics: dict, baseline: dict, prev: dict | None, prev_label: str) -> dict:
    heads = ["metric", "this run", "seed baseline", "vs seed"] + ([prev_label, "vs " + prev_label] if prev else [])
    rows = [[k, v, baseline.get(k, ""), delta(v, baseline.get(k))]
            + ([prev.get(k, ""), delta(v, prev.get(k))] if prev else []) for k, v in metrics.items()]
    return table(heads, rows, set(range(1, len(heads))))


def _pr_plot(curves: Any, tmp: Path, missing: list[str]) -> dict | None:
    if isinstance(curves, dict) and plot_pr_curves(curves, tmp / "pr_curves.png"):
        return image(tmp / "pr_curves.png", "Precision/recall curves per class at IoU .50 and .75")
    missing.append("pr_curves")
    return None
