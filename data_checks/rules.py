"""The validation policy: every named check, what a failure of it means, and the thresholds.

A check is one rule a user can look up by name in ``validation.json`` and in the Data Docs; the
catalogue of checks is data (``checks.yaml``). Its policy says what happens to the records that
break it:

``fatal``       the dataset fails; the offending ids are reported.
``quarantine``  the boxes (for an image check: the image and all its boxes) are removed from the
                cleaned annotations and reported; the run goes on while quarantined boxes stay
                within ``max_quarantine_fraction`` of all boxes.
``repair``      the boxes are fixed in the cleaned annotations (clipped to the image) and reported.
``warn``        reported as a warning (distribution checks); never fails the run.
``info``        a known, handled property of the input (e.g. ``area`` stored as a fraction).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from importlib import resources
from typing import Any, Literal, get_args

import yaml
from PIL import Image

from tasks.errors import PersoncarError

Policy = Literal["fatal", "quarantine", "repair", "warn", "info"]


@dataclass(frozen=True)
class Check:
    name: str
    policy: Policy
    description: str


def _load_checks() -> dict[str, Check]:
    """The catalogue of checks, kept as data in ``checks.yaml`` beside this module, in report order."""
    raw = yaml.safe_load(resources.files(__package__).joinpath("checks.yaml").read_text(encoding="utf-8"))
    checks = {name: Check(name, **entry) for name, entry in raw.items()}
    if unknown := sorted(c.name for c in checks.values() if c.policy not in get_args(Policy)):
        raise ValueError(f"checks.yaml: unknown policy for {unknown}")
    return checks


CHECKS: dict[str, Check] = _load_checks()


def _pillow_max_pixels() -> int:
    """Pillow's own decompression-bomb limit (about 89.5 million pixels)."""
    return int(Image.MAX_IMAGE_PIXELS or 89_478_485)


@dataclass(frozen=True)
class Thresholds:
    """Every number the policy uses; all are recorded in ``validation.json`` and the suites."""

    max_quarantine_fraction: float = 0.01
    min_clip_keep_fraction: float = 0.5
    min_box_side: float = 1.0
    max_image_side: int = 100_000
    max_image_pixels: int = field(default_factory=_pillow_max_pixels)
    # warnings (distribution checks)
    max_boxes_per_image: int = 100
    median_boxes_per_image: tuple[float, float] = (1.0, 30.0)
    box_size_quantiles: dict[float, tuple[float, float]] = field(
        default_factory=lambda: {0.05: (0.005, 0.1), 0.5: (0.03, 0.4), 0.95: (0.2, 1.0)})
    min_class_fraction: float = 0.05
    aspect_ratio_range: tuple[float, float] = (0.05, 20.0)
    aspect_ratio_mostly: float = 0.999
    aspect_ratio_quantiles: dict[float, tuple[float, float]] = field(
        default_factory=lambda: {0.05: (0.1, 1.0), 0.5: (0.25, 4.0), 0.95: (1.0, 10.0)})
    area_tolerance: float = 0.01

    def __post_init__(self) -> None:
        def bad(name: str, rule: str) -> PersoncarError:
            return PersoncarError(f"validation threshold {name}={getattr(self, name)!r}: {rule}")

        for name in ("max_quarantine_fraction", "min_clip_keep_fraction", "min_class_fraction",
                     "aspect_ratio_mostly", "area_tolerance"):
            v = getattr(self, name)
            if not isinstance(v, int | float) or isinstance(v, bool) or not 0.0 <= v <= 1.0:
                raise bad(name, "must be a number between 0 and 1")
        if not isinstance(self.min_box_side, int | float) or not 0 <= self.min_box_side < 1e6:
            raise bad("min_box_side", "must be a number >= 0")
        for name in ("max_boxes_per_image", "max_image_side", "max_image_pixels"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise bad(name, "must be an integer >= 1")
        for name in ("median_boxes_per_image", "aspect_ratio_range"):
            lo, hi = getattr(self, name)
            if not lo <= hi:
                raise bad(name, "must be (low, high) with low <= high")
        for name in ("box_size_quantiles", "aspect_ratio_quantiles"):
            for q, (lo, hi) in getattr(self, name).items():
                if not 0.0 <= q <= 1.0 or not lo <= hi:
                    raise bad(name, "quantiles in [0, 1] with (low, high) ranges, low <= high")

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for name in ("box_size_quantiles", "aspect_ratio_quantiles"):
            d[name] = {str(q): list(r) for q, r in sorted(d[name].items())}
        for name in ("median_boxes_per_image", "aspect_ratio_range"):
            d[name] = list(d[name])
        return d
