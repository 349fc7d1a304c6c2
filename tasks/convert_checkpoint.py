"""TF2 detection zoo (OD API) SSD ResNet V1 FPN checkpoints onto this project's model.

The zoo's ``ssd_resnet{50,101,152}_v1_fpn_640x640_coco17_tpu-8`` checkpoints are object-based
(``model/...``) and the model of ``tasks/zoo_model.py`` is the same network, so the map is one to
one; only the values change where the two pipelines differ outside the network:

| model variable | zoo checkpoint variable | value |
| --- | --- | --- |
| backbone, i-th layer with weights (``conv1_conv``, ``conv1_bn``, ``conv2_block1_1_conv``, ...) | ``model/_feature_extractor/classification_backbone/layer_with_weights-{i}/{kernel,gamma,beta,moving_mean,moving_variance}`` | as is, except ``conv1``: the zoo feeds RGB minus (123.68, 116.779, 103.939), Model Garden (RGB/255 - mean)/std, so the kernel is scaled by 255 x std per input channel and the mean difference is folded into ``conv1_bn``'s moving mean |
| decoder ``lateral_{top}`` | ``model/_feature_extractor/_fpn_features_generator/top_layers/0/{kernel,bias}`` | as is |
| decoder ``lateral_{l}``, l = top-1 ... min | ``.../residual_blocks/{top-1-l}/0/{kernel,bias}`` | as is |
| decoder ``smoothing_{l}_conv`` / ``_norm`` | ``.../conv_layers/{top-1-l}/0/kernel`` / ``.../1/*`` | as is |
| decoder ``coarse_{l}_conv`` / ``_norm``, l > top | ``model/_feature_extractor/_coarse_feature_layers/{l-top-1}/0/kernel`` / ``.../1/*`` | as is |
| head ``classnet-conv_{i}``, ``boxnet-conv_{i}`` | ``model/_box_predictor/_head_scope_conv_layers/{Class,Box}PredictionTower/{i}/kernel`` | kernel as is; the zoo's tower convs have no bias (batch norm follows): zero |
| head ``{classnet,boxnet}-conv-norm_{level}_{i}`` | ``model/_box_predictor/_base_tower_layers_for_heads/{class_predictions_with_background,box_encodings}/{level index}/{3i+1}/*`` | as is (batch norm per level) |
| head ``scores`` | ``model/_box_predictor/_prediction_heads/class_predictions_with_background/_class_predictor_layers/0/{kernel,bias}`` | per anchor: the COCO columns of person (1) and car (3); the background output (Model Garden trains class 0 as "background") starts at kernel 0, bias logit(0.99) |
| head ``boxes`` | ``model/_box_predictor/_box_prediction_head/_box_encoder_layers/0/{kernel,bias}`` | per anchor, the 4 box-code channels (the same [10, 10, 5, 5]-scaled code) |

Anchors: the zoo orders a location's anchors aspect ratio first (ratios 1, 2, 0.5 x 2 scales),
Model Garden scale first; each model anchor takes the channels of the zoo anchor of the most
similar shape (centred IoU), so anchors the zoo lacks (another size, a 1:3 ratio) start from their
nearest zoo anchor. Variables the zoo has beyond the model (the other 88 COCO classes, optimizer
slots) are left out and counted; a zoo variable that has no place in the model, or a model
variable with no source, is an error that names it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from tasks.config import CLASSES
from tasks.errors import PersoncarError
from tasks.logs import log

VALUE = "/.ATTRIBUTES/VARIABLE_VALUE"
FE = "model/_feature_extractor"
BP = "model/_box_predictor"
ZOO_MEANS = (123.68, 116.779, 103.939)  # the OD API ResNet V1 feature extractor's preprocessing
ZOO_RATIOS = (1.0, 2.0, 0.5)            # the zoo configs' aspect_ratios, in their order
ZOO_SCALES_PER_OCTAVE = 2
ZOO_ANCHOR_SCALE = 4.0
COCO_IDS = {"person": 1, "car": 3}      # the zoo's mscoco label map
BACKGROUND_LOGIT = math.log(0.99 / 0.01)


class ZooReader:
    """Values of a zoo checkpoint by short name (without ``/.ATTRIBUTES/VARIABLE_VALUE``), with use counts."""

    def __init__(self, prefix: str, keys: dict[str, list[int]] | None = None) -> None:
        import tensorflow as tf

        self.prefix = prefix
        self._reader = tf.train.load_checkpoint(prefix)
        shapes = keys if keys is not None else self._reader.get_variable_to_shape_map()
        self.shapes = {k.removesuffix(VALUE): list(v) for k, v in shapes.items() if k.endswith(VALUE)}
        self.used: set[str] = set()

    def has(self, name: str) -> bool:
        return name in self.shapes

    def get(self, *names: str) -> np.ndarray:
        """The first of ``names`` present (the same object can be saved under either path)."""
        for name in names:
            if name in self.shapes:
                self.used.add(name)
                return self._reader.get_tensor(name + VALUE)
        raise PersoncarError(f"{self.prefix}: zoo checkpoint has no {names[0]}; is it an SSD ResNet V1 FPN "
                             "checkpoint of the TF2 detection zoo?")


def _mg_norm() -> tuple[np.ndarray, np.ndarray]:
    from official.vision.ops import preprocess_ops

    return np.asarray(preprocess_ops.MEAN_RGB), np.asarray(preprocess_ops.STDDEV_RGB)


def _layer_vars(layer: Any) -> dict[str, Any]:
    return {v.name.split("/")[-1].split(":")[0]: v for v in layer.weights}


class _Plan:
    """Assignments ``model variable <- value`` collected before any is applied (all or nothing)."""

    def __init__(self) -> None:
        self.items: list[tuple[Any, np.ndarray]] = []

    def add(self, var: Any, value: np.ndarray, source: str) -> None:
        if tuple(var.shape) != tuple(value.shape):
            raise PersoncarError(f"zoo checkpoint {source} is {list(value.shape)} but {var.name} is "
                                 f"{list(var.shape)}: another depth, width or head?")
        self.items.append((var, value.astype(var.dtype.as_numpy_dtype)))

    def apply(self) -> int:
        for var, value in self.items:
            var.assign(value)
        return len(self.items)


def _copy_layer(plan: _Plan, zoo: ZooReader, layer: Any, zoo_path: str, *, fold: Callable | None = None) -> None:
    """A Conv2D (kernel [, bias]) or BatchNormalization layer from the zoo object at ``zoo_path``."""
    names = _layer_vars(layer)
    for name, var in names.items():
        if name == "bias" and not zoo.has(f"{zoo_path}/bias"):
            plan.add(var, np.zeros(var.shape), f"{zoo_path} (no bias: zero)")
            continue
        value = zoo.get(f"{zoo_path}/{name}")
        if fold is not None:
            value = fold(name, value)
        plan.add(var, value, f"{zoo_path}/{name}")


def _plan_backbone(plan: _Plan, zoo: ZooReader, backbone: Any) -> None:
    weighted = [layer for layer in backbone.layers if layer.weights]
    zoo_count = len({k.split("/")[3] for k in zoo.shapes if k.startswith(f"{FE}/classification_backbone/")})
    if zoo_count != len(weighted):
        raise PersoncarError(f"zoo checkpoint backbone has {zoo_count} layers with weights, the model's "
                             f"{len(weighted)}: another ResNet depth (set --backbone / the model to match)")
    mean, std = _mg_norm()
    conv1 = zoo.get(f"{FE}/classification_backbone/layer_with_weights-0/kernel")
    offset = np.einsum("hwco,c->o", conv1, mean - np.asarray(ZOO_MEANS))  # conv1 of the mean difference

    def fold_conv1(name: str, value: np.ndarray) -> np.ndarray:
        return value * std[None, None, :, None] if name == "kernel" else value

    def fold_bn1(name: str, value: np.ndarray) -> np.ndarray:
        return value - offset if name == "moving_mean" else value

    for i, layer in enumerate(weighted):
        fold = fold_conv1 if i == 0 else fold_bn1 if i == 1 else None
        _copy_layer(plan, zoo, layer, f"{FE}/classification_backbone/layer_with_weights-{i}", fold=fold)


def _plan_decoder(plan: _Plan, zoo: ZooReader, decoder: Any) -> None:
    levels = sorted(int(k) for k in decoder.output_specs)
    laterals = sorted(int(layer.name.split("_")[1]) for layer in decoder.layers if layer.name.startswith("lateral_"))
    top = max(laterals)
    fpn = f"{FE}/_fpn_features_generator"
    for layer in decoder.layers:
        if not layer.weights:
            continue
        kind, level = layer.name.split("_")[0], int(layer.name.split("_")[1])
        if kind == "lateral":
            path = f"{fpn}/top_layers/0" if level == top else f"{fpn}/residual_blocks/{top - 1 - level}/0"
        elif kind == "smoothing":
            path = f"{fpn}/conv_layers/{top - 1 - level}/{0 if layer.name.endswith('_conv') else 1}"
        elif kind == "coarse":
            path = f"{FE}/_coarse_feature_layers/{level - top - 1}/{0 if layer.name.endswith('_conv') else 1}"
        else:
            raise PersoncarError(f"decoder layer {layer.name} has no zoo counterpart (not an ssd_fpn decoder?)")
        _copy_layer(plan, zoo, layer, path)
    if levels[0] != min(laterals):
        raise PersoncarError("decoder levels do not start at its lowest backbone level")


def anchor_shapes(anchor_size: float, num_scales: int, ratios: tuple[float, ...], order: str) -> list[tuple[float, float]]:
    """(width, height) in strides of a location's anchors, Model Garden's order or the zoo's."""
    def shape(scale: int, ratio: float) -> tuple[float, float]:
        base = anchor_size * 2 ** (scale / num_scales)
        return base * math.sqrt(ratio), base / math.sqrt(ratio)

    if order == "model_garden":
        return [shape(s, r) for s in range(num_scales) for r in ratios]
    return [shape(s, r) for r in ratios for s in range(num_scales)]


