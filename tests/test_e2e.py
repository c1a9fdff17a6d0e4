"""End to end: classes defined over REST, images classified over gRPC, by real servers on
loopback ports with the real exported model; two replicas sharing one Redis; restart persistence
of the embedded Redis; the external-URL mode against the machine's Redis on 127.0.0.1:6379."""

from __future__ import annotations

import io
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import quote

import grpc
import httpx
import numpy as np
import pytest
import redis
from PIL import Image

from fewshot_client import FewShotClient
from fewshot_service.app import ServerStack
from fewshot_service.registry.redis_server import ManagedRedis
from fewshot_service.registry.registry import Registry

from conftest import stack_settings

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


def photo(
    colour: tuple[int, int, int], seed: int, size: tuple[int, int] = (40, 40), fmt: str = "PNG"
) -> bytes:
    """A noisy, slightly shifted shade of ``colour``: distinct bytes for every seed."""
    rng = np.random.default_rng(seed)
    shade = np.asarray(colour) + rng.integers(-20, 21, 3)
    pixels = np.clip(shade + rng.normal(0, 12, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format=fmt)
    return out.getvalue()


def upload(images: list[bytes]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (f"shot{i}.png", data, "image/png")) for i, data in enumerate(images)]


def add(http: str, label: str, images: list[bytes], namespace: str | None = None) -> dict:
    params = {"namespace": namespace} if namespace else {}
    response = httpx.post(
        f"{http}/v1/classes/{quote(label, safe='')}/examples", files=upload(images), params=params, timeout=60
    )
    assert response.status_code == 201, response.text
    return response.json()


def unit_mean(vectors: np.ndarray) -> np.ndarray:
    v = vectors.astype(np.float64)
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).mean(axis=0)


@pytest.fixture(scope="module")
def replicas(private_redis: ManagedRedis, tiny_model_path: Path) -> Iterator[list[ServerStack]]:
    """Two servers (each its own Redis client, registry cache and ports) sharing one Redis."""
    with (
        ServerStack(stack_settings(tiny_model_path, private_redis.url)) as a,
        ServerStack(stack_settings(tiny_model_path, private_redis.url)) as b,
    ):
        yield [a, b]


def http_of(stack: ServerStack) -> str:
    return f"http://127.0.0.1:{stack.http_port}"


def grpc_of(stack: ServerStack) -> FewShotClient:
    return FewShotClient(f"127.0.0.1:{stack.grpc_port}", timeout=30)


def test_five_shots_over_rest_then_held_out_images_classified_over_grpc(
    replicas: list[ServerStack], redis_url: str
) -> None:
    a = replicas[0]
    for label, colour in COLOURS.items():
        info = add(http_of(a), label, [photo(colour, seed) for seed in range(5)])
        assert info["count"] == 5
    held_out = [
        (label, photo(colour, 1000 + s, size=(56, 44), fmt=fmt))
        for label, colour in COLOURS.items()
        for s, fmt in enumerate(["PNG", "JPEG", "WEBP"])
    ]
    with grpc_of(a) as client:
        results = client.classify([image for _, image in held_out], top_k=3)
        assert client.model_id == a.core.model_id
    assert [r[0].label for r in results] == [label for label, _ in held_out]
    for predictions in results:
        assert len(predictions) == 3 and predictions[0].score > predictions[1].score


def test_a_class_added_on_one_replica_is_classified_by_the_other_at_once(
    replicas: list[ServerStack], redis_url: str
) -> None:
    a, b = replicas
    add(http_of(a), "red", [photo(COLOURS["red"], s) for s in range(5)])
    with grpc_of(b) as client:
        assert client.classify([photo(COLOURS["red"], 99)])[0][0].label == "red"  # b caches now
        add(http_of(a), "blue", [photo(COLOURS["blue"], s) for s in range(5)])
        assert client.classify([photo(COLOURS["blue"], 98)])[0][0].label == "blue"
        assert httpx.delete(f"{http_of(a)}/v1/classes/blue").status_code == 200
        labels = [p.label for p in client.classify([photo(COLOURS["blue"], 98)])[0]]
        assert labels == ["red"]
    # And b's REST view is a's too.
    assert [c["label"] for c in httpx.get(f"{http_of(b)}/v1/classes").json()["classes"]] == ["red"]


