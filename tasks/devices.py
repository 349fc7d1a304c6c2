"""Where and how a run computes: devices, replicas, precision, XLA.

What the hardware implies: on GPUs, one replica a GPU (``MirroredStrategy`` for more than one),
the mixed float16 policy with a dynamic loss scale (Model Garden wraps the optimizer in a
``LossScaleOptimizer`` when ``runtime.mixed_precision_dtype`` is float16) and XLA
(``tf.config.optimizer.set_jit("autoclustering")``); on the CPU, one replica in float32.

``cpu_replicas`` (``personcar train --cpu-replicas N``, or ``PERSONCAR_CPU_REPLICAS=N``) runs the
GPU code paths on the CPU, for debugging and tests: N logical CPU devices under
``MirroredStrategy``, mixed float16 with the dynamic loss scale, and XLA (TensorFlow clusters
CPU ops for XLA only with ``TF_XLA_FLAGS=--tf_xla_cpu_global_jit``, which
:func:`allow_xla_on_cpu` sets before TensorFlow is imported). It must be chosen before
TensorFlow initialises its devices, i.e. in a fresh process. A GPU run is the
same with or without it: it applies only where no GPU is used.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from tasks.errors import PersoncarError

CPU_REPLICAS_ENV = "PERSONCAR_CPU_REPLICAS"
POLICIES = {"float32": "float32", "float16": "mixed_float16", "bfloat16": "mixed_bfloat16"}


@dataclass(frozen=True)
class Compute:
    """The devices a run trains on and how: ``cpu``/``gpu``, replicas, precision, XLA."""

    device: str
    replicas: int
    precision: str  # the compute dtype: float32, float16 (loss-scaled) or bfloat16
    xla: bool

    @property
    def policy(self) -> str:
        return POLICIES[self.precision]

    @property
    def loss_scale(self) -> str | None:
        return "dynamic" if self.precision == "float16" else None


def requested_cpu_replicas(cpu_replicas: int | None = None) -> int:
    """``cpu_replicas``, else ``$PERSONCAR_CPU_REPLICAS``, else 0 (the plain CPU path)."""
    if cpu_replicas is not None:
        return cpu_replicas
    raw = os.environ.get(CPU_REPLICAS_ENV, "").strip()
    if raw and not raw.isdigit():
        raise PersoncarError(f"{CPU_REPLICAS_ENV}={raw!r}: expected a number of CPU replicas")
    return int(raw) if raw else 0


def plan(gpus: int, cpu_replicas: int | None = None) -> Compute:
    """What the hardware implies (``gpus`` visible), or the GPU code paths on ``cpu_replicas`` CPUs."""
    cpu_replicas = requested_cpu_replicas(cpu_replicas)
    if gpus > 0:
        return Compute("gpu", gpus, "float16", True)
    if cpu_replicas > 0:
        return Compute("cpu", cpu_replicas, "float16", True)
    return Compute("cpu", 1, "float32", False)


def allow_xla_on_cpu() -> None:
    """Let XLA's auto-clustering take CPU ops (``--tf_xla_cpu_global_jit``); before TensorFlow is imported.

    TensorFlow reads ``TF_XLA_FLAGS`` once, when it sets up its devices: set later, it is ignored.
    Set only for a run that asks for CPU replicas (:func:`tasks.train.train`), so that a GPU run's
    clusters stay as they are.
    """
    flags = os.environ.get("TF_XLA_FLAGS", "")
    if "--tf_xla_cpu_global_jit" not in flags:
        os.environ["TF_XLA_FLAGS"] = f"{flags} --tf_xla_cpu_global_jit".strip()


@contextlib.contextmanager
def configured(tf: Any, c: Compute) -> Iterator[None]:
    """Logical CPU devices, the dtype policy and XLA for the run; the policy and jit are restored after."""
    if c.device == "cpu" and c.replicas > 1:
        _logical_cpus(tf, c.replicas)
    policy, jit = tf.keras.mixed_precision.global_policy(), tf.config.optimizer.get_jit()
    tf.keras.mixed_precision.set_global_policy(c.policy)
    tf.config.optimizer.set_jit("autoclustering" if c.xla else False)
    try:
        yield
    finally:
        tf.keras.mixed_precision.set_global_policy(policy)
        tf.config.optimizer.set_jit(jit or False)


@contextlib.contextmanager
def serving(tf: Any) -> Iterator[None]:
    """The float32 policy without XLA (an export's graph); the run's policy and jit are restored after."""
    with configured(tf, Compute("cpu", 1, "float32", False)):
        yield


def _logical_cpus(tf: Any, n: int) -> None:
    cpu = tf.config.list_physical_devices("CPU")[0]
    if len(tf.config.get_logical_device_configuration(cpu) or [None]) == n:
        return
    try:
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * n)
    except RuntimeError as exc:
        raise PersoncarError(f"{n} CPU replicas: TensorFlow already set up its devices in this process "
                             f"({len(tf.config.list_logical_devices('CPU'))} CPU); start a fresh process") from exc


def strategy(tf: Any, c: Compute) -> Any:
    if c.replicas == 1:
        return tf.distribute.OneDeviceStrategy(f"/{c.device}:0")
    return tf.distribute.MirroredStrategy([f"/{c.device}:{i}" for i in range(c.replicas)])


def in_effect(tf: Any, strategy: Any, model: Any, optimizer: Any) -> dict[str, Any]:
    """What the run really computes with, read from the objects (not from the config)."""
    scaled = isinstance(optimizer, tf.keras.mixed_precision.LossScaleOptimizer)
    return {
        "replicas": int(strategy.num_replicas_in_sync),
        "devices": list(strategy.extended.worker_devices),
        "precision": model.dtype_policy.name,
        "compute_dtype": model.compute_dtype,
        "variable_dtype": model.variable_dtype,
        "loss_scale": ("dynamic" if optimizer.dynamic else "fixed") if scaled else None,
        "loss_scale_value": float(optimizer.loss_scale.numpy()) if scaled else None,
        "xla": tf.config.optimizer.get_jit() or False,
    }
