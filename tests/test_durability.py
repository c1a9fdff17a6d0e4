"""``--durability``: the embedded Valkey fsyncs as asked, and an external Redis (or Cluster) that
would acknowledge a write before its fsync is refused at start with a clear error, never served."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import redis

from fewshot_service.app import ServerStack
from fewshot_service.registry.durability import DurabilityUnavailable
from fewshot_service.registry.redis_server import ManagedRedis
from fewshot_service.settings import Settings

import image_samples as samples
from conftest import stack_settings


@pytest.mark.parametrize("durability", ["everysec", "always"])
def test_the_embedded_server_fsyncs_as_asked(tiny_model_path: Path, tmp_path: Path, durability: str) -> None:
    settings = Settings(
        model=tiny_model_path,
        data_dir=tmp_path,
        host="127.0.0.1",
        grpc_port=0,
        http_port=0,
        durability=durability,
    )
    with ServerStack(settings) as stack:
        assert stack.managed_redis is not None
        client = redis.Redis.from_url(stack.redis_url)
        config = client.config_get("append*")
        assert (config["appendonly"], config["appendfsync"]) == ("yes", durability)
        client.close()
        url = f"http://127.0.0.1:{stack.http_port}/v1/classes/red/examples"
        assert httpx.post(url, files={"files": samples.noise_png(0)}).status_code == 201


def test_an_external_redis_that_does_not_fsync_each_write_is_refused(
    tiny_model_path: Path, redis_url: str
) -> None:
    # The tests' private server keeps no append-only file at all.
    with (
        pytest.raises(DurabilityUnavailable, match="appendfsync always"),
        ServerStack(stack_settings(tiny_model_path, redis_url, durability="always")),
    ):
        pass
    with ServerStack(stack_settings(tiny_model_path, redis_url)) as stack:  # everysec: no demand
        assert stack.core is not None


def test_an_external_redis_that_fsyncs_each_write_is_served(tiny_model_path: Path, tmp_path: Path) -> None:
    with ManagedRedis(tmp_path / "redis", persistent=True, appendfsync="always") as external:
        with ServerStack(stack_settings(tiny_model_path, external.url, durability="always")) as stack:
            url = f"http://127.0.0.1:{stack.http_port}/v1/classes/red/examples"
            assert httpx.post(url, files={"files": samples.noise_png(0)}).status_code == 201


def test_a_cluster_whose_masters_do_not_fsync_each_write_is_refused(
    tiny_model_path: Path, cluster_url: str
) -> None:
    settings = stack_settings(tiny_model_path, cluster_url, redis_cluster=True, durability="always")
    with (
        pytest.raises(DurabilityUnavailable, match="appendfsync always"),
        ServerStack(settings),
    ):
        pass
