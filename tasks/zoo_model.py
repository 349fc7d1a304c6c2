"""The TF2 zoo's SSD ResNet V1 FPN, layer for layer, as Model Garden RetinaNet components.

Model Garden's RetinaNet is the same family, but its own ResNet is v1.5 (stride in the 3x3 conv)
and its FPN normalises every level without an activation. The zoo's
``ssd_resnet{50,101,152}_v1_fpn_640x640_coco17_tpu-8`` (the model this project is named after, and
the COCO checkpoints users fine-tune from) differs in exactly these places; here they are, so that
a zoo checkpoint converts onto the model variable for variable and computes the same function:

- backbone ``resnet_v1``: ``tf_keras.applications`` ResNet V1 (stride in the first 1x1 conv of a
  stage) built with the TF Object Detection API's layer overrides: convolutions without bias,
  explicit fixed padding before strided kxk convolutions, "same" max pooling, the configured
  activation (the zoo: relu6) and batch-norm settings. Depths 50/101/152 are Keras' own; 26
  (two bottleneck blocks a stage) is a small variant for CPU smoke runs. ``depth_multiplier``
  scales every convolution's filters as the OD API's override does.
- decoder ``ssd_fpn``: the OD API's ``KerasFpnTopDownFeatureMaps`` plus its coarse layers: 1x1
  projections with bias; the top level is the projection alone; lower levels add the upsampled
  level above and apply a 3x3 smoothing conv + batch norm + activation; levels above the backbone
  are 3x3 stride-2 convs + batch norm + activation on the level below.
- The head is Model Garden's ``RetinaNetHead`` with shared convs and per-level batch norm, which
  is the zoo's weight-shared box predictor (its tower convs carry a zero bias here).

Importing this module registers both builders and the ``personcar_ssd_resnet_fpn`` experiment
(``retinanet_resnetfpn_coco`` whose backbone and decoder configs also accept these types).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import tensorflow as tf
import tf_keras
from official.core import config_definitions as cfg
from official.core import exp_factory
from official.modeling import hyperparams, tf_utils
from official.vision.configs import backbones as backbones_cfg
from official.vision.configs import decoders as decoders_cfg
from official.vision.configs import retinanet as retinanet_cfg
from official.vision.modeling.backbones import factory as backbone_factory
from official.vision.modeling.decoders import factory as decoder_factory
from tf_keras.src.applications import resnet as keras_resnet

EXPERIMENT = "personcar_ssd_resnet_fpn"
# Keras' layer names of the stage outputs that feed the FPN (levels 2..5), per depth.
STAGE_BLOCKS = {26: (2, 2, 2, 2), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}


# --------------------------------------------------------------------------- configs


@dataclasses.dataclass
class ResNetV1(hyperparams.Config):
    """ResNet V1 as the TF OD API builds it from ``tf.keras.applications``."""

    model_id: int = 152
    depth_multiplier: float = 1.0
    min_depth: int = 16  # the zoo's feature extractor min_depth


@dataclasses.dataclass
class SsdFpn(hyperparams.Config):
    """The OD API's FPN top-down maps and coarse layers (``ssd_resnet_v1_fpn_keras``)."""

    num_filters: int = 256


@dataclasses.dataclass
class Backbone(backbones_cfg.Backbone):
    resnet_v1: ResNetV1 = dataclasses.field(default_factory=ResNetV1)


@dataclasses.dataclass
class Decoder(decoders_cfg.Decoder):
    ssd_fpn: SsdFpn = dataclasses.field(default_factory=SsdFpn)


@dataclasses.dataclass
class RetinaNet(retinanet_cfg.RetinaNet):
    backbone: Backbone = dataclasses.field(default_factory=lambda: Backbone(type="resnet_v1"))
    decoder: Decoder = dataclasses.field(default_factory=lambda: Decoder(type="ssd_fpn"))


@exp_factory.register_config_factory(EXPERIMENT)
def personcar_ssd_resnet_fpn() -> cfg.ExperimentConfig:
    """``retinanet_resnetfpn_coco`` with the zoo's backbone and decoder available as types."""
    exp = exp_factory.get_exp_config("retinanet_resnetfpn_coco")
    model = RetinaNet(**{f.name: getattr(exp.task.model, f.name) for f in dataclasses.fields(retinanet_cfg.RetinaNet)
                         if f.name not in ("backbone", "decoder")})
    exp.task.model = model
    return exp


# --------------------------------------------------------------------------- backbone


def _fixed_padding(x: tf.Tensor, kernel_size: int) -> tf.Tensor:
    total = kernel_size - 1
    beg = total // 2
    return tf.pad(x, [[0, 0], [beg, total - beg], [beg, total - beg], [0, 0]])


