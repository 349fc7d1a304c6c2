"""Data quality rules for the personcar annotations: Great Expectations suites plus file checks.

``rules``   the named checks, their policy (fatal / quarantine / repair / warn) and thresholds
``tables``  JSON loading, the structural pre-check, and the image/box/category tables
``suites``  the GX expectation suites over those tables and how they run (Data Docs included)
``images``  image file checks GX cannot express (existence, header size, pixel cap, EXIF
            orientation, decodability) and the stated EXIF policy
``labels``  the label map rule: the categories must be the model's ids 1..N with their names
``policy``  GX results -> failures, quarantine, clipping, warnings and the clean COCO document
``dataset`` all of the above in one pass, shared by ``validate`` and ``tfrecords``

The stage entry point is :func:`tasks.validate.validate_annotations`. Nothing here imports Great
Expectations at module level.
"""

from data_checks.rules import CHECKS, Check, Thresholds

__all__ = ["CHECKS", "Check", "Thresholds"]
