"""A model roll end to end: two real servers (ServerStack, gRPC + REST) running two different
models on one private Redis. Model A is the shipped models/default.onnx; model B is the same
network with one weight scaled and a new model id (what a retrained export looks like to the
registry). Classes added on A are classified on B without re-upload (after B's background
backfill, with 409 and the progress meanwhile), an example added on B is classified on A, and
dropping A's embeddings once no server runs it."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from fewshot_service.app import ServerStack
from fewshot_service.client import FewShotClient, errors

from conftest import REPO_ROOT, stack_settings
from rolled_model import rolled_model

PREFIX = "roll-e2e"
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


def photo(colour: str, seed: int, size: tuple[int, int] = (640, 480)) -> bytes:
    """A noisy JPEG of one colour, large enough that the server stores a reduced copy."""
    rng = np.random.default_rng(seed)
    shade = np.asarray(COLOURS[colour]) + rng.integers(-20, 21, 3)
    pixels = np.clip(shade + rng.normal(0, 12, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=92)
    return out.getvalue()


@pytest.fixture(scope="module")
def model_b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("rolled") / "rolled.onnx"
    rolled_model(REPO_ROOT / "models" / "default.onnx", path)
    return path


def http(stack: ServerStack) -> httpx.Client:
    return httpx.Client(base_url=f"http://127.0.0.1:{stack.http_port}", timeout=60)


def add(client: httpx.Client, label: str, images: list[bytes], namespace: str = "shop") -> None:
    files = [("files", (f"{i}.jpg", image, "image/jpeg")) for i, image in enumerate(images)]
    response = client.post(f"/v1/classes/{label}/examples", params={"namespace": namespace}, files=files)
    assert response.status_code == 201, response.text


def classify(client: httpx.Client, image: bytes, namespace: str = "shop") -> httpx.Response:
    return client.post(
        "/v1/classify",
        params={"namespace": namespace, "top_k": 1},
        files=[("files", ("q.jpg", image, "image/jpeg"))],
    )


def models_of(client: httpx.Client, namespace: str = "shop") -> dict[str, tuple[int, bool]]:
    listed = {n["namespace"]: n for n in client.get("/v1/namespaces").json()["namespaces"]}
    return {m["model_id"]: (m["embedded"], m["complete"]) for m in listed[namespace]["models"]}


@pytest.fixture
def server_a(private_redis, redis_url: str) -> Iterator[ServerStack]:
    settings = stack_settings(REPO_ROOT / "models" / "default.onnx", redis_url, redis_key_prefix=PREFIX)
    with ServerStack(settings) as stack:
        yield stack


def test_classes_added_on_one_model_are_classified_on_the_other_without_reupload(
    server_a: ServerStack, redis_url: str, model_b: Path
) -> None:
    with http(server_a) as a:
        add(a, "red", [photo("red", i) for i in range(3)])
        add(a, "green", [photo("green", 10 + i) for i in range(3)])
        assert classify(a, photo("red", 99)).json()["results"][0][0]["label"] == "red"

    # B computes at most 2 missing embeddings itself per request; 6 are missing, so its first
    # Classify starts a background backfill and answers 409 with the progress.
    settings_b = stack_settings(
        model_b, redis_url, redis_key_prefix=PREFIX, backfill_on_demand=2, backfill_on_start=False
    )
    with ServerStack(settings_b) as server_b, http(server_b) as b, http(server_a) as a:
        model_id_a, model_id_b = server_a.core.model_id, server_b.core.model_id
        assert model_id_a != model_id_b
        refused = classify(b, photo("red", 98))
        assert refused.status_code == 409, refused.text
        body = refused.json()
        assert body["error"] == "failed_precondition"
        assert f"0 of 6 examples embedded for model '{model_id_b}'" in body["message"]
        assert body["progress"] == {
            "model_id": model_id_b,
            "embedded": 0,
            "total": 6,
            "without_image": 0,
            "backfilling": True,
        }
        # A keeps serving with its own embeddings meanwhile.
        assert classify(a, photo("green", 97)).json()["results"][0][0]["label"] == "green"

        assert server_b.core.backfill.wait_idle(60), "B's backfill did not finish"
        assert models_of(b) == {model_id_a: (6, True), model_id_b: (6, True)}
        for colour, seed in (("red", 96), ("green", 95)):
            answer = classify(b, photo(colour, seed))
            assert answer.status_code == 200, answer.text
            assert answer.json()["results"][0][0]["label"] == colour
            assert answer.json()["model_id"] == model_id_b

        # An example added on B is classified on A, which embeds it on demand.
        add(b, "blue", [photo("blue", 20)])
        assert models_of(a)[model_id_a] == (6, False)
        answer = classify(a, photo("blue", 94))
        assert answer.status_code == 200, answer.text
        assert answer.json()["results"][0][0]["label"] == "blue"
        assert models_of(a) == {model_id_a: (7, True), model_id_b: (7, True)}

        # Over gRPC too, with the Python client; its model list says who serves what.
        with FewShotClient(f"127.0.0.1:{server_b.grpc_port}", http_url=str(b.base_url)) as client:
            assert client.classify(photo("blue", 93), namespace="shop")[0][0].label == "blue"
            listed = {m.model_id: m for m in client.list_models()}
            assert listed[model_id_b].served_here and not listed[model_id_a].served_here
            assert (listed[model_id_a].embeddings, listed[model_id_a].complete_namespaces) == (7, 1)
            with pytest.raises(errors.FailedPrecondition, match="the model this server runs"):
                client.delete_model(model_id_b)


def test_the_roll_finishes_by_dropping_the_old_models_embeddings(
    server_a: ServerStack, redis_url: str, model_b: Path
) -> None:
    with http(server_a) as a:
        add(a, "red", [photo("red", i) for i in range(2)])
        add(a, "red", [photo("red", 5)], namespace="other")
    model_id_a = server_a.core.model_id
    # B starts with backfill on: it embeds every namespace before its first Classify.
    settings_b = stack_settings(model_b, redis_url, redis_key_prefix=PREFIX)
    with ServerStack(settings_b) as server_b, http(server_b) as b:
        assert server_b.core.backfill.wait_idle(60)
        model_id_b = server_b.core.model_id
        assert models_of(b) == {model_id_a: (2, True), model_id_b: (2, True)}
        server_a.stop()  # the last server of model A is gone
        dropped = b.delete(f"/v1/models/{model_id_a}")
        assert dropped.status_code == 200, dropped.text
        assert dropped.json() == {
            "model_id": model_id_a,
            "dropped_embeddings": 3,
            "namespaces": ["other", "shop"],
        }
        assert models_of(b) == {model_id_b: (2, True)}
        assert classify(b, photo("red", 6)).json()["results"][0][0]["label"] == "red"
        assert b.get("/v1/models").json()["models"] == [
            {
                "model_id": model_id_b,
                "served_here": True,
                "namespaces": 2,
                "complete_namespaces": 2,
                "embeddings": 3,
            }
        ]


def test_with_store_images_off_a_roll_needs_a_reupload(private_redis, redis_url: str, model_b: Path) -> None:
    settings_a = stack_settings(
        REPO_ROOT / "models" / "default.onnx", redis_url, redis_key_prefix=PREFIX, store_images=False
    )
    settings_b = stack_settings(model_b, redis_url, redis_key_prefix=PREFIX, backfill_on_start=False)
    with ServerStack(settings_a) as server_a, ServerStack(settings_b) as server_b:
        with http(server_a) as a, http(server_b) as b:
            add(a, "red", [photo("red", 1)])
            refused = classify(b, photo("red", 2))
            assert refused.status_code == 409
            assert "1 examples have no stored image: re-upload them" in refused.json()["message"]
            assert refused.json()["progress"]["without_image"] == 1
            # Re-uploading through B (and deleting the old example) is the way out.
            add(b, "red", [photo("red", 1)])
            old = b.get("/v1/classes/red", params={"namespace": "shop"}).json()["example_ids"][0]
            assert (
                b.delete(f"/v1/classes/red/examples/{old}", params={"namespace": "shop"}).status_code == 200
            )
            assert classify(b, photo("red", 3)).json()["results"][0][0]["label"] == "red"
