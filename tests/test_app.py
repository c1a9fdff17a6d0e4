"""The composition root hands every setting to the part that enforces it."""

from __future__ import annotations

import io
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from fewshot_service.app import ServerStack
from fewshot_service.client import FewShotClient
from fewshot_service.settings import Settings


def png(seed: int, size: int = 48) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def settings(model: Path, redis_url: str, **extra: object) -> Settings:
    return Settings(model=model, redis_url=redis_url, host="127.0.0.1", grpc_port=0, http_port=0, **extra)


def test_max_request_bytes_limits_grpc_messages(tiny_model_path: Path, redis_url: str) -> None:
    limit = 256 * 1024
    with ServerStack(settings(tiny_model_path, redis_url, max_request_bytes=limit)) as stack:
        with FewShotClient(f"127.0.0.1:{stack.grpc_port}") as client:
            assert client.embed([png(0)]).shape[0] == 1  # a small request passes
            noise = np.random.default_rng(1).integers(0, 256, (400, 400, 3), dtype=np.uint8)
            buffer = io.BytesIO()
            Image.fromarray(noise).save(buffer, format="PNG")  # ~480 KB: over the limit
            with pytest.raises(grpc.RpcError) as refused:
                client.embed([buffer.getvalue()])
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_batching_can_be_switched_off_from_the_environment(
    tiny_model_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FEWSHOT_BATCHING", "false")
    monkeypatch.setenv("FEWSHOT_BATCH_WORKERS", "3")
    with ServerStack(settings(tiny_model_path, redis_url)) as stack:
        assert stack.core is not None
        config = stack.core.batch_config
        assert (config.enabled, config.workers) == (False, 3)
        with FewShotClient(f"127.0.0.1:{stack.grpc_port}") as client:
            images = [png(seed) for seed in range(3)]
            together = client.embed(images)
            alone = np.stack([client.embed([image])[0] for image in images])
            np.testing.assert_allclose(together, alone, atol=1e-5)
