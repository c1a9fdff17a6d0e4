"""The Python client against a real server stack (gRPC and REST on loopback, a private Redis, the
real exported model): every user operation over both transports, and its typed exceptions."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from fewshot_client import DEFAULT_MAX_MESSAGE_BYTES, ClassifyResult, FewShotClient, errors
from fewshot_common import errors as core_errors
from fewshot_service.app import ServerStack
from fewshot_service.settings import DEFAULT_MAX_REQUEST_BYTES
from fewshot_service.transport.grpc.server import GRPC_STATUS
from fewshot_service.transport.rest import HTTP_STATUS

import image_samples as samples
from conftest import stack_settings

RED, GREEN = samples.solid_png((230, 20, 20)), samples.solid_png((20, 230, 20))
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def stack(private_redis, tiny_model_path: Path) -> Iterator[ServerStack]:
    with ServerStack(
        stack_settings(tiny_model_path, private_redis.url, redis_key_prefix="client-test")
    ) as running:
        yield running


@pytest.fixture(params=["grpc", "rest"])
def client(request: pytest.FixtureRequest, stack: ServerStack, redis_url: str) -> Iterator[FewShotClient]:
    """Classes over REST always; embed/classify over gRPC or (no gRPC target) over REST."""
    target = f"127.0.0.1:{stack.grpc_port}" if request.param == "grpc" else None
    with FewShotClient(target, http_url=f"http://127.0.0.1:{stack.http_port}") as opened:
        yield opened


def test_round_trip_of_everything_a_user_does(client: FewShotClient, tmp_path: Path) -> None:
    red_file = tmp_path / "red.png"
    red_file.write_bytes(RED)
    added = client.add_examples("red/1", red_file, namespace="shop")  # a single path
    assert (added.namespace, added.label, added.count, added.added_example_ids) == ("shop", "red/1", 1, ["1"])
    added = client.add_examples("red/1", [RED, str(red_file)], namespace="shop")  # a list of both kinds
    assert added.count == 3 and len(added.added_example_ids) == 2
    client.add_examples("green", GREEN, namespace="shop")
    assert [(c.label, c.count) for c in client.list_classes(namespace="shop")] == [("green", 1), ("red/1", 3)]
    assert client.get_class("red/1", namespace="shop").example_ids == ["1", "2", "3"]

    vectors = client.embed([RED, GREEN])
    assert vectors.shape[0] == 2 and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-4)
    assert client.embed(RED).shape[0] == 1  # a single image
    results = client.classify([RED, GREEN], namespace="shop", top_k=2, unknown_rate=0.2)
    assert all(isinstance(r, ClassifyResult) for r in results)
    assert [r.predictions[0].label for r in results] == ["red/1", "green"]
    assert all(isinstance(r.unknown, bool) for r in results)
    assert all(p.confidence is not None and 0 <= p.confidence <= 1 for r in results for p in r)
    assert client.model_id

    remaining = client.delete_example("red/1", "1", namespace="shop")
    assert remaining is not None and remaining.example_ids == ["2", "3"]
    assert client.delete_example("green", "4", namespace="shop") is None  # its last: class gone
    [listed] = client.list_namespaces()
    assert (listed.namespace, listed.class_count, listed.example_count) == ("shop", 1, 2)
    assert listed.model_id == client.model_id
    client.delete_class("red/1", namespace="shop")
    assert client.list_classes(namespace="shop") == []

    client.add_examples("red", RED, namespace="temp")
    deleted = client.delete_namespace("temp")
    assert (deleted.namespace, deleted.deleted_classes, deleted.deleted_examples) == ("temp", 1, 1)
    assert client.list_namespaces() == []


def test_typed_exceptions(client: FewShotClient) -> None:
    with pytest.raises(errors.NotFound) as missing:
        client.get_class("nobody")
    assert missing.value.status == 404 and "nobody" in str(missing.value)
    with pytest.raises(errors.NotFound):
        client.delete_namespace("nobody")
    with pytest.raises(errors.FailedPrecondition):  # no classes yet
        client.classify(RED, namespace="empty")
    with pytest.raises(errors.InvalidInput) as bad_add:
        client.add_examples("red", [RED, b"not an image"])
    assert bad_add.value.index == 1
    with pytest.raises(errors.InvalidInput) as bad_embed:
        client.embed(b"not an image")
    if isinstance(bad_embed.value, grpc.RpcError):  # over gRPC it is both, as before
        assert bad_embed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert client.list_classes() == []  # nothing of the bad add landed
    assert isinstance(bad_embed.value, core_errors.FewshotError)


def test_grpc_errors_stay_rpc_errors_and_rest_calls_need_http_url(stack: ServerStack, redis_url: str) -> None:
    with FewShotClient(f"127.0.0.1:{stack.grpc_port}") as grpc_only:
        with pytest.raises(grpc.RpcError) as caught:
            grpc_only.classify(RED, namespace="empty")
        assert isinstance(caught.value, errors.FailedPrecondition)
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION and caught.value.details()
        with pytest.raises(ValueError, match="http_url"):
            grpc_only.list_namespaces()
    with pytest.raises(ValueError):
        FewShotClient()


def test_error_tables_match_the_servers() -> None:
    for error_class, (status, kind) in HTTP_STATUS.items():
        if error_class is not core_errors.FewshotError:
            assert errors.REST_KINDS[kind] is error_class, kind
            assert isinstance(errors.from_http(status, {"error": kind, "message": "m"}), error_class)
    for error_class, code in GRPC_STATUS.items():
        mapped = errors.GRPC_CODES.get(code, core_errors.FewshotError)
        assert issubclass(error_class, mapped) or code == grpc.StatusCode.RESOURCE_EXHAUSTED, error_class
    assert DEFAULT_MAX_MESSAGE_BYTES == DEFAULT_MAX_REQUEST_BYTES


def test_the_client_imports_without_the_servers_dependencies() -> None:
    # Make the server's packages and dependencies unimportable, as in an environment that lacks them
    # (tests/test_client_distribution.py installs the client into one that really does).
    blocked = [
        "fastapi",
        "starlette",
        "uvicorn",
        "redis",
        "onnxruntime",
        "PIL",
        "pydantic",
        "prometheus_client",
        "fewshot_common",
        "fewshot_service",
        "fewshot_trainer",
    ]
    code = (
        "import sys\n"
        f"for name in {blocked!r}: sys.modules[name] = None\n"
        "from fewshot_client import FewShotClient, errors\n"
        "FewShotClient('127.0.0.1:1', http_url='http://127.0.0.1:1').close()\n"
        "print('ok')\n"
    )
    env = {"PYTHONPATH": str(ROOT / "service" / "client"), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
