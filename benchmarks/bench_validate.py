"""Validation stage: wall time on the full real annotation file, and image checks per second.

Prints figures (no assertions):

* the full real file (2,239 images, 16,772 boxes), annotation checks only, each run in a fresh
  Python process so that interpreter start, imports and Great Expectations start-up are counted
  (target: under 10 s on 2 cores), with the stage's own split (GX import / suites);
* the image checks on the 112 real JPEGs: header-only reads and header + decode, in images/s;
* the whole stage on the 112-image sample with its images.

Run: ``.venv/bin/python benchmarks/bench_validate.py [--runs N]``.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHARED = Path(os.environ.get("PERSONCAR_SHARED_DATA", REPO.parent / "shared" / "data" / "personcar"))

CHILD = """
import logging, sys, time
logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
from tasks.validate import validate_annotations
images = sys.argv[3] if len(sys.argv) > 3 else None
r = validate_annotations(sys.argv[1], sys.argv[2], images=images)
print("quarantined", r["quarantined_annotation_ids"])
"""
SPLIT = re.compile(r"validation passed in ([\d.]+) s \(GX import ([\d.]+) s, suites ([\d.]+) s\)")


def stage_in_fresh_process(annotations: Path, out: Path, images: Path | None = None) -> dict[str, float | str]:
    args = [sys.executable, "-c", CHILD, str(annotations), str(out)] + ([str(images)] if images else [])
    start = time.perf_counter()
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"validation failed:\n{proc.stderr[-2000:]}")
    m = SPLIT.search(proc.stderr)
    return {"wall": wall, "stage": float(m[1]), "gx_import": float(m[2]), "suites": float(m[3]),
            "quarantined": proc.stdout.strip()}


def image_rates(repeats: int) -> None:
    import json

    from data_checks.images import check_image_files
    from data_checks.tables import build_tables

    doc = json.loads((SHARED / "bbox-annotations.sample112.json").read_text())
    images = build_tables(doc).images
    n = len(images)
    size_mb = sum(p.stat().st_size for p in (SHARED / "images").glob("*.jpg")) / 1e6
    print(f"image checks on {n} real JPEGs ({size_mb:.0f} MB):")
    for decode, label in ((False, "header only (size, format)"), (True, "header + decode")):
        for workers in (1, None):
            rates = []
            for _ in range(repeats):
                start = time.perf_counter()
                table, _ = check_image_files(images, SHARED / "images", decode=decode, workers=workers)
                rates.append(n / (time.perf_counter() - start))
                assert table["file_found"].all()
            threads = "1 thread" if workers == 1 else f"{min(4, os.cpu_count() or 1)} threads"
            print(f"  {label:28s} {threads:9s}: {max(rates):8.0f} images/s (best of {repeats}; "
                  f"median {statistics.median(rates):.0f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    import logging

    logging.disable(logging.INFO)
    print(f"machine: {os.cpu_count()} cores, load average {', '.join(f'{x:.2f}' for x in os.getloadavg())}")

    with tempfile.TemporaryDirectory() as tmp:
        runs = [stage_in_fresh_process(SHARED / "bbox-annotations.full.json", Path(tmp) / f"full{i}")
                for i in range(args.runs)]
        walls = [r["wall"] for r in runs]
        print(f"full real file (16,772 boxes), fresh process each run, {args.runs} runs:")
        print(f"  wall incl. interpreter, imports and GX start-up: best {min(walls):.2f} s, "
              f"median {statistics.median(walls):.2f} s, worst {max(walls):.2f} s (target < 10 s)")
        best = min(runs, key=lambda r: r["wall"])
        print(f"  best run split: stage {best['stage']:.2f} s of which GX import {best['gx_import']:.2f} s "
              f"and GX suites + Data Docs {best['suites']:.2f} s; {best['quarantined']}")

        image_rates(repeats=3)

        sample = stage_in_fresh_process(SHARED / "bbox-annotations.sample112.json", Path(tmp) / "sample",
                                        SHARED / "images")
        print(f"112-image sample with image checks, fresh process: wall {sample['wall']:.2f} s "
              f"(stage {sample['stage']:.2f} s)")
    print(f"load average after: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