def anchor_map(model_cfg: Any) -> list[int]:
    """For each model anchor (Model Garden order), the zoo anchor of the most similar shape."""
    mine = anchor_shapes(model_cfg.anchor.anchor_size, model_cfg.anchor.num_scales,
                         tuple(model_cfg.anchor.aspect_ratios), "model_garden")
    zoo = anchor_shapes(ZOO_ANCHOR_SCALE, ZOO_SCALES_PER_OCTAVE, ZOO_RATIOS, "zoo")

    def iou(a: tuple[float, float], b: tuple[float, float]) -> float:
        inter = min(a[0], b[0]) * min(a[1], b[1])
        return inter / (a[0] * a[1] + b[0] * b[1] - inter)

    return [max(range(len(zoo)), key=lambda j, m=m: iou(m, zoo[j])) for m in mine]


def _plan_head(plan: _Plan, zoo: ZooReader, head: Any, model_cfg: Any) -> dict[str, Any]:
    amap = anchor_map(model_cfg)
    n_zoo = len(ZOO_RATIOS) * ZOO_SCALES_PER_OCTAVE
    num_classes = model_cfg.num_classes
    min_level = model_cfg.min_level
    towers = {"classnet": ("ClassPredictionTower", "class_predictions_with_background"),
              "boxnet": ("BoxPredictionTower", "box_encodings")}
    cls_path = f"{BP}/_prediction_heads/class_predictions_with_background/_class_predictor_layers/0"
    box_path = f"{BP}/_box_prediction_head/_box_encoder_layers/0"
    cls_k, cls_b = zoo.get(f"{cls_path}/kernel"), zoo.get(f"{cls_path}/bias")
    slots = cls_k.shape[-1] // n_zoo
    if slots * n_zoo != cls_k.shape[-1] or slots not in (90, 91):
        raise PersoncarError(f"zoo class predictor has {cls_k.shape[-1]} outputs, not 6 anchors x 90 or 91 COCO "
                             "classes: not a COCO checkpoint of the zoo")
    column = {name: (coco if slots == 91 else coco - 1) for name, coco in COCO_IDS.items()}
    box_k, box_b = zoo.get(f"{box_path}/kernel"), zoo.get(f"{box_path}/bias")
    for var in head.weights:
        short = var.name.split("/", 1)[1].split(":")[0]  # e.g. classnet-conv_0/kernel
        layer, name = short.rsplit("/", 1)
        net = layer.split("-")[0]
        if layer.startswith(("classnet-conv-norm_", "boxnet-conv-norm_")):
            level, i = (int(x) for x in layer.rsplit("_", 2)[-2:])
            tower = towers[net][1]
            src = f"{BP}/_base_tower_layers_for_heads/{tower}/{level - min_level}/{3 * i + 1}/{name}"
            plan.add(var, zoo.get(src), src)
        elif layer.startswith(("classnet-conv_", "boxnet-conv_")):
            i = int(layer.rsplit("_", 1)[1])
            scope, tower = towers[net]
            if name == "bias":
                plan.add(var, np.zeros(var.shape), f"{scope}/{i} (no bias: zero)")
                continue
            src = f"{BP}/_head_scope_conv_layers/{scope}/{i}/kernel"
            plan.add(var, zoo.get(src, f"{BP}/_base_tower_layers_for_heads/{tower}/0/{3 * i}/kernel"), src)
        elif layer == "scores":
            zk, zb = (cls_k, cls_b)
            out = np.zeros(var.shape, dtype=np.float32)
            for a, za in enumerate(amap):
                out[..., a * num_classes] = 0.0 if name == "kernel" else BACKGROUND_LOGIT
                for cid, cname in CLASSES.items():
                    src_ch = za * slots + column[cname]
                    out[..., a * num_classes + cid] = (zk if name == "kernel" else zb)[..., src_ch]
            plan.add(var, out, f"{cls_path}/{name} (COCO {', '.join(f'{k}={v}' for k, v in COCO_IDS.items())})")
        elif layer == "boxes":
            z = box_k if name == "kernel" else box_b
            out = np.concatenate([z[..., za * 4:(za + 1) * 4] for za in amap], axis=-1)
            plan.add(var, out, f"{box_path}/{name}")
        else:
            raise PersoncarError(f"head variable {var.name} has no zoo counterpart")
    return {"anchor_map": amap, "class_columns": column, "zoo_class_slots": slots}


