"""The one answer to "which dtype should this device compute in": bf16 only where it is native
(AVX512-BF16 or AMX on CPUs), detected once, overridable; training's autocast follows it."""

from __future__ import annotations

import pytest
import torch

from astrai_core import capability


@pytest.fixture(autouse=True)
def fresh_detection(monkeypatch):
    monkeypatch.delenv(capability.OVERRIDE_ENV, raising=False)
    capability._detected_cpu_bf16.cache_clear()
    yield
    capability._detected_cpu_bf16.cache_clear()


@pytest.mark.parametrize(("flags", "native"), [
    ({"avx2", "fma"}, False),  # Intel/AMD without bf16 units: emulated, hundreds of times slower
    ({"avx512f", "avx512_bf16"}, True),  # AMD Zen 4, Intel Cooper Lake
    ({"avx512f", "amx_bf16", "amx_tile"}, True),  # Intel Sapphire Rapids
])
def test_cpu_bf16_is_native_only_with_bf16_instructions(monkeypatch, flags, native):
    monkeypatch.setattr(capability, "cpu_flags", lambda: flags)
    assert capability.cpu_has_native_bf16() is native
    assert capability.compute_dtype("cpu") == (torch.bfloat16 if native else torch.float32)


def test_the_override_wins_both_ways(monkeypatch):
    monkeypatch.setattr(capability, "cpu_flags", lambda: {"avx512_bf16"})
    monkeypatch.setenv(capability.OVERRIDE_ENV, "0")
    assert capability.compute_dtype("cpu") == torch.float32
    monkeypatch.setattr(capability, "cpu_flags", set)
    monkeypatch.setenv(capability.OVERRIDE_ENV, "1")
    assert capability.compute_dtype("cpu") == torch.bfloat16


def test_training_autocast_follows_the_capability(monkeypatch):
    from astrai_train.builder import autocast_dtype

    monkeypatch.setattr(capability, "cpu_flags", lambda: {"avx2"})
    assert autocast_dtype(torch.device("cpu"), "auto") is None  # fp32, no autocast
    assert autocast_dtype(torch.device("cpu"), "bfloat16") is torch.bfloat16  # asked for
    monkeypatch.setenv(capability.OVERRIDE_ENV, "1")
    assert autocast_dtype(torch.device("cpu"), "auto") is torch.bfloat16
    assert "auto dtype" in capability.describe("cpu")
