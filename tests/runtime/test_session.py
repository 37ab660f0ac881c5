"""Sessions: providers asked versus obtained, signatures, CUDA on a GPU machine only."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from runtime.errors import DeviceUnavailable
from runtime.session import CUDA, SessionSettings, conflicting_onnxruntime_installs, create_session
from tests.models import dense_model, sequence_model

HAS_CUDA = CUDA in ort.get_available_providers()


def test_cpu_session_reports_what_it_obtained_and_its_signature() -> None:
    session = create_session(dense_model().SerializeToString(), SessionSettings(device="cpu"))
    assert session.obtained == ["CPUExecutionProvider"] and session.device == "cpu"
    assert [s.describe() for s in session.signature.inputs] == ["x: FP32[?,4]"]
    assert [s.name for s in session.signature.outputs] == ["y", "s"]
    assert session.signature.batchable


def test_auto_falls_back_to_cpu_when_cuda_is_not_obtained() -> None:
    session = create_session(sequence_model().SerializeToString(), SessionSettings(device="auto"))
    assert session.device == ("cuda" if HAS_CUDA else "cpu")


@pytest.mark.skipif(HAS_CUDA, reason="this onnxruntime offers CUDA")
def test_cuda_without_cuda_fails_with_a_clear_message() -> None:
    with pytest.raises(DeviceUnavailable, match="device = cuda.*offers only.*gpu extra"):
        create_session(dense_model().SerializeToString(), SessionSettings(device="cuda"))


def test_one_onnxruntime_distribution_is_installed() -> None:
    assert conflicting_onnxruntime_installs() == []


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs onnxruntime-gpu with a CUDA device")
def test_cuda_is_obtained_and_matches_cpu() -> None:
    model = dense_model(features=64, units=32).SerializeToString()
    gpu = create_session(model, SessionSettings(device="cuda"))
    cpu = create_session(model, SessionSettings(device="cpu"))
    assert gpu.device == "cuda"
    x = np.random.default_rng(0).normal(size=(8, 64)).astype(np.float32)
    for got, want in zip(gpu.run({"x": x}), cpu.run({"x": x}), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)
