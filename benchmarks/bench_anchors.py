"""Anchor coverage of the real full annotation file: the default model and the candidates it was chosen from.

Coverage is the share of boxes whose best anchor reaches IoU 0.5 (Model Garden's matcher), after the
fixed square resize (tasks/anchors.py). Prints a Markdown table, the default config first.

    .venv/bin/python benchmarks/bench_anchors.py
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
FULL = ROOT.parent / "shared" / "data" / "personcar" / "bbox-annotations.full.json"

ZOO_RATIOS = (1.0, 2.0, 0.5)
OURS_RATIOS = (1.0, 2.0, 0.5, 0.3333)
NOTES = {(640, 4.0, 2, ZOO_RATIOS): "the zoo's", (640, 3.0, 2, OURS_RATIOS): "**default**",
         (512, 3.0, 2, OURS_RATIOS): "the learning check's size"}
CANDIDATES = [  # (input size, anchor scale, scales per octave, aspect ratios, note)
    (*c, NOTES.get(c, "")) for c in (
        (640, 4.0, 2, ZOO_RATIOS), (640, 4.0, 3, ZOO_RATIOS), (640, 3.0, 2, ZOO_RATIOS), (640, 2.0, 3, ZOO_RATIOS),
        (640, 4.0, 2, OURS_RATIOS), (640, 3.0, 2, OURS_RATIOS), (640, 3.0, 3, OURS_RATIOS),
        (768, 4.0, 2, ZOO_RATIOS), (768, 3.0, 2, OURS_RATIOS), (1024, 4.0, 2, ZOO_RATIOS), (1024, 3.0, 2, OURS_RATIOS),
        (512, 3.0, 2, OURS_RATIOS))
]


def main() -> None:
    from tasks.anchors import AnchorSpec, anchor_coverage, coverage_for_run

    coco = json.loads(FULL.read_text())
    t0 = time.monotonic()
    default = coverage_for_run(coco, "ssd_resnet152_v1_fpn_640x640")
    print(f"default config ssd_resnet152_v1_fpn_640x640: {default['coverage']:.1%} of {default['boxes']:,} boxes "
          f"({default['anchors']}; {time.monotonic() - t0:.1f} s)\n")
    print("| input | anchor scale | scales | ratios (w/h) | anchors a location | coverage | mean best IoU "
          "| side < 16 px | 16-32 px | 32-96 px | > 96 px | |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for size, scale, scales, ratios, note in CANDIDATES:
        cov = anchor_coverage(coco, AnchorSpec(image_size=size, anchor_size=scale, num_scales=scales,
                                               aspect_ratios=ratios))
        sides = [f"{b['coverage']:.0%}" for b in cov["by_shorter_side"].values()]
        print(f"| {size} | {scale:g} | {scales} | {', '.join(f'{r:.3g}' for r in ratios)} | {len(ratios) * scales} "
              f"| {cov['coverage']:.1%} | {cov['mean_best_iou']:.3f} | {' | '.join(sides)} | {note} |")
    sizes = default["by_shorter_side"]
    counts = ", ".join(f"{k}: {v['boxes']:,}" for k, v in sizes.items())
    print(f"\nboxes by shorter side at 640: {counts}")


if __name__ == "__main__":
    main()
