"""Unit tests: what the hardware (or ``--cpu-replicas``) implies for replicas, precision and XLA."""

from __future__ import annotations

import pytest

from tasks.devices import CPU_REPLICAS_ENV, Compute, plan
from tasks.errors import PersoncarError


def test_gpus_train_mixed_float16_with_a_dynamic_loss_scale_and_xla(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CPU_REPLICAS_ENV, "2")  # ignored where GPUs are used
    assert plan(2) == Compute("gpu", 2, "float16", True)
    assert plan(1, 4) == Compute("gpu", 1, "float16", True)
    assert (plan(2).policy, plan(2).loss_scale) == ("mixed_float16", "dynamic")


def test_the_cpu_trains_float32_on_one_replica_unless_cpu_replicas_are_asked_for(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CPU_REPLICAS_ENV, raising=False)
    cpu = plan(0)
    assert cpu == Compute("cpu", 1, "float32", False) and (cpu.policy, cpu.loss_scale) == ("float32", None)
    assert plan(0, 2) == Compute("cpu", 2, "float16", True)  # the GPU code paths on two logical CPUs
    monkeypatch.setenv(CPU_REPLICAS_ENV, "3")
    assert plan(0) == Compute("cpu", 3, "float16", True)
    assert plan(0, 0) == cpu  # the flag wins over the environment
    monkeypatch.setenv(CPU_REPLICAS_ENV, "two")
    with pytest.raises(PersoncarError, match=r"PERSONCAR_CPU_REPLICAS='two': expected a number of CPU replicas"):
        plan(0)
