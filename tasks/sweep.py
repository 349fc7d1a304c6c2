"""A backbone sweep: the candidates, the layout of a sweep's run folder, and the recommendation rule.

A sweep trains and evaluates several candidates on one download / validation / TFRecords pass. A
candidate is a name and the run parameters it changes (``{"name": "resnet50", "model":
"ssd_resnet50_v1_fpn_640x640"}``); everything else comes from the sweep's own parameters. The
sweep's run folder::

    RUN/download, RUN/validate, RUN/tfrecords     the shared data pass (the main DAG's stages)
    RUN/candidates.json                           the candidates and the run config of each
    RUN/candidates/<name>/train, .../evaluate     each candidate's train and evaluate stages
    RUN/candidates/<name>/failure.json            why a candidate's task failed (its last try)
    RUN/candidates/<name>/config.json, report/    the recommended candidate, when published as a run
    RUN/compare/                                  the sweep report (``sweep.json``, HTML, Markdown, plot)

The recommendation rule (:func:`recommend`) is plain data in, plain data out; nothing here imports
TensorFlow or Airflow.
"""

from __future__ import annotations

import math
import re
from typing import Any

from tasks.config import RunConfig
from tasks.errors import PersoncarError
from tasks.evaluate import as_num

CANDIDATES_DIR = "candidates"
MANIFEST = "candidates.json"
FAILURE = "failure.json"
COMPARE_DIR = "compare"
RULE_METRIC = "mAP@.50IOU"
DEFAULT_MARGIN = 0.01
#: The seed's question: ResNet-50, -101 and -152 at 640, each from its own published COCO checkpoint.
DEFAULT_CANDIDATES: list[dict[str, Any]] = [
    {"name": "resnet50", "model": "ssd_resnet50_v1_fpn_640x640", "image_size": 640, "init_checkpoint": "pretrained"},
    {"name": "resnet101", "model": "ssd_resnet101_v1_fpn_640x640", "image_size": 640,
     "init_checkpoint": "pretrained"},
    {"name": "resnet152", "model": "ssd_resnet152_v1_fpn_640x640", "image_size": 640,
     "init_checkpoint": "pretrained"},
]
#: Parameters of the shared data pass and of publishing: one value for the whole sweep.
SHARED_FIELDS = ("dataset_source", "dataset_sha256", "max_quarantine_fraction", "val_fraction", "num_shards",
                 "publish_dest", "promotion_margin")
NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")


# --------------------------------------------------------------------------- candidates


def candidate_stage(name: str, stage: str = "") -> str:
    """A candidate's folder (or one of its stages) relative to the sweep's run folder."""
    return "/".join(p for p in (CANDIDATES_DIR, name, stage) if p)


def candidate_config(base: dict[str, Any], candidate: dict[str, Any]) -> RunConfig:
    """The run config of a candidate: the sweep's parameters, then the candidate's own."""
    params = {k: v for k, v in base.items() if k in RunConfig.model_fields}
    overrides = {k: v for k, v in candidate.items() if k != "name"}
    try:
        return RunConfig.from_params({**params, **overrides})
    except PersoncarError as exc:
        raise PersoncarError(f"candidate {candidate.get('name')!r}: {exc}") from exc


def parse_candidates(raw: Any, base: dict[str, Any]) -> list[dict[str, Any]]:
    """The candidates as given (order kept), checked: names usable as folder names and unique, no
    parameter of the shared data pass, and a valid run config each. One line names the fault."""
    if not isinstance(raw, list) or not raw:
        raise PersoncarError("candidates: expected a non-empty list of {\"name\": ..., run parameters}")
    out, seen = [], set()
    for i, cand in enumerate(raw):
        if not isinstance(cand, dict):
            raise PersoncarError(f"candidates[{i}]: expected an object with a name, got {cand!r}")
        name = cand.get("name")
        if not isinstance(name, str) or not NAME.match(name):
            raise PersoncarError(f"candidates[{i}]: 'name' must be 1-63 of a-z, 0-9, '_', '.', '-' (a folder name), "
                                 f"got {name!r}")
        if name in seen:
            raise PersoncarError(f"candidates: two candidates are named {name!r}")
        seen.add(name)
        unknown = sorted(k for k in cand if k != "name" and k not in RunConfig.model_fields)
        if unknown:
            raise PersoncarError(f"candidate {name!r}: unknown parameter {unknown[0]!r}")
        shared = sorted(k for k in cand if k in SHARED_FIELDS)
        if shared:
            raise PersoncarError(f"candidate {name!r}: {shared[0]} is one value for the whole sweep (the data pass "
                                 "and the publishing are shared): set it as the sweep's parameter")
        candidate_config(base, cand)
        out.append(dict(cand))
    return out


