"""The gRPC server end to end: a real exported model, a real private Redis, a loopback port."""

from __future__ import annotations

import re
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import redis
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from prometheus_client import REGISTRY

from fewshot_api.fewshot.v1 import fewshot_pb2, fewshot_pb2_grpc
from fewshot_client import FewShotClient
from fewshot_common.embedder import Embedder
from fewshot_common.images import ImageLimits
from fewshot_service.core.batcher import BatchConfig
from fewshot_service.core.core import FewShotCore
from fewshot_service.registry.redis_server import ManagedRedis
from fewshot_service.registry.registry import Registry
from fewshot_service.transport.grpc.server import create_grpc_server

import image_samples as samples

LIMITS = ImageLimits(max_image_bytes=100_000, max_pixels=1_000_000, max_images=8)
MAX_MESSAGE_BYTES = 1024 * 1024
KEY_PREFIX = f"test-grpc-{uuid.uuid4().hex[:8]}"


class Served:
    """A running server and what it was built from."""

    def __init__(
        self,
        model_path: Path,
        redis_url: str,
        batching: BatchConfig | None = None,
        key_prefix: str = "fewshot",
    ) -> None:
        self.redis = redis.Redis.from_url(redis_url, socket_connect_timeout=1, socket_timeout=2)
        self.core = FewShotCore(
            Embedder(model_path, limits=LIMITS, intra_op_threads=1),
            Registry(self.redis, key_prefix=key_prefix),
            batching=batching,
        )
        self.server, self.port = create_grpc_server(
            self.core, host="127.0.0.1", port=0, max_workers=24, max_message_bytes=MAX_MESSAGE_BYTES
        )
        self.target = f"127.0.0.1:{self.port}"
        self.channel = grpc.insecure_channel(self.target)
        self.stub = fewshot_pb2_grpc.FewShotStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.client = FewShotClient(self.target, chunk_size=LIMITS.max_images)

    def status(self, service: str = "") -> int:
        return self.health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status

    def close(self) -> None:
        self.client.close()
        self.channel.close()
        self.server.stop(None)
        self.core.close()
        self.redis.close()


@pytest.fixture(scope="module")
def served(tiny_model_path: Path, private_redis: ManagedRedis) -> Iterator[Served]:
    # A generous queue delay makes merging of concurrent requests certain enough to assert.
    # Keys of its own: other test modules use the same private Redis (and its "default").
    served = Served(tiny_model_path, private_redis.url, BatchConfig(max_queue_delay_ms=20), KEY_PREFIX)
    yield served
    served.close()


@pytest.fixture
def namespace() -> str:
    """A fresh namespace per test: tests share one server and one Redis."""
    return f"test-{uuid.uuid4().hex[:12]}"


def rpc_error(call, request) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call(request, timeout=30)
    return caught.value


def embed_request(*images: bytes) -> fewshot_pb2.EmbedRequest:
    return fewshot_pb2.EmbedRequest(images=list(images))


# --- Embed -------------------------------------------------------------------------------------


