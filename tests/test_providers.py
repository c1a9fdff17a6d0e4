"""Execution providers are decided at start-up (issue 34): named ones must start or the server
refuses, chosen automatically the ones that cannot start are dropped and the fallback logged.
On this CPU-only onnxruntime a GPU provider is the real case of one that cannot start; the GPU
image's own checks (tests/test_container_images.py) cover onnxruntime-gpu without a GPU."""

from __future__ import annotations

import logging
from pathlib import Path

import onnxruntime as ort
import pytest
from pydantic import ValidationError

from fewshot_common.providers import (
    ProviderUnavailable,
    choose_providers,
    preload_gpu_libraries,
    provider_names,
    usable_providers,
    why_unusable,
)
from fewshot_service.settings import Settings

CPU_ONLY = "CUDAExecutionProvider" not in ort.get_available_providers()


def test_short_names_and_auto_become_onnxruntime_names() -> None:
    assert provider_names(["cuda", "CPU"]) == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert provider_names(["TensorRT", "cuda", "cpu"])[0] == "TensorrtExecutionProvider"
    assert provider_names(["auto"]) == provider_names([]) == []
    assert provider_names(["OpenVINOExecutionProvider"]) == ["OpenVINOExecutionProvider"]


def test_settings_take_short_names_and_refuse_unknown_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEWSHOT_PROVIDERS", "cuda,cpu")
    assert Settings().providers == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setenv("FEWSHOT_PROVIDERS", "auto")
    assert Settings().providers == []
    monkeypatch.setenv("FEWSHOT_PROVIDERS", "gpu")
    with pytest.raises(ValidationError, match="unknown execution provider gpu"):
        Settings()


def test_a_provider_this_onnxruntime_lacks_is_unusable_and_says_what_to_install() -> None:
    assert why_unusable("CPUExecutionProvider") is None
    reason = why_unusable("FooExecutionProvider")
    assert reason is not None and "has no FooExecutionProvider" in reason and ort.__version__ in reason


@pytest.mark.skipif(not CPU_ONLY, reason="needs an onnxruntime without the CUDA provider")
def test_named_cuda_without_it_refuses_with_the_reason() -> None:
    with pytest.raises(ProviderUnavailable) as raised:
        choose_providers(["CUDAExecutionProvider", "CPUExecutionProvider"])
    message = str(raised.value)
    assert "--providers asks for CUDAExecutionProvider" in message
    assert "install onnxruntime-gpu" in message and "--providers auto" in message


def test_automatic_choice_drops_what_cannot_start_and_logs_the_fallback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="fewshot_common.providers"):
        choice = usable_providers(["FooExecutionProvider", "CPUExecutionProvider"])
    assert choice.providers == ["CPUExecutionProvider"]
    assert choice.fell_back_from == "FooExecutionProvider"
    assert "FooExecutionProvider cannot start" in caplog.text
    assert "serving on CPUExecutionProvider" in caplog.text
    caplog.clear()
    assert usable_providers(["CPUExecutionProvider"]).fell_back_from is None
    assert caplog.text == ""


@pytest.mark.skipif(not CPU_ONLY, reason="needs an onnxruntime without the CUDA provider")
def test_without_onnxruntime_gpu_preloading_is_a_no_op_and_auto_is_the_cpu(
    caplog: pytest.LogCaptureFixture,
) -> None:
    assert preload_gpu_libraries() is False
    with caplog.at_level(logging.WARNING):
        assert choose_providers([]).providers == ["CPUExecutionProvider"]
    assert caplog.text == ""  # nothing fell back: the CPU build offers no GPU provider


@pytest.mark.skipif(not CPU_ONLY, reason="needs an onnxruntime without the CUDA provider")
def test_fewshot_serve_with_providers_cuda_refuses_to_start_clearly(
    tiny_model_path: Path, tmp_path: Path
) -> None:
    from test_serve_cli import run_serve

    result = run_serve("--model", str(tiny_model_path), "--data-dir", str(tmp_path), "--providers", "cuda")
    assert result.returncode == 1, result.stderr
    assert "fewshot serve: --providers asks for CUDAExecutionProvider" in result.stderr
    assert "Traceback" not in result.stderr