def manifest(candidates: list[dict[str, Any]], base: dict[str, Any]) -> dict[str, Any]:
    """``candidates.json``: each candidate's name, its own parameters and its whole run config."""
    return {"candidates": [{"name": c["name"], "overrides": {k: v for k, v in c.items() if k != "name"},
                            "config": candidate_config(base, c).model_dump()} for c in candidates]}


# --------------------------------------------------------------------------- the recommendation


def score(c: dict[str, Any]) -> float | None:
    """A finished candidate's mAP@.50IOU (COCO's -1, no ground truth, counts as none)."""
    v = as_num((c.get("metrics") or {}).get(RULE_METRIC))
    return v if c.get("status") == "finished" and v is not None and v >= 0 else None


def cost(c: dict[str, Any]) -> tuple[float, float]:
    """What "cheaper" means: inference latency per image (measured in one pass on one machine), then
    parameters; a candidate without a number is never the cheaper one."""
    latency = as_num((c.get("latency") or {}).get("median_ms"))
    params = as_num(c.get("parameters"))
    return (math.inf if latency is None else latency, math.inf if params is None else params)


def rule_text(margin: float) -> str:
    return (f"The candidate with the best {RULE_METRIC} on the val split, unless a cheaper one - lower inference "
            f"latency per image, measured in the same pass on the same machine for all (fewer parameters where no "
            f"latency was measured) - is within {margin:.3f} of it: then the cheapest of those.")


def ranked(candidates: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Finished candidates by mAP@.50IOU, best first (ties: the cheaper, then the name)."""
    done = [c for c in candidates if score(c) is not None]
    return sorted(done, key=lambda c: (-score(c), cost(c), c["name"]))  # type: ignore[operator]


def _ms(c: dict[str, Any]) -> str:
    latency, params = cost(c)
    return f"{latency:.1f} ms an image" if latency != math.inf else (
        f"{params / 1e6:.1f}M parameters" if params != math.inf else "no cost measured")


def recommend(candidates: list[dict[str, Any]], margin: float = DEFAULT_MARGIN) -> dict[str, Any]:
    """The recommended candidate by the stated rule (:func:`rule_text`), and why, in one sentence.

    Returns ``{"name", "leader", "margin", "within", "reason", "rule"}``; ``name`` is None when no
    candidate finished.
    """
    if not (isinstance(margin, int | float) and math.isfinite(margin) and margin >= 0):
        raise PersoncarError(f"recommendation margin must be a number >= 0, got {margin!r}")
    order = ranked(candidates)
    base = {"margin": margin, "rule": rule_text(margin)}
    if not order:
        return {**base, "name": None, "leader": None, "within": [],
                "reason": "No candidate finished training and evaluation: nothing to recommend."}
    leader = order[0]
    best = score(leader)
    within = [c for c in order if score(c) >= best - margin - 1e-12]  # type: ignore[operator]
    pick = min(within, key=lambda c: (cost(c), -score(c), c["name"]))  # type: ignore[operator]
    name = f"{RULE_METRIC} {{:.3f}}"
    if pick is leader:
        others = [c for c in within if c is not leader]
        tail = (f"; {', '.join(c['name'] for c in others)} {'is' if len(others) == 1 else 'are'} within {margin:.3f} "
                f"but not cheaper" if others else f"; no other candidate is within {margin:.3f} of it")
        reason = f"{pick['name']} has the best {name.format(best)} ({_ms(pick)}){tail}."
    else:
        reason = (f"{pick['name']} ({name.format(score(pick))}, {_ms(pick)}) is within {margin:.3f} of the best, "
                  f"{leader['name']} ({name.format(best)}, {_ms(leader)}), and cheaper.")
    return {**base, "name": pick["name"], "leader": leader["name"], "within": [c["name"] for c in within],
            "reason": reason}