def test_embed_is_deterministic_unit_norm_and_batch_equals_single(served: Served) -> None:
    images = [samples.noise_png(seed) for seed in range(5)]
    response = served.stub.Embed(embed_request(*images), timeout=30)
    assert response.model_id == served.core.model_id
    batch = np.array([list(e.values) for e in response.embeddings], dtype=np.float32)
    assert batch.shape == (5, 64)
    np.testing.assert_allclose(np.linalg.norm(batch, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(served.client.embed(images), batch)
    singles = np.concatenate([served.client.embed([image]) for image in images])
    np.testing.assert_allclose(singles, batch, atol=1e-5)
    # And the same vectors the embedder gives in-process: the transport changes nothing.
    np.testing.assert_allclose(served.core.embedder.embed_images(images), batch, atol=1e-6)


def test_awkward_images_are_accepted(served: Served) -> None:
    images = samples.awkward_images()
    vectors = served.client.embed(list(images.values()))
    assert vectors.shape == (len(images), 64)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_concurrent_requests_are_batched_and_equal_sequential_ones(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    images = [samples.noise_png(100 + i) for i in range(16)]
    sequential = [served.client.embed([image]) for image in images]
    # Model runs as long as a real model's (the test model's take a fraction of a millisecond, less
    # than decoding the next request): requests that arrive meanwhile must share the next run.
    real_run = served.core._batcher._run

    def run(pixels: np.ndarray) -> np.ndarray:
        time.sleep(0.02)
        return real_run(pixels)

    monkeypatch.setattr(served.core._batcher, "_run", run)
    runs_before = REGISTRY.get_sample_value("fewshot_batch_images_count")
    results: list[np.ndarray | None] = [None] * len(images)
    start = threading.Barrier(len(images))

    def call(i: int) -> None:
        start.wait()
        results[i] = served.client.embed([images[i]])

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(images))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for concurrent, alone in zip(results, sequential):
        np.testing.assert_allclose(concurrent, alone, atol=1e-5)
    runs = REGISTRY.get_sample_value("fewshot_batch_images_count") - runs_before
    assert runs < len(images), f"{len(images)} concurrent requests took {runs} model runs"


# --- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("images", "message"),
    [
        ((samples.noise_png(0), b"GIF89a-but-not-really"), "image 1: "),
        ((samples.noise_png(0), b""), "image 1: empty image data"),
        ((samples.noise_png(2)[:600],), "image 0: truncated or corrupt"),
        ((), "the request has no images"),
    ],
    ids=["undecodable", "empty", "truncated", "no-images"],
)
def test_bad_images_are_invalid_argument_naming_the_index(
    served: Served, namespace: str, images: tuple[bytes, ...], message: str
) -> None:
    served.core.add_examples(namespace, "some-class", [samples.noise_png(5)])
    embed_error = rpc_error(served.stub.Embed, fewshot_pb2.EmbedRequest(images=images))
    classify_error = rpc_error(
        served.stub.Classify, fewshot_pb2.ClassifyRequest(images=images, namespace=namespace)
    )
    for error in (embed_error, classify_error):
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert message in error.details()


@pytest.mark.parametrize(
    ("images", "message"),
    [
        ((samples.noise_png(1, (300, 300)),), r"image 0: \d+ bytes exceeds the limit of 100000 bytes"),
        ((samples.noise_png(1), samples.png_header_only(2000, 2000)), "image 1: 2000x2000 = 4000000 pixels"),
        ((samples.solid_png((1, 1, 1)),) * 9, "9 images in one request exceeds the limit of 8"),
        ((np.random.default_rng(0).bytes(MAX_MESSAGE_BYTES + 1000),), "larger than max"),
    ],
    ids=["bytes", "pixels", "images", "message-size"],
)
def test_limits_are_resource_exhausted(served: Served, images: tuple[bytes, ...], message: str) -> None:
    error = rpc_error(served.stub.Embed, embed_request(*images))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert re.search(message, error.details()), error.details()


def test_classify_without_classes_is_failed_precondition(served: Served, namespace: str) -> None:
    error = rpc_error(
        served.stub.Classify,
        fewshot_pb2.ClassifyRequest(images=[samples.noise_png(0)], namespace=namespace),
    )
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert f"namespace {namespace!r} has no classes" in error.details()


def test_bad_top_k_is_invalid_argument(served: Served, namespace: str) -> None:
    served.core.add_examples(namespace, "x", [samples.noise_png(0)])
    error = rpc_error(
        served.stub.Classify,
        fewshot_pb2.ClassifyRequest(images=[samples.noise_png(0)], namespace=namespace, top_k=5000),
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "top_k must be between 0 and 1000" in error.details()


def test_another_models_namespace_is_embedded_on_demand_else_failed_precondition_with_progress(
    served: Served, namespace: str, other_model_path: Path, private_redis: ManagedRedis
) -> None:
    red = samples.solid_png((255, 0, 0))
    served.core.add_examples(namespace, "red", [red])
    other = Served(other_model_path, private_redis.url, key_prefix=KEY_PREFIX)
    try:
        # The other model embeds the stored image itself: no re-upload.
        answer = other.stub.Classify(fewshot_pb2.ClassifyRequest(images=[red], namespace=namespace))
        assert answer.results[0].predictions[0].label == "red" and answer.model_id == other.core.model_id
        # An example stored without an image (as before this feature) cannot be.
        served.core.registry.add_examples(namespace, "blue", served.core.embed([red]), served.core.model_id)
        error = rpc_error(
            other.stub.Classify,
            fewshot_pb2.ClassifyRequest(images=[samples.noise_png(0)], namespace=namespace),
        )
    finally:
        other.close()
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert f"1 of 2 examples embedded for model {other.core.model_id!r}" in error.details()
    assert "1 examples have no stored image" in error.details()
    assert f"{served.core.model_id!r} (2 of 2)" in error.details()


# --- Classify ----------------------------------------------------------------------------------


def test_classify_top_k_order_and_verbatim_labels(served: Served, namespace: str) -> None:
    colours = {
        "red/🍎 {a}": (230, 20, 20),
        "green *:x": (20, 200, 40),
        "blue": (20, 30, 220),
        "yellow": (230, 220, 30),
        "white": (250, 250, 250),
        "black": (5, 5, 5),
    }
    for label, rgb in colours.items():
        served.core.add_examples(namespace, label, [samples.solid_png(rgb), samples.solid_png(rgb, (30, 60))])
    queries = [samples.solid_png((225, 25, 25)), samples.solid_png((25, 205, 45))]
    default_k = served.client.classify(queries, namespace=namespace)
    assert [len(r) for r in default_k] == [5, 5]  # top_k 0 means 5 (of 6 classes)
    assert [r[0].label for r in default_k] == ["red/🍎 {a}", "green *:x"]
    assert served.client.model_id == served.core.model_id
    for predictions in default_k:
        scores = [p.score for p in predictions]
        assert scores == sorted(scores, reverse=True)
    top2 = served.client.classify(queries, namespace=namespace, top_k=2)
    assert [[p.label for p in r] for r in top2] == [[p.label for p in r[:2]] for r in default_k]
    # The score is the cosine to the re-normalised prototype, computed here independently.
    query = served.client.embed(queries[:1])[0]
    red = (230, 20, 20)
    examples = served.client.embed([samples.solid_png(red), samples.solid_png(red, (30, 60))])
    prototype = examples.mean(axis=0)
    expected = float(query @ (prototype / np.linalg.norm(prototype)))
    assert default_k[0][0].score == pytest.approx(expected, abs=1e-5)


def test_empty_namespace_means_default(served: Served) -> None:
    served.core.add_examples("default", "only-class", [samples.noise_png(3)])
    try:
        result = served.client.classify([samples.noise_png(4)], namespace="")
        assert [p.label for p in result[0]] == ["only-class"]
    finally:
        served.core.delete_class("default", "only-class")


# --- health and reflection ---------------------------------------------------------------------


def test_health_is_serving(served: Served) -> None:
    assert served.status("") == health_pb2.HealthCheckResponse.SERVING
    assert served.status("fewshot.v1.FewShot") == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_and_describes_the_services(served: Served) -> None:
    database = ProtoReflectionDescriptorDatabase(served.channel)
    services = set(database.get_services())
    assert {"fewshot.v1.FewShot", "grpc.health.v1.Health"} <= services
    pool = descriptor_pool.DescriptorPool(database)
    fewshot = pool.FindServiceByName("fewshot.v1.FewShot")
    assert [m.name for m in fewshot.methods] == ["Embed", "Classify"]
    assert pool.FindMessageTypeByName("fewshot.v1.Prediction").fields_by_name["score"].type == 2  # float


def test_redis_down_is_unavailable_and_recovers_by_itself(tiny_model_path: Path, tmp_path: Path) -> None:
    store = ManagedRedis(tmp_path / "redis", persistent=True)
    store.start()
    port, password = store.port, redis.connection.parse_url(store.url)["password"]
    served = Served(tiny_model_path, store.url)
    try:
        served.core.add_examples("", "red", [samples.solid_png((255, 0, 0))])
        classify = fewshot_pb2.ClassifyRequest(images=[samples.solid_png((250, 5, 5))])
        assert served.stub.Classify(classify, timeout=30).results[0].predictions[0].label == "red"

        store.stop()
        error = rpc_error(served.stub.Classify, classify)
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert "unreachable" in error.details()
        assert served.status() == health_pb2.HealthCheckResponse.NOT_SERVING
        # Embedding needs no Redis and keeps working.
        assert len(served.client.embed([samples.noise_png(0)])) == 1

        store = ManagedRedis(tmp_path / "redis", port=port, password=password, persistent=True)
        store.start()
        assert served.status() == health_pb2.HealthCheckResponse.SERVING
        assert served.stub.Classify(classify, timeout=30).results[0].predictions[0].label == "red"
    finally:
        served.close()
        store.stop()
