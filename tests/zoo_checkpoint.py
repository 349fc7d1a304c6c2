"""A checkpoint with the TF2 detection zoo's variable names and shapes, and the zoo network's forward pass.

Built independently of the converter: the backbone's ``layer_with_weights-{i}`` order and shapes
come from Keras' own ``tf_keras.applications`` ResNet V1 (plain layers, conv biases dropped as
the OD API builds it), the FPN and box predictor names from the OD API's object graph
(``KerasFpnTopDownFeatureMaps``, the coarse layers, ``WeightSharedConvolutionalBoxPredictor``).
``zoo_forward`` computes the zoo network from those values with raw TensorFlow ops, as the OD API
defines it (RGB minus the channel means, fixed padding before conv1, "same" max pool, ResNet V1
blocks with relu6, projections with bias, smoothing and coarse convs with batch norm and relu6,
per-level batch norm in the towers), so a conversion can be checked number for number.
"""

from __future__ import annotations

from typing import Any

import numpy as np

VALUE = "/.ATTRIBUTES/VARIABLE_VALUE"
FE = "model/_feature_extractor"
BP = "model/_box_predictor"
MEANS = (123.68, 116.779, 103.939)
EPS = 0.001
BLOCKS = {26: (2, 2, 2, 2), 50: (3, 4, 6, 3), 152: (3, 8, 36, 3)}


def keras_backbone_layers(depth: int, width: float) -> list[tuple[str, str, tuple[int, ...]]]:
    """``(layer name, 'conv'|'bn', kernel or channel shape)`` of Keras' ResNet V1 layers with weights, in order."""
    import tf_keras
    from tf_keras.src.applications import resnet

    class Widened:  # only scales filters, as the OD API's depth_multiplier does; layers otherwise Keras' own
        def Conv2D(self, filters: int, kernel: int, **kwargs: Any) -> Any:
            return tf_keras.layers.Conv2D(max(int(filters * width), 16), kernel, **kwargs)

        def __getattr__(self, item: str) -> Any:
            return getattr(tf_keras.layers, item)

    blocks = BLOCKS[depth]

    def stacks(x: Any) -> Any:
        x = resnet.stack1(x, 64, blocks[0], stride1=1, name="conv2")
        x = resnet.stack1(x, 128, blocks[1], name="conv3")
        x = resnet.stack1(x, 256, blocks[2], name="conv4")
        return resnet.stack1(x, 512, blocks[3], name="conv5")

    model = resnet.ResNet(stacks, False, True, include_top=False, weights=None, input_shape=(64, 64, 3),
                          layers=Widened())
    out = []
    for layer in model.layers:
        if isinstance(layer, tf_keras.layers.Conv2D):
            out.append((layer.name, "conv", tuple(layer.kernel.shape)))
        elif isinstance(layer, tf_keras.layers.BatchNormalization):
            out.append((layer.name, "bn", (layer.gamma.shape[0],)))
    return out


def zoo_variables(depth: int = 26, width: float = 0.5, fpn: int = 64, tower_convs: int = 2,
                  slots: int = 91, seed: int = 0) -> dict[str, np.ndarray]:
    """{zoo variable name (no VARIABLE_VALUE suffix): random value} for an SSD ResNet V1 FPN, levels 3-7."""
    rng = np.random.default_rng(seed)

    def w(*shape: int) -> np.ndarray:
        return (rng.normal(0, 1, shape) / np.sqrt(np.prod(shape[:-1]))).astype(np.float32)

    def bn(prefix: str, c: int, out: dict) -> None:
        out[f"{prefix}/gamma"] = rng.uniform(0.5, 1.5, c).astype(np.float32)
        out[f"{prefix}/beta"] = rng.normal(0, 0.1, c).astype(np.float32)
        out[f"{prefix}/moving_mean"] = rng.normal(0, 0.5, c).astype(np.float32)
        out[f"{prefix}/moving_variance"] = rng.uniform(0.5, 2.0, c).astype(np.float32)

    v: dict[str, np.ndarray] = {}
    layers = keras_backbone_layers(depth, width)
    for i, (_, kind, shape) in enumerate(layers):
        p = f"{FE}/classification_backbone/layer_with_weights-{i}"
        if kind == "conv":
            v[f"{p}/kernel"] = w(*shape)
        else:
            bn(p, shape[0], v)
    # channels of C3, C4, C5: the last conv of conv3/conv4/conv5
    chans = {lvl: [s for n, k, s in layers if n.startswith(f"conv{lvl}_") and k == "conv"][-1][-1] for lvl in (3, 4, 5)}
    g = f"{FE}/_fpn_features_generator"
    v[f"{g}/top_layers/0/kernel"], v[f"{g}/top_layers/0/bias"] = w(1, 1, chans[5], fpn), rng.normal(0, .1, fpn).astype(np.float32)
    for idx, lvl in enumerate((4, 3)):
        v[f"{g}/residual_blocks/{idx}/0/kernel"] = w(1, 1, chans[lvl], fpn)
        v[f"{g}/residual_blocks/{idx}/0/bias"] = rng.normal(0, .1, fpn).astype(np.float32)
        v[f"{g}/conv_layers/{idx}/0/kernel"] = w(3, 3, fpn, fpn)
        bn(f"{g}/conv_layers/{idx}/1", fpn, v)
    for idx in range(2):
        v[f"{FE}/_coarse_feature_layers/{idx}/0/kernel"] = w(3, 3, fpn, fpn)
        bn(f"{FE}/_coarse_feature_layers/{idx}/1", fpn, v)
    for scope, tower in (("BoxPredictionTower", "box_encodings"), ("ClassPredictionTower", "class_predictions_with_background")):
        for i in range(tower_convs):
            v[f"{BP}/_head_scope_conv_layers/{scope}/{i}/kernel"] = w(3, 3, fpn, fpn)
            for lvl in range(5):
                bn(f"{BP}/_base_tower_layers_for_heads/{tower}/{lvl}/{3 * i + 1}", fpn, v)
    cls = f"{BP}/_prediction_heads/class_predictions_with_background/_class_predictor_layers/0"
    v[f"{cls}/kernel"], v[f"{cls}/bias"] = w(3, 3, fpn, 6 * slots), rng.normal(-4.6, 0.5, 6 * slots).astype(np.float32)
    box = f"{BP}/_box_prediction_head/_box_encoder_layers/0"
    v[f"{box}/kernel"], v[f"{box}/bias"] = w(3, 3, fpn, 24), rng.normal(0, 0.1, 24).astype(np.float32)
    v["save_counter"] = np.asarray(1, dtype=np.int64)  # tracking variables the zoo's checkpoints also hold
    return v


