"""Image file checks that Great Expectations cannot express: existence, size and decodability.

Every image is opened once for its header (existence, format, width and height, EXIF
orientation: PIL reads only the first bytes). An image of more than ``max_image_pixels`` pixels
is refused right there, before any pixel is decoded (a 30000x30000 JPEG header or a 20000x20000
PNG is a decompression bomb: gigabytes of memory for a few kilobytes of file). The decode check
then reads the whole entropy-coded stream; for JPEG it uses PIL's draft mode (DCT scaling to
1/8), which still decodes every block of the file, so a truncated or broken stream fails exactly
as a full-size decode would, at about twice the speed. The results become columns of the image
table and the suites check them.

EXIF orientation policy: an image whose EXIF ``Orientation`` is 2-8 (rotated and/or mirrored) is
flagged, not rotated. Viewers and labelling tools apply the tag, so the boxes were drawn on the
turned view, while TensorFlow's decoder and the TFRecords use the stored pixels: the boxes would
not cover the objects. Whether a given labelling tool applied the tag cannot be known from the
file, so rotating the pixels (and swapping the stored width and height) could be just as wrong;
the image and its boxes are quarantined instead (``image_exif_rotated``), with the file and the
tag's value in the report. Values 1 (upright), absent, or outside 1-8 (ignored by viewers, as by
Pillow's ``ImageOps.exif_transpose``) mean the stored pixels are what the labeller saw.
"""

from __future__ import annotations

import os
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tasks.logs import Progress, log

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
EXIF_ORIENTATION = 0x0112
TURNED = frozenset(range(2, 9))  # EXIF orientations that rotate and/or mirror the stored pixels


class ImageTooLarge(Exception):
    """The header announces more pixels than allowed; nothing was decoded."""


def open_image(path: Path, max_pixels: int) -> Any:
    """``PIL.Image.open`` (header only), refusing more than ``max_pixels`` pixels before any decoding.

    Raises :class:`ImageTooLarge`, or PIL's own errors for files that are not images. Pillow's
    ``DecompressionBombWarning`` for sizes between its limit and twice it may be silenced by the
    caller: the refusal here is what protects the process.
    """
    from PIL import Image

    try:
        im = Image.open(path)
    except Image.DecompressionBombError as exc:  # Pillow refuses more than 2 x MAX_IMAGE_PIXELS itself
        raise ImageTooLarge(f"{_pixels_of(str(exc))} pixels, more than max_image_pixels={max_pixels}") from exc
    width, height = im.size
    if width * height > max_pixels:
        im.close()
        raise ImageTooLarge(f"{width}x{height} = {width * height} pixels, more than max_image_pixels={max_pixels}")
    return im


def _pixels_of(message: str) -> str:
    """The pixel count in Pillow's DecompressionBombError message ('Image size (N pixels) ...')."""
    head = message.split(" pixels", 1)[0]
    return head.rsplit("(", 1)[-1] if "(" in head else "too many"


def orientation(im: Any) -> int | None:
    """The EXIF Orientation tag of an open image, or None when it has none."""
    try:
        value = im.getexif().get(EXIF_ORIENTATION)
    except Exception:  # a broken EXIF block is not an orientation
        return None
    return value if isinstance(value, int) else None


@dataclass
class FileCheck:
    found: bool
    width: float = np.nan
    height: float = np.nan
    format: str | None = None
    decoded: bool | None = None  # None: not attempted (missing file, too large, or decode check off)
    error: str | None = None
    orientation: int | None = None
    pixels_ok: bool | None = None  # None: no header could be read


def check_image_file(path: Path, *, decode: bool = True, max_pixels: int = 89_478_485) -> FileCheck:
    from PIL import UnidentifiedImageError

    if not path.is_file():
        return FileCheck(found=False, error="no such file")
    try:
        with open_image(path, max_pixels) as im:
            width, height = im.size
            fmt = im.format
            turned = orientation(im)
            if not decode:
                return FileCheck(True, float(width), float(height), fmt, orientation=turned, pixels_ok=True)
            try:
                if fmt == "JPEG":
                    im.draft(im.mode, (max(1, width // 8), max(1, height // 8)))
                im.load()
            except Exception as exc:  # any decoder failure means the file is broken
                return FileCheck(True, float(width), float(height), fmt, False, f"decode failed: {exc}",
                                 orientation=turned, pixels_ok=True)
            return FileCheck(True, float(width), float(height), fmt, True, orientation=orientation(im) or turned,
                             pixels_ok=True)
    except ImageTooLarge as exc:
        return FileCheck(True, error=f"image too large: {exc}", pixels_ok=False)
    except UnidentifiedImageError:
        return FileCheck(True, decoded=False, error="not a recognised image format")
    except (OSError, ValueError, SyntaxError) as exc:
        return FileCheck(True, decoded=False, error=f"cannot read header: {exc}")


def check_image_files(images: pd.DataFrame, folder: Path, *, decode: bool = True, max_pixels: int = 89_478_485,
                      workers: int | None = None) -> tuple[pd.DataFrame, dict[str, float]]:
    """Add file columns to the image table; returns it with timing statistics.

    Columns: ``file_found`` (True/False, None for rows without a usable file name),
    ``file_width``/``file_height``, ``file_format``, ``file_decoded`` (True/False, None when not
    attempted), ``file_error``, ``file_orientation`` (the EXIF tag, None without one),
    ``file_pixels_ok`` (False above ``max_pixels``, None without a readable header).
    """
    from PIL import Image

    names = list(images["file_name"])
    todo = [(i, folder / n) for i, n in enumerate(names) if isinstance(n, str) and _plain_name(n)]
    results: dict[int, FileCheck] = {}
    workers = workers or min(4, os.cpu_count() or 1)
    progress = Progress("image checks", total=len(todo), unit="images")
    start = time.perf_counter()
    with warnings.catch_warnings(), ThreadPoolExecutor(max_workers=workers) as pool:  # PIL decodes without the GIL
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # open_image enforces the limit
        check = lambda t: check_image_file(t[1], decode=decode, max_pixels=max_pixels)
        for (i, _), res in zip(todo, pool.map(check, todo), strict=True):
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
    out["file_orientation"] = pd.Series([results[i].orientation if i in results else None for i in range(n)],
                                        dtype=object)
    out["file_pixels_ok"] = pd.Series([results[i].pixels_ok if i in results else None for i in range(n)],
                                      dtype=object)
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