class _OdApiLayers:
    """The layer factory ``tf_keras.applications.resnet`` builds with, as the OD API overrides it."""

    def __init__(self, *, activation: str, momentum: float, epsilon: float, depth_multiplier: float,
                 min_depth: int, kernel_regularizer: Any, use_sync_bn: bool) -> None:
        self._activation = activation
        self._bn = {"momentum": momentum, "epsilon": epsilon, "synchronized": use_sync_bn}
        self._depth_multiplier, self._min_depth = depth_multiplier, min_depth
        self._regularizer = kernel_regularizer

    def Conv2D(self, filters: int, kernel_size: int, **kwargs: Any) -> Any:
        filters = max(int(filters * self._depth_multiplier), self._min_depth)
        kwargs.update(use_bias=False, padding="same", kernel_regularizer=self._regularizer,
                      kernel_initializer="VarianceScaling")
        stride = kwargs.get("strides", 1)
        stride = stride[0] if isinstance(stride, (tuple, list)) else stride
        if stride > 1 and kernel_size > 1:
            kwargs["padding"] = "valid"
            conv = tf_keras.layers.Conv2D(filters, kernel_size, **kwargs)
            pad = tf_keras.layers.Lambda(lambda x: _fixed_padding(x, kernel_size))
            return lambda x: conv(pad(x))
        return tf_keras.layers.Conv2D(filters, kernel_size, **kwargs)

    def Activation(self, *args: Any, **kwargs: Any) -> Any:
        return tf_keras.layers.Activation(tf_utils.get_activation(self._activation), name=kwargs.get("name"))

    def BatchNormalization(self, **kwargs: Any) -> Any:
        return tf_keras.layers.BatchNormalization(axis=-1, name=kwargs.get("name"), **self._bn)

    def MaxPooling2D(self, pool_size: int, **kwargs: Any) -> Any:
        kwargs["padding"] = "same"
        return tf_keras.layers.MaxPooling2D(pool_size, **kwargs)

    def ZeroPadding2D(self, padding: Any, **kwargs: Any) -> Any:
        return lambda x: x  # the OD API replaces Keras' explicit padding with the fixed padding above

    def __getattr__(self, item: str) -> Any:
        return getattr(tf_keras.layers, item)


class _LevelsModel(tf_keras.Model):
    """A functional model whose outputs are a dict of levels, with Model Garden's ``output_specs``."""

    def __init__(self, config: dict[str, Any], inputs: Any, outputs: dict[str, tf.Tensor], **kwargs: Any) -> None:
        self._config = config
        self._output_specs = {level: outputs[level].get_shape() for level in sorted(outputs, key=int)}
        super().__init__(inputs=inputs, outputs=outputs, **kwargs)

    @property
    def output_specs(self) -> dict[str, tf.TensorShape]:
        return self._output_specs

    def get_config(self) -> dict[str, Any]:
        return dict(self._config)


class ResNetV1Backbone(_LevelsModel):
    """Levels 2..5 of ResNet V1 (``conv{2..5}_block*_out``) as a dict, like Model Garden's backbones."""

    def __init__(self, model_id: int, input_specs: tf_keras.layers.InputSpec, *, activation: str = "relu6",
                 norm_momentum: float = 0.997, norm_epsilon: float = 0.001, depth_multiplier: float = 1.0,
                 min_depth: int = 16, kernel_regularizer: Any = None, use_sync_bn: bool = False,
                 **kwargs: Any) -> None:
        if model_id not in STAGE_BLOCKS:
            raise ValueError(f"resnet_v1 depth {model_id} is not one of {sorted(STAGE_BLOCKS)}")
        config = {"model_id": model_id, "input_specs": input_specs, "activation": activation,
                  "norm_momentum": norm_momentum, "norm_epsilon": norm_epsilon,
                  "depth_multiplier": depth_multiplier, "min_depth": min_depth,
                  "kernel_regularizer": kernel_regularizer, "use_sync_bn": use_sync_bn}
        overrides = _OdApiLayers(activation=activation, momentum=norm_momentum, epsilon=norm_epsilon,
                                 depth_multiplier=depth_multiplier, min_depth=min_depth,
                                 kernel_regularizer=kernel_regularizer, use_sync_bn=use_sync_bn)
        blocks = STAGE_BLOCKS[model_id]

        def stacks(x: tf.Tensor) -> tf.Tensor:
            x = keras_resnet.stack1(x, 64, blocks[0], stride1=1, name="conv2")
            x = keras_resnet.stack1(x, 128, blocks[1], name="conv3")
            x = keras_resnet.stack1(x, 256, blocks[2], name="conv4")
            return keras_resnet.stack1(x, 512, blocks[3], name="conv5")

        inputs = tf_keras.Input(shape=input_specs.shape[1:])
        full = keras_resnet.ResNet(stacks, preact=False, use_bias=False, model_name=f"resnet{model_id}_v1",
                                   include_top=False, weights=None, input_tensor=inputs, layers=overrides)
        endpoints = {str(level): full.get_layer(f"conv{level}_block{blocks[level - 2]}_out").output
                     for level in range(2, 6)}
        super().__init__(config, inputs, endpoints, **kwargs)


