"""The label map rule: the data's categories must be the label map the model is built for.

The detector has one output per class id 1..N plus the background at id 0 (Model Garden's
``num_classes`` is N + 1), and its label map names each id (``tasks.config.CLASSES``). A category
list that differs (a 0-based export, an extra class, two names swapped) would train silently
wrong outputs, so validation fails it and ``tfrecords`` refuses it, through the same suites.

A category is compared as its *entry*, ``<id> '<name>'``: the id and the name must both match.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any


def entry(category_id: Any, name: Any) -> str | None:
    """``1 'person'``; None when the id is not an integer or the name not a string (a type failure)."""
    if not isinstance(category_id, int) or isinstance(category_id, bool) or not isinstance(name, str):
        return None
    return f"{category_id} {name!r}"


def entries(label_map: Mapping[int, str]) -> list[str]:
    """The label map's entries, by id."""
    return [e for i, n in sorted(label_map.items()) if (e := entry(i, n)) is not None]


def check_label_map(label_map: Mapping[int, str]) -> None:
    """The label map itself: ids 1..N, each with a non-empty name (id 0 is the background)."""
    ids = sorted(label_map)
    if ids != list(range(1, len(ids) + 1)) or not all(isinstance(n, str) and n for n in label_map.values()):
        raise ValueError(f"label map must name ids 1..N, got {dict(label_map)!r}")


def mismatch(found: Iterable[str | None], label_map: Mapping[int, str]) -> str | None:
    """What is wrong with the file's category entries, in one line; None when they are the label map."""
    expected = entries(label_map)
    have = [e for e in found if e is not None]
    extra = [e for e in have if e not in expected]
    missing = [e for e in expected if e not in have]
    if not extra and not missing:
        return None
    parts = []
    if extra:
        zero = any(e.split(" ", 1)[0] == "0" for e in extra)
        parts.append("not in the label map: " + ", ".join(extra)
                     + (" (a 0-based export? id 0 is the model's background)" if zero else ""))
    if missing:
        parts.append("missing from the file: " + ", ".join(missing))
    return f"categories must be the model's label map {', '.join(expected)}; " + "; ".join(parts)
