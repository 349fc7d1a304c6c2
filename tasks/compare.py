"""Compare trained runs side by side: ``personcar compare RUN_DIR... --out DIR``, and a sweep's ``compare`` task.

Each run folder (a path or ``s3://``) is read for what its stages wrote - ``train/train_summary.json``,
``train/exported/`` (the SavedModel), ``evaluate/metrics.json`` and ``pr_curves.json`` - and, where
a candidate's task failed, ``failure.json``. Parameters and SavedModel size come from the exported
model; inference latency is measured here, for every candidate in the same pass on the same
machine: all models are loaded, warmed up, then timed image by image in turns, so a change of load
on the machine falls on all of them alike. A run folder without metrics is a failed candidate: it
is named with its reason and left out of the ranking.

Writes ``OUT/sweep.json`` (every number, the ranking and the recommendation), ``OUT/report.html``,
``OUT/report.md`` and ``OUT/pr_curves.png`` (:mod:`tasks.sweep_report`). When no candidate finished,
the report is still written; the command and the task then fail (:func:`check_recommendation`).
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tasks import storage
from tasks.artifacts import StageOutputs, atomic_dir, check_output_dir, write_json_atomic
from tasks.errors import PersoncarError
from tasks.evaluate import CLASS_METRICS, SHORT_METRICS, split_per_class_key
from tasks.logs import log
from tasks.staging import staging
from tasks.sweep import DEFAULT_MARGIN, FAILURE, ranked, recommend, score

OUTPUTS = StageOutputs("compare", "sweep.json", keys=("candidates", "recommendation"),
                       names=("sweep.json", "report.html", "report.md", "pr_curves.png"))
LATENCY_IMAGES = 20
Measure = Callable[[dict[str, Path], list[bytes]], dict[str, dict[str, Any]]]


def _json(uri: str, where: dict[str, Any]) -> Any:
    data = storage.read_bytes(uri, **where)
    if data is None:
        return None
    try:
        return json.loads(data)
    except ValueError:
        log.warning("%s: not valid JSON, ignored", uri)
        return None


def _per_class(metrics: dict[str, Any]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        metric, cls = split_per_class_key(key) or ("", "")
        for short, name in CLASS_METRICS.items():
            if metric == name:
                out.setdefault(cls, {})[short] = value
    return out


def read_run(name: str, uri: str, where: dict[str, Any]) -> dict[str, Any]:
    """What one run folder holds for the comparison (no model loaded yet)."""
    summary = _json(storage.join_uri(uri, "train", "train_summary.json"), where)
    metrics = _json(storage.join_uri(uri, "evaluate", "metrics.json"), where)
    failure = _json(storage.join_uri(uri, FAILURE), where)
    config = _json(storage.join_uri(uri, "config.json"), where) or {}
    s = summary if isinstance(summary, dict) else {}
    rec: dict[str, Any] = {
        "name": name, "run_dir": uri, "status": "finished", "failure": None,
        "model": s.get("model") or config.get("model"), "backbone_depth": s.get("backbone_depth"),
        "image_size": s.get("image_size"), "started_from": (s.get("started_from") or {}).get("description"),
        "training": {k: s.get(k) for k in ("seconds", "steps", "trained_steps", "images_per_second",
                                             "global_batch_size")} if s else None,
        "metrics": None, "per_class": {}, "parameters": None, "saved_model_bytes": None, "latency": None,
    }
    if isinstance(metrics, dict) and isinstance(summary, dict):
        rec["metrics"] = {short: metrics.get(full) for short, full in SHORT_METRICS.items()}
        rec["per_class"] = _per_class(metrics)
        rec["pr_curves"] = _json(storage.join_uri(uri, "evaluate", "pr_curves.json"), where)
        return rec
    rec["status"] = "failed"
    if isinstance(failure, dict) and failure.get("error"):
        rec["failure"] = {"stage": str(failure.get("stage") or "?"), "error": str(failure["error"])}
    elif summary is None:
        rec["failure"] = {"stage": "train", "error": "training did not finish (no train/train_summary.json)"}
    else:
        rec["failure"] = {"stage": "evaluate", "error": "evaluation did not finish (no evaluate/metrics.json)"}
    return rec


def _val_images(data: str, st: Any, n: int) -> list[bytes]:
    """Up to ``n`` encoded images of the val split of a TFRecord folder (the same for every model)."""
    from tasks.predict import _val_records

    names = [x for x in storage.list_names(data, **st.where) if x.startswith("val-") and x.endswith(".tfrecord")]
    if not names:
        raise PersoncarError(f"{data}: no val-*.tfrecord shards to time the models on (give --data TFRECORDS)")
    local = Path(tempfile.mkdtemp(dir=st.root)) if storage.is_remote(data) else storage.local_path(data)
    if storage.is_remote(data):
        storage.download_dir(data, local, names=names, **st.where)
    out = []
    for _, _, encoded in _val_records(local):
        out.append(encoded)
        if len(out) >= n:
            break
    return out


def saved_model_facts(saved: Path) -> dict[str, int]:
    """Parameters (every weight of the SavedModel, batch-norm statistics included) and its size on disk."""
    import tensorflow as tf

    weights = sum(math.prod(shape) for name, shape in tf.train.list_variables(str(saved / "variables" / "variables"))
                  if "_CHECKPOINTABLE_OBJECT_GRAPH" not in name)
    size = sum(p.stat().st_size for p in saved.rglob("*") if p.is_file())
    return {"parameters": weights, "saved_model_bytes": size}


def measure_models(models: dict[str, Path], images: list[bytes], *, warmup: int = 2) -> dict[str, dict[str, Any]]:
    """Per model: parameters, SavedModel size and inference latency per image (batch 1, ms: median and
    p90 over ``images``). Every model is loaded and warmed up first, then the images are timed in turns
    (model A, B, C on image 1, then on image 2, ...)."""
    from tasks.train import _setup_tf

    tf = _setup_tf()
    serve, out = {}, {}
    for name, saved in models.items():
        out[name] = saved_model_facts(saved)
        serve[name] = tf.saved_model.load(str(saved)).signatures["serving_default"]
    tensors = [tf.expand_dims(tf.io.decode_image(b, channels=3, expand_animations=False), 0) for b in images]
    times: dict[str, list[float]] = {name: [] for name in serve}
    for fn in serve.values():
        for t in (tensors * warmup)[:warmup]:
            fn(t)["num_detections"].numpy()
    for t in tensors:
        for name, fn in serve.items():
            start = time.perf_counter()
            fn(t)["num_detections"].numpy()
            times[name].append((time.perf_counter() - start) * 1000)
    for name, ms in times.items():
        ordered = sorted(ms)
        out[name]["latency"] = {"median_ms": round(statistics.median(ordered), 3),
                                "p90_ms": round(ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))], 3),
                                "images": len(ordered)} if ordered else None
    return out


def machine() -> dict[str, Any]:
    """Where the latencies were measured."""
    info: dict[str, Any] = {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                            "python": platform.python_version()}
    try:
        from tasks.train import _setup_tf

        tf = _setup_tf()
        gpus = tf.config.list_physical_devices("GPU")
        info["tensorflow"] = tf.__version__
        info["device"] = (tf.config.experimental.get_device_details(gpus[0]).get("device_name") or "GPU") if gpus \
            else "CPU"
    except ImportError:
        info["device"] = "CPU"
    return info


def _check_names(runs: list[tuple[str, str]]) -> None:
    names = [n for n, _ in runs]
    if not runs:
        raise PersoncarError("compare needs at least one run folder")
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise PersoncarError(f"two run folders are named {dup!r}: give folders with distinct names")


def _same_val_split(records: list[dict[str, Any]], where: dict[str, Any]) -> str | None:
    """A warning when the run folders' own TFRecord manifests name different val images."""
    seen = {}
    for r in records:
        m = _json(storage.join_uri(r["run_dir"], "tfrecords", "manifest.json"), where)
        ids = ((m or {}).get("splits") or {}).get("val", {}).get("image_ids") if isinstance(m, dict) else None
        if ids is not None:
            seen[r["name"]] = sorted(ids)
    if len({json.dumps(v) for v in seen.values()}) > 1:
        return (f"The run folders were evaluated on different val splits ({', '.join(sorted(seen))}): their metrics "
                "are not directly comparable.")
    return None


