"""Run folders and atomic writes.

Every stage writes to ``<artifact root>/<run id>/<stage>/``. Outputs are built in a sibling temp
folder and renamed into place only when complete, so a failed or re-run stage never leaves a
half-written or duplicated result.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

STAGES = ("download", "validate", "tfrecords", "train", "evaluate", "report")


def stage_dir(artifact_root: str | os.PathLike[str], run_id: str, stage: str) -> Path:
    """``<artifact root>/<run id>/<stage>``, with the run id made safe as a folder name."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; expected one of {', '.join(STAGES)}")
    return Path(artifact_root) / safe_run_id(run_id) / stage


def safe_run_id(run_id: str) -> str:
    """A folder name for a run id, unique per run id.

    Airflow run ids contain ':' and '+' (``scheduled__2026-11-23T00:00:00+00:00``). Characters
    outside ``[A-Za-z0-9._-]`` become '_', and a short hash of the original id is appended when
    anything was replaced, so ``a:b`` and ``a_b`` never share a folder. Safe names map to themselves.
    """
    out = "".join(c if c.isascii() and (c.isalnum() or c in "-_.") else "_" for c in run_id)
    if out != run_id:
        out = f"{out}-{hashlib.sha256(run_id.encode()).hexdigest()[:8]}"
    if not out or out in {".", ".."}:
        raise ValueError(f"run id {run_id!r} cannot name a folder")
    return out


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temp folder beside ``final``; on success it replaces ``final`` in one rename.

    On any exception the temp folder is removed and ``final`` is left as it was.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; the result should look like mkdir's
    try:
        yield tmp
        old = None
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            if old.exists():
                shutil.rmtree(old)
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json_atomic(path: str | os.PathLike[str], obj: Any, *, indent: int | None = 2) -> Path:
    """Write JSON to ``path`` through a temp file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=indent, sort_keys=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
