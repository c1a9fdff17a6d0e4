"""Shared fixtures. Real parts only: a private Redis server, a real exported ONNX model."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data" / "tiny-imagenet"


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real exported ONNX model (randomly initialised ``vit_test_p8_32``), built once per run."""
    from fewshot_service.modelmeta import Preprocess
    from fewshot_trainer.export import export_onnx
    from fewshot_trainer.vit import build_vit, get_arch

    import torch

    torch.manual_seed(0)
    spec = get_arch("vit_test_p8_32")
    path = tmp_path_factory.mktemp("model") / "tiny.onnx"
    export_onnx(build_vit(spec), spec, Preprocess(input_size=32, resize_size=36), path)
    return path