def write_zoo_checkpoint(prefix: str, values: dict[str, np.ndarray]) -> str:
    import tensorflow as tf

    names = [k if k == "save_counter" else k + VALUE for k in values]
    tf.raw_ops.SaveV2(prefix=prefix, tensor_names=names, shape_and_slices=[""] * len(names),
                      tensors=[tf.constant(x) for x in values.values()])
    return prefix


def zoo_forward(values: dict[str, np.ndarray], image: np.ndarray, *, depth: int = 26, width: float = 0.5,
                tower_convs: int = 2) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
    """The zoo network on one RGB image in [0, 255]: per level, class logits and box codes."""
    import tensorflow as tf

    layers = keras_backbone_layers(depth, width)
    index = {name: i for i, (name, _, _) in enumerate(layers)}

    def get(i: int, name: str) -> tf.Tensor:
        return tf.constant(values[f"{FE}/classification_backbone/layer_with_weights-{i}/{name}"])

    def bn_apply(x: tf.Tensor, p: str) -> tf.Tensor:
        return tf.nn.batch_normalization(x, values[f"{p}/moving_mean"], values[f"{p}/moving_variance"],
                                         values[f"{p}/beta"], values[f"{p}/gamma"], EPS)

    def conv_bn(x: tf.Tensor, name: str, stride: int = 1, act: bool = True) -> tf.Tensor:
        i = index[f"{name}_conv"]
        k = get(i, "kernel")
        if stride > 1 and k.shape[0] > 1:
            pad = k.shape[0] - 1
            x = tf.pad(x, [[0, 0], [pad // 2, pad - pad // 2], [pad // 2, pad - pad // 2], [0, 0]])
            x = tf.nn.conv2d(x, k, stride, "VALID")
        else:
            x = tf.nn.conv2d(x, k, stride, "SAME")
        x = bn_apply(x, f"{FE}/classification_backbone/layer_with_weights-{index[f'{name}_bn']}")
        return tf.nn.relu6(x) if act else x

    x = tf.constant(image[None].astype(np.float32)) - np.asarray(MEANS, np.float32)
    x = conv_bn(x, "conv1", stride=2)
    x = tf.nn.max_pool2d(x, 3, 2, "SAME")
    feats = {}
    for stage, n in zip((2, 3, 4, 5), BLOCKS[depth], strict=True):
        for b in range(1, n + 1):
            name = f"conv{stage}_block{b}"
            stride = 2 if (b == 1 and stage > 2) else 1
            shortcut = conv_bn(x, f"{name}_0", stride, act=False) if b == 1 else x
            y = conv_bn(x, f"{name}_1", stride)
            y = conv_bn(y, f"{name}_2")
            y = conv_bn(y, f"{name}_3", act=False)
            x = tf.nn.relu6(shortcut + y)
        feats[stage] = x

    def conv(x: tf.Tensor, p: str, stride: int = 1) -> tf.Tensor:
        y = tf.nn.conv2d(x, values[f"{p}/kernel"], stride, "SAME")
        return y + values[f"{p}/bias"] if f"{p}/bias" in values else y

    g = f"{FE}/_fpn_features_generator"
    p = {5: conv(feats[5], f"{g}/top_layers/0")}
    for idx, lvl in enumerate((4, 3)):
        up = tf.repeat(tf.repeat(p[lvl + 1], 2, axis=1), 2, axis=2)
        t = up + conv(feats[lvl], f"{g}/residual_blocks/{idx}/0")
        p[lvl] = tf.nn.relu6(bn_apply(conv(t, f"{g}/conv_layers/{idx}/0"), f"{g}/conv_layers/{idx}/1"))
    for idx, lvl in enumerate((6, 7)):
        c = f"{FE}/_coarse_feature_layers/{idx}"
        p[lvl] = tf.nn.relu6(bn_apply(conv(p[lvl - 1], f"{c}/0", stride=2), f"{c}/1"))
    cls_out, box_out = {}, {}
    for li, lvl in enumerate(range(3, 8)):
        outs = []
        for scope, tower in (("ClassPredictionTower", "class_predictions_with_background"),
                             ("BoxPredictionTower", "box_encodings")):
            t = p[lvl]
            for i in range(tower_convs):
                t = conv(t, f"{BP}/_head_scope_conv_layers/{scope}/{i}")
                t = tf.nn.relu6(bn_apply(t, f"{BP}/_base_tower_layers_for_heads/{tower}/{li}/{3 * i + 1}"))
            outs.append(t)
        cls_out[lvl] = conv(outs[0], f"{BP}/_prediction_heads/class_predictions_with_background/_class_predictor_layers/0").numpy()[0]
        box_out[lvl] = conv(outs[1], f"{BP}/_box_prediction_head/_box_encoder_layers/0").numpy()[0]
    return cls_out, box_out
