"""Precision choice: explicit values pass through; ``auto`` on a CPU follows AMX, then the timing probe."""

from __future__ import annotations

import torch

from normsoftmax import runtime
from normsoftmax.config import TrainConfig
from normsoftmax.training.recipe import differing_fields

CPU = torch.device("cpu")


def test_explicit_precisions_pass_through(monkeypatch):
    monkeypatch.setattr(runtime, "cpu_bf16_speedup", lambda: (_ for _ in ()).throw(AssertionError("probed")))
    for amp in ("none", "bf16", "fp16"):
        assert runtime.resolve_amp(amp, CPU) == amp


def test_auto_on_a_cpu_follows_native_bf16_amx_and_the_probe(monkeypatch):
    speedup = {"value": 2.0}
    monkeypatch.setattr(runtime, "cpu_bf16_speedup", lambda: speedup["value"])
    monkeypatch.setattr(runtime, "bf16_is_native", lambda device: False)
    assert runtime.resolve_amp("auto", CPU) == "none"  # emulated bf16 is never chosen
    monkeypatch.setattr(runtime, "bf16_is_native", lambda device: True)
    monkeypatch.setattr(runtime, "amx_is_available", lambda: True)
    speedup["value"] = 0.5
    assert runtime.resolve_amp("auto", CPU) == "bf16"  # AMX: no probe needed
    monkeypatch.setattr(runtime, "amx_is_available", lambda: False)
    assert runtime.resolve_amp("auto", CPU) == "none"
    speedup["value"] = runtime.BF16_PROBE_MARGIN - 0.1
    assert runtime.resolve_amp("auto", CPU) == "none"
    speedup["value"] = runtime.BF16_PROBE_MARGIN + 0.1
    assert runtime.resolve_amp("auto", CPU) == "bf16"


def test_the_probe_measures_once_and_leaves_the_random_state_alone():
    runtime.cpu_bf16_speedup.cache_clear()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    speedup = runtime.cpu_bf16_speedup()
    assert torch.equal(torch.rand(3), expected)
    assert speedup > 0 and runtime.cpu_bf16_speedup() == speedup  # cached: the same answer within a process


def test_auto_accepts_the_precision_a_stored_run_resolved():
    stored = {"amp": "bf16", "lr": 0.01}
    assert differing_fields(TrainConfig(amp="auto", lr=0.01), stored) == []
    assert differing_fields(TrainConfig(amp="none", lr=0.01), stored) == ["amp"]
    assert differing_fields(TrainConfig(amp="auto", lr=0.02), stored) == ["lr"]
