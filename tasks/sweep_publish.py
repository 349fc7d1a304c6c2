"""Publish a sweep report beside the runs: ``DEST/sweeps/<sweep id>/`` and the index ``DEST/sweeps.json``.

An index entry is ``{"sweep_id", "published_at", "report": "sweeps/<id>/report.html", "recommended",
"reason", "margin", "candidates": [{"name", "status", "mAP@.50IOU", "latency_ms", "parameters"}],
"failed": [...], "winner_run", "winner_promoted"}``; ``winner_run`` is the run id the recommended
candidate was published under (through the quality gate, :func:`tasks.publish.publish`), if it was.
Re-publishing a sweep mirrors its folder and replaces its entry, as for runs; the folder is replaced
only when the index lists the sweep (or it is empty). The index is updated the way ``runs.json`` is
(conditional writes on S3, a lock locally).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tasks import storage
from tasks.artifacts import not_owned, safe_run_id
from tasks.errors import PersoncarError
from tasks.logs import log
from tasks.publish import SWEEPS_DIR, SWEEPS_INDEX_NAME, load_index, mirror_files, normalize_dest, update_index
from tasks.runs_index import put_entry


def load_sweeps(dest: str, **where: Any) -> list[dict]:
    """The entries of ``<dest>/sweeps.json``, oldest first."""
    return load_index(dest, name=SWEEPS_INDEX_NAME, **where)


def _entry(key: str, doc: dict[str, Any], winner: dict[str, Any] | None) -> dict[str, Any]:
    rec = doc["recommendation"]
    return {
        "sweep_id": key, "published_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "report": f"{SWEEPS_DIR}/{key}/report.html", "recommended": rec.get("name"), "reason": rec.get("reason"),
        "margin": rec.get("margin"),
        "candidates": [{"name": c["name"], "status": c["status"],
                        "mAP@.50IOU": (c.get("metrics") or {}).get("mAP@.50IOU"),
                        "latency_ms": (c.get("latency") or {}).get("median_ms"), "parameters": c.get("parameters")}
                       for c in doc["candidates"]],
        "failed": list(doc.get("failed") or []),
        "winner_run": (winner or {}).get("run_id"), "winner_promoted": (winner or {}).get("promoted"),
    }


def publish_sweep(src: str | Path, dest: str, *, sweep_id: str, winner: dict[str, Any] | None = None,
                  endpoint_url: str | None = None, conn_id: str | None = None) -> dict[str, Any]:
    """Publish the compare folder ``src`` (``sweep.json``, ``report.html``, ...) as sweep ``sweep_id``.

    ``winner``: what publishing the recommended candidate as a run returned (``run_id``, ``promoted``).
    Returns ``{"sweep_id", "uri", "report_url", "entry"}``.
    """
    src = Path(src)
    if not (src / "sweep.json").is_file():
        raise PersoncarError(f"{src}: no sweep.json (run personcar compare first)")
    doc = json.loads((src / "sweep.json").read_text(encoding="utf-8"))
    key = safe_run_id(sweep_id)
    dest = normalize_dest(dest)
    where = {"endpoint_url": endpoint_url, "conn_id": conn_id}
    uri = storage.join_uri(dest, SWEEPS_DIR, key)
    files = storage.list_files(src)
    listed = any(e.get("sweep_id") == key for e in load_sweeps(dest, **where))
    if storage.is_remote(dest) and not listed and (present := storage.list_names(uri, **where)):
        raise not_owned(uri, "publish", present[0], flag="--dest")
    mirror_files(files, uri, owned=listed, where=where)
    entry = _entry(key, doc, winner)
    update_index(dest, lambda entries: put_entry(entries, entry, "sweep_id"), name=SWEEPS_INDEX_NAME, **where)
    report_url = storage.join_uri(uri, "report.html")
    log.info("sweep %s published: %s (recommended: %s)", key, report_url, entry["recommended"] or "none")
    return {"sweep_id": key, "uri": f"{uri}/", "report_url": report_url, "entry": entry}
