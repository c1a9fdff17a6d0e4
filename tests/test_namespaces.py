"""GET and DELETE /v1/namespaces over real servers: two replicas (ServerStacks) on one private
Redis, the real exported model. Access scoping is in test_access.py, the registry's own tests
(also on a Redis Cluster) in test_registry.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import grpc
import httpx
import pytest
import redis

from fewshot_client import FewShotClient, errors
from fewshot_service.app import ServerStack

import image_samples as samples
from conftest import stack_settings

RED, GREEN = samples.solid_png((230, 20, 20)), samples.solid_png((20, 230, 20))
PREFIX = "ns-test"


@pytest.fixture(scope="module")
def replicas(private_redis, tiny_model_path: Path) -> Iterator[tuple[ServerStack, ServerStack]]:
    settings = stack_settings(tiny_model_path, private_redis.url, redis_key_prefix=PREFIX)
    with ServerStack(settings) as first, ServerStack(settings) as second:
        yield first, second


def http_of(stack: ServerStack) -> httpx.Client:
    return httpx.Client(base_url=f"http://127.0.0.1:{stack.http_port}", timeout=30)


def add(http: httpx.Client, namespace: str, label: str, *images: bytes) -> None:
    files = [("files", (f"{i}.png", image, "image/png")) for i, image in enumerate(images)]
    response = http.post(
        f"/v1/classes/{quote(label, safe='')}/examples", params={"namespace": namespace}, files=files
    )
    assert response.status_code == 201, response.text


def keys_of(client: redis.Redis, namespace: str) -> set[bytes]:
    return set(client.scan_iter(match=f"{PREFIX}:{{ns:{namespace.encode().hex()}}}*"))


def test_namespaces_are_listed_with_class_and_example_counts_and_model(
    replicas: tuple[ServerStack, ServerStack], redis_url: str
) -> None:
    first, second = replicas
    with http_of(first) as http:
        assert http.get("/v1/namespaces").json() == {"namespaces": []}
        add(http, "shop/a", "red", RED, RED)
        add(http, "shop/a", "green", GREEN)
        add(http, "", "red", RED)  # the default namespace
    with http_of(second) as http:
        listed = http.get("/v1/namespaces")
    assert listed.status_code == 200, listed.text
    model = first.core.model_id
    assert listed.json()["namespaces"] == [
        {
            "namespace": "default",
            "class_count": 1,
            "example_count": 1,
            "model_id": model,
            "models": [{"model_id": model, "embedded": 1, "complete": True}],
        },
        {
            "namespace": "shop/a",
            "class_count": 2,
            "example_count": 3,
            "model_id": model,
            "models": [{"model_id": model, "embedded": 3, "complete": True}],
        },
    ]


def test_deleting_a_namespace_removes_everything_and_other_replicas_see_it(
    replicas: tuple[ServerStack, ServerStack], redis_url: str, redis_client: redis.Redis
) -> None:
    first, second = replicas
    with http_of(first) as http_a, http_of(second) as http_b:
        add(http_a, "gone/ns", "red", RED, RED)
        add(http_a, "gone/ns", "green", GREEN)
        add(http_a, "kept", "red", RED)
        # The second replica caches the namespace's prototypes.
        before = http_b.post("/v1/classify", params={"namespace": "gone/ns"}, files=[("files", RED)])
        assert before.status_code == 200 and before.json()["results"][0][0]["label"] == "red"
        assert keys_of(redis_client, "gone/ns")

        deleted = http_a.delete(f"/v1/namespaces/{quote('gone/ns', safe='')}")
        assert deleted.status_code == 200, deleted.text
        assert deleted.json() == {"namespace": "gone/ns", "deleted_classes": 2, "deleted_examples": 3}
        assert keys_of(redis_client, "gone/ns") == set()  # every key, the state too

        after = http_b.post("/v1/classify", params={"namespace": "gone/ns"}, files=[("files", RED)])
        assert after.status_code == 409 and after.json()["error"] == "failed_precondition"
        assert http_b.get("/v1/classes", params={"namespace": "gone/ns"}).json()["classes"] == []
        with FewShotClient(f"127.0.0.1:{second.grpc_port}") as client:
            with pytest.raises(errors.FailedPrecondition) as refused:
                client.classify(RED, namespace="gone/ns")
            assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert client.classify(RED, namespace="kept")[0][0].label == "red"  # untouched
        assert [n["namespace"] for n in http_b.get("/v1/namespaces").json()["namespaces"]] == ["kept"]

        again = http_a.delete(f"/v1/namespaces/{quote('gone/ns', safe='')}")
        assert again.status_code == 404 and again.json()["error"] == "not_found"


@pytest.mark.parametrize(
    ("raw", "status", "error"),
    [("bad%FF", 422, "invalid_input"), ("x" * 129, 422, "invalid_input"), ("nobody", 404, "not_found")],
)
def test_bad_or_unknown_namespaces_are_refused_and_nothing_changes(
    replicas: tuple[ServerStack, ServerStack], redis_url: str, raw: str, status: int, error: str
) -> None:
    with http_of(replicas[0]) as http:
        add(http, "kept", "red", RED)
        refused = http.delete(f"/v1/namespaces/{raw}")
        assert refused.status_code == status, refused.text
        assert refused.json()["error"] == error and "ns-test" not in refused.text  # no key names
        assert [n["namespace"] for n in http.get("/v1/namespaces").json()["namespaces"]] == ["kept"]