def test_64_concurrent_adds_through_two_replicas_lose_nothing(
    replicas: list[ServerStack], redis_url: str
) -> None:
    images = [photo(list(COLOURS.values())[i % 3], 2000 + i) for i in range(64)]
    sessions = [httpx.Client(base_url=http_of(stack), timeout=60) for stack in replicas]

    def add_one(i: int) -> dict:
        response = sessions[i % 2].post("/v1/classes/crowd/examples", files=upload([images[i]]))
        assert response.status_code == 201, response.text
        return response.json()

    with ThreadPoolExecutor(max_workers=16) as pool:
        replies = list(pool.map(add_one, range(64)))
    for session in sessions:
        session.close()
    assert sorted(r["count"] for r in replies) == list(range(1, 65))  # each add saw its own
    for url in map(http_of, replicas):
        assert httpx.get(f"{url}/v1/classes/crowd").json()["count"] == 64

    with grpc_of(replicas[1]) as client:
        embeddings = client.embed(images)
    stored = Registry(redis.Redis.from_url(redis_url)).prototypes("default")
    assert stored.labels == ["crowd"]
    np.testing.assert_allclose(stored.matrix[0], unit_mean(embeddings), atol=1e-5)


def test_redis_down_is_503_and_unavailable_then_recovers_by_itself(
    tmp_path: Path, tiny_model_path: Path
) -> None:
    server = ManagedRedis(tmp_path / "redis")
    server.start()
    port, password = server.port, redis.connection.parse_url(server.url)["password"]
    with ServerStack(stack_settings(tiny_model_path, server.url)) as stack:
        url = http_of(stack)
        add(url, "red", [photo(COLOURS["red"], 0)])
        server.stop()
        try:
            ready = httpx.get(f"{url}/readyz")
            assert ready.status_code == 503 and ready.json()["ready"] is False
            assert httpx.get(f"{url}/healthz").status_code == 200  # alive all the same
            for response in (
                httpx.get(f"{url}/v1/classes"),
                httpx.post(f"{url}/v1/classes/red/examples", files=upload([photo(COLOURS["red"], 1)])),
                httpx.post(f"{url}/v1/classify", files=upload([photo(COLOURS["red"], 1)])),
                httpx.delete(f"{url}/v1/classes/red"),
            ):
                assert response.status_code == 503, response.text
                assert response.json()["error"] == "unavailable"
            with grpc_of(stack) as client, pytest.raises(grpc.RpcError) as failure:
                client.classify([photo(COLOURS["red"], 1)])
            assert failure.value.code() == grpc.StatusCode.UNAVAILABLE
        finally:
            server = ManagedRedis(tmp_path / "redis", port=port, password=password)  # as it was
            server.start()
        try:
            # No restart of the fewshot server: its next requests simply work again.
            assert httpx.get(f"{url}/readyz").json()["ready"] is True
            assert httpx.get(f"{url}/v1/classes/red").json()["count"] == 1  # kept by the AOF
            with grpc_of(stack) as client:
                assert client.classify([photo(COLOURS["red"], 1)])[0][0].label == "red"
        finally:
            server.stop()


@pytest.mark.slow
def test_classes_survive_a_restart_of_fewshot_serve_with_its_embedded_redis(
    serve_process, tiny_model_path: Path, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    first = serve_process(["--model", tiny_model_path, "--data-dir", data_dir]).wait_ready()
    for label, colour in COLOURS.items():
        add(first.http_url, label, [photo(colour, s) for s in range(5)])
    assert first.stop() == 0

    second = serve_process(["--model", tiny_model_path, "--data-dir", data_dir]).wait_ready()
    classes = httpx.get(f"{second.http_url}/v1/classes").json()["classes"]
    assert classes == [{"label": label, "count": 5} for label in sorted(COLOURS)]
    with FewShotClient(second.grpc_target, timeout=30) as client:
        assert client.classify([photo(COLOURS["green"], 77)])[0][0].label == "green"
    assert any((data_dir / "redis").rglob("*.aof"))


def test_external_redis_url_mode_against_the_machines_redis(tiny_model_path: Path) -> None:
    external = "redis://127.0.0.1:6379/0"
    prefix = f"fewshot-test-{uuid.uuid4().hex}"  # our keys only; removed below
    client = redis.Redis.from_url(external)
    settings = stack_settings(tiny_model_path, external, redis_key_prefix=prefix)
    try:
        with ServerStack(settings) as stack:
            assert stack.managed_redis is None
            add(http_of(stack), "🐱 cat/ne:w", [photo(COLOURS["red"], s) for s in range(5)])
            add(http_of(stack), "dog", [photo(COLOURS["blue"], s) for s in range(5)])
            with grpc_of(stack) as grpc_client:
                assert grpc_client.classify([photo(COLOURS["red"], 50)])[0][0].label == "🐱 cat/ne:w"
        ours = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        assert ours, "nothing was written to the external Redis"
    finally:
        for key in client.scan_iter(match=f"{prefix}:*", count=1000):
            client.delete(key)
        assert not list(client.scan_iter(match=f"{prefix}:*", count=1000))
        client.close()