@backbone_factory.register_backbone_builder("resnet_v1")
def build_resnet_v1(input_specs: Any, backbone_config: Any, norm_activation_config: Any,
                    l2_regularizer: Any = None) -> tf_keras.Model:
    c = backbone_config.get()
    return ResNetV1Backbone(
        c.model_id, input_specs, activation=norm_activation_config.activation,
        norm_momentum=norm_activation_config.norm_momentum, norm_epsilon=norm_activation_config.norm_epsilon,
        depth_multiplier=c.depth_multiplier, min_depth=c.min_depth, kernel_regularizer=l2_regularizer,
        use_sync_bn=norm_activation_config.use_sync_bn)


# --------------------------------------------------------------------------- decoder


class SsdFpnDecoder(_LevelsModel):
    """The OD API's FPN for SSD: ``{'3': P3, ..., '7': P7}`` from backbone levels ``min_level..5``."""

    def __init__(self, input_specs: dict[str, tf.TensorShape], *, min_level: int = 3, max_level: int = 7,
                 num_filters: int = 256, activation: str = "relu6", norm_momentum: float = 0.997,
                 norm_epsilon: float = 0.001, kernel_regularizer: Any = None, use_sync_bn: bool = False,
                 **kwargs: Any) -> None:
        config = {"input_specs": input_specs, "min_level": min_level, "max_level": max_level,
                  "num_filters": num_filters, "activation": activation, "norm_momentum": norm_momentum,
                  "norm_epsilon": norm_epsilon, "kernel_regularizer": kernel_regularizer, "use_sync_bn": use_sync_bn}
        top = min(max_level, max(int(k) for k in input_specs))
        inputs = {level: tf_keras.Input(shape=spec[1:]) for level, spec in input_specs.items()}
        conv = {"kernel_regularizer": kernel_regularizer, "padding": "same"}
        bn = {"axis": -1, "momentum": norm_momentum, "epsilon": norm_epsilon, "synchronized": use_sync_bn}

        def smoothed(x: tf.Tensor, name: str, strides: int = 1) -> tf.Tensor:
            x = tf_keras.layers.Conv2D(num_filters, 3, strides=strides, use_bias=False, name=f"{name}_conv", **conv)(x)
            x = tf_keras.layers.BatchNormalization(name=f"{name}_norm", **bn)(x)
            return tf_utils.get_activation(activation, use_keras_layer=True)(x)

        feats = {str(top): tf_keras.layers.Conv2D(num_filters, 1, name=f"lateral_{top}", **conv)(inputs[str(top)])}
        for level in range(top - 1, min_level - 1, -1):
            lateral = tf_keras.layers.Conv2D(num_filters, 1, name=f"lateral_{level}", **conv)(inputs[str(level)])
            up = tf_keras.layers.UpSampling2D(2, interpolation="nearest")(feats[str(level + 1)])
            feats[str(level)] = smoothed(tf_keras.layers.Add()([up, lateral]), f"smoothing_{level}")
        for level in range(top + 1, max_level + 1):
            feats[str(level)] = smoothed(feats[str(level - 1)], f"coarse_{level}", strides=2)
        self._levels = tuple(inputs)
        super().__init__(config, inputs, feats, **kwargs)

    def call(self, inputs: dict[str, tf.Tensor], training: Any = None, mask: Any = None) -> dict[str, tf.Tensor]:
        # The backbone returns level 2 as well; Keras would warn in every training log that it is ignored.
        return super().call({level: inputs[level] for level in self._levels}, training=training, mask=mask)


@decoder_factory.register_decoder_builder("ssd_fpn")
def build_ssd_fpn(input_specs: dict[str, tf.TensorShape], model_config: Any,
                  l2_regularizer: Any = None) -> tf_keras.Model:
    na = model_config.norm_activation
    return SsdFpnDecoder(
        {k: v for k, v in input_specs.items() if int(k) >= model_config.min_level},
        min_level=model_config.min_level, max_level=model_config.max_level,
        num_filters=model_config.decoder.get().num_filters, activation=na.activation,
        norm_momentum=na.norm_momentum, norm_epsilon=na.norm_epsilon, kernel_regularizer=l2_regularizer,
        use_sync_bn=na.use_sync_bn)
