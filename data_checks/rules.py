"""The validation policy: every named check, what a failure of it means, and the thresholds.

A check is one rule a user can look up by name in ``validation.json`` and in the Data Docs. Its
policy says what happens to the records that break it:

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
from typing import Any, Literal

from PIL import Image

from tasks.errors import PersoncarError

Policy = Literal["fatal", "quarantine", "repair", "warn", "info"]


@dataclass(frozen=True)
class Check:
    name: str
    policy: Policy
    description: str


_CHECKS = [
    # -- structure and types (fatal) ----------------------------------------------------------
    Check("json_syntax", "fatal", "The annotation file is valid JSON."),
    Check("structure", "fatal",
          "The top level is an object with lists 'images', 'annotations', 'categories' of objects "
          "('licenses', when present, is a list)."),
    Check("table_empty", "fatal", "There is at least one image, one annotation and one category."),
    Check("image_field_type", "fatal",
          "Each image has an integer 'id', a string 'file_name' and integer 'width'/'height'."),
    Check("annotation_field_type", "fatal",
          "Each annotation has integer 'id', 'image_id', 'category_id', a 'bbox' of 4 finite "
          "numbers [x, y, w, h], 'iscrowd' 0/1 when present and 'segmentation' a list/object when present."),
    Check("category_field_type", "fatal", "Each category has an integer 'id' and a non-empty string 'name'."),
    # -- referential integrity (fatal) --------------------------------------------------------
    Check("duplicate_image_id", "fatal", "Image ids are unique."),
    Check("duplicate_file_name", "fatal", "Image file names are unique."),
    Check("unsafe_file_name", "fatal", "File names are plain names: no folder separators, no '..'."),
    Check("image_size_invalid", "fatal", "Recorded image width and height are between 1 and 100000 px."),
    Check("duplicate_annotation_id", "fatal", "Annotation ids are unique."),
    Check("duplicate_category_id", "fatal", "Category ids are unique."),
    Check("duplicate_category_name", "fatal", "Category names are unique."),
    Check("annotation_image_missing", "fatal", "Every annotation's image_id names an image of the file."),
    Check("annotation_category_unknown", "fatal", "Every annotation's category_id is in the category list."),
    Check("category_absent", "fatal", "Every category has at least one box in the dataset."),
    Check("label_map_mismatch", "fatal",
          "The categories are the model's label map: the same ids 1..N with the same names (id 0 is "
          "the model's background class)."),
    # -- image files (fatal, only with an images folder) ---------------------------------------
    Check("image_file_missing", "fatal", "Every image of the file exists in the images folder."),
    Check("image_too_large", "fatal",
          "Every image file has at most max_image_pixels pixels, read from its header: larger ones "
          "(decompression bombs) are refused before anything is decoded."),
    Check("image_undecodable", "fatal", "Every image file decodes completely."),
    Check("image_size_mismatch", "fatal", "Recorded width/height equal the image file's size."),
    Check("image_exif_rotated", "quarantine",
          "No image file carries an EXIF Orientation that rotates or mirrors it (2-8): viewers show "
          "such a photo turned, so its boxes were drawn on a view that is not the stored pixels; the "
          "image and its boxes are left out of the cleaned annotations."),
    # -- repairable boxes ----------------------------------------------------------------------
    Check("box_non_positive_size", "quarantine", "Box width and height are > 0."),
    Check("box_past_image_edge", "repair",
          "Boxes lie inside their image; a box past the edge is clipped when the part inside keeps "
          "at least min_clip_keep_fraction of its area."),
    Check("box_mostly_outside_image", "quarantine",
          "A box past the edge keeps at least min_clip_keep_fraction of its area inside the image."),
    Check("box_too_small", "quarantine", "After clipping, both box sides are >= min_box_side px."),
    Check("duplicate_box", "quarantine",
          "No two boxes share image, category and bbox; the first (lowest id) is kept."),
    Check("quarantine_threshold", "fatal", "Quarantined boxes are at most max_quarantine_fraction of all boxes."),
    # -- warnings --------------------------------------------------------------------------------
    Check("same_box_different_categories", "warn", "No box position carries two different categories."),
    Check("boxes_per_image", "warn", "Each image has between 1 and max_boxes_per_image boxes."),
    Check("boxes_per_image_median", "warn", "The median number of boxes per image is in range."),
    Check("box_size_quantiles", "warn",
          "Quantiles of the relative box size sqrt(w*h / (W*H)) are in their ranges."),
    Check("class_balance", "warn", "Every category holds at least min_class_fraction of the boxes."),
    Check("aspect_ratio", "warn", "Box aspect ratios w/h lie in aspect_ratio_range (for 'mostly' of the boxes)."),
    Check("aspect_ratio_quantiles", "warn", "Quantiles of the box aspect ratio w/h are in their ranges."),
    Check("image_format", "warn", "Image files are JPEG or PNG."),
    Check("image_file_unreferenced", "warn", "Every file in the images folder is listed in the JSON."),
    Check("area_not_pixels", "info",
          "Stored 'area' equals w*h in pixels for a typical box (it is recomputed either way)."),
]

CHECKS: dict[str, Check] = {c.name: c for c in _CHECKS}


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