def convert_into(model: Any, prefix: str, modules: tuple[str, ...], model_cfg: Any, *,
                 keys: dict[str, Any] | None = None) -> dict[str, Any]:
    """Assign the zoo checkpoint at ``prefix`` to ``model``'s ``modules`` (``model_cfg``: its Model
    Garden model config, for anchors and classes); what was converted."""
    zoo = ZooReader(prefix, keys)
    plan = _Plan()
    info: dict[str, Any] = {}
    if "backbone" in modules:
        _plan_backbone(plan, zoo, model.backbone)
    if "decoder" in modules:
        _plan_decoder(plan, zoo, model.decoder)
    if "head" in modules:
        info = _plan_head(plan, zoo, model.head, model_cfg)
    wanted_roots = {"backbone": (f"{FE}/classification_backbone/",),
                    "decoder": (f"{FE}/_fpn_features_generator/", f"{FE}/_coarse_feature_layers/"),
                    "head": (f"{BP}/",)}
    roots = [r for m in modules for r in wanted_roots[m]]
    unused = sorted(k for k in zoo.shapes if k.startswith(tuple(roots)) and k not in zoo.used)
    if unused:
        raise PersoncarError(f"zoo checkpoint variable {unused[0]} (and {len(unused) - 1} more) has no place in the "
                             "model: another architecture?")
    count = plan.apply()
    ignored = [k for k in zoo.shapes if k not in zoo.used]
    log.info("convert: %d model variables from %d zoo variables of %s (%d zoo variables left out: optimizer "
             "or tracking variables)", count, len(zoo.used), prefix, len(ignored))
    return {"variables": count, "zoo_variables_used": len(zoo.used), "zoo_variables_left_out": len(ignored), **info}