def compare_runs(runs: list[tuple[str, str]], out: str | Path, *, data: str | None = None,
                 margin: float = DEFAULT_MARGIN, latency_images: int = LATENCY_IMAGES, title: str | None = None,
                 where: dict[str, Any] | None = None, measure: Measure | None = None) -> dict[str, Any]:
    """Compare ``runs`` (``(name, run folder)``, in order) into the local folder ``out``.

    ``data``: the TFRecord folder whose val images time the models (default: the first run folder's
    ``tfrecords/``); ``margin``: the recommendation rule's (:func:`tasks.sweep.recommend`);
    ``measure``: stands in for :func:`measure_models` (tests). Returns the ``sweep.json`` document.
    """
    from tasks.sweep_report import write_report

    _check_names(runs)
    where = where or {}
    out = check_output_dir(out, OUTPUTS)
    recommend([], margin)  # a bad margin fails before any work
    records = [read_run(name, uri, where) for name, uri in runs]
    notes = [n for n in (_same_val_split(records, where),) if n]
    with staging(**where) as st:
        models = {}
        for r in records:
            if r["status"] != "finished":
                continue
            exported = storage.join_uri(r["run_dir"], "train", "exported")
            if "saved_model.pb" in storage.list_names(exported, **where):
                models[r["name"]] = st.input(exported)
            else:
                notes.append(f"{r['name']}: no exported SavedModel under train/exported, so no latency or parameters.")
        measured: dict[str, dict[str, Any]] = {}
        info: dict[str, Any] = {}
        if models:
            source = data or storage.join_uri(runs[0][1], "tfrecords")
            images = _val_images(source, st, latency_images)
            log.info("compare: timing %d models on %d val images of %s", len(models), len(images), source)
            measured = (measure or measure_models)(models, images)
            info = {**(machine() if measure is None else {}), "images_from": source}
    for r in records:
        r.update(measured.get(r["name"], {}))
    order = ranked(records)
    for i, r in enumerate(order, 1):
        r["rank"] = i
    doc = {"kind": "personcar_sweep", "title": title or "personcar backbone comparison",
           "candidates": records, "ranking": [r["name"] for r in order],
           "failed": [r["name"] for r in records if r["status"] == "failed"],
           "recommendation": recommend(records, margin), "machine": info, "notes": notes}
    with atomic_dir(out, OUTPUTS) as tmp:
        write_report(doc, tmp)
        write_json_atomic(tmp / "sweep.json", {**doc, "candidates": [
            {k: v for k, v in r.items() if k != "pr_curves"} for r in records]})
    log.info("compare: %s -> %s", doc["recommendation"]["reason"], out / "report.html")
    return {**doc, "out": str(out), "html": str(out / "report.html"), "markdown": str(out / "report.md"),
            "scores": {r["name"]: score(r) for r in order}}


def check_recommendation(doc: dict[str, Any], where_report: str) -> None:
    """Fail (after the report is written and stored) when no candidate finished."""
    if doc["recommendation"]["name"] is None:
        raise PersoncarError(f"none of the {len(doc['candidates'])} candidates finished ({', '.join(doc['failed'])}); "
                             f"the report says why: {where_report}")


def sweep_runs(sweep: str, where: dict[str, Any] | None = None) -> tuple[list[tuple[str, str]], str]:
    """A sweep's run folder: its candidates (``candidates.json``) as ``(name, folder)`` and its TFRecords."""
    from tasks.sweep import MANIFEST, candidate_stage

    doc = _json(storage.join_uri(sweep, MANIFEST), where or {})
    if not isinstance(doc, dict) or not isinstance(doc.get("candidates"), list):
        raise PersoncarError(f"{sweep}: no {MANIFEST} (not the run folder of a backbone sweep)")
    runs = [(str(c["name"]), storage.join_uri(sweep, candidate_stage(str(c["name"])))) for c in doc["candidates"]]
    return runs, storage.join_uri(sweep, "tfrecords")
