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


@pytest.fixture(scope="session")
def other_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Same architecture as ``tiny_model_path``, other weights: a different model id."""
    from fewshot_service.modelmeta import Preprocess
    from fewshot_trainer.export import export_onnx
    from fewshot_trainer.vit import build_vit, get_arch

    import torch

    torch.manual_seed(1)
    spec = get_arch("vit_test_p8_32")
    path = tmp_path_factory.mktemp("model") / "other.onnx"
    export_onnx(build_vit(spec), spec, Preprocess(input_size=32, resize_size=36), path)
    return path


# --- Redis fixtures (registry/REST owner) ----------------------------------------------------------
# One private, non-persistent server per test run (never the shared 127.0.0.1:6379), emptied before
# each test that asks for it.


@pytest.fixture(scope="session")
def private_redis(tmp_path_factory: pytest.TempPathFactory):
    """A session-wide private Valkey/Redis server on a free loopback port."""
    from fewshot_service.redis_server import ManagedRedis

    with ManagedRedis(tmp_path_factory.mktemp("redis"), persistent=False) as server:
        yield server


@pytest.fixture
def redis_url(private_redis) -> str:
    """URL of a clean database on the private server (flushing it is safe: nobody else uses it)."""
    import redis

    client = redis.Redis.from_url(private_redis.url)
    client.flushall()
    client.close()
    return private_redis.url


@pytest.fixture
def redis_client(redis_url: str):
    import redis

    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()