def convert_to_dir(src: str, out: str, run: Any) -> dict[str, Any]:
    """``personcar convert-checkpoint``: the zoo checkpoint ``src`` as a checkpoint of ``run``'s model in ``out``."""
    import json
    import tempfile
    from pathlib import Path

    import tensorflow as tf

    from tasks import checkpoints
    from tasks.artifacts import StageOutputs, atomic_dir, write_json_atomic
    from tasks.train import build_experiment

    prefix = checkpoints.fetch(src)
    keys = checkpoints.variables(prefix)
    fmt, have = checkpoints.checkpoint_format(keys)
    if fmt != "od_api":
        raise PersoncarError(f"{src}: not a TF2 detection zoo checkpoint (it holds {', '.join(have)} at the top "
                             "level: use it as init_checkpoint directly)")
    with tempfile.TemporaryDirectory(prefix="personcar-convert-") as data:
        exp = build_experiment(run, data, gpus=0)
    from official.core import task_factory

    model = task_factory.get_task(exp.task).build_model()
    report = convert_into(model, prefix, tuple(have), exp.task.model, keys=keys)
    out_path = Path(out)
    outputs = StageOutputs("convert-checkpoint", "conversion.json", keys=("source", "variables"),
                           names=("ckpt-*", "conversion.json"))
    with atomic_dir(out_path, outputs) as tmp:
        saved = tf.train.Checkpoint(**{m: getattr(model, m) for m in have}).write(str(tmp / "ckpt-1"))
        write_json_atomic(tmp / "conversion.json", {
            "source": src, "source_prefix": prefix, "model": run.model, "modules": list(have),
            "checkpoint": Path(saved).name, **report})
    log.info("convert: wrote %s (%s) to %s", Path(saved).name, "+".join(have), out_path)
    return {"out": str(out_path), "checkpoint": str(out_path / Path(saved).name), "model": run.model,
            "modules": list(have), **{k: v for k, v in report.items() if not isinstance(v, (list, dict))},
            "conversion": json.loads((out_path / "conversion.json").read_text())["class_columns"]}
