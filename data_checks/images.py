"""Image file checks that Great Expectations cannot express: existence, size and decodability.

Every image is opened once for its header (existence, format, width and height: PIL reads only
the first bytes). The decode check then reads the whole entropy-coded stream; for JPEG it uses
PIL's draft mode (DCT scaling to 1/8), which still decodes every block of the file, so a truncated
or broken stream fails exactly as a full-size decode would, at about twice the speed. The results
become columns of the image table and the suites check them.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from tasks.logs import Progress, log

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@dataclass
class FileCheck:
    found: bool
    width: float = np.nan
    height: float = np.nan
    format: str | None = None
    decoded: bool | None = None  # None: not attempted (missing file or decode check off)
    error: str | None = None


def check_image_file(path: Path, *, decode: bool = True) -> FileCheck:
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        return FileCheck(found=False, error="no such file")
    try:
        with Image.open(path) as im:
            width, height = im.size
            fmt = im.format
            if not decode:
                return FileCheck(True, float(width), float(height), fmt)
            try:
                if fmt == "JPEG":
                    im.draft(im.mode, (max(1, width // 8), max(1, height // 8)))
                im.load()
            except Exception as exc:  # any decoder failure means the file is broken
                return FileCheck(True, float(width), float(height), fmt, False, f"decode failed: {exc}")
            return FileCheck(True, float(width), float(height), fmt, True)
    except UnidentifiedImageError:
        return FileCheck(True, decoded=False, error="not a recognised image format")
    except (OSError, ValueError, SyntaxError) as exc:
        return FileCheck(True, decoded=False, error=f"cannot read header: {exc}")


def check_image_files(images: pd.DataFrame, folder: Path, *, decode: bool = True,
                      workers: int | None = None) -> tuple[pd.DataFrame, dict[str, float]]:
    """Add file columns to the image table; returns it with timing statistics.

    Columns: ``file_found`` (True/False, None for rows without a usable file name),
    ``file_width``/``file_height``, ``file_format``, ``file_decoded`` (True/False, None when not
    attempted), ``file_error``.
    """
    names = list(images["file_name"])
    todo = [(i, folder / n) for i, n in enumerate(names) if isinstance(n, str) and _plain_name(n)]
    results: dict[int, FileCheck] = {}
    workers = workers or min(4, os.cpu_count() or 1)
    progress = Progress("image checks", total=len(todo), unit="images")
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as pool:  # PIL decodes without the GIL
        for (i, _), res in zip(todo, pool.map(lambda t: check_image_file(t[1], decode=decode), todo),
                               strict=True):
            results[i] = res
            progress.update()
    elapsed = time.perf_counter() - start
    progress.finish()
    out = images.copy()
    n = len(out)
    out["file_found"] = pd.Series([results[i].found if i in results else None for i in range(n)], dtype=object)
    out["file_width"] = np.array([results[i].width if i in results else np.nan for i in range(n)], dtype=np.float64)
    out["file_height"] = np.array([results[i].height if i in results else np.nan for i in range(n)], dtype=np.float64)
    out["file_format"] = pd.Series([results[i].format if i in results else None for i in range(n)], dtype=object)
    out["file_decoded"] = pd.Series([results[i].decoded if i in results else None for i in range(n)], dtype=object)
    out["file_error"] = pd.Series([results[i].error if i in results else None for i in range(n)], dtype=object)
    stats = {"images_checked": len(todo), "seconds": round(elapsed, 3),
             "images_per_second": round(len(todo) / elapsed, 1) if elapsed > 0 else None,
             "decode": decode}
    log.info("checked %d image files in %.2f s (%s)", len(todo), elapsed,
             "header + decode" if decode else "header only")
    return out, stats


def unreferenced_files(folder: Path, names: list[object]) -> list[str]:
    """Image files in the folder that no image record names."""
    listed = {n for n in names if isinstance(n, str)}
    try:
        entries = sorted(p.name for p in folder.iterdir()
                         if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    except OSError:
        return []
    return [n for n in entries if n not in listed]


def _plain_name(name: str) -> bool:
    """Only plain file names are opened: no separators, no '..', nothing outside the folder."""
    return bool(name) and "/" not in name and "\\" not in name and name not in (".", "..") and "\0" not in name
