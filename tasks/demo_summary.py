"""Print where the demo's report landed and its headline metrics (``make demo``'s last step)."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(demo: str) -> int:
    runs = sorted((Path(demo) / "runs").glob("*/report/report.html"), key=lambda p: p.stat().st_mtime)
    if not runs:
        print(f"demo failed: no report under {demo}/runs (see {demo}/dag-test.log)", file=sys.stderr)
        return 1
    report = runs[-1]
    metrics = json.loads((report.parent.parent / "evaluate" / "metrics.json").read_text())
    print("\npersoncar demo finished")
    for key in ("DetectionBoxes_Precision/mAP", "DetectionBoxes_Precision/mAP@.50IOU", "DetectionBoxes_Precision/mAP@.75IOU"):
        print(f"  {key:40s} {metrics[key]:.4f}")
    print(f"  run folder: {report.parent.parent}")
    print(f"  report:     {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else ".demo"))
