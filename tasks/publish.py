"""Publish a run's report folder to S3 (or a local folder) and keep the index of runs.

Layout under a destination ``DEST`` (``s3://bucket/prefix``, ``file:///path`` or a path)::

    DEST/runs.json              index of published runs (a JSON list, oldest first)
    DEST/<run id>/...           the run's files: report.html, report.md, metrics.json, PNGs, ...
    DEST/latest/...             copies of the last promoted run's files
    DEST/latest/pointer.json    which run ``latest/`` holds; written last (see below)

An index entry is ``{"run_id", "published_at", "metrics": {"mAP", "mAP@.50IOU", "mAP@.75IOU"},
"per_class": {"person": {"mAP", ...}, ...}, "promoted", "report": "<run id>/report.html", "gate": {...}}``
with ``report`` relative to DEST (the report compares a run with the promoted one, class by class).

Concurrency: publishes of different runs may run at the same time (parallel DAG runs, backfills);
``runs.json`` is updated without losing any of them (``tasks.runs_index``: conditional writes on
S3, a file lock locally).

Idempotency: publishing the same run again mirrors its folder (no stale or duplicated files) and
replaces its index entry in place.

Quality gate and ``latest/``: a run is promoted when its gate metric (default
``DetectionBoxes_Precision/mAP@.50IOU``) beats the last promoted run in the index by more than the
gate's margin (the first run: when the metric is above 0). The decision is made inside the index
update, so concurrent publishes see each other. A promoted run's files are then copied to
``latest/``, one publish at a time (a lock file locally, a lease object ``DEST/.latest.lock`` on
S3; a publish that finds a later promotion in the index leaves ``latest/`` to it), and
``latest/pointer.json`` is written LAST: a failure part-way leaves the previous
``pointer.json`` in place, so readers that go through ``pointer.json`` (which names the run, its
immutable run folder and each file's SHA-256) never see a half-written ``latest/``; publishing the
run again completes it. Files that the new run does not have are removed from ``latest/`` only
after the pointer moved.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tasks import storage
from tasks.artifacts import (StageOutputs, atomic_dir, check_output_dir, copy_file_atomic, not_owned, safe_run_id,
                             sha256_file)
from tasks.evaluate import METRIC_PREFIX, RECALL_PREFIX, SHORT_METRICS, as_num, load_metrics, split_per_class_key
from tasks.errors import PersoncarError
from tasks.logs import log
from tasks.runs_index import (INDEX_NAME, LOCK_NAME, file_lock, load_index, normalize_dest, put_entry, s3_lease,
                              update_index)

LATEST_DIR = "latest"
POINTER_NAME = "pointer.json"
LATEST_LOCK_NAME = ".latest.lock"

DEFAULT_GATE: dict[str, Any] = {"metric": "DetectionBoxes_Precision/mAP@.50IOU", "margin": 0.0}

#: Backbone sweeps are published beside the runs (tasks.sweep_publish): ``DEST/sweeps.json``, ``DEST/sweeps/<id>/``.
SWEEPS_INDEX_NAME = "sweeps.json"
SWEEPS_DIR = "sweeps"

_RESERVED = {INDEX_NAME, LATEST_DIR, LOCK_NAME, LATEST_LOCK_NAME, SWEEPS_INDEX_NAME, SWEEPS_DIR}


def publish(
    src: str | Path,
    dest: str,
    *,
    run_id: str,
    endpoint_url: str | None = None,
    conn_id: str | None = None,
    gate: dict | None = None,
    extra_files: dict[str, Path] | None = None,
    model: dict | None = None,
) -> dict:
    """Publish the report folder ``src`` as run ``run_id`` under ``dest``.

    Uploads every file of ``src`` (report.html, report.md, metrics.json, PNGs, anything else) plus
    ``extra_files`` (``{"name in the run folder": local file or folder}``, e.g. the validation
    summary or the exported model) to ``<dest>/<run id>/`` with content types, updates
    ``<dest>/runs.json``, applies the quality ``gate`` (``{"metric": OD API name, "margin": float}``,
    default :data:`DEFAULT_GATE`) and, when promoted, refreshes ``<dest>/latest/``. See the module
    docstring for the concurrency and ``latest/`` guarantees. ``model`` (``{"name", "backbone",
    "checkpoint"}``) is recorded in the index entry: a later run with ``warm_start: promoted``
    continues from the last promoted entry's checkpoint.

    S3 is reached through the Airflow AWS connection ``conn_id`` (the task's) or, without one,
    botocore's chain and ``endpoint_url`` (tasks.storage).

    Returns ``{"run_id", "uri", "report_url", "promoted", "previous_promoted_run", "files", "gate",
    "latest", "entry"}``: ``uri`` is the run folder, ``report_url`` the published ``report.html``
    (``s3://`` or ``file://``), ``previous_promoted_run`` the run id the gate compared against.
    """
    src, run, dest, gate = _checked(src, run_id, dest, gate)
    files = _collect_files(src, extra_files or {})
    if not files:
        raise PersoncarError(f"{src}: report folder is empty, nothing to publish")
    names = [rel for rel, _ in files]
    metrics_file = dict(files).get("metrics.json")
    all_metrics = load_metrics(metrics_file) if metrics_file else {}
    if metrics_file is None:
        log.warning("%s: no metrics.json; the run is indexed without metrics and cannot be promoted", src)
    report_rel = "report.html" if "report.html" in names else next((n for n in names if n.endswith(".html")), None)
    where = {"endpoint_url": endpoint_url, "conn_id": conn_id}
    run_uri = storage.join_uri(dest, run)
    _mirror_run_folder(files, dest, run, where)  # 1. the run folder (re-publishing leaves one copy)
    entry, previous = _index_run(dest, run, all_metrics, gate, where, extra={  # 2. the index entry and the gate
        "report": f"{run}/{report_rel}" if report_rel else None, **({"model": model} if model else {})})
    latest_uri = _update_latest(dest, run, entry, files, where) if entry["promoted"] else None  # 3. latest/
    return {
        "run_id": run,
        "uri": f"{run_uri}/",
        "report_url": storage.join_uri(run_uri, report_rel) if report_rel else None,
        "promoted": entry["promoted"],
        "previous_promoted_run": previous.get("run_id") if previous else None,
        "files": names,
        "gate": entry["gate"],
        "latest": latest_uri,
        "entry": entry,
    }


def _checked(src: str | Path, run_id: str, dest: str, gate: dict | None) -> tuple[Path, str, str, dict[str, Any]]:
    if storage.is_remote(src):
        raise PersoncarError(f"{src}: the report folder to publish must be local (a path or file:// URI)")
    src = storage.local_path(src)
    if not src.is_dir():
        raise PersoncarError(f"{src}: report folder to publish does not exist")
    run = safe_run_id(run_id)
    if run in _RESERVED:
        raise PersoncarError(f"run id {run_id!r} is reserved at the publish destination")
    return src, run, normalize_dest(dest), _check_gate(gate)


def _mirror_run_folder(files: list[tuple[str, Path]], dest: str, run: str, where: dict[str, Any]) -> None:
    run_uri = storage.join_uri(dest, run)
    republished = _check_owned_folders(dest, run, where)
    log.info("publishing %d files to %s/", len(files), run_uri)
    mirror_files(files, run_uri, owned=republished, where=where)


def mirror_files(files: list[tuple[str, Path]], uri: str, *, owned: bool, where: dict[str, Any]) -> None:
    """Make ``uri`` hold exactly ``files``: on S3 a mirror, locally a folder replaced in one rename
    (``owned``: publish wrote it before)."""
    if storage.is_remote(uri):
        storage.upload_files(files, uri, delete=True, **where)
        return
    with atomic_dir(storage.local_path(uri), StageOutputs("publish"), owned=owned, flag="--dest") as tmp:
        for rel, path in files:
            copy_file_atomic(path, tmp / rel)


def _index_run(dest: str, run: str, metrics: dict[str, Any], gate: dict[str, Any], where: dict[str, Any],
               extra: dict[str, Any]) -> tuple[dict, dict | None]:
    """Write the run's index entry, the gate decided against the index as it is at write time."""
    decided: dict[str, Any] = {}
    per_class = _class_metrics(metrics)

    def change(entries: list[dict]) -> list[dict]:
        previous = last_promoted([e for e in entries if e.get("run_id") != run])
        verdict = gate_verdict(metrics, previous, gate)
        entry = {
            "run_id": run,
            "published_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "metrics": _index_metrics(metrics, gate["metric"]),
            **({"per_class": per_class} if per_class else {}),
            "promoted": verdict["promoted"],
            "gate": {k: verdict[k] for k in ("metric", "margin", "value", "baseline_run_id", "baseline_value")},
            **extra,
        }
        decided.update(entry=entry, previous=previous)
        return put_entry(entries, entry, "run_id")

    update_index(dest, change, **where)
    entry = decided["entry"]
    log.info("run %s indexed in %s: %s %s (baseline %s from %s, margin %s) -> %s", run,
             storage.join_uri(dest, INDEX_NAME), gate["metric"], _fmt(_metric_value(metrics, gate["metric"])),
             _fmt(entry["gate"]["baseline_value"]), entry["gate"]["baseline_run_id"] or "no promoted run",
             gate["margin"], "promoted" if entry["promoted"] else "not promoted")
    return entry, decided["previous"]


def previous_run(dest: str, *, endpoint_url: str | None = None, conn_id: str | None = None,
                 exclude: str | None = None) -> dict | None:
    """The last promoted run's index entry (with its ``metrics``), or ``None``.

    The report uses it for its "previous published run" column; ``exclude`` skips a run id (the run
    being reported, if it was published before).
    """
    entries = load_index(dest, endpoint_url=endpoint_url, conn_id=conn_id)
    if exclude is not None:
        skip = safe_run_id(exclude)
        entries = [e for e in entries if e.get("run_id") != skip]
    return last_promoted(entries)


def load_pointer(dest: str, *, endpoint_url: str | None = None, conn_id: str | None = None) -> dict | None:
    """``<dest>/latest/pointer.json``: which run ``latest/`` holds, or ``None``."""
    uri = storage.join_uri(normalize_dest(dest), LATEST_DIR, POINTER_NAME)
    raw = storage.read_bytes(uri, endpoint_url=endpoint_url, conn_id=conn_id)
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise PersoncarError(f"{uri}: not valid JSON ({exc})") from exc


def gate_verdict(metrics: dict[str, Any], previous: dict | None, gate: dict | None = None) -> dict[str, Any]:
    """Whether a run with ``metrics`` beats ``previous`` (the last promoted index entry) by the margin.

    The first run is promoted when its metric is above 0. Returns the gate with ``promoted``,
    ``value``, ``baseline_run_id``, ``baseline_value`` and a one-line ``reason``.
    """
    gate = _check_gate(gate)
    value = _metric_value(metrics, gate["metric"])
    baseline = _entry_metric(previous, gate["metric"]) if previous else None
    promoted = value is not None and value > (0 if baseline is None else baseline + gate["margin"])
    name = short_name(gate["metric"])
    if previous is None:
        reason = f"first promoted run: {name} {_fmt(value)}"
    else:
        verb = "beats" if promoted else "does not beat"
        reason = (f"{name} {_fmt(value)} {verb} {_fmt(baseline)} of run {previous.get('run_id')} "
                  f"by more than {gate['margin']}")
    return {**gate, "promoted": promoted, "reason": reason, "value": value,
            "baseline_run_id": previous.get("run_id") if previous else None, "baseline_value": baseline}


def last_promoted(entries: list[dict]) -> dict | None:
    """The last entry (in index order) with ``promoted`` true."""
    for entry in reversed(entries):
        if entry.get("promoted"):
            return entry
    return None


def _update_latest(dest: str, run: str, entry: dict, files: list[tuple[str, Path]], where: dict[str, Any]) -> str:
    latest_uri = storage.join_uri(dest, LATEST_DIR)
    # A later run promoted meanwhile owns latest/: leave it alone.
    if _superseded(dest, run, where):
        log.info("run %s was promoted but a later run already holds %s/; leaving it", run, latest_uri)
        return latest_uri + "/"
    payload = [(rel, path) for rel, path in files if rel != POINTER_NAME]
    pointer = {
        "run_id": run,
        "published_at": entry["published_at"],
        "promoted_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "metrics": entry["metrics"],
        "gate": entry["gate"],
        "report": f"{LATEST_DIR}/{entry['report'].split('/', 1)[1]}" if entry.get("report") else None,
        "run_uri": storage.join_uri(dest, run) + "/",
        "files": {rel: sha256_file(path) for rel, path in payload},
    }
    keep = {rel for rel, _ in payload} | {POINTER_NAME}
    # One writer at a time: an earlier promotion still uploading must not land files after a later
    # one's, and the stale-file sweep must not catch another writer's temp files.
    lock = (s3_lease(storage.join_uri(dest, LATEST_LOCK_NAME), owner=f"publish of {run}", **where)
            if storage.is_remote(dest) else file_lock(storage.local_path(dest) / LATEST_LOCK_NAME))
    with lock:
        if _superseded(dest, run, where):
            return latest_uri + "/"
        storage.upload_files(payload, latest_uri, skip_unchanged=storage.is_remote(dest), **where)
        if _superseded(dest, run, where):
            return latest_uri + "/"
        storage.write_bytes(storage.join_uri(latest_uri, POINTER_NAME),
                            (json.dumps(pointer, indent=2) + "\n").encode("utf-8"),
                            content_type="application/json", **where)
        storage.remove(latest_uri, sorted(set(storage.list_names(latest_uri, **where)) - keep), **where)
    log.info("%s/ now holds run %s (pointer.json written last)", latest_uri, run)
    return latest_uri + "/"


def _check_owned_folders(dest: str, run: str, where: dict[str, Any]) -> bool:
    """Refuse foreign files where publish mirrors: ``DEST/<run id>/`` and ``DEST/latest/``.

    The run folder is publish's own when the index lists the run (else it must be empty or
    absent); ``latest/`` when it holds a ``pointer.json`` or the index has a promoted run (whose
    publish may be filling it right now: the index entry is written before ``latest/``, so the
    folders are listed first and the index read after). Ownership is judged on that first listing:
    files that appear after the index was read are a concurrent publish's, whose entry this read
    could not see. Returns whether the run was published before.
    """
    run_uri, latest_uri = storage.join_uri(dest, run), storage.join_uri(dest, LATEST_DIR)
    names = {uri: storage.list_names(uri, **where) for uri in (run_uri, latest_uri)}
    index = load_index(dest, **where)
    published = any(e.get("run_id") == run for e in index)
    claimed = POINTER_NAME in names[latest_uri] or any(e.get("promoted") for e in index)
    for uri, owned in ((run_uri, published), (latest_uri, claimed)):
        if storage.is_remote(uri):
            if names[uri] and not owned:
                raise not_owned(uri, "publish", names[uri][0], flag="--dest")
        else:
            check_output_dir(storage.local_path(uri), StageOutputs("publish"), owned=owned or not names[uri],
                             flag="--dest")
    return published


def _superseded(dest: str, run: str, where: dict[str, Any]) -> bool:
    """Whether the index's last promoted run is no longer ``run`` (a later promotion won)."""
    current = last_promoted(load_index(dest, **where))
    return current is not None and current.get("run_id") != run


def _check_gate(gate: dict | None) -> dict[str, Any]:
    merged = {**DEFAULT_GATE, **(gate or {})}
    metric, margin = merged.get("metric"), merged.get("margin")
    if not isinstance(metric, str) or not metric:
        raise PersoncarError(f"quality gate: 'metric' must be a metric name, got {metric!r}")
    try:
        margin = float(margin)
    except (TypeError, ValueError) as exc:
        raise PersoncarError(f"quality gate: 'margin' must be a number, got {margin!r}") from exc
    if not math.isfinite(margin) or margin < 0:
        raise PersoncarError(f"quality gate: 'margin' must be a finite number >= 0, got {margin!r}")
    return {"metric": metric, "margin": margin}


def _collect_files(src: Path, extra: dict[str, Path]) -> list[tuple[str, Path]]:
    files = dict(storage.list_files(src))
    for name, path in extra.items():
        rel = storage.safe_rel(str(name), "extra_files")
        path = Path(path)
        if path.is_dir():
            add = {f"{rel}/{sub}": p for sub, p in storage.list_files(path)}
        elif path.is_file():
            add = {rel: path}
        else:
            raise PersoncarError(f"{path}: extra file {name!r} to publish does not exist")
        clash = sorted(set(add) & set(files))
        if clash:
            raise PersoncarError(f"{path}: extra file {clash[0]!r} clashes with a file of {src}")
        files.update(add)
    return sorted(files.items())


def _metric_value(metrics: dict[str, Any], name: str) -> float | None:
    """A metric from metrics.json: top level, or under a nested "metrics" object."""
    if name in metrics:
        return as_num(metrics[name])
    nested = metrics.get("metrics")
    if isinstance(nested, dict) and name in nested:
        return as_num(nested[name])
    return None


def short_name(metric: str) -> str:
    """``DetectionBoxes_Precision/mAP@.50IOU`` -> ``mAP@.50IOU`` (the index's key)."""
    for head in (METRIC_PREFIX, RECALL_PREFIX):
        if metric.startswith(head):
            return metric[len(head):]
    return metric


def _index_metrics(metrics: dict[str, Any], gate_metric: str) -> dict[str, float | None]:
    out = {short: _metric_value(metrics, full) for short, full in SHORT_METRICS.items()}
    out.setdefault(short_name(gate_metric), _metric_value(metrics, gate_metric))
    return out


def _class_metrics(metrics: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per-class AP, AP@.50 and AP@.75 under the index's short names: ``{"person": {"mAP": ...}}``."""
    out: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        name, cls = split_per_class_key(key) or ("", "")
        if name in SHORT_METRICS and (number := as_num(value)) is not None:
            out.setdefault(cls, {})[name] = number
    return out


def _entry_metric(entry: dict, metric: str) -> float | None:
    gate = entry.get("gate") or {}
    if gate.get("metric") == metric and as_num(gate.get("value")) is not None:
        return as_num(gate["value"])
    return as_num((entry.get("metrics") or {}).get(short_name(metric)))


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
