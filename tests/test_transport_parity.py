"""One table of invalid (and edge) inputs, each sent through REST and through gRPC to the same live
server: both must give the same answer class (INVALID_ARGUMENT <-> 422, NOT_FOUND <-> 404, ...).

The gRPC API has only Embed and Classify, and its top_k is unsigned. Where a case has no gRPC
request (class management, a negative top_k), its gRPC answer is what the gRPC transport makes of
the core's answer: the same core call, mapped through ``grpc_server.GRPC_STATUS``.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, urlencode

import grpc
import httpx
import pytest
from PIL import Image

from fewshot_api.fewshot.v1 import fewshot_pb2
from fewshot_common import errors
from fewshot_service.app import ServerStack
from fewshot_service.core.core import FewShotCore
from fewshot_service.registry.redis_server import ManagedRedis
from fewshot_service.transport.grpc.server import GRPC_STATUS
from fewshot_service.transport.rest import HTTP_STATUS

from conftest import stack_settings

MAX_IMAGES = 3
MAX_IMAGE_BYTES = 50_000
Code = grpc.StatusCode

# The answer classes: a gRPC status and the HTTP statuses that mean the same.
SAME_CLASS: dict[Code, set[int]] = {
    Code.OK: {200, 201},
    Code.INVALID_ARGUMENT: {422, 415},  # 415: a file format the server does not accept
    Code.RESOURCE_EXHAUSTED: {413, 429},  # 429: overloaded, or the key over its rate limit
    Code.NOT_FOUND: {404},
    Code.FAILED_PRECONDITION: {409},
    Code.UNAVAILABLE: {503},
    Code.INTERNAL: {500},
}


def png(rgb: tuple[int, int, int], size: int = 24) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (size, size), rgb).save(out, format="PNG")
    return out.getvalue()


RED = png((230, 20, 20))
TGA = io.BytesIO()
Image.new("RGB", (8, 8)).save(TGA, format="TGA")  # a format Pillow reads but the server refuses
HUGE = png((1, 2, 3), size=300) + b"\0" * MAX_IMAGE_BYTES  # a valid PNG over the byte limit
CLASSES = [f"c{i}" for i in range(7)]  # more than the default top_k of 5


@dataclass(frozen=True)
class Case:
    id: str
    op: str  # classify | add | list | get | report | delete | delete_example | image
    expected: Code
    namespace: str = "parity"
    label: str = "c0"
    example_id: str = "1"
    top_k: int = 0
    unknown_rate: float = 0.0
    images: list[bytes] = field(default_factory=lambda: [RED])
    results: int | None = None  # classify: predictions per image when it succeeds


CASES = [
    Case("namespace too long", "classify", Code.INVALID_ARGUMENT, namespace="n" * 129),
    Case("namespace too long (list)", "list", Code.INVALID_ARGUMENT, namespace="n" * 129),
    Case("empty namespace means default", "list", Code.OK, namespace=""),
    Case("top_k negative", "classify", Code.INVALID_ARGUMENT, top_k=-1),
    Case("top_k over 1000", "classify", Code.INVALID_ARGUMENT, top_k=1001),
    Case("top_k 0 means 5", "classify", Code.OK, top_k=0, results=5),
    Case("top_k 1000 is allowed", "classify", Code.OK, top_k=1000, results=len(CLASSES)),
    Case("unknown_rate negative", "classify", Code.INVALID_ARGUMENT, unknown_rate=-0.5),
    Case("unknown_rate 1", "classify", Code.INVALID_ARGUMENT, unknown_rate=1.0),
    Case("unknown_rate over 1", "classify", Code.INVALID_ARGUMENT, unknown_rate=2.0),
    Case("unknown_rate 0 means the default", "classify", Code.OK, unknown_rate=0.0, results=5),
    Case("unknown_rate 0.5 is allowed", "classify", Code.OK, unknown_rate=0.5, results=5),
    Case("undecodable image", "classify", Code.INVALID_ARGUMENT, images=[RED, b"not an image"]),
    Case("undecodable image (add)", "add", Code.INVALID_ARGUMENT, images=[b"\x89PNG broken"]),
    Case("format not accepted", "classify", Code.INVALID_ARGUMENT, images=[RED, TGA.getvalue()]),
    Case("format not accepted (add)", "add", Code.INVALID_ARGUMENT, images=[TGA.getvalue()]),
    Case("no images", "classify", Code.INVALID_ARGUMENT, images=[]),
    Case("too many images", "classify", Code.RESOURCE_EXHAUSTED, images=[RED] * (MAX_IMAGES + 1)),
    Case("image over the byte limit", "classify", Code.RESOURCE_EXHAUSTED, images=[HUGE]),
    Case("namespace without classes", "classify", Code.FAILED_PRECONDITION, namespace="empty"),
    Case("empty label", "add", Code.INVALID_ARGUMENT, label=""),
    Case("label too long", "add", Code.INVALID_ARGUMENT, label="x" * 129),
    Case("label too long (get)", "get", Code.INVALID_ARGUMENT, label="x" * 129),
    Case("unknown class (get)", "get", Code.NOT_FOUND, label="nope"),
    Case("unknown class (delete)", "delete", Code.NOT_FOUND, label="nope"),
    Case("unknown example", "delete_example", Code.NOT_FOUND, example_id="999"),
    Case("example id too long", "delete_example", Code.INVALID_ARGUMENT, example_id="9" * 129),
    # Not UTF-8 once percent-decoded (bad%FF, bad%FE): refused, never turned into "bad\ufffd".
    # Written here with surrogate escapes; REST sends the bytes percent-encoded, gRPC raw.
    Case("label not UTF-8 (add)", "add", Code.INVALID_ARGUMENT, label="bad\udcff"),
    Case("label not UTF-8 (get)", "get", Code.INVALID_ARGUMENT, label="bad\udcfe"),
    Case("label not UTF-8 (delete)", "delete", Code.INVALID_ARGUMENT, label="bad\udcff"),
    Case("example id not UTF-8", "delete_example", Code.INVALID_ARGUMENT, example_id="1\udcfe"),
    Case("namespace not UTF-8", "classify", Code.INVALID_ARGUMENT, namespace="bad\udcff"),
    Case("namespace not UTF-8 (add)", "add", Code.INVALID_ARGUMENT, namespace="bad\udcfe"),
    Case("namespace not UTF-8 (list)", "list", Code.INVALID_ARGUMENT, namespace="bad\udcff"),
    # Dot-segments: a URL cannot carry them (browsers resolve even %2E%2E), so they are refused.
    Case("label '.' (add)", "add", Code.INVALID_ARGUMENT, label="."),
    Case("label '..' (get)", "get", Code.INVALID_ARGUMENT, label=".."),
    Case("label '..' (delete)", "delete", Code.INVALID_ARGUMENT, label=".."),
    Case("example id '.'", "delete_example", Code.INVALID_ARGUMENT, example_id="."),
    Case("namespace '..'", "classify", Code.INVALID_ARGUMENT, namespace=".."),
    Case("namespace '.' (add)", "add", Code.INVALID_ARGUMENT, namespace="."),
    Case("dots inside a name are fine", "add", Code.OK, label="v1.2..x"),
    # The stored image of an example (REST only): the same checks as the class's other routes.
    Case("stored image", "image", Code.OK),
    Case("unknown example (image)", "image", Code.NOT_FOUND, example_id="999"),
    Case("unknown class (image)", "image", Code.NOT_FOUND, label="nope"),
    Case("example id too long (image)", "image", Code.INVALID_ARGUMENT, example_id="9" * 129),
    Case("example id not UTF-8 (image)", "image", Code.INVALID_ARGUMENT, example_id="1\udcfe"),
    Case("label '..' (image)", "image", Code.INVALID_ARGUMENT, label=".."),
    Case("report", "report", Code.OK),
    Case("report of a namespace without classes", "report", Code.FAILED_PRECONDITION, namespace="empty"),
    Case("namespace too long (report)", "report", Code.INVALID_ARGUMENT, namespace="n" * 129),
    Case("namespace not UTF-8 (report)", "report", Code.INVALID_ARGUMENT, namespace="bad\udcfe"),
    Case("namespace '..' (report)", "report", Code.INVALID_ARGUMENT, namespace=".."),
]


def wire(value: str) -> bytes:
    """The bytes a client sends for ``value`` (surrogate escapes become the raw bytes)."""
    return value.encode("utf-8", "surrogateescape")


def path_segment(value: str) -> str:
    """``value`` percent-encoded for a path, dots too, so that httpx sends a '.' label as
    ``%2E`` rather than resolving it away (the server must see and refuse it)."""
    return quote(wire(value), safe="").replace(".", "%2E")


@pytest.fixture(scope="module")
def stack(private_redis: ManagedRedis, tiny_model_path: Path) -> Iterator[ServerStack]:
    settings = stack_settings(
        tiny_model_path,
        private_redis.url,
        redis_key_prefix="parity-test",
        max_images=MAX_IMAGES,
        max_image_bytes=MAX_IMAGE_BYTES,
    )
    with ServerStack(settings) as running:
        yield running


@pytest.fixture
def clients(stack: ServerStack, redis_url: str) -> Iterator[tuple[httpx.Client, grpc.Channel]]:
    # redis_url empties the private server first; then the namespace every case uses is filled.
    for i, label in enumerate(CLASSES):
        stack.core.add_examples("parity", label, [png((30 * i, 255 - 30 * i, 90))])
    with (
        httpx.Client(base_url=f"http://127.0.0.1:{stack.http_port}", timeout=30) as http,
        grpc.insecure_channel(f"127.0.0.1:{stack.grpc_port}") as channel,
    ):
        yield http, channel


def via_rest(http: httpx.Client, case: Case) -> httpx.Response:
    # Percent-encoded by hand: httpx would refuse the surrogate-escaped (not UTF-8) cases.
    query = "?" + urlencode({"namespace": wire(case.namespace)})
    label = f"/v1/classes/{path_segment(case.label)}"
    uploads = [("files", (f"{i}.png", data, "image/png")) for i, data in enumerate(case.images)]
    if case.op == "classify":
        classify_query = f"{query}&top_k={case.top_k}&unknown_rate={case.unknown_rate}"
        return http.post(f"/v1/classify{classify_query}", files=uploads or None)
    if case.op == "add":
        return http.post(f"{label}/examples{query}", files=uploads)
    if case.op == "list":
        return http.get(f"/v1/classes{query}")
    if case.op == "get":
        return http.get(f"{label}{query}")
    if case.op == "report":
        return http.get(f"/v1/report{query}")
    if case.op == "delete":
        return http.delete(f"{label}{query}")
    if case.op == "image":
        return http.get(f"{label}/examples/{path_segment(case.example_id)}/image{query}")
    return http.delete(f"{label}/examples/{path_segment(case.example_id)}{query}")


def via_core_and_grpc_table(core: FewShotCore, case: Case) -> Code:
    calls: dict[str, Callable[[], object]] = {
        "classify": lambda: core.classify_open_set(
            case.images, case.namespace, case.top_k, case.unknown_rate
        ),
        "add": lambda: core.add_examples(case.namespace, case.label, case.images),
        "list": lambda: core.list_classes(case.namespace),
        "get": lambda: core.get_class(case.namespace, case.label),
        "report": lambda: core.report(case.namespace),
        "delete": lambda: core.delete_class(case.namespace, case.label),
        "delete_example": lambda: core.delete_example(case.namespace, case.label, case.example_id),
        "image": lambda: core.example_image(case.namespace, case.label, case.example_id),
    }
    try:
        calls[case.op]()
    except errors.FewshotError as exc:
        return errors.lookup(GRPC_STATUS, exc)
    return Code.OK


def classify_request_bytes(case: Case) -> bytes:
    """The serialized request, with the namespace's raw bytes even when they are not UTF-8 (which
    the protobuf library refuses to write): a placeholder of the same length is swapped in."""
    raw = wire(case.namespace)
    placeholder = "\x01" * len(raw) if raw else ""
    request = fewshot_pb2.ClassifyRequest(
        images=case.images, namespace=placeholder, top_k=case.top_k, unknown_rate=case.unknown_rate
    )
    serialized = request.SerializeToString()
    return serialized.replace(placeholder.encode(), raw) if raw else serialized


def via_grpc(channel: grpc.Channel, core: FewShotCore, case: Case) -> tuple[Code, int | None]:
    if case.op != "classify" or case.top_k < 0:
        return via_core_and_grpc_table(core, case), None
    classify = channel.unary_unary(
        "/fewshot.v1.FewShot/Classify", response_deserializer=fewshot_pb2.ClassifyResponse.FromString
    )
    try:
        response = classify(classify_request_bytes(case), timeout=30)
    except grpc.RpcError as exc:
        return exc.code(), None
    return Code.OK, len(response.results[0].predictions)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_rest_and_grpc_give_the_same_answer_class(clients, stack: ServerStack, case: Case) -> None:
    http, channel = clients
    response = via_rest(http, case)
    code, grpc_results = via_grpc(channel, stack.core, case)
    assert code == case.expected, (code, case)
    assert response.status_code in SAME_CLASS[code], (response.status_code, response.text)
    if code != Code.OK:
        assert set(response.json()) >= {"error", "message"}
    if "format not accepted" in case.id or case.id == "undecodable image":
        assert response.status_code == 415 and response.json()["error"] == "unsupported_format"
        assert "send one of JPEG, PNG, WEBP, GIF, BMP, TIFF" in response.json()["message"]
    if "not UTF-8" in case.id:
        assert "not valid UTF-8" in response.json()["message"], response.text
    if case.results is not None:
        assert len(response.json()["results"][0]) == case.results
        if grpc_results is not None:
            assert grpc_results == case.results


class UnmappedError(errors.FewshotError):
    """A typed error nobody added to either table."""


@pytest.mark.parametrize(
    "error",
    [
        errors.InvalidInput,
        errors.ImageError,
        errors.UnsupportedFormat,
        errors.TooLarge,
        errors.NotFound,
        errors.FailedPrecondition,
        errors.Unavailable,
        errors.Overloaded,
        errors.RateLimited,
        UnmappedError,
    ],
)
def test_the_two_tables_agree_on_every_error_type(error: type[errors.FewshotError]) -> None:
    instance = error(0, "x") if issubclass(error, errors.ImageError) else error("x")
    status, _kind = errors.lookup(HTTP_STATUS, instance)
    assert status in SAME_CLASS[errors.lookup(GRPC_STATUS, instance)]
    if error is errors.RateLimited:  # its own kind (the client maps it back), 429 with Retry-After
        assert errors.lookup(HTTP_STATUS, instance) == (429, "rate_limited")
    if error is UnmappedError:
        assert errors.lookup(GRPC_STATUS, instance) == Code.INTERNAL and status == 500
